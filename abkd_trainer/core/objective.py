"""The distillation objective: one object that turns teacher and student outputs into a loss.

`DistillationObjective` is built once from a configuration (any
[`DivergenceArguments`][abkd_trainer.core.divergence_arguments.DivergenceArguments]) and owns
everything the loss depends on: the registry divergence and its parameters (with the (alpha,
beta) warm-up and schedule), the temperature, the weights of the divergence and of the
cross-entropy, and the metric sums logged beside the loss. Both trainers call it:

- the causal-LM trainer on `(batch, seq, vocab)` logits with next-token targets (`-100` where not
  supervised), against teacher logits or a cached top-k teacher
  ([`loss_from_logits`][abkd_trainer.core.objective.DistillationObjective.loss_from_logits]), or
  from the student's final hidden states and LM head against the teacher's or the cache, without
  building either logits tensor (the fused routes,
  [`loss_from_hidden_states`][abkd_trainer.core.objective.DistillationObjective.loss_from_hidden_states]);
- the classifier trainer on `(batch, num_labels)` logits with `(batch,)` labels.

The objective returns *sums* over the counted rows (tokens, or examples). Dividing by the count of
the whole accumulated, all-process batch is the trainer's job, because only the trainer knows
that count.

    loss_sum = divergence_weight * sum_rows D(p_T || q_S) + ce_weight * sum_rows CE(q_S, target)

where `p_T`, `q_S` are the softmaxes of the teacher's and the student's logits divided by
`temperature` (after a per-row z-score with `logit_standardization`), and the cross-entropy is
that of the student's raw logits (temperature 1). There is no `temperature**2` factor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from abkd_trainer.core.schedules import scheduled_alpha_beta
from abkd_trainer.divergences.coarsened import (
    CachedTeacher,
    coarsened_divergence,
    coarsened_token_statistics,
    fused_linear_coarsened_divergence,
)
from abkd_trainer.divergences.fused_linear import fused_linear_divergence
from abkd_trainer.divergences.fused_tiles import FusedLinearDistillationOutput
from abkd_trainer.divergences.projection import LogitTransform
from abkd_trainer.divergences.registry import DivergenceSpec, divergence_spec
from abkd_trainer.divergences.statistics import token_statistics

__all__ = [
    "IGNORE_INDEX",
    "METRIC_SUMS",
    "DistillationObjective",
    "HiddenStates",
    "LinearHead",
    "ObjectiveOutput",
    "gradient_averaging_size",
    "normalise_summed_loss",
    "standardize_logits",
]

# Targets with this value are not counted (the `labels` convention of transformers).
IGNORE_INDEX = -100

# The sums an objective returns, in this order: per-row sums (their mean over the counted rows is
# what gets logged), then the row count.
METRIC_SUMS = (
    "kd_loss",
    "ce_loss",
    "teacher_agreement",
    "student_entropy",
    "teacher_entropy",
    "mean_token_accuracy",
    "num_supervised",
)

# Added to the row's standard deviation so that a constant logit row standardises to zeros.
STANDARDIZATION_EPS = 1e-7


@dataclass
class ObjectiveOutput:
    """What the objective returns for one micro-batch.

    Attributes:
        loss_sum: scalar, the weighted objective summed over the counted rows; differentiable
            with respect to the student. Divide by the rows of the accumulated batch.
        sums: detached scalar sums keyed by `METRIC_SUMS` names (`kd_loss`, `ce_loss`,
            `teacher_agreement`, `student_entropy`, `teacher_entropy` in nats,
            `mean_token_accuracy`, and `num_supervised`, the number of counted rows).
    """

    loss_sum: torch.Tensor
    sums: dict[str, torch.Tensor]


@dataclass(frozen=True)
class LinearHead:
    """A model's output head: its logits are `transform(hidden @ weight.T + bias)`.

    Attributes:
        weight: `(V_head, H)` the head's weight (`lm_head.weight`); rows from the objective's
            `vocab_size` on (padding) are ignored.
        bias: `(V_head,)` or None.
        transform: what the model does to the projection before its softmax (logit scale,
            soft-capping), e.g. `LogitTransform.from_config(model.config)`.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    transform: LogitTransform = LogitTransform()


@dataclass(frozen=True)
class HiddenStates:
    """A model's final hidden states (after the last norm) and the head that reads them.

    Attributes:
        hidden: `(..., H)` hidden states at the positions of the targets.
        head: the model's output head.
    """

    hidden: torch.Tensor
    head: LinearHead


