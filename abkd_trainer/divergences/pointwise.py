"""Per-vocabulary-entry terms of every divergence, in log space.

Every divergence in this package is *separable*: `D(p || q) = sum_k d(p_k, q_k)` over the
vocabulary, where `p` is the teacher's and `q` the student's token distribution. A divergence is
therefore fully described by two `(n, V)` tensors computed from the log-probabilities:

* `loss_terms[k] = d(p_k, q_k)`; the per-token loss is `loss_terms.sum(-1)`;
* `grad_weights[k] = q_k * dD/dq_k`; the gradient with respect to the student's logits `z`
  (`q = softmax(z)`) is `grad_weights - q * grad_weights.sum(-1, keepdim=True)`.

The chunked and fused drivers own softmax, chunking, temperature and reductions; the classes here
only implement those two tensors. They are not meant to be differentiated by autograd (they work
in place); the drivers apply the gradient formula above. Inputs are fp32 (or float64)
log-probabilities in which `-inf` has already been replaced by `LOG_PROB_FLOOR`
(see `abkd_trainer.divergences.chunked`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = [
    "LOG_PROB_FLOOR",
    "PointwiseDivergence",
    "ABDivergence",
    "ForwardKL",
    "ReverseKL",
    "GeneralizedJSD",
    "SkewForwardKL",
    "SkewReverseKL",
    "TotalVariation",
]

# Finite stand-in for log(0). Far below any log-probability that fp32 softmax produces from real
# logits (bf16 logits of magnitude 1e4 give about -2e4), yet small enough that products such as
# (log p - log q)^2 stay finite. Every closed form below tends to its exact limit as an argument
# goes to this floor whenever that limit is finite (AB with p_k = 0: q_k^(a+b) / (a (a+b))).
LOG_PROB_FLOOR = -1.0e6

# Below this spread of the exponent nodes, the three-point divided difference of exp is evaluated
# by its Taylor series (8 terms, truncation error < 1e-8 relative); above it, by the recurrence,
# whose cancellation error is then below ~4 fp32 ulps.
_TAYLOR_SPREAD = 0.5
# An exponent below this is zero for the expm1 form: c |delta| <= 1e-24 even at LOG_PROB_FLOOR,
# while 1 / c would overflow fp32 (found by hypothesis at beta = 6e-64).
_NEGLIGIBLE_EXPONENT = 1e-30
_TAYLOR_TERMS = 8


class PointwiseDivergence(Protocol):
    """What the chunked and fused drivers need from a divergence."""

    def terms_and_weights(
        self, student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `(loss_terms, grad_weights)`, both fp32 `(n, V)` like the inputs."""
        ...


def _check_finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value}.")
    return value


