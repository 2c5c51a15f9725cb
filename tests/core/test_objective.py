"""DistillationObjective on logits: the loss contract against a float64 reference."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from abkd_trainer.core.objective import (
    IGNORE_INDEX,
    METRIC_SUMS,
    DistillationObjective,
    standardize_logits,
)


def _reference_ab(teacher_probs, student_probs, alpha, beta):
    """D_AB^(alpha, beta)(p || q) per row, closed form for alpha, beta, alpha + beta != 0."""
    s = alpha + beta
    terms = (
        teacher_probs ** (alpha + beta) / (beta * s)
        + student_probs ** (alpha + beta) / (alpha * s)
        - teacher_probs**alpha * student_probs**beta / (alpha * beta)
    )
    return terms.sum(-1)


def _config(**overrides):
    fields = dict(
        divergence="ab",
        alpha=0.8,
        beta=0.3,
        alpha_end=None,
        beta_end=None,
        ab_warmup_ratio=0.0,
        ab_warmup_steps=0,
        ab_warmup_start_alpha=1.0,
        ab_warmup_start_beta=0.0,
        ab_warmup_shape="linear",
        temperature=4.0,
        jsd_beta=0.5,
        skew_lambda=0.1,
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


@pytest.mark.parametrize("standardize", [False, True])
def test_classifier_logits_match_float64_reference(standardize):
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(6, 10, generator=generator, dtype=torch.float64) * 3
    teacher = torch.randn(6, 10, generator=generator, dtype=torch.float64) * 3
    labels = torch.tensor([0, 3, 9, 2, IGNORE_INDEX, 5])
    student.requires_grad_(True)
    objective = DistillationObjective.from_config(
        _config(), divergence_weight=2.5, ce_weight=0.7, logit_standardization=standardize
    )
    output = objective.loss_from_logits(
        student, teacher, labels, objective.divergence_params(0, 10)
    )

    counted = labels != IGNORE_INDEX
    ref_student = student.detach().clone().requires_grad_(True)
    s_in, t_in = ref_student, teacher
    if standardize:
        s_in = (s_in - s_in.mean(-1, keepdim=True)) / (s_in.std(-1, keepdim=True) + 1e-7)
        t_in = (t_in - t_in.mean(-1, keepdim=True)) / (t_in.std(-1, keepdim=True) + 1e-7)
    kd = _reference_ab(F.softmax(t_in / 4.0, -1), F.softmax(s_in / 4.0, -1), 0.8, 0.3)[counted]
    ce = F.cross_entropy(ref_student[counted], labels[counted], reduction="sum")
    reference = 2.5 * kd.sum() + 0.7 * ce
    reference.backward()
    output.loss_sum.backward()

    torch.testing.assert_close(output.loss_sum, reference, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(student.grad, ref_student.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(output.sums["kd_loss"], kd.sum().detach(), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(output.sums["ce_loss"], ce.detach(), rtol=1e-10, atol=1e-10)
    assert output.sums["num_supervised"].item() == 5
    assert set(output.sums) == set(METRIC_SUMS)
    agreement = (student.argmax(-1) == teacher.argmax(-1))[counted].sum()
    assert output.sums["teacher_agreement"].item() == agreement.item()


def test_zero_ce_weight_keeps_cross_entropy_out_of_the_graph():
    student = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    teacher = student.detach().clone()  # identical distributions: zero divergence, zero gradient
    labels = torch.tensor([0, 1, 2, 3])
    objective = DistillationObjective("fkl", divergence_weight=1.0, ce_weight=0.0)
    output = objective.loss_from_logits(student, teacher, labels, {})
    output.loss_sum.backward()
    assert output.sums["ce_loss"].item() > 0  # logged
    assert torch.allclose(student.grad, torch.zeros_like(student.grad), atol=1e-12)


def test_warmup_schedule_moves_alpha_beta_from_forward_kl():
    objective = DistillationObjective.from_config(
        _config(ab_warmup_ratio=1.0, alpha=0.2, beta=0.7), divergence_weight=1.0, ce_weight=0.0
    )
    assert objective.divergence_params(0, 10) == {"alpha": 1.0, "beta": 0.0}
    halfway = objective.divergence_params(5, 10)
    assert math.isclose(halfway["alpha"], 0.6) and math.isclose(halfway["beta"], 0.35)
    assert objective.divergence_params(10, 10) == {"alpha": 0.2, "beta": 0.7}


def test_non_ab_divergences_read_their_registry_fields():
    objective = DistillationObjective.from_config(
        _config(divergence="jsd", jsd_beta=0.25), divergence_weight=1.0, ce_weight=0.0
    )
    assert objective.divergence_params(3, 10) == {"beta": 0.25}
    with pytest.raises(ValueError, match="Unknown divergence 'nope'"):
        DistillationObjective("nope")


def test_vocab_size_cuts_padded_columns():
    student = torch.randn(3, 8, dtype=torch.float64)
    teacher = torch.randn(3, 8, dtype=torch.float64)
    labels = torch.tensor([0, 1, 4])
    cut = DistillationObjective("rkl", vocab_size=5).loss_from_logits(student, teacher, labels, {})
    exact = DistillationObjective("rkl").loss_from_logits(
        student[:, :5], teacher[:, :5], labels, {}
    )
    torch.testing.assert_close(cut.loss_sum, exact.loss_sum)


def test_standardized_constant_row_is_finite():
    row = torch.full((2, 4), 3.0)
    assert torch.equal(standardize_logits(row), torch.zeros(2, 4))
