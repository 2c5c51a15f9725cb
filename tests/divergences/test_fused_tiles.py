"""The tile engine of the fused kernels, through its teacher interface.

Promises: any `FusedTeacher` that supplies the per-tile divergence and statistics gets the values,
gradients, cross-entropy, statistics and reductions of the materialised logits from
`fused_tiles_loss`; the teacher is asked for each projection tile once per walk (the per-row
reduction walks again in backward); the shared argument checks and reductions
(`divergences.fused_inputs`) and the head primitives (`divergences.projection`) behave as
documented.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from abkd_trainer.divergences import fused_tiles, get_divergence
from abkd_trainer.divergences.chunked import rowwise_loss_and_grad
from abkd_trainer.divergences.fused_inputs import (
    FusedLossOptions,
    count_rows,
    reduce_rows,
)
from abkd_trainer.divergences.fused_tiles import (
    FusedLinearDistillationOutput,
    FusedTeacher,
    TeacherChunk,
    TileSettings,
    fused_tiles_loss,
)
from abkd_trainer.divergences.projection import (
    LogitTransform,
    gemm_dtype,
    project_into,
    validate_head,
)
from abkd_trainer.divergences.registry import make_divergence
from abkd_trainer.divergences.statistics import TokenStatistics, row_statistics

RTOL = ATOL = 1e-9


class _LogitsChunk(TeacherChunk):
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits

    def divergence_and_grad(self, student_logits, part, divergence, temperature, compute_grad):
        return rowwise_loss_and_grad(
            student_logits, self.logits[part], divergence, temperature, compute_grad
        )

    def statistics(self, student_logits, part, labels, student_entropy) -> TokenStatistics:
        return row_statistics(student_logits, self.logits[part], labels, student_entropy)


class PrecomputedTeacher(FusedTeacher):
    """A teacher given by its logits at the counted rows: the smallest possible subclass."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits
        self.walks: list[list[slice]] = []  # the tiles asked for, per walk

    @property
    def dtype(self) -> torch.dtype:
        return self.logits.dtype

    def chunk_reader(
        self, settings: TileSettings, num_rows: int
    ) -> Callable[[slice], TeacherChunk]:
        assert num_rows == self.logits.shape[0]
        asked: list[slice] = []
        self.walks.append(asked)

        def read(rows: slice) -> TeacherChunk:
            asked.append(rows)
            return _LogitsChunk(self.logits[rows])

        return read


def _student(seed: int, positions=(3, 5), hidden=6, rows=19):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(*positions, hidden, generator=generator, dtype=torch.float64),
        torch.randn(rows, hidden, generator=generator, dtype=torch.float64),
        torch.randn(rows, generator=generator, dtype=torch.float64),
    )


