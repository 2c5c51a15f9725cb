"""The objective of an `abkd-sweep` trial: which metric, which direction, and the reference KL.

By default the objective is `eval_rouge_l` (maximised), the ROUGE-L of sampled responses on the
test split, when the test split has prompts and references; otherwise `eval_reference_kl`
(minimised), the forward KL(teacher || student) on the evaluation split's supervised tokens. The
training loss `eval_kd_loss` is not comparable across trials (each trial measures its own
divergence), so a fixed reference divergence is used instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from abkd_trainer.tools.sweep.search_space import MAX_STEPS_ATTR, SweepArguments
from abkd_trainer.tools.sweep.trials import START_STEP_ATTR

if TYPE_CHECKING:
    from abkd_trainer.lm.trainer import ABKDTrainer

ROUGE_L_METRIC = "eval_rouge_l"
REFERENCE_KL_METRIC = "eval_reference_kl"
# Metrics that are better when larger; every other metric is minimised unless --direction says.
MAXIMISED_METRICS = ("rouge", "agreement", "accuracy", "bleu", "f1")


def infer_direction(metric: str) -> str:
    """`"maximize"` for ROUGE-like, agreement and accuracy metrics, `"minimize"` for losses.

    Args:
        metric: the metric's name, e.g. `eval_rouge_l`.
    """
    return "maximize" if any(key in metric for key in MAXIMISED_METRICS) else "minimize"


def choose_objective(sweep_args: SweepArguments, has_rouge_prompts: bool) -> tuple[str, str]:
    """The metric and direction of the sweep: `--objective_metric` or the default.

    Args:
        sweep_args: the search.
        has_rouge_prompts: whether the test split has prompts and references for ROUGE-L.

    Returns:
        `(metric, direction)`.

    Raises:
        ValueError: the objective is `eval_rouge_l` but there are no test prompts.
    """
    metric = sweep_args.objective_metric or (
        ROUGE_L_METRIC if has_rouge_prompts else REFERENCE_KL_METRIC
    )
    if metric == ROUGE_L_METRIC and not has_rouge_prompts:
        raise ValueError(
            "The objective eval_rouge_l needs test prompts and references (a test split with "
            "prompt/completion or messages columns); choose another --objective_metric."
        )
    return metric, sweep_args.direction or infer_direction(metric)


def objective_value(metric: str, metrics: dict[str, float]) -> float:
    """The objective's value among the metrics of an evaluation (Trainer's `compute_objective`).

    Args:
        metric: the objective's name.
        metrics: the evaluation's metrics.

    Raises:
        KeyError: the evaluation has no such metric; the message lists those it has.
    """
    if metric not in metrics:
        raise KeyError(
            f"The objective {metric!r} is not among the evaluation metrics {sorted(metrics)}; "
            "choose one of them with --objective_metric."
        )
    return metrics[metric]


def reference_kl(trainer: ABKDTrainer) -> float:
    """Forward KL(teacher || student) per supervised token of the evaluation split, in nats.

    The same divergence for every trial, whatever (alpha, beta) the trial trains with.

    Args:
        trainer: the sweep's trainer; its evaluation data loader, student, teacher and
            `vocab_size` are read.
    """
    import torch
    from accelerate.utils import send_to_device

    from abkd_trainer.divergences import forward_kl
    from abkd_trainer.lm.batches import IGNORE_INDEX, next_token_targets

    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    was_training = model.training
    model.eval()
    vocab_size = trainer.vocab_size
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            # What Trainer does to a batch before a forward (one process, no DeepSpeed here).
            batch = send_to_device(batch, trainer.args.device)
            mask = next_token_targets(batch).ne(IGNORE_INDEX)
            inputs = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels")}
            student_logits = model(**inputs, use_cache=False).logits[..., :vocab_size]
            teacher_logits = trainer.teacher_model(**inputs, use_cache=False).logits
            kl = forward_kl(student_logits, teacher_logits[..., :vocab_size], mask=mask)
            total += float(kl) * int(mask.sum())
            count += int(mask.sum())
    model.train(was_training)
    return total / max(count, 1)


class TrialMetricsCallback(TrainerCallback):
    """Records a trial's steps and every evaluation's metrics on the trial.

    The number of steps is the trial's user attribute `max_steps` (for
    `spare_final_evaluation`), the optimizer step its training starts at `start_step` (above 0
    for a re-run resumed from a checkpoint); every numeric metric of an evaluation is stored as a
    user attribute of that name, for `trials.csv`. Any Trainer's sweep uses it.

    Args:
        current_trial: returns the running Optuna trial (or None).
    """

    def __init__(self, current_trial: Callable[[], Any]) -> None:
        self.current_trial = current_trial

    def on_train_begin(self, args, state, control, **kwargs):
        """Record the trial's `max_steps` (the step of its final evaluation) and start step."""
        trial = self.current_trial()
        if trial is not None:  # for spare_final_evaluation
            trial.set_user_attr(MAX_STEPS_ATTR, state.max_steps)
            # Trainer has loaded a resumed checkpoint's state before on_train_begin.
            trial.set_user_attr(START_STEP_ATTR, state.global_step)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        """Store the evaluation's numeric metrics on the trial."""
        trial = self.current_trial()
        if trial is not None:
            for name, metric in (metrics or {}).items():
                if isinstance(metric, (int, float)):
                    trial.set_user_attr(name, float(metric))


class SweepMetricsCallback(TrialMetricsCallback):
    """Adds `eval_reference_kl` to every evaluation's metrics, then records them on the trial.

    `Trainer.evaluate` hands its metrics dict to `on_evaluate` and then reports that same dict to
    the hyperparameter search, so a value added here reaches the trial and its pruner
    (`RougeLCallback` adds `eval_rouge_l` the same way; add it first). The trial's number of steps
    and the metrics are recorded as by `TrialMetricsCallback`.

    Args:
        trainer: the sweep's `ABKDTrainer`.
        current_trial: returns the running Optuna trial (or None).
    """

    def __init__(self, trainer: ABKDTrainer, current_trial: Callable[[], Any]) -> None:
        super().__init__(current_trial)
        self.trainer = trainer

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        """Add `eval_reference_kl` to `metrics`, log it and store the metrics on the trial."""
        value = reference_kl(self.trainer)
        if metrics is not None:
            metrics[REFERENCE_KL_METRIC] = value
        self.trainer.log({REFERENCE_KL_METRIC: value})
        recorded = {**(metrics or {}), REFERENCE_KL_METRIC: value}
        super().on_evaluate(args, state, control, metrics=recorded, **kwargs)
