"""Divergences against a cached teacher: its top-k tokens plus one bucket for the rest.

An offline teacher cache (:mod:`abkd_trainer.lm.teacher_cache`) keeps, for every supervised
position,
the teacher's ``k`` most likely token ids, their log-probabilities and the log of the remaining
mass. Those ``k + 1`` numbers describe the teacher's distribution *coarsened* onto ``k + 1``
outcomes: the ``k`` tokens and one tail bucket holding everything else. The student's distribution
is coarsened the same way, onto the same ``k`` ids of that position plus the sum of its other
probabilities, and any registry divergence is then evaluated between the two ``(k + 1)``-outcome
distributions (every divergence here is separable, so a bucket is just a small vocabulary):

    D_k(p || q) = D(coarsen_ids(p) || coarsen_ids(q)).

This is the divergence of the coarsened distributions, not the full one. It equals the full
divergence when ``k`` covers the vocabulary (the tail buckets are then empty on both sides); for
``k < V`` it is a lower bound of it for every f-divergence (data processing: forward and reverse
KL, JSD, TVD, the skew KLs), and it ignores how either model spreads its mass inside the tail.

``temperature`` divides the bucket log-probabilities of both sides (``softmax(log c / T)`` over
the ``k + 1`` buckets, the tail treated as one outcome). The cache stores raw ``log_softmax``
values so the temperature can be chosen at training time; for ``k < V`` and ``T != 1`` this is the
tempered coarsened distribution, not the coarsened tempered one (which would need the teacher's
whole tail).

Two drivers, mirroring the live-teacher ones: :func:`coarsened_divergence` on the student's
logits, :func:`fused_linear_coarsened_divergence` on its final hidden states and LM head (the
student's full normaliser, a log-sum-exp over the vocabulary, is taken tile by tile; the logits
never exist as one tensor). Both compute the gradient during the forward pass, in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from abkd_trainer.divergences.chunked import (
    _compute_dtype,
    backward_keeps_graph,
    default_chunk_size,
    rowwise_loss_and_grad,
)
from abkd_trainer.divergences.fused_linear import (
    _PER_ROW_FIELDS,
    IGNORE_INDEX,
    FusedLinearDistillationOutput,
    LogitTransform,
    TileEvaluator,
    _cross_entropy_and_grad,
    _gemm_dtype,
    _pointwise_rows,
    _resolve_divergence,
    _validate_head,
    default_fused_chunk_size,
    walk_student_tiles,
)
from abkd_trainer.divergences.pointwise import PointwiseDivergence
from abkd_trainer.divergences.statistics import (
    TokenStatistics,
    log_probs_and_entropy,
    statistics_against_teacher,
)

__all__ = [
    "CachedTeacher",
    "cached_row_statistics",
    "coarsened_divergence",
    "coarsened_token_statistics",
    "coarsened_rowwise_loss_and_grad",
    "fused_linear_coarsened_divergence",
]

_REDUCTIONS = ("none", "sum", "mean")
# The statistics among the fused kernel's per-row fields, in their order there.
_STATISTICS = ("teacher_agreement", "student_entropy", "teacher_entropy", "token_accuracy")


@dataclass(frozen=True)
class CachedTeacher:
    """The cached teacher at ``n`` positions (one row per counted position, in order).

    Attributes:
        topk_ids: ``(n, k)`` integer token ids, most likely first, all below the vocabulary size.
        topk_log_probs: ``(n, k)`` the teacher's ``log_softmax`` at those ids (temperature 1).
        tail_log_prob: ``(n,)`` log of the teacher's remaining mass ``1 - sum(exp(topk_log_probs))``
            (``-inf`` when ``k`` covers the vocabulary).
    """

    topk_ids: torch.Tensor
    topk_log_probs: torch.Tensor
    tail_log_prob: torch.Tensor

    @property
    def num_rows(self) -> int:
        return self.topk_ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.topk_ids.shape[1]

    def validate(self, vocab_size: int) -> None:
        """Raise ``ValueError`` unless the shapes agree and every id lies in ``[0, vocab_size)``."""
        n, k = tuple(self.topk_ids.shape) if self.topk_ids.dim() == 2 else (-1, -1)
        if (
            n < 0
            or tuple(self.topk_log_probs.shape) != (n, k)
            or tuple(self.tail_log_prob.shape) != (n,)
        ):
            raise ValueError(
                "A cached teacher needs topk_ids and topk_log_probs of shape (n, k) and "
                f"tail_log_prob of shape (n,); got {tuple(self.topk_ids.shape)}, "
                f"{tuple(self.topk_log_probs.shape)} and {tuple(self.tail_log_prob.shape)}."
            )
        if self.topk_ids.is_floating_point() or self.topk_ids.is_complex():
            raise TypeError(f"`topk_ids` must hold integer token ids, got {self.topk_ids.dtype}.")
        if not 1 <= k <= vocab_size:
            raise ValueError(f"The cache's k = {k} must lie in [1, vocab size {vocab_size}].")
        if n and bool(((self.topk_ids < 0) | (self.topk_ids >= vocab_size)).any()):
            raise ValueError(
                f"Cached token ids must lie in [0, {vocab_size}) (the tokenizer's vocabulary); "
                "the cache was written for another vocabulary."
            )

    @classmethod
    def from_logits(cls, teacher_logits: torch.Tensor, top_k: int) -> CachedTeacher:
        """The cache rows of raw teacher logits ``(n, V)`` (temperature 1), in fp32 or wider.

        ``tail_log_prob`` is the log-sum-exp of the other ``V - k`` log-probabilities, not
        ``log(1 - sum(top-k probabilities))``, which cancels when the top ``k`` hold nearly all
        the mass.
        """
        log_probs = torch.log_softmax(teacher_logits.to(_compute_dtype(teacher_logits.dtype)), -1)
        topk_log_probs, topk_ids = log_probs.topk(top_k, dim=-1)
        tail = torch.logsumexp(log_probs.scatter_(-1, topk_ids, -math.inf), dim=-1)
        return cls(topk_ids, topk_log_probs, tail)

    def bucket_log_probs(self, dtype: torch.dtype) -> torch.Tensor:
        """``(n, k + 1)``: the teacher's coarsened log-probabilities, the tail last."""
        return torch.cat(
            [self.topk_log_probs.to(dtype), self.tail_log_prob.to(dtype).unsqueeze(-1)], dim=-1
        )

    def to(self, device: torch.device) -> CachedTeacher:
        return CachedTeacher(
            self.topk_ids.to(device), self.topk_log_probs.to(device), self.tail_log_prob.to(device)
        )

    def select(self, index: torch.Tensor | slice) -> CachedTeacher:
        return CachedTeacher(
            self.topk_ids[index], self.topk_log_probs[index], self.tail_log_prob[index]
        )


