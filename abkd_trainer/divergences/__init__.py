"""Divergences between teacher and student token distributions.

`pointwise` holds the per-vocabulary-entry math, `chunked` the memory-efficient driver over
logits, `functional` the public functions, `registry` the one map from names to them and to
their configuration fields. The fused kernels start from hidden states and LM heads and never
build the logits: `fused_tiles` is their tile engine (with `projection`, the head's primitives,
and `fused_inputs`, the shared argument checks), `fused_linear` the live teacher and `coarsened`
a cached top-k teacher (with its logits-based counterpart).
"""

from abkd_trainer.divergences.functional import (
    ab_divergence,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)
from abkd_trainer.divergences.registry import (
    DIVERGENCE_NAMES,
    DIVERGENCES,
    DivergenceSpec,
    divergence_spec,
    get_divergence,
)

__all__ = [
    "DIVERGENCE_NAMES",
    "ab_divergence",
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "total_variation",
    "get_divergence",
    "DIVERGENCES",
    "DivergenceSpec",
    "divergence_spec",
]
