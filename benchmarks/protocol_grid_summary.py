"""The summaries of `benchmarks/protocol_grid.py`: they read its result files only (no training).

`write_summary` writes `summary.md` and `summary.json`: the table of mean and spread (max - min
over the training seeds) per cell, the win/loss over the complete cells, and the cheap choice
(the best short run) evaluated on every complete cell against the default.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from protocol_grid import (  # noqa: E402  (a sibling script, importable once its folder is)
    AB_METHODS,
    DEFAULT_METHOD,
    GRID_METHODS,
    SELECT,
    SELECTION_FRACTION,
    TRAINING_SEEDS,
    grid_cells,
    parse_cell,
    selection_steps,
)


def load_results(results_dir: Path) -> list[dict[str, Any]]:
    """Every run's result as a flat record: cell, method, seed, scores, cost, machine."""
    records = []
    for path in sorted((results_dir / "runs").glob("*/*.json")):
        data = json.loads(path.read_text())
        row = data["row"]
        records.append(
            {
                "cell": data["cell"],
                "method": data["method"],
                "seed": data["seed"],
                "rouge_l": row["rouge_l"],
                "fkl_to_teacher": row.get("fkl_to_teacher"),
                "rkl_to_teacher": row.get("rkl_to_teacher"),
                "train_seconds": row.get("train_seconds"),
                "reference_rows": data.get("reference_rows", []),
                "machine": data.get("machine", {}),
                "load_average": data.get("load_average"),
                "finished": data.get("finished"),
            }
        )
    return records