def _leaves(tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_a_minimal_teacher_gets_the_materialised_values_and_gradients(reduction):
    vocab = 17  # the head has 19 rows: two of padding
    student = _student(0)
    labels = torch.randint(0, vocab, (3, 5), generator=torch.Generator().manual_seed(1))
    labels[0, 1] = labels[2, 4] = -100
    counted_mask = labels != -100
    teacher_logits = torch.randn(3, 5, vocab, generator=torch.Generator().manual_seed(2)) * 2
    transform = LogitTransform(scale=0.9, softcap=6.0)
    options = FusedLossOptions(
        temperature=1.7,
        reduction=reduction,
        student_transform=transform,
        chunk_size=4,
        divergence_weight=0.6,
        ce_weight=0.4,
    )
    divergence = {"alpha": 0.3, "beta": 0.6}

    hidden, weight, bias = _leaves(student)
    raw = F.linear(hidden, weight, bias)[..., :vocab] * transform.scale
    logits = transform.softcap * torch.tanh(raw / transform.softcap)
    teacher = teacher_logits.double()
    expected_kd = get_divergence("ab")(
        logits, teacher, **divergence, temperature=1.7, mask=counted_mask, reduction="none"
    )
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(3, 5)
    expected = 0.6 * expected_kd + 0.4 * ce
    expected = {"none": expected, "sum": expected.sum(), "mean": expected.sum() / 13}[reduction]
    weights = torch.rand(expected.shape, generator=torch.Generator().manual_seed(3)) + 0.5
    (expected * weights.double()).sum().backward()
    expected_grads = [hidden.grad, weight.grad, bias.grad]

    hidden, weight, bias = _leaves(student)
    counted = count_rows(hidden, None, labels, vocab, options)
    precomputed = PrecomputedTeacher(counted.select(teacher.reshape(-1, vocab)))
    output = fused_tiles_loss(
        counted, weight, bias, precomputed, make_divergence("ab", **divergence), options, vocab
    )
    assert isinstance(output, FusedLinearDistillationOutput)
    (output.loss * weights.double()).sum().backward()
    torch.testing.assert_close(output.loss, expected.detach(), rtol=RTOL, atol=ATOL)
    for ours, theirs in zip([hidden.grad, weight.grad, bias.grad], expected_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=ATOL)
    assert bool((weight.grad[vocab:] == 0).all()) and bool((bias.grad[vocab:] == 0).all())
    assert int(output.num_tokens) == 13
    # One walk over the 13 counted rows in tiles of 4; the per-row output walks again in backward.
    expected_tiles = [slice(0, 4), slice(4, 8), slice(8, 12), slice(12, 13)]
    assert precomputed.walks == [expected_tiles] * (2 if reduction == "none" else 1)


def test_statistics_come_from_the_teacher_chunk():
    vocab = 11
    hidden, weight, bias = _student(4, positions=(8,), rows=vocab)
    labels = torch.randint(0, vocab, (8,), generator=torch.Generator().manual_seed(5))
    teacher_logits = torch.randn(8, vocab, generator=torch.Generator().manual_seed(6)).double()
    options = FusedLossOptions(reduction="sum", chunk_size=3)
    counted = count_rows(hidden, None, labels, vocab, options)
    output = fused_tiles_loss(
        counted, weight, bias, PrecomputedTeacher(teacher_logits), make_divergence("fkl"), options,
        vocab,
    )  # fmt: skip
    statistics = row_statistics(F.linear(hidden, weight, bias), teacher_logits, labels)
    for name in TokenStatistics._fields:
        torch.testing.assert_close(getattr(output, name), getattr(statistics, name).sum())


def test_divergence_tiles_split_the_projection_tile(monkeypatch):
    """Divergence tiles of `CPU_POINTWISE_ELEMENTS_PER_THREAD // V` rows, one thread."""
    vocab = 7
    monkeypatch.setattr(fused_tiles, "CPU_POINTWISE_ELEMENTS_PER_THREAD", 2 * vocab)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    parts = []

    class RecordingChunk(_LogitsChunk):
        def divergence_and_grad(self, student_logits, part, *args):
            parts.append((part, student_logits.shape[0]))
            return super().divergence_and_grad(student_logits, part, *args)

    class RecordingTeacher(PrecomputedTeacher):
        def chunk_reader(self, settings, num_rows):
            assert settings.pointwise_rows == 2
            return lambda rows: RecordingChunk(self.logits[rows])

    hidden, weight, bias = _student(7, positions=(5,), rows=vocab)
    options = FusedLossOptions(reduction="sum", chunk_size=5)
    counted = count_rows(hidden, None, None, vocab, options)
    teacher = RecordingTeacher(torch.randn(5, vocab, dtype=torch.float64))
    with torch.no_grad():
        fused_tiles_loss(counted, weight, bias, teacher, make_divergence("tvd"), options, vocab)
    assert parts == [(slice(0, 2), 2), (slice(2, 4), 2), (slice(4, 5), 1)]


# ----------------------------------------------------------------------------- fused_inputs


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"reduction": "avg"}, "reduction"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": True}, "chunk_size"),
        ({"ce_weight": float("nan")}, "ce_weight"),
    ],
)
def test_options_refuse_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        FusedLossOptions(**overrides)


