"""An LM head as the fused kernels compute it: hidden states to logits, one tile at a time.

What a model does between its final hidden states and the softmax, for code that projects the
hidden states itself instead of calling the model's head: the GEMM's dtype
([`gemm_dtype`][abkd_trainer.divergences.projection.gemm_dtype], autocast's or the hidden
states'), the projection into a preallocated fp32 buffer
([`project_into`][abkd_trainer.divergences.projection.project_into]), the model's logit
post-processing ([`LogitTransform`][abkd_trainer.divergences.projection.LogitTransform]), the
checks of a head's shapes, and the rows per projection tile. The fused kernels
(`abkd_trainer.divergences.fused_tiles`) and the teacher cache's writer use them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "ACCELERATOR_PROJECTION_ELEMENTS",
    "CPU_PROJECTION_ELEMENTS",
    "MIN_PROJECTION_ROWS",
    "LogitTransform",
    "default_fused_chunk_size",
    "gemm_dtype",
    "project_into",
    "validate_head",
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


def default_fused_chunk_size(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Tokens per projection tile on `device`: `CPU_PROJECTION_ELEMENTS // vocab_size` on CPU,
    `ACCELERATOR_PROJECTION_ELEMENTS // vocab_size` elsewhere, at least `MIN_PROJECTION_ROWS`.
    """
    elements = (
        CPU_PROJECTION_ELEMENTS
        if torch.device(device).type == "cpu"
        else ACCELERATOR_PROJECTION_ELEMENTS
    )
    return max(MIN_PROJECTION_ROWS, elements // max(1, vocab_size))


@dataclass(frozen=True)
class LogitTransform:
    """What a model does to `hidden @ weight.T + bias` before its softmax.

    `logits = softcap * tanh(scale * raw / softcap)` with soft-capping (Gemma 2/3
    `final_logit_softcapping`), `scale * raw` without (Cohere `logit_scale`; 1.0 for most
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
        """What a transformers model of this `config` does to its LM head's output.

        Reads the attributes transformers' causal LMs apply after `lm_head` (the same list TRL's
        fused heads read): `logit_scale` (Cohere), `output_multiplier`, `lm_head_multiplier`
        (Falcon-H1), `logits_scaling` (Granite, MiniCPM3 divide by it; HyperCLOVA X multiplies)
        and `final_logit_softcapping` (Gemma 2/3). Multimodal configs are read through
        `get_text_config()`.
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
        """Transform `raw_logits` `(n, V)` in place and return it."""
        if self.softcap is not None:
            return raw_logits.mul_(self.scale / self.softcap).tanh_().mul_(self.softcap)
        return raw_logits if self.scale == 1.0 else raw_logits.mul_(self.scale)

    def grad_to_raw_(self, grad: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Turn `grad` w.r.t. the transformed `logits` into the gradient w.r.t. the raw ones.

        With soft-capping, `d logits / d raw = scale * (1 - tanh^2)` and `tanh = logits /
        softcap`, so the derivative is read off the transformed logits; nothing else is kept.
        """
        if self.softcap is not None:
            one_minus_tanh_sq = logits.mul(1.0 / self.softcap).square_().neg_().add_(1.0)
            grad.mul_(one_minus_tanh_sq)
        return grad if self.scale == 1.0 else grad.mul_(self.scale)


def gemm_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype a model's LM head would run its GEMM in: autocast's, else the hidden states'."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def project_into(
    out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Write the raw logits `hidden @ weight.T + bias` `(n, V)` into `out` (fp32 or wider).

    Args:
        out: `(n, V)` the buffer to write, fp32 or float64.
        hidden: `(n, H)` hidden states in the GEMM's dtype.
        weight: `(V, H)` the head's rows to project on, in the GEMM's dtype.
        bias: `(V,)` or None.

    Returns:
        `out`. On CUDA a 16-bit GEMM writes fp32 directly, so the logits are never rounded to 16
        bits; elsewhere the product is formed in the inputs' dtype and copied.
    """
    if hidden.dtype == out.dtype:
        torch.mm(hidden, weight.t(), out=out)
    elif out.device.type == "cuda":
        torch.mm(hidden, weight.t(), out_dtype=out.dtype, out=out)
    else:
        out.copy_(torch.mm(hidden, weight.t()))
    if bias is not None:
        out.add_(bias)
    return out


def validate_head(
    who: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """Check a model's final hidden states `(..., H)`, head weight `(V, H)` and bias `(V,)`.

    Raises:
        TypeError: non-floating-point tensors. ValueError: shapes that do not fit, naming `who`.
    """
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
