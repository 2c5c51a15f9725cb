"""Baselines (FKL, RKL, JSD, skew KLs, TVD) and every AB case: values, gradients, TRL agreement."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from divergence_cases import CASE_IDS, DIVERGENCE_CASES

from abkd_trainer.divergences import forward_kl, generalized_jsd


@pytest.fixture(scope="module")
def logits64() -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher logits ``(2, 5, 11)`` in float64."""
    generator = torch.Generator().manual_seed(2)
    student = 2.0 * torch.randn(2, 5, 11, dtype=torch.float64, generator=generator)
    teacher = 2.0 * torch.randn(2, 5, 11, dtype=torch.float64, generator=generator)
    return student, teacher


@pytest.fixture(scope="module")
def trl_generalized_jsd_loss():
    """TRL's own implementation, ``GKDTrainer.generalized_jsd_loss`` (a static method)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "You are importing from 'trl.experimental'"
        from trl.experimental.gkd import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=CASE_IDS)
def test_fp32_values_match_float64_reference(logits64, case, temperature):
    student, teacher = logits64
    expected = case.reference(student, teacher, temperature=temperature)
    got = case(student.float(), teacher.float(), temperature=temperature, reduction="none")
    assert got.dtype == torch.float32 and got.shape == student.shape[:-1]
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=CASE_IDS)
def test_fp32_gradient_matches_float64_reference_autograd(logits64, case):
    student, teacher = logits64
    reference_student = student.clone().requires_grad_(True)
    case.reference(reference_student, teacher).sum().backward()
    expected = reference_student.grad

    ours_student = student.float().requires_grad_(True)
    case(ours_student, teacher.float(), reduction="sum").backward()
    scale = expected.abs().max().item()
    torch.testing.assert_close(
        ours_student.grad.double(), expected, rtol=2e-5, atol=1e-7 + 2e-6 * scale
    )


@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=CASE_IDS)
def test_gradcheck_in_float64_with_mask(case):
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(2, 3, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    teacher = torch.randn(2, 3, 5, dtype=torch.float64, generator=generator)
    mask = torch.tensor([[True, True, False], [False, True, True]])

    def loss(student_logits: torch.Tensor) -> torch.Tensor:
        return case(student_logits, teacher, mask=mask, reduction="mean", chunk_size=2)

    assert torch.autograd.gradcheck(loss, (student,))


def test_forward_kl_is_torch_kl_div_with_teacher_entropy_included(logits64):
    student, teacher = logits64[0].float(), logits64[1].float()
    student_log_probs = torch.log_softmax(student, dim=-1)
    teacher_log_probs = torch.log_softmax(teacher, dim=-1)
    expected = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    got = forward_kl(student, teacher, reduction="none")
    torch.testing.assert_close(got, expected.sum(dim=-1), rtol=1e-5, atol=1e-6)

    # A cross-entropy-only "KL" would report the teacher entropy for identical distributions.
    teacher_entropy = -(teacher_log_probs.exp() * teacher_log_probs).sum(dim=-1)
    assert teacher_entropy.min() > 0.1
    assert forward_kl(teacher, teacher, reduction="none").abs().max() < 1e-6


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_generalized_jsd_matches_trl_gkd_trainer(
    logits64, trl_generalized_jsd_loss, beta, temperature
):
    student, teacher = logits64[0].float(), logits64[1].float()
    labels = torch.ones(student.shape[:-1], dtype=torch.long)
    labels[0, :2] = -100
    labels[1, 4] = -100

    trl_student = student.clone().requires_grad_(True)
    # TRL's default reduction "batchmean" with labels: sum over supervised tokens / their count.
    expected = trl_generalized_jsd_loss(
        trl_student, teacher, labels=labels, beta=beta, temperature=temperature
    )
    expected.backward()

    ours_student = student.clone().requires_grad_(True)
    got = generalized_jsd(ours_student, teacher, beta, temperature=temperature, mask=labels != -100)
    got.backward()

    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours_student.grad, trl_student.grad, rtol=1e-4, atol=1e-7)
