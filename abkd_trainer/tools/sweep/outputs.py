"""What an `abkd-sweep` study leaves in `--output_dir`: `trials.csv`, `heatmap.png`, `best.yaml`.

Every worker writes them for the whole study when it stops, so the last worker to stop leaves
the complete picture.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abkd_trainer.tools.sweep.metrics import REFERENCE_KL_METRIC, ROUGE_L_METRIC
from abkd_trainer.tools.sweep.search_space import REFERENCE_POINTS, SweepArguments
from abkd_trainer.tools.sweep.trials import (
    OVER_BUDGET_ATTR,
    RESUMED_FROM_ATTR,
    START_STEP_ATTR,
    WORKER_ATTR,
    best_trial,
    re_runs,
    retry_history,
    trial_reason,
)

if TYPE_CHECKING:
    import optuna


def trial_rows(study: optuna.Study, metric: str, direction: str) -> list[dict[str, Any]]:
    """One row per trial of the study (over-budget skips and queued trials left out).

    Args:
        study: the study.
        metric: the objective's name, written into every row.
        direction: `"maximize"` or `"minimize"`, written into every row.

    Returns:
        The rows of `trials.csv`, in trial order: number, parameters, value, state, seconds,
        metric, direction, the last reported step and value, those of `eval_rouge_l`,
        `eval_reference_kl` and the objective that some trial recorded, whether the trial is a
        reference point, its worker; then what became of it: `reason` (empty for a complete
        trial; pruned, failed with its error, or its worker died), `retry_of` (the dead trial a
        re-run replaces), `re_run_as` (the trial that re-runs a dead one), `resumed_from` (the
        checkpoint a re-run resumed from) and `start_step` (the step its training started at).
    """
    trials = [
        trial
        for trial in study.get_trials(deepcopy=False)
        if not trial.user_attrs.get(OVER_BUDGET_ATTR) and trial.state.name != "WAITING"
    ]
    param_names = sorted({name for trial in study.trials for name in trial.params})
    recorded = {name for trial in trials for name in trial.user_attrs}
    metric_names = [
        name
        for name in dict.fromkeys((ROUGE_L_METRIC, REFERENCE_KL_METRIC, metric))
        if name in recorded
    ]
    replaced_by = re_runs(study)
    return [
        {
            "number": trial.number,
            **{name: trial.params.get(name) for name in param_names},
            "value": trial.value,
            "state": trial.state.name,
            "seconds": trial_seconds(trial),
            "metric": metric,
            "direction": direction,
            **last_report(trial),
            **{name: trial.user_attrs.get(name) for name in metric_names},
            "reference_point": bool(trial.user_attrs.get("reference_point", False)),
            "worker": trial.user_attrs.get(WORKER_ATTR),
            "reason": trial_reason(trial, replaced_by.get(trial.number)),
            "retry_of": (retry_history(trial) or [None])[-1],
            "re_run_as": replaced_by.get(trial.number),
            "resumed_from": trial.user_attrs.get(RESUMED_FROM_ATTR),
            "start_step": trial.user_attrs.get(START_STEP_ATTR),
        }
        for trial in trials
    ]


def trial_seconds(trial: optuna.trial.FrozenTrial) -> float | None:
    """The trial's wall time in seconds (2 decimals), or None while it has not finished.

    Args:
        trial: a trial.
    """
    if trial.datetime_start is None or trial.datetime_complete is None:
        return None
    return round((trial.datetime_complete - trial.datetime_start).total_seconds(), 2)


def last_report(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """`last_reported_step` and `last_reported_value`: the trial's last intermediate value.

    Args:
        trial: a trial.
    """
    if not trial.intermediate_values:
        return {"last_reported_step": None, "last_reported_value": None}
    step = max(trial.intermediate_values)
    return {"last_reported_step": step, "last_reported_value": trial.intermediate_values[step]}


def unfinished_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per trial that neither completed nor was pruned: its number, state and reason.

    Args:
        rows: the rows of `trial_rows`.
    """
    return [
        f"trial {row['number']} ({row['state']}): {row['reason']}"
        for row in rows
        if row["state"] not in ("COMPLETE", "PRUNED")
    ]