def coarsened_rowwise_loss_and_grad(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    teacher_bucket_log_probs: torch.Tensor,
    divergence: PointwiseDivergence,
    temperature: float = 1.0,
    compute_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row coarsened divergence and its gradient w.r.t. the student's full logits.

    Args:
        student_logits: ``(n, V)`` raw student logits, any float dtype (not modified).
        topk_ids: ``(n, k)`` the cached ids of these rows (int64).
        teacher_bucket_log_probs: ``(n, k + 1)`` the teacher's coarsened log-probabilities.
        divergence: the per-entry terms, e.g. ``ABDivergence(0.2, 0.7)``.
        temperature: divides both sides' bucket log-probabilities.
        compute_grad: if False, the gradient is skipped and ``None`` returned in its place.

    Returns:
        ``row_losses`` ``(n,)`` and ``grad`` ``(n, V)`` in fp32 (float64 for float64 logits).

    The student's bucket logits are its logits at the ``k`` ids and the log-sum-exp of the other
    entries (their softmax is the coarsened distribution). The divergence and its gradient with
    respect to those ``k + 1`` bucket logits come from the same routine as the full-vocabulary
    path; the chain rule then gives each picked id its bucket's gradient and each tail entry the
    tail bucket's gradient times its share ``exp(z_j - logsumexp_tail)`` of the tail.
    """
    compute_dtype = _compute_dtype(student_logits.dtype)
    work = student_logits.to(compute_dtype, copy=True)
    picked = work.gather(-1, topk_ids)
    work.scatter_(-1, topk_ids, -math.inf)
    tail = torch.logsumexp(work, dim=-1, keepdim=True)  # -inf when the k ids cover everything
    student_buckets = torch.cat([picked, tail], dim=-1)
    row_losses, bucket_grad = rowwise_loss_and_grad(
        student_buckets,
        teacher_bucket_log_probs.to(compute_dtype),
        divergence,
        temperature,
        compute_grad=compute_grad,
    )
    if not compute_grad:
        return row_losses, None
    # An empty tail has no share to hand out: subtracting 0 leaves its -inf entries at exp(-inf).
    finite_tail = torch.where(torch.isfinite(tail), tail, 0.0)
    grad = work.sub_(finite_tail).exp_().mul_(bucket_grad[:, -1:])
    grad.scatter_(-1, topk_ids, bucket_grad[:, :-1])
    return row_losses, grad


class _CoarsenedDivergenceFunction(torch.autograd.Function):
    """Per-row losses of the counted rows; the gradient is built during forward, chunk by chunk."""

    @staticmethod
    def forward(
        ctx,
        student_logits: torch.Tensor,
        rows: torch.Tensor | None,
        topk_ids: torch.Tensor,
        teacher_buckets: torch.Tensor,
        divergence: PointwiseDivergence,
        temperature: float,
        chunk_size: int,
    ) -> torch.Tensor:
        needs_grad = ctx.needs_input_grad[0]
        num_counted = topk_ids.shape[0]
        row_losses = torch.zeros(
            num_counted, dtype=_compute_dtype(student_logits.dtype), device=student_logits.device
        )
        grad = torch.zeros_like(student_logits) if needs_grad else None
        for start in range(0, num_counted, chunk_size):
            block = slice(start, min(start + chunk_size, num_counted))
            positions = (
                torch.arange(block.start, block.stop, device=student_logits.device)
                if rows is None
                else rows[block]
            )
            chunk_losses, chunk_grad = coarsened_rowwise_loss_and_grad(
                student_logits.index_select(0, positions),
                topk_ids[block],
                teacher_buckets[block],
                divergence,
                temperature,
                compute_grad=needs_grad,
            )
            row_losses[block] = chunk_losses
            if needs_grad:
                grad.index_copy_(0, positions, chunk_grad.to(grad.dtype))
        ctx.rows = rows
        if needs_grad:
            ctx.save_for_backward(grad)
        return row_losses

    @staticmethod
    def backward(ctx, grad_row_losses: torch.Tensor):
        (grad,) = ctx.saved_tensors
        scale = torch.zeros(grad.shape[0], dtype=grad.dtype, device=grad.device)
        if ctx.rows is None:
            scale[: grad_row_losses.shape[0]] = grad_row_losses
        else:
            scale.index_copy_(0, ctx.rows, grad_row_losses.to(grad.dtype))
        scale = scale.unsqueeze(-1)
        if backward_keeps_graph():
            return grad * scale, None, None, None, None, None, None
        return grad.mul_(scale), None, None, None, None, None, None


def _counted_rows(
    mask: torch.Tensor | None, position_shape: torch.Size, device: torch.device
) -> torch.Tensor | None:
    """Flat indices of the mask-true positions, or None when every position counts."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(position_shape):
        raise ValueError(
            f"`mask` has shape {tuple(mask.shape)} but must match the student's positions, "
            f"{tuple(position_shape)}."
        )
    return mask.reshape(-1).to(device=device, dtype=torch.bool).nonzero().squeeze(-1)


def _check_common(
    teacher: CachedTeacher, num_counted: int, vocab_size: int, temperature: float, reduction: str
) -> None:
    teacher.validate(vocab_size)
    if teacher.num_rows != num_counted:
        raise ValueError(
            f"The cached teacher has {teacher.num_rows} rows but {num_counted} positions are "
            "counted: the cache must hold exactly one row per counted (mask-true) position, in "
            "order. Was it written with other preprocessing (max_length, packing, loss masks)?"
        )
    if not (isinstance(temperature, (int, float)) and 0.0 < float(temperature) < math.inf):
        raise ValueError(f"`temperature` must be a positive finite number, got {temperature}.")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {_REDUCTIONS}, got {reduction!r}.")


def _reduce(
    row_values: torch.Tensor,
    rows: torch.Tensor | None,
    position_shape: torch.Size,
    reduction: str,
) -> torch.Tensor:
    if reduction == "none":
        if rows is None:
            return row_values.reshape(position_shape)
        full = row_values.new_zeros(math.prod(position_shape))
        return full.index_copy(0, rows, row_values).reshape(position_shape)
    total = row_values.sum()
    if reduction == "sum":
        return total
    return total / max(1, row_values.shape[0])


def coarsened_divergence(
    student_logits: torch.Tensor,
    teacher: CachedTeacher,
    divergence: str | PointwiseDivergence,
    *,
    divergence_params: Mapping[str, float] | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """A registry divergence between a cached teacher and the student, both coarsened.

    Args:
        student_logits: ``(..., V)`` the student's logits over the tokenizer's vocabulary (slice
            padded head rows off first), any float dtype; receives the gradient.
        teacher: the cached teacher, one row per counted position in row-major order.
        divergence: a registry name (``"ab"``, ``"fkl"``, ...) or a ``PointwiseDivergence``.
        divergence_params: parameters of a divergence given by name, e.g. ``{"alpha": 0.2,
            "beta": 0.7}``.
        temperature: divides both sides' bucket log-probabilities (see the module docstring).
        mask: ``(...)`` bool, True at the positions the cache rows belong to; None: all positions.
        reduction: ``"none"`` (per position, 0 where masked out), ``"sum"`` or ``"mean"`` over
            counted positions.
        chunk_size: counted rows per chunk (bounds the fp32 ``(chunk, V)`` temporaries); None
            picks ``default_chunk_size(V, device)``.

    Returns:
        fp32 values in nats (float64 for float64 logits). With ``k = V`` they equal the
        full-vocabulary divergence of the registry function on the teacher's logits.
    """
    spec_divergence = _resolve_divergence(divergence, divergence_params)
    if not student_logits.is_floating_point() or student_logits.dim() < 1:
        raise TypeError("`student_logits` must be a floating point tensor (..., V).")
    position_shape = student_logits.shape[:-1]
    vocab_size = student_logits.shape[-1]
    rows = _counted_rows(mask, position_shape, student_logits.device)
    num_counted = math.prod(position_shape) if rows is None else rows.numel()
    _check_common(teacher, num_counted, vocab_size, temperature, reduction)
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"`chunk_size` must be a positive integer or None, got {chunk_size!r}.")
    teacher = teacher.to(student_logits.device)
    compute_dtype = _compute_dtype(student_logits.dtype)
    row_losses = _CoarsenedDivergenceFunction.apply(
        student_logits.reshape(-1, vocab_size),
        rows,
        teacher.topk_ids.long(),
        teacher.bucket_log_probs(compute_dtype),
        spec_divergence,
        float(temperature),
        chunk_size or default_chunk_size(vocab_size, student_logits.device),
    )
    return _reduce(row_losses, rows, position_shape, reduction)


def cached_row_statistics(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    teacher_bucket_log_probs: torch.Tensor,
    labels: torch.Tensor,
    student_entropy: torch.Tensor | None = None,
) -> TokenStatistics:
    """Per-row :class:`~abkd_trainer.divergences.statistics.TokenStatistics` against a cache.

    As ``statistics.row_statistics``, except that the teacher's entropy is that of its coarsened
    distribution (the ``k + 1`` buckets; the full entropy when ``k`` covers the vocabulary, a
    lower bound otherwise) and its top-1 token is the first cached id.
    """
    if student_entropy is None:
        student_entropy = log_probs_and_entropy(student_logits)[2]
    teacher_entropy = log_probs_and_entropy(teacher_bucket_log_probs)[2].to(student_entropy.dtype)
    return statistics_against_teacher(
        student_logits, student_entropy, teacher_entropy, topk_ids[:, 0], labels
    )


@torch.no_grad()
def coarsened_token_statistics(
    student_logits: torch.Tensor,
    teacher: CachedTeacher,
    targets: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int | None = None,
) -> TokenStatistics:
    """Sums of :func:`cached_row_statistics` over the ``mask``-true positions, whose cached rows
    ``teacher`` holds in order; ``(..., V)`` logits, ``(...)`` targets and mask."""
    vocab = student_logits.shape[-1]
    rows = mask.reshape(-1).nonzero().squeeze(-1)
    student_2d = student_logits.reshape(-1, vocab)
    targets_1d = targets.reshape(-1)
    teacher = teacher.to(student_logits.device)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    sums = torch.zeros(len(TokenStatistics._fields), dtype=dtype, device=student_logits.device)
    chunk_size = chunk_size or default_chunk_size(vocab, student_logits.device)
    for start in range(0, rows.numel(), chunk_size):
        index = rows[start : start + chunk_size]
        cached = teacher.select(slice(start, start + chunk_size))
        statistics = cached_row_statistics(
            student_2d.index_select(0, index),
            cached.topk_ids.long(),
            cached.bucket_log_probs(dtype),
            targets_1d.index_select(0, index),
        )
        sums += torch.stack([value.sum() for value in statistics])
    return TokenStatistics(*sums.unbind())


# ----------------------------------------------------------------------------- fused variant


@dataclass(frozen=True)
class _CoarsenedSpec:
    """Everything the tile loop needs besides tensors (read by ``_cross_entropy_and_grad`` too)."""

    divergence: PointwiseDivergence
    temperature: float
    student_transform: LogitTransform
    vocab_size: int
    chunk_size: int
    pointwise_rows: int
    with_labels: bool
    divergence_weight: float
    ce_weight: float
    student_dtype: torch.dtype


def _coarsened_tile(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    teacher_buckets: torch.Tensor,
    labels: torch.Tensor | None,
    spec: _CoarsenedSpec,
    compute_grad: bool,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """Like ``fused_linear._divergence_tile``, against cached buckets instead of teacher logits:
    the per-row values in ``_PER_ROW_FIELDS`` order (only the divergence without labels) and the
    gradient with respect to the student's raw logits."""
    divergence, grad = coarsened_rowwise_loss_and_grad(
        student_logits,
        topk_ids,
        teacher_buckets,
        spec.divergence,
        spec.temperature,
        compute_grad=compute_grad and spec.divergence_weight != 0.0,
    )
    per_row: tuple[torch.Tensor, ...] = (divergence,)
    if spec.with_labels:
        cross_entropy, student_entropy, grad = _cross_entropy_and_grad(
            student_logits, labels, grad, spec, compute_grad
        )
        statistics = cached_row_statistics(
            student_logits, topk_ids, teacher_buckets, labels, student_entropy
        )
        per_row = (divergence, cross_entropy, *(getattr(statistics, f) for f in _STATISTICS))
    if not compute_grad:
        return per_row, None
    if grad is None:
        grad = torch.zeros_like(student_logits)
    return per_row, spec.student_transform.grad_to_raw_(grad, student_logits)


def _walk_coarsened_tiles(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    topk_ids: torch.Tensor,
    teacher_buckets: torch.Tensor,
    labels: torch.Tensor | None,
    spec: _CoarsenedSpec,
    needs_grad: tuple[bool, bool, bool],
    row_grad_weights: torch.Tensor | None,
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...]]:
    """``fused_linear.walk_student_tiles`` against the cached rows: the per-row values
    (``_PER_ROW_FIELDS``, only the divergence without labels) and the gradients of
    ``sum_i r_i loss_i`` (``r = row_grad_weights``, 1 if None) for the student's hidden states,
    head weight and bias, with fp32 (or wider) logits."""
    device = student_hidden.device

    def teacher_of_chunk(rows: slice) -> TileEvaluator:
        def evaluate(student_logits, part, absolute, compute_grad):
            return _coarsened_tile(
                student_logits,
                topk_ids[absolute],
                teacher_buckets[absolute],
                None if labels is None else labels[absolute],
                spec,
                compute_grad,
            )

        return evaluate

    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        return walk_student_tiles(
            student_hidden, student_weight, student_bias, spec, needs_grad, row_grad_weights,
            torch.promote_types(spec.student_dtype, torch.float32), teacher_of_chunk,
        )  # fmt: skip


def _row_loss(per_row: tuple[torch.Tensor, ...], spec: _CoarsenedSpec) -> torch.Tensor:
    if not spec.with_labels:
        return per_row[0]
    return spec.divergence_weight * per_row[0] + spec.ce_weight * per_row[1]


class _FusedCoarsenedFunction(torch.autograd.Function):
    """Per-row losses; scalar reductions (``summed``) build the gradients during forward, the
    per-row output recomputes the tiles in backward with the incoming row weights."""

    @staticmethod
    def forward(
        ctx,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        student_bias: torch.Tensor | None,
        topk_ids: torch.Tensor,
        teacher_buckets: torch.Tensor,
        labels: torch.Tensor | None,
        spec: _CoarsenedSpec,
        summed: bool,
    ) -> tuple[torch.Tensor, ...]:
        needs_grad = tuple(ctx.needs_input_grad[:3]) if summed else (False, False, False)
        per_row, grads = _walk_coarsened_tiles(
            student_hidden, student_weight, student_bias, topk_ids, teacher_buckets, labels,
            spec, needs_grad, row_grad_weights=None,
        )  # fmt: skip
        ctx.summed, ctx.spec = summed, spec
        ctx.input_dtypes = tuple(
            None if t is None else t.dtype for t in (student_hidden, student_weight, student_bias)
        )
        if summed:
            ctx.save_for_backward(*grads)
        else:
            ctx.save_for_backward(
                student_hidden, student_weight, student_bias, topk_ids, teacher_buckets, labels
            )
        details = per_row if spec.with_labels else ()
        ctx.mark_non_differentiable(*details)
        row_loss = _row_loss(per_row, spec)
        return (row_loss.sum() if summed else row_loss, *details)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor | None, *_unused: torch.Tensor):
        nones = (None,) * 5
        if grad_loss is None:
            return (None, None, None, *nones)
        if ctx.summed:
            # In place unless the graph is kept for another backward (retain_graph, gradcheck).
            keep = backward_keeps_graph()
            grads = []
            for stored in ctx.saved_tensors:
                if stored is not None:
                    scale = grad_loss.to(stored.dtype)
                    stored = stored * scale if keep else stored.mul_(scale)
                grads.append(stored)
        else:
            saved = ctx.saved_tensors
            _, grads = _walk_coarsened_tiles(
                *saved, ctx.spec, tuple(ctx.needs_input_grad[:3]), row_grad_weights=grad_loss
            )
        grads = [
            None if grad is None else grad.to(dtype)
            for grad, dtype in zip(grads, ctx.input_dtypes, strict=True)
        ]
        return (*grads, *nones)


