"""Training arguments of `ABKDClassifierTrainer` (`abkd_trainer.classification.trainer`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from abkd_trainer.core.divergence_arguments import DivergenceArguments
from abkd_trainer.core.validation import require_finite

__all__ = ["ABKDClassifierConfig"]


@dataclass
class ABKDClassifierConfig(DivergenceArguments, TrainingArguments):
    r"""Configuration of `ABKDClassifierTrainer`: `TrainingArguments` plus the distillation loss.

    For a batch of `N` counted examples (`labels != -100`; over the whole accumulated batch of
    every process, so that gradient accumulation and data parallelism give the update of one
    large batch) the loss is

        loss = (1 / N) * sum_i [ ce_weight * CE(z_S_i, y_i) + kd_weight * D(p_T_i || q_S_i) ]

    with `z_S`, `z_T` the student's and the teacher's `(batch, num_labels)` logits,
    `p_T = softmax(z_T / temperature)`, `q_S = softmax(z_S / temperature)` (each logit row first
    z-scored with `logit_standardization`), `D` the divergence named by `divergence` (the
    alpha-beta divergence of ABKD by default) and `CE` the cross-entropy of the raw student
    logits (temperature 1). There is **no `temperature**2` factor**.

    **Hinton's KD** (`(1 - lambda) * CE + lambda * T^2 * KL(p_T || q_S)`) is
    `divergence="fkl"`, `kd_weight = lambda * T**2`, `ce_weight = 1 - lambda`; the transformers
    guide's `ImageDistilTrainer` (`lambda = 0.5`, `T = 5`) is `kd_weight=12.5, ce_weight=0.5,
    temperature=5`. The ABKD authors' CIFAR-100 recipe (`gamma * CE + b * ABKL` at
    temperature 4) is `ce_weight=gamma, kd_weight=b, temperature=4`; their ABLSD adds
    `logit_standardization=True`.

    Parameters:
        kd_weight (`float`, defaults to `1.0`): weight of the divergence term, >= 0.
        ce_weight (`float`, defaults to `1.0`): weight of the cross-entropy with the labels, >= 0
            (0 leaves it out of the gradient; it is still logged). Not both 0.
        temperature (`float`, defaults to `4.0`): divides both logit rows inside `D`.
        alpha (`float`, defaults to `0.8`): alpha of the alpha-beta divergence (the authors'
            image-classification setting with beta 0.3; `(1, 0)` is forward KL, `(0, 1)` reverse
            KL).
        beta (`float`, defaults to `0.3`): beta of the alpha-beta divergence.
        ab_warmup_ratio (`float`, defaults to `0.0`): fraction of the training steps over which
            `(alpha, beta)` moves from `(ab_warmup_start_alpha, ab_warmup_start_beta)` (forward
            KL) to `(alpha, beta)`; 0 (default) starts at `(alpha, beta)`, as the authors'
            classification runs do. The other divergence fields (`divergence`, `alpha_end`,
            `beta_end`, `ab_warmup_steps`, `ab_warmup_shape`, `jsd_beta`, `skew_lambda`) are
            those of `ABKDConfig`.
        logit_standardization (`bool`, defaults to `False`): z-score every teacher and student
            logit row (unbiased standard deviation) before the temperature, as in logit
            standardisation (Sun et al., CVPR 2024) and the authors' ABLSD. The cross-entropy
            keeps the raw logits.
        teacher_model_name_or_path (`str`, *optional*): the teacher to load when the trainer is
            given none.
        teacher_model_init_kwargs (`dict`, *optional*): keyword arguments of `from_pretrained`
            for a teacher given by name (e.g. `{"dtype": "bfloat16"}`).
        model_init_kwargs (`dict`, *optional*): the same for a student given by name (e.g.
            `{"num_labels": 10, "ignore_mismatched_sizes": True}` to put a new head on a
            pretrained backbone).
        disable_dropout (`bool`, defaults to `False`): disable dropout in the student. The
            teacher always runs in eval mode.
        overwrite_output_dir (`bool`, defaults to `False`): start afresh in an `output_dir` that
            holds checkpoints or a saved model of an earlier run (its `checkpoint-*` folders are
            deleted when training starts without `resume_from_checkpoint`). Without it,
            `abkd-train-classifier` refuses such a folder and `ABKDClassifierTrainer.train()`
            warns.

    `label_names` defaults to `["labels"]`, the key the collators write the labels under, so
    that evaluation gathers them for every student (PEFT models included).
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + [
        "teacher_model_init_kwargs",
        "model_init_kwargs",
    ]

    # Redeclared: the classification defaults differ from the causal-LM ones.
    alpha: float = field(
        default=0.8,
        metadata={
            "help": "Alpha of the alpha-beta divergence (hardness-concentration). (alpha, beta) = "
            "(1, 0) is forward KL, (0, 1) reverse KL."
        },
    )
    beta: float = field(
        default=0.3,
        metadata={"help": "Beta of the alpha-beta divergence (confidence-concentration)."},
    )
    ab_warmup_ratio: float | None = field(
        default=0.0,
        metadata={
            "help": "Fraction of the training steps over which (alpha, beta) moves from "
            "(`ab_warmup_start_alpha`, `ab_warmup_start_beta`), forward KL by default, to "
            "(`alpha`, `beta`). 0 (default) disables the warm-up; None means the whole run "
            "(or 0 when `alpha_end` / `beta_end` are set)."
        },
    )
    temperature: float = field(
        default=4.0,
        metadata={
            "help": "Softmax temperature of both logit rows inside the divergence (not the "
            "cross-entropy). The loss is not multiplied by temperature**2."
        },
    )
    kd_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the divergence term. Hinton's KD with weight lambda at temperature "
            "T is kd_weight = lambda * T**2 (and ce_weight = 1 - lambda)."
        },
    )
    ce_weight: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the student's cross-entropy with the labels (temperature 1); 0 "
            "distils from the teacher alone."
        },
    )
    logit_standardization: bool = field(
        default=False,
        metadata={
            "help": "Z-score each teacher and student logit row before the temperature (logit "
            "standardisation, the authors' ABLSD). The cross-entropy keeps the raw logits."
        },
    )
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Name or path of the teacher, used when the trainer is given none."},
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments of `from_pretrained` for a teacher given by name, e.g. "
            '\'{"dtype": "bfloat16"}\'.'
        },
    )
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments of `from_pretrained` for a student given by name, e.g. "
            '\'{"num_labels": 10, "ignore_mismatched_sizes": true}\'.'
        },
    )
    disable_dropout: bool = field(
        default=False,
        metadata={"help": "Disable dropout in the student. The teacher always runs in eval mode."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start afresh in an output_dir that holds checkpoints or a saved model of an "
            "earlier run: its checkpoint-* folders are deleted when training starts without "
            "`resume_from_checkpoint`. Without it, abkd-train-classifier refuses such a folder "
            "and `ABKDClassifierTrainer.train()` warns."
        },
    )

    def __post_init__(self) -> None:
        # The distillation fields first: they are cheap to check and fail before the slower
        # TrainingArguments set-up.
        self.validate_divergence_arguments()
        self._validate_loss_weights()
        if self.label_names is None:
            self.label_names = ["labels"]
        super().__post_init__()
        for name in ("teacher_model_init_kwargs", "model_init_kwargs"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise ValueError(
                    f"`{name}` must be a dict or a JSON object string, got "
                    f"{type(value).__name__}: {value!r}."
                )

    def _validate_loss_weights(self) -> None:
        for name in ("kd_weight", "ce_weight"):
            if require_finite(name, getattr(self, name)) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if self.kd_weight == 0 and self.ce_weight == 0:
            raise ValueError(
                "`kd_weight` and `ce_weight` are both 0, so the loss is 0 and nothing trains. Set "
                "kd_weight > 0 to distil (and ce_weight > 0 to also fit the labels)."
            )
