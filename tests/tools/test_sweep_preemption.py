"""`abkd-sweep` survives preemption: real worker processes, one killed with SIGKILL mid-trial.

The killed worker's trial is found by its missing heartbeats, marked failed and re-run with the
same parameters in the same folder, from the checkpoint the killed run saved; the study ends with
`n_trials` finished trials and none running, and the outputs name the dead trial.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from testing_utils import build_student_and_teacher, build_text_dataset, build_tiny_tokenizer

from abkd_trainer.tools.sweep import open_storage

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("sweep_worker.py")
N_TRIALS, MAX_STEPS, SAVE_STEPS = 3, 8, 2


@pytest.fixture
def sweep_argv(tmp_path):
    """`abkd-sweep` flags: a tiny student and teacher, 3 trials of 8 steps, a checkpoint every
    2 steps, heartbeats every second and a 3-second grace period."""
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("qwen2", tokenizer)
    for name, model in (("student", student), ("teacher", teacher)):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    build_text_dataset(16).to_json(tmp_path / "train.jsonl")
    build_text_dataset(4).to_json(tmp_path / "test.jsonl")
    return [
        "--model_name_or_path", str(tmp_path / "student"),
        "--teacher_model_name_or_path", str(tmp_path / "teacher"),
        "--dataset_name", str(tmp_path / "train.jsonl"),
        "--dataset_test_file", str(tmp_path / "test.jsonl"),
        "--output_dir", str(tmp_path / "sweep"),
        "--n_trials", str(N_TRIALS), "--max_steps", str(MAX_STEPS), "--eval_steps", "4",
        "--save_strategy", "steps", "--save_steps", str(SAVE_STEPS), "--no_pruning", "true",
        "--heartbeat_interval", "1", "--grace_period", "3", "--study_name", "preempted",
        "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
        "--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--disable_tqdm", "true",
    ]  # fmt: skip


def _start_worker(argv, log_path, stall_marker=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])
    env.pop("ABKD_SWEEP_STALL_MARKER", None)
    if stall_marker is not None:
        env["ABKD_SWEEP_STALL_MARKER"] = str(stall_marker)
    log = open(log_path, "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, str(WORKER), *argv], env=env, stdout=log, stderr=subprocess.STDOUT
    )


def _kill_once_stalled(worker, marker, storage_url):
    """Wait until `worker`'s trial is running and has saved a checkpoint; SIGKILL the worker.

    Returns:
        The killed trial, as the study held it just before the kill.
    """
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert worker.poll() is None, "the worker to kill ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.5)
    report = json.loads(marker.read_text())
    study = optuna.load_study(study_name="preempted", storage=open_storage(storage_url))
    (killed,) = [
        trial
        for trial in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
        if trial.user_attrs["worker"].endswith(f":{worker.pid}")
    ]
    assert report["step"] == SAVE_STEPS
    assert f"run-{killed.number}/checkpoint-{SAVE_STEPS}" in report["checkpoints"]
    worker.kill()  # SIGKILL: no handler runs, the trial stays RUNNING in the storage
    assert worker.wait(timeout=30) == -9
    return killed


def _check_recovered(storage_url, output_dir, killed, logs):
    """The study ends with N_TRIALS finished trials, the killed one failed and re-run from its
    checkpoint with the same parameters, and the outputs say so."""
    study = optuna.load_study(study_name="preempted", storage=open_storage(storage_url))
    by_state = {}
    for trial in study.trials:
        by_state.setdefault(trial.state.name, []).append(trial.number)
    assert sorted(by_state) == ["COMPLETE", "FAIL"], by_state  # nothing RUNNING or WAITING
    assert len(by_state["COMPLETE"]) == N_TRIALS and by_state["FAIL"] == [killed.number]
    (rerun,) = [t for t in study.trials if t.system_attrs.get("retry_history")]
    assert rerun.system_attrs["retry_history"] == [killed.number]
    assert rerun.state.name == "COMPLETE" and rerun.params == killed.params
    # It resumed from the killed run's checkpoint in the killed run's folder, trained to the end.
    assert rerun.user_attrs["resumed_from"] == f"run-{killed.number}/checkpoint-{SAVE_STEPS}"
    assert rerun.user_attrs["start_step"] == SAVE_STEPS
    assert max(rerun.intermediate_values) == MAX_STEPS
    final_state = output_dir / f"run-{killed.number}" / f"checkpoint-{MAX_STEPS}"
    assert json.loads((final_state / "trainer_state.json").read_text())["global_step"] == MAX_STEPS
    assert not (output_dir / f"run-{rerun.number}").exists()
    # Every fresh trial started at step 0.
    assert all(
        t.user_attrs["start_step"] == 0 and t.user_attrs["resumed_from"] is None
        for t in study.trials
        if t.state.name == "COMPLETE" and t.number != rerun.number
    )

    with open(output_dir / "trials.csv") as handle:
        rows = {int(row["number"]): row for row in csv.DictReader(handle)}
    dead = rows[killed.number]
    assert dead["state"] == "FAIL" and "stopped sending heartbeats" in dead["reason"]
    assert f"re-run as trial {rerun.number}" in dead["reason"]
    assert dead["re_run_as"] == str(rerun.number)
    assert rows[rerun.number]["retry_of"] == str(killed.number)
    assert rows[rerun.number]["resumed_from"] == rerun.user_attrs["resumed_from"]
    best_header = (output_dir / "best.yaml").read_text().split("\n# Trials that")[1]
    assert f"trial {killed.number} (FAIL)" in best_header.split("\nalpha")[0]
    assert f"trial {killed.number} sent no heartbeat" in logs
    assert f"trials in the study ({N_TRIALS} finished)" in logs


@pytest.mark.slow
def test_a_surviving_worker_reruns_the_trial_of_a_worker_killed_mid_trial(tmp_path, sweep_argv):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    argv = [*sweep_argv, "--storage", storage]
    marker = tmp_path / "stalled.json"
    victim = _start_worker(argv, tmp_path / "victim.log", stall_marker=marker)
    survivor = _start_worker(argv, tmp_path / "survivor.log")
    try:
        killed = _kill_once_stalled(victim, marker, storage)
        assert survivor.wait(timeout=300) == 0, (tmp_path / "survivor.log").read_text()
    finally:
        for worker in (victim, survivor):
            if worker.poll() is None:
                worker.kill()

    _check_recovered(storage, tmp_path / "sweep", killed, (tmp_path / "survivor.log").read_text())


@pytest.mark.slow
def test_the_next_worker_on_a_journal_file_reruns_the_killed_workers_trial(tmp_path, sweep_argv):
    storage = f"journal://{tmp_path / 'study.log'}"  # journal:///abs/path
    argv = [*sweep_argv, "--storage", storage]
    marker = tmp_path / "stalled.json"
    victim = _start_worker(argv, tmp_path / "victim.log", stall_marker=marker)
    try:
        killed = _kill_once_stalled(victim, marker, storage)
    finally:
        if victim.poll() is None:
            victim.kill()
    # The killed worker's command, started again (as a job scheduler restarts it).
    restarted = _start_worker(argv, tmp_path / "restarted.log")
    assert restarted.wait(timeout=300) == 0, (tmp_path / "restarted.log").read_text()

    _check_recovered(storage, tmp_path / "sweep", killed, (tmp_path / "restarted.log").read_text())
    # The resumed trial continued the killed run's trajectory: it ends where a run of the same
    # parameters that nothing interrupted ends (a fresh in-memory study's first trial is the same
    # reference point), bit for bit on one CPU thread.
    clean_argv = [*sweep_argv, "--n_trials", "1", "--output_dir", str(tmp_path / "clean")]
    clean = _start_worker(clean_argv, tmp_path / "clean.log")
    assert clean.wait(timeout=300) == 0, (tmp_path / "clean.log").read_text()
    with open(tmp_path / "clean" / "trials.csv") as handle:
        (uninterrupted,) = csv.DictReader(handle)
    study = optuna.load_study(study_name="preempted", storage=open_storage(storage))
    (rerun,) = [t for t in study.trials if t.system_attrs.get("retry_history")]
    assert (float(uninterrupted["alpha"]), float(uninterrupted["beta"])) == (
        rerun.params["alpha"],
        rerun.params["beta"],
    )
    assert float(uninterrupted["value"]) == rerun.value
