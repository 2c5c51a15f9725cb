"""Distillation losses from hidden states and LM heads, without ever building the ``(N, V)`` logits.

At today's vocabularies (Llama-3 128256, Qwen2.5 151936, Gemma 256000) the teacher's and the
student's logits, not the weights, are what runs out of memory. The functions here take both
models' final hidden states and LM-head weights instead and walk the counted tokens in two nested
tile sizes:

* a **projection tile** of ``chunk_size`` rows: one GEMM per model writes the raw logits
  (``hidden @ weight.T + bias``) into a preallocated fp32 ``(chunk_size, V)`` buffer, and the
  models' logit post-processing (``logit_scale``, Gemma-style ``final_logit_softcapping``) is
  applied in place;
* **divergence tiles** of a few rows inside it (on CPU ~1 MiB of fp32 per thread): each goes
  through :func:`~abkd_trainer.divergences.chunked.rowwise_loss_and_grad`, the routine the
  logits-based functions use, so every registry divergence works and the values are those of
  :func:`~abkd_trainer.divergences.ab_divergence` on materialised logits. The optional
  cross-entropy on ``labels``, the top-1 teacher agreement, the student's token accuracy and both
  models' entropies (:mod:`~abkd_trainer.divergences.statistics`) are computed here too, from the
  same tile, and the gradient with respect to the raw logits overwrites the tile's logits in the
  student buffer;
* back in the projection tile, two GEMMs fold that gradient into the student's hidden states and
  head weight (``g @ W``, ``g.T @ h``) and a sum into its bias.

Why two sizes: the GEMMs want many rows (each projection tile re-reads the head weight), while the
divergence's ~40 elementwise passes want small, cache-resident temporaries. On CPU, fresh
multi-megabyte temporaries cost more in page faults than the arithmetic on them, so the small
divergence tiles run several times faster than large ones.

Scalar reductions (``"sum"``, ``"mean"``) compute the gradients during the forward pass, like
Liger-Kernel, so each model's projection runs once and backward only rescales what forward stored:
two GEMMs fewer than recomputing the logits in backward (TRL's ``ChunkedDivergenceFunction``).
``reduction="none"`` cannot know the per-row output gradients in advance; it keeps the inputs and
recomputes the tiles in backward.

Extra memory: two fp32 ``(chunk_size, V)`` buffers, the temporaries of one divergence tile, and one
fp32 accumulator the size of the student's head weight; never an ``(N, V)`` tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from abkd_trainer.divergences.chunked import backward_keeps_graph, rowwise_loss_and_grad
from abkd_trainer.divergences.pointwise import ABDivergence, PointwiseDivergence
from abkd_trainer.divergences.registry import make_divergence
from abkd_trainer.divergences.statistics import log_probs_and_entropy, row_statistics

__all__ = [
    "ACCELERATOR_PROJECTION_ELEMENTS",
    "CPU_POINTWISE_ELEMENTS_PER_THREAD",
    "CPU_PROJECTION_ELEMENTS",
    "MIN_PROJECTION_ROWS",
    "FusedLinearDistillationOutput",
    "LogitTransform",
    "default_fused_chunk_size",
    "fused_linear_ab_divergence",
    "fused_linear_divergence",
]

# Values per projection buffer on CPU (32 MiB in fp32; 262 rows at V = 32000): two buffers stay
# far below one logits tensor.
CPU_PROJECTION_ELEMENTS = 2**23
# Accelerators get larger tiles (128 MiB; 220 rows at V = 151936): fewer, larger GEMMs.
ACCELERATOR_PROJECTION_ELEMENTS = 2**25
# ...but never fewer rows than this: every projection tile re-reads the head weight, and once the
# weight outgrows the cache, thin tiles make the GEMMs memory-bound (at Qwen2.5-0.5B's shape on
# CPU, 55-row tiles took 62 s per 4096 tokens, 256-row tiles 49 s, 512-row tiles 48 s).
MIN_PROJECTION_ROWS = 256
# Values per divergence tile and CPU thread (1 MiB in fp32; 8 rows at V = 32000 on one thread): the
# tile's temporaries stay in cache and are recycled by the allocator, which on CPU made the
# divergence 3-4x faster than 128-row tiles whose fresh pages fault in on every operation.
CPU_POINTWISE_ELEMENTS_PER_THREAD = 2**18
# Accelerators pay per kernel launch instead: their divergence tiles are 32 MiB (in fp32).
_ACCELERATOR_POINTWISE_ELEMENTS = 2**23
_REDUCTIONS = ("none", "sum", "mean")
IGNORE_INDEX = -100


def default_fused_chunk_size(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Tokens per projection tile on ``device``: ``CPU_PROJECTION_ELEMENTS // vocab_size`` on CPU,
    ``ACCELERATOR_PROJECTION_ELEMENTS // vocab_size`` elsewhere, at least ``MIN_PROJECTION_ROWS``.
    """
    elements = (
        CPU_PROJECTION_ELEMENTS
        if torch.device(device).type == "cpu"
        else ACCELERATOR_PROJECTION_ELEMENTS
    )
    return max(MIN_PROJECTION_ROWS, elements // max(1, vocab_size))


def _pointwise_rows(vocab_size: int, device: torch.device) -> int:
    """Rows per divergence tile (see ``CPU_POINTWISE_ELEMENTS_PER_THREAD``)."""
    if device.type == "cpu":
        elements = CPU_POINTWISE_ELEMENTS_PER_THREAD * torch.get_num_threads()
    else:
        elements = _ACCELERATOR_POINTWISE_ELEMENTS
    return max(1, elements // max(1, vocab_size))


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to ``hidden @ weight.T + bias`` before its softmax.

    ``logits = softcap * tanh(scale * raw / softcap)`` with soft-capping (Gemma 2/3
    ``final_logit_softcapping``), ``scale * raw`` without (Cohere ``logit_scale``; 1.0 for most
    models). The scale comes first, as in transformers' models and TRL's kernels.
    """

    scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise TypeError(f"`logit_scale` must be a number, got {self.scale!r}.")
        if not math.isfinite(self.scale) or self.scale == 0:
            raise ValueError(f"`logit_scale` must be finite and non-zero, got {self.scale}.")
        if self.softcap is not None and (
            isinstance(self.softcap, bool)
            or not isinstance(self.softcap, (int, float))
            or not 0 < self.softcap < math.inf
        ):
            raise ValueError(
                f"`logit_softcap` must be a positive finite number or None, got {self.softcap!r}."
            )

    @classmethod
    def from_config(cls, config: Any) -> LogitTransform:
        """What a transformers model of this ``config`` does to its LM head's output.

        Reads the attributes transformers' causal LMs apply after ``lm_head`` (the same list TRL's
        fused heads read): ``logit_scale`` (Cohere), ``output_multiplier``, ``lm_head_multiplier``
        (Falcon-H1), ``logits_scaling`` (Granite, MiniCPM3 divide by it; HyperCLOVA X multiplies)
        and ``final_logit_softcapping`` (Gemma 2/3). Multimodal configs are read through
        ``get_text_config()``.
        """
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        scale = None
        for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
            scale = getattr(text_config, name, None)
            if scale is not None:
                break
        logits_scaling = getattr(text_config, "logits_scaling", None)
        if scale is None and logits_scaling is not None:
            is_multiplier = getattr(text_config, "model_type", None) == "hyperclovax"
            scale = logits_scaling if is_multiplier else 1.0 / logits_scaling
        softcap = getattr(text_config, "final_logit_softcapping", None)
        return cls(scale=1.0 if scale is None else float(scale), softcap=softcap)

    def apply_(self, raw_logits: torch.Tensor) -> torch.Tensor:
        """Transform ``raw_logits`` ``(n, V)`` in place and return it."""
        if self.softcap is not None:
            return raw_logits.mul_(self.scale / self.softcap).tanh_().mul_(self.softcap)
        return raw_logits if self.scale == 1.0 else raw_logits.mul_(self.scale)

    def grad_to_raw_(self, grad: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Turn ``grad`` w.r.t. the transformed ``logits`` into the gradient w.r.t. the raw ones.

        With soft-capping, ``d logits / d raw = scale * (1 - tanh^2)`` and ``tanh = logits /
        softcap``, so the derivative is read off the transformed logits; nothing else is kept.
        """
        if self.softcap is not None:
            one_minus_tanh_sq = logits.mul(1.0 / self.softcap).square_().neg_().add_(1.0)
            grad.mul_(one_minus_tanh_sq)
        return grad if self.scale == 1.0 else grad.mul_(self.scale)


class FusedLinearDistillationOutput(NamedTuple):
    """What the fused functions return when given ``labels``; each value uses ``reduction``.

    Attributes:
        loss: ``divergence_weight * divergence + ce_weight * cross_entropy``, the only field that
            carries a gradient.
        divergence: the divergence, detached.
        cross_entropy: the student's cross-entropy on ``labels`` (temperature 1, after the logit
            transform), detached.
        teacher_agreement: 1.0 where the student's and the teacher's top-1 tokens agree, detached
            (``"mean"``: the agreement rate; ``"sum"``: the number of agreeing tokens).
        num_tokens: number of counted (mask-true) positions, an int64 scalar.
        student_entropy, teacher_entropy: entropy in nats of each model's next-token distribution
            at temperature 1 (after the logit transform, over ``vocab_size``), detached. NaN where
            that model's logits are not finite.
        token_accuracy: 1.0 where the student's top-1 token is the label, detached.

    See :mod:`abkd_trainer.divergences.statistics` for the definitions.
    """

    loss: torch.Tensor
    divergence: torch.Tensor
    cross_entropy: torch.Tensor
    teacher_agreement: torch.Tensor
    num_tokens: torch.Tensor
    student_entropy: torch.Tensor
    teacher_entropy: torch.Tensor
    token_accuracy: torch.Tensor


# Per-row values the tile loops return with labels, in this order (all but the loss detached).
_PER_ROW_FIELDS = (
    "divergence",
    "cross_entropy",
    "teacher_agreement",
    "student_entropy",
    "teacher_entropy",
    "token_accuracy",
)


@dataclass(frozen=True)
class _LossSpec:
    """Everything the tile loops need besides tensors (one object, so autograd sees one arg)."""

    divergence: PointwiseDivergence
    temperature: float
    student_transform: LogitTransform
    teacher_transform: LogitTransform
    vocab_size: int
    chunk_size: int
    pointwise_rows: int
    with_labels: bool
    divergence_weight: float
    ce_weight: float
    # GEMM input dtypes: the hidden states' dtype, or the autocast dtype active at the call.
    student_dtype: torch.dtype
    teacher_dtype: torch.dtype


def _gemm_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype a model's LM head would run its GEMM in: autocast's, else the hidden states'."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    # Sums over tiles are kept in at least fp32: rounding each tile's product to 16 bits before
    # adding biases the weight gradient.
    return torch.promote_types(dtype, torch.float32)


def _tiles(num_rows: int, tile_rows: int) -> Iterator[slice]:
    for start in range(0, num_rows, tile_rows):
        yield slice(start, min(start + tile_rows, num_rows))


def _project_into(
    out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Write the raw logits ``hidden @ weight.T + bias`` ``(n, V)`` into ``out`` (fp32 or wider)."""
    if hidden.dtype == out.dtype:
        torch.mm(hidden, weight.t(), out=out)
    elif out.device.type == "cuda":
        # 16-bit GEMM with an fp32 output: the logits are never rounded to 16 bits.
        torch.mm(hidden, weight.t(), out_dtype=out.dtype, out=out)
    else:
        out.copy_(torch.mm(hidden, weight.t()))
    if bias is not None:
        out.add_(bias)
    return out


def _add_product_(
    accumulator: torch.Tensor, left: torch.Tensor, right: torch.Tensor, gemm_dtype: torch.dtype
) -> None:
    """``accumulator += left @ right`` with the sum kept in the accumulator's (fp32+) dtype.

    On CUDA a 16-bit model's GEMM runs in ``gemm_dtype`` with fp32 accumulation and output;
    elsewhere the product is formed in the accumulator's dtype. Either way no tile's contribution
    is rounded to 16 bits before it is added.
    """
    if accumulator.device.type == "cuda" and gemm_dtype != accumulator.dtype:
        torch.addmm(
            accumulator,
            left.to(gemm_dtype),
            right.to(gemm_dtype),
            out_dtype=accumulator.dtype,
            out=accumulator,
        )
    else:
        accumulator.addmm_(left.to(accumulator.dtype), right.to(accumulator.dtype))


def _cross_entropy_and_grad(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    divergence_grad: torch.Tensor | None,
    spec: _LossSpec,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row CE and entropy ``(n,)``, and ``divergence_weight * divergence_grad + ce_weight * CE
    grad`` (one softmax of the student serves all three)."""
    log_probs, probs, entropy = log_probs_and_entropy(student_logits)
    rows = torch.arange(labels.shape[0], device=labels.device)
    cross_entropy = -log_probs[rows, labels]
    if not compute_grad:
        return cross_entropy, entropy, None
    grad = divergence_grad
    if grad is not None and spec.divergence_weight != 1.0:
        grad.mul_(spec.divergence_weight)
    if spec.ce_weight != 0.0:
        # d CE / d z = softmax(z) - onehot(label)
        ce_grad = probs
        ce_grad[rows, labels] -= 1.0
        if grad is None:
            grad = ce_grad.mul_(spec.ce_weight)
        else:
            grad.add_(ce_grad, alpha=spec.ce_weight)
    return cross_entropy, entropy, grad


def _divergence_tile(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    spec: _LossSpec,
    compute_grad: bool,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """Per-row results of a few rows of transformed logits ``(m, V)``.

    Returns the per-row values ``(m,)`` in ``_PER_ROW_FIELDS`` order (only the divergence without
    labels) and, if ``compute_grad``, the gradient of ``divergence_weight * divergence +
    ce_weight * cross_entropy`` with respect to the student's *raw* logits ``(m, V)``.
    """
    divergence, grad = rowwise_loss_and_grad(
        student_logits,
        teacher_logits,
        spec.divergence,
        spec.temperature,
        compute_grad=compute_grad and spec.divergence_weight != 0.0,
    )
    per_row: tuple[torch.Tensor, ...] = (divergence,)
    if spec.with_labels:
        cross_entropy, student_entropy, grad = _cross_entropy_and_grad(
            student_logits, labels, grad, spec, compute_grad
        )
        statistics = row_statistics(student_logits, teacher_logits, labels, student_entropy)
        per_row = (
            divergence,
            cross_entropy,
            statistics.teacher_agreement,
            statistics.student_entropy,
            statistics.teacher_entropy,
            statistics.token_accuracy,
        )
    if not compute_grad:
        return per_row, None
    if grad is None:  # both loss weights are zero
        grad = torch.zeros_like(student_logits)
    return per_row, spec.student_transform.grad_to_raw_(grad, student_logits)


def _walk_tiles(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    spec: _LossSpec,
    needs_grad: tuple[bool, bool, bool],
    row_grad_weights: torch.Tensor | None,
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...]]:
    """Run every tile; return the per-row ``(divergence[, ce, agreement])`` and the gradients.

    ``needs_grad`` says which of the student's (hidden, weight, bias) need a gradient; they are the
    gradients of ``sum_i r_i * loss_i`` with ``r = row_grad_weights`` (1 if None), for the whole
    ``(V_head, H)`` weight (zero in rows from ``vocab_size`` on), in fp32 or wider.
    """
    # The GEMM dtypes were fixed by the caller (``spec``): autocast must not re-decide them, and
    # the recomputation in backward runs outside the caller's autocast region anyway.
    with torch.no_grad(), torch.autocast(student_hidden.device.type, enabled=False):
        return _walk_tiles_impl(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
            teacher_bias, labels, spec, needs_grad, row_grad_weights,
        )  # fmt: skip


def _walk_tiles_impl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    spec: _LossSpec,
    needs_grad: tuple[bool, bool, bool],
    row_grad_weights: torch.Tensor | None,
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...]]:
    vocab = spec.vocab_size
    # A head in another dtype than its GEMM (autocast, fp32 master weights) is cast once here.
    teacher_head = teacher_weight[:vocab].to(spec.teacher_dtype)
    teacher_head_bias = None if teacher_bias is None else teacher_bias[:vocab]
    # fp32 logits for 16-bit and fp32 models, float64 for float64 (as the logits-based path does).
    work_dtype = torch.promote_types(
        torch.promote_types(spec.student_dtype, spec.teacher_dtype), torch.float32
    )
    teacher_buffer = torch.empty(
        (min(spec.chunk_size, student_hidden.shape[0]), vocab),
        dtype=work_dtype,
        device=student_hidden.device,
    )

    def teacher_of_chunk(rows: slice) -> TileEvaluator:
        teacher_logits = spec.teacher_transform.apply_(
            _project_into(
                teacher_buffer[: rows.stop - rows.start],
                teacher_hidden[rows].to(spec.teacher_dtype),
                teacher_head,
                teacher_head_bias,
            )
        )

        def evaluate(student_logits, part, absolute, compute_grad):
            return _divergence_tile(
                student_logits,
                teacher_logits[part],
                None if labels is None else labels[absolute],
                spec,
                compute_grad,
            )

        return evaluate

    return walk_student_tiles(
        student_hidden, student_weight, student_bias, spec, needs_grad, row_grad_weights,
        work_dtype, teacher_of_chunk,
    )  # fmt: skip


