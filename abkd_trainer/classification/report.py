"""The classifier run report: `report.json`, `report.md` and `accuracy.png` in the output directory.

`report.json` compares the teacher, the student before training and the student after training
on the held-out split, by top-1 accuracy (a fraction in [0, 1]):

    {"teacher": {"accuracy": 0.975},
     "student_before": {"accuracy": 0.095, "teacher_agreement": 0.1, "kd_loss": 0.7, ...},
     "student_after": {"accuracy": 0.964, "teacher_agreement": 0.96, "kd_loss": 0.01, ...},
     "evaluation": {...}, "training": {...}, "environment": {...}}

The rows come from `ABKDClassifierTrainer.evaluate()` before and after training (`eval_accuracy`,
`eval_teacher_accuracy`, `eval_teacher_agreement`, `eval_kd_loss`, `eval_ce_loss`: means over the
held-out examples).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from abkd_trainer.core.reports import markdown_table, plain_text_table, settings_sections
from abkd_trainer.divergences.registry import divergence_config_fields

__all__ = [
    "ACCURACY_PLOT_PNG",
    "MODEL_ROWS",
    "REPORT_JSON",
    "REPORT_MD",
    "format_accuracy_table",
    "format_markdown",
    "make_classifier_report",
    "model_rows",
    "plot_accuracy",
    "write_report",
]

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
ACCURACY_PLOT_PNG = "accuracy.png"
MODEL_ROWS = ("teacher", "student_before", "student_after")
# Student metrics copied from the evaluation (logged as `eval_<name>`).
STUDENT_METRICS = ("accuracy", "teacher_agreement", "kd_loss", "ce_loss", "student_entropy")
# The run's settings repeated in the report; divergence parameters only for the divergence used.
_TRAINING_FIELDS = (
    "divergence", "temperature", "kd_weight", "ce_weight", "logit_standardization",
    "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "seed",
)  # fmt: skip


def model_rows(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, dict]:
    """The teacher / student_before / student_after rows from two `evaluate()` results.

    Args:
        before: the metrics `ABKDClassifierTrainer.evaluate()` returned before training
            (`eval_accuracy`, `eval_teacher_accuracy`, ...).
        after: the same after training.

    Returns:
        `teacher` (its accuracy, when evaluated), `student_before` and `student_after` (the
        metrics of `STUDENT_METRICS` that were logged).
    """
    rows: dict[str, dict] = {}
    teacher_accuracy = after.get("eval_teacher_accuracy", before.get("eval_teacher_accuracy"))
    if teacher_accuracy is not None:
        rows["teacher"] = {"accuracy": teacher_accuracy}
    for row, metrics in (("student_before", before), ("student_after", after)):
        rows[row] = {
            name: metrics[f"eval_{name}"] for name in STUDENT_METRICS if f"eval_{name}" in metrics
        }
    return rows


def make_classifier_report(
    *,
    before: Mapping[str, float],
    after: Mapping[str, float],
    training_args: Any,
    teacher: str,
    student: str,
    dataset: str,
    test_split: str,
    num_test_examples: int,
    log_history: Sequence[Mapping[str, Any]] = (),
    wall_time_s: float | None = None,
    environment: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the report dictionary (see the module docstring for its layout).

    Args:
        before: the `evaluate()` results on the held-out split before training.
        after: the same after training.
        training_args: the run's `ABKDClassifierConfig` (its objective settings are copied).
        teacher: how to name the teacher in the report.
        student: how to name the student.
        dataset: how to name the dataset.
        test_split: the held-out split's name.
        num_test_examples: its number of examples.
        log_history: `trainer.state.log_history`, for the final training loss and step count.
        wall_time_s: training wall time in seconds.
        environment: versions and hardware (e.g. `abkd_trainer.tools.report.environment_info`).

    Returns:
        The report, ready for `write_report`.
    """
    report: dict[str, Any] = model_rows(before, after)
    report["evaluation"] = {
        "metric": "top-1 accuracy (fraction of the held-out examples)",
        "dataset": dataset,
        "split": test_split,
        "num_examples": num_test_examples,
    }
    training: dict[str, Any] = {"teacher": teacher, "student": student}
    names = _TRAINING_FIELDS + divergence_config_fields(training_args.divergence)
    names += ("max_steps",) if training_args.max_steps > 0 else ("num_train_epochs",)
    training.update(
        {name: getattr(training_args, name) for name in names if hasattr(training_args, name)}
    )
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    steps = [entry["step"] for entry in log_history if "step" in entry]
    training["global_step"] = max(steps) if steps else 0
    training["final_train_loss"] = losses[-1] if losses else None
    if wall_time_s is not None:
        training["wall_time_s"] = round(wall_time_s, 1)
    report["training"] = training
    if environment is not None:
        report["environment"] = dict(environment)
    return report