def fused_linear_coarsened_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher: CachedTeacher,
    divergence: str | PointwiseDivergence,
    *,
    divergence_params: Mapping[str, float] | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    student_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    student_logit_softcap: float | None = None,
    vocab_size: int | None = None,
    labels: torch.Tensor | None = None,
    divergence_weight: float = 1.0,
    ce_weight: float = 0.0,
    chunk_size: int | None = None,
) -> torch.Tensor | FusedLinearDistillationOutput:
    """:func:`coarsened_divergence` from the student's hidden states and LM head.

    The values and gradients of :func:`coarsened_divergence` on the materialised logits
    ``transform(hidden @ weight.T + bias)[..., :vocab_size]``, computed a tile of rows at a time
    as in :func:`~abkd_trainer.fused_linear_divergence` (whose arguments these are, minus the
    teacher's head). Each tile's full-vocabulary row gives the student's normaliser, its ``k``
    cached columns and its tail's log-sum-exp; no ``(N, V)`` tensor exists.

    Args:
        student_hidden: ``(..., H)`` final hidden states; ``student_weight`` ``(V_s, H)``.
        teacher: one cached row per counted position (``mask``, else ``labels != -100``, else
            every position), in row-major order.
        labels: ``(...)`` next-token targets; when given, returns a
            :class:`~abkd_trainer.divergences.fused_linear.FusedLinearDistillationOutput` with the
            cross-entropy and the top-1 agreement with the teacher's first cached id.

    Returns:
        The divergence (a tensor, shape ``(...)`` for ``reduction="none"``), or the output tuple.
    """
    spec_divergence = _resolve_divergence(divergence, divergence_params)
    _validate_head("student", student_hidden, student_weight, student_bias)
    position_shape = student_hidden.shape[:-1]
    vocab = student_weight.shape[0] if vocab_size is None else vocab_size
    if (
        isinstance(vocab, bool)
        or not isinstance(vocab, int)
        or not 1 <= vocab <= len(student_weight)
    ):
        raise ValueError(
            f"`vocab_size` must be an integer in [1, {len(student_weight)}] (the head's rows), "
            f"got {vocab_size!r}."
        )
    if labels is None and (divergence_weight != 1.0 or ce_weight != 0.0):
        raise ValueError(
            "`divergence_weight` and `ce_weight` weight the divergence against the cross-entropy "
            "on `labels`; pass `labels` (or scale the returned divergence yourself)."
        )
    if labels is not None and tuple(labels.shape) != tuple(position_shape):
        raise ValueError(
            f"`labels` has shape {tuple(labels.shape)}; expected {tuple(position_shape)}."
        )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"`chunk_size` must be a positive integer or None, got {chunk_size!r}.")
    device = student_hidden.device
    labels_1d = None if labels is None else labels.reshape(-1).to(device)
    if mask is None and labels_1d is not None:
        mask = (labels_1d != IGNORE_INDEX).reshape(position_shape)
    rows = _counted_rows(mask, position_shape, device)
    hidden_2d = student_hidden.reshape(-1, student_hidden.shape[-1])
    if rows is not None:
        hidden_2d = hidden_2d.index_select(0, rows)
        labels_1d = None if labels_1d is None else labels_1d.index_select(0, rows)
    _check_common(teacher, hidden_2d.shape[0], vocab, temperature, reduction)
    if labels_1d is not None and bool(((labels_1d < 0) | (labels_1d >= vocab)).any()):
        raise ValueError(f"`labels` at counted positions must lie in [0, {vocab}).")

    spec = _CoarsenedSpec(
        divergence=spec_divergence,
        temperature=float(temperature),
        student_transform=LogitTransform(student_logit_scale, student_logit_softcap),
        vocab_size=vocab,
        chunk_size=chunk_size or default_fused_chunk_size(vocab, device),
        pointwise_rows=_pointwise_rows(vocab, device),
        with_labels=labels_1d is not None,
        divergence_weight=float(divergence_weight),
        ce_weight=float(ce_weight),
        student_dtype=_gemm_dtype(student_hidden),
    )
    teacher = teacher.to(device)
    work_dtype = torch.promote_types(spec.student_dtype, torch.float32)
    inputs = (
        hidden_2d,
        student_weight,
        student_bias,
        teacher.topk_ids.long(),
        teacher.bucket_log_probs(work_dtype),
        labels_1d,
        spec,
    )
    student_params = (hidden_2d, student_weight, student_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in student_params):
        loss, *details = _FusedCoarsenedFunction.apply(*inputs, reduction != "none")
    else:
        per_row, _ = _walk_coarsened_tiles(*inputs, (False, False, False), None)
        loss = _row_loss(per_row, spec)
        loss = loss if reduction == "none" else loss.sum()
        details = list(per_row) if spec.with_labels else []

    def reduce(values: torch.Tensor, summed: bool = False) -> torch.Tensor:
        if summed:
            return values if reduction == "sum" else values / max(1, hidden_2d.shape[0])
        return _reduce(values, rows, position_shape, reduction)

    reduced_loss = reduce(loss, summed=reduction != "none")
    if labels_1d is None:
        return reduced_loss
    fields = dict(zip(_PER_ROW_FIELDS, details, strict=True))
    return FusedLinearDistillationOutput(
        loss=reduced_loss,
        num_tokens=torch.tensor(hidden_2d.shape[0], dtype=torch.int64, device=device),
        **{name: reduce(values) for name, values in fields.items()},
    )
