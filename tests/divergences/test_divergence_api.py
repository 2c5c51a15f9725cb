"""The shared keyword interface of every divergence: registry, validation, masks, reductions,
temperature, gradient routing, and robustness to half precision and banned (-inf) tokens."""

from __future__ import annotations

import math

import pytest
import torch
from divergence_cases import (
    CASE_IDS,
    DIVERGENCE_CASES,
    ONE_PER_NAME,
    ONE_PER_NAME_IDS,
)

import abkd_trainer
from abkd_trainer.divergences import (
    DIVERGENCE_NAMES,
    ab_divergence,
    forward_kl,
    generalized_jsd,
    get_divergence,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)
from abkd_trainer.divergences.registry import make_divergence


def _logits(*shape: int, seed: int = 0, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(*shape, generator=generator)
    teacher = scale * torch.randn(*shape, generator=generator)
    return student, teacher


# --- registry -------------------------------------------------------------------------------


def test_registry_names_map_to_the_public_functions():
    expected = {
        "ab": ab_divergence,
        "fkl": forward_kl,
        "rkl": reverse_kl,
        "jsd": generalized_jsd,
        "sfkl": skew_forward_kl,
        "srkl": skew_reverse_kl,
        "tvd": total_variation,
    }
    assert DIVERGENCE_NAMES == tuple(expected)
    for name, function in expected.items():
        assert get_divergence(name) is function


def test_divergences_are_exported_from_the_package_root():
    assert abkd_trainer.get_divergence is get_divergence
    assert abkd_trainer.ab_divergence is ab_divergence
    assert abkd_trainer.DIVERGENCE_NAMES == DIVERGENCE_NAMES


def test_unknown_divergence_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="kl") as error:
        get_divergence("kl")
    for name in DIVERGENCE_NAMES:
        assert name in str(error.value)


def test_make_divergence_rejects_unknown_names_and_parameters():
    with pytest.raises(ValueError, match="Unknown divergence"):
        make_divergence("hellinger")
    with pytest.raises(ValueError, match="gamma"):
        make_divergence("ab", alpha=0.2, beta=0.7, gamma=1.0)


# --- validation -----------------------------------------------------------------------------

INVALID_PARAMETERS = [
    ("ab", {"alpha": math.nan, "beta": 0.5}, "alpha"),
    ("ab", {"alpha": 0.5, "beta": math.inf}, "beta"),
    ("jsd", {"beta": 1.5}, "beta"),
    ("jsd", {"beta": -0.1}, "beta"),
    ("sfkl", {"skew_lambda": -0.1}, "skew_lambda"),
    ("srkl", {"skew_lambda": 1.1}, "skew_lambda"),
    ("srkl", {"skew_lambda": math.nan}, "skew_lambda"),
]


@pytest.mark.parametrize(
    ("name", "params", "message"),
    INVALID_PARAMETERS,
    ids=[f"{name}-{params}" for name, params, _ in INVALID_PARAMETERS],
)
def test_invalid_divergence_parameters_raise_value_error(name, params, message):
    student, teacher = _logits(2, 5)
    with pytest.raises(ValueError, match=message):
        get_divergence(name)(student, teacher, **params)


@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan, math.inf])
def test_non_positive_or_non_finite_temperature_raises(temperature):
    student, teacher = _logits(2, 5)
    with pytest.raises(ValueError, match="temperature"):
        ab_divergence(student, teacher, 0.2, 0.7, temperature=temperature)


def test_unknown_reduction_raises_and_lists_the_choices():
    student, teacher = _logits(2, 5)
    with pytest.raises(ValueError, match="reduction.*none.*sum.*mean"):
        forward_kl(student, teacher, reduction="batchmean")


def test_mask_shape_mismatch_raises_with_the_expected_shape():
    student, teacher = _logits(2, 3, 5)
    with pytest.raises(ValueError, match=r"mask.*\(2, 3\)"):
        forward_kl(student, teacher, mask=torch.ones(2, 4, dtype=torch.bool))


def test_vocabulary_mismatch_raises_and_says_how_to_fix_it():
    student, _ = _logits(2, 3, 5)
    _, teacher = _logits(2, 3, 7)
    with pytest.raises(ValueError, match="vocabulary") as error:
        ab_divergence(student, teacher, 0.2, 0.7)
    assert "tokenizer" in str(error.value)