def _percent(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{100 * value:.2f}"


def _cell(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _table(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "accuracy (%)", "agreement with teacher (%)", "kd_loss", "ce_loss"]
    rows = []
    for row in MODEL_ROWS:
        if row not in report:
            continue
        entry = report[row]
        agreement = 1.0 if row == "teacher" else entry.get("teacher_agreement")
        rows.append(
            [
                row,
                _percent(entry.get("accuracy")),
                _percent(agreement),
                _cell(entry.get("kd_loss")) if row != "teacher" else "0",
                _cell(entry.get("ce_loss")) if row != "teacher" else "-",
            ]
        )
    return header, rows


def format_accuracy_table(report: Mapping[str, Any]) -> str:
    """The accuracy table as plain text for the terminal.

    Args:
        report: from `make_classifier_report`.
    """
    header, rows = _table(report)
    evaluation = report.get("evaluation", {})
    title = (
        f"Top-1 accuracy on {evaluation.get('num_examples', '?')} held-out examples "
        f"(split {evaluation.get('split', '?')!r})"
    )
    return plain_text_table(title, header, rows)


def format_markdown(report: Mapping[str, Any], *, plot: str | None = ACCURACY_PLOT_PNG) -> str:
    """`report.md`: the accuracy table, the settings, the environment and the plot.

    Args:
        report: from `make_classifier_report`.
        plot: the plot's file name, linked from the page; None links none.
    """
    header, rows = _table(report)
    evaluation = report.get("evaluation", {})
    lines = [
        "# ABKD classifier distillation report",
        "",
        f"Held-out examples: {evaluation.get('num_examples')} from `{evaluation.get('dataset')}` "
        f"(split `{evaluation.get('split')}`). Accuracy: top-1 against the labels; agreement: "
        "top-1 equal to the teacher's; kd_loss: the training divergence to the teacher and "
        "ce_loss: cross-entropy with the labels, means per example.",
        "",
        *markdown_table(header, rows),
        "",
        *settings_sections(report),
    ]
    if plot is not None:
        lines += [f"![accuracy]({plot})", ""]
    return "\n".join(lines)


def plot_accuracy(
    report: Mapping[str, Any], log_history: Sequence[Mapping[str, Any]], path: str | Path
) -> bool:
    """Save the teacher / before / after accuracies (bars) and the held-out accuracy against the
    step (from `eval_accuracy` in `log_history`, and `student_before` at step 0) as a PNG.

    Args:
        report: from `make_classifier_report`.
        log_history: `trainer.state.log_history`.
        path: the PNG to write.

    Returns:
        False (and writes nothing) when the report has no accuracy to plot.
    """
    bars = [
        (row, report[row]["accuracy"]) for row in MODEL_ROWS if "accuracy" in report.get(row, {})
    ]
    if not bars:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    points = {
        entry["step"]: entry["eval_accuracy"]
        for entry in log_history
        if "eval_accuracy" in entry and "step" in entry
    }
    if "accuracy" in report.get("student_before", {}):
        # evaluated before train(), which starts a new log history
        points.setdefault(0, report["student_before"]["accuracy"])
    curve = sorted(points.items())
    figure, (bar_axis, curve_axis) = plt.subplots(1, 2, figsize=(10, 4))
    labels, values = zip(*bars, strict=True)
    colours = {"teacher": "tab:gray", "student_before": "tab:orange", "student_after": "tab:blue"}
    drawn = bar_axis.bar(labels, [100 * v for v in values], color=[colours[k] for k in labels])
    bar_axis.bar_label(drawn, fmt="%.1f")
    bar_axis.set_ylabel("held-out top-1 accuracy (%)")
    bar_axis.set_ylim(0, 105)
    bar_axis.set_title("teacher and student")
    if curve:
        curve_axis.plot(*zip(*curve, strict=True), marker="o", label="student")
    if "teacher" in report:
        curve_axis.axhline(
            report["teacher"]["accuracy"], color="tab:gray", ls="--", label="teacher"
        )
    curve_axis.set_xlabel("optimizer step")
    curve_axis.set_ylabel("held-out top-1 accuracy")
    curve_axis.set_title("during training")
    curve_axis.grid(alpha=0.3)
    curve_axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def write_report(
    report: Mapping[str, Any], log_history: Sequence[Mapping[str, Any]], output_dir: str | Path
) -> list[Path]:
    """Write `report.json`, `report.md` and (when there is an accuracy) `accuracy.png`.

    Args:
        report: from `make_classifier_report`.
        log_history: `trainer.state.log_history`, for the accuracy curve.
        output_dir: the folder to write them in (created when missing).

    Returns:
        The paths written.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / REPORT_JSON, output_dir / REPORT_MD]
    has_plot = plot_accuracy(report, log_history, output_dir / ACCURACY_PLOT_PNG)
    paths[0].write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    paths[1].write_text(
        format_markdown(report, plot=ACCURACY_PLOT_PNG if has_plot else None), encoding="utf-8"
    )
    if has_plot:
        paths.append(output_dir / ACCURACY_PLOT_PNG)
    return paths
