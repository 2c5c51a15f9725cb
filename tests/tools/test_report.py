"""report.json / report.md / loss_curve.png and the printed comparison table."""

from __future__ import annotations

import json

import pytest
import torch

from abkd_trainer.lm.config import ABKDConfig
from abkd_trainer.lm.evaluation import RougeLResult
from abkd_trainer.tools.report import (
    LOSS_CURVE_PNG,
    REPORT_JSON,
    REPORT_MD,
    environment_info,
    format_comparison_table,
    make_report,
    plot_loss_curve,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _result(rouge_l: float, per_seed: list[float]) -> RougeLResult:
    return RougeLResult(
        rouge_l=rouge_l,
        rouge_l_std=0.5,
        per_seed=per_seed,
        seeds=[0, 1],
        num_prompts=10,
        samples=[{"prompt": "p | q", "response": "r", "reference": " ref"}],
    )


@pytest.fixture
def training_args(tmp_path):
    return ABKDConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        alpha=0.3,
        beta=0.6,
        max_steps=7,
    )


LOG_HISTORY = [
    {"loss": 3.0, "step": 5},
    {"loss": 2.0, "step": 10},
    {"eval_loss": 2.5, "eval_rouge_l": 20.0, "step": 10},
    {"train_runtime": 1.0, "step": 10},
]


def _report(training_args, **overrides):
    kwargs = {
        "rouge_results": {
            "teacher": _result(70.0, [69.5, 70.5]),
            "student_before": _result(2.0, [1.5, 2.5]),
            "student_after": _result(40.0, [39.5, 40.5]),
        },
        "divergences": {
            "student_before": {"ab": 3.0, "fkl": 4.0},
            "student_after": {"ab": 0.25, "fkl": 0.5},
        },
        "training_args": training_args,
        "teacher": "teacher-path",
        "student": "student-path",
        "dataset": "data.jsonl",
        "test_split": "test",
        "max_new_tokens": 16,
        "log_history": LOG_HISTORY,
        "wall_time_s": 12.34,
    }
    kwargs.update(overrides)
    return make_report(**kwargs)


def test_make_report_has_the_required_layout(training_args):
    report = _report(training_args)

    for row, expected in (("teacher", 70.0), ("student_before", 2.0), ("student_after", 40.0)):
        assert report[row]["rouge_l"] == expected
    assert "divergence_to_teacher" not in report["teacher"]
    assert report["student_after"]["divergence_to_teacher"] == {"ab": 0.25, "fkl": 0.5}
    assert report["student_before"]["rouge_l_per_seed"] == [1.5, 2.5]
    assert report["evaluation"]["seeds"] == [0, 1] and report["evaluation"]["num_prompts"] == 10
    training = report["training"]
    assert (training["alpha"], training["beta"], training["divergence"]) == (0.3, 0.6, "ab")
    assert training["global_step"] == 10 and training["final_train_loss"] == 2.0
    assert training["wall_time_s"] == 12.3
    json.dumps(report)  # serialisable as is


def test_the_report_records_versions_threads_and_device(training_args, tmp_path):
    import datasets
    import torch
    import transformers
    import trl

    from abkd_trainer import __version__

    environment = _report(training_args)["environment"]
    assert environment["abkd_trainer"] == __version__
    assert environment["torch"] == torch.__version__
    assert environment["transformers"] == transformers.__version__
    assert environment["trl"] == trl.__version__
    assert environment["datasets"] == datasets.__version__
    assert environment["torch_num_threads"] == torch.get_num_threads()
    assert environment["device"].startswith("cpu (") and environment["num_processes"] == 1
    write_report(_report(training_args), LOG_HISTORY, tmp_path)
    markdown = (tmp_path / REPORT_MD).read_text()
    assert f"| torch_num_threads | {torch.get_num_threads()} |" in markdown


def test_environment_info_follows_the_thread_count():
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert environment_info("cpu", num_processes=2)["torch_num_threads"] == 3
    finally:
        torch.set_num_threads(previous)
    assert environment_info("cpu", num_processes=2)["num_processes"] == 2


def test_make_report_leaves_out_rows_that_were_not_evaluated(training_args):
    report = _report(training_args, rouge_results={"student_after": _result(40.0, [40.0])})
    assert "teacher" not in report and "student_before" not in report
    assert report["student_after"]["rouge_l"] == 40.0


def test_comparison_table_lists_every_model_and_divergence(training_args):
    table = format_comparison_table(_report(training_args))
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("model"))
    assert "ab to teacher" in header and "fkl to teacher" in header
    after = next(line for line in lines if line.startswith("student_after"))
    assert after.split() == ["student_after", "40.00", "0.50", "0.2500", "0.5000"]
    assert [line.split()[0] for line in lines if line.startswith(("teacher", "student"))] == [
        "teacher",
        "student_before",
        "student_after",
    ]


def test_write_report_writes_json_markdown_and_png(training_args, tmp_path):
    report = _report(training_args)
    paths = write_report(report, LOG_HISTORY, tmp_path / "out")

    assert [p.name for p in paths] == [REPORT_JSON, REPORT_MD, LOSS_CURVE_PNG]
    assert json.loads((tmp_path / "out" / REPORT_JSON).read_text()) == json.loads(
        json.dumps(report)
    )
    markdown = (tmp_path / "out" / REPORT_MD).read_text()
    assert "| student_after | 40.00 | 0.50 | 0.2500 | 0.5000 |" in markdown
    assert f"![loss curve]({LOSS_CURVE_PNG})" in markdown
    assert (tmp_path / "out" / LOSS_CURVE_PNG).read_bytes().startswith(PNG_MAGIC)


def test_write_report_without_a_loss_skips_the_plot(training_args, tmp_path):
    report = _report(training_args, log_history=[])
    paths = write_report(report, [], tmp_path)
    assert LOSS_CURVE_PNG not in [p.name for p in paths]
    assert not (tmp_path / LOSS_CURVE_PNG).exists()
    assert "loss curve" not in (tmp_path / REPORT_MD).read_text()


def test_plot_loss_curve_needs_a_loss(tmp_path):
    assert plot_loss_curve([{"eval_rouge_l": 3.0, "step": 1}], tmp_path / "x.png") is False
    assert plot_loss_curve(LOG_HISTORY, tmp_path / "y.png") is True
    assert (tmp_path / "y.png").stat().st_size > 1000
