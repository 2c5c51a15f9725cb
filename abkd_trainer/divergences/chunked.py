"""Memory-efficient driver: walks token chunks, produces the gradient in the forward pass.

A plain autograd implementation of any of these divergences keeps several fp32 `(N, V)`
temporaries alive until backward (softmaxes, powers, products). Here the forward pass visits
`chunk_size` tokens at a time, computes the per-token loss *and* the gradient with respect to the
student logits in fp32, and stores only that gradient (in the logits' dtype). Backward multiplies
it, in place, by the incoming per-token gradient. Extra memory: one gradient the size of the
student logits plus the fp32 work of one chunk.

Only the supervised positions (`mask`) are computed; the others get zero loss and zero gradient.
"""

from __future__ import annotations

import torch

from abkd_trainer.divergences.pointwise import LOG_PROB_FLOOR, PointwiseDivergence

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "default_chunk_size",
    "rowwise_loss_and_grad",
    "chunked_divergence",
    "backward_keeps_graph",
    "compute_dtype",
]

# fp32 values per (chunk, V) temporary. On CPU, 1 MiB temporaries stay cache-resident and keep
# the ~15 temporaries of a chunk far below one logits tensor (measured: extra memory 0.2x of the
# naive closed form at 2048 x 32000, and no slower than larger chunks). Accelerators need larger
# chunks to amortise kernel launches; 16 MiB temporaries are still small next to their logits.
DEFAULT_CHUNK_ELEMENTS = {"cpu": 2**18, "accelerator": 2**22}
_REDUCTIONS = ("none", "sum", "mean")