def seed_statistics(values: Sequence[float]) -> dict[str, float]:
    """Mean, spread (max - min), sample std (0 for one value), min, max and count."""
    return {
        "mean": statistics.fmean(values),
        "spread": max(values) - min(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def cell_table(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """cell -> method -> ROUGE-L statistics over its training seeds (short runs left out)."""
    scores: dict[str, dict[str, list[float]]] = {}
    for record in records:
        if record["seed"] != SELECT:
            scores.setdefault(record["cell"], {}).setdefault(record["method"], [])
            scores[record["cell"]][record["method"]].append(record["rouge_l"])
    return {
        cell: {method: seed_statistics(values) for method, values in methods.items()}
        for cell, methods in scores.items()
    }


def complete_cells(
    table: Mapping[str, Mapping[str, Mapping[str, float]]],
    methods: Sequence[str],
    num_seeds: int,
) -> list[str]:
    """Cells (in grid order) where every method has a result for every training seed."""
    order = [cell.name for cell in grid_cells()]
    return [
        cell
        for cell in sorted(table, key=order.index)
        if all(table[cell].get(key, {}).get("n", 0) >= num_seeds for key in methods)
    ]


def rank_cell(stats: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """The first method of one cell (highest mean), its lead, and who is within its spread.

    A method is *within the seed spread of first* when the first's mean exceeds its mean by at
    most the first's spread (max - min of the first's per-seed scores).
    """
    order = sorted(stats, key=lambda key: stats[key]["mean"], reverse=True)
    first = order[0]
    best, spread = stats[first]["mean"], stats[first]["spread"]
    return {
        "first": first,
        "first_mean": best,
        "first_spread": spread,
        "lead": best - stats[order[1]]["mean"] if len(order) > 1 else 0.0,
        "gaps": {key: best - stats[key]["mean"] for key in order},
        "within_spread": [key for key in order if best - stats[key]["mean"] <= spread],
    }


def win_loss(
    table: Mapping[str, Mapping[str, Mapping[str, float]]], cells: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Per method over `cells`: cells first, cells within the spread of first, gaps to first."""
    ranks = {cell: rank_cell(table[cell]) for cell in cells}
    methods = [key for key in GRID_METHODS if cells and key in table[cells[0]]]
    summary = {}
    for key in methods:
        gaps = [ranks[cell]["gaps"][key] for cell in cells]
        leads = [ranks[cell]["lead"] for cell in cells if ranks[cell]["first"] == key]
        summary[key] = {
            "first": [cell for cell in cells if ranks[cell]["first"] == key],
            "within_spread": [cell for cell in cells if key in ranks[cell]["within_spread"]],
            "mean_gap_to_first": statistics.fmean(gaps),
            "max_gap_to_first": max(gaps),
            "mean_lead_when_first": statistics.fmean(leads) if leads else None,
        }
    return summary


def cheap_pick(short_scores: Mapping[str, float], candidates: Sequence[str]) -> str | None:
    """The candidate with the best short-run ROUGE-L (ties: the earlier candidate); None if a
    candidate's short run is missing."""
    if any(key not in short_scores for key in candidates):
        return None
    return max(candidates, key=lambda key: (short_scores[key], -candidates.index(key)))


def evaluate_cheap_choice(
    records: Sequence[Mapping[str, Any]],
    table: Mapping[str, Mapping[str, Mapping[str, float]]],
    cells: Sequence[str],
    candidates: Sequence[str],
) -> dict[str, Any]:
    """On each of `cells`: the pick from the short runs against the full-budget ranking.

    Returns:
        `cells`: per cell the pick, its gap to first and whether it (and the default) is
        within the seed spread of first; the counts; the cost: short-run training seconds and
        steps (the candidates' steps over one full run's steps).
    """
    short = {(r["cell"], r["method"]): r for r in records if r["seed"] == SELECT}
    rows, cost_seconds = {}, []
    for cell in cells:
        scores = {key: short[(cell, key)]["rouge_l"] for key in candidates if (cell, key) in short}
        pick = cheap_pick(scores, candidates)
        if pick is None:
            continue
        rank = rank_cell(table[cell])
        rows[cell] = {
            "pick": pick,
            "pick_gap_to_first": rank["gaps"][pick],
            "pick_within_spread": pick in rank["within_spread"],
            "default_gap_to_first": rank["gaps"][DEFAULT_METHOD],
            "default_within_spread": DEFAULT_METHOD in rank["within_spread"],
            "best_candidate": min(candidates, key=lambda key: rank["gaps"][key]),
        }
        cost_seconds.append(sum(short[(cell, key)]["train_seconds"] or 0 for key in candidates))
    return {
        "candidates": list(candidates),
        "cells": rows,
        "pick_within_spread": sum(row["pick_within_spread"] for row in rows.values()),
        "default_within_spread": sum(row["default_within_spread"] for row in rows.values()),
        "num_cells": len(rows),
        "steps_fraction_of_one_run": len(candidates) * SELECTION_FRACTION,
        "mean_train_seconds": statistics.fmean(cost_seconds) if cost_seconds else None,
    }


def grid_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Everything `--summarise` writes, as data: table, complete cells, win/loss, cheap choice."""
    table = cell_table(records)
    complete = complete_cells(table, list(GRID_METHODS), len(TRAINING_SEEDS))
    grid_runs = [r for r in records if r["seed"] != SELECT]
    return {
        "table": table,
        "complete_cells": complete,
        "ranks": {cell: rank_cell(table[cell]) for cell in complete},
        "win_loss": win_loss(table, complete),
        "cheap_choice": {
            "ab_settings": evaluate_cheap_choice(records, table, complete, AB_METHODS),
            "all_methods": evaluate_cheap_choice(records, table, complete, list(GRID_METHODS)),
        },
        "references": reference_scores(records),
        "runs_finished": len(grid_runs),
        "runs_planned": len(grid_cells()) * len(GRID_METHODS) * len(TRAINING_SEEDS),
        "short_runs_finished": len(records) - len(grid_runs),
        "train_seconds": run_costs(records),
    }


def reference_scores(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """ROUGE-L of the teacher and of each seed's fine-tuned student, before distillation."""
    teacher: set[float] = set()  # scored once per job, the same model and seeds each time
    sft: dict[int, float] = {}
    for record in records:
        if record["seed"] == SELECT:
            continue
        for row in record["reference_rows"]:
            if row["method"] == "teacher":
                teacher.add(row["rouge_l"])
            elif row["method"] == "student after SFT":
                sft[row["seed"]] = row["rouge_l"]
    scores = {}
    if teacher:
        scores["teacher"] = seed_statistics(sorted(teacher))
    if sft:
        scores["student after SFT"] = seed_statistics([sft[seed] for seed in sorted(sft)])
    return scores


def run_costs(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Training seconds per run (median, min, max) by cell budget, short runs apart."""
    seconds: dict[str, list[float]] = {}
    for record in records:
        if record["train_seconds"] is None:
            continue
        steps = parse_cell(record["cell"]).steps
        kind = f"{selection_steps(parse_cell(record['cell']))} steps (short run)"
        key = kind if record["seed"] == SELECT else f"{steps} steps"
        seconds.setdefault(key, []).append(record["train_seconds"])
    return {
        key: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": len(v)}
        for key, v in seconds.items()
    }


def table_markdown(summary: Mapping[str, Any]) -> str:
    """Methods x cells: mean ROUGE-L (spread = max - min over the seeds); **first**, and
    `~` within the first's spread, in complete cells."""
    table, ranks = summary["table"], summary["ranks"]
    order = [cell.name for cell in grid_cells()]
    cells = sorted(table, key=order.index)
    lines = ["| method | " + " | ".join(cells) + " |", "| --- |" + " --- |" * len(cells)]
    for key in GRID_METHODS:
        row = [GRID_METHODS[key].label]
        for cell in cells:
            stats = table[cell].get(key)
            if stats is None:
                row.append("")
                continue
            text = f"{stats['mean']:.2f} ({stats['spread']:.2f})"
            if stats["n"] < len(TRAINING_SEEDS):
                text += f" [{stats['n']} seed(s)]"
            rank = ranks.get(cell)
            if rank and rank["first"] == key:
                text = f"**{text}**"
            elif rank and key in rank["within_spread"]:
                text = f"~{text}"
            row.append(text)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def win_loss_markdown(summary: Mapping[str, Any]) -> str:
    cells = summary["complete_cells"]
    lines = [
        f"| method | first (of {len(cells)}) | within spread of first | mean gap to first | "
        "largest gap | mean lead when first |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, row in summary["win_loss"].items():
        lead = row["mean_lead_when_first"]
        lines.append(
            f"| {GRID_METHODS[key].label} | {len(row['first'])} | {len(row['within_spread'])} | "
            f"{row['mean_gap_to_first']:.2f} | {row['max_gap_to_first']:.2f} | "
            f"{'' if lead is None else f'{lead:.2f}'} |"
        )
    return "\n".join(lines) + "\n"


def cheap_choice_markdown(choice: Mapping[str, Any]) -> str:
    lines = [
        "| cell | pick | pick's gap to first | within spread | default's gap | default within |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for cell, row in choice["cells"].items():
        lines.append(
            f"| {cell} | {GRID_METHODS[row['pick']].label} | {row['pick_gap_to_first']:.2f} | "
            f"{'yes' if row['pick_within_spread'] else 'no'} | "
            f"{row['default_gap_to_first']:.2f} | "
            f"{'yes' if row['default_within_spread'] else 'no'} |"
        )
    seconds = choice["mean_train_seconds"]
    lines.append(
        f"\nPick within the seed spread of first in {choice['pick_within_spread']} of "
        f"{choice['num_cells']} cells, the default in {choice['default_within_spread']}. Cost: "
        f"{len(choice['candidates'])} short runs of {SELECTION_FRACTION:.0%} of the budget = "
        f"{choice['steps_fraction_of_one_run']:.1f}x the steps of one full run"
        + (f" ({seconds:.0f} s of training per cell, mean)" if seconds is not None else "")
        + ", plus one ROUGE-L evaluation (3 sampling seeds) per candidate."
    )
    return "\n".join(lines) + "\n"


def settings_markdown(summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> str:
    machines = {json.dumps(r["machine"], sort_keys=True) for r in records if r["machine"]}
    loads = [float(r["load_average"].split()[0]) for r in records if r.get("load_average")]
    finished = sorted(r["finished"] for r in records if r.get("finished"))
    lines = [
        f"- runs finished: {summary['runs_finished']} of {summary['runs_planned']} "
        f"(+ {summary['short_runs_finished']} short selection runs); complete cells: "
        f"{', '.join(summary['complete_cells']) or 'none'}",
        f"- machine: {'; '.join(sorted(machines))}",
        "- one thread per run; 1-minute load average at the end of the runs: "
        + (f"{min(loads):.1f} to {max(loads):.1f}" if loads else "n/a"),
        f"- runs finished between {finished[0]} and {finished[-1]}" if finished else "- no runs",
    ]
    for key, cost in summary["train_seconds"].items():
        lines.append(
            f"- training seconds per run, {key}: median {cost['median']:.0f} "
            f"(min {cost['min']:.0f}, max {cost['max']:.0f}, {cost['runs']} runs)"
        )
    return "\n".join(lines) + "\n"


def read_commands(results_dir: Path) -> list[dict[str, Any]]:
    path = results_dir / "commands.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_summary(results_dir: Path, command: str) -> list[Path]:
    """Write `summary.md` and `summary.json` into `results_dir` from its result files."""
    records = load_results(results_dir)
    if not records:
        raise SystemExit(f"No result files under {results_dir / 'runs'}; run the grid first.")
    summary = grid_summary(records)
    summary["command"] = command
    summary["written"] = time.strftime("%Y-%m-%d %H:%M %Z")
    references = ", ".join(
        f"{name} {stats['mean']:.2f} (spread {stats['spread']:.2f}, {stats['n']} seed(s))"
        for name, stats in summary["references"].items()
    )
    parts = [
        "# Protocol grid on the demo\n",
        "Held-out ROUGE-L (100 test prompts, sampling seeds 10-50), mean over training seeds "
        "0-2 and in brackets the spread (max - min over the seeds). **Bold**: first in a "
        "complete cell; `~`: within the first's spread (its mean at most the first's spread "
        f"below the first's). Before distillation: {references}.\n",
        table_markdown(summary),
        "## Win/loss over the complete cells\n",
        win_loss_markdown(summary),
        "## Cheap choice: short runs of the AB settings\n",
        cheap_choice_markdown(summary["cheap_choice"]["ab_settings"]),
        "## Cheap choice: short runs of every method\n",
        cheap_choice_markdown(summary["cheap_choice"]["all_methods"]),
        "## Settings\n",
        f"- command: `{command}`\n- written: {summary['written']}\n"
        + "".join(
            f"- ran: `{c['command']}` (nice {c['niceness']}, started {c['started']})\n"
            for c in read_commands(results_dir)
        )
        + settings_markdown(summary, records),
    ]
    md_path, json_path = results_dir / "summary.md", results_dir / "summary.json"
    md_path.write_text("\n".join(parts))
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    return [md_path, json_path]