def write_trials_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write `rows` (from `trial_rows`) as a CSV file with a header; returns `path`.

    Args:
        rows: the rows; the columns are their keys in first-seen order.
        path: the file to write.
    """
    columns = list(dict.fromkeys(key for row in rows for key in row)) or ["number"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _draw_completed_trials(
    figure: Any, axis: Any, complete: list[dict[str, Any]], metric: str, direction: str
) -> None:
    """Interpolated surface, coloured points with their values, colour bar, best trial."""
    from matplotlib.tri import Triangulation

    cmap = "viridis" if direction == "maximize" else "viridis_r"
    alphas = [row["alpha"] for row in complete]
    betas = [row["beta"] for row in complete]
    values = [row["value"] for row in complete]
    if len(complete) >= 3:
        try:
            surface = axis.tricontourf(
                Triangulation(alphas, betas), values, levels=14, cmap=cmap, alpha=0.85
            )
        except (ValueError, RuntimeError):  # all points on one line: no triangulation
            surface = None
    else:
        surface = None
    points = axis.scatter(alphas, betas, c=values, cmap=cmap, edgecolors="black", s=55, zorder=3)
    for alpha, beta, value in zip(alphas, betas, values, strict=True):
        axis.annotate(
            f"{value:.3g}",
            (alpha, beta),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=7,
            zorder=6,
        )
    colorbar = figure.colorbar(surface or points, ax=axis)
    colorbar.set_label(f"{metric} ({'higher' if direction == 'maximize' else 'lower'} is better)")
    best = (max if direction == "maximize" else min)(complete, key=lambda row: row["value"])
    axis.scatter(
        [best["alpha"]],
        [best["beta"]],
        marker="*",
        s=380,
        color="gold",
        edgecolors="black",
        zorder=5,
        label=f"best ({best['alpha']:.2f}, {best['beta']:.2f}): {best['value']:.4g}",
    )


def _draw_unfinished_trials(axis: Any, rows: list[dict[str, Any]]) -> None:
    """Failed trials as red crosses, running ones as orange dots, labelled with their numbers."""
    styles = {
        "FAIL": {"marker": "X", "color": "red", "label": "failed (see trials.csv: reason)"},
        "RUNNING": {"marker": "o", "color": "orange", "label": "running when written"},
    }
    for state, style in styles.items():
        marked = [row for row in rows if row["state"] == state]
        if not marked:
            continue
        axis.scatter(
            [row["alpha"] for row in marked],
            [row["beta"] for row in marked],
            s=70,
            zorder=5,
            edgecolors="black",
            **style,
        )
        for row in marked:
            axis.annotate(
                f"#{row['number']}",
                (row["alpha"], row["beta"]),
                textcoords="offset points",
                xytext=(-14, 6),
                fontsize=7,
                color=style["color"],
            )


def draw_heatmap(
    rows: list[dict[str, Any]], metric: str, direction: str, path: Path, title: str = ""
) -> Path:
    """The objective over the (alpha, beta) plane, reference points and the best trial marked.

    Completed trials are coloured by their final value and, with three or more not on one line,
    interpolated linearly over their triangulation; pruned trials are grey crosses with their
    last reported value and its step (not comparable with final values); failed trials are red
    crosses and running ones orange dots, each with its number (`trials.csv` says why).

    Args:
        rows: the rows of `trial_rows`.
        metric: the objective's name, for the colour bar.
        direction: `"maximize"` or `"minimize"`: which end of the colour map is better.
        path: the PNG file to write.
        title: the plot's title; empty for one naming the metric and the number of trials.

    Returns:
        `path`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    placed = [row for row in rows if row.get("alpha") is not None and row.get("beta") is not None]
    complete = [row for row in placed if row["state"] == "COMPLETE" and row["value"] is not None]
    pruned = [row for row in placed if row["state"] == "PRUNED"]
    figure, axis = plt.subplots(figsize=(10, 6))
    if complete:
        _draw_completed_trials(figure, axis, complete, metric, direction)
    _draw_unfinished_trials(axis, placed)
    if pruned:
        axis.scatter(
            [row["alpha"] for row in pruned],
            [row["beta"] for row in pruned],
            marker="x",
            color="grey",
            s=45,
            zorder=4,
            label="pruned (last value @ step)",
        )
        for row in pruned:
            if row["last_reported_value"] is not None:
                axis.annotate(
                    f"{row['last_reported_value']:.3g}@{row['last_reported_step']}",
                    (row["alpha"], row["beta"]),
                    textcoords="offset points",
                    xytext=(5, -9),
                    fontsize=6,
                    color="grey",
                )
    for index, (name, (alpha, beta)) in enumerate(REFERENCE_POINTS.items()):
        axis.scatter(
            [alpha],
            [beta],
            marker="s",
            s=110,
            facecolors="none",
            edgecolors=f"C{index + 1}",
            linewidths=2,
            zorder=4,
            label=f"{name} ({alpha:g}, {beta:g})",
        )
    every_alpha = [row["alpha"] for row in placed] + [a for a, _ in REFERENCE_POINTS.values()]
    every_beta = [row["beta"] for row in placed] + [b for _, b in REFERENCE_POINTS.values()]
    axis.set_xlim(min(every_alpha) - 0.05, max(every_alpha) + 0.05)
    axis.set_ylim(min(every_beta) - 0.05, max(every_beta) + 0.05)
    axis.set_xlabel("alpha (hardness-concentration)")
    axis.set_ylabel("beta (confidence-concentration)")
    axis.set_title(title or f"abkd-sweep: {metric} over (alpha, beta), {len(rows)} trials")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.25, 1.0), framealpha=0.9)
    axis.grid(alpha=0.25)
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def write_best_yaml(
    best: optuna.trial.FrozenTrial,
    base_config: dict[str, Any],
    metric: str,
    direction: str,
    path: Path,
    unfinished: list[str] | None = None,
    command: str = "abkd-train",
) -> Path:
    """`base_config` with the best trial's parameters, as an `abkd-train --config` file.

    Args:
        best: the best trial.
        base_config: the settings the sweep ran with (flag -> value).
        metric: the objective's name, for the header comment.
        direction: the objective's direction, for the header comment.
        path: the YAML file to write.
        unfinished: lines naming the trials that did not finish and why, for the header.
        command: the training command that runs the file, for the header.

    Returns:
        `path`.
    """
    import yaml

    config = {**base_config, **best.params}
    header = (
        f"# abkd-sweep best trial {best.number}: {metric} = {best.value:.6g} ({direction}).\n"
        f"# Run it with: {command} --config best.yaml (the trial's training length is kept;\n"
        "# raise max_steps / num_train_epochs for the full run).\n"
    )
    if unfinished:
        header += "# Trials that did not finish (trials.csv has every trial):\n"
        header += "".join(f"#   {line}\n" for line in unfinished)
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return path


