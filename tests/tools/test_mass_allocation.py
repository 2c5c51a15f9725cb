"""Gradient mass allocation: shares against an autograd float64 reference, and the plot."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from testing_utils import (
    build_prompt_completion_dataset,
    build_student_and_teacher,
    build_tiny_tokenizer,
)

from abkd_trainer.divergences.pointwise import ABDivergence, ForwardKL, ReverseKL
from abkd_trainer.tools.mass_allocation import (
    DEFAULT_PROBABILITY_BIN_EDGES,
    comparison_divergences,
    gradient_mass_by_probability,
    mass_allocation,
    plot_mass_allocation,
)


def _closed_form_divergence(name, alpha, beta):
    """The textbook formulas on probabilities, differentiated by autograd (float64)."""

    def divergence(p, q):
        if name == "fkl":
            return (p * (p.log() - q.log())).sum()
        if name == "rkl":
            return (q * (q.log() - p.log())).sum()
        s = alpha + beta
        inner = p**alpha * q**beta - alpha / s * p**s - beta / s * q**s
        return (-inner / (alpha * beta)).sum()

    return divergence


def _reference_shares(student_logits, teacher_logits, name, alpha=None, beta=None):
    student_logits = student_logits.detach().clone().requires_grad_(True)
    p = torch.softmax(teacher_logits, -1)
    q = torch.softmax(student_logits, -1)
    _closed_form_divergence(name, alpha, beta)(p, q).backward()
    gradient = student_logits.grad.numpy()
    edges = np.array(DEFAULT_PROBABILITY_BIN_EDGES)
    shares = {}
    for who, probabilities in (("teacher", p.detach().numpy()), ("student", q.detach().numpy())):
        index = np.clip(np.digitize(probabilities, edges) - 1, 0, len(edges) - 2)
        shares[who] = np.bincount(index.ravel(), np.abs(gradient).ravel(), len(edges) - 1)
        shares[who] /= np.abs(gradient).sum()
        raised = np.clip(-gradient, 0, None)
        shares[f"raise_{who}"] = np.bincount(index.ravel(), raised.ravel(), len(edges) - 1)
        shares[f"raise_{who}"] /= np.abs(gradient).sum()
    return shares


def _example_logits(num_positions=24, vocab=50, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # Scales up to 8 give peaked rows whose probabilities reach every bin, down to 1e-7.
    scales = torch.linspace(0.5, 8.0, num_positions, dtype=torch.float64)[:, None]
    student = torch.randn(num_positions, vocab, generator=generator, dtype=torch.float64) * scales
    teacher = torch.randn(num_positions, vocab, generator=generator, dtype=torch.float64) * scales
    return student, teacher


@pytest.mark.parametrize(
    ("name", "divergence", "alpha", "beta"),
    [
        ("ab", ABDivergence(0.2, 0.7), 0.2, 0.7),
        ("ab", ABDivergence(0.8, 0.3), 0.8, 0.3),
        ("ab", ABDivergence(1.5, -0.4), 1.5, -0.4),  # the general (signed) code path
        ("fkl", ForwardKL(), None, None),
        ("rkl", ReverseKL(), None, None),
    ],
)
def test_shares_equal_float64_autograd_reference(name, divergence, alpha, beta):
    student, teacher = _example_logits()
    mass = gradient_mass_by_probability(student, teacher, divergence, chunk_size=7)
    shares = mass.shares()
    reference = _reference_shares(student, teacher, name, alpha, beta)
    np.testing.assert_allclose(shares["by_teacher"], reference["teacher"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(shares["by_student"], reference["student"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        shares["raise_by_teacher"], reference["raise_teacher"], rtol=1e-9, atol=1e-12
    )
    assert sum(shares["by_teacher"]) == pytest.approx(1.0, abs=1e-12)
    assert sum(shares["by_student"]) == pytest.approx(1.0, abs=1e-12)
    # The gradient sums to zero per position: half of its mass raises logits, half lowers them.
    assert sum(shares["raise_by_student"]) == pytest.approx(0.5, abs=1e-12)
    assert mass.num_positions == student.shape[0]
    # The example reaches several bins on both axes, so the comparison is not vacuous.
    assert sum(share > 0 for share in reference["teacher"]) >= 5


def test_ab_at_one_zero_allocates_like_forward_kl():
    student, teacher = _example_logits(seed=3)
    ab = gradient_mass_by_probability(student, teacher, ABDivergence(1.0, 0.0)).shares()
    fkl = gradient_mass_by_probability(student, teacher, ForwardKL()).shares()
    np.testing.assert_allclose(ab["by_teacher"], fkl["by_teacher"], rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(ab["by_student"], fkl["by_student"], rtol=1e-9, atol=1e-14)


def test_mask_and_temperature_select_the_same_positions_as_slicing():
    student, teacher = _example_logits(num_positions=12)
    mask = torch.tensor([True, False] * 6)
    masked = gradient_mass_by_probability(
        student.view(3, 4, -1),
        teacher.view(3, 4, -1),
        ABDivergence(0.2, 0.7),
        mask=mask.view(3, 4),
        temperature=2.0,
    )
    sliced = gradient_mass_by_probability(
        student[mask] / 2.0, teacher[mask] / 2.0, ABDivergence(0.2, 0.7)
    )
    assert masked.num_positions == 6
    torch.testing.assert_close(masked.by_teacher, sliced.by_teacher)
    torch.testing.assert_close(masked.raise_by_student, sliced.raise_by_student)


def test_bad_bin_edges_and_shapes_are_rejected():
    student, teacher = _example_logits(num_positions=2)
    with pytest.raises(ValueError, match="from 0 to 1"):
        gradient_mass_by_probability(student, teacher, ForwardKL(), bin_edges=(0.1, 1.0))
    with pytest.raises(ValueError, match="same shape"):
        gradient_mass_by_probability(student, teacher[:, :10], ForwardKL())
    with pytest.raises(ValueError, match="zero"):
        gradient_mass_by_probability(student, student, ForwardKL()).shares()


def test_plot_mass_allocation_on_a_model_pair_writes_png_and_json(tmp_path):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("llama", tokenizer)
    rows = build_prompt_completion_dataset(6)
    result = plot_mass_allocation(
        student,
        teacher,
        tokenizer,
        rows["prompt"],
        rows["completion"],
        alpha=[0.2, 0.8],
        beta=[0.7, 0.3],
        output_dir=tmp_path,
        batch_size=4,
    )
    names = ["AB (0.2, 0.7)", "AB (0.8, 0.3)", "forward KL", "reverse KL"]
    assert list(result["by_teacher_probability"]) == names
    for key in ("by_teacher_probability", "by_student_probability"):
        for shares in result[key].values():
            assert sum(shares) == pytest.approx(1.0, abs=1e-9)
    # Every response token (EOS included) of the six rows counts once.
    completion_tokens = sum(len(tokenizer(text)["input_ids"]) + 1 for text in rows["completion"])
    assert result["num_positions"] == completion_tokens
    assert sum(result["teacher_probability_mass"]) == pytest.approx(1.0, abs=1e-5)
    saved = json.loads((tmp_path / "mass_allocation.json").read_text())
    assert saved["by_student_probability"] == result["by_student_probability"]
    assert (tmp_path / "mass_allocation.png").stat().st_size > 10_000
    # The model-level numbers are the logits-level ones accumulated over batches.
    direct = mass_allocation(
        student,
        teacher,
        tokenizer,
        rows["prompt"],
        rows["completion"],
        comparison_divergences(0.2, 0.7),
        batch_size=6,
    )
    np.testing.assert_allclose(
        direct["by_teacher_probability"]["AB (0.2, 0.7)"],
        result["by_teacher_probability"]["AB (0.2, 0.7)"],
        rtol=1e-5,
        atol=1e-7,
    )