def test_position_shape_mismatch_raises():
    student, _ = _logits(2, 3, 5)
    _, teacher = _logits(3, 2, 5)
    with pytest.raises(ValueError, match="same shape"):
        reverse_kl(student, teacher)


@pytest.mark.parametrize("chunk_size", [0, -4, 2.5])
def test_invalid_chunk_size_raises(chunk_size):
    student, teacher = _logits(2, 5)
    with pytest.raises(ValueError, match="chunk_size"):
        total_variation(student, teacher, chunk_size=chunk_size)


def test_integer_logits_are_rejected():
    logits = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(TypeError, match="floating point"):
        forward_kl(logits, logits)


# --- reductions and masks -------------------------------------------------------------------


@pytest.mark.parametrize("case", ONE_PER_NAME, ids=ONE_PER_NAME_IDS)
def test_reductions_sum_and_average_the_per_position_values(case):
    student, teacher = _logits(3, 4, 9, seed=4)
    per_position = case(student, teacher, reduction="none")
    assert per_position.shape == (3, 4)
    torch.testing.assert_close(case(student, teacher, reduction="sum"), per_position.sum())
    torch.testing.assert_close(case(student, teacher, reduction="mean"), per_position.mean())
    torch.testing.assert_close(case(student, teacher), per_position.mean())  # default "mean"


@pytest.mark.parametrize("case", ONE_PER_NAME, ids=ONE_PER_NAME_IDS)
def test_mask_selects_positions_for_every_reduction(case):
    student, teacher = _logits(3, 4, 9, seed=5)
    mask = torch.tensor(
        [[True, False, True, True], [False, False, False, False], [True, True, False, True]]
    )
    # Ground truth without the mask machinery: the selected rows alone, unmasked.
    selected = case(student[mask], teacher[mask], reduction="none")

    per_position = case(student, teacher, mask=mask, reduction="none")
    assert per_position.shape == mask.shape
    torch.testing.assert_close(per_position[mask], selected)
    assert torch.all(per_position[~mask] == 0)
    masked_sum = case(student, teacher, mask=mask, reduction="sum")
    masked_mean = case(student, teacher, mask=mask, reduction="mean")
    torch.testing.assert_close(masked_sum, selected.sum())
    torch.testing.assert_close(masked_mean, selected.mean())  # over 7 positions, not 12


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", ONE_PER_NAME, ids=ONE_PER_NAME_IDS)
def test_all_false_mask_gives_exact_zero_with_a_connected_graph(case, reduction):
    student, teacher = _logits(2, 3, 9, seed=6)
    student.requires_grad_(True)
    loss = case(student, teacher, mask=torch.zeros(2, 3, dtype=torch.bool), reduction=reduction)
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("case", ONE_PER_NAME, ids=ONE_PER_NAME_IDS)
def test_masked_positions_ignore_garbage_logits(case):
    student, teacher = _logits(2, 3, 9, seed=7)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    clean_student = student.clone().requires_grad_(True)
    clean = case(clean_student, teacher, mask=mask)
    clean.backward()

    dirty_student, dirty_teacher = student.clone(), teacher.clone()
    dirty_student[0, 1] = math.nan
    dirty_student[1, 0, :4] = math.inf
    dirty_teacher[0, 1, 2] = -math.inf
    dirty_teacher[1, 0] = math.nan
    dirty_student.requires_grad_(True)
    dirty = case(dirty_student, dirty_teacher, mask=mask)
    dirty.backward()

    torch.testing.assert_close(dirty, clean)
    assert torch.equal(dirty_student.grad[~mask], torch.zeros_like(dirty_student.grad[~mask]))
    torch.testing.assert_close(dirty_student.grad, clean_student.grad)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_a_single_distribution_without_position_dimensions(reduction):
    student, teacher = _logits(9, seed=8)
    got = ab_divergence(student, teacher, 0.2, 0.7, reduction=reduction)
    assert got.shape == ()
    expected = ab_divergence(student[None], teacher[None], 0.2, 0.7, reduction="sum")
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_no_positions_at_all_give_an_empty_or_zero_result(reduction):
    student, teacher = _logits(2, 0, 9, seed=13)
    student.requires_grad_(True)
    got = ab_divergence(student, teacher, 0.2, 0.7, reduction=reduction)
    assert got.shape == ((2, 0) if reduction == "none" else ())
    got.sum().backward()
    assert student.grad.shape == (2, 0, 9)
    if reduction != "none":
        assert got.item() == 0.0


