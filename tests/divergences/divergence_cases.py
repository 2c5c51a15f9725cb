"""One table of (registry name, parameters, float64 reference) shared by the divergence tests.

Each case calls the public function through ``get_divergence`` so the registry is exercised too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from divergence_reference import (
    ab_divergence_reference,
    forward_kl_reference,
    generalized_jsd_reference,
    reverse_kl_reference,
    skew_forward_kl_reference,
    skew_reverse_kl_reference,
    total_variation_reference,
)

from abkd_trainer.divergences import get_divergence

Reference = Callable[..., torch.Tensor]  # (student, teacher, temperature=) -> (...) values


def _zero_reference(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    # KL(x || x): both skew divergences vanish identically at lambda = 1. Built from the student
    # logits so that autograd still sees a (zero) dependence on them.
    return 0.0 * student_logits.sum(dim=-1)


@dataclass(frozen=True)
class DivergenceCase:
    """A registered divergence at fixed parameters, with its independent reference."""

    name: str
    reference: Reference
    params: dict[str, float] = field(default_factory=dict)

    @property
    def id(self) -> str:
        settings = ",".join(f"{key}={value:g}" for key, value in self.params.items())
        return f"{self.name}({settings})"

    @property
    def finite_for_extreme_logits(self) -> bool:
        """False for AB with a negative exponent: p^a with p ~ e^-20000 is truly astronomical."""
        return all(self.params.get(key, 0.0) >= 0.0 for key in ("alpha", "beta"))

    def __call__(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, **kwargs
    ) -> torch.Tensor:
        return get_divergence(self.name)(student_logits, teacher_logits, **self.params, **kwargs)


def _ab(alpha: float, beta: float) -> DivergenceCase:
    reference = partial(ab_divergence_reference, alpha=alpha, beta=beta)
    return DivergenceCase("ab", reference, {"alpha": alpha, "beta": beta})


DIVERGENCE_CASES: list[DivergenceCase] = [
    _ab(0.2, 0.7),
    _ab(1.0, 0.0),
    _ab(0.0, 1.0),
    _ab(0.0, 0.0),
    _ab(0.5, -0.5),
    _ab(-0.3, 0.9),
    DivergenceCase("fkl", forward_kl_reference),
    DivergenceCase("rkl", reverse_kl_reference),
    DivergenceCase("jsd", forward_kl_reference, {"beta": 0.0}),
    DivergenceCase("jsd", partial(generalized_jsd_reference, beta=0.1), {"beta": 0.1}),
    DivergenceCase("jsd", partial(generalized_jsd_reference, beta=0.5), {"beta": 0.5}),
    DivergenceCase("jsd", partial(generalized_jsd_reference, beta=0.9), {"beta": 0.9}),
    DivergenceCase("jsd", reverse_kl_reference, {"beta": 1.0}),
    DivergenceCase("sfkl", forward_kl_reference, {"skew_lambda": 0.0}),
    DivergenceCase(
        "sfkl", partial(skew_forward_kl_reference, skew_lambda=0.1), {"skew_lambda": 0.1}
    ),
    DivergenceCase(
        "sfkl", partial(skew_forward_kl_reference, skew_lambda=0.5), {"skew_lambda": 0.5}
    ),
    DivergenceCase("sfkl", _zero_reference, {"skew_lambda": 1.0}),
    DivergenceCase("srkl", reverse_kl_reference, {"skew_lambda": 0.0}),
    DivergenceCase(
        "srkl", partial(skew_reverse_kl_reference, skew_lambda=0.1), {"skew_lambda": 0.1}
    ),
    DivergenceCase(
        "srkl", partial(skew_reverse_kl_reference, skew_lambda=0.5), {"skew_lambda": 0.5}
    ),
    DivergenceCase("srkl", _zero_reference, {"skew_lambda": 1.0}),
    DivergenceCase("tvd", total_variation_reference),
]
CASE_IDS = [case.id for case in DIVERGENCE_CASES]
# One case per registry name, with its typical parameters, for the combinatorial tests.
ONE_PER_NAME: list[DivergenceCase] = [
    next(case for case in DIVERGENCE_CASES if case.id == case_id)
    for case_id in (
        "ab(alpha=0.2,beta=0.7)",
        "fkl()",
        "rkl()",
        "jsd(beta=0.5)",
        "sfkl(skew_lambda=0.1)",
        "srkl(skew_lambda=0.1)",
        "tvd()",
    )
]
ONE_PER_NAME_IDS = [case.id for case in ONE_PER_NAME]
