"""The protocol grid's logic on synthetic result files: planning, resuming, summaries, choice.

No training: every result file here is written by the test in the script's own format.
"""

from __future__ import annotations

import json

import pytest
from testing_utils import load_script

grid = load_script("benchmarks/protocol_grid.py", "protocol_grid")
summary_module = load_script("benchmarks/protocol_grid_summary.py", "protocol_grid_summary")

MACHINE = {"cpu_count": 2, "device": "cpu"}


def write_run(results_dir, cell, method, seed, rouge_l, *, train_seconds=1.0, references=()):
    """One result file as `run_job` writes it."""
    job = grid.Job(grid.parse_cell(cell), seed, (method,))
    row = {"method": f"{cell} {method}", "seed": seed, "rouge_l": rouge_l}
    row["train_seconds"] = train_seconds
    record = grid.result_record(job, method, ["--x"], row, list(references), MACHINE)
    return grid.write_result(results_dir, record)


def fill_cell(results_dir, cell, scores, *, short=None):
    """`scores`: method -> per-seed ROUGE-L (methods missing here get 10 on every seed)."""
    for method in grid.GRID_METHODS:
        for seed, value in zip(grid.TRAINING_SEEDS, scores.get(method, (10.0,) * 3), strict=True):
            write_run(results_dir, cell, method, seed, value)
    for method, value in (short or {}).items():
        write_run(results_dir, cell, method, grid.SELECT, value, train_seconds=2.0)


def test_plan_orders_cells_cheapest_first_and_each_cell_complete_before_the_next(tmp_path):
    jobs = grid.plan_jobs(tmp_path, grid.grid_cells(), [0, 1, 2], list(grid.GRID_METHODS))

    assert len(jobs) == 8 * 4  # 8 cells x (3 seeds + the short runs)
    assert [job.seed for job in jobs[:4]] == [0, 1, 2, grid.SELECT]
    cells = [job.cell for job in jobs[::4]]
    assert [cell.steps for cell in cells] == [300] * 4 + [1000] * 4
    assert [cell.start for cell in cells[:4]] == ["random", "random", "ft", "ft"]
    assert all(len(job.methods) == len(grid.GRID_METHODS) for job in jobs)


def test_plan_skips_finished_runs_and_drops_finished_jobs(tmp_path):
    cell = grid.parse_cell("ft-lr1e-3-300")
    write_run(tmp_path, cell.name, "fkl", 0, 30.0)
    for method in ("ab", "fkl"):
        write_run(tmp_path, cell.name, method, 1, 30.0)

    jobs = grid.plan_jobs(tmp_path, [cell], [0, 1], ["ab", "fkl"], select=False)

    assert [(job.seed, job.methods) for job in jobs] == [(0, ("ab",))]


def test_plan_filters_seeds_methods_and_short_runs(tmp_path):
    cells = [grid.parse_cell("random-lr3e-3-1000")]
    jobs = grid.plan_jobs(tmp_path, cells, [2], ["tvd"], select=True)
    assert [(job.cell.name, job.seed, job.methods) for job in jobs] == [
        ("random-lr3e-3-1000", 2, ("tvd",)),
        ("random-lr3e-3-1000", grid.SELECT, ("tvd",)),
    ]
    with pytest.raises(ValueError, match="Unknown cell"):
        grid.parse_cell("ft-lr1e-2-300")


def test_a_job_waits_while_another_running_job_makes_its_fine_tuned_student(tmp_path):
    ft, random = grid.parse_cell("ft-lr1e-3-300"), grid.parse_cell("random-lr1e-3-300")
    making_seed0 = grid.Job(ft, 0, ("ab",))
    pending = [
        grid.Job(ft, grid.SELECT, ("ab",)),
        grid.Job(ft, 1, ("ab",)),
        grid.Job(random, 0, ()),
    ]

    # The short runs use seed 0's student, which the running job is fine-tuning: skip to seed 1.
    assert pending[0].sft_seed == 0
    assert grid.next_runnable(pending, [making_seed0], sft_ready=set()) == 1
    assert grid.next_runnable(pending[:1], [making_seed0], sft_ready=set()) == -1
    assert grid.next_runnable(pending[:1], [making_seed0], sft_ready={0}) == 0
    assert grid.Job(random, 0, ()).sft_seed is None

    marker = tmp_path / "sft-seed2" / "sft_args.json"
    marker.parent.mkdir()
    marker.write_text("[]")
    (tmp_path / "sft-seed1").mkdir()  # being written: no marker yet
    assert grid.sft_ready_seeds(tmp_path) == {2}


def test_cell_methods_carry_the_cell_and_short_runs_compress_the_schedule():
    cell = grid.parse_cell("ft-lr1e-3-1000")
    full = grid.cell_method(cell, "ab-0.5-0.5")
    short = grid.cell_method(cell, "ab-0.5-0.5", short=True)

    assert full.flags[-4:] == ("--learning_rate", "1e-3", "--max_steps", "1000")
    assert "--warmup_steps" not in full.flags
    assert short.flags[-6:] == (
        "--learning_rate",
        "1e-3",
        "--max_steps",
        "100",
        "--warmup_steps",
        "3",
    )
    assert len({full.label, short.label, grid.cell_method(cell, "ab").label}) == 3
    assert grid.selection_steps(grid.parse_cell("random-lr3e-3-300")) == 30


def test_seed_statistics_spread_is_max_minus_min_and_std_is_the_sample_std():
    stats = summary_module.seed_statistics([1.0, 2.0, 4.0])
    assert stats["mean"] == pytest.approx(7 / 3)
    assert stats["spread"] == 3.0
    assert stats["std"] == pytest.approx(1.5275252, rel=1e-6)
    assert summary_module.seed_statistics([5.0])["std"] == 0.0


