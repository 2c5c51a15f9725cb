"""The tile engine of the fused distillation kernels: losses from hidden states and an LM head.

At today's vocabularies (Llama-3 128256, Qwen2.5 151936, Gemma 256000) the teacher's and the
student's logits, not the weights, are what runs out of memory. The fused kernels take the
student's final hidden states and LM-head weight instead and walk the counted tokens in two
nested tile sizes; this module owns that walk for every teacher:

* a **projection tile** of `chunk_size` rows: one GEMM writes the student's raw logits
  (`hidden @ weight.T + bias`) into a preallocated fp32 `(chunk_size, V)` buffer and the model's
  logit post-processing ([`LogitTransform`][abkd_trainer.divergences.projection.LogitTransform])
  is applied in place (the head's primitives are in `abkd_trainer.divergences.projection`, the
  argument checks and counted rows in `abkd_trainer.divergences.fused_inputs`); the teacher is
  then asked for the same rows
  ([`FusedTeacher.chunk_reader`][abkd_trainer.divergences.fused_tiles.FusedTeacher.chunk_reader]);
* **divergence tiles** of a few rows inside it (on CPU ~1 MiB of fp32 per thread): the teacher
  gives each tile's divergence and its gradient with respect to the student's logits
  ([`TeacherChunk`][abkd_trainer.divergences.fused_tiles.TeacherChunk]); the engine adds the
  optional cross-entropy on `labels` and the logged statistics (top-1 agreement, token accuracy,
  both entropies) from the same tile, and the gradient with respect to the raw logits overwrites
  the tile's logits in the buffer;
* back in the projection tile, two GEMMs fold that gradient into the student's hidden states and
  head weight (`g @ W`, `g.T @ h`) and a sum into its bias.

The teachers are the live one (its own hidden states and head, projected tile by tile:
`abkd_trainer.divergences.fused_linear`) and a cached top-k teacher
(`abkd_trainer.divergences.coarsened`); each only supplies its per-tile evaluation, as the
subclasses of Liger-Kernel's `LigerFusedLinearDistillationBase` supply only the per-chunk loss.

Why two sizes: the GEMMs want many rows (each projection tile re-reads the head weight), while the
divergence's ~40 elementwise passes want small, cache-resident temporaries. On CPU, fresh
multi-megabyte temporaries cost more in page faults than the arithmetic on them, so the small
divergence tiles run several times faster than large ones.

Scalar reductions (`"sum"`, `"mean"`) compute the gradients during the forward pass, like
Liger-Kernel, so the student's projection runs once and backward only rescales what forward
stored. `reduction="none"` cannot know the per-row output gradients in advance; it keeps the
inputs and recomputes the tiles in backward.

Extra memory: the fp32 `(chunk_size, V)` projection buffers (the student's, and the live
teacher's), the temporaries of one divergence tile, and one fp32 accumulator the size of the
student's head weight; never an `(N, V)` tensor.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch

from abkd_trainer.divergences.chunked import backward_keeps_graph
from abkd_trainer.divergences.fused_inputs import (
    CountedRows,
    FusedLossOptions,
    reduce_rows,
)
from abkd_trainer.divergences.pointwise import PointwiseDivergence
from abkd_trainer.divergences.projection import (
    LogitTransform,
    default_fused_chunk_size,
    gemm_dtype,
    project_into,
)
from abkd_trainer.divergences.statistics import TokenStatistics, log_probs_and_entropy

__all__ = [
    "ACCELERATOR_POINTWISE_ELEMENTS",
    "CPU_POINTWISE_ELEMENTS_PER_THREAD",
    "PER_ROW_FIELDS",
    "FusedLinearDistillationOutput",
    "FusedTeacher",
    "TeacherChunk",
    "TileSettings",
    "fused_tiles_loss",
    "pointwise_tile_rows",
    "walk_tiles",
]

# Values per divergence tile and CPU thread (1 MiB in fp32; 8 rows at V = 32000 on one thread): the
# tile's temporaries stay in cache and are recycled by the allocator, which on CPU made the
# divergence 3-4x faster than 128-row tiles whose fresh pages fault in on every operation.
CPU_POINTWISE_ELEMENTS_PER_THREAD = 2**18
# Accelerators pay per kernel launch instead: their divergence tiles are 32 MiB (in fp32).
ACCELERATOR_POINTWISE_ELEMENTS = 2**23


def pointwise_tile_rows(vocab_size: int, device: torch.device) -> int:
    """Rows per divergence tile (see `CPU_POINTWISE_ELEMENTS_PER_THREAD`)."""
    if device.type == "cpu":
        elements = CPU_POINTWISE_ELEMENTS_PER_THREAD * torch.get_num_threads()
    else:
        elements = ACCELERATOR_POINTWISE_ELEMENTS
    return max(1, elements // max(1, vocab_size))


class FusedLinearDistillationOutput(NamedTuple):
    """What the fused kernels return when given `labels`; each value uses `reduction`.

    Attributes:
        loss: `divergence_weight * divergence + ce_weight * cross_entropy`, the only field that
            carries a gradient.
        divergence: the divergence, detached.
        cross_entropy: the student's cross-entropy on `labels` (temperature 1, after the logit
            transform), detached.
        teacher_agreement: 1.0 where the student's and the teacher's top-1 tokens agree, detached
            (`"mean"`: the agreement rate; `"sum"`: the number of agreeing tokens).
        num_tokens: number of counted (mask-true) positions, an int64 scalar.
        student_entropy: entropy in nats of the student's next-token distribution at
            temperature 1 (after the logit transform, over `vocab_size`), detached. NaN where its
            logits are not finite.
        teacher_entropy: the same for the teacher (of its coarsened distribution for a cache).
        token_accuracy: 1.0 where the student's top-1 token is the label, detached.

    See `abkd_trainer.divergences.statistics` for the definitions.
    """

    loss: torch.Tensor
    divergence: torch.Tensor
    cross_entropy: torch.Tensor
    teacher_agreement: torch.Tensor
    num_tokens: torch.Tensor
    student_entropy: torch.Tensor
    teacher_entropy: torch.Tensor
    token_accuracy: torch.Tensor


# Per-row values the tile walk returns with labels, in this order (all but the loss detached).
PER_ROW_FIELDS = (
    "divergence",
    "cross_entropy",
    "teacher_agreement",
    "student_entropy",
    "teacher_entropy",
    "token_accuracy",
)


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    # Sums over tiles are kept in at least fp32: rounding each tile's product to 16 bits before
    # adding biases the weight gradient.
    return torch.promote_types(dtype, torch.float32)


def _add_product_(
    accumulator: torch.Tensor, left: torch.Tensor, right: torch.Tensor, gemm_dtype: torch.dtype
) -> None:
    """`accumulator += left @ right` with the sum kept in the accumulator's (fp32+) dtype.

    On CUDA a 16-bit model's GEMM runs in `gemm_dtype` with fp32 accumulation and output;
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


