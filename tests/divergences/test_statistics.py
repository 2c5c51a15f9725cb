"""Per-token statistics: entropies, agreement and accuracy, and how non-finite rows show."""

from __future__ import annotations

import math

import pytest
import torch

from abkd_trainer.divergences.statistics import (
    log_probs_and_entropy,
    row_statistics,
    token_statistics,
)


def reference_entropy(logits: torch.Tensor) -> torch.Tensor:
    probs = logits.double().softmax(-1)
    return -torch.special.xlogy(probs, probs).sum(-1)


def random_logits(*shape, seed=0, scale=3.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_entropy_matches_float64_in_fp32_and_bf16():
    logits = random_logits(6, 50)
    for dtype in (torch.float32, torch.bfloat16):
        _, _, entropy = log_probs_and_entropy(logits.to(dtype))
        assert entropy.dtype == torch.float32
        torch.testing.assert_close(
            entropy.double(), reference_entropy(logits.to(dtype)), rtol=1e-5, atol=1e-5
        )


def test_banned_tokens_contribute_nothing_and_extreme_logits_stay_finite():
    logits = random_logits(2, 10)
    logits[0, :4] = -math.inf  # banned tokens
    logits[1] = 0.0
    logits[1, 3] = 1e4  # one-hot in all but name
    _, _, entropy = log_probs_and_entropy(logits)
    torch.testing.assert_close(entropy[0].double(), reference_entropy(logits[0:1, 4:])[0])
    assert entropy[1].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_rows_give_a_nan_entropy_and_never_agree(bad):
    student = random_logits(3, 8, seed=1)
    teacher = student.clone()  # every row agrees...
    teacher[1, 2] = bad  # ...but this one is broken
    labels = student.argmax(-1)
    statistics = row_statistics(student, teacher, labels)
    assert torch.isnan(statistics.teacher_entropy[1])
    assert torch.isfinite(statistics.teacher_entropy[[0, 2]]).all()
    assert statistics.teacher_agreement.tolist() == [1.0, 0.0, 1.0]
    assert statistics.token_accuracy.tolist() == [1.0, 1.0, 1.0]  # the student is fine
    student[2] = math.nan
    statistics = row_statistics(student, teacher, labels)
    assert statistics.teacher_agreement.tolist() == [1.0, 0.0, 0.0]
    assert statistics.token_accuracy.tolist() == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_token_statistics_sums_over_supervised_positions_only(chunk_size):
    student = random_logits(2, 5, 11, seed=2)
    teacher = random_logits(2, 5, 11, seed=3)
    targets = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[False, True, True, True, False], [True, True, False, False, False]])
    targets[~mask] = -100
    targets[0, 1] = student[0, 1].argmax()  # at least one correct token
    sums = token_statistics(student, teacher, targets, mask, chunk_size)
    rows = mask.nonzero(as_tuple=True)
    assert sums.student_entropy.item() == pytest.approx(
        reference_entropy(student[rows]).sum().item(), rel=1e-6
    )
    assert sums.teacher_entropy.item() == pytest.approx(
        reference_entropy(teacher[rows]).sum().item(), rel=1e-6
    )
    agree = student[rows].argmax(-1) == teacher[rows].argmax(-1)
    assert sums.teacher_agreement.item() == agree.sum().item()
    correct = student[rows].argmax(-1) == targets[rows]
    assert sums.token_accuracy.item() == correct.sum().item() >= 1
