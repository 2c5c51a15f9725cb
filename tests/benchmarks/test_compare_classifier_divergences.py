"""The classifier divergence comparison: one budget for every method, resuming, the statistics.

Most tests feed the script synthetic results (no training); the data-order and CE-start tests
train tiny ViTs for a few steps on random 8x8 images.
"""

from __future__ import annotations

import json
import math
import random
import statistics

import pytest
import torch
from testing_utils import load_script

compare = load_script("benchmarks/compare_classifier_divergences.py", "compare_classifier")
import compare_classifier_summary as summary  # noqa: E402  (put on sys.path by the script)

METHODS = [compare.METHODS[key] for key in ("kd", "ab", "ce")]


def fake_scores(init, method, seed):
    """Deterministic synthetic scores of one run."""
    accuracy = 0.9 + 0.01 * seed + (0.002 if method.key == "ab" else 0.0) + 0.03 * (init == "ce")
    return {"accuracy": accuracy, "teacher_agreement": accuracy - 0.01, "train_seconds": 1.0}


def run(tmp_path, methods=METHODS, seeds=(0, 1, 2), steps=50):
    calls = []

    def run_one(init, method, seed):
        calls.append((init, method.key, seed))
        return fake_scores(init, method, seed)

    results = compare.run_all(
        methods,
        inits=compare.INITS,
        seeds=seeds,
        steps=steps,
        ce_steps=20,
        runs_dir=tmp_path,
        run_one=run_one,
    )
    return results, calls


def test_every_method_has_the_same_budget_schedule_data_and_seed():
    reference = compare.run_config(compare.METHODS["kd"], 3, 123, "out")
    overridden = {key for method in compare.METHODS.values() for key in method.overrides}
    for method in compare.METHODS.values():
        config = compare.run_config(method, 3, 123, "out")
        shared = {key: value for key, value in config.items() if key not in overridden}
        assert shared == {k: v for k, v in reference.items() if k not in overridden}
        assert (config["max_steps"], config["seed"]) == (123, 3)
        assert {key: config[key] for key in method.overrides} == dict(method.overrides)
    assert overridden.isdisjoint(compare.TRAINING_SETTINGS)  # no method changes the optimiser
    # A run must not depend on ABKDClassifierConfig's defaults, which the measurement chooses.
    pinned = ("temperature", "kd_weight", "ce_weight", "ab_warmup_ratio", "logit_standardization")
    for method in compare.METHODS.values():
        config = compare.run_config(method, 0, 1, "out")
        assert all(key in config for key in pinned), method.key
        if config.get("divergence") == "ab":
            assert {"alpha", "beta"} <= set(config), method.key


def test_runs_go_by_start_then_seed_then_method_and_a_rerun_trains_nothing(tmp_path):
    results, calls = run(tmp_path)
    expected = [(i, m.key, s) for i in compare.INITS for s in (0, 1, 2) for m in METHODS]
    assert calls == expected
    assert [(r["init"], r["method"], r["seed"]) for r in results] == expected

    again, calls = run(tmp_path)
    assert calls == []
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in results]
    assert not list(tmp_path.rglob("*.partial"))


def test_missing_or_unreadable_results_are_run_again_and_a_new_budget_runs_everything(tmp_path):
    run(tmp_path)
    deleted = compare.run_path(tmp_path, "ce", METHODS[1], 2, 50, 20)
    corrupt = compare.run_path(tmp_path, "random", METHODS[0], 1, 50, 20)
    deleted.unlink()
    corrupt.write_text('{"accuracy": 0.9')  # a write cut short (before writes were atomic)

    _, calls = run(tmp_path)
    assert sorted(calls) == [("ce", "ab", 2), ("random", "kd", 1)]
    assert (
        json.loads(corrupt.read_text())["accuracy"]
        == fake_scores("random", METHODS[0], 1)["accuracy"]
    )
    _, calls = run(tmp_path, steps=60)
    assert len(calls) == len(compare.INITS) * 3 * len(METHODS)


def test_kept_results_take_the_current_label_and_group(tmp_path):
    run(tmp_path, methods=[compare.ab_method(0.6, 0.4, label="old", group="grid")])
    results, calls = run(tmp_path, methods=[compare.parse_ab("0.6,0.4:AB after abkd-sweep")])
    assert calls == []
    assert {(r["label"], r["group"]) for r in results} == {("AB after abkd-sweep", "custom")}


