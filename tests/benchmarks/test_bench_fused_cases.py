"""The benchmark's fused cases (hidden states + LM heads) at a tiny shape: they run and agree."""

from __future__ import annotations

import math

import pytest
import torch
from testing_utils import load_script

TINY = {"tokens": 24, "vocab": 96, "hidden": 16}


bench = load_script("benchmarks/bench_divergence.py", "bench_divergence")
# Liger-Kernel is a benchmark-only extra (``pip install -e ".[bench]"``), tested where installed.
WITHOUT_LIGER = [name for name in bench.FUSED_CASES if name != "fused_liger_jsd"]


def _measure(name: str) -> dict:
    settings = bench.BenchSettings(**TINY)
    return bench.measure_case(bench.CASES[name], settings, warmup=0, repeats=1)


@pytest.mark.parametrize("name", WITHOUT_LIGER)
def test_every_fused_case_builds_and_measures(name):
    result = _measure(name)
    assert result["time_s_median"] > 0 and result["extra_peak_mib"] >= 0
    assert math.isfinite(result["loss"]) and result["loss"] > 0


def test_fused_cases_of_one_objective_agree_and_match_the_logits_cases():
    results = [_measure(name) for name in WITHOUT_LIGER]
    assert bench.disagreements(results, rtol=1e-4) == []
    by_name = {result["case"]: result for result in results}
    # Same objective, computed from logits built by the harness itself.
    inputs = bench.make_hidden_states(bench.BenchSettings(**TINY))
    with torch.no_grad():
        student = (inputs.student_hidden @ inputs.student_weight.T).unsqueeze(0)
        teacher = (inputs.teacher_hidden @ inputs.teacher_weight.T).unsqueeze(0)
    mask = torch.ones(student.shape[:-1], dtype=torch.bool)
    expected = bench.naive_ab_divergence(student, teacher, mask, bench.AB_ALPHA, bench.AB_BETA)
    assert by_name["fused_ours_ab"]["loss"] == pytest.approx(expected.item(), rel=1e-4)
    assert by_name["fused_ours_jsd"]["reference"] == "fused_trl_jsd"
    assert by_name["fused_ours_ab"]["reference"] == "fused_trl_jsd"


def test_liger_case_agrees_with_trl():
    pytest.importorskip("liger_kernel", reason="the bench extra (liger-kernel) is not installed")
    results = [_measure("fused_trl_jsd"), _measure("fused_liger_jsd")]
    assert bench.disagreements(results, rtol=1e-4) == []


def test_hidden_states_give_logits_with_the_documented_spreads():
    settings = bench.BenchSettings(tokens=256, vocab=512, hidden=64)
    inputs = bench.make_hidden_states(settings)
    assert inputs.student_hidden.shape == (256, 64) and inputs.student_weight.shape == (512, 64)
    assert all(leaf.requires_grad for leaf in inputs.student_leaves)
    assert not inputs.teacher_hidden.requires_grad and not inputs.teacher_weight.requires_grad
    with torch.no_grad():
        student_std = (inputs.student_hidden @ inputs.student_weight.T).std().item()
        teacher_std = (inputs.teacher_hidden @ inputs.teacher_weight.T).std().item()
    assert student_std == pytest.approx(bench.STUDENT_LOGIT_STD, rel=0.1)
    assert teacher_std == pytest.approx(bench.TEACHER_LOGIT_STD, rel=0.1)


def test_hidden_size_and_device_reach_the_worker_process():
    settings = bench.BenchSettings(tokens=8, vocab=64, hidden=24, device="cpu", chunk_size=4)
    args = bench.build_parser().parse_args(bench._settings_to_argv(settings))
    assert (args.tokens, args.vocab, args.hidden, args.device, args.chunk_size) == (
        8,
        64,
        24,
        "cpu",
        4,
    )
