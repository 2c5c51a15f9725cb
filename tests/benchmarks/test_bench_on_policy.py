"""The on-policy benchmark's machinery: a run measures what it reports; equal-time budgets."""

from __future__ import annotations

import pytest
from testing_utils import load_script

bench = load_script("benchmarks/bench_on_policy.py", "bench_on_policy")

TINY = {"init": "random", "batch_size": 4, "max_new_tokens": 5, "threads": 1, "steps": 2,
        "learning_rate": 1e-3, "seed": 0, "warmup": 0}  # fmt: skip


@pytest.mark.parametrize(
    "case",
    [
        {"trainer": "abkd", "lmbda": 1.0, "evaluate": True, "rouge_seeds": [0]},
        {"trainer": "trl", "evaluate": False},
    ],
)
def test_one_run_trains_and_measures(case):
    result = bench.run_one({**TINY, **case})
    assert result["train_runtime_s"] > 0 and result["median_step_s"] > 0
    assert result["peak_rss_mb"] >= result["training_rss_mb"] >= 0
    if case["trainer"] == "abkd":
        assert result["mean_on_policy_fraction"] == 1.0
        assert 0.0 <= result["rouge_l"] <= 100.0


def test_equal_time_runs_get_the_off_policy_runs_wall_time(monkeypatch, tmp_path):
    seconds_per_step = {"off-policy": 1.0, "lmbda 0.5": 2.0, "lmbda 1": 4.0, "adaptive": 1.0}
    launched = []

    def fake_run(spec):
        launched.append(spec)
        return {**spec, "train_runtime_s": spec["steps"] * seconds_per_step[spec["source"]]}

    monkeypatch.setattr(bench, "_in_subprocess", fake_run)
    argv = ["quality", "--steps", "100", "--inits", "random", "--ab", "0.8,0.3"]
    assert bench.main([*argv, "--work-dir", str(tmp_path)]) == 0
    equal_time = {s["source"]: s["steps"] for s in launched if s["budget"].startswith("equal time")}
    # 100 off-policy steps take 100 s: lmbda 0.5 fits 50 steps, lmbda 1 25; adaptive is as fast.
    assert equal_time == {"lmbda 0.5": 50, "lmbda 1": 25}
    assert sum(s["budget"] == "equal steps" for s in launched) == 4


def test_tables_take_medians_over_repeats_and_compare_like_with_like():
    def cost(name, trainer, step_s):
        return {"name": name, "trainer": trainer, "evaluate": False, "median_step_s": step_s,
                "peak_rss_mb": 500.0, "training_rss_mb": 40.0}  # fmt: skip

    results = [
        cost("ours", "abkd", 0.2),
        cost("TRL", "trl", 0.4),
        cost("ours, 24 tokens", "abkd", 0.3),
        cost("TRL, 24 tokens", "trl", 0.3),
        cost("ours", "abkd", 0.4),
        cost("ours", "abkd", 0.1),
    ]
    table = bench.markdown_tables(results)
    assert "| ours | 3 | 0.200 | 0.50x |" in table  # median of 0.2, 0.4, 0.1 against TRL's 0.4
    assert "| ours, 24 tokens | 1 | 0.300 | 1.00x |" in table  # fixed length vs fixed length
