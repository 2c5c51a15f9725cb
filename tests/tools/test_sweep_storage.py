"""The sweep's storages and its bookkeeping of dead trials, in one process (no training).

The real thing, worker processes killed with SIGKILL, is `test_sweep_preemption.py`.
"""

from __future__ import annotations

import json
import time

import optuna
import pytest
from optuna.trial import TrialState

from abkd_trainer.tools.sweep import SweepArguments, SweepStorage, claim_trial, counted_trials
from abkd_trainer.tools.sweep.outputs import trial_rows, write_sweep_outputs
from abkd_trainer.tools.sweep.storage import HEARTBEAT_ATTR, journal_path, storage_kind
from abkd_trainer.tools.sweep.study import resume_checkpoint, run_one_trial
from abkd_trainer.tools.sweep.trials import ERROR_ATTR, run_name, trial_reason


def test_storage_urls_name_a_database_or_a_journal_and_other_forms_are_refused():
    assert storage_kind(None) == "memory"
    assert storage_kind("sqlite:///sweep.db") == "rdb"
    assert storage_kind("postgresql+psycopg2://user:pass@host/db") == "rdb"
    assert storage_kind("journal:///shared/sweep.log") == "journal"
    assert storage_kind("runs/sweep.log") == "journal"
    assert journal_path("journal:///shared/sweep.log") == "/shared/sweep.log"
    assert journal_path("journal://sweep.log") == "sweep.log"
    with pytest.raises(ValueError, match=r"sqlite:///sweep.db.*journal:///shared/sweep.log"):
        SweepArguments(storage="sweep.db")  # refused before any model is loaded
    with pytest.raises(ValueError, match="names no journal file"):
        SweepArguments(storage="journal://")
    with pytest.raises(ValueError, match="whole seconds"):
        SweepArguments(heartbeat_interval=0)


def _journal(tmp_path, **settings):
    storage = SweepStorage.open(f"journal://{tmp_path / 'study.log'}", **settings)
    study = optuna.create_study(study_name="s", storage=storage.storage)
    return storage, study


def _running_trial(study, alpha, heartbeat):
    trial = study.ask({"alpha": optuna.distributions.FloatDistribution(0, 1)})
    trial.set_user_attr(HEARTBEAT_ATTR, heartbeat)
    trial.report(0.5, step=2)
    assert trial.params["alpha"] is not None
    return trial


def test_a_journal_trial_without_heartbeats_is_failed_once_and_queued_with_its_parameters(
    tmp_path,
):
    storage, study = _journal(tmp_path, heartbeat_interval=1, grace_period=3, max_retries=1)
    now = time.time()
    dead = _running_trial(study, 0.3, heartbeat=now)
    alive = _running_trial(study, 0.7, heartbeat=now)

    assert storage.fail_stale_trials(study) == []  # both beat just now
    alive.set_user_attr(HEARTBEAT_ATTR, now + 10)
    assert storage.fail_stale_journal_trials(study, now=now + 10) == [dead.number]
    # Another worker looking at the same moment finds nothing left to fail.
    other = SweepStorage.open(storage.url, heartbeat_interval=1, grace_period=3)
    other_study = optuna.load_study(study_name="s", storage=other.storage)
    assert other.fail_stale_journal_trials(other_study, now=now + 10) == []

    states = {t.number: t.state for t in study.trials}
    assert states[dead.number] == TrialState.FAIL and states[alive.number] == TrialState.RUNNING
    (queued,) = study.get_trials(states=(TrialState.WAITING,))
    assert queued.params == dead.params and queued.intermediate_values == {2: 0.5}
    assert queued.system_attrs["retry_history"] == [dead.number]
    assert run_name(queued) == f"run-{dead.number}"  # the re-run works in the dead trial's folder
    assert [t.number for t in counted_trials(study)] == [alive.number]  # failed: no budget

    # The re-run dies too: with max_retries=1 its parameters are not queued a third time.
    rerun = study.ask()
    assert rerun.number == queued.number and rerun.params == dead.params
    assert storage.fail_stale_journal_trials(study, now=time.time() + 10) == [rerun.number]
    assert not study.get_trials(states=(TrialState.WAITING,))
    reasons = {row["number"]: row["reason"] for row in trial_rows(study, "m", "minimize")}
    assert reasons[dead.number].endswith(f"re-run as trial {rerun.number}")
    assert "not re-run (--max_retries reached" in reasons[rerun.number]


