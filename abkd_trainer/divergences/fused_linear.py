"""Distillation losses against a live teacher, from both models' hidden states and LM heads.

[`fused_linear_divergence`][abkd_trainer.divergences.fused_linear.fused_linear_divergence] takes
the student's and the teacher's final hidden states and LM-head weights instead of their logits,
and never builds either `(N, V)` logits tensor: the tile engine
(`abkd_trainer.divergences.fused_tiles`) walks the counted tokens, and the teacher here only
projects its own logits for each projection tile (one GEMM into a preallocated fp32
`(chunk_size, V)` buffer, with its logit post-processing) and evaluates the divergence tiles
against them with
[`rowwise_loss_and_grad`][abkd_trainer.divergences.chunked.rowwise_loss_and_grad], the routine
the logits-based functions use. So every registry divergence works and the values are those of
[`ab_divergence`][abkd_trainer.divergences.functional.ab_divergence] and its siblings on
materialised logits.

The engine's tile sizes, output type and logit transform are re-exported here, where they were
first defined.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from abkd_trainer.divergences.chunked import rowwise_loss_and_grad
from abkd_trainer.divergences.fused_inputs import FusedLossOptions, count_rows
from abkd_trainer.divergences.fused_tiles import (
    CPU_POINTWISE_ELEMENTS_PER_THREAD,
    FusedLinearDistillationOutput,
    FusedTeacher,
    TeacherChunk,
    TileSettings,
    fused_tiles_loss,
)
from abkd_trainer.divergences.pointwise import ABDivergence, PointwiseDivergence
from abkd_trainer.divergences.projection import (
    ACCELERATOR_PROJECTION_ELEMENTS,
    CPU_PROJECTION_ELEMENTS,
    MIN_PROJECTION_ROWS,
    LogitTransform,
    default_fused_chunk_size,
    gemm_dtype,
    project_into,
    validate_head,
)
from abkd_trainer.divergences.registry import resolve_divergence
from abkd_trainer.divergences.statistics import TokenStatistics, row_statistics

__all__ = [
    "ACCELERATOR_PROJECTION_ELEMENTS",
    "CPU_POINTWISE_ELEMENTS_PER_THREAD",
    "CPU_PROJECTION_ELEMENTS",
    "MIN_PROJECTION_ROWS",
    "FusedLinearDistillationOutput",
    "LiveTeacher",
    "LogitTransform",
    "default_fused_chunk_size",
    "fused_linear_ab_divergence",
    "fused_linear_divergence",
]


class _LiveTeacherChunk(TeacherChunk):
    """The teacher's transformed logits `(rows, V)` of one projection tile."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def divergence_and_grad(
        self,
        student_logits: torch.Tensor,
        part: slice,
        divergence: PointwiseDivergence,
        temperature: float,
        compute_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return rowwise_loss_and_grad(
            student_logits, self.logits[part], divergence, temperature, compute_grad=compute_grad
        )

    def statistics(
        self,
        student_logits: torch.Tensor,
        part: slice,
        labels: torch.Tensor,
        student_entropy: torch.Tensor,
    ) -> TokenStatistics:
        return row_statistics(student_logits, self.logits[part], labels, student_entropy)


class LiveTeacher(FusedTeacher):
    """A teacher given by its final hidden states at the counted rows and its LM head.

    Args:
        hidden: `(n, H_t)` the teacher's hidden states at the counted rows (no gradient).
        weight: `(V_t, H_t)` its `lm_head.weight`, `V_t >= vocab_size`.
        bias: `(V_t,)` or None.
        transform: its logit post-processing.
        gemm_dtype: the dtype its projection runs in (the hidden states' or autocast's).
    """

    def __init__(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        transform: LogitTransform,
        gemm_dtype: torch.dtype,
    ) -> None:
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.transform, self.gemm_dtype = transform, gemm_dtype

    @property
    def dtype(self) -> torch.dtype:
        return self.gemm_dtype

    def chunk_reader(
        self, settings: TileSettings, num_rows: int
    ) -> Callable[[slice], TeacherChunk]:
        vocab = settings.vocab_size
        # A head in another dtype than its GEMM (autocast, fp32 master weights) is cast once here.
        head = self.weight[:vocab].to(self.gemm_dtype)
        head_bias = None if self.bias is None else self.bias[:vocab]
        buffer = torch.empty(
            (min(settings.chunk_size, num_rows), vocab),
            dtype=settings.work_dtype,
            device=self.hidden.device,
        )

        def read(rows: slice) -> TeacherChunk:
            logits = project_into(
                buffer[: rows.stop - rows.start],
                self.hidden[rows].to(self.gemm_dtype),
                head,
                head_bias,
            )
            return _LiveTeacherChunk(self.transform.apply_(logits))

        return read


