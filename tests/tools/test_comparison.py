"""compare_divergences and its command line, end to end on tiny saved models."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset
from testing_utils import (
    build_prompt_completion_dataset,
    build_student_and_teacher,
    build_tiny_tokenizer,
    load_script,
)

from abkd_trainer.tools.comparison import METHODS, Comparison, Method, compare_divergences


def _load_script():
    return load_script("benchmarks/compare_divergences.py", "compare_divergences_script")


@pytest.fixture
def tiny_task(tmp_path) -> list[str]:
    """abkd-train flags of a tiny task: saved student and teacher, local train and test files."""
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("qwen2", tokenizer)
    for name, model in (("student", student), ("teacher", teacher)):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    Dataset.from_list(build_prompt_completion_dataset(8).to_list()).to_json(
        tmp_path / "train.jsonl"
    )
    Dataset.from_list(build_prompt_completion_dataset(3).to_list()).to_json(tmp_path / "test.jsonl")
    # fmt: off
    return [
        "--model_name_or_path", str(tmp_path / "student"),
        "--teacher_model_name_or_path", str(tmp_path / "teacher"),
        "--dataset_name", str(tmp_path / "train.jsonl"),
        "--dataset_test_file", str(tmp_path / "test.jsonl"),
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
        "--rouge_l_max_new_tokens", "4", "--rouge_l_num_prompts", "2",
        "--use_cpu", "true", "--bf16", "false", "--dataloader_num_workers", "0",
    ]
    # fmt: on


def test_every_method_is_trained_and_scored_from_the_fine_tuned_student(tmp_path, tiny_task):
    methods = [METHODS["fkl"], METHODS["ab"]]
    seen = []
    comparison = compare_divergences(
        tiny_task,
        methods,
        training_seeds=[0],
        sft_steps=2,
        sampling_seeds=[0, 1],
        work_dir=tmp_path / "work",
        on_run=lambda comparison, row: seen.append(row["method"]),
    )
    assert seen == ["FKL", "AB (0.2, 0.7), default warm-up"]
    assert [row["method"] for row in comparison.reference_rows] == ["teacher", "student after SFT"]
    assert (tmp_path / "work" / "sft-seed0" / "model.safetensors").is_file()
    for row in comparison.runs:
        assert 0.0 <= row["rouge_l"] <= 100.0
        assert row["fkl_to_teacher"] > 0 and row["rkl_to_teacher"] > 0
    # Distillation moved the students: they differ from the fine-tuned start and each other.
    sft_fkl = comparison.reference_rows[1]["fkl_to_teacher"]
    fkls = [row["fkl_to_teacher"] for row in comparison.runs]
    assert sft_fkl not in fkls and fkls[0] != fkls[1]

    # A second call with the same flags reuses the fine-tuned student (same starting point).
    weights = tmp_path / "work" / "sft-seed0" / "model.safetensors"
    written = weights.stat().st_mtime_ns
    again = compare_divergences(
        tiny_task, [METHODS["fkl"]], training_seeds=[0], sft_steps=2, sampling_seeds=[0, 1],
        work_dir=tmp_path / "work",
    )  # fmt: skip
    assert weights.stat().st_mtime_ns == written
    assert again.reference_rows[1]["fkl_to_teacher"] == pytest.approx(sft_fkl)
    assert again.runs[0]["fkl_to_teacher"] == pytest.approx(fkls[0])


def test_summary_aggregates_over_training_seeds():
    comparison = Comparison(
        runs=[
            {"method": "A", "seed": 0, "rouge_l": 10.0, "fkl_to_teacher": 1.0},
            {"method": "A", "seed": 1, "rouge_l": 20.0, "fkl_to_teacher": 3.0},
            {"method": "B", "seed": 0, "rouge_l": 5.0, "fkl_to_teacher": 2.0},
        ],
        settings={"training_seeds": [0, 1]},
    )
    rows = {row["method"]: row for row in comparison.summary()}
    assert rows["A"]["rouge_l"] == 15.0 and rows["A"]["rouge_l_std"] == pytest.approx(7.0710678)
    assert (rows["A"]["rouge_l_min"], rows["A"]["rouge_l_max"]) == (10.0, 20.0)
    assert rows["A"]["fkl_to_teacher"] == 2.0
    assert rows["B"]["num_seeds"] == 1 and rows["B"]["rouge_l_std"] == 0.0


def test_duplicate_labels_are_rejected(tiny_task):
    with pytest.raises(ValueError, match="unique"):
        compare_divergences(tiny_task, [Method("x", ()), Method("x", ("--alpha", "0.5"))])


def test_the_script_writes_table_json_and_chart(tmp_path, tiny_task, capsys):
    script = _load_script()
    output_dir = tmp_path / "out"
    exit_code = script.main(
        [
            "--task_args=" + " ".join(tiny_task),
            "--methods", "fkl",
            "--custom", "AB (0.5, 0.5): --alpha 0.5 --beta 0.5 --ab_warmup_ratio 0",
            "--training_seeds", "3",
            "--sampling_seeds", "0",
            "--output_dir", str(output_dir),
        ]
    )  # fmt: skip
    assert exit_code == 0
    report = json.loads((output_dir / "comparison.json").read_text())
    assert [row["method"] for row in report["summary"]] == ["teacher", "FKL", "AB (0.5, 0.5)"]
    assert report["settings"]["training_seeds"] == [3]
    assert (
        report["settings"]["methods"]["AB (0.5, 0.5)"]
        == "--alpha 0.5 --beta 0.5 --ab_warmup_ratio 0"
    )
    assert "compare_divergences.py" in report["settings"]["command"]
    assert report["settings"]["machine"]["torch_threads"] >= 1
    table = (output_dir / "comparison.md").read_text()
    assert "| FKL |" in table and "| AB (0.5, 0.5) |" in table
    assert (output_dir / "comparison.png").read_bytes().startswith(b"\x89PNG")
    assert "FKL" in capsys.readouterr().out


def test_parts_with_other_seeds_or_methods_merge_into_one_table(tmp_path):
    def part(seed, method, rouge):
        return Comparison(
            runs=[{"method": method, "seed": seed, "rouge_l": rouge, "fkl_to_teacher": 0.5}],
            reference_rows=[
                {"method": "teacher", "seed": seed, "rouge_l": 80.0},
                {"method": "student after SFT", "seed": seed, "rouge_l": 20.0 + seed},
            ],
            settings={"training_seeds": [seed], "command": f"run {seed} {method}",
                      "methods": {method: f"--{method}"}},
        )  # fmt: skip

    part(0, "FKL", 40.0).write(tmp_path / "a")
    part(1, "FKL", 50.0).write(tmp_path / "b")
    part(0, "RKL", 30.0).write(tmp_path / "c")  # another method for seed 0, same SFT'd student
    script = _load_script()
    parts = [str(tmp_path / name) for name in "abc"]
    assert script.main(["--merge", *parts, "--output_dir", str(tmp_path / "merged")]) == 0
    merged = Comparison.load(tmp_path / "merged")
    rows = {row["method"]: row for row in merged.summary()}
    assert rows["FKL"]["rouge_l"] == 45.0 and rows["FKL"]["num_seeds"] == 2
    assert rows["RKL"]["num_seeds"] == 1
    assert rows["teacher"]["num_seeds"] == 1
    assert rows["student after SFT"]["num_seeds"] == 2
    assert rows["student after SFT"]["rouge_l"] == 20.5
    assert merged.settings["training_seeds"] == [0, 1]
    assert merged.settings["methods"] == {"FKL": "--FKL", "RKL": "--RKL"}
    assert merged.settings["command"] == ["run 0 FKL", "run 1 FKL", "run 0 RKL"]
