"""Divergences against a cached teacher: its top-k tokens plus one bucket for the rest.

An offline teacher cache (`abkd_trainer.lm.teacher_cache`) keeps, for every supervised
position,
the teacher's `k` most likely token ids, their log-probabilities and the log of the remaining
mass. Those `k + 1` numbers describe the teacher's distribution *coarsened* onto `k + 1`
outcomes: the `k` tokens and one tail bucket holding everything else. The student's distribution
is coarsened the same way, onto the same `k` ids of that position plus the sum of its other
probabilities, and any registry divergence is then evaluated between the two `(k + 1)`-outcome
distributions (every divergence here is separable, so a bucket is just a small vocabulary):

    D_k(p || q) = D(coarsen_ids(p) || coarsen_ids(q)).

This is the divergence of the coarsened distributions, not the full one. It equals the full
divergence when `k` covers the vocabulary (the tail buckets are then empty on both sides); for
`k < V` it is a lower bound of it for every f-divergence (data processing: forward and reverse
KL, JSD, TVD, the skew KLs), and it ignores how either model spreads its mass inside the tail.

`temperature` divides the bucket log-probabilities of both sides (`softmax(log c / T)` over
the `k + 1` buckets, the tail treated as one outcome). The cache stores raw `log_softmax`
values so the temperature can be chosen at training time; for `k < V` and `T != 1` this is the
tempered coarsened distribution, not the coarsened tempered one (which would need the teacher's
whole tail).

Two drivers, mirroring the live-teacher ones: `coarsened_divergence` on the student's
logits, `fused_linear_coarsened_divergence` on its final hidden states and LM head (the
student's full normaliser, a log-sum-exp over the vocabulary, is taken tile by tile; the logits
never exist as one tensor). Both compute the gradient during the forward pass, in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from abkd_trainer.divergences.chunked import (
    backward_keeps_graph,
    compute_dtype,
    default_chunk_size,
    rowwise_loss_and_grad,
)
from abkd_trainer.divergences.fused_inputs import FusedLossOptions, count_rows, reduce_rows
from abkd_trainer.divergences.fused_tiles import (
    FusedLinearDistillationOutput,
    FusedTeacher,
    TeacherChunk,
    TileSettings,
    fused_tiles_loss,
)
from abkd_trainer.divergences.pointwise import PointwiseDivergence
from abkd_trainer.divergences.projection import LogitTransform, gemm_dtype, validate_head
from abkd_trainer.divergences.registry import resolve_divergence
from abkd_trainer.divergences.statistics import (
    TokenStatistics,
    log_probs_and_entropy,
    statistics_against_teacher,
)

__all__ = [
    "CachedTeacher",
    "CachedTeacherTiles",
    "cached_row_statistics",
    "coarsened_divergence",
    "coarsened_token_statistics",
    "coarsened_rowwise_loss_and_grad",
    "fused_linear_coarsened_divergence",
]

_REDUCTIONS = ("none", "sum", "mean")


@dataclass(frozen=True)
class CachedTeacher:
    """The cached teacher at `n` positions (one row per counted position, in order).

    Attributes:
        topk_ids: `(n, k)` integer token ids, most likely first, all below the vocabulary size.
        topk_log_probs: `(n, k)` the teacher's `log_softmax` at those ids (temperature 1).
        tail_log_prob: `(n,)` log of the teacher's remaining mass `1 - sum(exp(topk_log_probs))`
            (`-inf` when `k` covers the vocabulary).
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
        """Raise `ValueError` unless the shapes agree and every id lies in `[0, vocab_size)`."""
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
        """The cache rows of raw teacher logits `(n, V)` (temperature 1), in fp32 or wider.

        `tail_log_prob` is the log-sum-exp of the other `V - k` log-probabilities, not
        `log(1 - sum(top-k probabilities))`, which cancels when the top `k` hold nearly all
        the mass.
        """
        log_probs = torch.log_softmax(teacher_logits.to(compute_dtype(teacher_logits.dtype)), -1)
        topk_log_probs, topk_ids = log_probs.topk(top_k, dim=-1)
        tail = torch.logsumexp(log_probs.scatter_(-1, topk_ids, -math.inf), dim=-1)
        return cls(topk_ids, topk_log_probs, tail)

    def bucket_log_probs(self, dtype: torch.dtype) -> torch.Tensor:
        """`(n, k + 1)`: the teacher's coarsened log-probabilities, the tail last."""
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
        student_logits: `(n, V)` raw student logits, any float dtype (not modified).
        topk_ids: `(n, k)` the cached ids of these rows (int64).
        teacher_bucket_log_probs: `(n, k + 1)` the teacher's coarsened log-probabilities.
        divergence: the per-entry terms, e.g. `ABDivergence(0.2, 0.7)`.
        temperature: divides both sides' bucket log-probabilities.
        compute_grad: if False, the gradient is skipped and `None` returned in its place.

    Returns:
        `row_losses` `(n,)` and `grad` `(n, V)` in fp32 (float64 for float64 logits).

    The student's bucket logits are its logits at the `k` ids and the log-sum-exp of the other
    entries (their softmax is the coarsened distribution). The divergence and its gradient with
    respect to those `k + 1` bucket logits come from the same routine as the full-vocabulary
    path; the chain rule then gives each picked id its bucket's gradient and each tail entry the
    tail bucket's gradient times its share `exp(z_j - logsumexp_tail)` of the tail.
    """
    work_dtype = compute_dtype(student_logits.dtype)
    work = student_logits.to(work_dtype, copy=True)
    picked = work.gather(-1, topk_ids)
    work.scatter_(-1, topk_ids, -math.inf)
    tail = torch.logsumexp(work, dim=-1, keepdim=True)  # -inf when the k ids cover everything
    student_buckets = torch.cat([picked, tail], dim=-1)
    row_losses, bucket_grad = rowwise_loss_and_grad(
        student_buckets,
        teacher_bucket_log_probs.to(work_dtype),
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
            num_counted, dtype=compute_dtype(student_logits.dtype), device=student_logits.device
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


def _check_cache(teacher: CachedTeacher, num_counted: int, vocab_size: int) -> None:
    teacher.validate(vocab_size)
    if teacher.num_rows != num_counted:
        raise ValueError(
            f"The cached teacher has {teacher.num_rows} rows but {num_counted} positions are "
            "counted: the cache must hold exactly one row per counted (mask-true) position, in "
            "order. Was it written with other preprocessing (max_length, packing, loss masks)?"
        )


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
        student_logits: `(..., V)` the student's logits over the tokenizer's vocabulary, e.g.
            `(batch, seq, V)` (slice padded head rows off first), any float dtype; receives the
            gradient.
        teacher: The cached teacher (a `CachedTeacher`: `(n, k)` top-k ids and log-probabilities,
            `(n,)` tail log-mass), one row per counted position in row-major order.
        divergence: A name from
            [`DIVERGENCE_NAMES`][abkd_trainer.divergences.registry.DIVERGENCE_NAMES] (`"ab"`,
            `"fkl"`, ...) or a parametrised `PointwiseDivergence` object.
        divergence_params: Parameters of a divergence given by name, e.g. `{"alpha": 0.2,
            "beta": 0.7}` for `"ab"`.
        temperature: Divides both sides' bucket log-probabilities (see the module docstring).
        mask: `(...)` bool, True at the positions the cache rows belong to; None: all positions.
        reduction: `"none"` (per position, shape `(...)`, 0 where masked out), `"sum"`, or
            `"mean"` over the counted positions.
        chunk_size: Counted rows per chunk (bounds the fp32 `(chunk, V)` temporaries); None picks
            one from the vocabulary size and the device.

    Returns:
        The coarsened divergence in nats, fp32 (float64 for float64 logits): shape `(...)` for
        `"none"`, else a scalar. With `k = V` it equals the full-vocabulary divergence of the
        registry function on the teacher's logits; for `k < V` it is a lower bound of it for
        every f-divergence.

    Raises:
        TypeError: `student_logits` is not floating point, the cached ids are not integers, or
            `divergence` is neither a name nor a pointwise divergence.
        ValueError: The cache's shapes disagree, its ids or `k` do not fit the vocabulary, it has
            not exactly one row per counted position, `mask` does not have the positions' shape,
            `temperature`, `reduction` or `chunk_size` is out of range, or the divergence name or
            its parameters are invalid.
    """
    pointwise = resolve_divergence(divergence, divergence_params)
    if not student_logits.is_floating_point() or student_logits.dim() < 1:
        raise TypeError("`student_logits` must be a floating point tensor (..., V).")
    position_shape = student_logits.shape[:-1]
    vocab_size = student_logits.shape[-1]
    rows = _counted_rows(mask, position_shape, student_logits.device)
    _check_cache(teacher, math.prod(position_shape) if rows is None else rows.numel(), vocab_size)
    if not (isinstance(temperature, (int, float)) and 0.0 < float(temperature) < math.inf):
        raise ValueError(f"`temperature` must be a positive finite number, got {temperature}.")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {_REDUCTIONS}, got {reduction!r}.")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"`chunk_size` must be a positive integer or None, got {chunk_size!r}.")
    teacher = teacher.to(student_logits.device)
    row_losses = _CoarsenedDivergenceFunction.apply(
        student_logits.reshape(-1, vocab_size),
        rows,
        teacher.topk_ids.long(),
        teacher.bucket_log_probs(compute_dtype(student_logits.dtype)),
        pointwise,
        float(temperature),
        chunk_size or default_chunk_size(vocab_size, student_logits.device),
    )
    return reduce_rows(row_losses, rows, position_shape, reduction)


