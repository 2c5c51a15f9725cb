"""The sweep of `ABKDTrainer` runs: the student rebuilt per trial, the reference KL, ROUGE-L."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from abkd_trainer.tools.sweep.metrics import SweepMetricsCallback, choose_objective
from abkd_trainer.tools.sweep.search_space import SweepArguments, import_optuna
from abkd_trainer.tools.sweep.study import SweepResult, check_single_process, run_trainer_sweep

if TYPE_CHECKING:
    import optuna
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

    from abkd_trainer.lm.config import ABKDConfig


def make_model_init(
    student: str | Callable[[], PreTrainedModel],
    args: ABKDConfig,
    peft_config: Any = None,
) -> Callable[[], PreTrainedModel]:
    """A `model_init` that rebuilds the student as `SFTTrainer` would for a new trial.

    The Trainer seeds every trial (`set_seed(args.seed)`) before calling it, so every trial
    starts from the same weights. LoRA adapters from `peft_config` are added again and dropout is
    disabled (`args.disable_dropout`), as `ABKDTrainer` does for the model it is constructed with.

    Args:
        student: a name/path (loaded with `args.model_init_kwargs`, as `SFTTrainer` does) or a
            zero-argument factory.
        args: the training arguments.
        peft_config: LoRA configuration of the student, or None.
    """

    def model_init() -> PreTrainedModel:
        from trl.trainer.utils import create_model_from_path, disable_dropout_in_model

        if isinstance(student, str):
            kwargs = dict(args.model_init_kwargs or {})
            kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            model = create_model_from_path(student, **kwargs)
        else:
            model = student()
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if args.disable_dropout:
            disable_dropout_in_model(model)
        return model

    return model_init


def run_sweep(
    student: str | Callable[[], PreTrainedModel],
    teacher_model: str | PreTrainedModel | None,
    args: ABKDConfig,
    sweep_args: SweepArguments,
    train_dataset: Dataset,
    eval_dataset: Dataset,
    processing_class: PreTrainedTokenizerBase,
    *,
    peft_config: Any = None,
    rouge_prompts: Sequence[Any] | None = None,
    rouge_references: Sequence[Any] | None = None,
    rouge_kwargs: dict[str, Any] | None = None,
    best_config: dict[str, Any] | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    callbacks: Sequence[TrainerCallback] = (),
) -> SweepResult:
    """Search (alpha, beta) and friends; write `trials.csv`, `heatmap.png`, `best.yaml`.

    Args:
        student: the student's name/path or a zero-argument factory (see `make_model_init`).
        teacher_model: the teacher (an instance or a name, loaded once); None uses
            `args.teacher_model_name_or_path`.
        args: the training arguments of every trial; the searched fields are overwritten per
            trial. `eval_strategy`/`eval_steps` set the intermediate evaluations the pruner
            sees; `args.output_dir` receives the outputs.
        sweep_args: the search (see
            [SweepArguments][abkd_trainer.tools.sweep.search_space.SweepArguments]).
        train_dataset: the training split, as for `ABKDTrainer`.
        eval_dataset: the evaluation split, as for `ABKDTrainer`.
        processing_class: the tokenizer, as for `ABKDTrainer`.
        peft_config: LoRA configuration of the student, re-applied per trial.
        rouge_prompts: test prompts; with `rouge_references`, every evaluation also scores
            `eval_rouge_l` (the default objective).
        rouge_references: the references of `rouge_prompts`.
        rouge_kwargs: keyword arguments of `RougeLCallback` (`seeds`, `max_new_tokens`,
            `batch_size`).
        best_config: the `abkd-train` settings the sweep ran with (flag -> value); `best.yaml`
            is this mapping with the best trial's parameters.
        sampler: an Optuna sampler replacing the one `sweep_args` describes.
        pruner: an Optuna pruner replacing the one `sweep_args` describes.
        callbacks: more `TrainerCallback`s for the trainer of every trial.

    Returns:
        The study, the objective and the files written.
    """
    from abkd_trainer.lm.evaluation import RougeLCallback
    from abkd_trainer.lm.trainer import ABKDTrainer

    import_optuna()
    check_single_process(args)
    metric, direction = choose_objective(sweep_args, has_rouge_prompts=bool(rouge_prompts))
    model_init = make_model_init(student, args, peft_config)
    trainer = ABKDTrainer(
        model=model_init(),
        teacher_model=teacher_model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
    )
    trainer.model_init = model_init  # read by Trainer.train(trial=...) to rebuild the student
    for callback in callbacks:
        trainer.add_callback(callback)

    if rouge_prompts:
        trainer.add_callback(
            RougeLCallback(trainer, rouge_prompts, rouge_references, **(rouge_kwargs or {}))
        )
    return run_trainer_sweep(
        trainer,
        sweep_args,
        metric=metric,
        direction=direction,
        best_config=best_config,
        sampler=sampler,
        pruner=pruner,
        metrics_callback=functools.partial(SweepMetricsCallback, trainer),
    )
