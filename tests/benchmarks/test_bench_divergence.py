"""The divergence benchmark's machinery at a tiny shape: cases run, memory and ratios make sense."""

from __future__ import annotations

import json
import math

import pytest
import torch
from testing_utils import load_script

# Small enough to run in seconds, large enough (1 MiB per logits tensor) that every case's
# temporaries and gradient are fresh pages, i.e. a visible rise in resident memory.
TOKENS, VOCAB = 128, 2048
TINY = ["--tokens", str(TOKENS), "--vocab", str(VOCAB)]


bench = load_script("benchmarks/bench_divergence.py", "bench_divergence")


def test_json_run_reports_each_requested_case_from_its_own_process(capsys):
    argv = [*TINY, "--cases", "naive_ab", "ours_ab", "--repeats", "2", "--chunk-size", "16"]
    argv += ["--threads", "1"]  # as conftest: one thread keeps a shared machine's runs quick
    exit_code = bench.main([*argv, "--json"])  # each case runs this script in a fresh interpreter
    captured = capsys.readouterr()
    assert exit_code == 0, captured.err
    report = json.loads(captured.out)

    assert report["settings"]["tokens"] == TOKENS and report["settings"]["vocab"] == VOCAB
    assert report["warnings"] == []
    assert report["machine"]["torch_threads"] == 1
    results = {result["case"]: result for result in report["results"]}
    assert list(results) == ["naive_ab", "ours_ab"]
    for result in results.values():
        assert "error" not in result
        assert result["extra_peak_mib"] > 0  # at least the student gradient is new memory
        assert result["peak_rss_mib"] >= result["baseline_rss_mib"]
        assert len(result["times_s"]) == 2 and all(t > 0 for t in result["times_s"])
        assert result["time_s_median"] > 0
        assert math.isfinite(result["loss"]) and result["loss"] > 0
    # The worker built the requested inputs: its loss is the one computed here from them.
    student, teacher, mask = bench.make_logits(bench.BenchSettings(tokens=TOKENS, vocab=VOCAB))
    expected = bench.naive_ab_divergence(student, teacher, mask, bench.AB_ALPHA, bench.AB_BETA)
    assert results["naive_ab"]["loss"] == pytest.approx(expected.item(), rel=1e-5)
    # Two implementations of one objective at one input: the same loss, and ratios against naive.
    assert results["ours_ab"]["loss"] == pytest.approx(results["naive_ab"]["loss"], rel=1e-4)
    ours = results["ours_ab"]
    assert ours["extra_peak_mib"] < results["naive_ab"]["extra_peak_mib"]
    assert ours["memory_ratio"] == pytest.approx(
        ours["extra_peak_mib"] / results["naive_ab"]["extra_peak_mib"]
    )
    assert ours["time_ratio"] == pytest.approx(
        ours["time_s_median"] / results["naive_ab"]["time_s_median"]
    )


@pytest.mark.parametrize("name", bench.DEFAULT_CASES)
def test_every_default_case_builds_and_measures(name):
    settings = bench.BenchSettings(tokens=16, vocab=128)
    result = bench.measure_case(bench.CASES[name], settings, warmup=0, repeats=1)

    assert result["case"] == name
    assert result["time_s_median"] > 0
    assert result["extra_peak_mib"] >= 0
    assert math.isfinite(result["loss"]) and result["loss"] > 0


def test_naive_ab_matches_the_closed_form_from_probabilities():
    generator = torch.Generator().manual_seed(0)
    student_logits = torch.randn(2, 3, 7, dtype=torch.float64, generator=generator)
    teacher_logits = torch.randn(2, 3, 7, dtype=torch.float64, generator=generator)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    alpha, beta = 0.3, 0.6

    loss = bench.naive_ab_divergence(student_logits, teacher_logits, mask, alpha, beta)

    p, q = teacher_logits.softmax(-1), student_logits.softmax(-1)
    per_token = -(
        p**alpha * q**beta
        - alpha / (alpha + beta) * p ** (alpha + beta)
        - beta / (alpha + beta) * q ** (alpha + beta)
    ).sum(-1) / (alpha * beta)
    # The authors' code works in fp32 whatever the logits' dtype; the reference here is fp64.
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(per_token[mask].mean().item(), rel=1e-5)


@pytest.mark.parametrize(("alpha", "beta"), [(0.0, 0.5), (0.5, 0.0), (0.5, -0.5)])
def test_naive_ab_rejects_the_limit_cases_it_does_not_implement(alpha, beta):
    logits = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match="general case"):
        bench.naive_ab_divergence(logits, logits, torch.ones(1, 2, dtype=torch.bool), alpha, beta)


def test_peak_rss_sees_an_allocation_made_after_reset():
    meter = bench.PeakRSS()
    baseline = meter.current()
    meter.reset()
    block = torch.ones(16 * 2**20, dtype=torch.float32)  # 64 MiB, every page written
    del block
    assert meter.peak() - baseline >= 60 * 2**20


def _result(case, objective, loss, reference=None, mib=100.0, seconds=1.0):
    return {
        "case": case,
        "objective": objective,
        "reference": reference,
        "loss": loss,
        "extra_peak_mib": mib,
        "time_s_median": seconds,
    }


def test_ratios_are_taken_against_the_named_reference_when_it_ran():
    results = [
        _result("naive", "ab", 1.0, mib=400.0, seconds=2.0),
        _result("ours", "ab", 1.0, reference="naive", mib=100.0, seconds=3.0),
        _result("orphan", "ab", 1.0, reference="not-run"),
    ]
    bench.add_ratios(results)
    assert results[1]["memory_ratio"] == pytest.approx(0.25)
    assert results[1]["time_ratio"] == pytest.approx(1.5)
    assert "memory_ratio" not in results[0] and "memory_ratio" not in results[2]


def test_disagreeing_losses_of_one_objective_are_reported():
    results = [
        _result("naive", "ab", 1.0),
        _result("ours", "ab", 1.1),
        _result("jsd", "jsd", 5.0),
        _result("nan", "tvd", float("nan")),
        {"case": "broken", "error": "ImportError"},
    ]
    messages = bench.disagreements(results, rtol=1e-3)
    assert len(messages) == 2
    assert "ours" in messages[0] and "naive" in messages[0]
    assert "nan" in messages[1]
    assert bench.disagreements(results[:1] + [_result("ours", "ab", 1.0 + 1e-4)], rtol=1e-3) == []
    assert bench.disagreements(results[:2], rtol=0.2) == []


def test_a_failing_case_is_reported_and_fails_the_run(monkeypatch, capsys):
    monkeypatch.setattr(
        bench, "run_case_in_subprocess", lambda name, *args: {"case": name, "error": "boom"}
    )
    assert bench.main([*TINY, "--cases", "naive_ab"]) == 1
    assert "failed" in capsys.readouterr().out