def test_rank_counts_a_method_within_the_first_spread_up_to_the_boundary():
    stats = {
        "a": summary_module.seed_statistics([10.0, 12.0, 14.0]),  # mean 12, spread 4
        "b": summary_module.seed_statistics([8.0, 8.0, 8.0]),  # gap 4: within (boundary)
        "c": summary_module.seed_statistics([7.9, 7.9, 7.9]),  # gap 4.1: outside
    }
    rank = summary_module.rank_cell(stats)

    assert rank["first"] == "a" and rank["lead"] == pytest.approx(4.0)
    assert rank["within_spread"] == ["a", "b"]
    assert rank["gaps"]["c"] == pytest.approx(4.1)


def test_summary_counts_wins_and_complete_cells_and_evaluates_the_cheap_choice(tmp_path):
    # Cell 1: the default first; its short run is beaten by AB (0.5, 0.5), 1 point behind on the
    # full budget (within the default's spread of 2).
    fill_cell(
        tmp_path,
        "random-lr1e-3-300",
        {"ab": (29.0, 30.0, 31.0), "ab-0.5-0.5": (28.0, 29.0, 30.0), "fkl": (20.0, 21.0, 22.0)},
        short={key: 5.0 for key in grid.AB_METHODS} | {"ab-0.5-0.5": 6.0, "fkl": 9.0},
    )
    # Cell 2: forward KL first by 10 with spread 1; the default outside it.
    fill_cell(
        tmp_path,
        "ft-lr1e-3-300",
        {"fkl": (40.0, 40.5, 41.0), "ab": (30.0, 30.0, 31.5)},
        short={key: 5.0 for key in grid.GRID_METHODS} | {"fkl": 7.0},
    )
    # Cell 3: incomplete (one seed of one method missing).
    fill_cell(tmp_path, "ft-lr3e-3-300", {})
    grid.result_path(tmp_path, "ft-lr3e-3-300", "tvd", 2).unlink()

    result = summary_module.grid_summary(summary_module.load_results(tmp_path))

    assert result["complete_cells"] == ["random-lr1e-3-300", "ft-lr1e-3-300"]
    assert result["runs_finished"] == 3 * 33 - 1
    assert result["win_loss"]["ab"]["first"] == ["random-lr1e-3-300"]
    assert result["win_loss"]["fkl"]["first"] == ["ft-lr1e-3-300"]
    assert result["win_loss"]["ab"]["mean_gap_to_first"] == pytest.approx((0 + 30 / 3) / 2)
    assert result["win_loss"]["ab"]["mean_lead_when_first"] == pytest.approx(1.0)
    assert result["win_loss"]["ab-0.5-0.5"]["within_spread"] == ["random-lr1e-3-300"]

    ab_only = result["cheap_choice"]["ab_settings"]
    assert {cell: row["pick"] for cell, row in ab_only["cells"].items()} == {
        "random-lr1e-3-300": "ab-0.5-0.5",
        "ft-lr1e-3-300": "ab",  # all tied: the first candidate
    }
    assert ab_only["pick_within_spread"] == 1 and ab_only["default_within_spread"] == 1
    assert ab_only["steps_fraction_of_one_run"] == pytest.approx(0.5)
    assert ab_only["mean_train_seconds"] == pytest.approx(5 * 2.0)

    every = result["cheap_choice"]["all_methods"]
    # Cell 1's short runs of the baselines are missing except forward KL: no pick there.
    assert list(every["cells"]) == ["ft-lr1e-3-300"]
    assert every["cells"]["ft-lr1e-3-300"]["pick"] == "fkl"
    assert every["pick_within_spread"] == 1 and every["default_within_spread"] == 0


def test_cheap_pick_needs_every_candidate_and_breaks_ties_by_candidate_order():
    assert summary_module.cheap_pick({"a": 1.0, "b": 1.0}, ["b", "a"]) == "b"
    assert summary_module.cheap_pick({"a": 1.0}, ["a", "b"]) is None


def test_write_summary_writes_the_table_win_loss_and_settings(tmp_path):
    fill_cell(
        tmp_path,
        "random-lr3e-3-300",
        {"ab": (30.0, 31.0, 32.0)},
        short={key: 1.0 for key in grid.GRID_METHODS},
    )
    grid.log_command(tmp_path, ["--workers", "2"], num_jobs=4)

    md_path, json_path = summary_module.write_summary(tmp_path, "python x --summarise")

    text = md_path.read_text()
    assert "**31.00 (2.00)**" in text  # the default, first, mean (spread)
    assert "| FKL | 10.00 (0.00) |" in text  # 21 behind a spread of 2: not within
    assert "`python benchmarks/protocol_grid.py --workers 2`" in text
    assert "runs finished: 33 of 264 (+ 11 short selection runs)" in text
    data = json.loads(json_path.read_text())
    assert data["complete_cells"] == ["random-lr3e-3-300"]
    assert data["cheap_choice"]["all_methods"]["num_cells"] == 1


def test_write_summary_refuses_an_empty_results_dir(tmp_path):
    with pytest.raises(SystemExit, match="No result files"):
        summary_module.write_summary(tmp_path, "x")


def test_plan_mode_lists_the_jobs_and_runs_nothing(tmp_path, capsys):
    argv = ["--plan", "--results_dir", str(tmp_path), "--cells", "ft-lr3e-3-300", "--seeds", "1"]
    assert grid.main([*argv, "--methods", "ab", "tvd"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "ft-lr3e-3-300 seed 1: 2 method(s): ab tvd",
        "ft-lr3e-3-300 seed select: 2 method(s): ab tvd",
    ]
    assert not (tmp_path / "commands.jsonl").exists()