def _resolve_vocab_size(
    student_weight: torch.Tensor, teacher_weight: torch.Tensor, vocab_size: int | None
) -> int:
    student_rows, teacher_rows = student_weight.shape[0], teacher_weight.shape[0]
    if vocab_size is None:
        if student_rows != teacher_rows:
            raise ValueError(
                f"The student head has {student_rows} rows and the teacher head {teacher_rows}. "
                "Pass `vocab_size=len(tokenizer)` so that the padded rows are ignored."
            )
        return student_rows
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"`vocab_size` must be a positive integer or None, got {vocab_size!r}.")
    if vocab_size > min(student_rows, teacher_rows):
        raise ValueError(
            f"`vocab_size={vocab_size}` exceeds a head's rows (student {student_rows}, teacher "
            f"{teacher_rows}); it must be the tokenizer's vocabulary, which both heads cover."
        )
    return vocab_size


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    divergence: str | PointwiseDivergence,
    *,
    divergence_params: Mapping[str, float] | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_logit_softcap: float | None = None,
    teacher_logit_softcap: float | None = None,
    vocab_size: int | None = None,
    labels: torch.Tensor | None = None,
    divergence_weight: float = 1.0,
    ce_weight: float = 0.0,
    chunk_size: int | None = None,
) -> torch.Tensor | FusedLinearDistillationOutput:
    """A registry divergence between teacher and student, from hidden states and LM heads.

    Computes the same values as the logits-based functions (e.g. `get_divergence(name)(logits_s,
    logits_t, ...)`) on `logits = transform(hidden @ weight.T + bias)[..., :vocab_size]`,
    without building either `(N, V)` logits tensor. Gradients reach the student's hidden states,
    head weight and bias; the teacher is a constant target.

    Scalar reductions build the gradients during the forward pass and keep them until backward
    (one fp32 copy of the student's head weight); `"none"` recomputes in backward instead, which
    then needs the head weights still materialised (under DeepSpeed ZeRO-3: gathered again).

    Args:
        student_hidden: `(..., H_s)` final hidden states of the student (after its last norm),
            e.g. `(batch, seq, H_s)`, any float dtype; receives the gradient.
        student_weight: `(V_s, H_s)` the student's `lm_head.weight`; receives the gradient.
        teacher_hidden: `(..., H_t)` the teacher's final hidden states at the same positions; `H_t`
            may differ from `H_s`. A constant target (detached).
        teacher_weight: `(V_t, H_t)` the teacher's `lm_head.weight` (detached).
        divergence: A name from
            [`DIVERGENCE_NAMES`][abkd_trainer.divergences.registry.DIVERGENCE_NAMES] (`"ab"`,
            `"fkl"`, `"jsd"`, ...) or a parametrised `PointwiseDivergence` object (e.g.
            `ABDivergence(0.2, 0.7)`).
        divergence_params: Parameters of a divergence given by name, e.g. `{"alpha": 0.2,
            "beta": 0.7}` for `"ab"`; not allowed with a divergence object.
        temperature: Divides both transformed logit sets before the softmax; the result is not
            multiplied by `T**2`. The cross-entropy always uses temperature 1.
        mask: `(...)` bool, True at the positions that count; only those rows are projected.
            Defaults to `labels != -100` when `labels` are given, else to every position.
        reduction: `"none"` (per position, shape `(...)`, 0 where not counted), `"sum"`, or
            `"mean"` over the counted positions (0.0 with a connected graph when there are none).
        student_bias: `(V_s,)` the student's head bias, if its head has one.
        teacher_bias: `(V_t,)` the teacher's head bias, if its head has one.
        student_logit_scale: Multiplies the student's raw logits (`config.logit_scale`).
        teacher_logit_scale: Multiplies the teacher's raw logits.
        student_logit_softcap: Soft cap `c`: the student's logits become `c * tanh(logits / c)`
            after the scale (`config.final_logit_softcapping`); None disables it.
        teacher_logit_softcap: The same for the teacher.
        vocab_size: The tokenizer's vocabulary size; head rows from it on (padding) are ignored.
            Required when the heads have different row counts.
        labels: `(...)` int64 next-token targets (-100 where unsupervised). When given, the
            function returns a `FusedLinearDistillationOutput` with the cross-entropy, top-1
            agreement, token accuracy and both entropies, computed in the same pass; counted
            positions must hold a target in `[0, vocab_size)`.
        divergence_weight: The output's `loss` is `divergence_weight * divergence + ce_weight *
            cross_entropy` (with `labels` only; e.g. `kd_ratio`).
        ce_weight: The weight of the cross-entropy in that loss (e.g. `1 - kd_ratio`).
        chunk_size: Tokens per projection tile (two fp32 `(chunk_size, V)` buffers); None picks
            one from the vocabulary size and the device.

    Returns:
        Without `labels`: the divergence in nats, fp32 (float64 for float64 inputs), shape `(...)`
        for `reduction="none"`, else a scalar. With `labels`: a `FusedLinearDistillationOutput`
        named tuple (`loss`, `divergence`, `cross_entropy`, `teacher_agreement`, `num_tokens`,
        `student_entropy`, `teacher_entropy`, `token_accuracy`), each reduced by `reduction`; only
        `loss` carries a gradient.

    Raises:
        TypeError: Hidden states or a head weight are not floating point, `labels` are not integer
            token ids, a logit scale is not a number, or `divergence` is neither a name nor a
            pointwise divergence.
        ValueError: A head does not fit its hidden states (width, 2-D weight, bias shape), the
            student's and the teacher's hidden states cover different positions, `mask` or
            `labels` do not have the positions' shape, a counted label is outside
            `[0, vocab_size)`, the heads' row counts differ without `vocab_size` (or it exceeds
            one), `divergence_weight` / `ce_weight` are set without `labels`, or an option is out
            of range (`temperature`, `reduction`, `chunk_size`, a logit scale or soft cap); or
            `divergence` is an unknown name, `divergence_params` do not fit it, or parameters
            come with a divergence object.
    """
    pointwise = resolve_divergence(divergence, divergence_params)
    validate_head("student", student_hidden, student_weight, student_bias)
    validate_head("teacher", teacher_hidden, teacher_weight, teacher_bias)
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(
            f"Student hidden states {tuple(student_hidden.shape)} and teacher hidden states "
            f"{tuple(teacher_hidden.shape)} must cover the same positions (all but the last dim)."
        )
    vocab = _resolve_vocab_size(student_weight, teacher_weight, vocab_size)
    options = FusedLossOptions(
        temperature=temperature,
        reduction=reduction,
        student_transform=LogitTransform(student_logit_scale, student_logit_softcap),
        chunk_size=chunk_size,
        divergence_weight=divergence_weight,
        ce_weight=ce_weight,
    )
    counted = count_rows(student_hidden, mask, labels, vocab, options)
    teacher = LiveTeacher(
        counted.select(teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])),
        teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        LogitTransform(teacher_logit_scale, teacher_logit_softcap),
        gemm_dtype(teacher_hidden),
    )
    return fused_tiles_loss(
        counted, student_weight, student_bias, teacher, pointwise, options, vocab
    )