def test_method_selection_expands_groups_keeps_order_and_rejects_unknown_keys():
    chosen = compare.select_methods(["kd", "grid", "kd"], ["0.6,0.4"])
    grid = [m.key for m in compare.METHODS.values() if m.group == "grid"]
    assert [m.key for m in chosen] == ["kd", *grid, "ab_0.6_0.4"]
    assert chosen[-1].overrides == {"divergence": "ab", "alpha": 0.6, "beta": 0.4}
    with pytest.raises(SystemExit, match="Unknown method 'nope'"):
        compare.select_methods(["nope"])
    with pytest.raises(SystemExit, match="ALPHA,BETA"):
        compare.parse_ab("0.6")
    for first, second in compare.COMPARISONS:
        assert {first, second} <= set(compare.METHODS)


def test_the_ce_start_is_cached_per_training_setting(tmp_path, monkeypatch):
    path = compare.ce_init_path(tmp_path, 1, 300)
    assert path == compare.ce_init_path(tmp_path, 1, 300)
    assert path != compare.ce_init_path(tmp_path, 2, 300)
    assert path != compare.ce_init_path(tmp_path, 1, 200)
    monkeypatch.setitem(compare.TRAINING_SETTINGS, "learning_rate", 1e-4)
    assert path != compare.ce_init_path(tmp_path, 1, 300)


# ----------------------------------------------------------------------------- statistics


def synthetic_results(deltas, *, seeds=range(8), init="random", noise=0.0, rng_seed=0):
    """Reference `kd` at random per-seed accuracies, every other method at kd + its delta."""
    rng = random.Random(rng_seed)
    results = []
    for seed in seeds:
        base = rng.uniform(0.85, 0.95)
        for method, delta in {"kd": 0.0, **deltas}.items():
            accuracy = base + delta + (rng.gauss(0, noise) if method != "kd" else 0.0)
            results.append(
                {
                    "init": init, "method": method, "label": method.upper(),
                    "group": "divergences", "seed": seed, "accuracy": accuracy,
                    "teacher_agreement": accuracy - 0.02,
                }
            )  # fmt: skip
    return results


def test_aggregate_gives_mean_and_sample_std_per_method_and_start():
    results = synthetic_results({"ab": 0.01}) + synthetic_results({"ab": 0.0}, init="ce")
    rows = {row["method"]: row for row in summary.aggregate(results, "kd")}
    for (method, init), row_init in ((("ab", "random"), "random"), (("kd", "ce"), "ce")):
        values = [r["accuracy"] for r in results if (r["method"], r["init"]) == (method, init)]
        cell = rows[method][row_init]
        assert cell["n"] == len(values) == 8
        assert cell["accuracy"] == pytest.approx(statistics.fmean(values))
        assert cell["accuracy_std"] == pytest.approx(statistics.stdev(values))
    assert "vs_reference" not in rows["kd"]["random"]
    assert rows["ab"]["random"]["vs_reference"]["mean"] == pytest.approx(0.01)


def test_paired_difference_separates_a_consistent_gain_and_not_a_zero_mean_one():
    # A gain of one point on every seed, with seed-to-seed noise far below it: separated, although
    # the per-method spreads (the random base accuracies) are several points.
    results = synthetic_results({"ab": 0.01}, noise=0.001)
    difference = summary.paired_difference(results, "ab", "kd", "random")
    diffs = [
        a["accuracy"] - k["accuracy"]
        for a in results
        for k in results
        if a["seed"] == k["seed"] and (a["method"], k["method"]) == ("ab", "kd")
    ]
    assert difference["mean"] == pytest.approx(statistics.fmean(diffs))
    assert difference["std"] == pytest.approx(statistics.stdev(diffs))
    assert difference["separated"] and difference["n"] == 8
    noisy = synthetic_results({"ab": 0.0}, noise=0.02, rng_seed=3)
    assert not summary.paired_difference(noisy, "ab", "kd", "random")["separated"]
    assert summary.paired_difference(results, "ab", "kd", "ce") is None


def test_paired_difference_uses_the_common_seeds_only():
    results = [r for r in synthetic_results({"ab": 0.01}) if (r["method"], r["seed"]) != ("kd", 5)]
    difference = summary.paired_difference(results, "ab", "kd", "random")
    assert difference["n"] == 7 and 5 not in difference["seeds"]
    one_seed = summary.paired_difference(
        [r for r in results if r["seed"] == 0], "ab", "kd", "random"
    )
    assert one_seed["ci95"] == math.inf and not one_seed["separated"]


@pytest.mark.parametrize("df", [1, 2, 4, 9, 20])
def test_the_t_quantiles_cover_95_percent(df):
    quantile = summary.T_95[df - 1]
    grid = torch.linspace(-quantile, quantile, 200_001, dtype=torch.float64)
    density = torch.distributions.StudentT(df).log_prob(grid).exp()
    assert torch.trapezoid(density, grid).item() == pytest.approx(0.95, abs=2e-4)


