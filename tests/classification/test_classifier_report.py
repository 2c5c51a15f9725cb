"""The classifier run report: rows from two evaluations, settings, markdown, the plot."""

from __future__ import annotations

import json

import pytest

from abkd_trainer.classification.config import ABKDClassifierConfig
from abkd_trainer.classification.report import (
    format_accuracy_table,
    format_markdown,
    make_classifier_report,
    model_rows,
    plot_accuracy,
    write_report,
)

BEFORE = {"eval_accuracy": 0.1, "eval_teacher_accuracy": 0.9, "eval_teacher_agreement": 0.12}
AFTER = {
    "eval_accuracy": 0.8,
    "eval_teacher_accuracy": 0.9,
    "eval_teacher_agreement": 0.85,
    "eval_kd_loss": 0.05,
    "eval_ce_loss": 0.4,
    "eval_runtime": 0.1,
}
HISTORY = [
    {"loss": 2.0, "step": 10},
    {"eval_accuracy": 0.5, "step": 10},
    {"loss": 1.0, "step": 20},
    {"eval_accuracy": 0.8, "step": 20},
]


def config(tmp_path, **overrides):
    return ABKDClassifierConfig(
        output_dir=str(tmp_path), max_steps=20, report_to="none", **overrides
    )


def test_rows_take_the_teacher_from_the_evaluation_and_keep_student_metrics():
    rows = model_rows(BEFORE, AFTER)
    assert rows["teacher"] == {"accuracy": 0.9}
    assert rows["student_before"] == {"accuracy": 0.1, "teacher_agreement": 0.12}
    assert rows["student_after"]["kd_loss"] == 0.05 and "runtime" not in rows["student_after"]


def test_report_records_the_objective_of_the_divergence_used(tmp_path):
    report = make_classifier_report(
        before=BEFORE, after=AFTER, training_args=config(tmp_path, divergence="jsd"),
        teacher="t", student="s", dataset="d", test_split="test", num_test_examples=50,
        log_history=HISTORY, wall_time_s=3.21, environment={"torch": "x"},
    )  # fmt: skip
    training = report["training"]
    assert training["divergence"] == "jsd" and "jsd_beta" in training and "alpha" not in training
    assert (training["global_step"], training["final_train_loss"]) == (20, 1.0)
    assert training["max_steps"] == 20 and training["wall_time_s"] == 3.2
    assert report["evaluation"]["num_examples"] == 50 and report["environment"] == {"torch": "x"}
    ab = make_classifier_report(
        before=BEFORE, after=AFTER, training_args=config(tmp_path, alpha=0.6, beta=0.4),
        teacher="t", student="s", dataset="d", test_split="test", num_test_examples=50,
    )  # fmt: skip
    assert (ab["training"]["alpha"], ab["training"]["beta"]) == (0.6, 0.4)
    assert ab["training"]["logit_standardization"] is True  # the default, recorded
    assert "environment" not in ab


def test_tables_show_percentages(tmp_path):
    report = make_classifier_report(
        before=BEFORE, after=AFTER, training_args=config(tmp_path), teacher="t", student="s",
        dataset="digits", test_split="test", num_test_examples=50,
    )  # fmt: skip
    markdown = format_markdown(report)
    assert "| student_after | 80.00 | 85.00 | 0.0500 | 0.4000 |" in markdown
    assert "| teacher | 90.00 | 100.00 | 0 | - |" in markdown
    assert "![accuracy](accuracy.png)" in markdown
    assert "![accuracy]" not in format_markdown(report, plot=None)
    table = format_accuracy_table(report)
    assert "50 held-out examples" in table and "10.00" in table


def test_write_report_writes_json_markdown_and_plot(tmp_path):
    report = model_rows(BEFORE, AFTER)
    paths = write_report(report, HISTORY, tmp_path / "out")
    assert [path.name for path in paths] == ["report.json", "report.md", "accuracy.png"]
    assert json.loads(paths[0].read_text())["student_after"]["accuracy"] == pytest.approx(0.8)
    assert paths[2].stat().st_size > 1000
    assert not plot_accuracy({"evaluation": {}}, HISTORY, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
