"""The `abkd-sweep` command: its parser, its data, and `main`.

Flags and `--config` YAML files are those of `abkd-train` plus
[SweepArguments][abkd_trainer.tools.sweep.search_space.SweepArguments]; with no model and
dataset the demo is swept.
"""

from __future__ import annotations

import argparse
import enum
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from abkd_trainer.tools.sweep.lm import run_sweep
from abkd_trainer.tools.sweep.outputs import trial_rows, unfinished_lines
from abkd_trainer.tools.sweep.search_space import SweepArguments, import_optuna
from abkd_trainer.tools.sweep.study import SweepResult

if TYPE_CHECKING:
    from datasets import Dataset

# The parser's description (`abkd-sweep --help`).
DESCRIPTION = (
    "abkd-sweep: choose (alpha, beta) (and optionally learning rate and temperature) with Optuna."
)
# What `--task` sweeps: `abkd-train` runs, or `abkd-train-classifier` runs.
TASKS = ("lm", "classification")
# Defaults that differ from abkd-train's in every sweep: intermediate evaluations for the pruner,
# no checkpoints (a trial's model is thrown away).
SWEEP_DEFAULTS: dict[str, Any] = {
    "eval_strategy": "steps",
    "eval_steps": 0.25,
    "save_strategy": "no",
}
# The demo sweep: the demo's settings (abkd_trainer.lm.demo.DEMO_DEFAULTS) with 12 shorter trials,
# 300 steps of 32 sequences (the demo trains 1000 of 64), and three evaluations each. Sized for
# two CPU cores shared with other jobs (load average ~9): 65-110 s per trial, at most 20 minutes
# in all.
SWEEP_DEMO_DEFAULTS: dict[str, Any] = {
    "output_dir": "abkd-sweep-output",
    "n_trials": 12,
    "max_steps": 300,
    "per_device_train_batch_size": 32,
    "eval_steps": 100,
    "logging_steps": 100,
    "rouge_l_eval": False,  # the sweep computes ROUGE-L as its objective itself
    "disable_tqdm": True,
}


def make_sweep_parser() -> Any:
    """The `abkd-train` parser with `SweepArguments` added, as `abkd-sweep`."""
    from abkd_trainer.cli.train import make_parser

    return make_parser(
        prog="abkd-sweep",
        extra_dataclass_types=(SweepArguments,),
        description=DESCRIPTION,
    )