def default_chunk_size(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Tokens per chunk so that one fp32 `(chunk, V)` temporary holds the target number."""
    kind = "cpu" if torch.device(device).type == "cpu" else "accelerator"
    return max(1, DEFAULT_CHUNK_ELEMENTS[kind] // max(1, vocab_size))


def rowwise_loss_and_grad(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: PointwiseDivergence,
    temperature: float = 1.0,
    compute_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token divergence and its gradient for one chunk, in fp32 (float64 for float64 input).

    Args:
        student_logits: `(n, V)` raw student logits, any float dtype.
        teacher_logits: `(n, V)` raw teacher logits, any float dtype.
        divergence: a `PointwiseDivergence`.
        temperature: divides both logit sets before the softmax.
        compute_grad: if False, the gradient is skipped and `None` is returned in its place.

    Returns:
        `row_losses` `(n,)` and `grad_student_logits` `(n, V)` (d row_loss / d raw logits).
    """
    work_dtype = compute_dtype(student_logits.dtype)
    student = student_logits.to(work_dtype)
    teacher = teacher_logits.to(work_dtype)
    if temperature != 1.0:
        student = student / temperature
        teacher = teacher / temperature
    student_log_probs = torch.log_softmax(student, dim=-1)
    teacher_log_probs = torch.log_softmax(teacher, dim=-1)
    del student, teacher
    # Entries impossible under both models (banned tokens, -inf logits) contribute nothing; a
    # one-sided -inf is replaced by a finite floor, which gives every finite limit exactly.
    banned = torch.isneginf(student_log_probs) & torch.isneginf(teacher_log_probs)
    student_log_probs.clamp_(min=LOG_PROB_FLOOR)
    teacher_log_probs.clamp_(min=LOG_PROB_FLOOR)

    loss_terms, grad_weights = divergence.terms_and_weights(student_log_probs, teacher_log_probs)
    has_banned = bool(banned.any())
    if has_banned:
        loss_terms = loss_terms.masked_fill(banned, 0.0)
    row_losses = loss_terms.sum(dim=-1)
    if not compute_grad:
        return row_losses, None
    del loss_terms
    if has_banned:
        grad_weights = grad_weights.masked_fill(banned, 0.0)
    student_probs = student_log_probs.exp_()  # student_log_probs is not needed any more
    grad = grad_weights.sub_(student_probs * grad_weights.sum(dim=-1, keepdim=True))
    if temperature != 1.0:
        grad.div_(temperature)
    return row_losses, grad


class _ChunkedDivergenceFunction(torch.autograd.Function):
    """Per-token losses `(N,)` of `(N, V)` logits; the gradient is built during forward."""

    @staticmethod
    def forward(
        ctx,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        rows: torch.Tensor | None,
        divergence: PointwiseDivergence,
        temperature: float,
        chunk_size: int,
    ) -> torch.Tensor:
        num_tokens = student_logits.shape[0]
        needs_grad = ctx.needs_input_grad[0]
        row_losses = torch.zeros(
            num_tokens, dtype=compute_dtype(student_logits.dtype), device=student_logits.device
        )
        # fp16 cannot hold a token's unscaled gradient (it can exceed 65504 before the 1/N of a
        # mean is applied): store each row normalised to max |g| = 1 with its fp32 scale.
        ctx.row_scale = None
        if needs_grad and student_logits.dtype == torch.float16:
            ctx.row_scale = torch.ones(
                num_tokens, dtype=torch.float32, device=student_logits.device
            )
        grad = None
        if needs_grad:
            # Unselected rows must read as zero gradient; without a selection all rows are written.
            grad = (
                torch.empty_like(student_logits)
                if rows is None
                else torch.zeros_like(student_logits)
            )

        if rows is None:
            chunks = (
                (slice(start, start + chunk_size), None)
                for start in range(0, num_tokens, chunk_size)
            )
        else:
            chunks = ((None, index) for index in rows.split(chunk_size))
        for block, index in chunks:
            if index is None:
                student_chunk, teacher_chunk = student_logits[block], teacher_logits[block]
            else:
                student_chunk = student_logits.index_select(0, index)
                teacher_chunk = teacher_logits.index_select(0, index)
            chunk_losses, chunk_grad = rowwise_loss_and_grad(
                student_chunk, teacher_chunk, divergence, temperature, compute_grad=needs_grad
            )
            if ctx.row_scale is not None:
                chunk_scale = chunk_grad.abs().amax(dim=-1).clamp_min(1e-30)
                chunk_grad = chunk_grad / chunk_scale.unsqueeze(-1)
                if index is None:
                    ctx.row_scale[block] = chunk_scale
                else:
                    ctx.row_scale.index_copy_(0, index, chunk_scale)
            if index is None:
                row_losses[block] = chunk_losses
                if needs_grad:
                    grad[block] = chunk_grad
            else:
                row_losses.index_copy_(0, index, chunk_losses)
                if needs_grad:
                    grad.index_copy_(0, index, chunk_grad.to(grad.dtype))

        if needs_grad:
            ctx.save_for_backward(grad)
        return row_losses

    @staticmethod
    def backward(ctx, grad_row_losses: torch.Tensor):
        (grad,) = ctx.saved_tensors
        scale = grad_row_losses.unsqueeze(-1)
        if ctx.row_scale is not None:
            scale = scale * ctx.row_scale.unsqueeze(-1)
        scale = scale.to(grad.dtype)
        # In place, so backward allocates nothing: the stored gradient becomes the returned one.
        # Only when the graph is kept (retain_graph, gradcheck) is the stored gradient needed again.
        if backward_keeps_graph():
            return grad * scale, None, None, None, None, None
        return grad.mul_(scale), None, None, None, None, None


def backward_keeps_graph() -> bool:
    """Whether the running backward keeps the graph (`retain_graph=True`) for another pass."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    # Without the query (other torch versions), stay correct at the cost of one extra gradient.
    return True if keep_graph is None else bool(keep_graph())


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision and fp32 logits, float64 for float64 logits."""
    return torch.promote_types(dtype, torch.float32)


def _validate(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    mask: torch.Tensor | None,
    reduction: str,
    chunk_size: int | None,
) -> None:
    if not (student_logits.is_floating_point() and teacher_logits.is_floating_point()):
        raise TypeError(
            f"Logits must be floating point, got {student_logits.dtype} (student) and "
            f"{teacher_logits.dtype} (teacher)."
        )
    if student_logits.shape != teacher_logits.shape:
        hint = ""
        if student_logits.shape[:-1] == teacher_logits.shape[:-1]:
            hint = (
                " The vocabulary widths differ: slice both to the shared tokenizer's vocabulary "
                "(`logits[..., :len(tokenizer)]`) first."
            )
        raise ValueError(
            f"Student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} must have the same shape.{hint}"
        )
    if student_logits.dim() < 1 or student_logits.shape[-1] == 0:
        raise ValueError("Logits need a non-empty last (vocabulary) dimension.")
    if not (isinstance(temperature, (int, float)) and 0.0 < float(temperature) < float("inf")):
        raise ValueError(f"`temperature` must be a positive finite number, got {temperature}.")
    if mask is not None and tuple(mask.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(
            f"`mask` has shape {tuple(mask.shape)} but must match the logits without their "
            f"vocabulary dimension, {tuple(student_logits.shape[:-1])}."
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {_REDUCTIONS}, got {reduction!r}.")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be a positive integer or None, got {chunk_size!r}.")


def chunked_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: PointwiseDivergence,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Reduce a pointwise divergence over token positions, chunk by chunk.

    Args:
        student_logits: `(..., V)`, any float dtype; receives the gradient.
        teacher_logits: `(..., V)`, same shape; treated as a constant target (no gradient).
        divergence: the per-entry terms, e.g. `ABDivergence(alpha=0.2, beta=0.7)`.
        temperature: divides both logit sets; the result is *not* multiplied by `T**2`.
        mask: `(...)` bool, True at positions that count; None counts every position.
        reduction: `"none"` -> `(...)` per-position values (0 where masked out); `"sum"` ->
            scalar sum over counted positions; `"mean"` -> that sum divided by the number of
            counted positions (0.0, with the graph still connected, when there are none).
        chunk_size: tokens per chunk; None picks `default_chunk_size(V, device)`.

    Returns:
        fp32 tensor (float64 for float64 logits), in nats.
    """
    _validate(student_logits, teacher_logits, temperature, mask, reduction, chunk_size)
    position_shape = student_logits.shape[:-1]
    vocab_size = student_logits.shape[-1]
    student_2d = student_logits.reshape(-1, vocab_size)
    teacher_2d = teacher_logits.detach().reshape(-1, vocab_size)
    rows = None
    if mask is not None:
        flat_mask = mask.reshape(-1).to(device=student_logits.device, dtype=torch.bool)
        rows = flat_mask.nonzero().squeeze(-1)
        if rows.numel() == flat_mask.numel():
            rows = None  # every position counts: contiguous slices, no gathers
    chunk_size = chunk_size or default_chunk_size(vocab_size, student_logits.device)

    row_losses = _ChunkedDivergenceFunction.apply(
        student_2d, teacher_2d, rows, divergence, float(temperature), chunk_size
    )
    if reduction == "none":
        return row_losses.reshape(position_shape)
    total = row_losses.sum()
    if reduction == "sum":
        return total
    count = row_losses.new_tensor(float(row_losses.numel() if rows is None else rows.numel()))
    return total / count.clamp_min(1.0)