# The teacher's side of one chunk of rows: ``(student_logits, part, absolute, compute_grad) ->
# (per_row, grad)`` for a sub-tile, given its transformed student logits ``(m, V)``, its rows
# within the chunk (``part``) and in the whole input (``absolute``). ``per_row`` are the sub-tile's
# values ``(m,)`` in ``_PER_ROW_FIELDS`` order (only the divergence without labels); ``grad``
# (``compute_grad`` only) is the loss gradient with respect to the student's raw logits ``(m, V)``.
TileEvaluator = Callable[
    [torch.Tensor, slice, slice, bool], tuple[tuple[torch.Tensor, ...], torch.Tensor | None]
]


def walk_student_tiles(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    spec: Any,
    needs_grad: tuple[bool, bool, bool],
    row_grad_weights: torch.Tensor | None,
    work_dtype: torch.dtype,
    teacher_of_chunk: Callable[[slice], TileEvaluator],
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...]]:
    """The tile loop of the fused kernels, whatever the teacher (live here, cached in
    :mod:`~abkd_trainer.divergences.coarsened`).

    Projects ``spec.chunk_size`` rows of the student at a time into one ``work_dtype`` buffer,
    asks ``teacher_of_chunk(rows)`` for the evaluator of those rows, evaluates sub-tiles of
    ``spec.pointwise_rows`` rows with it, and turns the logit gradients into those of the
    student's (hidden, weight, bias) that ``needs_grad`` selects: the gradients of
    ``sum_i r_i * loss_i`` with ``r = row_grad_weights`` (1 if None), for the whole ``(V_head, H)``
    weight (zero in rows from ``vocab_size`` on), in fp32 or wider. ``spec`` carries
    ``vocab_size``, ``chunk_size``, ``pointwise_rows``, ``with_labels``, ``student_dtype`` and
    ``student_transform``. Call it under ``torch.no_grad()`` with autocast disabled.

    Returns the per-row values ``(n,)`` in ``_PER_ROW_FIELDS`` order (only the divergence without
    labels) and the three gradients (None where not needed).
    """
    vocab = spec.vocab_size
    # Row slices of the real vocabulary are views (no copy): padded rows never enter the softmax.
    head = student_weight[:vocab].to(spec.student_dtype)
    head_bias = None if student_bias is None else student_bias[:vocab]
    num_rows = student_hidden.shape[0]
    device = student_hidden.device
    num_fields = len(_PER_ROW_FIELDS) if spec.with_labels else 1
    per_row = torch.zeros((num_fields, num_rows), dtype=work_dtype, device=device)
    compute_grad = any(needs_grad)
    grad_hidden, grad_weight, grad_bias = (
        torch.zeros(t.shape, dtype=_accumulator_dtype(t.dtype), device=device) if needed else None
        for t, needed in zip(
            (student_hidden, student_weight, student_bias), needs_grad, strict=True
        )
    )
    buffer = torch.empty((min(spec.chunk_size, num_rows), vocab), dtype=work_dtype, device=device)
    for rows in _tiles(num_rows, spec.chunk_size):
        count = rows.stop - rows.start
        hidden_tile = student_hidden[rows].to(spec.student_dtype)
        logits = spec.student_transform.apply_(
            _project_into(buffer[:count], hidden_tile, head, head_bias)
        )
        evaluate = teacher_of_chunk(rows)
        for part in _tiles(count, spec.pointwise_rows):
            absolute = slice(rows.start + part.start, rows.start + part.stop)
            part_values, part_grad = evaluate(logits[part], part, absolute, compute_grad)
            for values, part_value in zip(per_row, part_values, strict=True):
                values[absolute] = part_value
            if part_grad is not None:
                # These logits are spent: their rows of the buffer now hold the gradient.
                logits[part] = part_grad
        if not compute_grad:
            continue
        if row_grad_weights is not None:
            logits.mul_(row_grad_weights[rows].unsqueeze(-1).to(logits.dtype))
        if grad_hidden is not None:
            # One GEMM, in the forward GEMM's dtype, spans the whole vocabulary of these rows:
            # there is no sum across tiles to round.
            grad_hidden[rows] = torch.mm(logits.to(spec.student_dtype), head)
        if grad_weight is not None:
            _add_product_(grad_weight[:vocab], logits.t(), hidden_tile, spec.student_dtype)
        if grad_bias is not None:
            grad_bias[:vocab] += logits.sum(dim=0).to(grad_bias.dtype)

    return tuple(per_row.unbind()), (grad_hidden, grad_weight, grad_bias)