def test_failed_trials_never_hold_the_budget():
    study = optuna.create_study()
    done, failed = study.ask(), study.ask()
    study.tell(done, 1.0)
    study.tell(failed, state=TrialState.FAIL)
    third = study.ask()
    claim_trial(third, n_trials=2)  # the failed trial left room for it
    fourth = study.ask()
    with pytest.raises(optuna.TrialPruned):
        claim_trial(fourth, n_trials=2)
    assert [t.number for t in counted_trials(study)] == [done.number, third.number]


def test_the_reasons_name_what_became_of_a_trial():
    study = optuna.create_study()
    error = study.ask()
    error.set_user_attr(ERROR_ATTR, "ValueError: bad")
    error.set_user_attr("worker", "host:1")
    study.tell(error, state=TrialState.FAIL)
    interrupted = study.ask()
    interrupted.set_user_attr("interrupted", True)
    study.tell(interrupted, state=TrialState.FAIL)
    pruned = study.ask()
    pruned.report(1.0, step=4)
    study.tell(pruned, state=TrialState.PRUNED)
    running = study.ask()
    running.set_user_attr("worker", "host:2")
    frozen = {t.number: t for t in study.trials}

    assert trial_reason(frozen[error.number], None) == "failed: ValueError: bad"
    assert trial_reason(frozen[interrupted.number], 9).startswith("interrupted (Ctrl-C)")
    assert trial_reason(frozen[interrupted.number], 9).endswith("re-run as trial 9")
    assert trial_reason(frozen[pruned.number], None) == "pruned at step 4"
    assert trial_reason(frozen[running.number], None) == "running in worker host:2"


def test_a_trial_stopped_by_ctrl_c_is_queued_again_and_the_interrupt_goes_on():
    memory = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=memory)
    running = {"trial": None}

    def objective(trial):
        running["trial"] = trial
        trial.suggest_float("alpha", 0, 1)
        trial.set_user_attr("interrupted", True)
        raise KeyboardInterrupt

    storage = SweepStorage(None, memory)
    with pytest.raises(KeyboardInterrupt):
        run_one_trial(study, storage, objective, running)

    interrupted, queued = study.trials
    assert interrupted.state == TrialState.FAIL and queued.state == TrialState.WAITING
    assert queued.params == interrupted.params
    assert "interrupted (Ctrl-C)" in trial_rows(study, "m", "minimize")[0]["reason"]


def _checkpoint(folder, params):
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"trial_params": params}))


def test_a_rerun_resumes_only_from_a_complete_checkpoint_of_its_own_parameters(tmp_path):
    memory = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=memory)
    dead = study.ask({"alpha": optuna.distributions.FloatDistribution(0, 1)})
    study.tell(dead, state=TrialState.FAIL)
    SweepStorage(None, memory).queue_again(study, study.trials[0])
    rerun = study.ask()
    params = dict(study.trials[0].params)

    assert resume_checkpoint(rerun, tmp_path) is None  # nothing saved: start over
    _checkpoint(tmp_path / "run-0" / "checkpoint-2", params)
    (tmp_path / "run-0" / "checkpoint-4").mkdir()  # killed while saving: incomplete
    with pytest.warns(UserWarning, match="incomplete checkpoint"):
        assert resume_checkpoint(rerun, tmp_path) == str(tmp_path / "run-0" / "checkpoint-2")
    _checkpoint(tmp_path / "run-0" / "checkpoint-6", {"alpha": 0.123})  # another study's run
    assert resume_checkpoint(rerun, tmp_path) is None
    fresh = study.ask({"alpha": optuna.distributions.FloatDistribution(0, 1)})
    assert resume_checkpoint(fresh, tmp_path) is None  # a trial of its own never resumes


def test_outputs_name_a_trial_that_failed_before_it_had_parameters(tmp_path):
    study = optuna.create_study()
    for alpha, beta, value in ((0.2, 0.7, 1.0), (0.8, 0.3, 2.0)):
        study.enqueue_trial({"alpha": alpha, "beta": beta})
        trial = study.ask()
        trial.suggest_float("alpha", 0, 1)
        trial.suggest_float("beta", 0, 1)
        study.tell(trial, value)
    broken = study.ask()
    broken.set_user_attr(ERROR_ATTR, "OSError: no student")
    study.tell(broken, state=TrialState.FAIL)

    files = write_sweep_outputs(
        study, SweepArguments(), "eval_loss", "minimize", tmp_path, {"max_steps": 4}
    )

    assert [path.name for path in files] == ["trials.csv", "heatmap.png", "best.yaml"]
    header = (tmp_path / "best.yaml").read_text()
    assert "#   trial 2 (FAIL): failed: OSError: no student" in header
    assert "alpha: 0.2" in header
