"""``abkd-cache-teacher`` and ``abkd-train --teacher_cache``: parsing and a short local run."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset
from testing_utils import build_student_and_teacher, build_tiny_tokenizer

from abkd_trainer.cli import cache_teacher as cache_cli
from abkd_trainer.cli import train as cli
from abkd_trainer.lm.demo import DEMO_DEFAULTS, DEMO_TEACHER_DIR
from abkd_trainer.lm.teacher_cache import MANIFEST_NAME, TeacherCache

CPU_FLAGS = ["--use_cpu", "true", "--bf16", "false", "--report_to", "none",
             "--disable_tqdm", "true"]  # fmt: skip


def _rows(count: int) -> list[dict[str, str]]:
    return [{"prompt": f"Say {i}.", "completion": f" {i} {i}."} for i in range(count)]


@pytest.fixture
def local_run(tmp_path):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("qwen2", tokenizer)
    paths = {"train": tmp_path / "train.jsonl", "test": tmp_path / "test.jsonl"}
    Dataset.from_list(_rows(8)).to_json(paths["train"])
    Dataset.from_list(_rows(3)).to_json(paths["test"])
    for name, model in (("student", student), ("teacher", teacher)):
        paths[name] = tmp_path / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


def test_cache_then_train_from_it_on_local_files(tmp_path, local_run, capsys):
    cache_dir = tmp_path / "cache"
    assert cache_cli.main([
        "--teacher_model_name_or_path", str(local_run["teacher"]),
        "--model_name_or_path", str(local_run["student"]),
        "--dataset_name", str(local_run["train"]),
        "--max_length", "48", "--top_k", "12", "--cache_shard_size", "3",
        "--output_dir", str(cache_dir), *CPU_FLAGS,
    ]) == 0  # fmt: skip
    assert "Teacher cache written" in capsys.readouterr().out
    cache = TeacherCache(cache_dir)
    assert cache.top_k == 12 and cache.manifest.log_prob_dtype == "bfloat16"
    assert cache.manifest.teacher == str(local_run["teacher"])
    assert cache.manifest.splits["train"].num_shards == 3  # 8 rows, 3 per shard

    output_dir = tmp_path / "out"
    train_argv = [
        "--model_name_or_path", str(local_run["student"]),
        "--teacher_cache", str(cache_dir),
        "--dataset_name", str(local_run["train"]),
        "--dataset_test_file", str(local_run["test"]),
        "--max_length", "48", "--max_steps", "2", "--logging_steps", "1",
        "--per_device_train_batch_size", "2", "--save_strategy", "no",
        "--rouge_l_eval", "--rouge_l_seeds", "0", "--rouge_l_max_new_tokens", "4",
        "--output_dir", str(output_dir), *CPU_FLAGS,
    ]  # fmt: skip
    assert not cli.is_demo_run(train_argv)
    assert cli.main(train_argv) == 0
    report = json.loads((output_dir / "report.json").read_text())
    assert "teacher" not in report  # nothing to sample from
    assert 0.0 <= report["student_after"]["rouge_l"] <= 100.0
    assert "teacher cache" in report["training"]["teacher"]

    # The same run with another max_length is refused, naming it.
    mismatched = [*train_argv]
    mismatched[mismatched.index("--max_length") + 1] = "32"
    mismatched[mismatched.index("--output_dir") + 1] = str(tmp_path / "out-32")
    with pytest.raises(ValueError, match="max_length=48.*max_length=32"):
        cli.main(mismatched)


def test_demo_detection_and_defaults(tmp_path):
    assert cli.is_demo_run(["--teacher_cache", "somewhere"])
    assert not cli.is_demo_run(
        ["--model_name_or_path", "s", "--teacher_cache", "c", "--dataset_name", "d"]
    )
    with pytest.raises(ValueError, match="--teacher_model_name_or_path \\(or --teacher_cache\\)"):
        cli.is_demo_run(["--model_name_or_path", "s", "--dataset_name", "d"])
    *_, training_args, _, _, demo = cli.parse_args(["--teacher_cache", str(tmp_path)])
    assert demo and training_args.teacher_cache == str(tmp_path)
    assert training_args.teacher_model_name_or_path is None  # the cache replaces the teacher

    script, cache_args, training_args, model_args, _, demo = cache_cli.parse_args(["--top_k", "8"])
    assert demo and cache_args.top_k == 8
    assert training_args.output_dir == cache_cli.DEMO_CACHE_DIR
    assert training_args.teacher_model_name_or_path == str(DEMO_TEACHER_DIR)
    # The preprocessing of abkd-train's demo, so that its cache matches.
    assert training_args.max_length == DEMO_DEFAULTS["max_length"]
    assert training_args.eval_strategy == DEMO_DEFAULTS["eval_strategy"]


def test_incomplete_arguments_are_refused():
    with pytest.raises(ValueError, match="--output_dir"):
        cache_cli.parse_args(["--teacher_model_name_or_path", "t", "--dataset_name", "d"])
    with pytest.raises(ValueError, match="--dataset_name"):
        cache_cli.parse_args(["--teacher_model_name_or_path", "t", "--output_dir", "o"])


def test_help_lists_the_cache_flags(capsys):
    with pytest.raises(SystemExit):
        cache_cli.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--top_k", "--cache_dtype", "--cache_shard_size", "--max_length"):
        assert flag in text


def test_manifest_is_json_with_the_run_settings(tmp_path, local_run):
    cache_dir = tmp_path / "cache"
    cache_cli.main([
        "--teacher_model_name_or_path", str(local_run["teacher"]),
        "--dataset_name", str(local_run["train"]), "--dataset_test_file", str(local_run["test"]),
        "--eval_strategy", "steps", "--cache_dtype", "float16", "--top_k", "5",
        "--output_dir", str(cache_dir), *CPU_FLAGS,
    ])  # fmt: skip
    manifest = json.loads((cache_dir / MANIFEST_NAME).read_text())
    assert manifest["complete"] and manifest["log_prob_dtype"] == "float16"
    assert set(manifest["splits"]) == {"train", "eval"}
    assert manifest["preprocessing"]["completion_only_loss"] is True
    assert manifest["vocab_size"] == len(build_tiny_tokenizer())
