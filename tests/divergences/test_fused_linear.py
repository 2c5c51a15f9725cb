"""The fused linear divergences: the logits-based values and gradients, without the logits.

Promise (issue 6): ``fused_linear_*`` on hidden states and LM heads equal the registry's functions
on the materialised ``transform(hidden @ weight.T + bias)[..., :vocab_size]`` logits (values and
every gradient of the student's hidden states, head weight and bias), for every divergence, mask,
temperature, soft-capping and padded vocabulary, while no tensor anywhere near ``(N, V)`` exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from divergence_cases import CASE_IDS, DIVERGENCE_CASES, ONE_PER_NAME, ONE_PER_NAME_IDS
from torch.profiler import ProfilerActivity, profile

import abkd_trainer
from abkd_trainer.divergences import ab_divergence, fused_tiles
from abkd_trainer.divergences.fused_linear import (
    ACCELERATOR_PROJECTION_ELEMENTS,
    CPU_PROJECTION_ELEMENTS,
    MIN_PROJECTION_ROWS,
    FusedLinearDistillationOutput,
    default_fused_chunk_size,
    fused_linear_ab_divergence,
    fused_linear_divergence,
)
from abkd_trainer.divergences.pointwise import ABDivergence

# Tolerance of the issue: the fused path equals the materialised one to 1e-5.
RTOL = ATOL = 1e-5


@dataclass
class Heads:
    """Random student/teacher hidden states and LM heads; the teacher is wider (H_t != H_s)."""

    student_hidden: torch.Tensor  # (..., H_s)
    student_weight: torch.Tensor  # (V_s, H_s)
    student_bias: torch.Tensor | None  # (V_s,)
    teacher_hidden: torch.Tensor  # (..., H_t)
    teacher_weight: torch.Tensor  # (V_t, H_t)
    teacher_bias: torch.Tensor | None  # (V_t,)

    @property
    def student_leaves(self) -> list[torch.Tensor]:
        leaves = [self.student_hidden, self.student_weight]
        return leaves + ([self.student_bias] if self.student_bias is not None else [])

    def fresh(self) -> Heads:
        """A copy whose student tensors are new leaves (so each path gets its own .grad)."""

        def leaf(tensor):
            return None if tensor is None else tensor.detach().clone().requires_grad_(True)

        return Heads(
            leaf(self.student_hidden),
            leaf(self.student_weight),
            leaf(self.student_bias),
            self.teacher_hidden,
            self.teacher_weight,
            self.teacher_bias,
        )


def make_heads(
    positions: tuple[int, ...] = (13,),
    vocab: int = 29,
    *,
    student_rows: int | None = None,
    teacher_rows: int | None = None,
    hidden_student: int = 8,
    hidden_teacher: int = 12,
    bias: bool = True,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> Heads:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(dtype)

    student_rows = student_rows or vocab
    teacher_rows = teacher_rows or vocab
    # Weights scaled so that logits have a spread of a few nats, as trained heads do.
    heads = Heads(
        randn(*positions, hidden_student),
        randn(student_rows, hidden_student, scale=2.0 / math.sqrt(hidden_student)),
        randn(student_rows, scale=0.5) if bias else None,
        randn(*positions, hidden_teacher),
        randn(teacher_rows, hidden_teacher, scale=3.0 / math.sqrt(hidden_teacher)),
        randn(teacher_rows, scale=0.5) if bias else None,
    )
    return heads.fresh()


def transform(raw: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """The models' logit post-processing, written out for the reference."""
    logits = raw * scale
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def materialised_logits(heads: Heads, vocab_size: int | None = None, **transforms):
    """``(student, teacher)`` logits as the models compute them, cut to ``vocab_size``."""
    student = heads.student_hidden @ heads.student_weight.T
    teacher = heads.teacher_hidden @ heads.teacher_weight.T
    if heads.student_bias is not None:
        student = student + heads.student_bias
        teacher = teacher + heads.teacher_bias
    student = transform(
        student,
        transforms.get("student_logit_scale", 1.0),
        transforms.get("student_logit_softcap"),
    )
    teacher = transform(
        teacher,
        transforms.get("teacher_logit_scale", 1.0),
        transforms.get("teacher_logit_softcap"),
    )
    return student[..., :vocab_size], teacher[..., :vocab_size]


