"""ab_divergence: values and gradients against a float64 reference, identities, continuity.

The grid holds every special case of the closed form (alpha = 0, beta = 0, alpha + beta = 0,
alpha = beta = 0) and points 1e-4 away from each, on both sides, plus the paper's recipes.
"""

from __future__ import annotations

import pytest
import torch
from divergence_reference import (
    ab_divergence_reference,
    forward_kl_reference,
    log_probs,
    naive_ab_divergence,
    reverse_kl_reference,
)

from abkd_trainer.divergences import ab_divergence

NEAR = 1e-4

SPECIAL_CASES = [
    (0.0, 0.0),
    (1.0, 0.0),
    (0.7, 0.0),
    (-0.5, 0.0),
    (0.0, 1.0),
    (0.0, 0.5),
    (0.0, -0.6),
    (0.5, -0.5),
    (-0.3, 0.3),
]
GENERIC_POINTS = [
    (0.2, 0.7),  # GPT-2 recipe
    (0.1, 0.8),  # OpenLLaMA recipe
    (0.8, 0.3),  # CIFAR-100 recipe
    (0.5, 0.5),
    (2.0, 1.0),
    (1.5, -0.4),
    (-0.3, 0.9),
    (-0.4, -0.2),
]


def _neighbours(alpha: float, beta: float, distance: float) -> list[tuple[float, float]]:
    """Points ``distance`` away from a special case, leaving it in each direction that matters."""
    if alpha == 0.0 and beta == 0.0:
        steps = [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 0.5)]
    elif beta == 0.0 or alpha + beta == 0.0:
        steps = [(0, 1), (0, -1)]
    else:  # alpha == 0
        steps = [(1, 0), (-1, 0)]
    return [(alpha + da * distance, beta + db * distance) for da, db in steps]


NEAR_POINTS = [point for case in SPECIAL_CASES for point in _neighbours(*case, NEAR)]
AB_GRID = SPECIAL_CASES + GENERIC_POINTS + NEAR_POINTS


def _ids(points):
    return [f"a={alpha:g},b={beta:g}" for alpha, beta in points]


