"""`abkd-sweep --task classification`: sweeps of `ABKDClassifierTrainer` runs on the digits demo."""

from __future__ import annotations

import csv
import shutil

import optuna
import pytest
import yaml

from abkd_trainer.cli import train_classifier
from abkd_trainer.tools.sweep import SweepStorage, main
from abkd_trainer.tools.sweep.classification import run_classifier_sweep_command
from abkd_trainer.tools.sweep.command import requested_task

# The demo, shortened: 30 steps without warm-up (the demo warms up for 50), evaluated at the end.
SHORT = ["--task", "classification", "--max_steps", "30", "--eval_steps", "30"]
SHORT += ["--warmup_steps", "0", "--no_pruning", "true"]


def test_a_classifier_sweep_of_the_demo_writes_the_study_and_best_yaml_runs_in_the_classifier_cli(
    tmp_path, capsys
):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    argv = [*SHORT, "--n_trials", "3", "--output_dir", str(tmp_path / "sweep")]
    argv += ["--storage", storage, "--study_name", "digits"]

    assert main(argv) == 0

    out = capsys.readouterr().out
    assert "sweeping the offline classifier demo" in out
    assert "objective eval_accuracy (maximize), 3 trials" in out
    study = optuna.load_study(study_name="digits", storage=storage)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    # The reference points, first forward and reverse KL; each trial trained with its own
    # (alpha, beta): the trainer's logged values at evaluation are the trial's.
    assert [(t.params["alpha"], t.params["beta"]) for t in study.trials] == [
        (1.0, 0.0),
        (0.0, 1.0),
        (0.2, 0.7),
    ]
    for trial in study.trials:
        assert trial.user_attrs["eval_alpha"] == pytest.approx(trial.params["alpha"])
        assert trial.user_attrs["eval_beta"] == pytest.approx(trial.params["beta"])
        assert trial.value == trial.user_attrs["eval_accuracy"] and 0.0 <= trial.value <= 1.0
        assert sorted(trial.intermediate_values) == [30]

    with open(tmp_path / "sweep" / "trials.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["metric"] for row in rows] == ["eval_accuracy"] * 3
    assert {row["direction"] for row in rows} == {"maximize"}
    assert "eval_rouge_l" not in rows[0] and "eval_reference_kl" not in rows[0]
    assert (tmp_path / "sweep" / "heatmap.png").stat().st_size > 20_000
    best_path = tmp_path / "sweep" / "best.yaml"
    assert "abkd-train-classifier --config best.yaml" in best_path.read_text()
    best = yaml.safe_load(best_path.read_text())
    best_trial = max(study.trials, key=lambda t: t.value)
    assert (best["alpha"], best["beta"]) == (best_trial.params["alpha"], best_trial.params["beta"])
    assert best["max_steps"] == 30 and not {"task", "n_trials", "storage"} & set(best)

    assert train_classifier.main(["--config", str(best_path), "--max_steps", "2"]) == 0
    assert (tmp_path / "sweep" / "best-run" / "model.safetensors").is_file()


def test_a_rerun_classifier_trial_resumes_from_its_checkpoint_and_ends_as_the_uninterrupted_one(
    tmp_path,
):
    """The demo's ViT student is saved under renamed keys (transformers 5), which Trainer's
    resume alone misses: the sweep's `model_init` restores them, so the re-run continues."""
    storage_url = f"sqlite:///{tmp_path / 'study.db'}"
    argv = [*SHORT, "--save_strategy", "steps", "--save_steps", "10", "--n_trials", "1"]
    argv += ["--output_dir", str(tmp_path / "sweep"), "--storage", storage_url]
    clean = run_classifier_sweep_command([*argv, "--study_name", "clean"]).study.trials[0]

    # A study whose trial 0 died after its checkpoint at step 10 (the later ones never written),
    # queued again as a worker that found it dead would queue it.
    run_dir = tmp_path / "sweep" / "run-0"
    for checkpoint in run_dir.glob("checkpoint-*"):
        if checkpoint.name != "checkpoint-10":
            shutil.rmtree(checkpoint)
    storage = SweepStorage.open(storage_url)
    study = optuna.create_study(study_name="killed", storage=storage.storage, direction="maximize")
    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.FAIL,
            params=clean.params,
            distributions=clean.distributions,
        )
    )
    storage.queue_again(study, study.trials[0])

    result = run_classifier_sweep_command([*argv, "--study_name", "killed"])

    dead, rerun = result.study.trials
    assert dead.state.name == "FAIL" and rerun.state.name == "COMPLETE"
    assert rerun.params == clean.params
    assert rerun.user_attrs["resumed_from"] == "run-0/checkpoint-10"
    assert rerun.user_attrs["start_step"] == 10
    assert rerun.value == clean.value  # the same accuracy as the run nothing interrupted


def test_the_task_is_read_from_the_command_line_or_the_config(tmp_path):
    assert requested_task([]) == "lm"
    assert requested_task(["--task", "classification"]) == "classification"
    config = tmp_path / "c.yaml"
    config.write_text("task: classification\nn_trials: 2\n")
    assert requested_task(["--config", str(config)]) == "classification"
    with pytest.raises(ValueError, match="`--task` must be one of lm, classification"):
        requested_task(["--task", "vision"])
    with pytest.raises(ValueError, match="Missing --teacher_model_name_or_path"):
        main(["--task", "classification", "--model_name_or_path", "x", "--dataset_name", "y"])
