"""The summary of `compare_classifier_divergences.py`: statistics, the markdown table, the chart.

Pure functions of the run results (dicts with `init`, `method`, `label`, `group`, `seed`,
`accuracy`, `teacher_agreement`), so that they are tested without training:

- `describe`: mean and sample standard deviation over the seeds;
- `paired_difference`: one method minus another, seed by seed (both runs of a seed share the
  student's initialisation and the data order), with the half-width of the 95% t-interval of
  the mean difference; a difference whose interval contains 0 is *within spread*;
- `aggregate`, `to_markdown`, `plot`: the rows, the table and the bar chart.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

INITS = ("random", "ce")
GROUPS = ("divergences", "grid", "settings", "custom")
# Two-sided 95% quantiles of Student's t by degrees of freedom 1..20; beyond 20 the value at 20
# (an interval slightly wider than the exact one).
T_95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086)  # fmt: skip


def describe(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value) and count of `values`."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": spread, "n": len(values)}


def paired_difference(
    results: Sequence[Mapping[str, Any]], method: str, reference: str, init: str
) -> dict[str, Any] | None:
    """Accuracy of `method` minus that of `reference`, seed by seed, from start `init`.

    Args:
        results: the run results.
        method: the method key.
        reference: the key of the method it is compared with.
        init: `"random"` or `"ce"`.

    Returns:
        None without a seed both were run with; else `mean` and `std` of the per-seed
        differences (fractions), `n`, `seeds`, `ci95` (half-width of the 95% t-interval of the
        mean; inf for one seed) and `separated` (the interval excludes 0).
    """
    by_seed: dict[str, dict[int, float]] = {method: {}, reference: {}}
    for result in results:
        if result["init"] == init and result["method"] in by_seed:
            by_seed[result["method"]][result["seed"]] = result["accuracy"]
    seeds = sorted(set(by_seed[method]) & set(by_seed[reference]))
    if not seeds:
        return None
    stats = describe([by_seed[method][seed] - by_seed[reference][seed] for seed in seeds])
    n = stats["n"]
    ci95 = T_95[min(n - 1, len(T_95)) - 1] * stats["std"] / math.sqrt(n) if n > 1 else math.inf
    return {**stats, "seeds": seeds, "ci95": ci95, "separated": abs(stats["mean"]) > ci95}


def aggregate(results: Sequence[Mapping[str, Any]], reference: str) -> list[dict[str, Any]]:
    """One row per method, in the order of `results`.

    Args:
        results: the run results.
        reference: the method of the `vs_reference` paired differences.

    Returns:
        Rows with `method`, `label`, `group` and per start run (`random`, `ce`): `n`, the means
        and standard deviations over the seeds of `accuracy` and `teacher_agreement` (`*_std`),
        and `vs_reference` (see `paired_difference`; absent for the reference itself).
    """
    rows: dict[str, dict[str, Any]] = {}
    samples: dict[tuple[str, str], dict[str, list[float]]] = {}
    for result in results:
        rows.setdefault(
            result["method"],
            {"method": result["method"], "label": result["label"], "group": result["group"]},
        )
        entry = samples.setdefault((result["method"], result["init"]), {})
        for metric in ("accuracy", "teacher_agreement"):
            entry.setdefault(metric, []).append(result[metric])
    for (method, init), metrics in samples.items():
        cell: dict[str, Any] = {"n": len(metrics["accuracy"])}
        for metric, values in metrics.items():
            stats = describe(values)
            cell[metric], cell[f"{metric}_std"] = stats["mean"], stats["std"]
        if method != reference:
            cell["vs_reference"] = paired_difference(results, method, reference, init)
        rows[method][init] = cell
    return list(rows.values())


def cell_text(entry: Mapping[str, Any] | None, metric: str = "accuracy") -> str:
    """`mean ± std` in percent, or `-` without runs."""
    if entry is None:
        return "-"
    return f"{100 * entry[metric]:.2f} ± {100 * entry[f'{metric}_std']:.2f}"


def difference_text(difference: Mapping[str, Any] | None) -> str:
    """A paired difference in points, `mean ± std`, bold when its 95% interval excludes 0."""
    if difference is None:
        return "-"
    text = f"{100 * difference['mean']:+.2f} ± {100 * difference['std']:.2f}"
    return f"**{text}**" if difference["separated"] else text


def comparison_lines(
    results: Sequence[Mapping[str, Any]],
    labels: Mapping[str, str],
    comparisons: Sequence[tuple[str, str]],
) -> list[str]:
    """The table of the `comparisons` (method, reference) whose two methods were run."""
    lines = []
    for method, reference in comparisons:
        if method not in labels or reference not in labels:
            continue
        for init in INITS:
            difference = paired_difference(results, method, reference, init)
            if difference is None:
                continue
            low = 100 * (difference["mean"] - difference["ci95"])
            high = 100 * (difference["mean"] + difference["ci95"])
            lines.append(
                f"| {labels[method]} − {labels[reference]} | {init} | "
                f"{difference_text(difference)} | [{low:+.2f}, {high:+.2f}] | "
                f"{difference['n']} | {'yes' if difference['separated'] else 'no'} |"
            )
    if not lines:
        return []
    header = "| comparison | start | difference (points) | 95% interval | seeds | separated |"
    return [header, "| --- | --- | --- | --- | --- | --- |", *lines]


def table_lines(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """One markdown table per group of `rows`: accuracy and Δ per start, agreement (random)."""
    lines = []
    for group in GROUPS:
        members = [row for row in rows if row["group"] == group]
        if not members:
            continue
        lines += [
            f"## {group}",
            "",
            "| method | random init | Δ | from CE-trained | Δ | agreement with teacher (random) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for row in members:
            cells = [row["label"]]
            for init in INITS:
                entry = row.get(init)
                cells += [cell_text(entry), difference_text((entry or {}).get("vs_reference"))]
            cells.append(cell_text(row.get("random"), "teacher_agreement"))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def to_markdown(
    rows: Sequence[Mapping[str, Any]],
    header: Mapping[str, Any],
    results: Sequence[Mapping[str, Any]] = (),
    comparisons: Sequence[tuple[str, str]] = (),
) -> str:
    """The comparison tables, the paired comparisons, the command, the machine and the date.

    Args:
        rows: from `aggregate`.
        header: `num_test`, `seeds`, `steps`, `ce_steps`, `batch_size`, `learning_rate`,
            `common_settings`, `teacher_accuracy`, `reference`, `command`, `machine`, `date`,
            `wall_time_s`, `train_seconds`, `num_runs`.
        results: the run results, for the paired comparisons.
        comparisons: `(method, reference)` pairs stated below the tables.
    """
    labels = {row["method"]: row["label"] for row in rows}
    reference = labels.get(header["reference"], header["reference"])
    settings = ", ".join(f"{key}={value}" for key, value in header["common_settings"].items())
    lines = [
        "# Classifier distillation: divergences on the digits demo",
        "",
        f"Held-out top-1 accuracy (%) on {header['num_test']} test images (1 image = "
        f"{100 / header['num_test']:.2f} points), mean ± standard deviation over the training "
        f"seeds {header['seeds']}; {header['steps']} optimizer steps of {header['batch_size']} "
        f"images per run (learning rate {header['learning_rate']:g}, cosine). `random`: from the "
        f"freshly initialised student; `ce`: from the student after {header['ce_steps']} steps "
        f"of cross-entropy alone. Shared settings unless the row says otherwise: {settings}. "
        f"Teacher: {100 * header['teacher_accuracy']:.2f}%. Δ: the paired difference to "
        f"{reference} (seed by seed: same initialisation and data order; mean ± standard "
        "deviation, in points); **bold** when its 95% t-interval excludes 0, else the "
        "difference is within spread.",
        "",
        *table_lines(rows),
    ]
    paired = comparison_lines(results, labels, comparisons)
    if paired:
        lines += ["## Paired comparisons", "", *paired, ""]
    lines += [
        f"Command: `{header['command']}`",
        "",
        f"Machine: {header['machine']}; one thread per run; {header['date']}; "
        f"{header['wall_time_s']:.0f} s wall for this invocation (runs already done are kept); "
        f"{header['train_seconds']:.0f} s of training in all {header['num_runs']} runs.",
        "",
    ]
    return "\n".join(lines)


def plot(rows: Sequence[Mapping[str, Any]], path: str | Path, teacher_accuracy: float) -> None:
    """Save horizontal bars of the mean accuracy per method and start (error bars: the standard
    deviation over the seeds), the teacher as a dashed line, as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.5))
    height = 0.4
    for offset, (init, name) in enumerate((("random", "random init"), ("ce", "from CE-trained"))):
        means = [100 * row[init]["accuracy"] if init in row else 0 for row in rows]
        spreads = [100 * row[init]["accuracy_std"] if init in row else 0 for row in rows]
        positions = [index + (offset - 0.5) * height for index in range(len(rows))]
        axis.barh(positions, means, height, xerr=spreads, capsize=2, label=name)
    axis.axvline(100 * teacher_accuracy, color="gray", ls="--", label="teacher")
    values = [100 * row[init]["accuracy"] for row in rows for init in INITS if init in row]
    axis.set_xlim(max(0, min(values) - 5), 100)
    axis.set_yticks(range(len(rows)))
    axis.set_yticklabels([row["label"] for row in rows], fontsize=8)
    axis.invert_yaxis()  # the table's order, top to bottom
    axis.set_xlabel("held-out top-1 accuracy (%), mean ± std over seeds")
    axis.legend(loc="lower left", fontsize=8)
    axis.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
