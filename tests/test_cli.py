"""The ``abkd-train`` command: parsing, YAML configs, local datasets, a short run and the demo."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from datasets import Dataset, DatasetDict
from testing_utils import (
    build_prompt_completion_dataset,
    build_student_and_teacher,
    build_tiny_tokenizer,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from abkd_trainer.cli import is_demo_run, load_dataset_from_name, main, make_parser, parse_args
from abkd_trainer.demo import DEMO_DEFAULTS, DEMO_TEACHER_DIR

REPO_ROOT = Path(__file__).resolve().parents[1]
# Flags every CPU run in these tests needs (SFTConfig defaults to bf16; no trackers, no tqdm).
CPU_FLAGS = [
    "--use_cpu",
    "true",
    "--bf16",
    "false",
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
]


def _write_yaml(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content))
    return path


# ----------------------------------------------------------------------------- demo detection


def test_no_model_and_no_dataset_is_the_demo():
    assert is_demo_run([]) is True
    assert is_demo_run(["--output_dir", "somewhere", "--max_steps", "3"]) is True


def test_student_teacher_and_dataset_is_not_the_demo(tmp_path):
    argv = ["--model_name_or_path", "s", "--teacher_model_name_or_path", "t", "--dataset_name", "d"]
    assert is_demo_run(argv) is False
    config = _write_yaml(
        tmp_path / "c.yaml",
        {"model_name_or_path": "s", "teacher_model_name_or_path": "t", "dataset_name": "d"},
    )
    assert is_demo_run(["--config", str(config)]) is False


@pytest.mark.parametrize(
    ("argv", "missing"),
    [
        (["--model_name_or_path", "s"], ["--teacher_model_name_or_path", "--dataset_name"]),
        (["--dataset_name=d", "--teacher_model_name_or_path", "t"], ["--model_name_or_path"]),
    ],
)
def test_a_partial_specification_names_what_is_missing(argv, missing):
    with pytest.raises(ValueError, match="Missing") as error:
        is_demo_run(argv)
    for flag in missing:
        assert flag in str(error.value)


# ----------------------------------------------------------------------------- parsing


def test_demo_mode_applies_demo_defaults_that_the_command_line_overrides(tmp_path):
    script_args, training_args, _, _, demo = parse_args([])
    assert demo
    assert training_args.max_steps == DEMO_DEFAULTS["max_steps"]
    assert training_args.teacher_model_name_or_path == str(DEMO_TEACHER_DIR)
    assert script_args.rouge_l_eval is True

    _, training_args, _, _, _ = parse_args(["--max_steps", "5", "--output_dir", str(tmp_path)])
    assert training_args.max_steps == 5 and training_args.output_dir == str(tmp_path)


def test_yaml_config_sets_every_dataclass_and_the_command_line_wins(tmp_path):
    config = _write_yaml(
        tmp_path / "run.yaml",
        {
            "model_name_or_path": "student-id",
            "teacher_model_name_or_path": "teacher-id",
            "dataset_name": "data.jsonl",
            "dataset_test_split": "validation",
            "alpha": 0.1,
            "beta": 0.8,
            "learning_rate": 2.5e-4,
            "rouge_l_eval": True,
            "rouge_l_seeds": [7, 8],
            "output_dir": str(tmp_path / "out"),
            "use_cpu": True,
            "bf16": False,
        },
    )
    script_args, training_args, model_args, _, demo = parse_args(
        ["--config", str(config), "--alpha", "0.5"]
    )
    assert not demo
    assert model_args.model_name_or_path == "student-id"
    assert training_args.teacher_model_name_or_path == "teacher-id"
    assert (script_args.dataset_name, script_args.dataset_test_split) == (
        "data.jsonl",
        "validation",
    )
    assert script_args.rouge_l_eval and script_args.rouge_l_seeds == [7, 8]
    assert (training_args.alpha, training_args.beta) == (0.5, 0.8)  # CLI over YAML
    assert training_args.learning_rate == 2.5e-4
    # Not the demo: no demo default leaks in.
    assert training_args.max_steps != DEMO_DEFAULTS["max_steps"]


def test_yaml_config_overrides_demo_defaults(tmp_path):
    config = _write_yaml(tmp_path / "demo.yaml", {"max_steps": 9, "alpha": 0.3})
    _, training_args, _, _, demo = parse_args(["--config", str(config)])
    assert demo and training_args.max_steps == 9 and training_args.alpha == 0.3


def test_invalid_objective_settings_fail_while_parsing():
    with pytest.raises(ValueError, match="divergence"):
        parse_args(["--divergence", "kl"])
    with pytest.raises(ValueError, match="kd_ratio"):
        parse_args(["--kd_ratio", "1.5"])


def test_help_lists_the_distillation_flags_with_their_real_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--alpha", "--beta", "--teacher_model_name_or_path", "--rouge_l_eval", "--config"):
        assert flag in text
    assert "abkd-demo" not in text, "--help must show the normal defaults, not the demo's"


def test_python_dash_m_runs_the_cli():
    completed = subprocess.run(
        [sys.executable, "-m", "abkd_trainer", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "--teacher_model_name_or_path" in completed.stdout


# ----------------------------------------------------------------------------- datasets


def _rows(n: int = 4) -> list[dict[str, str]]:
    return build_prompt_completion_dataset(n).to_list()


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_a_local_data_file_becomes_the_train_split(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    dataset = Dataset.from_list(_rows())
    {
        ".jsonl": lambda: dataset.to_json(path, lines=True),
        ".json": lambda: path.write_text(json.dumps(_rows())),
        ".parquet": lambda: dataset.to_parquet(path),
        ".csv": lambda: dataset.to_csv(path, index=False),
    }[suffix]()

    loaded = load_dataset_from_name(str(path))

    assert list(loaded) == ["train"]
    assert loaded["train"].to_list() == _rows()


def test_a_test_file_becomes_the_named_test_split(tmp_path):
    Dataset.from_list(_rows(4)).to_json(tmp_path / "train.jsonl")
    Dataset.from_list(_rows(2)).to_json(tmp_path / "dev.jsonl")
    loaded = load_dataset_from_name(
        str(tmp_path / "train.jsonl"), test_file=str(tmp_path / "dev.jsonl"), test_split="dev"
    )
    assert (loaded["train"].num_rows, loaded["dev"].num_rows) == (4, 2)


def test_saved_datasets_directories_load_with_their_splits(tmp_path):
    DatasetDict(
        {"train": Dataset.from_list(_rows(4)), "test": Dataset.from_list(_rows(2))}
    ).save_to_disk(tmp_path / "dict")
    Dataset.from_list(_rows(3)).save_to_disk(tmp_path / "single")

    loaded = load_dataset_from_name(str(tmp_path / "dict"))
    assert (loaded["train"].num_rows, loaded["test"].num_rows) == (4, 2)
    assert load_dataset_from_name(str(tmp_path / "single"))["train"].num_rows == 3


def test_unreadable_dataset_arguments_fail_clearly(tmp_path):
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(ValueError, match="must end in"):
        load_dataset_from_name(str(tmp_path / "data.txt"))
    Dataset.from_list(_rows()).save_to_disk(tmp_path / "saved")
    with pytest.raises(ValueError, match="only applies when `dataset_name` is a local file"):
        load_dataset_from_name(str(tmp_path / "saved"), test_file="x.jsonl")


# ----------------------------------------------------------------------------- short runs


@pytest.fixture
def saved_models(tmp_path):
    """A tiny student and teacher saved with the tokenizer, as a user's checkpoints would be."""
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("qwen2", tokenizer)
    paths = {}
    for name, model in (("student", student), ("teacher", teacher)):
        paths[name] = tmp_path / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return paths