@pytest.fixture(scope="module")
def logits64() -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits ``(3, 4, 13)``, float64, spread enough for tiny probabilities."""
    generator = torch.Generator().manual_seed(0)
    student = 2.0 * torch.randn(3, 4, 13, dtype=torch.float64, generator=generator)
    teacher = 2.0 * torch.randn(3, 4, 13, dtype=torch.float64, generator=generator)
    return student, teacher


@pytest.mark.parametrize(("alpha", "beta"), AB_GRID, ids=_ids(AB_GRID))
def test_fp32_values_match_float64_reference(logits64, alpha, beta):
    student, teacher = logits64
    expected = ab_divergence_reference(student, teacher, alpha, beta)
    got = ab_divergence(student.float(), teacher.float(), alpha, beta, reduction="none")
    assert got.dtype == torch.float32
    assert got.shape == student.shape[:-1]
    # fp32 log-softmax alone is good to ~1e-7 relative; 1e-5 leaves room, not for a wrong formula.
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize(("alpha", "beta"), AB_GRID, ids=_ids(AB_GRID))
def test_fp32_gradient_matches_float64_reference_autograd(logits64, alpha, beta):
    student, teacher = logits64
    reference_student = student.clone().requires_grad_(True)
    ab_divergence_reference(reference_student, teacher, alpha, beta).sum().backward()
    expected = reference_student.grad

    ours_student = student.float().requires_grad_(True)
    ab_divergence(ours_student, teacher.float(), alpha, beta, reduction="sum").backward()
    scale = expected.abs().max().item()
    torch.testing.assert_close(ours_student.grad.double(), expected, rtol=2e-5, atol=2e-6 * scale)


GRADCHECK_POINTS = [(0.2, 0.7), (0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (0.5, -0.5), (0.7, NEAR)]


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize(("alpha", "beta"), GRADCHECK_POINTS, ids=_ids(GRADCHECK_POINTS))
def test_gradcheck_in_float64_with_mask(alpha, beta, reduction):
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(2, 3, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    teacher = torch.randn(2, 3, 5, dtype=torch.float64, generator=generator)
    mask = torch.tensor([[True, False, True], [True, True, False]])

    def loss(student_logits: torch.Tensor) -> torch.Tensor:
        return ab_divergence(
            student_logits, teacher, alpha, beta, mask=mask, reduction=reduction, chunk_size=2
        )

    assert torch.autograd.gradcheck(loss, (student,))


@pytest.mark.parametrize(("alpha", "beta"), AB_GRID, ids=_ids(AB_GRID))
def test_float64_inputs_keep_float64_precision(logits64, alpha, beta):
    """gradcheck needs float64 in to mean float64 throughout: fp32 is a floor, not a ceiling.

    2e-8 is out of reach of any fp32 evaluation (ulp 6e-8) and above the truncation error of the
    library's near-boundary series (documented < 1e-8 relative, sized for fp32).
    """
    student, teacher = logits64
    got = ab_divergence(student, teacher, alpha, beta, reduction="none")
    expected = ab_divergence_reference(student, teacher, alpha, beta)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=2e-8, atol=0.0)


def test_alpha_one_beta_zero_is_forward_kl(logits64):
    student, teacher = logits64
    got = ab_divergence(student.float(), teacher.float(), 1.0, 0.0, reduction="none")
    torch.testing.assert_close(
        got.double(), forward_kl_reference(student, teacher), rtol=1e-5, atol=1e-7
    )


def test_alpha_zero_beta_one_is_reverse_kl(logits64):
    student, teacher = logits64
    got = ab_divergence(student.float(), teacher.float(), 0.0, 1.0, reduction="none")
    torch.testing.assert_close(
        got.double(), reverse_kl_reference(student, teacher), rtol=1e-5, atol=1e-7
    )


def test_half_half_is_twice_squared_hellinger_sum(logits64):
    student, teacher = logits64
    sqrt_p = (0.5 * log_probs(teacher)).exp()
    sqrt_q = (0.5 * log_probs(student)).exp()
    expected = 2.0 * ((sqrt_p - sqrt_q) ** 2).sum(dim=-1)
    got = ab_divergence(student.float(), teacher.float(), 0.5, 0.5, reduction="none")
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)


CONTINUITY_DISTANCES = [1e-4, 1e-6, 1e-8]


@pytest.mark.parametrize("distance", CONTINUITY_DISTANCES)
@pytest.mark.parametrize(("alpha", "beta"), SPECIAL_CASES, ids=_ids(SPECIAL_CASES))
def test_fp32_value_is_continuous_across_special_case(logits64, alpha, beta, distance):
    """A hair away from a special case, the fp32 value agrees with the special case's value.

    On this data the exact function changes by at most ~10 * distance relative (measured with the
    float64 reference at distance 1e-4), so ``30 * distance`` bounds the true change and ``1e-5``
    the fp32 rounding of two evaluations. A 1/a instead of 1/a^2 limit misses by a factor of a.
    """
    student, teacher = logits64[0].float(), logits64[1].float()
    at_case = ab_divergence(student, teacher, alpha, beta, reduction="none")
    for near_alpha, near_beta in _neighbours(alpha, beta, distance):
        near = ab_divergence(student, teacher, near_alpha, near_beta, reduction="none")
        relative_change = ((near - at_case).abs() / at_case.abs()).max().item()
        assert relative_change <= 30 * distance + 1e-5, (near_alpha, near_beta, relative_change)


@pytest.mark.parametrize("tiny", [1e-20, 1e-39, 1e-45, 1e-300])
@pytest.mark.parametrize("exponent", [1.0, 0.7, -0.5])
def test_value_stays_continuous_for_exponents_below_fp32_range(logits64, exponent, tiny):
    """A hyper-parameter schedule may produce e.g. beta = 1e-40; that is still beta = 0."""
    student, teacher = logits64[0].float(), logits64[1].float()
    for at_case, nearby in [
        ((exponent, 0.0), (exponent, tiny)),
        ((0.0, exponent), (tiny, exponent)),
        ((0.0, 0.0), (tiny, tiny)),
    ]:
        expected = ab_divergence(student, teacher, *at_case, reduction="none")
        got = ab_divergence(student, teacher, *nearby, reduction="none")
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=0.0, msg=f"{nearby}")


@pytest.mark.parametrize(
    ("alpha", "beta"), [(0.7, 1e-5), (1e-4, 1e-4), (0.5, -0.5 + 1e-5)], ids=str
)
def test_naive_fp32_closed_form_cancels_near_boundary_but_ours_does_not(logits64, alpha, beta):
    student, teacher = logits64
    expected = ab_divergence_reference(student, teacher, alpha, beta)

    naive = naive_ab_divergence(student.float(), teacher.float(), alpha, beta).double()
    ours = ab_divergence(student.float(), teacher.float(), alpha, beta, reduction="none").double()

    naive_error = ((naive - expected).abs() / expected).max().item()
    ours_error = ((ours - expected).abs() / expected).max().item()
    assert naive_error > 5e-4  # measured 1.5e-3 to 0.85 on this data
    assert ours_error < 1e-5


@pytest.mark.parametrize(("alpha", "beta"), [(0.2, 0.7), (0.0, 0.0), (1.0, 0.0), (0.5, -0.5)])
def test_temperature_divides_both_logit_sets_without_t_squared(logits64, alpha, beta):
    student, teacher = logits64[0].float(), logits64[1].float()
    temperature = 2.5

    scaled_student = student.clone().requires_grad_(True)
    expected = ab_divergence(scaled_student / temperature, teacher / temperature, alpha, beta)
    expected.backward()

    ours_student = student.clone().requires_grad_(True)
    got = ab_divergence(ours_student, teacher, alpha, beta, temperature=temperature)
    got.backward()

    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(ours_student.grad, scaled_student.grad, rtol=1e-5, atol=1e-9)
    reference = ab_divergence_reference(logits64[0], logits64[1], alpha, beta, temperature)
    torch.testing.assert_close(got.double(), reference.mean(), rtol=1e-5, atol=0.0)


def test_gradient_reaches_student_only(logits64):
    student = logits64[0].float().requires_grad_(True)
    teacher = logits64[1].float().requires_grad_(True)
    ab_divergence(student, teacher, 0.2, 0.7).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_result_is_fp32_for_lower_precision_inputs(logits64, dtype):
    student, teacher = logits64[0].to(dtype), logits64[1].to(dtype)
    got = ab_divergence(student, teacher, 0.2, 0.7, reduction="none")
    assert got.dtype == torch.float32
    # Computed in fp32 from the rounded logits: same value as upcasting them first.
    expected = ab_divergence(student.float(), teacher.float(), 0.2, 0.7, reduction="none")
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0.0)