def backward_weights(values: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """Distinct upstream gradients per position, so "none" is checked row by row."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(values.shape, generator=generator, dtype=values.dtype) + 0.5


def fused_kwargs(heads: Heads) -> dict:
    return {"student_bias": heads.student_bias, "teacher_bias": heads.teacher_bias}


def assert_same_values_and_grads(reference_fn, fused_fn, heads: Heads):
    """Run both on fresh copies of ``heads``; compare values and every student gradient."""
    reference_heads, fused_heads = heads.fresh(), heads.fresh()
    expected = reference_fn(reference_heads)
    actual = fused_fn(fused_heads)
    torch.testing.assert_close(actual.detach(), expected.detach(), rtol=RTOL, atol=ATOL)
    weights = backward_weights(expected)
    (expected * weights).sum().backward()
    (actual * weights.to(actual.dtype)).sum().backward()
    names = ("hidden", "weight", "bias")
    for name, ours, theirs in zip(
        names, fused_heads.student_leaves, reference_heads.student_leaves, strict=False
    ):
        assert ours.grad is not None, f"no gradient for the student's {name}"
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=RTOL, atol=ATOL, msg=name)


# ----------------------------------------------------------------------------- equality


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=CASE_IDS)
def test_every_divergence_equals_the_materialised_path(case, reduction):
    heads = make_heads(positions=(2, 7), seed=1)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 2] = mask[1, 0] = mask[1, 5] = False

    def reference(h):
        student, teacher = materialised_logits(h)
        return case(student, teacher, mask=mask, reduction=reduction)

    def fused(h):
        return fused_linear_divergence(
            h.student_hidden,
            h.student_weight,
            h.teacher_hidden,
            h.teacher_weight,
            case.name,
            divergence_params=case.params,
            mask=mask,
            reduction=reduction,
            chunk_size=3,
            **fused_kwargs(h),
        )

    assert_same_values_and_grads(reference, fused, heads)


@pytest.mark.parametrize(
    ("alpha", "beta"),
    [(0.2, 0.7), (1.0, 0.0), (0.0, 1.0), (0.0, 0.0), (0.5, -0.5), (-0.3, 0.9), (0.8, 0.3)],
)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_ab_special_cases_and_temperature_in_float32(alpha, beta, temperature):
    """fp32 end to end (as trained), every AB special case, at three temperatures."""
    heads = make_heads(positions=(24,), vocab=37, dtype=torch.float32, seed=2)

    def reference(h):
        student, teacher = materialised_logits(h)
        return ab_divergence(
            student, teacher, alpha, beta, temperature=temperature, reduction="none"
        )

    def fused(h):
        return fused_linear_ab_divergence(
            h.student_hidden,
            h.student_weight,
            h.teacher_hidden,
            h.teacher_weight,
            alpha,
            beta,
            temperature=temperature,
            reduction="none",
            chunk_size=5,
            **fused_kwargs(h),
        )

    assert_same_values_and_grads(reference, fused, heads)


@pytest.mark.parametrize(
    "transforms",
    [
        {"student_logit_softcap": 3.0, "teacher_logit_softcap": 4.0},
        {"student_logit_scale": 0.5, "teacher_logit_scale": 2.0},
        {
            "student_logit_scale": 1.5,
            "student_logit_softcap": 2.0,
            "teacher_logit_scale": 0.7,
            "teacher_logit_softcap": 30.0,
        },
    ],
    ids=["softcap", "scale", "scale+softcap"],
)
@pytest.mark.parametrize("case", ONE_PER_NAME, ids=ONE_PER_NAME_IDS)
def test_logit_scaling_and_soft_capping(case, transforms):
    heads = make_heads(seed=3)

    def reference(h):
        student, teacher = materialised_logits(h, **transforms)
        return case(student, teacher, temperature=1.5, reduction="none")

    def fused(h):
        return fused_linear_divergence(
            h.student_hidden,
            h.student_weight,
            h.teacher_hidden,
            h.teacher_weight,
            case.name,
            divergence_params=case.params,
            temperature=1.5,
            reduction="none",
            chunk_size=4,
            **transforms,
            **fused_kwargs(h),
        )

    assert_same_values_and_grads(reference, fused, heads)


@pytest.mark.parametrize(
    ("student_rows", "teacher_rows"),
    [(29, 32), (35, 29), (33, 40)],
    ids=["teacher", "student", "both"],
)
def test_padded_vocabularies_are_cut_to_vocab_size(student_rows, teacher_rows):
    vocab = 29
    heads = make_heads(vocab=vocab, student_rows=student_rows, teacher_rows=teacher_rows, seed=4)

    def reference(h):
        student, teacher = materialised_logits(h, vocab_size=vocab)
        return ab_divergence(student, teacher, 0.2, 0.7, reduction="none")

    def fused(h):
        return fused_linear_ab_divergence(
            h.student_hidden,
            h.student_weight,
            h.teacher_hidden,
            h.teacher_weight,
            0.2,
            0.7,
            vocab_size=vocab,
            reduction="none",
            **fused_kwargs(h),
        )

    assert_same_values_and_grads(reference, fused, heads)
    # The padded rows of the student's head get exactly zero gradient.
    loss = fused(heads)
    loss.sum().backward()
    assert heads.student_weight.grad.shape == (student_rows, 8)
    assert torch.all(heads.student_weight.grad[vocab:] == 0)
    assert torch.all(heads.student_bias.grad[vocab:] == 0)


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 13, 100, None])
@pytest.mark.parametrize("pointwise_rows", [1, 3, 1000])
def test_tiling_changes_nothing(chunk_size, pointwise_rows, monkeypatch):
    """Projection tiles of ``chunk_size`` rows and divergence tiles of ``pointwise_rows`` rows."""
    vocab = 29
    # Per thread; tests run on one (conftest).
    monkeypatch.setattr(fused_tiles, "CPU_POINTWISE_ELEMENTS_PER_THREAD", pointwise_rows * vocab)
    heads = make_heads(vocab=vocab, seed=5)
    labels = torch.randint(0, vocab, (13,), generator=torch.Generator().manual_seed(5))
    labels[[1, 6]] = -100

    def run(h, chunk):
        return fused_linear_ab_divergence(
            h.student_hidden,
            h.student_weight,
            h.teacher_hidden,
            h.teacher_weight,
            0.2,
            0.7,
            labels=labels,
            ce_weight=0.5,
            reduction="none",
            chunk_size=chunk,
            **fused_kwargs(h),
        ).loss

    def untiled(h):
        with monkeypatch.context() as patch:
            patch.setattr(fused_tiles, "CPU_POINTWISE_ELEMENTS_PER_THREAD", 10**9)
            return run(h, 10**6)

    assert_same_values_and_grads(untiled, lambda h: run(h, chunk_size), heads)


def test_student_without_bias_and_three_dimensional_inputs():
    heads = make_heads(positions=(3, 4), bias=False, seed=6)
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)

    def reference(h):
        student, teacher = materialised_logits(h)
        return ab_divergence(student, teacher, 0.2, 0.7, mask=mask, reduction="none")

    def fused(h):
        return fused_linear_ab_divergence(
            h.student_hidden, h.student_weight, h.teacher_hidden, h.teacher_weight, 0.2, 0.7,
            mask=mask, reduction="none",
        )  # fmt: skip

    assert_same_values_and_grads(reference, fused, heads)
    values = fused(heads.fresh())
    assert values.shape == (3, 4)
    assert torch.all(values[~mask] == 0)


def test_gradcheck_of_both_autograd_paths():
    """Finite differences through the per-row (recompute) and scalar (precompute) backward."""
    heads = make_heads(positions=(5,), vocab=7, hidden_student=3, hidden_teacher=4, seed=7)
    mask = torch.tensor([True, False, True, True, True])
    labels = torch.tensor([1, 3, -100, 6, 0])

    def per_row(hidden, weight, bias):
        return fused_linear_ab_divergence(
            hidden, weight, heads.teacher_hidden, heads.teacher_weight, 0.3, 0.6,
            mask=mask, reduction="none", student_bias=bias, teacher_bias=heads.teacher_bias,
            student_logit_softcap=2.0, temperature=1.3, chunk_size=2,
        )  # fmt: skip

    def scalar(hidden, weight, bias):
        return fused_linear_ab_divergence(
            hidden, weight, heads.teacher_hidden, heads.teacher_weight, 0.3, 0.6,
            labels=labels, ce_weight=0.4, divergence_weight=0.6, reduction="mean",
            student_bias=bias, teacher_bias=heads.teacher_bias, chunk_size=2,
        ).loss  # fmt: skip

    inputs = tuple(heads.student_leaves)
    assert torch.autograd.gradcheck(per_row, inputs)
    assert torch.autograd.gradcheck(scalar, inputs)


def test_a_kept_graph_gives_the_same_gradient_twice():
    heads = make_heads(seed=8)
    loss = fused_linear_ab_divergence(
        heads.student_hidden, heads.student_weight, heads.teacher_hidden, heads.teacher_weight,
        0.2, 0.7, **fused_kwargs(heads),
    )  # fmt: skip
    loss.backward(retain_graph=True)
    first = [leaf.grad.clone() for leaf in heads.student_leaves]
    loss.backward()
    for once, leaf in zip(first, heads.student_leaves, strict=True):
        torch.testing.assert_close(leaf.grad, 2 * once)


# ------------------------------------------------------------------ labels: CE and metrics


@pytest.mark.parametrize(("divergence_weight", "ce_weight"), [(1.0, 0.0), (0.3, 0.7), (0.0, 1.0)])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_cross_entropy_and_agreement_in_the_same_pass(divergence_weight, ce_weight, reduction):
    heads = make_heads(positions=(2, 9), vocab=31, seed=9, dtype=torch.float32)
    labels = torch.randint(0, 31, (2, 9), generator=torch.Generator().manual_seed(9))
    labels[0, :3] = -100  # e.g. prompt tokens
    supervised = labels != -100

    def reference_parts(h):
        student, teacher = materialised_logits(h)
        divergence = ab_divergence(student, teacher, 0.2, 0.7, mask=supervised, reduction="none")
        cross_entropy = F.cross_entropy(
            student.flatten(0, 1), labels.flatten(), reduction="none"
        ).view_as(labels)  # 0 where ignored
        agreement = (student.argmax(-1) == teacher.argmax(-1)) & supervised
        return divergence, cross_entropy, agreement.float()

    def reduce(values):
        if reduction == "none":
            return values
        total = values.sum()
        return total if reduction == "sum" else total / supervised.sum()

    def reference(h):
        divergence, cross_entropy, _ = reference_parts(h)
        return reduce(divergence_weight * divergence + ce_weight * cross_entropy)

    def fused_output(h) -> FusedLinearDistillationOutput:
        return fused_linear_ab_divergence(
            h.student_hidden,
            h.student_weight,
            h.teacher_hidden,
            h.teacher_weight,
            0.2,
            0.7,
            labels=labels,
            divergence_weight=divergence_weight,
            ce_weight=ce_weight,
            reduction=reduction,
            chunk_size=4,
            **fused_kwargs(h),
        )

    assert_same_values_and_grads(reference, lambda h: fused_output(h).loss, heads)

    output = fused_output(heads.fresh())
    divergence, cross_entropy, agreement = reference_parts(heads.fresh())
    torch.testing.assert_close(output.divergence, reduce(divergence), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(output.cross_entropy, reduce(cross_entropy), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(output.teacher_agreement, reduce(agreement))
    assert int(output.num_tokens) == int(supervised.sum())
    for detached in (output.divergence, output.cross_entropy, output.teacher_agreement):
        assert not detached.requires_grad


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("transforms", [{}, {"student_logit_softcap": 3.0}])
def test_entropies_and_accuracy_match_a_float64_reference(temperature, transforms):
    """Both models' entropies at temperature 1 (whatever the loss temperature) and the student's
    token accuracy, from the tiles of the loss pass, against the textbook formulas in float64."""
    heads = make_heads(positions=(3, 7), vocab=37, student_rows=40, seed=21, dtype=torch.float32)
    labels = torch.randint(0, 37, (3, 7), generator=torch.Generator().manual_seed(21))
    labels[1, :4] = -100
    supervised = labels != -100
    output = fused_linear_divergence(
        heads.student_hidden,
        heads.student_weight,
        heads.teacher_hidden,
        heads.teacher_weight,
        "ab",
        divergence_params={"alpha": 0.2, "beta": 0.7},
        temperature=temperature,
        labels=labels,
        reduction="none",
        vocab_size=37,
        chunk_size=5,
        **fused_kwargs(heads),
        **transforms,
    )
    student, teacher = (
        logits.detach().double()
        for logits in materialised_logits(heads.fresh(), vocab_size=37, **transforms)
    )

    def entropy(logits):
        probs = logits.softmax(-1)
        return -(probs * probs.log()).sum(-1) * supervised

    torch.testing.assert_close(
        output.student_entropy.double(), entropy(student), rtol=RTOL, atol=ATOL
    )
    torch.testing.assert_close(
        output.teacher_entropy.double(), entropy(teacher), rtol=RTOL, atol=ATOL
    )
    accuracy = ((student.argmax(-1) == labels) & supervised).float()
    torch.testing.assert_close(output.token_accuracy, accuracy)
    for detached in (output.student_entropy, output.teacher_entropy, output.token_accuracy):
        assert not detached.requires_grad


def test_an_all_masked_batch_gives_zero_with_a_connected_graph():
    heads = make_heads(seed=10)
    labels = torch.full((13,), -100)
    output = fused_linear_ab_divergence(
        heads.student_hidden, heads.student_weight, heads.teacher_hidden, heads.teacher_weight,
        0.2, 0.7, labels=labels, ce_weight=0.5, **fused_kwargs(heads),
    )  # fmt: skip
    assert output.loss.item() == 0.0 and int(output.num_tokens) == 0
    assert output.loss.requires_grad
    output.loss.backward()
    for leaf in heads.student_leaves:
        assert torch.all(leaf.grad == 0)


# ------------------------------------------------------------------ memory, dtypes, modes


@pytest.mark.parametrize("case", ONE_PER_NAME, ids=ONE_PER_NAME_IDS)
def test_no_allocation_comes_near_the_logits_size(case):
    """Profiles every allocation of forward+backward: nothing reaches 1/4 of one (N, V) tensor."""
    num_tokens, vocab = 256, 1024
    heads = make_heads(positions=(num_tokens,), vocab=vocab, dtype=torch.float32, seed=11)
    labels = torch.randint(0, vocab, (num_tokens,), generator=torch.Generator().manual_seed(11))
    logits_bytes = num_tokens * vocab * 4
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        output = fused_linear_divergence(
            heads.student_hidden, heads.student_weight, heads.teacher_hidden,
            heads.teacher_weight, case.name, divergence_params=case.params, labels=labels,
            ce_weight=0.5, chunk_size=16, **fused_kwargs(heads),
        )  # fmt: skip
        output.loss.backward()
    largest = max(event.self_cpu_memory_usage for event in profiler.events())
    assert largest < logits_bytes // 4
    assert all(torch.isfinite(leaf.grad).all() for leaf in heads.student_leaves)


@pytest.mark.parametrize(
    ("device", "elements"),
    [("cpu", CPU_PROJECTION_ELEMENTS), ("cuda", ACCELERATOR_PROJECTION_ELEMENTS)],
)
def test_default_projection_tile_size(device, elements):
    for vocab in (1, 4096, 50257, 151936, 2**26):
        rows = default_fused_chunk_size(vocab, device)
        # Enough rows for the GEMMs, and no more than the element budget beyond that minimum.
        assert rows >= MIN_PROJECTION_ROWS
        assert rows == MIN_PROJECTION_ROWS or rows * vocab <= elements < (rows + 1) * vocab


def test_no_gradient_work_without_grad_mode():
    # The head (512 x 256) is 8x larger than a projection buffer (16 x 512).
    heads = make_heads(positions=(64,), vocab=512, hidden_student=256, dtype=torch.float32, seed=12)
    kwargs = {"chunk_size": 16, **fused_kwargs(heads)}
    args = (heads.student_hidden, heads.student_weight, heads.teacher_hidden, heads.teacher_weight)
    with_grad = fused_linear_ab_divergence(*args, 0.2, 0.7, **kwargs)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        with torch.no_grad():
            without_grad = fused_linear_ab_divergence(*args, 0.2, 0.7, **kwargs)
    assert without_grad.grad_fn is None
    torch.testing.assert_close(without_grad, with_grad.detach())
    # A weight-sized fp32 gradient accumulator would show up as an allocation this large.
    weight_bytes = heads.student_weight.numel() * 4
    assert all(event.self_cpu_memory_usage < weight_bytes for event in profiler.events())


def test_teacher_gets_no_gradient():
    heads = make_heads(seed=13)
    teacher_hidden = heads.teacher_hidden.clone().requires_grad_(True)
    teacher_weight = heads.teacher_weight.clone().requires_grad_(True)
    fused_linear_ab_divergence(
        heads.student_hidden, heads.student_weight, teacher_hidden, teacher_weight, 0.2, 0.7
    ).backward()
    assert teacher_hidden.grad is None and teacher_weight.grad is None
    assert heads.student_weight.grad is not None


def test_bfloat16_matches_the_materialised_bfloat16_path():
    """16-bit models: fp32 math inside, gradients returned in the parameters' dtype."""
    heads = make_heads(positions=(16,), vocab=64, dtype=torch.bfloat16, seed=14)
    reference_heads = heads.fresh()
    student, teacher = materialised_logits(reference_heads)
    expected = ab_divergence(student, teacher, 0.2, 0.7)
    expected.backward()
    actual = fused_linear_ab_divergence(
        heads.student_hidden, heads.student_weight, heads.teacher_hidden, heads.teacher_weight,
        0.2, 0.7, **fused_kwargs(heads),
    )  # fmt: skip
    actual.backward()
    assert actual.dtype == torch.float32
    # The materialised logits are rounded to bf16, the fused ones are not: bf16-level agreement.
    torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2)
    for ours, theirs in zip(heads.student_leaves, reference_heads.student_leaves, strict=True):
        assert ours.grad.dtype == torch.bfloat16
        cosine = F.cosine_similarity(ours.grad.float().flatten(), theirs.grad.float().flatten(), 0)
        assert cosine > 0.99