def write_sweep_outputs(
    study: optuna.Study,
    sweep_args: SweepArguments,
    metric: str,
    direction: str,
    output_dir: str | os.PathLike,
    best_config: dict[str, Any] | None,
    command: str = "abkd-train",
) -> list[Path]:
    """Write `trials.csv`, `heatmap.png` and (once a trial completed) `best.yaml`.

    Args:
        study: the study.
        sweep_args: the search.
        metric: the objective's name.
        direction: the objective's direction.
        output_dir: the folder to write into (created if missing).
        best_config: the settings the sweep ran with (flag -> value), the base of `best.yaml`;
            its run goes to `<output_dir>/best-run`.
        command: the training command that runs `best.yaml`.

    Returns:
        The files written.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study, metric, direction)
    files = [write_trials_csv(rows, output_dir / "trials.csv")]
    files.append(draw_heatmap(rows, metric, direction, output_dir / "heatmap.png"))
    best = best_trial(study)
    if best is not None:
        # Not the sweep's own directory: the run would mix its files with the sweep's.
        base = {**(best_config or {}), "output_dir": str(output_dir / "best-run")}
        path = output_dir / "best.yaml"
        files.append(
            write_best_yaml(
                best, base, metric, direction, path, unfinished_lines(rows), command=command
            )
        )
    return files
