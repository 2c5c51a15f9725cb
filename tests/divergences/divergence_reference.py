"""Independent float64 references for the divergence tests, written from the textbook formulas.

Nothing here is shared with ``abkd_trainer.divergences``: probabilities come from a plain
``log_softmax`` and every formula is the one printed in ``docs/abkd-math.md`` (AB-divergence and
its four limits) or in the baselines' papers, evaluated with ordinary autograd. In float64 the
closed form loses about ``log10(1 / |a b|)`` of its 16 digits near a boundary, so it stays accurate
to ~1e-11 at points 1e-4 away from a special case; exactly on one, the limit formula is used.

Every function takes raw logits ``(..., V)`` and returns per-position values ``(...)`` in nats, in
the input dtype (call it with float64 tensors).
"""

from __future__ import annotations

import torch


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log softmax(logits / temperature)`` over the last dimension."""
    return torch.log_softmax(logits / temperature, dim=-1)


def ab_divergence_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: float,
    beta: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """D_AB^(alpha, beta)(p_teacher || q_student) per position, by case (Cichocki et al. 2011)."""
    log_p = log_probs(teacher_logits, temperature)
    log_q = log_probs(student_logits, temperature)
    a, b = float(alpha), float(beta)
    if a == 0.0 and b == 0.0:
        terms = 0.5 * (log_p - log_q) ** 2
    elif a == 0.0:
        q_b, p_b = torch.exp(b * log_q), torch.exp(b * log_p)
        terms = (q_b * b * (log_q - log_p) - q_b + p_b) / b**2
    elif b == 0.0:
        p_a, q_a = torch.exp(a * log_p), torch.exp(a * log_q)
        terms = (p_a * a * (log_p - log_q) - p_a + q_a) / a**2
    elif a + b == 0.0:
        log_ratio = a * (log_q - log_p)  # log(q^a / p^a)
        terms = (log_ratio + torch.exp(-log_ratio) - 1.0) / a**2
    else:
        s = a + b
        terms = -(
            torch.exp(a * log_p + b * log_q)
            - a / s * torch.exp(s * log_p)
            - b / s * torch.exp(s * log_q)
        ) / (a * b)
    return terms.sum(dim=-1)


def naive_ab_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """The general closed form on probabilities, in the input dtype (what a naive port computes)."""
    p = torch.softmax(teacher_logits, dim=-1)
    q = torch.softmax(student_logits, dim=-1)
    a, b = alpha, beta
    s = a + b
    return -(p**a * q**b - a / s * p**s - b / s * q**s).sum(dim=-1) / (a * b)


def forward_kl_reference(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(p || q) = sum p (log p - log q), teacher entropy included."""
    log_p = log_probs(teacher_logits, temperature)
    log_q = log_probs(student_logits, temperature)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def reverse_kl_reference(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """KL(q || p) = sum q (log q - log p)."""
    return forward_kl_reference(teacher_logits, student_logits, temperature)


def _kl_to_mixture(log_x: torch.Tensor, mixture: torch.Tensor) -> torch.Tensor:
    return (log_x.exp() * (log_x - mixture.log())).sum(dim=-1)


def generalized_jsd_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q`` (0 < beta < 1)."""
    log_p = log_probs(teacher_logits, temperature)
    log_q = log_probs(student_logits, temperature)
    mixture = beta * log_p.exp() + (1.0 - beta) * log_q.exp()
    return beta * _kl_to_mixture(log_p, mixture) + (1.0 - beta) * _kl_to_mixture(log_q, mixture)


def skew_forward_kl_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    skew_lambda: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """DistiLLM: KL(p || lam p + (1 - lam) q)."""
    log_p = log_probs(teacher_logits, temperature)
    log_q = log_probs(student_logits, temperature)
    mixture = skew_lambda * log_p.exp() + (1.0 - skew_lambda) * log_q.exp()
    return _kl_to_mixture(log_p, mixture)


def skew_reverse_kl_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    skew_lambda: float,
    temperature: float = 1.0,
) -> torch.Tensor:
    """DistiLLM: KL(q || lam q + (1 - lam) p)."""
    log_p = log_probs(teacher_logits, temperature)
    log_q = log_probs(student_logits, temperature)
    mixture = skew_lambda * log_q.exp() + (1.0 - skew_lambda) * log_p.exp()
    return _kl_to_mixture(log_q, mixture)


def total_variation_reference(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """0.5 * sum |p - q|."""
    p = log_probs(teacher_logits, temperature).exp()
    q = log_probs(student_logits, temperature).exp()
    return 0.5 * (p - q).abs().sum(dim=-1)