def test_a_short_run_on_local_files_saves_student_card_and_report(tmp_path, saved_models, capsys):
    Dataset.from_list(_rows(8)).to_json(tmp_path / "train.jsonl")
    Dataset.from_list(_rows(3)).to_json(tmp_path / "test.jsonl")
    output_dir = tmp_path / "out"
    argv = [
        "--model_name_or_path", str(saved_models["student"]),
        "--teacher_model_name_or_path", str(saved_models["teacher"]),
        "--dataset_name", str(tmp_path / "train.jsonl"),
        "--dataset_test_file", str(tmp_path / "test.jsonl"),
        "--output_dir", str(output_dir),
        "--max_steps", "3", "--logging_steps", "1", "--per_device_train_batch_size", "2",
        "--save_strategy", "no", "--alpha", "0.3", "--beta", "0.6",
        "--rouge_l_eval", "--rouge_l_seeds", "0", "--rouge_l_max_new_tokens", "4",
        *CPU_FLAGS,
    ]  # fmt: skip

    assert main(argv) == 0

    student = AutoModelForCausalLM.from_pretrained(output_dir)
    assert student.config.hidden_size == 32  # the student, not the teacher
    assert len(AutoTokenizer.from_pretrained(output_dir)) == len(build_tiny_tokenizer())
    assert "ABKD" in (output_dir / "README.md").read_text()
    report = json.loads((output_dir / "report.json").read_text())
    for row in ("teacher", "student_before", "student_after"):
        assert 0.0 <= report[row]["rouge_l"] <= 100.0
    assert set(report["student_after"]["divergence_to_teacher"]) == {"ab", "fkl"}
    assert report["training"]["alpha"] == 0.3 and report["training"]["global_step"] == 3
    assert report["evaluation"]["num_prompts"] == 3
    assert (output_dir / "report.md").is_file() and (output_dir / "loss_curve.png").is_file()
    assert "student_after" in capsys.readouterr().out  # the comparison table is printed


