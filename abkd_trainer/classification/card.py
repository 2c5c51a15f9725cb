"""The model card of a distilled classifier: the teacher, the objective and the evaluation."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from abkd_trainer.core.model_card import add_distillation_section, add_model_index, hub_id

__all__ = ["add_classifier_card_sections", "accuracy_eval_result", "distillation_settings"]

# What transformers' card says of a student built from a config (no Hub id, no dataset name).
_EMPTY_BASE_MODEL = "This model is a fine-tuned version of [](https://huggingface.co/)"
_NO_DATASET = " on the None dataset."


def distillation_settings(
    args: Any, *, teacher: str, label_permutation: Sequence[int] | None
) -> dict[str, object]:
    """The rows of the card's distillation table: teacher, divergence, parameters, weights.

    Args:
        args: the run's `ABKDClassifierConfig`.
        teacher: the teacher's Hub id or folder name.
        label_permutation: the teacher's column of each student class when they were
            re-ordered (see `abkd_trainer.classification.labels`), else None.
    """
    from abkd_trainer.core.schedules import effective_warmup_ratio
    from abkd_trainer.divergences.registry import divergence_config_fields, divergence_spec

    settings: dict[str, object] = {"Teacher": teacher, "Divergence": args.divergence}
    for name in divergence_config_fields(args.divergence):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    if divergence_spec(args.divergence).scheduled:
        if args.ab_warmup_steps > 0:
            settings["ab_warmup_steps"] = args.ab_warmup_steps
        else:
            settings["ab_warmup_ratio"] = effective_warmup_ratio(args)
    settings.update(
        temperature=args.temperature,
        kd_weight=args.kd_weight,
        ce_weight=args.ce_weight,
        logit_standardization=args.logit_standardization,
    )
    if label_permutation is not None:
        settings["Teacher classes re-ordered"] = (
            f"teacher column of each class: {list(label_permutation)}"
        )
    return settings


def accuracy_eval_result(
    accuracy: float,
    *,
    task: str | None,
    dataset: str | None,
    teacher_accuracy: float | None = None,
) -> Any:
    """A `model-index` entry for the student's top-1 accuracy on the evaluation set.

    Args:
        accuracy: top-1 accuracy in [0, 1] (`eval_accuracy`).
        task: the Hub task (`"image-classification"`, ...); None gives `"classification"`.
        dataset: the evaluation data's Hub id or local name; None gives `"evaluation set"`.
        teacher_accuracy: the teacher's on the same examples, recorded in `metric_args`.
    """
    from huggingface_hub import EvalResult

    dataset_id = hub_id(dataset)
    return EvalResult(
        task_type=task or "classification",
        dataset_type=dataset_id or "local",
        dataset_name=dataset_id
        or (os.path.basename(str(dataset)) if dataset else "evaluation set"),
        metric_type="accuracy",
        metric_name="Top-1 accuracy",
        metric_value=round(float(accuracy), 4),
        metric_args=None
        if teacher_accuracy is None
        else {"teacher_accuracy": round(float(teacher_accuracy), 4)},
    )


def add_classifier_card_sections(
    card_text: str,
    settings: Mapping[str, object],
    *,
    model_name: str,
    model_location: str,
    last_evaluation: Mapping[str, float] | None,
    task: str | None,
    dataset: str | None,
) -> str:
    """`card_text` (transformers' card) with the distillation section and the evaluation.

    Args:
        card_text: the card Trainer wrote (`README.md`).
        settings: from `distillation_settings`.
        model_name: the saved student's name.
        model_location: the saved student's folder or Hub id.
        last_evaluation: the latest evaluation log (`eval_accuracy`, `eval_teacher_accuracy`,
            ...), or None when the student was never evaluated (no `model-index` then).
        task: as in `accuracy_eval_result`.
        dataset: as in `accuracy_eval_result`.
    """
    card_text = card_text.replace(_EMPTY_BASE_MODEL, "This model is a student distilled with ABKD")
    card_text = card_text.replace(_NO_DATASET, ".")
    card_text = add_distillation_section(card_text, settings, model_location=model_location)
    if not last_evaluation or "eval_accuracy" not in last_evaluation:
        return card_text
    entry = accuracy_eval_result(
        last_evaluation["eval_accuracy"],
        task=task,
        dataset=dataset,
        teacher_accuracy=last_evaluation.get("eval_teacher_accuracy"),
    )
    return add_model_index(card_text, model_name, [entry])
