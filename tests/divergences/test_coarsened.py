"""Divergences against a cached top-k teacher (issue 13).

Promises: with ``k = V`` the coarsened divergence is the registry divergence on full logits
(values and gradients, 1e-5); with ``k < V`` it equals a float64 reference built from the textbook
formulas on the ``k + 1`` buckets; the fused variant equals the logits variant.
"""

from __future__ import annotations

import math

import pytest
import torch
from divergence_cases import CASE_IDS, DIVERGENCE_CASES, ONE_PER_NAME, ONE_PER_NAME_IDS

from abkd_trainer.divergences.coarsened import (
    CachedTeacher,
    coarsened_divergence,
    coarsened_token_statistics,
    fused_linear_coarsened_divergence,
)
from abkd_trainer.divergences.statistics import token_statistics

RTOL = ATOL = 1e-5
VOCAB = 37


def _logits(seed: int, *shape: int, scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator) * scale


def _mask(shape: tuple[int, ...], seed: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=generator) > 0.3
    mask.view(-1)[0] = True
    return mask


def _cache(teacher_logits: torch.Tensor, mask: torch.Tensor | None, k: int) -> CachedTeacher:
    rows = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    if mask is not None:
        rows = rows[mask.reshape(-1)]
    return CachedTeacher.from_logits(rows, k)


