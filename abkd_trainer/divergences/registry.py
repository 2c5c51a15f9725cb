"""The one map from a divergence's short name to its implementations and configuration fields.

Every component that turns a name such as `"ab"` or `"jsd"` into something (the trainers, the
distillation objective, the command line, the run report, comparisons and the sweep) looks it up
here, so adding a divergence means adding one `DivergenceSpec` to `DIVERGENCES`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from abkd_trainer.divergences.functional import (
    ab_divergence,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)
from abkd_trainer.divergences.pointwise import (
    ABDivergence,
    ForwardKL,
    GeneralizedJSD,
    PointwiseDivergence,
    ReverseKL,
    SkewForwardKL,
    SkewReverseKL,
    TotalVariation,
)

__all__ = [
    "DIVERGENCES",
    "DIVERGENCE_NAMES",
    "DivergenceSpec",
    "divergence_config_fields",
    "divergence_parameters",
    "divergence_spec",
    "get_divergence",
    "make_divergence",
    "resolve_divergence",
]


@dataclass(frozen=True)
class DivergenceSpec:
    """A registered divergence: what it is called, computed by, and configured with.

    Attributes:
        name: the short name used in configurations (`divergence="ab"`).
        title: a human-readable name for reports and plots.
        function: the public function on logits, e.g. `ab_divergence(student_logits,
            teacher_logits, alpha, beta, temperature=..., mask=..., reduction=...)`.
        pointwise: the per-vocabulary-entry class the chunked and fused kernels evaluate.
        parameter_fields: the function's keyword parameters mapped to the configuration fields
            that hold them (`{"beta": "jsd_beta"}` for the generalised JSD).
        schedule_fields: further configuration fields that move the parameters over training
            (reported next to them).
    """

    name: str
    title: str
    function: Callable[..., torch.Tensor]
    pointwise: Callable[..., PointwiseDivergence]
    parameter_fields: Mapping[str, str] = field(default_factory=dict)
    schedule_fields: tuple[str, ...] = ()

    def parameters_from(self, config: Any) -> dict[str, float]:
        """The divergence's keyword parameters as configured (schedules not applied).

        Args:
            config: any object with the fields named in `parameter_fields` (an `ABKDConfig`,
                an `ABKDClassifierConfig`, a namespace).
        """
        return {param: getattr(config, name) for param, name in self.parameter_fields.items()}

    @property
    def scheduled(self) -> bool:
        """Whether the (alpha, beta) warm-up and schedule move this divergence's parameters."""
        return bool(self.schedule_fields)


_SPECS = (
    DivergenceSpec(
        "ab",
        "alpha-beta divergence",
        ab_divergence,
        ABDivergence,
        {"alpha": "alpha", "beta": "beta"},
        ("alpha_end", "beta_end"),
    ),
    DivergenceSpec("fkl", "forward KL", forward_kl, ForwardKL),
    DivergenceSpec("rkl", "reverse KL", reverse_kl, ReverseKL),
    DivergenceSpec("jsd", "generalised JSD", generalized_jsd, GeneralizedJSD, {"beta": "jsd_beta"}),
    DivergenceSpec(
        "sfkl", "skew forward KL", skew_forward_kl, SkewForwardKL, {"skew_lambda": "skew_lambda"}
    ),
    DivergenceSpec(
        "srkl", "skew reverse KL", skew_reverse_kl, SkewReverseKL, {"skew_lambda": "skew_lambda"}
    ),
    DivergenceSpec("tvd", "total variation distance", total_variation, TotalVariation),
)

DIVERGENCES: Mapping[str, DivergenceSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})
DIVERGENCE_NAMES: tuple[str, ...] = tuple(DIVERGENCES)
"""The registered short names, in registration order: `"ab"` (alpha-beta, ABKD), `"fkl"`
(forward KL), `"rkl"` (reverse KL), `"jsd"` (generalised JSD), `"sfkl"` / `"srkl"` (skew forward
/ reverse KL) and `"tvd"` (total variation distance)."""


def divergence_spec(name: str) -> DivergenceSpec:
    """The registered divergence called `name`.

    Raises:
        ValueError: `name` is not one of `DIVERGENCE_NAMES`.
    """
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise ValueError(
            f"Unknown divergence {name!r}; choose one of {', '.join(DIVERGENCE_NAMES)}."
        ) from None


def get_divergence(name: str) -> Callable[..., torch.Tensor]:
    """Look a divergence function on logits up by its short name.

    Args:
        name: One of [`DIVERGENCE_NAMES`][abkd_trainer.divergences.registry.DIVERGENCE_NAMES]:
            `"ab"`, `"fkl"`, `"rkl"`, `"jsd"`, `"sfkl"`, `"srkl"` or `"tvd"`.

    Returns:
        The function, e.g. [`ab_divergence`][abkd_trainer.divergences.functional.ab_divergence]
        for `"ab"`; each takes `(student_logits, teacher_logits, <its parameters>, *,
        temperature, mask, reduction, chunk_size)` and returns nats.

    Raises:
        ValueError: `name` is not a registered divergence.
    """
    return divergence_spec(name).function


def make_divergence(name: str, **params: float) -> PointwiseDivergence:
    """Build the pointwise divergence registered as `name`.

    Parameters: `ab` takes `alpha` and `beta`; `jsd` takes `beta`; `sfkl` and `srkl` take
    `skew_lambda`; `fkl`, `rkl` and `tvd` take none.

    Raises:
        ValueError: an unknown name, or parameters the divergence does not take or rejects.
    """
    spec = divergence_spec(name)
    try:
        return spec.pointwise(**params)
    except TypeError as error:
        raise ValueError(f"Invalid parameters {params} for divergence {name!r}: {error}") from None


def resolve_divergence(
    divergence: str | PointwiseDivergence, divergence_params: Mapping[str, float] | None = None
) -> PointwiseDivergence:
    """The pointwise divergence a kernel's `divergence` argument names.

    Args:
        divergence: a registry name (then built with `divergence_params`) or an object with a
            `terms_and_weights` method (a `PointwiseDivergence`, already parametrised).
        divergence_params: keyword parameters of a divergence given by name.

    Raises:
        ValueError: an unknown name, bad parameters, or parameters for a divergence object.
        TypeError: neither a name nor a pointwise divergence.
    """
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


def divergence_parameters(config: Any) -> dict[str, float]:
    """The configured divergence's keyword parameters, read from `config.divergence` and the
    fields the registry names (start values; schedules are not applied)."""
    return divergence_spec(config.divergence).parameters_from(config)


def divergence_config_fields(name: str) -> tuple[str, ...]:
    """The configuration fields that set divergence `name`: its parameters, then its schedule."""
    spec = divergence_spec(name)
    return tuple(spec.parameter_fields.values()) + spec.schedule_fields