def test_a_run_without_rouge_l_skips_the_report(tmp_path, saved_models):
    Dataset.from_list(_rows(4)).to_json(tmp_path / "train.jsonl")
    argv = [
        "--model_name_or_path", str(saved_models["student"]),
        "--teacher_model_name_or_path", str(saved_models["teacher"]),
        "--dataset_name", str(tmp_path / "train.jsonl"),
        "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
        "--per_device_train_batch_size", "2", "--save_strategy", "no",
        *CPU_FLAGS,
    ]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not (tmp_path / "out" / "report.json").exists()


def test_rouge_l_without_a_test_split_fails_before_training(tmp_path, saved_models):
    Dataset.from_list(_rows(4)).to_json(tmp_path / "train.jsonl")
    argv = [
        "--model_name_or_path", str(saved_models["student"]),
        "--teacher_model_name_or_path", str(saved_models["teacher"]),
        "--dataset_name", str(tmp_path / "train.jsonl"),
        "--output_dir", str(tmp_path / "out"), "--rouge_l_eval", *CPU_FLAGS,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="no 'test' split"):
        main(argv)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_the_demo_teacher_beats_a_fresh_student_and_the_run_saves_everything(tmp_path):
    output_dir = tmp_path / "demo"
    argv = [
        "--output_dir", str(output_dir), "--max_steps", "4", "--logging_steps", "2",
        "--rouge_l_num_prompts", "16", "--rouge_l_seeds", "0", *CPU_FLAGS,
    ]  # fmt: skip

    assert main(argv) == 0

    report = json.loads((output_dir / "report.json").read_text())
    # The shipped teacher has learnt the task; a random student has not.
    assert report["teacher"]["rouge_l"] > report["student_before"]["rouge_l"] + 30
    before = report["student_before"]["divergence_to_teacher"]["fkl"]
    after = report["student_after"]["divergence_to_teacher"]["fkl"]
    assert after < before  # even 4 steps move the student towards the teacher
    student = AutoModelForCausalLM.from_pretrained(output_dir)
    teacher = AutoModelForCausalLM.from_pretrained(DEMO_TEACHER_DIR)
    assert student.num_parameters() * 4 < teacher.num_parameters()
    assert AutoTokenizer.from_pretrained(output_dir).get_vocab() == (
        AutoTokenizer.from_pretrained(DEMO_TEACHER_DIR).get_vocab()
    )