def test_count_rows_keeps_the_counted_positions_in_order():
    hidden = torch.arange(24.0).reshape(2, 3, 4)
    labels = torch.tensor([[1, -100, 2], [-100, 0, 3]])
    counted = count_rows(hidden, None, labels, 5, FusedLossOptions())
    assert counted.index.tolist() == [0, 2, 4, 5]
    assert torch.equal(counted.hidden, hidden.reshape(6, 4)[[0, 2, 4, 5]])
    assert counted.labels.tolist() == [1, 2, 0, 3]
    mask = torch.tensor([[True, False, False], [False, False, True]])
    assert count_rows(hidden, mask, labels, 5, FusedLossOptions()).labels.tolist() == [1, 3]
    every = count_rows(hidden, None, None, 5, FusedLossOptions())
    flat = hidden.reshape(6, 4)
    assert every.index is None and every.select(flat) is flat


@pytest.mark.parametrize(
    ("mask", "labels", "options", "error", "message"),
    [
        (torch.ones(5, dtype=torch.bool), None, {}, ValueError, "`mask` has shape"),
        (None, torch.zeros(2, 3), {}, TypeError, "integer token ids"),
        (None, torch.full((2, 3), 5), {}, ValueError, r"lie in \[0, 5\)"),
        (None, None, {"ce_weight": 0.5}, ValueError, "pass `labels`"),
    ],
)
def test_count_rows_refuses_inputs_that_do_not_fit(mask, labels, options, error, message):
    with pytest.raises(error, match=message):
        count_rows(torch.zeros(2, 3, 4), mask, labels, 5, FusedLossOptions(**options))


def test_reduce_rows():
    values = torch.tensor([1.0, 2.0, 4.0])
    index = torch.tensor([0, 3, 5])
    shape = torch.Size((2, 3))
    per_position = reduce_rows(values, index, shape, "none")
    assert per_position.tolist() == [[1.0, 0.0, 0.0], [2.0, 0.0, 4.0]]
    assert reduce_rows(values, index, shape, "sum").item() == 7.0
    assert reduce_rows(values, index, shape, "mean").item() == pytest.approx(7.0 / 3)
    assert reduce_rows(values.sum(), index, shape, "mean", summed=True).item() == (
        pytest.approx(7.0 / 3)
    )
    empty = torch.zeros(0, requires_grad=True)
    zero = reduce_rows(empty, torch.zeros(0, dtype=torch.long), shape, "mean")
    assert zero.item() == 0.0 and zero.requires_grad


# ----------------------------------------------------------------------------- projection


def test_project_into_writes_the_biased_logits_in_fp32():
    generator = torch.Generator().manual_seed(8)
    hidden = torch.randn(4, 6, generator=generator).to(torch.bfloat16)
    weight = torch.randn(9, 6, generator=generator).to(torch.bfloat16)
    bias = torch.randn(9, generator=generator)
    out = torch.empty(4, 9)
    assert project_into(out, hidden, weight, bias) is out
    torch.testing.assert_close(out, (hidden @ weight.T).float() + bias)


def test_gemm_dtype_follows_autocast():
    hidden = torch.zeros(2, 3)
    assert gemm_dtype(hidden) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gemm_dtype(hidden) == torch.bfloat16


def test_logit_transform_applies_scale_then_softcap_and_its_derivative():
    raw = torch.linspace(-5, 5, 11, dtype=torch.float64).requires_grad_(True)
    transform = LogitTransform(scale=1.5, softcap=3.0)
    reference = 3.0 * torch.tanh(1.5 * raw / 3.0)
    logits = transform.apply_(raw.detach().clone())
    torch.testing.assert_close(logits, reference.detach())
    upstream = torch.rand(11, dtype=torch.float64)
    (reference * upstream).sum().backward()
    torch.testing.assert_close(transform.grad_to_raw_(upstream.clone(), logits), raw.grad)


def test_validate_head_names_the_model():
    with pytest.raises(ValueError, match="teacher's hidden states have width 4"):
        validate_head("teacher", torch.zeros(2, 4), torch.zeros(7, 5), None)
    with pytest.raises(ValueError, match="student's head bias"):
        validate_head("student", torch.zeros(2, 5), torch.zeros(7, 5), torch.zeros(6))