def _split_outputs(
    per_row: tuple[torch.Tensor, ...], spec: _LossSpec
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``(row_loss, details)``: the per-row training loss ``(n,)`` and the detached per-row
    values in ``_PER_ROW_FIELDS`` order (empty without labels, where the loss *is* the
    divergence)."""
    if not spec.with_labels:
        return per_row[0], ()
    divergence, cross_entropy = per_row[:2]
    return spec.divergence_weight * divergence + spec.ce_weight * cross_entropy, per_row


class _FusedLinearSumFunction(torch.autograd.Function):
    """Scalar ``sum_i loss_i`` over rows, gradients built during forward (scalar reductions)."""

    @staticmethod
    def forward(
        ctx,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        student_bias: torch.Tensor | None,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        teacher_bias: torch.Tensor | None,
        labels: torch.Tensor | None,
        spec: _LossSpec,
    ) -> tuple[torch.Tensor, ...]:
        needs_grad = tuple(ctx.needs_input_grad[:3])
        per_row, grads = _walk_tiles(
            student_hidden,
            student_weight,
            student_bias,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            labels,
            spec,
            needs_grad,
            row_grad_weights=None,
        )
        ctx.save_for_backward(*grads)
        ctx.input_dtypes = (
            student_hidden.dtype,
            student_weight.dtype,
            None if student_bias is None else student_bias.dtype,
        )
        row_loss, details = _split_outputs(per_row, spec)
        ctx.mark_non_differentiable(*details)
        return (row_loss.sum(), *details)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor | None, *_unused: torch.Tensor):
        grads = []
        for stored, dtype in zip(ctx.saved_tensors, ctx.input_dtypes, strict=True):
            if stored is None or grad_loss is None:
                grads.append(None)
                continue
            scale = grad_loss.to(stored.dtype)
            # In place unless the graph is kept for another backward (retain_graph, gradcheck):
            # then what forward stored must survive this pass.
            grad = stored * scale if backward_keeps_graph() else stored.mul_(scale)
            grads.append(grad.to(dtype))
        return (*grads, None, None, None, None, None)


class _FusedLinearRowsFunction(torch.autograd.Function):
    """Per-row losses ``(n,)``; backward re-projects the chunks (``reduction="none"``)."""

    @staticmethod
    def forward(
        ctx,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        student_bias: torch.Tensor | None,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        teacher_bias: torch.Tensor | None,
        labels: torch.Tensor | None,
        spec: _LossSpec,
    ) -> tuple[torch.Tensor, ...]:
        per_row, _ = _walk_tiles(
            student_hidden,
            student_weight,
            student_bias,
            teacher_hidden,
            teacher_weight,
            teacher_bias,
            labels,
            spec,
            needs_grad=(False, False, False),
            row_grad_weights=None,
        )
        ctx.save_for_backward(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
            teacher_bias, labels,
        )  # fmt: skip
        ctx.spec = spec
        row_loss, details = _split_outputs(per_row, spec)
        ctx.mark_non_differentiable(*details)
        return (row_loss, *details)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor | None, *_unused: torch.Tensor):
        if grad_rows is None:
            return (None,) * 8
        saved = ctx.saved_tensors
        _, (grad_hidden, grad_weight, grad_bias) = _walk_tiles(
            *saved, ctx.spec, needs_grad=tuple(ctx.needs_input_grad[:3]), row_grad_weights=grad_rows
        )
        student_hidden, student_weight, student_bias = saved[:3]
        return (
            None if grad_hidden is None else grad_hidden.to(student_hidden.dtype),
            None if grad_weight is None else grad_weight.to(student_weight.dtype),
            None if grad_bias is None else grad_bias.to(student_bias.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def _validate_head(
    who: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise TypeError(
            f"The {who}'s hidden states and head weight must be floating point, got "
            f"{hidden.dtype} and {weight.dtype}."
        )
    if hidden.dim() < 1 or weight.dim() != 2:
        raise ValueError(
            f"The {who}'s head weight must be 2-D (vocab, hidden) and its hidden states (..., "
            f"hidden); got {tuple(weight.shape)} and {tuple(hidden.shape)}."
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"The {who}'s hidden states have width {hidden.shape[-1]} but its head weight "
            f"{tuple(weight.shape)} expects {weight.shape[1]}: pass the final hidden states "
            "(after the last norm) and `lm_head.weight` of the same model."
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"The {who}'s head bias has shape {tuple(bias.shape)}; expected ({weight.shape[0]},)."
        )


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


def _resolve_divergence(
    divergence: str | PointwiseDivergence, divergence_params: Mapping[str, float] | None
) -> PointwiseDivergence:
    if isinstance(divergence, str):
        return make_divergence(divergence, **dict(divergence_params or {}))
    if divergence_params:
        raise ValueError(
            "`divergence_params` only applies to a divergence given by name; the divergence "
            f"object {divergence!r} is already parametrised."
        )
    if not callable(getattr(divergence, "terms_and_weights", None)):
        raise TypeError(
            "`divergence` must be a name from DIVERGENCE_NAMES or an object with a "
            f"`terms_and_weights` method, got {divergence!r}."
        )
    return divergence


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

    Computes the same values as the logits-based functions (e.g. ``get_divergence(name)(logits_s,
    logits_t, ...)``) on ``logits = transform(hidden @ weight.T + bias)[..., :vocab_size]``,
    without building either ``(N, V)`` logits tensor. Gradients reach the student's hidden states,
    head weight and bias; the teacher is a constant target.

    Args:
        student_hidden: ``(..., H_s)`` final hidden states of the student (any float dtype).
        student_weight: ``(V_s, H_s)`` the student's ``lm_head.weight``.
        teacher_hidden: ``(..., H_t)`` the teacher's, at the same positions; ``H_t`` may differ.
        teacher_weight: ``(V_t, H_t)`` the teacher's ``lm_head.weight``.
        divergence: a name from ``DIVERGENCE_NAMES`` (``"ab"``, ``"fkl"``, ``"jsd"``, ...) or a
            :class:`~abkd_trainer.divergences.pointwise.PointwiseDivergence`.
        divergence_params: parameters of a divergence given by name, e.g. ``{"alpha": 0.2,
            "beta": 0.7}`` for ``"ab"``.
        temperature: divides both transformed logit sets before the softmax; the result is not
            multiplied by ``T**2``. The cross-entropy always uses temperature 1.
        mask: ``(...)`` bool, True at the positions that count; only those rows are projected.
            Defaults to ``labels != -100`` when ``labels`` are given, else to every position.
        reduction: ``"none"`` (per position, 0 where masked out), ``"sum"`` or ``"mean"`` over
            counted positions (0.0 with a connected graph when there are none).
        student_bias, teacher_bias: ``(V_s,)`` / ``(V_t,)`` head biases, if the heads have them.
        student_logit_scale, teacher_logit_scale: multiply the raw logits (``config.logit_scale``).
        student_logit_softcap, teacher_logit_softcap: ``c * tanh(logits / c)`` after the scale
            (``config.final_logit_softcapping``); None disables it.
        vocab_size: the tokenizer's vocabulary; head rows from it on (padding) are ignored. Required
            when the heads have different row counts.
        labels: ``(...)`` int64 next-token targets. When given, the function returns a
            :class:`FusedLinearDistillationOutput` with the cross-entropy, top-1 agreement, token
            accuracy and both entropies, computed in the same pass; counted positions must hold a
            target in ``[0, vocab_size)``.
        divergence_weight, ce_weight: the output's ``loss`` is ``divergence_weight * divergence +
            ce_weight * cross_entropy`` (``labels`` only; e.g. ``kd_ratio`` and ``1 - kd_ratio``).
        chunk_size: tokens per projection tile (two fp32 ``(chunk_size, V)`` buffers); None picks
            ``default_fused_chunk_size(V, device)``.

    Returns:
        Without ``labels``: the fp32 divergence in nats (shape ``(...)`` for ``reduction="none"``,
        else a scalar). With ``labels``: a :class:`FusedLinearDistillationOutput`.

    Scalar reductions build the gradients during the forward pass and keep them until backward
    (one fp32 copy of the student's head weight); ``"none"`` recomputes in backward instead, which
    then needs the head weights still materialised (under DeepSpeed ZeRO-3: gathered again).
    """
    spec_divergence = _resolve_divergence(divergence, divergence_params)
    _validate_head("student", student_hidden, student_weight, student_bias)
    _validate_head("teacher", teacher_hidden, teacher_weight, teacher_bias)
    position_shape = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != position_shape:
        raise ValueError(
            f"Student hidden states {tuple(student_hidden.shape)} and teacher hidden states "
            f"{tuple(teacher_hidden.shape)} must cover the same positions (all but the last dim)."
        )
    vocab = _resolve_vocab_size(student_weight, teacher_weight, vocab_size)
    if not (isinstance(temperature, (int, float)) and 0.0 < float(temperature) < math.inf):
        raise ValueError(f"`temperature` must be a positive finite number, got {temperature}.")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {_REDUCTIONS}, got {reduction!r}.")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"`chunk_size` must be a positive integer or None, got {chunk_size!r}.")
    for name, value in (("divergence_weight", divergence_weight), ("ce_weight", ce_weight)):
        if not math.isfinite(float(value)):
            raise ValueError(f"`{name}` must be finite, got {value}.")
    if labels is None and (divergence_weight != 1.0 or ce_weight != 0.0):
        raise ValueError(
            "`divergence_weight` and `ce_weight` weight the divergence against the cross-entropy "
            "on `labels`; pass `labels` (or scale the returned divergence yourself)."
        )
    for name, tensor in (("mask", mask), ("labels", labels)):
        if tensor is not None and tuple(tensor.shape) != tuple(position_shape):
            raise ValueError(
                f"`{name}` has shape {tuple(tensor.shape)} but must match the hidden states "
                f"without their last dimension, {tuple(position_shape)}."
            )
    if labels is not None and (labels.is_floating_point() or labels.is_complex()):
        raise TypeError(f"`labels` must hold integer token ids, got {labels.dtype}.")

    student_2d = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher_2d = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    labels_1d = None if labels is None else labels.reshape(-1).to(student_hidden.device)
    if mask is None and labels_1d is not None:
        mask = labels_1d != IGNORE_INDEX
    rows = None
    if mask is not None:
        rows = mask.reshape(-1).to(device=student_hidden.device, dtype=torch.bool).nonzero()
        rows = rows.squeeze(-1)
        # Compact the counted rows (hidden-state sized, small); autograd scatters the gradient back.
        student_2d = student_2d.index_select(0, rows)
        teacher_2d = teacher_2d.index_select(0, rows)
        labels_1d = None if labels_1d is None else labels_1d.index_select(0, rows)
    if labels_1d is not None and bool(((labels_1d < 0) | (labels_1d >= vocab)).any()):
        raise ValueError(
            f"`labels` at counted positions must lie in [0, {vocab}); mark unsupervised positions "
            f"with {IGNORE_INDEX} (or exclude them with `mask`)."
        )

    spec = _LossSpec(
        divergence=spec_divergence,
        temperature=float(temperature),
        student_transform=LogitTransform(student_logit_scale, student_logit_softcap),
        teacher_transform=LogitTransform(teacher_logit_scale, teacher_logit_softcap),
        vocab_size=vocab,
        chunk_size=chunk_size or default_fused_chunk_size(vocab, student_hidden.device),
        pointwise_rows=_pointwise_rows(vocab, student_hidden.device),
        with_labels=labels_1d is not None,
        divergence_weight=float(divergence_weight),
        ce_weight=float(ce_weight),
        student_dtype=_gemm_dtype(student_hidden),
        teacher_dtype=_gemm_dtype(teacher_hidden),
    )
    inputs = (
        student_2d,
        student_weight,
        student_bias,
        teacher_2d,
        teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        labels_1d,
        spec,
    )
    student_params = (student_2d, student_weight, student_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in student_params):
        function = _FusedLinearRowsFunction if reduction == "none" else _FusedLinearSumFunction
        loss, *per_row = function.apply(*inputs)
    else:
        # Evaluation: autograd.Function would still report `needs_input_grad` under no_grad and
        # build gradients nobody reads; compute the values alone.
        per_row, _ = _walk_tiles(*inputs, needs_grad=(False, False, False), row_grad_weights=None)
        row_loss, per_row = _split_outputs(per_row, spec)
        loss = row_loss if reduction == "none" else row_loss.sum()

    num_rows = student_2d.shape[0]
    count = torch.tensor(num_rows, dtype=torch.int64, device=student_hidden.device)

    def reduce(values: torch.Tensor, already_summed: bool = False) -> torch.Tensor:
        if reduction == "none":
            if rows is None:
                return values.reshape(position_shape)
            full = values.new_zeros(math.prod(position_shape))
            return full.index_copy(0, rows, values).reshape(position_shape)
        total = values if already_summed else values.sum()
        if reduction == "sum":
            return total
        return total / count.clamp_min(1).to(total.dtype)

    reduced_loss = reduce(loss, already_summed=reduction != "none")
    if labels_1d is None:
        return reduced_loss
    return FusedLinearDistillationOutput(
        loss=reduced_loss,
        num_tokens=count,
        **{name: reduce(values) for name, values in zip(_PER_ROW_FIELDS, per_row, strict=True)},
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

    The values of :func:`~abkd_trainer.divergences.ab_divergence` on the materialised logits,
    exact and continuous in ``(alpha, beta)``; ``(1, 0)`` is forward KL, ``(0, 1)`` reverse KL.
    Shapes: hidden states ``(..., H_s)`` / ``(..., H_t)``, heads ``(V_s, H_s)`` / ``(V_t, H_t)``.
    See :func:`fused_linear_divergence` for the other arguments and the return value.
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
