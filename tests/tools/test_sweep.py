"""``abkd-sweep``: outputs, best.yaml through abkd-train, pruning, budgets and shared studies."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from datasets import Dataset
from testing_utils import (
    build_prompt_completion_dataset,
    build_student_and_teacher,
    build_text_dataset,
    build_tiny_tokenizer,
)

from abkd_trainer.cli import train as cli
from abkd_trainer.lm.config import ABKDConfig
from abkd_trainer.tools.sweep import (
    REFERENCE_KL_METRIC,
    SweepArguments,
    claim_trial,
    explicit_train_arguments,
    infer_direction,
    main,
    run_sweep,
    spare_final_evaluation,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
CPU_FLAGS = ["--use_cpu", "true", "--bf16", "false", "--report_to", "none"]
CPU_FLAGS += ["--disable_tqdm", "true"]


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


def _sweep_argv(tmp_path, saved_models, output_dir, *extra):
    Dataset.from_list(build_prompt_completion_dataset(8).to_list()).to_json(tmp_path / "tr.jsonl")
    Dataset.from_list(build_prompt_completion_dataset(3).to_list()).to_json(tmp_path / "te.jsonl")
    return [
        "--model_name_or_path", str(saved_models["student"]),
        "--teacher_model_name_or_path", str(saved_models["teacher"]),
        "--dataset_name", str(tmp_path / "tr.jsonl"),
        "--dataset_test_file", str(tmp_path / "te.jsonl"),
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
        "--rouge_l_seeds", "0", "--rouge_l_max_new_tokens", "4",
        *CPU_FLAGS, *extra,
    ]  # fmt: skip


def _read_csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def test_a_three_trial_sweep_writes_its_outputs_and_best_yaml_runs_in_abkd_train(
    tmp_path, saved_models, capsys
):
    output_dir = tmp_path / "sweep"
    # Two reference points lie inside alpha >= 0.3 (forward KL and the paper's vision setting);
    # the third trial comes from TPE.
    argv = _sweep_argv(
        tmp_path, saved_models, output_dir,
        "--n_trials", "3", "--max_steps", "4", "--eval_steps", "2", "--alpha_range", "0.3", "1.0",
    )  # fmt: skip

    assert main(argv) == 0

    assert "objective eval_rouge_l (maximize)" in capsys.readouterr().out
    rows = _read_csv(output_dir / "trials.csv")
    assert [row["number"] for row in rows] == ["0", "1", "2"]
    assert [(row["alpha"], row["beta"]) for row in rows[:2]] == [("1.0", "0.0"), ("0.8", "0.3")]
    assert 0.3 <= float(rows[2]["alpha"]) <= 1.0 and 0.0 <= float(rows[2]["beta"]) <= 1.0
    for row in rows:
        assert row["state"] == "COMPLETE" and row["metric"] == "eval_rouge_l"
        assert 0.0 <= float(row["value"]) <= 100.0 and float(row["seconds"]) > 0
        assert row["last_reported_step"] == "4" and float(row[REFERENCE_KL_METRIC]) > 0
        assert row["eval_rouge_l"] == row["value"]  # the final evaluation is the objective
    assert (output_dir / "heatmap.png").stat().st_size > 20_000

    best_path = output_dir / "best.yaml"
    best = yaml.safe_load(best_path.read_text())
    best_row = max(rows, key=lambda row: float(row["value"]))
    assert (best["alpha"], best["beta"]) == (float(best_row["alpha"]), float(best_row["beta"]))
    assert best["max_steps"] == 4 and best["model_name_or_path"] == str(saved_models["student"])
    assert not {"n_trials", "alpha_range", "storage"} & set(best)  # abkd-train would reject them

    script_args, training_args, model_args, _, demo = cli.parse_args(["--config", str(best_path)])
    assert not demo and (training_args.alpha, training_args.beta) == (best["alpha"], best["beta"])
    assert model_args.model_name_or_path == str(saved_models["student"])
    assert script_args.dataset_test_file == str(tmp_path / "te.jsonl")
    assert cli.main(["--config", str(best_path), "--max_steps", "1"]) == 0
    assert (output_dir / "best-run" / "model.safetensors").is_file()


def test_pruning_stops_a_trial_that_falls_below_the_median(tmp_path):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("llama", tokenizer)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="prune", storage=storage, direction="minimize")
    # Same divergence; the second trial barely learns, so at its first evaluation its reference
    # KL is worse than the first trial's at that step, and the median pruner stops it there.
    study.enqueue_trial({"alpha": 1.0, "beta": 0.0, "learning_rate": 1e-2})
    study.enqueue_trial({"alpha": 1.0, "beta": 0.0, "learning_rate": 1e-9})
    args = ABKDConfig(
        output_dir=str(tmp_path / "out"), max_steps=6, eval_strategy="steps", eval_steps=2,
        per_device_train_batch_size=4, save_strategy="no", report_to="none", use_cpu=True,
        bf16=False, disable_tqdm=True,
    )  # fmt: skip
    sweep_args = SweepArguments(
        n_trials=2, storage=storage, study_name="prune", pruner_startup_trials=1,
        learning_rate_range=[1e-9, 1e-2],
    )  # fmt: skip

    result = run_sweep(
        lambda: student.__class__(student.config),  # a zero-argument factory also works
        teacher,
        args,
        sweep_args,
        build_text_dataset(16),
        build_text_dataset(4),
        tokenizer,
    )

    first, second = result.study.trials
    assert result.metric == REFERENCE_KL_METRIC and result.direction == "minimize"
    assert first.state == optuna.trial.TrialState.COMPLETE
    assert sorted(first.intermediate_values) == [2, 4, 6]
    assert second.state == optuna.trial.TrialState.PRUNED
    assert sorted(second.intermediate_values) == [2]  # stopped at its first evaluation
    assert second.intermediate_values[2] > first.intermediate_values[2]
    rows = _read_csv(tmp_path / "out" / "trials.csv")
    assert [row["state"] for row in rows] == ["COMPLETE", "PRUNED"]
    assert result.best_params == {"alpha": 1.0, "beta": 0.0, "learning_rate": 1e-2}


def test_a_trial_beyond_the_shared_budget_is_skipped_and_marked():
    study = optuna.create_study()
    trials = [study.ask() for _ in range(3)]
    claim_trial(trials[0], n_trials=2)
    claim_trial(trials[1], n_trials=2)
    with pytest.raises(optuna.TrialPruned, match="2 trials are taken"):
        claim_trial(trials[2], n_trials=2)
    assert trials[2].user_attrs["over_budget"] is True
    assert all(str(os.getpid()) in trial.user_attrs["worker"] for trial in trials)


def test_explicit_train_arguments_keep_config_and_flags_but_not_sweep_flags(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"learning_rate": 0.001, "n_trials": 5, "seed": 3}))
    argv = ["--config", str(config), "--seed", "7", "--lr_scheduler_type", "cosine"]
    argv += ["--storage", "sqlite:///x.db", "--alpha_range", "0.1", "0.9"]

    explicit = explicit_train_arguments(argv, demo=False)

    assert explicit == {"learning_rate": 0.001, "seed": 7, "lr_scheduler_type": "cosine"}
    demo_trial = {"max_steps": 300, "per_device_train_batch_size": 32}
    assert explicit_train_arguments([], demo=True) == demo_trial


def test_sweep_arguments_and_directions_are_checked():
    assert infer_direction("eval_rouge_l") == "maximize"
    assert infer_direction("eval_teacher_agreement") == "maximize"
    assert infer_direction("eval_reference_kl") == "minimize"
    with pytest.raises(ValueError, match="low < high"):
        SweepArguments(alpha_range=[1.0, 0.5])
    with pytest.raises(ValueError, match="'tpe' or 'grid'"):
        SweepArguments(sampler="random")
    with pytest.raises(ValueError, match="n_trials"):
        SweepArguments(n_trials=0)


def test_the_package_imports_without_optuna_and_the_sweep_names_the_extra():
    code = (
        "import sys; sys.modules['optuna'] = None\n"
        "import abkd_trainer, abkd_trainer.tools.sweep\n"
        "from abkd_trainer.tools.sweep import main\n"
        "try:\n    main([])\nexcept ImportError as error:\n    print(error)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "abkd-trainer[sweep]" in result.stdout


@pytest.mark.slow
def test_two_workers_on_one_sqlite_study_run_six_trials_together_each_once(tmp_path, saved_models):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    argv = _sweep_argv(
        tmp_path, saved_models, tmp_path / "out",
        "--n_trials", "6", "--max_steps", "8", "--eval_steps", "4",
        "--storage", storage, "--study_name", "shared",
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "abkd_trainer.tools.sweep", *argv]
    workers = [
        subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    logs = [worker.communicate(timeout=900)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], logs

    study = optuna.load_study(study_name="shared", storage=storage)
    counted = [t for t in study.trials if not t.user_attrs.get("over_budget")]
    assert len(counted) == 6
    assert all(t.state.is_finished() for t in counted)
    # Every trial ran in exactly one worker: its number appears in one log only.
    finished = [re.findall(r"Trial (\d+) (?:finished|pruned)", log) for log in logs]
    numbers = sorted(int(n) for per_worker in finished for n in per_worker)
    assert numbers == sorted(t.number for t in study.trials)
    assert len({t.number for t in counted}) == 6
    assert len({t.user_attrs["worker"] for t in counted}) == 2  # both workers took trials
    assert len(_read_csv(tmp_path / "out" / "trials.csv")) == 6


def _tiny_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"), max_steps=2, eval_strategy="steps", eval_steps=2,
        per_device_train_batch_size=4, save_strategy="no", report_to="none", use_cpu=True,
        bf16=False, disable_tqdm=True,
    )  # fmt: skip
    settings.update(overrides)
    return ABKDConfig(**settings)


def test_a_grid_sweep_stops_when_the_grid_is_done(tmp_path):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("llama", tokenizer)
    sweep_args = SweepArguments(n_trials=5, sampler="grid", grid_alpha=[0.5, 1.0], grid_beta=[0.0])

    result = run_sweep(
        lambda: student.__class__(student.config),
        teacher,
        _tiny_args(tmp_path),
        sweep_args,
        build_text_dataset(8),
        build_text_dataset(4),
        tokenizer,
    )

    assert sorted(t.params["alpha"] for t in result.study.trials) == [0.5, 1.0]
    assert {t.params["beta"] for t in result.study.trials} == {0.0}
    assert len(_read_csv(tmp_path / "out" / "trials.csv")) == 2


def test_a_failing_trial_stops_the_sweep_with_its_error(tmp_path):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("llama", tokenizer)
    calls = []

    def student_factory():
        calls.append(1)
        if len(calls) > 1:  # the trainer's own copy builds; the first trial's fails
            raise ValueError("cannot build the student")
        return student.__class__(student.config)

    with pytest.raises(ValueError, match="cannot build the student"):
        run_sweep(
            student_factory,
            teacher,
            _tiny_args(tmp_path),
            SweepArguments(n_trials=3),
            build_text_dataset(8),
            build_text_dataset(4),
            tokenizer,
        )
    assert len(calls) == 2  # no further trial was started


def test_the_final_evaluation_never_prunes_a_finished_trial():
    median = optuna.pruners.MedianPruner(n_startup_trials=1)
    study = optuna.create_study(direction="minimize", pruner=spare_final_evaluation(median))
    finished = study.ask()
    finished.report(1.0, step=6)
    study.tell(finished, 1.0)
    worse = study.ask()
    worse.report(5.0, step=6)
    assert median.prune(study, study._storage.get_trial(worse._trial_id))  # plain: pruned
    assert worse.should_prune()  # no max_steps recorded: the median pruner decides
    worse.set_user_attr("max_steps", 6)
    assert not worse.should_prune()  # step 6 is this trial's last: its result is kept
