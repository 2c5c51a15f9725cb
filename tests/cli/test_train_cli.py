"""The ``abkd-train`` command: parsing, YAML configs, local datasets, a short run and the demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from datasets import Dataset
from huggingface_hub import ModelCard
from testing_utils import (
    build_prompt_completion_dataset,
    build_student_and_teacher,
    build_tiny_tokenizer,
    hub_no_network,
    hub_whoami,
    load_script,
)
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import is_torch_bf16_gpu_available

from abkd_trainer.cli.train import is_demo_run, main, make_parser, parse_args
from abkd_trainer.core.checkpoints import OutputDirInUseError
from abkd_trainer.core.hub import HubAccessError
from abkd_trainer.lm.demo import DEMO_DEFAULTS, DEMO_TEACHER_DIR

REPO_ROOT = Path(__file__).resolve().parents[2]
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


def _rows(n: int = 4) -> list[dict[str, str]]:
    return build_prompt_completion_dataset(n).to_list()


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
    # The card names the local teacher by its folder and carries the evaluation.
    card = ModelCard.load(output_dir / "README.md")
    assert "| Teacher | teacher |" in card.text and str(saved_models["teacher"]) not in card.text
    (result,) = card.data.eval_results
    assert result.metric_value == pytest.approx(report["student_after"]["rouge_l"], abs=1e-4)
    assert (result.dataset_name, result.dataset_split) == ("test.jsonl", "test")


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


def test_a_data_file_in_no_sft_format_is_named_before_training(tmp_path, saved_models):
    Dataset.from_list([{"question": "q", "answer": "a"}] * 4).to_json(tmp_path / "qa.jsonl")
    argv = [
        "--model_name_or_path", str(saved_models["student"]),
        "--teacher_model_name_or_path", str(saved_models["teacher"]),
        "--dataset_name", str(tmp_path / "qa.jsonl"),
        "--output_dir", str(tmp_path / "out"), *CPU_FLAGS,
    ]  # fmt: skip
    with pytest.raises(ValueError, match=rf"'train' split \({tmp_path / 'qa.jsonl'}\) .*missing"):
        main(argv)


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


# ----------------------------------------------------------------------------- output_dir reuse


def _short_run_argv(tmp_path, saved_models, output_dir, *extra):
    if not (tmp_path / "train.jsonl").exists():
        Dataset.from_list(_rows(8)).to_json(tmp_path / "train.jsonl")
    return [
        "--model_name_or_path", str(saved_models["student"]),
        "--teacher_model_name_or_path", str(saved_models["teacher"]),
        "--dataset_name", str(tmp_path / "train.jsonl"),
        "--output_dir", str(output_dir), "--per_device_train_batch_size", "2",
        "--logging_steps", "1", *CPU_FLAGS, *extra,
    ]  # fmt: skip


def test_a_second_run_into_a_used_output_dir_is_refused_before_loading(tmp_path, saved_models):
    output_dir = tmp_path / "out"
    argv = _short_run_argv(tmp_path, saved_models, output_dir, "--max_steps", "1")
    assert main(argv) == 0
    saved = (output_dir / "model.safetensors").stat().st_mtime_ns

    with pytest.raises(OutputDirInUseError) as error:
        main(argv)
    assert "--resume_from_checkpoint" in str(error.value)
    assert "--overwrite_output_dir" in str(error.value)
    assert (output_dir / "model.safetensors").stat().st_mtime_ns == saved  # nothing was touched

    assert main([*argv, "--overwrite_output_dir", "true"]) == 0
    assert (output_dir / "model.safetensors").stat().st_mtime_ns != saved


def test_parse_accepts_a_bare_resume_from_checkpoint_flag(tmp_path):
    base = ["--model_name_or_path", "s", "--teacher_model_name_or_path", "t", "--dataset_name", "d"]
    base += CPU_FLAGS
    _, training_args, _, _, _ = parse_args([*base, "--resume_from_checkpoint", "--alpha", "0.5"])
    assert training_args.resume_from_checkpoint == "true" and training_args.alpha == 0.5
    _, training_args, _, _, _ = parse_args([*base, "--resume_from_checkpoint"])
    assert training_args.resume_from_checkpoint == "true"
    _, training_args, _, _, _ = parse_args([*base, "--resume_from_checkpoint", "run/checkpoint-5"])
    assert training_args.resume_from_checkpoint == "run/checkpoint-5"
    _, training_args, _, _, _ = parse_args(base)
    assert training_args.resume_from_checkpoint is None


@pytest.mark.parametrize(
    "resume_flags", [["--resume_from_checkpoint"], ["--resume_from_checkpoint", "true"]]
)
def test_resume_from_the_latest_complete_checkpoint(tmp_path, saved_models, resume_flags):
    output_dir = tmp_path / "out"
    first = _short_run_argv(
        tmp_path, saved_models, output_dir, "--max_steps", "2", "--save_steps", "1",
        "--learning_rate", "1e-3", "--lr_scheduler_type", "constant",
    )  # fmt: skip
    assert main(first) == 0
    # Killed while writing checkpoint-2: resuming must skip it and use checkpoint-1.
    (output_dir / "checkpoint-2" / "trainer_state.json").unlink()

    second = _short_run_argv(
        tmp_path, saved_models, output_dir, "--max_steps", "3", "--save_steps", "1",
        "--learning_rate", "2e-3", "--lr_scheduler_type", "constant", *resume_flags,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="incomplete checkpoint .*checkpoint-2"):
        assert main(second) == 0

    state = json.loads((output_dir / "checkpoint-3" / "trainer_state.json").read_text())
    learning_rates = {entry["step"]: entry["learning_rate"] for entry in state["log_history"]
                      if "learning_rate" in entry}  # fmt: skip
    # Resumed: the optimizer and scheduler come back from checkpoint-1 with the first run's
    # learning rate, and steps 2-3 are retrained. A fresh start would log 2e-3 at every step.
    assert learning_rates == {1: 1e-3, 2: 1e-3, 3: 1e-3}


def test_resume_without_a_checkpoint_fails_before_loading(tmp_path, saved_models):
    argv = _short_run_argv(tmp_path, saved_models, tmp_path / "new", "--resume_from_checkpoint")
    with pytest.raises(ValueError, match="no complete `checkpoint-<step>`"):
        main(argv)


# ----------------------------------------------------------------------------- --push_to_hub


def test_push_to_hub_without_network_fails_before_training(tmp_path, saved_models, hub_http):
    hub_http(hub_no_network)
    output_dir = tmp_path / "out"
    argv = _short_run_argv(
        tmp_path, saved_models, output_dir, "--max_steps", "1",
        "--push_to_hub", "true", "--hub_model_id", "acme/student",
    )  # fmt: skip
    with pytest.raises(HubAccessError) as error:
        main(argv)
    assert "Hugging Face Hub" in str(error.value) and "--push_to_hub" in str(error.value)
    assert not (output_dir / "model.safetensors").exists()  # nothing was trained


def test_a_failed_upload_keeps_the_report_and_says_how_to_retry(
    tmp_path, saved_models, hub_http, capsys
):
    hub_http(hub_whoami("write", create_repo=True))  # the repo exists, then the network drops
    Dataset.from_list(_rows(3)).to_json(tmp_path / "test.jsonl")
    output_dir = tmp_path / "out"
    argv = _short_run_argv(
        tmp_path, saved_models, output_dir, "--max_steps", "2", "--save_strategy", "no",
        "--dataset_test_file", str(tmp_path / "test.jsonl"),
        "--rouge_l_eval", "--rouge_l_seeds", "0", "--rouge_l_max_new_tokens", "2",
        "--push_to_hub", "true", "--hub_model_id", "acme/student",
    )  # fmt: skip

    assert main(argv) == 1

    for name in ("report.json", "report.md", "loss_curve.png", "model.safetensors", "README.md"):
        assert (output_dir / name).is_file(), name
    error = capsys.readouterr().err
    assert "Name or service not known" in error and "Nothing was lost" in error
    assert f"hf upload acme/student {output_dir} . --exclude 'checkpoint-*'" in error


# ----------------------------------------------------------------------------- docs


def _load_script(name: str):
    return load_script(f"scripts/{name}.py", name)


def test_configuration_reference_page_is_up_to_date():
    # Building a parser first rewrites the dataclass fields' types in place (HfArgumentParser);
    # the reference must not depend on whether that happened earlier in the process.
    make_parser()
    reference = _load_script("generate_config_reference")
    page = REPO_ROOT / "docs" / "reference" / "configuration.md"
    assert reference.REFERENCE_PAGE == page
    section = reference.render_config_reference()
    assert "`--alpha`" in section and "`--rouge_l_eval`" in section
    assert reference.replace_section(page.read_text(), section) == page.read_text(), (
        "docs/reference/configuration.md is stale: run "
        "`python scripts/generate_config_reference.py --write`"
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


def test_the_gpt2_recipe_uses_the_authors_lr_and_keeps_the_best_rouge_l_checkpoint():
    config = REPO_ROOT / "examples" / "gpt2-xl_to_gpt2_dolly.yaml"
    _, training_args, _, _, _ = parse_args(["--config", str(config), *CPU_FLAGS])
    assert training_args.learning_rate == 5e-4
    assert training_args.eval_strategy == "epoch" and training_args.save_strategy == "epoch"
    # Trainer prefixes "eval_": RougeLCallback's eval_rouge_l is what it compares.
    assert training_args.metric_for_best_model == "rouge_l"
    assert training_args.greater_is_better and training_args.load_best_model_at_end


@pytest.mark.parametrize(
    "config_name", ["gpt2-xl_to_gpt2_dolly.yaml", "qwen2.5-7b_to_0.5b_zero3.yaml"]
)
def test_a_bf16_recipe_on_a_cpu_says_what_to_change(config_name):
    argv = ["--config", str(REPO_ROOT / "examples" / config_name)]
    if is_torch_bf16_gpu_available():  # a bf16 GPU: the recipe parses as it is
        assert parse_args(argv)[1].bf16
        return
    with pytest.raises(ValueError) as error:
        parse_args(argv)
    message = str(error.value)
    assert "--use_cpu true --bf16 false" in message and "--dtype float32" in message
    assert "teacher_model_init_kwargs" in message


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
    shared = ("alpha", "beta", "kd_ratio", "learning_rate", "num_train_epochs", "max_length")
    shared += ("eval_strategy", "metric_for_best_model", "load_best_model_at_end")
    for name in shared:
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