# ----------------------------------------------------------------------------- README


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_configuration_reference_is_up_to_date():
    # Building a parser first rewrites the dataclass fields' types in place (HfArgumentParser);
    # the reference must not depend on whether that happened earlier in the process.
    make_parser()
    reference = _load_script("generate_config_reference")
    readme = (REPO_ROOT / "README.md").read_text()
    section = reference.render_config_reference()
    assert "`--alpha`" in section and "`--rouge_l_eval`" in section
    assert reference.replace_section(readme, section) == readme, (
        "README.md's configuration reference is stale: run "
        "`python scripts/generate_config_reference.py --write README.md`"
    )


# ----------------------------------------------------------------------------- examples


@pytest.mark.parametrize(
    "config_name", ["gpt2-xl_to_gpt2_dolly.yaml", "qwen2.5-7b_to_0.5b_zero3.yaml"]
)
def test_example_configs_parse_into_the_paper_objective(config_name):
    config = REPO_ROOT / "examples" / config_name
    # bf16 needs a GPU; everything else is parsed exactly as on the cluster.
    script_args, training_args, model_args, _, demo = parse_args(
        ["--config", str(config), "--bf16", "false", "--use_cpu", "true"]
    )
    assert not demo
    assert (training_args.divergence, training_args.alpha, training_args.beta) == ("ab", 0.2, 0.7)
    assert training_args.kd_ratio == 1.0
    assert training_args.teacher_model_init_kwargs == {"dtype": "bfloat16"}
    assert script_args.rouge_l_eval and script_args.rouge_l_seeds == [10, 20, 30, 40, 50]
    assert script_args.rouge_l_num_prompts is None
    assert script_args.dataset_name.endswith("train.jsonl")
    assert model_args.model_name_or_path


def test_on_policy_example_is_the_paper_recipe_with_the_adaptive_schedule():
    config = REPO_ROOT / "examples" / "gpt2-xl_to_gpt2_dolly_on_policy.yaml"
    script_args, training_args, _, _, demo = parse_args(
        ["--config", str(config), "--bf16", "false", "--use_cpu", "true"]
    )
    off_policy = parse_args(
        [
            "--config",
            str(REPO_ROOT / "examples" / "gpt2-xl_to_gpt2_dolly.yaml"),
            "--bf16",
            "false",
            "--use_cpu",
            "true",
        ]
    )[1]
    assert not demo and training_args.uses_sampled_completions
    assert (training_args.on_policy_schedule, training_args.lmbda) == ("adaptive", 0.0)
    assert (training_args.adaptive_step, training_args.adaptive_loss_eps) == (0.1, 0.1)
    assert training_args.replay_buffer_size == 1000 and training_args.max_new_tokens == 256
    assert training_args.eval_strategy == "epoch" and training_args.eval_on_start
    assert script_args.dataset_test_file.endswith("dev.jsonl")
    for name in ("alpha", "beta", "kd_ratio", "learning_rate", "num_train_epochs", "max_length"):
        assert getattr(training_args, name) == getattr(off_policy, name), name


# ----------------------------------------------------------------------------- launchers


@pytest.mark.slow
def test_the_demo_runs_unchanged_under_torchrun_with_zero3(tmp_path):
    """Two CPU ranks, DeepSpeed ZeRO-3: student and teacher sharded, evaluation split over ranks."""
    output_dir = tmp_path / "zero3"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "-m", "abkd_trainer",
        "--deepspeed", str(REPO_ROOT / "examples" / "deepspeed" / "zero3.json"),
        "--output_dir", str(output_dir), "--max_steps", "4", "--logging_steps", "2",
        "--rouge_l_num_prompts", "5", "--rouge_l_seeds", "0", "--disable_tqdm", "true",
    ]  # fmt: skip
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=600, check=False, cwd=REPO_ROOT
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((output_dir / "report.json").read_text())
    assert report["evaluation"]["num_prompts"] == 5  # 5 prompts over 2 ranks: padded, then cut
    assert report["teacher"]["rouge_l"] > report["student_before"]["rouge_l"]
    # Saved whole (gathered from the shards), not as empty ZeRO-3 placeholders.
    student = AutoModelForCausalLM.from_pretrained(output_dir)
    assert all(parameter.numel() > 0 for parameter in student.parameters())
