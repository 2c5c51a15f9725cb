"""`abkd-sweep --task classification`: the sweep of `ABKDClassifierTrainer` runs.

The flags are those of `abkd-train-classifier` (its script arguments, `ABKDClassifierConfig` and
TRL's `ModelConfig`; `--config` YAML files alike) plus
[SweepArguments][abkd_trainer.tools.sweep.search_space.SweepArguments]. The run is prepared as
`abkd-train-classifier` prepares it (its `load_demo_inputs` / `load_user_inputs` and
`build_trainer`); a `model_init` then rebuilds the student for every trial: the demo's seeded
ViT, or the named student loaded with the run's `model_init_kwargs`. With no model, teacher and
dataset, the offline digits demo is swept. The objective defaults to `eval_accuracy` (top-1 on
the held-out split, maximised); the search space is that of every sweep: `alpha`, `beta`, and
with their ranges `learning_rate` and `temperature`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

from abkd_trainer.tools.sweep.search_space import SweepArguments

CLASSIFIER_PROG = "abkd-sweep --task classification"
ACCURACY_METRIC = "eval_accuracy"
# The classifier demo sweep: the demo's settings (abkd_trainer.classification.demo.DEMO_DEFAULTS)
# with 12 trials of 300 steps (the demo trains 1000) and an evaluation every 100 steps, the
# pruner's intermediate values.
CLASSIFIER_SWEEP_DEMO_DEFAULTS: dict[str, Any] = {
    "output_dir": "abkd-classifier-sweep-output",
    "n_trials": 12,
    "max_steps": 300,
    "eval_steps": 100,
    "logging_steps": 100,
    "disable_tqdm": True,
}


def make_classifier_sweep_parser() -> Any:
    """The `abkd-train-classifier` parser with `SweepArguments` added."""
    from abkd_trainer.cli.train_classifier import make_parser

    return make_parser(
        CLASSIFIER_PROG,
        (SweepArguments,),
        description="abkd-sweep for classifiers: choose (alpha, beta) (and optionally learning "
        "rate and temperature) of abkd-train-classifier runs with Optuna.",
    )


def parse_classifier_sweep_args(argv: Sequence[str]) -> tuple[Any, Any, Any, SweepArguments, bool]:
    """Parse the flags and `--config` file of a classifier sweep, with the sweep's defaults.

    Precedence, lowest first: dataclass defaults, the sweep's defaults (intermediate
    evaluations, no checkpoints), the demo's and the demo sweep's (demo only), the `--config`
    YAML file, the command line.

    Args:
        argv: the command line without the program name (`--task` included or not).

    Returns:
        `(script, training, model, sweep, is_demo)` arguments.
    """
    from abkd_trainer.classification.config import ABKDClassifierConfig
    from abkd_trainer.classification.demo import DEMO_DEFAULTS
    from abkd_trainer.cli.train_classifier import is_demo_run
    from abkd_trainer.tools.sweep.command import SWEEP_DEFAULTS

    demo = is_demo_run(argv)
    parser = make_classifier_sweep_parser()
    if not any(token in ("-h", "--help") for token in argv):  # --help shows the real defaults
        overrides = dict(SWEEP_DEFAULTS)
        if demo:
            config_fields = {f.name for f in fields(ABKDClassifierConfig)}
            overrides.update({k: v for k, v in DEMO_DEFAULTS.items() if k in config_fields})
            overrides.update(CLASSIFIER_SWEEP_DEMO_DEFAULTS)
        parser.set_defaults_with_config(**overrides)
    script_args, training_args, model_args, sweep_args = parser.parse_args_and_config(list(argv))
    return script_args, training_args, model_args, sweep_args, demo


def classifier_model_init(inputs: Any, training_args: Any, demo: bool) -> Callable[[Any], Any]:
    """The `model_init` of a classifier sweep: a new student for every trial.

    The Trainer seeds every trial (`set_seed(args.seed)`) before calling it with the trial; the
    trainer then prepares each student as it prepared the first (PEFT adapters, dropout, the
    teacher's classes). A re-run that resumes from a checkpoint gets the checkpoint's weights
    from the trainer, which loads weights saved under renamed keys (ViT in transformers 5) too.

    Args:
        inputs: the run's inputs (`abkd_trainer.cli.train_classifier.RunInputs`); `inputs.model`
            is the demo's student or the student's name.
        training_args: the training arguments (`model_init_kwargs` for a student by name,
            `teacher_model_name_or_path` and `seed` for the demo's, `output_dir`).
        demo: whether the demo is swept.
    """
    from abkd_trainer.classification.models import load_classifier

    if demo:
        from transformers import AutoConfig

        from abkd_trainer.classification.demo import build_demo_student

        teacher_config = AutoConfig.from_pretrained(training_args.teacher_model_name_or_path)

    def model_init(trial: Any = None) -> Any:
        if demo:
            model = build_demo_student(teacher_config, seed=training_args.seed)
        else:
            model = load_classifier(inputs.model, training_args.model_init_kwargs, who="student")
        return model

    return model_init


def run_classifier_sweep_command(argv: Sequence[str], callbacks: Sequence[Any] = ()) -> Any:
    """Sweep `abkd-train-classifier` runs: parse, prepare the run once, run the study.

    Args:
        argv: the command line without the program name.
        callbacks: more `TrainerCallback`s for the trainer of every trial.

    Returns:
        The [SweepResult][abkd_trainer.tools.sweep.study.SweepResult].
    """
    import os

    from abkd_trainer.cli.train_classifier import (
        build_trainer,
        load_demo_inputs,
        load_user_inputs,
    )
    from abkd_trainer.tools.sweep.command import explicit_train_arguments
    from abkd_trainer.tools.sweep.metrics import infer_direction
    from abkd_trainer.tools.sweep.study import check_single_process, run_trainer_sweep

    script_args, training_args, model_args, sweep_args, demo = parse_classifier_sweep_args(argv)
    check_single_process(training_args)
    if demo:
        from abkd_trainer.classification.demo import require_demo_assets

        require_demo_assets()
        print(
            "abkd-sweep: no model, teacher or dataset given, sweeping the offline classifier "
            f"demo (output in {os.path.abspath(training_args.output_dir)})."
        )
        inputs = load_demo_inputs(training_args)
    else:
        inputs = load_user_inputs(script_args, training_args, model_args)
    if inputs.test_dataset is None:
        raise ValueError(
            "A classifier sweep scores every trial on the held-out split, but the dataset has "
            "none: name one with --dataset_test_split / --dataset_test_file, or hold out rows "
            "with --dataset_test_size."
        )
    trainer = build_trainer(inputs, training_args, model_args, script_args)
    trainer.model_init = classifier_model_init(inputs, training_args, demo)
    for callback in callbacks:
        trainer.add_callback(callback)
    metric = sweep_args.objective_metric or ACCURACY_METRIC
    demo_trial = {key: CLASSIFIER_SWEEP_DEMO_DEFAULTS[key] for key in ("max_steps", "eval_steps")}
    return run_trainer_sweep(
        trainer,
        sweep_args,
        metric=metric,
        direction=sweep_args.direction or infer_direction(metric),
        best_config=explicit_train_arguments(
            argv, demo, parser=make_classifier_sweep_parser(), demo_trial=demo_trial
        ),
        command="abkd-train-classifier",
    )