def test_accepts_a_divergence_object_and_is_exported_lazily():
    heads = make_heads(seed=15)
    args = (heads.student_hidden, heads.student_weight, heads.teacher_hidden, heads.teacher_weight)
    by_object = fused_linear_divergence(*args, ABDivergence(0.2, 0.7))
    by_name = abkd_trainer.fused_linear_divergence(
        *args, "ab", divergence_params={"alpha": 0.2, "beta": 0.7}
    )
    by_wrapper = abkd_trainer.fused_linear_ab_divergence(*args, 0.2, 0.7)
    torch.testing.assert_close(by_object, by_name)
    torch.testing.assert_close(by_object, by_wrapper)


# ----------------------------------------------------------------------------- errors


def _call(heads: Heads, **overrides):
    kwargs = {
        "student_hidden": heads.student_hidden,
        "student_weight": heads.student_weight,
        "teacher_hidden": heads.teacher_hidden,
        "teacher_weight": heads.teacher_weight,
        "divergence": "ab",
        "divergence_params": {"alpha": 0.2, "beta": 0.7},
    }
    kwargs.update(overrides)
    return fused_linear_divergence(**kwargs)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"student_weight": torch.randn(29, 5)}, ValueError, "expects 5"),
        ({"teacher_weight": torch.randn(31, 12)}, ValueError, "vocab_size=len"),
        ({"vocab_size": 30}, ValueError, "exceeds a head"),
        ({"vocab_size": 0}, ValueError, "positive integer"),
        ({"teacher_hidden": torch.randn(12, 12)}, ValueError, "same positions"),
        ({"student_bias": torch.randn(28)}, ValueError, "head bias"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"mask": torch.ones(12, dtype=torch.bool)}, ValueError, "`mask` has shape"),
        ({"labels": torch.zeros(13)}, TypeError, "integer token ids"),
        ({"labels": torch.full((13,), 29)}, ValueError, r"lie in \[0, 29\)"),
        ({"ce_weight": 0.5}, ValueError, "pass `labels`"),
        ({"student_logit_softcap": -1.0}, ValueError, "logit_softcap"),
        ({"teacher_logit_scale": 0.0}, ValueError, "logit_scale"),
        ({"divergence": "kl"}, ValueError, "Unknown divergence"),
        ({"divergence": ABDivergence(0.2, 0.7)}, ValueError, "already parametrised"),
        ({"divergence_params": {"alpha": 0.2}}, ValueError, "Invalid parameters"),
        ({"student_hidden": torch.ones(13, 8, dtype=torch.long)}, TypeError, "floating point"),
    ],
)
def test_bad_input_raises_a_clear_error(overrides, error, message):
    heads = make_heads(seed=16)
    with pytest.raises(error, match=message):
        _call(heads, **overrides)