def _tiles(num_rows: int, tile_rows: int) -> Iterator[slice]:
    for start in range(0, num_rows, tile_rows):
        yield slice(start, min(start + tile_rows, num_rows))


# ----------------------------------------------------------------------------- the teacher's side


class TeacherChunk(ABC):
    """The teacher at the rows of one projection tile, evaluated a divergence tile at a time.

    `part` is a divergence tile's slice of rows within the projection tile; `student_logits` are
    the student's transformed logits there, `(m, V)` in the work dtype (fp32, or float64).
    """

    @abstractmethod
    def divergence_and_grad(
        self,
        student_logits: torch.Tensor,
        part: slice,
        divergence: PointwiseDivergence,
        temperature: float,
        compute_grad: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(m,)` divergence per row and, if `compute_grad`, its gradient `(m, V)` with respect
        to `student_logits` (None otherwise). `student_logits` must not be modified."""

    @abstractmethod
    def statistics(
        self,
        student_logits: torch.Tensor,
        part: slice,
        labels: torch.Tensor,
        student_entropy: torch.Tensor,
    ) -> TokenStatistics:
        """Per-row `TokenStatistics` `(m,)` of these rows against this teacher (`labels` and
        `student_entropy` are the tile's, `(m,)`)."""


class FusedTeacher(ABC):
    """The teacher's side of a fused kernel, at the counted rows of the input.

    Subclasses supply the per-tile evaluation only; the engine
    ([`fused_tiles_loss`][abkd_trainer.divergences.fused_tiles.fused_tiles_loss]) owns the walk,
    the student's projection, the cross-entropy, the gradients and the reductions.
    """

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype:
        """The dtype of the teacher's values; the work buffers are at least this and fp32."""

    @abstractmethod
    def chunk_reader(
        self, settings: TileSettings, num_rows: int
    ) -> Callable[[slice], TeacherChunk]:
        """Called once per walk over the `num_rows` counted rows (forward, and the recomputing
        backward of `reduction="none"`): returns `rows -> TeacherChunk` for each projection tile
        `rows`. Buffers it allocates live as long as the walk."""


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class TileSettings:
    """Everything the tile walk needs besides tensors (one object, so autograd sees one arg).

    Attributes:
        divergence: the per-entry terms of the divergence.
        temperature: as in `FusedLossOptions`.
        student_transform: as in `FusedLossOptions`.
        vocab_size: head rows from this one on (padding) are ignored.
        chunk_size: rows per projection tile.
        pointwise_rows: rows per divergence tile.
        with_labels: whether the cross-entropy and statistics are computed.
        divergence_weight: as in `FusedLossOptions`.
        ce_weight: as in `FusedLossOptions`.
        student_dtype: the student's GEMM input dtype (the hidden states' or autocast's).
        work_dtype: the dtype of the logits and of the per-row values (fp32 or float64).
    """

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
    work_dtype: torch.dtype


# ----------------------------------------------------------------------------- the walk


def _cross_entropy_and_grad(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    divergence_grad: torch.Tensor | None,
    settings: TileSettings,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row CE and entropy `(n,)`, and `divergence_weight * divergence_grad + ce_weight * CE
    grad` (one softmax of the student serves all three)."""
    log_probs, probs, entropy = log_probs_and_entropy(student_logits)
    rows = torch.arange(labels.shape[0], device=labels.device)
    cross_entropy = -log_probs[rows, labels]
    if not compute_grad:
        return cross_entropy, entropy, None
    grad = divergence_grad
    if grad is not None and settings.divergence_weight != 1.0:
        grad.mul_(settings.divergence_weight)
    if settings.ce_weight != 0.0:
        # d CE / d z = softmax(z) - onehot(label)
        ce_grad = probs
        ce_grad[rows, labels] -= 1.0
        if grad is None:
            grad = ce_grad.mul_(settings.ce_weight)
        else:
            grad.add_(ce_grad, alpha=settings.ce_weight)
    return cross_entropy, entropy, grad


def _evaluate_tile(
    student_logits: torch.Tensor,
    teacher: TeacherChunk,
    part: slice,
    labels: torch.Tensor | None,
    settings: TileSettings,
    compute_grad: bool,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
    """Per-row results of a divergence tile of transformed student logits `(m, V)`.

    Returns the per-row values `(m,)` in `PER_ROW_FIELDS` order (only the divergence without
    labels) and, if `compute_grad`, the gradient of `divergence_weight * divergence + ce_weight *
    cross_entropy` with respect to the student's *raw* logits `(m, V)`.
    """
    divergence, grad = teacher.divergence_and_grad(
        student_logits,
        part,
        settings.divergence,
        settings.temperature,
        compute_grad and settings.divergence_weight != 0.0,
    )
    per_row: tuple[torch.Tensor, ...] = (divergence,)
    if settings.with_labels:
        cross_entropy, student_entropy, grad = _cross_entropy_and_grad(
            student_logits, labels, grad, settings, compute_grad
        )
        statistics = teacher.statistics(student_logits, part, labels, student_entropy)
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
    return per_row, settings.student_transform.grad_to_raw_(grad, student_logits)


def walk_tiles(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    teacher: FusedTeacher,
    settings: TileSettings,
    needs_grad: tuple[bool, bool, bool],
    row_grad_weights: torch.Tensor | None = None,
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...]]:
    """Run every tile of the counted rows against `teacher`.

    Args:
        student_hidden: `(n, H)` the student's hidden states at the counted rows.
        student_weight: `(V_head, H)` its head's weight.
        student_bias: `(V_head,)` its head's bias, or None.
        labels: `(n,)` targets, or None (`settings.with_labels` says which).
        teacher: the teacher at the same rows.
        settings: the tile sizes, dtypes and loss.
        needs_grad: which of the student's (hidden, weight, bias) need a gradient.
        row_grad_weights: `(n,)` weights `r` of the rows' losses; None: 1.

    Returns:
        The per-row values `(n,)` in `PER_ROW_FIELDS` order (only the divergence without labels),
        in `settings.work_dtype`, and the gradients of `sum_i r_i * loss_i` for the student's
        (hidden, weight, bias) that `needs_grad` selects (None elsewhere), for the whole
        `(V_head, H)` weight (zero in rows from `vocab_size` on), in fp32 or wider.
    """
    # The GEMM dtypes were fixed by the caller (`settings`): autocast must not re-decide them, and
    # the recomputation in backward runs outside the caller's autocast region anyway.
    with torch.no_grad(), torch.autocast(student_hidden.device.type, enabled=False):
        return _walk(
            student_hidden, student_weight, student_bias, labels, teacher, settings, needs_grad,
            row_grad_weights,
        )  # fmt: skip


def _walk(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    labels: torch.Tensor | None,
    teacher: FusedTeacher,
    settings: TileSettings,
    needs_grad: tuple[bool, bool, bool],
    row_grad_weights: torch.Tensor | None,
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...]]:
    vocab, work_dtype = settings.vocab_size, settings.work_dtype
    num_rows, device = student_hidden.shape[0], student_hidden.device
    read_chunk = teacher.chunk_reader(settings, num_rows)
    # Row slices of the real vocabulary are views (no copy): padded rows never enter the softmax.
    head = student_weight[:vocab].to(settings.student_dtype)
    head_bias = None if student_bias is None else student_bias[:vocab]
    num_fields = len(PER_ROW_FIELDS) if settings.with_labels else 1
    per_row = torch.zeros((num_fields, num_rows), dtype=work_dtype, device=device)
    compute_grad = any(needs_grad)
    grad_hidden, grad_weight, grad_bias = (
        torch.zeros(t.shape, dtype=_accumulator_dtype(t.dtype), device=device) if needed else None
        for t, needed in zip(
            (student_hidden, student_weight, student_bias), needs_grad, strict=True
        )
    )
    buffer = torch.empty(
        (min(settings.chunk_size, num_rows), vocab), dtype=work_dtype, device=device
    )
    for rows in _tiles(num_rows, settings.chunk_size):
        count = rows.stop - rows.start
        hidden_tile = student_hidden[rows].to(settings.student_dtype)
        logits = settings.student_transform.apply_(
            project_into(buffer[:count], hidden_tile, head, head_bias)
        )
        teacher_chunk = read_chunk(rows)
        for part in _tiles(count, settings.pointwise_rows):
            absolute = slice(rows.start + part.start, rows.start + part.stop)
            part_values, part_grad = _evaluate_tile(
                logits[part],
                teacher_chunk,
                part,
                None if labels is None else labels[absolute],
                settings,
                compute_grad,
            )
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
            grad_hidden[rows] = torch.mm(logits.to(settings.student_dtype), head)
        if grad_weight is not None:
            _add_product_(grad_weight[:vocab], logits.t(), hidden_tile, settings.student_dtype)
        if grad_bias is not None:
            grad_bias[:vocab] += logits.sum(dim=0).to(grad_bias.dtype)
    return tuple(per_row.unbind()), (grad_hidden, grad_weight, grad_bias)


def _split_outputs(
    per_row: tuple[torch.Tensor, ...], settings: TileSettings
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """`(row_loss, details)`: the per-row training loss `(n,)` and the detached per-row values in
    `PER_ROW_FIELDS` order (empty without labels, where the loss *is* the divergence)."""
    if not settings.with_labels:
        return per_row[0], ()
    divergence, cross_entropy = per_row[:2]
    return settings.divergence_weight * divergence + settings.ce_weight * cross_entropy, per_row


class _FusedTilesFunction(torch.autograd.Function):
    """The loss of the counted rows against a `FusedTeacher`, differentiable in the student.

    `summed` (scalar reductions): the summed loss, whose gradients are built during forward;
    otherwise the per-row losses, and backward walks the tiles again with the incoming row
    weights. The per-row values in `PER_ROW_FIELDS` order follow the loss (with labels only).
    """

    @staticmethod
    def forward(
        ctx,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        student_bias: torch.Tensor | None,
        labels: torch.Tensor | None,
        teacher: FusedTeacher,
        settings: TileSettings,
        summed: bool,
    ) -> tuple[torch.Tensor, ...]:
        needs_grad = tuple(ctx.needs_input_grad[:3]) if summed else (False, False, False)
        per_row, grads = walk_tiles(
            student_hidden, student_weight, student_bias, labels, teacher, settings, needs_grad
        )
        ctx.summed, ctx.teacher, ctx.settings = summed, teacher, settings
        ctx.input_dtypes = tuple(
            None if t is None else t.dtype for t in (student_hidden, student_weight, student_bias)
        )
        if summed:
            ctx.save_for_backward(*grads)
        else:
            ctx.save_for_backward(student_hidden, student_weight, student_bias, labels)
        row_loss, details = _split_outputs(per_row, settings)
        ctx.mark_non_differentiable(*details)
        return (row_loss.sum() if summed else row_loss, *details)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor | None, *_unused: torch.Tensor):
        nones = (None,) * 4
        if grad_loss is None:
            return (None, None, None, *nones)
        if ctx.summed:
            # In place unless the graph is kept for another backward (retain_graph, gradcheck):
            # then what forward stored must survive this pass.
            keep = backward_keeps_graph()
            grads = []
            for stored in ctx.saved_tensors:
                if stored is not None:
                    scale = grad_loss.to(stored.dtype)
                    stored = stored * scale if keep else stored.mul_(scale)
                grads.append(stored)
        else:
            hidden, weight, bias, labels = ctx.saved_tensors
            _, grads = walk_tiles(
                hidden, weight, bias, labels, ctx.teacher, ctx.settings,
                tuple(ctx.needs_input_grad[:3]), row_grad_weights=grad_loss,
            )  # fmt: skip
        grads = [
            None if grad is None else grad.to(dtype)
            for grad, dtype in zip(grads, ctx.input_dtypes, strict=True)
        ]
        return (*grads, *nones)


def fused_tiles_loss(
    counted: CountedRows,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher: FusedTeacher,
    divergence: PointwiseDivergence,
    options: FusedLossOptions,
    vocab_size: int,
) -> torch.Tensor | FusedLinearDistillationOutput:
    """The fused loss of the student's counted rows against `teacher` (the shared driver).

    Args:
        counted: the counted positions and the student's hidden states and labels there
            ([`count_rows`][abkd_trainer.divergences.fused_inputs.count_rows]).
        student_weight: `(V_head, H)` the student's head weight, `V_head >= vocab_size`.
        student_bias: `(V_head,)` or None.
        teacher: the teacher at the same counted rows.
        divergence: the per-entry terms of the divergence.
        options: temperature, reduction, logit transform, tile size and loss weights.
        vocab_size: the tokenizer's vocabulary; head rows from it on are ignored.

    Returns:
        Without labels: the divergence (fp32 or float64; `(...)` for `reduction="none"`, else a
        scalar). With labels: a `FusedLinearDistillationOutput`. Gradients reach the student's
        hidden states, head weight and bias, in their dtypes.
    """
    device = counted.hidden.device
    student_dtype = gemm_dtype(counted.hidden)
    settings = TileSettings(
        divergence=divergence,
        temperature=float(options.temperature),
        student_transform=options.student_transform,
        vocab_size=vocab_size,
        chunk_size=options.chunk_size or default_fused_chunk_size(vocab_size, device),
        pointwise_rows=pointwise_tile_rows(vocab_size, device),
        with_labels=counted.labels is not None,
        divergence_weight=float(options.divergence_weight),
        ce_weight=float(options.ce_weight),
        student_dtype=student_dtype,
        # fp32 logits for 16-bit and fp32 models, float64 for float64 (as the logits path does).
        work_dtype=torch.promote_types(
            torch.promote_types(student_dtype, teacher.dtype), torch.float32
        ),
    )
    inputs = (counted.hidden, student_weight, student_bias, counted.labels, teacher, settings)
    summed = options.reduction != "none"
    student_params = (counted.hidden, student_weight, student_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in student_params):
        loss, *details = _FusedTilesFunction.apply(*inputs, summed)
    else:
        # Evaluation: autograd.Function would still report `needs_input_grad` under no_grad and
        # build gradients nobody reads; compute the values alone.
        per_row, _ = walk_tiles(*inputs, needs_grad=(False, False, False))
        loss, details = _split_outputs(per_row, settings)
        loss = loss.sum() if summed else loss

    def reduce(values: torch.Tensor, summed: bool = False) -> torch.Tensor:
        return reduce_rows(
            values, counted.index, counted.position_shape, options.reduction, summed=summed
        )

    reduced_loss = reduce(loss, summed=summed)
    if counted.labels is None:
        return reduced_loss
    return FusedLinearDistillationOutput(
        loss=reduced_loss,
        num_tokens=torch.tensor(counted.num_rows, dtype=torch.int64, device=device),
        **{name: reduce(values) for name, values in zip(PER_ROW_FIELDS, details, strict=True)},
    )