def parse_sweep_args(argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    """Parse `abkd-sweep`'s flags and `--config` file, with the sweep's defaults.

    Args:
        argv: the command line without the program name; None reads `sys.argv`.

    Returns:
        `(script, training, model, mixture, sweep, is_demo)` arguments.
    """
    from abkd_trainer.cli.train import parse_args
    from abkd_trainer.lm.demo import DEMO_DEFAULTS

    return parse_args(
        argv,
        parser=make_sweep_parser(),
        defaults=SWEEP_DEFAULTS,
        demo_defaults={**DEMO_DEFAULTS, **SWEEP_DEMO_DEFAULTS},
    )


def yaml_value(value: Any) -> Any:
    """`value` as YAML writes it plainly: an enum's value, lists of those.

    Args:
        value: a parsed flag's value.
    """
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [yaml_value(item) for item in value]
    return value


def explicit_train_arguments(
    argv: Sequence[str],
    demo: bool,
    *,
    parser: Any = None,
    demo_trial: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The training settings given in `--config` and on the command line (no defaults).

    The sweep's own flags are left out; for the demo, the trial's length (and batch size) are
    added, since the demo sweep's trials are shorter than the demo.

    Args:
        argv: the command line without the program name.
        demo: whether the demo is swept.
        parser: the sweep's parser; None: `make_sweep_parser()` (`abkd-train`'s flags).
        demo_trial: the demo sweep's settings to add for the demo; None: the LM demo sweep's
            `max_steps` and `per_device_train_batch_size`.

    Returns:
        Flag -> value, the base of `best.yaml`.
    """
    import yaml

    argv = list(argv)
    config: dict[str, Any] = {}
    if "--config" in argv:
        index = argv.index("--config")
        with open(argv[index + 1]) as handle:
            config = yaml.safe_load(handle) or {}
        del argv[index : index + 2]
    parser = parser or make_sweep_parser()
    for action in parser._actions:  # only what the user typed ends up in the namespace
        action.default = argparse.SUPPRESS
    given, _ = parser.parse_known_args(argv)
    config.update(vars(given))
    sweep_only = {f.name for f in fields(SweepArguments)}
    explicit = {key: yaml_value(value) for key, value in config.items() if key not in sweep_only}
    if demo:
        keys = ("max_steps", "per_device_train_batch_size")
        for key, value in (demo_trial or {k: SWEEP_DEMO_DEFAULTS[k] for k in keys}).items():
            explicit.setdefault(key, value)
    return explicit


def sweep_data(
    script_args: Any, mixture_args: Any, sweep_args: SweepArguments, seed: int, demo: bool
) -> tuple[Dataset, Dataset, bool]:
    """Training and evaluation splits; the latter held out from training when there is none.

    Args:
        script_args: the script arguments (dataset and split names).
        mixture_args: the dataset mixture arguments.
        sweep_args: the search (its `heldout_fraction`).
        seed: the seed of the held-out split.
        demo: whether the demo is swept (its shipped dataset).

    Returns:
        `(train, evaluation, evaluation_is_a_test_split)`.
    """
    from abkd_trainer.cli.train import load_datasets

    if demo:
        from abkd_trainer.lm.demo import load_demo_dataset

        datasets = load_demo_dataset()
    else:
        datasets = load_datasets(script_args, mixture_args)
    train = datasets[script_args.dataset_train_split]
    if script_args.dataset_test_split in datasets:
        return train, datasets[script_args.dataset_test_split], True
    size = min(1000, max(1, int(len(train) * sweep_args.heldout_fraction)))
    split = train.train_test_split(test_size=size, seed=seed)
    print(
        f"abkd-sweep: no {script_args.dataset_test_split!r} split; holding out {size} training "
        "rows for evaluation."
    )
    return split["train"], split["test"], False


def rouge_rows(eval_dataset: Dataset, script_args: Any) -> tuple[list, list] | None:
    """The prompts and references of ROUGE-L, or None when the split has none.

    Args:
        eval_dataset: the evaluation split.
        script_args: the script arguments (`rouge_l_num_prompts`).
    """
    from abkd_trainer.lm.evaluation import prompts_and_references

    if not {"prompt", "completion"} <= set(eval_dataset.column_names) and (
        "messages" not in eval_dataset.column_names
    ):
        return None
    rows = eval_dataset
    if script_args.rouge_l_num_prompts is not None:
        rows = rows.select(range(min(script_args.rouge_l_num_prompts, len(rows))))
    return prompts_and_references(rows)


def lm_student_and_tokenizer(
    training_args: Any, model_args: Any, demo: bool
) -> tuple[str | Callable[[], Any], Any]:
    """The student (a name or, for the demo, a factory) and the tokenizer of the sweep.

    For the demo, the CPU threads are limited as `abkd-train` does for it; otherwise the model
    flags become `SFTTrainer`'s `model_init_kwargs`, as in `abkd-train`.

    Args:
        training_args: the training arguments.
        model_args: the model arguments.
        demo: whether the demo is swept.
    """
    from transformers import AutoConfig, AutoTokenizer

    from abkd_trainer.cli.train import set_model_init_kwargs

    if not demo:
        set_model_init_kwargs(model_args, training_args)
        tokenizer = AutoTokenizer.from_pretrained(
            model_args.model_name_or_path,
            revision=model_args.model_revision,
            trust_remote_code=training_args.trust_remote_code,
        )
        return model_args.model_name_or_path, tokenizer
    from abkd_trainer.lm.demo import (
        build_demo_student,
        limit_cpu_threads_for_demo,
        require_demo_assets,
    )

    require_demo_assets()
    limit_cpu_threads_for_demo()
    teacher_path = training_args.teacher_model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    teacher_config = AutoConfig.from_pretrained(teacher_path)
    print(
        "abkd-sweep: no model or dataset given, sweeping the offline demo "
        f"(output in {os.path.abspath(training_args.output_dir)})."
    )
    return (lambda: build_demo_student(teacher_config, seed=training_args.seed)), tokenizer


def print_summary(result: SweepResult, seconds: float) -> None:
    """Print the study's size, this worker's time, the trials that did not finish and why, the
    best trial and the files written.

    Args:
        result: what the sweep found.
        seconds: this worker's wall time.
    """
    rows = trial_rows(result.study, result.metric, result.direction)
    finished = sum(row["state"] in ("COMPLETE", "PRUNED") for row in rows)
    print(
        f"\nabkd-sweep: {len(rows)} trials in the study ({finished} finished), this worker's run "
        f"took {seconds / 60:.1f} min."
    )
    for line in unfinished_lines(rows):
        print(f"  {line}")
    if result.best_params is not None:
        print(
            f"Best: {result.best_params} with {result.metric} = {result.best_value:.4g} "
            f"({result.direction})."
        )
    print("Wrote " + ", ".join(str(path) for path in result.files))


def requested_task(argv: Sequence[str]) -> str:
    """The `--task` of the sweep, from the command line or the `--config` YAML (default `lm`).

    Args:
        argv: the command line without the program name.

    Raises:
        ValueError: an unknown task.
    """
    from abkd_trainer.cli.common import requested_values

    task = str(requested_values(argv, ("task",)).get("task", "lm"))
    if task not in TASKS:
        raise ValueError(f"`--task` must be one of {', '.join(TASKS)}, got {task!r}.")
    return task


def run_lm_sweep_command(argv: Sequence[str], callbacks: Sequence[Any] = ()) -> SweepResult:
    """Sweep `abkd-train` runs: parse, load the data and the student, run the study.

    Args:
        argv: the command line without the program name.
        callbacks: more `TrainerCallback`s for the trainer of every trial.
    """
    from trl import get_peft_config

    script_args, training_args, model_args, mixture_args, sweep_args, demo = parse_sweep_args(argv)
    student, tokenizer = lm_student_and_tokenizer(training_args, model_args, demo)
    train, evaluation, _ = sweep_data(
        script_args, mixture_args, sweep_args, training_args.seed, demo
    )
    rouge = rouge_rows(evaluation, script_args)
    return run_sweep(
        student,
        None,  # the trainer loads args.teacher_model_name_or_path once
        training_args,
        sweep_args,
        train,
        evaluation,
        tokenizer,
        peft_config=get_peft_config(model_args),
        rouge_prompts=rouge[0] if rouge else None,
        rouge_references=rouge[1] if rouge else None,
        rouge_kwargs={
            "seeds": script_args.rouge_l_seeds,
            "max_new_tokens": script_args.rouge_l_max_new_tokens,
            "batch_size": script_args.rouge_l_batch_size,
        },
        best_config=explicit_train_arguments(argv, demo),
        callbacks=callbacks,
    )


def main(argv: Sequence[str] | None = None, *, callbacks: Sequence[Any] = ()) -> int:
    """Console entry point of `abkd-sweep` and `python -m abkd_trainer.tools.sweep`.

    `--task lm` (the default) sweeps `abkd-train` runs, `--task classification`
    `abkd-train-classifier` runs (`abkd_trainer.tools.sweep.classification`).

    Args:
        argv: the command line without the program name; None reads `sys.argv`.
        callbacks: more `TrainerCallback`s for the trainer of every trial (to embed the
            command in a script).

    Returns:
        The exit status, 0.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    import_optuna()
    start = time.perf_counter()
    if requested_task(argv) == "classification":
        from abkd_trainer.tools.sweep.classification import run_classifier_sweep_command

        result = run_classifier_sweep_command(argv, callbacks)
    else:
        result = run_lm_sweep_command(argv, callbacks)
    print_summary(result, time.perf_counter() - start)
    return 0