def standardize_logits(logits: torch.Tensor, eps: float = STANDARDIZATION_EPS) -> torch.Tensor:
    """Z-score each logit row (the logit standardisation of Sun et al., CVPR 2024; ABLSD).

    Args:
        logits: `(..., V)` logits, any float dtype.
        eps: added to the standard deviation, so that constant rows give zeros, not NaN.

    Returns:
        `(..., V)` `(logits - mean) / (std + eps)` over the last dimension, with the unbiased
        standard deviation as in the authors' code, in the logits' dtype.
    """
    mean = logits.mean(dim=-1, keepdim=True)
    std = logits.std(dim=-1, keepdim=True)
    return (logits - mean) / (std + eps)


def normalise_summed_loss(
    loss_sum: torch.Tensor,
    num_local: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None,
    data_parallel_size: int = 1,
) -> torch.Tensor:
    """Divide a summed objective by the rows it is averaged over.

    Args:
        loss_sum: scalar, `ObjectiveOutput.loss_sum` of one micro-batch.
        num_local: this micro-batch's counted rows (evaluation normalises by them).
        num_items_in_batch: the counted rows of the whole accumulated (and, when averaged across
            devices, all-process) batch; None normalises by `num_local`.
        data_parallel_size: processes whose gradients DDP averages while `num_items_in_batch`
            already counts all of their rows, so the loss is scaled back up by it (as Trainer
            does); 1 when the count is per process.

    Returns:
        The scalar loss; a batch without a counted row gives 0 / 1 = 0 with the graph intact.
    """
    normaliser = num_local if num_items_in_batch is None else num_items_in_batch
    normaliser = torch.as_tensor(normaliser, device=loss_sum.device, dtype=loss_sum.dtype).clamp(
        min=1
    )
    loss = loss_sum / normaliser
    if num_items_in_batch is not None and data_parallel_size != 1:
        loss = loss * data_parallel_size
    return loss


def gradient_averaging_size(
    average_tokens_across_devices: bool, num_processes: int, tp_size: int = 1
) -> int:
    """The `data_parallel_size` of `normalise_summed_loss` for a Trainer's arguments.

    Args:
        average_tokens_across_devices: the `TrainingArguments` field: whether
            `num_items_in_batch` counts the rows of every process.
        num_processes: the accelerator's process count.
        tp_size: the Trainer's tensor-parallel size (`Trainer.get_tp_size()`); tensor-parallel
            ranks share a batch, so they are not data-parallel.

    Returns:
        The data-parallel processes whose averaged gradients the loss is scaled back up by, or 1
        when the count is per process.
    """
    if not average_tokens_across_devices:
        return 1
    return num_processes // tp_size


