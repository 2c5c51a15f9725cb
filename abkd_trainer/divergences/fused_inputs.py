"""The arguments of the fused kernels: loss options, the counted positions, reductions.

Both fused kernels (live teacher: `abkd_trainer.divergences.fused_linear`; cached teacher:
`abkd_trainer.divergences.coarsened`) take the same options besides their teacher, check them the
same way, compute only the counted positions (`mask`, else `labels != -100`, else every
position) and reduce per-row values the same way; this module is that shared front.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from abkd_trainer.divergences.projection import LogitTransform

__all__ = [
    "IGNORE_INDEX",
    "REDUCTIONS",
    "CountedRows",
    "FusedLossOptions",
    "count_rows",
    "reduce_rows",
]

REDUCTIONS = ("none", "sum", "mean")
# Targets with this value are not counted (the `labels` convention of transformers).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class FusedLossOptions:
    """The arguments both fused kernels take besides tensors, checked on construction.

    Attributes:
        temperature: divides both sides' logits (or bucket log-probabilities) before the softmax;
            the result is not multiplied by `T**2`. The cross-entropy always uses temperature 1.
        reduction: `"none"` (per position, 0 where not counted), `"sum"` or `"mean"` over the
            counted positions.
        student_transform: the student's logit post-processing.
        chunk_size: rows per projection tile; None picks `default_fused_chunk_size(V, device)`.
        divergence_weight: the loss is `divergence_weight * divergence + ce_weight *
            cross_entropy` (with `labels` only).
        ce_weight: the weight of the cross-entropy in that loss.

    Raises:
        ValueError: a value out of range, naming the argument.
    """

    temperature: float = 1.0
    reduction: str = "mean"
    student_transform: LogitTransform = LogitTransform()
    chunk_size: int | None = None
    divergence_weight: float = 1.0
    ce_weight: float = 0.0

    def __post_init__(self) -> None:
        temperature = self.temperature
        if not (isinstance(temperature, (int, float)) and 0.0 < float(temperature) < math.inf):
            raise ValueError(f"`temperature` must be a positive finite number, got {temperature}.")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {self.reduction!r}.")
        chunk_size = self.chunk_size
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(
                f"`chunk_size` must be a positive integer or None, got {chunk_size!r}."
            )
        for name in ("divergence_weight", "ce_weight"):
            if not math.isfinite(float(getattr(self, name))):
                raise ValueError(f"`{name}` must be finite, got {getattr(self, name)}.")

    @property
    def weights_loss(self) -> bool:
        """Whether the loss weights differ from the divergence alone (which needs labels)."""
        return self.divergence_weight != 1.0 or self.ce_weight != 0.0


@dataclass(frozen=True)
class CountedRows:
    """The positions a fused kernel counts, and the student's inputs there.

    Attributes:
        position_shape: the input's positions (the hidden states' shape without its last dim).
        index: `(n,)` flat indices of the counted positions; None when every position counts.
        hidden: `(n, H)` the student's hidden states at the counted positions.
        labels: `(n,)` their targets, or None.
    """

    position_shape: torch.Size
    index: torch.Tensor | None
    hidden: torch.Tensor
    labels: torch.Tensor | None

    @property
    def num_rows(self) -> int:
        """The number of counted positions, `n`."""
        return self.hidden.shape[0]

    def select(self, per_position: torch.Tensor) -> torch.Tensor:
        """The counted rows `(n, ...)` of values `(N, ...)` given for every position."""
        return per_position if self.index is None else per_position.index_select(0, self.index)


def count_rows(
    student_hidden: torch.Tensor,
    mask: torch.Tensor | None,
    labels: torch.Tensor | None,
    vocab_size: int,
    options: FusedLossOptions,
) -> CountedRows:
    """Check `mask` and `labels` against the student's `(..., H)` hidden states and keep the
    counted rows: `mask`, else `labels != -100`, else every position.

    Raises:
        ValueError: shapes that do not match the positions, labels out of `[0, vocab_size)` at
            counted positions, or loss weights without labels. TypeError: float labels.
    """
    position_shape = student_hidden.shape[:-1]
    if labels is None and options.weights_loss:
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
    device = student_hidden.device
    hidden_2d = student_hidden.reshape(-1, student_hidden.shape[-1])
    labels_1d = None if labels is None else labels.reshape(-1).to(device)
    if mask is None and labels_1d is not None:
        mask = labels_1d != IGNORE_INDEX
    index = None
    if mask is not None:
        index = mask.reshape(-1).to(device=device, dtype=torch.bool).nonzero().squeeze(-1)
        # Compact the counted rows (hidden-state sized, small); autograd scatters the gradient back.
        hidden_2d = hidden_2d.index_select(0, index)
        labels_1d = None if labels_1d is None else labels_1d.index_select(0, index)
    if labels_1d is not None and bool(((labels_1d < 0) | (labels_1d >= vocab_size)).any()):
        raise ValueError(
            f"`labels` at counted positions must lie in [0, {vocab_size}); mark unsupervised "
            f"positions with {IGNORE_INDEX} (or exclude them with `mask`)."
        )
    return CountedRows(position_shape, index, hidden_2d, labels_1d)


def reduce_rows(
    values: torch.Tensor,
    index: torch.Tensor | None,
    position_shape: torch.Size,
    reduction: str,
    *,
    summed: bool = False,
) -> torch.Tensor:
    """Reduce per-row values `(n,)` of the counted positions `index` (None: all of them).

    `"none"` scatters them to `position_shape` (zeros elsewhere), `"sum"` adds them, `"mean"`
    divides that sum by `n` (by 1 when `n = 0`, giving 0 with the graph intact). `summed`: the
    values are already their sum (a scalar; not with `"none"`).
    """
    if reduction == "none":
        if index is None:
            return values.reshape(position_shape)
        full = values.new_zeros(math.prod(position_shape))
        return full.index_copy(0, index, values).reshape(position_shape)
    total = values if summed else values.sum()
    if reduction == "sum":
        return total
    num_rows = math.prod(position_shape) if index is None else index.numel()
    count = torch.tensor(num_rows, dtype=torch.int64, device=total.device)
    return total / count.clamp_min(1).to(total.dtype)
