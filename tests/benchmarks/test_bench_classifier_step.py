"""The classifier step-cost benchmark: its guide loss, step timing, memory peak and summary."""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import pytest
import torch
from testing_utils import load_script

bench = load_script("benchmarks/bench_classifier_step.py", "bench_classifier_step")


def test_the_guide_pattern_is_hintons_kd_as_abkd_writes_it():
    # The guide's (1 - lambda) * CE + lambda * T^2 * KL is ABKD's forward KL with
    # kd_weight = lambda * T^2 and ce_weight = 1 - lambda (the mapping the docs state).
    from abkd_trainer import ABKDClassifierConfig
    from abkd_trainer.core.objective import DistillationObjective

    generator = torch.Generator().manual_seed(0)
    student = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    teacher = 3 * torch.randn(6, 5, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 5, (6,), generator=generator)
    temperature, lam = bench.GUIDE_TEMPERATURE, bench.GUIDE_LAMBDA
    ce = torch.nn.functional.cross_entropy(student, labels)
    guide = bench.guide_loss(student, teacher, ce, temperature, lam)

    config = ABKDClassifierConfig("unused", divergence="fkl", temperature=temperature)
    objective = DistillationObjective.from_config(
        config, divergence_weight=lam * temperature**2, ce_weight=1 - lam
    )
    output = objective.loss_from_logits(student, teacher, labels, {})
    assert guide.item() == pytest.approx((output.loss_sum / 6).item(), rel=1e-10)


def test_step_intervals_skip_the_warmup_and_need_enough_steps():
    ends = [0.0, 1.0, 3.0, 6.0, 10.0, 15.0]
    assert bench.step_intervals(ends, 2, 3) == [2.0, 3.0, 4.0]
    assert bench.step_intervals(ends, 1, 5) == [1.0, 2.0, 3.0, 4.0, 5.0]
    with pytest.raises(ValueError, match="warmup >= 1"):
        bench.step_intervals(ends, 0, 3)
    with pytest.raises(ValueError, match="7 step ends"):
        bench.step_intervals(ends, 2, 5)


def test_timeline_peak_is_the_largest_total_and_its_rise_over_the_start():
    mib = 2**20
    timeline = [[0, 1, 2, 3], [[2 * mib, 0], [2 * mib, 3 * mib], [1 * mib, 1 * mib], [mib, 0]]]
    assert bench.timeline_peak(timeline) == {"peak_mib": 5.0, "peak_increase_mib": 3.0}


@pytest.mark.filterwarnings("ignore:`export_memory_timeline` is deprecated:FutureWarning")
def test_a_real_timeline_sees_the_steps_activations():
    from torch.profiler import ProfilerActivity, profile

    weight = torch.randn(256, 256, requires_grad=True)
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as profiler:
        hidden = torch.randn(512, 256) @ weight  # 0.5 MiB live until backward
        hidden.relu().sum().backward()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "timeline.json"
        profiler.export_memory_timeline(str(path), device="cpu")
        peak = bench.timeline_peak(json.loads(path.read_text()))
    assert peak["peak_increase_mib"] >= 0.5


def repeat(setup, median, spread=0.0, **memory):
    steps = [median - spread, median, median + spread]
    return {"setup": setup, "step_ms": steps, "median_step_ms": statistics.median(steps), **memory}


def test_summary_takes_medians_over_repeats_and_the_overhead_over_baseline():
    repeats = [
        repeat("ce_plus_teacher", 10.0, 1.0, peak_mib=4.0, peak_increase_mib=3.0, max_rss_mib=500),
        repeat("ce_plus_teacher", 12.0, 1.0, peak_mib=4.5, peak_increase_mib=3.0, max_rss_mib=510),
        repeat("ce_plus_teacher", 11.0, 1.0, peak_mib=4.0, peak_increase_mib=3.5, max_rss_mib=505),
        repeat("abkd", 12.0),
        repeat("abkd", 13.0),
        repeat("abkd", 20.0),
    ]
    summary = bench.summarize(repeats)
    assert list(summary) == ["ce_plus_teacher", "abkd"]  # SETUPS order, measured ones only
    base = summary["ce_plus_teacher"]
    assert (base["median_ms"], base["min_ms"], base["max_ms"]) == (11.0, 10.0, 12.0)
    assert (base["peak_mib"], base["peak_increase_mib"], base["max_rss_mib"]) == (4.5, 3.5, 510)
    pooled = [ms for run in repeats[:3] for ms in run["step_ms"]]
    quartiles = statistics.quantiles(pooled, n=4)
    assert (base["q1_ms"], base["q3_ms"]) == (quartiles[0], quartiles[2])
    assert summary["abkd"]["overhead_ms"] == pytest.approx(2.0)
    assert summary["abkd"]["ratio"] == pytest.approx(13.0 / 11.0)
    assert "peak_mib" not in summary["abkd"]

    header = {"batch_size": 64, "repeats": 3, "steps": 3, "warmup": 1, "command": "python b.py",
              "machine": "cpu (test)", "date": "2026-12-02"}  # fmt: skip
    text = bench.to_markdown(summary, header)
    abkd_line = next(line for line in text.splitlines() if "ABKDClassifierTrainer" in line)
    assert "| 13.00 | 12.00-20.00 |" in abkd_line and "+2.00 ms (1.18x)" in abkd_line
    assert abkd_line.endswith("| - | - | - |")
    assert "python b.py" in text and "cpu (test)" in text


def test_every_setup_trains_and_reports_its_steps(monkeypatch):
    # Tiny stand-ins for the demo pair: every setup builds, trains and is timed per step.
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=8,
                       num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                       num_labels=3)  # fmt: skip
    pixels = torch.randn(16, 1, 8, 8)
    train = [{"pixel_values": p, "labels": torch.tensor(i % 3)} for i, p in enumerate(pixels)]
    teacher = ViTForImageClassification(config).eval()
    pair = (teacher, lambda: ViTForImageClassification(config), train)
    monkeypatch.setattr(bench, "demo_pair", lambda: pair)
    monkeypatch.setitem(bench.TRAINING_SETTINGS, "per_device_train_batch_size", 4)
    for setup in bench.SETUPS:
        result = bench.measure(setup, warmup=1, steps=3, profile=setup == "abkd")
        assert result["setup"] == setup and len(result["step_ms"]) == 3
        assert all(ms > 0 for ms in result["step_ms"])
        assert ("peak_mib" in result) == (setup == "abkd")