def fused_linear_ab_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    alpha: float,
    beta: float,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_logit_softcap: float | None = None,
    teacher_logit_softcap: float | None = None,
    vocab_size: int | None = None,
    labels: torch.Tensor | None = None,
    divergence_weight: float = 1.0,
    ce_weight: float = 0.0,
    chunk_size: int | None = None,
) -> torch.Tensor | FusedLinearDistillationOutput:
    """Alpha-beta divergence D_AB^(alpha, beta)(p_teacher || q_student) from hidden states.

    The values of [`ab_divergence`][abkd_trainer.divergences.functional.ab_divergence] on the
    materialised logits, exact and continuous in `(alpha, beta)`; `(1, 0)` is forward KL,
    `(0, 1)` reverse KL. It is
    [`fused_linear_divergence`][abkd_trainer.divergences.fused_linear.fused_linear_divergence]
    with `divergence=ABDivergence(alpha, beta)`.

    Args:
        student_hidden: `(..., H_s)` final hidden states of the student (after its last norm),
            e.g. `(batch, seq, H_s)`, any float dtype; receives the gradient.
        student_weight: `(V_s, H_s)` the student's `lm_head.weight`; receives the gradient.
        teacher_hidden: `(..., H_t)` the teacher's final hidden states at the same positions; `H_t`
            may differ from `H_s`. A constant target (detached).
        teacher_weight: `(V_t, H_t)` the teacher's `lm_head.weight` (detached).
        alpha: Hardness-concentration parameter, any finite number.
        beta: Confidence-concentration parameter, any finite number.
        temperature: Divides both transformed logit sets before the softmax; the result is not
            multiplied by `T**2`. The cross-entropy always uses temperature 1.
        mask: `(...)` bool, True at the positions that count; only those rows are projected.
            Defaults to `labels != -100` when `labels` are given, else to every position.
        reduction: `"none"` (per position, shape `(...)`, 0 where not counted), `"sum"`, or
            `"mean"` over the counted positions (0.0 with a connected graph when there are none).
        student_bias: `(V_s,)` the student's head bias, if its head has one.
        teacher_bias: `(V_t,)` the teacher's head bias, if its head has one.
        student_logit_scale: Multiplies the student's raw logits (`config.logit_scale`).
        teacher_logit_scale: Multiplies the teacher's raw logits.
        student_logit_softcap: Soft cap `c`: the student's logits become `c * tanh(logits / c)`
            after the scale (`config.final_logit_softcapping`); None disables it.
        teacher_logit_softcap: The same for the teacher.
        vocab_size: The tokenizer's vocabulary size; head rows from it on (padding) are ignored.
            Required when the heads have different row counts.
        labels: `(...)` int64 next-token targets (-100 where unsupervised). When given, the
            function returns a `FusedLinearDistillationOutput` with the cross-entropy, top-1
            agreement, token accuracy and both entropies, computed in the same pass; counted
            positions must hold a target in `[0, vocab_size)`.
        divergence_weight: The output's `loss` is `divergence_weight * divergence + ce_weight *
            cross_entropy` (with `labels` only; e.g. `kd_ratio`).
        ce_weight: The weight of the cross-entropy in that loss (e.g. `1 - kd_ratio`).
        chunk_size: Tokens per projection tile (two fp32 `(chunk_size, V)` buffers); None picks
            one from the vocabulary size and the device.

    Returns:
        Without `labels`: the divergence in nats, fp32 (float64 for float64 inputs), shape `(...)`
        for `reduction="none"`, else a scalar. With `labels`: a `FusedLinearDistillationOutput`
        named tuple (`loss`, `divergence`, `cross_entropy`, `teacher_agreement`, `num_tokens`,
        `student_entropy`, `teacher_entropy`, `token_accuracy`), each reduced by `reduction`; only
        `loss` carries a gradient.

    Raises:
        TypeError: Hidden states or a head weight are not floating point, `labels` are not integer
            token ids, or a logit scale is not a number.
        ValueError: A head does not fit its hidden states (width, 2-D weight, bias shape), the
            student's and the teacher's hidden states cover different positions, `mask` or
            `labels` do not have the positions' shape, a counted label is outside
            `[0, vocab_size)`, the heads' row counts differ without `vocab_size` (or it exceeds
            one), `divergence_weight` / `ce_weight` are set without `labels`, or an option is out
            of range (`temperature`, `reduction`, `chunk_size`, a logit scale or soft cap); or
            `alpha` or `beta` is not finite.
    """
    return fused_linear_divergence(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        ABDivergence(alpha, beta),
        temperature=temperature,
        mask=mask,
        reduction=reduction,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        student_logit_scale=student_logit_scale,
        teacher_logit_scale=teacher_logit_scale,
        student_logit_softcap=student_logit_softcap,
        teacher_logit_softcap=teacher_logit_softcap,
        vocab_size=vocab_size,
        labels=labels,
        divergence_weight=divergence_weight,
        ce_weight=ce_weight,
        chunk_size=chunk_size,
    )