# --- temperature and gradient routing -------------------------------------------------------


@pytest.mark.parametrize("case", ONE_PER_NAME, ids=ONE_PER_NAME_IDS)
def test_temperature_is_division_of_both_logit_sets_without_t_squared(case):
    student, teacher = _logits(2, 3, 9, seed=9)
    temperature = 0.5

    scaled_student = student.clone().requires_grad_(True)
    expected = case(scaled_student / temperature, teacher / temperature)
    expected.backward()
    ours_student = student.clone().requires_grad_(True)
    got = case(ours_student, teacher, temperature=temperature)
    got.backward()

    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_student.grad, scaled_student.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", ONE_PER_NAME, ids=ONE_PER_NAME_IDS)
def test_gradient_reaches_the_student_only(case):
    student, teacher = _logits(2, 3, 9, seed=10)
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    case(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad.abs().max() > 0


# --- robustness -----------------------------------------------------------------------------

EXTREME_CASES = [case for case in DIVERGENCE_CASES if case.finite_for_extreme_logits]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", EXTREME_CASES, ids=[case.id for case in EXTREME_CASES])
def test_half_precision_logits_of_magnitude_1e4_give_finite_values_and_gradients(case, dtype):
    generator = torch.Generator().manual_seed(11)
    student = (1e4 * torch.rand(4, 16, generator=generator) * 2 - 1e4).to(dtype)
    teacher = (1e4 * torch.rand(4, 16, generator=generator) * 2 - 1e4).to(dtype)
    student[0, 3], teacher[1, 7] = 1e4, -1e4  # the extremes themselves
    student.requires_grad_(True)

    loss = case(student, teacher, reduction="none")
    case(student, teacher).backward()  # the default "mean": the true gradient fits in fp16

    assert loss.dtype == torch.float32
    assert torch.isfinite(loss).all()
    assert student.grad.dtype == dtype
    assert torch.isfinite(student.grad).all()
    # Not merely finite: the same as computing from the upcast logits.
    upcast_student = student.detach().float().requires_grad_(True)
    upcast = case(upcast_student, teacher.float(), reduction="none")
    case(upcast_student, teacher.float()).backward()
    torch.testing.assert_close(loss, upcast, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(student.grad, upcast_student.grad.to(dtype), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("case", EXTREME_CASES, ids=[case.id for case in EXTREME_CASES])
def test_low_temperature_gives_finite_values_and_gradients(case):
    student, teacher = _logits(4, 50, seed=14, scale=3.0)
    student.requires_grad_(True)
    loss = case(student, teacher, temperature=1e-3)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=CASE_IDS)
def test_token_the_teacher_rules_out_gives_finite_exact_gradient(case):
    """A teacher log-probability of -100 (exp(100) overflows fp32) must not poison the gradient."""
    student = torch.zeros(1, 3, dtype=torch.float64)
    teacher = torch.tensor([[0.0, 1.0, -100.0]], dtype=torch.float64)
    reference_student = student.clone().requires_grad_(True)
    expected = case.reference(reference_student, teacher)
    expected.sum().backward()

    ours_student = student.float().requires_grad_(True)
    got = case(ours_student, teacher.float(), reduction="sum")
    got.backward()

    torch.testing.assert_close(got.double(), expected.sum(), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(ours_student.grad).all(), ours_student.grad
    scale = reference_student.grad.abs().max().item()
    torch.testing.assert_close(
        ours_student.grad.double(), reference_student.grad, rtol=1e-4, atol=1e-6 * (1 + scale)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=CASE_IDS)
def test_tokens_banned_in_both_models_contribute_nothing(case, dtype):
    student, teacher = _logits(3, 10, seed=12)
    student, teacher = student.to(dtype), teacher.to(dtype)
    banned = torch.zeros(10, dtype=torch.bool)
    banned[[0, 4, 9]] = True

    kept_student = student[:, ~banned].clone().requires_grad_(True)
    expected = case(kept_student, teacher[:, ~banned], reduction="none")
    expected.sum().backward()

    full_student = student.masked_fill(banned, -math.inf).requires_grad_(True)
    got = case(full_student, teacher.masked_fill(banned, -math.inf), reduction="none")
    got.sum().backward()

    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(full_student.grad[:, banned], torch.zeros_like(full_student.grad[:, banned]))
    torch.testing.assert_close(full_student.grad[:, ~banned], kept_student.grad)