def _check_unit_interval(name: str, value: float) -> float:
    value = _check_finite(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must lie in [0, 1], got {value}.")
    return value


def _exp_divided_difference_2(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`exp[u, v] = (e^u - e^v) / (u - v)` (`e^u` if `u == v`), stably.

    Shifting by the larger node keeps `expm1`'s argument non-positive, so nothing overflows
    unless `e^max(u, v)` itself does.
    """
    gap = (u - v).abs()
    ratio = torch.where(gap > 0, -torch.expm1(-gap) / gap, 1.0)
    return torch.maximum(u, v).exp() * ratio


def _mixture_log_probs(
    first_log_probs: torch.Tensor, second_log_probs: torch.Tensor, first_weight: float
) -> torch.Tensor:
    """`log(w e^first + (1 - w) e^second)`, exact at the end points `w = 0` and `w = 1`."""
    if first_weight == 0.0:
        return second_log_probs
    if first_weight == 1.0:
        return first_log_probs
    return torch.logaddexp(
        first_log_probs + math.log(first_weight), second_log_probs + math.log1p(-first_weight)
    )


@dataclass(frozen=True)
class ABDivergence:
    """Alpha-beta divergence of Cichocki, Cruces & Amari (2011), as used by ABKD.

    `D = -1/(a b) sum_k [p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b)]` with its continuous limits
    at `a = 0`, `b = 0`, `a + b = 0` and `a = b = 0`. `(1, 0)` is KL(p || q),
    `(0, 1)` is KL(q || p), `(0.5, 0.5)` is `2 sum (sqrt p - sqrt q)^2`.

    With `x = log p`, `y = log q`, `delta = x - y` and the exponent nodes
    `n0 = (a+b) y`, `n1 = a x + b y`, `n2 = (a+b) x` (the logs of `q^(a+b)`, `p^a q^b`,
    `p^(a+b)`), every case is one formula:

        d_k = delta^2 * exp[n0, n1, n2]          (second divided difference of exp)
        w_k = q_k dD/dq_k = -delta * exp[n0, n1]

    Divided differences of exp are smooth in their nodes, so the value is continuous in (a, b) by
    construction and no `1/(a b)` is ever formed.
    `exp[n0, n1, n2] = e^n0 exp[0, a delta, s delta]` is a power series in `delta` whose
    coefficients depend on (a, b) only; it is used where the nodes are close, the
    divided-difference recurrence elsewhere.
    """

    alpha: float
    beta: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", _check_finite("alpha", self.alpha))
        object.__setattr__(self, "beta", _check_finite("beta", self.beta))

    def _taylor_coefficients(self) -> list[float]:
        # exp[0, a d, s d] = sum_k h_k(a, s) d^k / (k + 2)!, with h_k the complete homogeneous
        # symmetric polynomial of degree k in (a, s).
        a, s = self.alpha, self.alpha + self.beta
        return [
            sum(a**i * s ** (k - i) for i in range(k + 1)) / math.factorial(k + 2)
            for k in range(_TAYLOR_TERMS)
        ]

    def _series(self, delta: torch.Tensor, n0: torch.Tensor) -> torch.Tensor:
        """`delta^2 exp[n0, n1, n2]` by its power series in `delta` (for close nodes)."""
        series = torch.zeros_like(delta)
        for coefficient in reversed(self._taylor_coefficients()):
            series = series.mul_(delta).add_(coefficient)
        return series.mul_(n0.exp()).mul_(delta.square())

    def _replace_close_nodes(
        self, loss_terms: torch.Tensor, delta: torch.Tensor, n0: torch.Tensor
    ) -> torch.Tensor:
        # Where every node lies within _TAYLOR_SPREAD of n0 the recurrence cancels: take the series
        # there. (A full-chunk where() measured faster than gathering the close subset, even when
        # only ~10% of the entries are close: boolean indexing is slow.)
        node_radius = max(abs(self.alpha), abs(self.alpha + self.beta))
        if node_radius == 0.0:
            return self._series(delta, n0)
        close = delta.abs() <= _TAYLOR_SPREAD / node_radius
        return torch.where(close, self._series(delta, n0), loss_terms)

    def terms_and_weights(
        self, student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.alpha >= 0.0 and self.beta >= 0.0 and self.alpha + self.beta > 0.0:
            return self._nonnegative_terms_and_weights(student_log_probs, teacher_log_probs)
        return self._general_terms_and_weights(student_log_probs, teacher_log_probs)

    def _nonnegative_terms_and_weights(
        self, student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The common case a, b >= 0 (all recipes), with fewer passes over the chunk.

        With `A = delta exp[n0, n1] = (p^a q^b - q^s) / a` and
        `B = delta exp[n1, n2] = (p^s - p^a q^b) / b`, the recurrence reads `d = (B - A) / s`
        and `w = -A`. Each of A, B is `-sign(delta) e^max(nodes) expm1(-c |delta|) / c`: no
        overflow, no cancellation, and the exact limit `e^n delta` at `c = 0`.
        """
        a, b = self.alpha, self.beta
        s = a + b
        delta = teacher_log_probs - student_log_probs
        abs_delta = delta.abs()
        positive_delta = delta.clamp(min=0.0)
        sign = delta.sign()
        n0 = student_log_probs * s
        n1 = torch.add(n0, delta, alpha=a)

        def scaled_difference(low_node: torch.Tensor, c: float) -> torch.Tensor:
            if c < _NEGLIGIBLE_EXPONENT:  # expm1(-c |delta|) / c -> -|delta|, no 0 * inf
                return low_node.exp().mul_(delta)
            value = torch.add(low_node, positive_delta, alpha=c).exp_()
            return value.mul_(torch.expm1(abs_delta.mul(-c))).mul_(sign).mul_(-1.0 / c)

        difference_01 = scaled_difference(n0, a)
        loss_terms = scaled_difference(n1, b).sub_(difference_01).mul_(1.0 / s)
        loss_terms = self._replace_close_nodes(loss_terms, delta, n0)
        return loss_terms, difference_01.neg_()

    def _general_terms_and_weights(
        self, student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.alpha, self.beta
        s = a + b
        x, y = teacher_log_probs, student_log_probs
        delta = x - y
        n0 = s * y
        n1 = a * x + b * y
        n2 = s * x

        # exp[n0, n1] appears in the gradient and, for most (a, b), in the recurrence below.
        dd_01 = _exp_divided_difference_2(n0, n1)

        # Recurrence exp[e1, m, e2] = (exp[m, e2] - exp[e1, m]) / (e2 - e1), m the middle node.
        # Relative to n0 the nodes sit at 0, a*delta, s*delta, so which one is in the middle depends
        # only on (a, b), never on the data: the middle of {0, a, s}.
        if min(0.0, s) <= a <= max(0.0, s):  # n1 in the middle (a, b of equal sign, or a zero)
            dd_12 = _exp_divided_difference_2(n1, n2)
            recurrence = (dd_12 - dd_01) / (n2 - n0)
        elif min(a, s) <= 0.0 <= max(a, s):  # n0 in the middle
            dd_02 = _exp_divided_difference_2(n0, n2)
            recurrence = (dd_02 - dd_01) / (n2 - n1)
        else:  # n2 in the middle
            dd_02 = _exp_divided_difference_2(n0, n2)
            dd_12 = _exp_divided_difference_2(n1, n2)
            recurrence = (dd_12 - dd_02) / (n1 - n0)

        loss_terms = self._replace_close_nodes(delta.square() * recurrence, delta, n0)
        grad_weights = -delta * dd_01
        return loss_terms, grad_weights


@dataclass(frozen=True)
class ForwardKL:
    """KL(p || q) = sum_k p_k (log p_k - log q_k), teacher entropy included (mode-covering)."""

    def terms_and_weights(
        self, student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        teacher_probs = teacher_log_probs.exp()
        loss_terms = teacher_probs * (teacher_log_probs - student_log_probs)
        return loss_terms, -teacher_probs


@dataclass(frozen=True)
class ReverseKL:
    """KL(q || p) = sum_k q_k (log q_k - log p_k) (mode-seeking)."""

    def terms_and_weights(
        self, student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        student_probs = student_log_probs.exp()
        loss_terms = student_probs * (student_log_probs - teacher_log_probs)
        return loss_terms, loss_terms + student_probs


@dataclass(frozen=True)
class GeneralizedJSD:
    """TRL's generalized Jensen-Shannon divergence (`GKDTrainer.generalized_jsd_loss`).

    `beta * KL(p || m) + (1 - beta) * KL(q || m)` with `m = beta p + (1 - beta) q`; following
    TRL, `beta = 0` is forward KL(p || q) and `beta = 1` is reverse KL(q || p) (the mixture
    formula itself would vanish at both ends).
    """

    beta: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "beta", _check_unit_interval("beta", self.beta))

    def terms_and_weights(
        self, student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.beta == 0.0:
            return ForwardKL().terms_and_weights(student_log_probs, teacher_log_probs)
        if self.beta == 1.0:
            return ReverseKL().terms_and_weights(student_log_probs, teacher_log_probs)
        mixture_log_probs = _mixture_log_probs(teacher_log_probs, student_log_probs, self.beta)
        teacher_part = teacher_log_probs.exp() * (teacher_log_probs - mixture_log_probs)
        student_part = student_log_probs.exp() * (student_log_probs - mixture_log_probs)
        loss_terms = self.beta * teacher_part + (1.0 - self.beta) * student_part
        # d/dq of the mixture terms cancel: q dD/dq = (1 - beta) q log(q / m).
        return loss_terms, (1.0 - self.beta) * student_part


@dataclass(frozen=True)
class SkewForwardKL:
    """DistiLLM's skew forward KL: KL(p || lam p + (1 - lam) q)."""

    skew_lambda: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "skew_lambda", _check_unit_interval("skew_lambda", self.skew_lambda)
        )

    def terms_and_weights(
        self, student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lam = self.skew_lambda
        mixture_log_probs = _mixture_log_probs(teacher_log_probs, student_log_probs, lam)
        loss_terms = teacher_log_probs.exp() * (teacher_log_probs - mixture_log_probs)
        grad_weights = (
            -(1.0 - lam) * (teacher_log_probs + student_log_probs - mixture_log_probs).exp()
        )
        return loss_terms, grad_weights


@dataclass(frozen=True)
class SkewReverseKL:
    """DistiLLM's skew reverse KL: KL(q || lam q + (1 - lam) p)."""

    skew_lambda: float = 0.1

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "skew_lambda", _check_unit_interval("skew_lambda", self.skew_lambda)
        )

    def terms_and_weights(
        self, student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lam = self.skew_lambda
        mixture_log_probs = _mixture_log_probs(student_log_probs, teacher_log_probs, lam)
        student_probs = student_log_probs.exp()
        loss_terms = student_probs * (student_log_probs - mixture_log_probs)
        # q dD/dq = q (log(q / m) + 1 - lam q / m)
        grad_weights = loss_terms + student_probs
        if lam > 0:
            grad_weights = grad_weights - lam * (2.0 * student_log_probs - mixture_log_probs).exp()
        return loss_terms, grad_weights


@dataclass(frozen=True)
class TotalVariation:
    """Total variation distance 0.5 * sum_k |p_k - q_k| (subgradient 0 where p_k = q_k)."""

    def terms_and_weights(
        self, student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        student_probs = student_log_probs.exp()
        difference = student_probs - teacher_log_probs.exp()
        return 0.5 * difference.abs(), 0.5 * student_probs * difference.sign()
