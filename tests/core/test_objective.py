"""DistillationObjective: the loss contract against a float64 reference on logits, and the fused
routes (hidden states and heads) against the logits route."""

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
    HiddenStates,
    LinearHead,
    gradient_averaging_size,
    normalise_summed_loss,
    standardize_logits,
)
from abkd_trainer.divergences.coarsened import CachedTeacher
from abkd_trainer.divergences.projection import LogitTransform


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


# ----------------------------------------------------------------------------- fused routes


def _heads(seed: int, positions=(2, 6), hidden=8, rows=23, bias=True):
    """Float64 hidden states and a head with `rows` rows (padded beyond the vocabulary)."""
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(*positions, hidden, generator=generator, dtype=torch.float64)
    weight = torch.randn(rows, hidden, generator=generator, dtype=torch.float64) / hidden**0.5
    head_bias = torch.randn(rows, generator=generator, dtype=torch.float64) if bias else None
    return states, weight * 2.0, head_bias


def _logits(states, weight, bias, transform):
    """What the model computes: `transform(states @ weight.T + bias)`."""
    raw = F.linear(states, weight, bias) * transform.scale
    return (
        raw
        if transform.softcap is None
        else transform.softcap * torch.tanh(raw / transform.softcap)
    )


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def _targets(seed: int, shape=(2, 6), vocab=20):
    targets = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))
    targets[0, :2] = IGNORE_INDEX
    targets[1, -1] = IGNORE_INDEX
    return targets


def _assert_same_output(fused, logits, fused_grads, logits_grads):
    torch.testing.assert_close(fused.loss_sum, logits.loss_sum, rtol=1e-9, atol=1e-10)
    for name in METRIC_SUMS:
        torch.testing.assert_close(
            fused.sums[name].to(logits.sums[name].dtype), logits.sums[name], msg=name
        )
    for ours, theirs in zip(fused_grads, logits_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    ("divergence", "parameters"),
    [("ab", {"alpha": 0.2, "beta": 0.7}), ("jsd", {"beta": 0.5}), ("rkl", {})],
)
def test_hidden_states_route_equals_the_logits_route(divergence, parameters):
    """Live teacher: the fused objective on hidden states and heads (padded, soft-capped,
    scaled) equals the logits objective on the logits those heads produce, sums included."""
    vocab = 20
    objective = DistillationObjective(
        divergence,
        parameters=parameters,
        temperature=1.5,
        divergence_weight=0.7,
        ce_weight=0.3,
        vocab_size=vocab,
        chunk_size=4,
    )
    student_transform, teacher_transform = LogitTransform(0.8, 5.0), LogitTransform(softcap=7.0)
    student = _heads(1)
    teacher_states, teacher_weight, teacher_bias = _heads(2, hidden=12, rows=25)
    teacher_logits = _logits(teacher_states, teacher_weight, teacher_bias, teacher_transform)
    targets = _targets(3, vocab=vocab)

    logits_leaves = _leaves(*student)
    logits_route = objective.loss_from_logits(
        _logits(*logits_leaves, student_transform), teacher_logits, targets, parameters
    )
    logits_route.loss_sum.backward()

    fused_leaves = _leaves(*student)
    fused_route = objective.loss_from_hidden_states(
        HiddenStates(
            fused_leaves[0], LinearHead(fused_leaves[1], fused_leaves[2], student_transform)
        ),
        HiddenStates(teacher_states, LinearHead(teacher_weight, teacher_bias, teacher_transform)),
        targets,
        parameters,
    )
    fused_route.loss_sum.backward()
    _assert_same_output(
        fused_route,
        logits_route,
        [leaf.grad for leaf in fused_leaves],
        [leaf.grad for leaf in logits_leaves],
    )


@pytest.mark.parametrize("top_k", [3, 20])
def test_hidden_states_route_equals_the_logits_route_against_a_cache(top_k):
    vocab = 20
    objective = DistillationObjective(
        "ab", temperature=1.2, divergence_weight=0.6, ce_weight=0.4, vocab_size=vocab, chunk_size=3
    )
    parameters = {"alpha": 0.3, "beta": 0.5}
    targets = _targets(4, vocab=vocab)
    teacher_logits = torch.randn(2, 6, vocab, generator=torch.Generator().manual_seed(5)) * 3
    cached = CachedTeacher.from_logits(teacher_logits[targets != IGNORE_INDEX].double(), top_k)
    student, transform = _heads(6, bias=False), LogitTransform(softcap=4.0)

    logits_leaves = _leaves(*student)
    logits_route = objective.loss_from_logits(
        _logits(*logits_leaves, transform), cached, targets, parameters
    )
    logits_route.loss_sum.backward()
    fused_leaves = _leaves(*student)
    fused_route = objective.loss_from_hidden_states(
        HiddenStates(fused_leaves[0], LinearHead(fused_leaves[1], None, transform)),
        cached,
        targets,
        parameters,
    )
    fused_route.loss_sum.backward()
    _assert_same_output(
        fused_route,
        logits_route,
        [leaf.grad for leaf in fused_leaves[:2]],
        [leaf.grad for leaf in logits_leaves[:2]],
    )


def test_hidden_states_route_refuses_logit_standardization():
    states, weight, bias = _heads(7)
    head = HiddenStates(states, LinearHead(weight, bias))
    objective = DistillationObjective("fkl", vocab_size=20, logit_standardization=True)
    with pytest.raises(ValueError, match="loss_from_logits"):
        objective.loss_from_hidden_states(head, head, _targets(8), {})


@pytest.mark.parametrize(
    ("across_devices", "processes", "tp_size", "expected"),
    [(False, 4, 1, 1), (True, 4, 1, 4), (True, 4, 2, 2), (True, 1, 1, 1)],
)
def test_gradient_averaging_size_counts_data_parallel_processes_only(
    across_devices, processes, tp_size, expected
):
    assert gradient_averaging_size(across_devices, processes, tp_size) == expected
    # The loss is scaled back up by it only when the count covers every process.
    loss = normalise_summed_loss(torch.tensor(12.0), torch.tensor(3), 6, expected)
    assert loss.item() == 12.0 / 6 * expected
