"""The run report: `report.json`, `report.md` and `loss_curve.png` in the output directory.

`report.json` compares the teacher, the student before training and the student after
training on held-out prompts:

    {"teacher": {"rouge_l": 71.2, ...},
     "student_before": {"rouge_l": 1.3, "divergence_to_teacher": {"ab": 2.9, "fkl": 4.1}, ...},
     "student_after": {"rouge_l": 55.0, "divergence_to_teacher": {"ab": 0.2, "fkl": 0.3}, ...},
     "evaluation": {...}, "training": {...},
     "environment": {"abkd_trainer": "0.1.0", "torch": "2.13.0", ..., "device": "cpu (...)"}}

ROUGE-L is the F-measure x 100 of sampled responses (mean over prompts, then seeds); the
divergences are nats per reference-response token under teacher forcing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abkd_trainer.core.reports import (
    environment_info,
    markdown_table,
    plain_text_table,
    settings_sections,
)
from abkd_trainer.divergences.registry import divergence_config_fields

if TYPE_CHECKING:
    from abkd_trainer.lm.config import ABKDConfig
    from abkd_trainer.lm.evaluation import RougeLResult

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
LOSS_CURVE_PNG = "loss_curve.png"
MODEL_ROWS = ("teacher", "student_before", "student_after")
# The run's settings repeated in the report; divergence parameters only for the divergence used.
_TRAINING_FIELDS = (
    "divergence", "temperature", "kd_ratio", "learning_rate", "per_device_train_batch_size",
    "gradient_accumulation_steps", "seed",
)  # fmt: skip


def make_report(
    *,
    rouge_results: Mapping[str, RougeLResult],
    divergences: Mapping[str, Mapping[str, float]],
    training_args: ABKDConfig,
    teacher: str | None,
    student: str,
    dataset: str,
    test_split: str,
    max_new_tokens: int,
    log_history: Sequence[Mapping[str, Any]] = (),
    wall_time_s: float | None = None,
    environment: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the report dictionary (see the module docstring for its layout).

    Args:
        rouge_results: `"teacher"`, `"student_before"`, `"student_after"` -> result of
            `abkd_trainer.lm.evaluation.rouge_l_evaluate` (missing rows are left out).
        divergences: `"student_before"` / `"student_after"` -> {name: nats per token}.
        training_args: the run's ABKDConfig (its objective settings are copied).
        log_history: `trainer.state.log_history`, for the final training loss and step count.
        wall_time_s: training + evaluation wall time in seconds.
        environment: see `environment_info`; by default that of `training_args`'
            device and process count, in this process.
    """
    report: dict[str, Any] = {}
    for row in MODEL_ROWS:
        if row not in rouge_results:
            continue
        result = rouge_results[row]
        entry: dict[str, Any] = {
            "rouge_l": result.rouge_l,
            "rouge_l_std": result.rouge_l_std,
            "rouge_l_per_seed": result.per_seed,
        }
        if row in divergences:
            entry["divergence_to_teacher"] = dict(divergences[row])
        entry["samples"] = result.samples
        report[row] = entry
    first = next(iter(rouge_results.values()), None)
    report["evaluation"] = {
        "metric": "ROUGE-L F-measure x 100 of sampled responses (rouge-score, stemmed)",
        "temperature": 1.0,
        "top_p": 1.0,
        "max_new_tokens": max_new_tokens,
        "seeds": first.seeds if first else [],
        "num_prompts": first.num_prompts if first else 0,
        "dataset": dataset,
        "split": test_split,
        "divergence_to_teacher": "mean per reference-response token, teacher forcing, nats",
    }
    training: dict[str, Any] = {"teacher": teacher, "student": student}
    divergence = getattr(training_args, "divergence", None)
    names = _TRAINING_FIELDS + divergence_config_fields(divergence)
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
    report["environment"] = dict(
        environment
        if environment is not None
        else environment_info(training_args.device, num_processes=training_args.world_size)
    )
    return report