def cached_row_statistics(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    teacher_bucket_log_probs: torch.Tensor,
    labels: torch.Tensor,
    student_entropy: torch.Tensor | None = None,
) -> TokenStatistics:
    """Per-row `TokenStatistics` against a cache.

    As `statistics.row_statistics`, except that the teacher's entropy is that of its coarsened
    distribution (the `k + 1` buckets; the full entropy when `k` covers the vocabulary, a
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
    """Sums of `cached_row_statistics` over the `mask`-true positions, whose cached rows
    `teacher` holds in order; `(..., V)` logits, `(...)` targets and mask."""
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


class _CachedTeacherChunk(TeacherChunk):
    """The cached rows `(rows, k)` and buckets `(rows, k + 1)` of one projection tile."""

    def __init__(self, topk_ids: torch.Tensor, bucket_log_probs: torch.Tensor) -> None:
        self.topk_ids, self.bucket_log_probs = topk_ids, bucket_log_probs

    def divergence_and_grad(
        self,
        student_logits: torch.Tensor,
        part: slice,
        divergence: PointwiseDivergence,
        temperature: float,
        compute_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        return coarsened_rowwise_loss_and_grad(
            student_logits,
            self.topk_ids[part],
            self.bucket_log_probs[part],
            divergence,
            temperature,
            compute_grad=compute_grad,
        )

    def statistics(
        self,
        student_logits: torch.Tensor,
        part: slice,
        labels: torch.Tensor,
        student_entropy: torch.Tensor,
    ) -> TokenStatistics:
        return cached_row_statistics(
            student_logits,
            self.topk_ids[part],
            self.bucket_log_probs[part],
            labels,
            student_entropy,
        )


class CachedTeacherTiles(FusedTeacher):
    """A cached teacher as the fused kernels' teacher, one row per counted position.

    Args:
        topk_ids: `(n, k)` int64 cached token ids.
        bucket_log_probs: `(n, k + 1)` the teacher's coarsened log-probabilities
            ([`CachedTeacher.bucket_log_probs`][abkd_trainer.divergences.coarsened.CachedTeacher.bucket_log_probs]),
            in the dtype the student's logits are compared in (fp32, or float64).
    """

    def __init__(self, topk_ids: torch.Tensor, bucket_log_probs: torch.Tensor) -> None:
        self.topk_ids, self.bucket_log_probs = topk_ids, bucket_log_probs

    @property
    def dtype(self) -> torch.dtype:
        return self.bucket_log_probs.dtype

    def chunk_reader(
        self, settings: TileSettings, num_rows: int
    ) -> Callable[[slice], TeacherChunk]:
        def read(rows: slice) -> TeacherChunk:
            return _CachedTeacherChunk(self.topk_ids[rows], self.bucket_log_probs[rows])

        return read


def _checked_vocab_size(student_weight: torch.Tensor, vocab_size: int | None) -> int:
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
    return vocab


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
    """[`coarsened_divergence`][abkd_trainer.divergences.coarsened.coarsened_divergence] from the
    student's hidden states and LM head.

    The values and gradients of `coarsened_divergence` on the materialised logits
    `transform(hidden @ weight.T + bias)[..., :vocab_size]`, computed a tile of rows at a time
    as in [`fused_linear_divergence`][abkd_trainer.divergences.fused_linear.fused_linear_divergence]
    (whose arguments these are, the teacher's head replaced by its cache). Each tile's
    full-vocabulary row gives the student's normaliser, its `k` cached columns and its tail's
    log-sum-exp; no `(N, V)` tensor exists.

    Args:
        student_hidden: `(..., H)` the student's final hidden states, e.g. `(batch, seq, H)`, any
            float dtype; receives the gradient.
        student_weight: `(V_s, H)` the student's `lm_head.weight`; receives the gradient.
        teacher: The cached teacher (a `CachedTeacher`), one row per counted position (`mask`,
            else `labels != -100`, else every position), in row-major order.
        divergence: A registry name (`"ab"`, `"fkl"`, ...) or a parametrised
            `PointwiseDivergence` object.
        divergence_params: Parameters of a divergence given by name, e.g. `{"alpha": 0.2,
            "beta": 0.7}`.
        temperature: Divides both sides' bucket log-probabilities; the cross-entropy uses 1.
        mask: `(...)` bool, True at the positions that count; only those rows are projected.
        reduction: `"none"` (per position, 0 where not counted), `"sum"` or `"mean"`.
        student_bias: `(V_s,)` the student's head bias, if its head has one.
        student_logit_scale: Multiplies the student's raw logits (`config.logit_scale`).
        student_logit_softcap: Soft cap `c` of `c * tanh(logits / c)`, after the scale; None: off.
        vocab_size: The tokenizer's vocabulary size, at most `V_s` (padded head rows from it on
            are ignored); None: `V_s`.
        labels: `(...)` int64 next-token targets (-100 where unsupervised); when given, returns a
            `FusedLinearDistillationOutput` with the cross-entropy and the top-1 agreement with
            the teacher's first cached id.
        divergence_weight: The output's `loss` is `divergence_weight * divergence + ce_weight *
            cross_entropy` (with `labels` only).
        ce_weight: The weight of the cross-entropy in that loss.
        chunk_size: Tokens per projection tile (fp32 `(chunk_size, V)` buffers); None: chosen
            from the vocabulary size and the device.

    Returns:
        Without `labels`: the coarsened divergence in nats (shape `(...)` for `"none"`, else a
        scalar). With `labels`: the `FusedLinearDistillationOutput` named tuple, whose `loss`
        alone carries a gradient.

    Raises:
        TypeError: The hidden states or head are not floating point, `labels` or the cached ids
            are not integers, or `divergence` is neither a name nor a pointwise divergence.
        ValueError: The head does not fit the hidden states, `vocab_size` is not in
            `[1, V_s]`, the cache does not fit (shapes, ids, one row per counted position),
            `mask` / `labels` do not have the positions' shape or a counted label is outside
            `[0, vocab_size)`, loss weights are set without `labels`, or an option or the
            divergence's parameters are out of range.
    """
    pointwise = resolve_divergence(divergence, divergence_params)
    validate_head("student", student_hidden, student_weight, student_bias)
    vocab = _checked_vocab_size(student_weight, vocab_size)
    options = FusedLossOptions(
        temperature=temperature,
        reduction=reduction,
        student_transform=LogitTransform(student_logit_scale, student_logit_softcap),
        chunk_size=chunk_size,
        divergence_weight=divergence_weight,
        ce_weight=ce_weight,
    )
    counted = count_rows(student_hidden, mask, labels, vocab, options)
    _check_cache(teacher, counted.num_rows, vocab)
    teacher = teacher.to(student_hidden.device)
    # The buckets in the dtype of the student's logits: fp32 for 16-bit and fp32 models.
    work_dtype = torch.promote_types(gemm_dtype(student_hidden), torch.float32)
    tiles = CachedTeacherTiles(teacher.topk_ids.long(), teacher.bucket_log_probs(work_dtype))
    return fused_tiles_loss(counted, student_weight, student_bias, tiles, pointwise, options, vocab)