def _reference_buckets(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 ``(n, k + 1)`` bucket log-probabilities of both sides, from probabilities."""
    buckets = []
    for logits in (student_logits, teacher_logits):
        probs = logits.double().softmax(-1)
        picked = probs.gather(-1, ids)
        tail = 1.0 - picked.sum(-1, keepdim=True)
        buckets.append(torch.cat([picked, tail], dim=-1).log())
    return buckets[0], buckets[1]


@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_full_k_equals_the_registry_divergence(case, temperature):
    student = _logits(0, 3, 5, VOCAB).requires_grad_(True)
    teacher = _logits(1, 3, 5, VOCAB)
    mask = _mask((3, 5))
    cached = _cache(teacher, mask, k=VOCAB)
    assert torch.isneginf(cached.tail_log_prob).all()

    expected = case(student, teacher, temperature=temperature, mask=mask, reduction="none")
    (expected_grad,) = torch.autograd.grad(expected.sum(), student)
    actual = coarsened_divergence(
        student,
        cached,
        case.name,
        divergence_params=case.params,
        temperature=temperature,
        mask=mask,
        reduction="none",
    )
    (actual_grad,) = torch.autograd.grad(actual.sum(), student)
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(actual_grad, expected_grad, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=CASE_IDS)
@pytest.mark.parametrize("k", [1, 4, VOCAB - 1])
def test_small_k_equals_float64_reference_of_the_coarsened_distributions(case, k):
    student = _logits(2, 12, VOCAB).requires_grad_(True)
    teacher = _logits(3, 12, VOCAB)
    temperature = 1.5
    cached = _cache(teacher, None, k)

    student64 = student.detach().double().requires_grad_(True)
    student_buckets, teacher_buckets = _reference_buckets(student64, teacher, cached.topk_ids)
    # The references take logits and apply log_softmax(x / T): bucket log-probabilities are
    # logits of the coarsened distributions, tempered as the module docstring defines.
    expected = case.reference(student_buckets, teacher_buckets, temperature=temperature)
    (expected_grad,) = torch.autograd.grad(expected.sum(), student64)

    actual = coarsened_divergence(
        student,
        cached,
        case.name,
        divergence_params=case.params,
        temperature=temperature,
        reduction="none",
    )
    (actual_grad,) = torch.autograd.grad(actual.sum(), student)
    torch.testing.assert_close(actual.double(), expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(actual_grad.double(), expected_grad, rtol=RTOL, atol=ATOL)


def test_coarsening_lowers_the_forward_kl_and_sums_to_one():
    student = _logits(4, 16, VOCAB)
    teacher = _logits(5, 16, VOCAB)
    full = coarsened_divergence(student, _cache(teacher, None, VOCAB), "fkl", reduction="none")
    values = [full]
    for k in (16, 4, 1):
        cached = _cache(teacher, None, k)
        total = cached.bucket_log_probs(torch.float64).exp().sum(-1)
        torch.testing.assert_close(total, torch.ones_like(total))
        values.append(coarsened_divergence(student, cached, "fkl", reduction="none"))
    # Data processing inequality: merging outcomes never increases an f-divergence.
    for finer, coarser in zip(values[:-1], values[1:], strict=True):
        assert bool((coarser <= finer + 1e-6).all())


def test_reductions_and_empty_mask():
    student = _logits(6, 2, 4, VOCAB).requires_grad_(True)
    teacher = _logits(7, 2, 4, VOCAB)
    mask = _mask((2, 4))
    cached = _cache(teacher, mask, 5)
    per_position = coarsened_divergence(student, cached, "fkl", mask=mask, reduction="none")
    assert per_position.shape == (2, 4) and bool((per_position[~mask] == 0).all())
    total = coarsened_divergence(student, cached, "fkl", mask=mask, reduction="sum")
    mean = coarsened_divergence(student, cached, "fkl", mask=mask, reduction="mean")
    torch.testing.assert_close(total, per_position.sum())
    torch.testing.assert_close(mean, total / mask.sum())

    empty = torch.zeros(2, 4, dtype=torch.bool)
    none_cached = _cache(teacher, empty, 5)
    zero = coarsened_divergence(student, none_cached, "ab", mask=empty, reduction="mean",
                                divergence_params={"alpha": 0.2, "beta": 0.7})  # fmt: skip
    zero.backward()
    assert zero.item() == 0.0 and bool((student.grad == 0).all())


def test_mismatched_cache_is_refused():
    student = _logits(8, 6, VOCAB)
    cached = _cache(_logits(9, 6, VOCAB), None, 3)
    with pytest.raises(ValueError, match="one row per counted"):
        coarsened_divergence(student[:5], cached, "fkl")
    bad_ids = CachedTeacher(cached.topk_ids + VOCAB, cached.topk_log_probs, cached.tail_log_prob)
    with pytest.raises(ValueError, match="vocabulary"):
        coarsened_divergence(student, bad_ids, "fkl")


def _heads(seed: int, vocab_rows: int, hidden: int = 8, bias: bool = True):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab_rows, hidden, generator=generator)
    head_bias = torch.randn(vocab_rows, generator=generator) if bias else None
    return weight, head_bias


@pytest.mark.parametrize("case", ONE_PER_NAME, ids=ONE_PER_NAME_IDS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_fused_equals_logits_path(case, reduction):
    vocab, padded_rows, k = 29, 32, 6
    hidden = _logits(10, 3, 7, 8, scale=1.0)
    weight, bias = _heads(11, padded_rows)
    labels = torch.randint(0, vocab, (3, 7), generator=torch.Generator().manual_seed(12))
    labels[0, :2] = -100
    labels[2, 5] = -100
    mask = labels != -100
    softcap, scale = 20.0, 0.8
    teacher_logits = _logits(13, 3, 7, vocab)
    cached = _cache(teacher_logits, mask, k)

    def leaves():
        return [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]

    h, w, b = leaves()
    logits = (torch.nn.functional.linear(h, w, b) * scale / softcap).tanh() * softcap
    divergence = coarsened_divergence(
        logits[..., :vocab], cached, case.name, divergence_params=case.params,
        temperature=1.3, mask=mask, reduction=reduction,
    )  # fmt: skip
    cross_entropy = torch.nn.functional.cross_entropy(
        logits[..., :vocab][mask], labels[mask], reduction="none"
    )
    ce = {"sum": cross_entropy.sum(), "mean": cross_entropy.mean()}.get(reduction)
    if ce is None:
        ce = torch.zeros(3, 7).masked_scatter(mask, cross_entropy)
    expected = 0.7 * divergence + 0.3 * ce
    expected_grads = torch.autograd.grad(expected.sum(), (h, w, b))

    h, w, b = leaves()
    output = fused_linear_coarsened_divergence(
        h, w, cached, case.name, divergence_params=case.params, temperature=1.3,
        reduction=reduction, student_bias=b, student_logit_scale=scale,
        student_logit_softcap=softcap, vocab_size=vocab, labels=labels,
        divergence_weight=0.7, ce_weight=0.3, chunk_size=5,
    )  # fmt: skip
    actual_grads = torch.autograd.grad(output.loss.sum(), (h, w, b))
    torch.testing.assert_close(output.loss, expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(output.divergence, divergence.detach(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(output.cross_entropy, ce.detach(), rtol=RTOL, atol=ATOL)
    for actual_grad, expected_grad in zip(actual_grads, expected_grads, strict=True):
        torch.testing.assert_close(actual_grad, expected_grad, rtol=RTOL, atol=ATOL)
    assert output.num_tokens.item() == mask.sum().item()
    # The logged statistics: the fused pass's equal those of the materialised logits.
    statistics = coarsened_token_statistics(logits[..., :vocab].detach(), cached, labels, mask)
    if reduction != "none":
        scale = 1.0 if reduction == "sum" else 1.0 / mask.sum().item()
        for name in ("teacher_agreement", "student_entropy", "teacher_entropy", "token_accuracy"):
            expected_value = getattr(statistics, name) * scale
            torch.testing.assert_close(getattr(output, name), expected_value, msg=name)


def test_full_k_statistics_equal_the_live_teachers():
    student, teacher = _logits(20, 2, 6, VOCAB), _logits(21, 2, 6, VOCAB)
    targets = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(22))
    mask = _mask((2, 6))
    cached = coarsened_token_statistics(student, _cache(teacher, mask, VOCAB), targets, mask)
    live = token_statistics(student, teacher, targets, mask)
    for name in live._fields:
        torch.testing.assert_close(getattr(cached, name), getattr(live, name), msg=name)
    # With k < V the teacher's entropy is that of its coarsened distribution: smaller.
    coarse = coarsened_token_statistics(student, _cache(teacher, mask, 3), targets, mask)
    assert coarse.teacher_entropy < live.teacher_entropy
    assert coarse.student_entropy == live.student_entropy


def test_fused_without_grad_and_without_labels():
    vocab, k = 23, 23
    hidden = _logits(14, 9, 8, scale=1.0)
    weight, _ = _heads(15, vocab, bias=False)
    teacher_logits = _logits(16, 9, vocab)
    cached = _cache(teacher_logits, None, k)
    with torch.no_grad():
        fused = fused_linear_coarsened_divergence(hidden, weight, cached, "jsd", reduction="mean")
    from abkd_trainer.divergences import generalized_jsd

    expected = generalized_jsd(hidden @ weight.T, teacher_logits, beta=0.5)
    assert math.isclose(fused.item(), expected.item(), rel_tol=1e-5, abs_tol=1e-6)