class DistillationObjective:
    """A registry divergence to the teacher, mixed with cross-entropy, with its logged sums.

    Args:
        divergence: a registry name (`"ab"`, `"fkl"`, `"rkl"`, `"jsd"`, `"sfkl"`, `"srkl"`,
            `"tvd"`).
        parameters: the divergence's fixed keyword parameters (e.g. `{"beta": 0.5}` for `jsd`).
        temperature: divides both logit sets inside the divergence (not the cross-entropy).
        divergence_weight: weight of the divergence sum.
        ce_weight: weight of the cross-entropy sum; 0 leaves the cross-entropy out of the graph
            (it is still logged).
        alpha_beta_schedule: for `divergence="ab"`, `(step, total_steps) -> (alpha, beta)`;
            None keeps `parameters` fixed.
        vocab_size: the number of real classes (the tokenizer's length); wider logits (padded LM
            heads) are cut to it. None uses every column.
        chunk_size: rows per chunk of the memory-efficient kernels (per projection tile on the
            fused routes); None picks one from the width.
        logit_standardization: z-score each teacher and student logit row before the
            temperature (LSD / ABLSD). Only the logits routes support it.
    """

    def __init__(
        self,
        divergence: str,
        *,
        parameters: Mapping[str, float] | None = None,
        temperature: float = 1.0,
        divergence_weight: float = 1.0,
        ce_weight: float = 0.0,
        alpha_beta_schedule: Callable[[int, int], tuple[float, float]] | None = None,
        vocab_size: int | None = None,
        chunk_size: int | None = None,
        logit_standardization: bool = False,
    ) -> None:
        self.spec: DivergenceSpec = divergence_spec(divergence)
        if alpha_beta_schedule is not None and not self.spec.scheduled:
            raise ValueError(
                f"An (alpha, beta) schedule needs divergence='ab', got {divergence!r}."
            )
        self.parameters = dict(parameters or {})
        self.temperature = temperature
        self.divergence_weight = divergence_weight
        self.ce_weight = ce_weight
        self.alpha_beta_schedule = alpha_beta_schedule
        self.vocab_size = vocab_size
        self.chunk_size = chunk_size
        self.logit_standardization = logit_standardization

    @property
    def divergence(self) -> str:
        """The registry name of the divergence."""
        return self.spec.name

    @classmethod
    def from_config(
        cls,
        args: Any,
        *,
        divergence_weight: float,
        ce_weight: float,
        vocab_size: int | None = None,
        chunk_size: int | None = None,
        logit_standardization: bool = False,
    ) -> DistillationObjective:
        """The objective a configuration describes.

        Args:
            args: a configuration with the fields of `DivergenceArguments` (`divergence`, its
                parameters, `temperature`, the (alpha, beta) warm-up and schedule fields).
            divergence_weight: the weight of the divergence (the LM trainer passes `kd_ratio`,
                the classifier trainer `kd_weight`).
            ce_weight: the weight of the cross-entropy (`1 - kd_ratio`, or `ce_weight`).
            vocab_size: as in the constructor.
            chunk_size: as in the constructor.
            logit_standardization: as in the constructor.
        """
        schedule = None
        if divergence_spec(args.divergence).scheduled:

            def schedule(step: int, total_steps: int) -> tuple[float, float]:
                return scheduled_alpha_beta(args, step, total_steps)

        return cls(
            args.divergence,
            parameters=divergence_spec(args.divergence).parameters_from(args),
            temperature=args.temperature,
            divergence_weight=divergence_weight,
            ce_weight=ce_weight,
            alpha_beta_schedule=schedule,
            vocab_size=vocab_size,
            chunk_size=chunk_size,
            logit_standardization=logit_standardization,
        )

    def divergence_params(self, step: int, total_steps: int) -> dict[str, float]:
        """The divergence's keyword parameters at optimizer step `step` of `total_steps`.

        For the alpha-beta divergence these are the scheduled `alpha` and `beta`; for the other
        divergences the fixed parameters.
        """
        if self.alpha_beta_schedule is None:
            return dict(self.parameters)
        alpha, beta = self.alpha_beta_schedule(step, total_steps)
        return {"alpha": alpha, "beta": beta}

    @property
    def trains_cross_entropy(self) -> bool:
        """Whether the cross-entropy is part of the differentiated objective."""
        return self.ce_weight != 0.0

    def weighted_sum(self, kd_sum: torch.Tensor, ce_sum: torch.Tensor) -> torch.Tensor:
        """`divergence_weight * kd_sum + ce_weight * ce_sum` (the CE term only when weighted)."""
        objective = self.divergence_weight * kd_sum
        if self.trains_cross_entropy:
            objective = objective + self.ce_weight * ce_sum
        return objective

    def loss_from_logits(
        self,
        student_logits: torch.Tensor,
        teacher: torch.Tensor | CachedTeacher,
        targets: torch.Tensor,
        divergence_params: Mapping[str, float],
    ) -> ObjectiveOutput:
        """The objective from full logits.

        Args:
            student_logits: `(..., V_student)` logits, any float dtype; receives the gradient.
                `V_student` may exceed `vocab_size` (padded heads): extra columns are cut.
            teacher: `(..., V_teacher)` teacher logits of the same leading shape, or the cached
                teacher of the counted rows (the divergence is then that of the coarsened
                distributions, see `abkd_trainer.divergences.coarsened`).
            targets: `(...)` integer class ids (the next token, or the label), `IGNORE_INDEX`
                where a row is not counted.
            divergence_params: from `divergence_params(step, total_steps)`.

        Returns:
            The summed objective and the metric sums over the counted rows.
        """
        student_logits = self._real_columns(student_logits)
        counted = targets != IGNORE_INDEX
        divergence_student = self._standardized(student_logits)
        if isinstance(teacher, CachedTeacher):
            if self.logit_standardization:
                raise ValueError(
                    "logit_standardization needs the teacher's logits; a cached teacher holds "
                    "only its top-k log-probabilities."
                )
            kd_sum = coarsened_divergence(
                divergence_student,
                teacher,
                self.divergence,
                divergence_params=divergence_params,
                temperature=self.temperature,
                mask=counted,
                reduction="sum",
                chunk_size=self.chunk_size,
            )
        else:
            teacher = self._real_columns(teacher)
            kd_sum = self.spec.function(
                divergence_student,
                self._standardized(teacher),
                **divergence_params,
                temperature=self.temperature,
                mask=counted,
                reduction="sum",
                chunk_size=self.chunk_size,
            )
        ce_sum = self._cross_entropy_sum(student_logits, targets, counted)
        statistics = (
            coarsened_token_statistics(student_logits, teacher, targets, counted, self.chunk_size)
            if isinstance(teacher, CachedTeacher)
            else token_statistics(student_logits, teacher, targets, counted, self.chunk_size)
        )
        sums = {
            "kd_loss": kd_sum,
            "ce_loss": ce_sum,
            "teacher_agreement": statistics.teacher_agreement,
            "student_entropy": statistics.student_entropy,
            "teacher_entropy": statistics.teacher_entropy,
            "mean_token_accuracy": statistics.token_accuracy,
            "num_supervised": counted.sum(),
        }
        return ObjectiveOutput(self.weighted_sum(kd_sum, ce_sum), sums)

    def loss_from_hidden_states(
        self,
        student: HiddenStates,
        teacher: HiddenStates | CachedTeacher,
        targets: torch.Tensor,
        divergence_params: Mapping[str, float],
    ) -> ObjectiveOutput:
        """The objective from final hidden states and heads, never building the logits.

        The values of `loss_from_logits` on the logits the heads would produce, computed a tile
        of rows at a time by the fused kernels
        ([`fused_linear_divergence`][abkd_trainer.divergences.fused_linear.fused_linear_divergence],
        [`fused_linear_coarsened_divergence`][abkd_trainer.divergences.coarsened.fused_linear_coarsened_divergence]),
        which also build the student's gradients during this call. Under DeepSpeed ZeRO-3, call
        it with the heads gathered and inside the student's forward.

        Args:
            student: the student's `(..., H_s)` hidden states and head; receives the gradient.
            teacher: the teacher's `(..., H_t)` hidden states and head at the same positions (a
                constant target), or the cached teacher of the counted rows.
            targets: `(...)` integer class ids, `IGNORE_INDEX` where a row is not counted.
            divergence_params: from `divergence_params(step, total_steps)`.

        Returns:
            The summed objective and the metric sums over the counted rows.

        Raises:
            ValueError: with `logit_standardization`, which needs whole logit rows.
        """
        if self.logit_standardization:
            raise ValueError(
                "logit_standardization z-scores whole logit rows, which the fused routes never "
                "build; compute the objective from logits (`loss_from_logits`) instead."
            )
        arguments = self._fused_kernel_arguments(student, targets, divergence_params)
        if isinstance(teacher, CachedTeacher):
            output = fused_linear_coarsened_divergence(
                student.hidden, student.head.weight, teacher, **arguments
            )
        else:
            output = fused_linear_divergence(
                student.hidden,
                student.head.weight,
                teacher.hidden.to(student.hidden.device),
                teacher.head.weight,
                teacher_bias=teacher.head.bias,
                teacher_logit_scale=teacher.head.transform.scale,
                teacher_logit_softcap=teacher.head.transform.softcap,
                **arguments,
            )
        return ObjectiveOutput(output.loss, _fused_output_sums(output))

    def _fused_kernel_arguments(
        self,
        student: HiddenStates,
        targets: torch.Tensor,
        divergence_params: Mapping[str, float],
    ) -> dict[str, Any]:
        # What both fused kernels (live and cached teacher) take from the objective and the
        # student: the summed, weighted objective with the cross-entropy on the targets.
        return {
            "divergence": self.divergence,
            "divergence_params": divergence_params,
            "temperature": self.temperature,
            "labels": targets.to(student.hidden.device),
            "reduction": "sum",
            "student_bias": student.head.bias,
            "student_logit_scale": student.head.transform.scale,
            "student_logit_softcap": student.head.transform.softcap,
            "vocab_size": self.vocab_size,
            "divergence_weight": self.divergence_weight,
            "ce_weight": self.ce_weight,
            "chunk_size": self.chunk_size,
        }

    def _real_columns(self, logits: torch.Tensor) -> torch.Tensor:
        # A no-op view when the widths already match, so the logits stay contiguous and the
        # divergence kernel reads them without a copy.
        return logits if self.vocab_size is None else logits[..., : self.vocab_size]

    def _standardized(self, logits: torch.Tensor) -> torch.Tensor:
        return standardize_logits(logits) if self.logit_standardization else logits

    def _cross_entropy_sum(
        self, student_logits: torch.Tensor, targets: torch.Tensor, counted: torch.Tensor
    ) -> torch.Tensor:
        # Logged even when it is not trained on; only part of the graph when it is.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trains_cross_entropy):
            # Counted rows only, upcast like transformers' losses: a half-precision log-softmax
            # loses digits.
            rows = counted.nonzero(as_tuple=True)
            dtype = torch.promote_types(student_logits.dtype, torch.float32)
            return F.cross_entropy(student_logits[rows].to(dtype), targets[rows], reduction="sum")


def _fused_output_sums(output: FusedLinearDistillationOutput) -> dict[str, torch.Tensor]:
    """The `METRIC_SUMS` of a fused kernel's summed output (live or cached teacher alike)."""
    return {
        "kd_loss": output.divergence,
        "ce_loss": output.cross_entropy,
        "teacher_agreement": output.teacher_agreement,
        "student_entropy": output.student_entropy,
        "teacher_entropy": output.teacher_entropy,
        "mean_token_accuracy": output.token_accuracy,
        "num_supervised": output.num_tokens,
    }