def _cell(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def comparison_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the teacher / before / after comparison, as strings."""
    divergence_names: list[str] = []
    for row in MODEL_ROWS:
        for name in report.get(row, {}).get("divergence_to_teacher", {}):
            if name not in divergence_names:
                divergence_names.append(name)
    header = ["model", "ROUGE-L", "+/- (seeds)"] + [
        f"{name} to teacher" for name in divergence_names
    ]
    rows = []
    for row in MODEL_ROWS:
        if row not in report:
            continue
        entry = report[row]
        divergences = entry.get("divergence_to_teacher", {})
        rows.append(
            [row, _cell(entry["rouge_l"]), _cell(entry["rouge_l_std"])]
            + [
                _cell(divergences.get(name), 4) if row != "teacher" else "0"
                for name in divergence_names
            ]
        )
    return header, rows


def format_comparison_table(report: Mapping[str, Any]) -> str:
    """Plain-text table for the terminal."""
    header, rows = comparison_rows(report)
    evaluation = report.get("evaluation", {})
    title = (
        f"ROUGE-L (F x 100) of sampled responses on {evaluation.get('num_prompts', '?')} held-out "
        f"prompts, mean over seeds {evaluation.get('seeds', '?')}; divergences in nats/token"
    )
    return plain_text_table(title, header, rows)


def format_markdown(report: Mapping[str, Any], *, loss_curve: str | None = LOSS_CURVE_PNG) -> str:
    """`report.md`: the comparison table, the settings, the loss curve and sampled responses."""
    header, rows = comparison_rows(report)
    lines = ["# ABKD distillation report", ""]
    evaluation = report.get("evaluation", {})
    lines += [
        f"Held-out prompts: {evaluation.get('num_prompts')} from `{evaluation.get('dataset')}` "
        f"(split `{evaluation.get('split')}`). ROUGE-L: F-measure x 100 of responses sampled at "
        f"temperature 1, top-p 1, mean over seeds {evaluation.get('seeds')}. Divergence to "
        "teacher: mean per reference-response token under teacher forcing, in nats.",
        "",
        *markdown_table(header, rows),
        "",
        *settings_sections(report),
    ]
    if loss_curve is not None:
        lines += [f"![loss curve]({loss_curve})", ""]
    for row in MODEL_ROWS:
        samples = report.get(row, {}).get("samples", [])
        if not samples:
            continue
        lines += [f"## Samples: {row}", ""]
        for sample in samples:
            prompt = (
                sample["prompt"]
                if isinstance(sample["prompt"], str)
                else json.dumps(sample["prompt"])
            )
            lines += [
                f"- prompt: `{prompt}`",
                f"  - response: `{sample['response']}`",
                f"  - reference: `{str(sample['reference']).strip()}`",
            ]
        lines.append("")
    return "\n".join(lines)


def plot_loss_curve(
    log_history: Sequence[Mapping[str, Any]],
    path: str | Path,
    rouge_history: Sequence[Mapping[str, float]] = (),
) -> bool:
    """Save training loss (and eval loss / ROUGE-L) against the step as a PNG.

    Args:
        log_history: `trainer.state.log_history`; `loss`, `eval_loss` and
            `eval_rouge_l` entries are plotted.
        rouge_history: extra `{"step": ..., "rouge_l": ...}` points (e.g.
            `RougeLCallback.history`, which includes the score after the last step).

    Returns:
        False (and writes nothing) when the history has no loss to plot.
    """
    train = [
        (entry["step"], entry["loss"])
        for entry in log_history
        if "loss" in entry and "step" in entry
    ]
    evaluation = [
        (entry["step"], entry["eval_loss"])
        for entry in log_history
        if "eval_loss" in entry and "step" in entry
    ]
    rouge_by_step = {
        entry["step"]: entry["eval_rouge_l"]
        for entry in log_history
        if "eval_rouge_l" in entry and "step" in entry
    }
    rouge_by_step.update({point["step"]: point["rouge_l"] for point in rouge_history})
    rouge = sorted(rouge_by_step.items())
    if not train and not evaluation:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    if train:
        axis.plot(*zip(*train, strict=True), label="train loss")
    if evaluation:
        axis.plot(*zip(*evaluation, strict=True), marker="o", label="eval loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss (divergence per token)")
    axis.grid(alpha=0.3)
    handles, labels = axis.get_legend_handles_labels()
    if rouge:
        rouge_axis = axis.twinx()
        # Two points (before / after) are not a curve: do not draw a line that suggests one.
        rouge_axis.plot(
            *zip(*rouge, strict=True),
            color="tab:green",
            marker="s",
            linestyle="-" if len(rouge) > 2 else "none",
            label="ROUGE-L (held-out)",
        )
        rouge_axis.set_ylabel("ROUGE-L")
        more_handles, more_labels = rouge_axis.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    axis.legend(handles, labels, loc="center right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_report(
    report: Mapping[str, Any],
    log_history: Sequence[Mapping[str, Any]],
    output_dir: str | Path,
    rouge_history: Sequence[Mapping[str, float]] = (),
) -> list[Path]:
    """Write `report.json`, `report.md` and (if there is a loss) `loss_curve.png`.

    `log_history` and `rouge_history` are passed to `plot_loss_curve`.

    Returns:
        The paths written.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / REPORT_JSON, output_dir / REPORT_MD]
    has_plot = plot_loss_curve(log_history, output_dir / LOSS_CURVE_PNG, rouge_history)
    paths[0].write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    paths[1].write_text(
        format_markdown(report, loss_curve=LOSS_CURVE_PNG if has_plot else None), encoding="utf-8"
    )
    if has_plot:
        paths.append(output_dir / LOSS_CURVE_PNG)
    return paths