def test_the_table_shows_each_row_its_cells_and_the_measurement():
    results = synthetic_results({"ab": 0.01, "rkl": 0.0}, noise=0.001)
    results += [dict(r, init="ce") for r in results if r["method"] != "rkl"]
    rows = summary.aggregate(results, "kd")
    header = {
        "num_test": 359, "seeds": list(range(8)), "steps": 500, "ce_steps": 300,
        "batch_size": 64, "learning_rate": 3e-3, "common_settings": {"temperature": 4.0},
        "teacher_accuracy": 0.9749, "reference": "kd", "command": "python x.py --seeds 0",
        "machine": "cpu (test)", "date": "2026-12-02", "wall_time_s": 1.0,
        "train_seconds": 2.0, "num_runs": len(results),
    }  # fmt: skip
    text = summary.to_markdown(rows, header, results, [("ab", "kd"), ("ab", "missing")])
    by_method = {row["method"]: row for row in rows}
    ab_line = next(line for line in text.splitlines() if line.startswith("| AB |"))
    assert summary.cell_text(by_method["ab"]["random"]) in ab_line
    assert f"**{100 * by_method['ab']['random']['vs_reference']['mean']:+.2f} ±" in ab_line
    rkl_line = next(line for line in text.splitlines() if line.startswith("| RKL |"))
    assert rkl_line.split(" | ")[3] == "-"  # no CE-start runs
    assert "| AB − KD | random |" in text and "missing" not in text
    for fragment in ("python x.py --seeds 0", "cpu (test)", "2026-12-02", "1 image = 0.28"):
        assert fragment in text


# ----------------------------------------------------------------------------- training


class RecordingDataset(compare.TensorClassificationDataset):
    """Records the order in which examples are read."""

    def __init__(self, *tensors):
        super().__init__(*tensors)
        self.reads = []

    def __getitem__(self, index):
        self.reads.append(int(index))
        return super().__getitem__(index)


def tiny_vit(seed, initializer_range=0.02):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=4,
        initializer_range=initializer_range,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ViTForImageClassification(config)


@pytest.fixture
def tiny_task(monkeypatch):
    monkeypatch.setitem(compare.TRAINING_SETTINGS, "per_device_train_batch_size", 8)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(40, 1, 8, 8, generator=generator)
    labels = torch.randint(0, 4, (40,), generator=generator)
    return compare.DemoTask(
        RecordingDataset(pixels, labels),
        torch.randn(12, 1, 8, 8, generator=generator),
        torch.randint(0, 4, (12,), generator=generator),
        tiny_vit(99, initializer_range=0.5).eval(),
        tiny_vit,
    )


def test_every_method_sees_the_same_batches_and_the_seed_changes_them(tiny_task):
    orders = {}
    for key, seed in (("kd", 0), ("rkl", 0), ("ce", 0), ("kd", 1)):
        tiny_task.train.reads.clear()
        scores = compare.distil(tiny_task, tiny_task.build_student(seed), compare.METHODS[key],
                                seed, 12)  # fmt: skip
        orders[key, seed] = list(tiny_task.train.reads)
        assert scores["num_test"] == 12 and scores["accuracy"] == scores["correct"] / 12
    # 12 steps of 8 examples, 2.4 epochs of 40 (the loader reads one batch ahead)
    assert len(orders["kd", 0]) >= 12 * 8
    assert orders["kd", 0] == orders["rkl", 0] == orders["ce", 0]
    assert orders["kd", 1] != orders["kd", 0]


def test_the_ce_trained_start_is_trained_once_then_loaded(tiny_task, tmp_path, monkeypatch):
    first = compare.ce_trained_student(tiny_task, 0, 5, tmp_path)
    fresh = tiny_task.build_student(0).state_dict()
    assert any(not torch.equal(v, fresh[k]) for k, v in first.state_dict().items())

    def no_training(*args, **kwargs):
        raise AssertionError("the cached CE-trained student was trained again")

    monkeypatch.setattr("transformers.Trainer.train", no_training)
    second = compare.ce_trained_student(tiny_task, 0, 5, tmp_path)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key])


def test_evaluate_scores_every_held_out_image(tiny_task):
    class Fixed(torch.nn.Module):
        def __init__(self, predictions):
            super().__init__()
            self.predictions = predictions

        def forward(self, pixel_values):
            logits = torch.nn.functional.one_hot(self.predictions, 4).float()
            return type("Output", (), {"logits": logits})()

    labels = tiny_task.test_labels
    predictions = labels.clone()
    predictions[:5] = (labels[:5] + 1) % 4  # 5 of 12 wrong
    scores = compare.evaluate(Fixed(predictions), tiny_task)
    assert (scores["correct"], scores["num_test"]) == (7, 12)
    assert scores["accuracy"] == pytest.approx(7 / 12)
