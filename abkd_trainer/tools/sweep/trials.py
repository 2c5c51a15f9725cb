"""The trials of a shared study: which use the budget, how a worker claims one, what became of each.

Several workers (one `abkd-sweep` each) share a study through its storage. Trial numbers are
assigned atomically by the storage, so "the trials numbered below this one" is the same list for
every worker, and the budget is shared by claiming: a trial runs only if fewer than `n_trials`
earlier trials hold the budget. Failed trials (an error, or a worker that died) never hold it.

A trial whose worker died is re-run as a new trial with the same parameters; Optuna's
`RetryHeartbeatStaleTrialCallback` records the chain in the new trial's system attribute
`retry_history` (the numbers of the dead trials, first one first). A re-run works in the folder
of the first trial of its chain, `run-<number>`, and resumes from its last complete checkpoint.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

from abkd_trainer.tools.sweep.search_space import import_optuna

if TYPE_CHECKING:
    import optuna

# The trial's user attributes: skipped because the budget was taken; the worker that ran it; the
# error it failed with; stopped by Ctrl-C; the checkpoint a re-run resumed from (relative to the
# sweep's output_dir, None for a fresh start); the optimizer step its training started at.
OVER_BUDGET_ATTR = "over_budget"
WORKER_ATTR = "worker"
ERROR_ATTR = "error"
INTERRUPTED_ATTR = "interrupted"
RESUMED_FROM_ATTR = "resumed_from"
START_STEP_ATTR = "start_step"


def worker_name() -> str:
    """This worker's name in the study: `host:pid`."""
    return f"{socket.gethostname()}:{os.getpid()}"


def holds_budget(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether `trial` uses the budget: not failed and not skipped as over budget.

    Args:
        trial: a trial of the study (a queued one counts, as the next to run).
    """
    return trial.state.name != "FAIL" and not trial.user_attrs.get(OVER_BUDGET_ATTR)


def counted_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that use the budget: running and finished (complete or pruned) ones.

    Queued trials, trials skipped as over budget and failed trials are left out.

    Args:
        study: the shared study.
    """
    return [
        trial
        for trial in study.get_trials(deepcopy=False)
        if trial.state.name != "WAITING" and holds_budget(trial)
    ]


def running_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The study's running trials (in this or another worker, alive or not yet found dead).

    Args:
        study: the shared study.
    """
    return [trial for trial in study.get_trials(deepcopy=False) if trial.state.name == "RUNNING"]


def claim_trial(trial: optuna.Trial, n_trials: int) -> None:
    """Record the worker on `trial`; skip it if `n_trials` earlier trials hold the budget.

    Trial numbers are assigned atomically by the storage, so "the trials numbered below this
    one, skips and failures excluded" is the same list for every worker: at most `n_trials`
    trials that hold the budget run.

    Args:
        trial: the trial this worker is starting.
        n_trials: the study's budget.

    Raises:
        optuna.TrialPruned: over budget; the trial is marked `over_budget` (outputs skip it).
    """
    optuna = import_optuna()
    trial.set_user_attr(WORKER_ATTR, worker_name())
    earlier = [
        other
        for other in trial.study.get_trials(deepcopy=False)
        if other.number < trial.number and holds_budget(other)
    ]
    if len(earlier) >= n_trials:
        trial.set_user_attr(OVER_BUDGET_ATTR, True)
        raise optuna.TrialPruned(f"the study's {n_trials} trials are taken by other workers")


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The study's best completed trial, or None while no trial has completed.

    Args:
        study: the study.
    """
    try:
        return study.best_trial
    except ValueError:  # no completed trial
        return None


def retry_history(trial: optuna.trial.FrozenTrial) -> list[int]:
    """The dead trials `trial` re-runs, first one first (empty for a trial of its own).

    Args:
        trial: a trial of the study.
    """
    return list(trial.system_attrs.get("retry_history", []))


def frozen_trial(trial: optuna.trial.FrozenTrial | optuna.Trial) -> optuna.trial.FrozenTrial:
    """The stored state of `trial` (a running `optuna.Trial` shows no system attributes).

    Args:
        trial: a trial of the study.
    """
    if not hasattr(trial, "study"):
        return trial
    return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


def run_name(trial: optuna.trial.FrozenTrial | optuna.Trial) -> str:
    """The trial's folder in the sweep's `output_dir`: Trainer's `run-<number>`, with the
    number of the first trial of its chain for a re-run (Trainer's `hp_name`).

    Args:
        trial: a trial of the study.
    """
    history = retry_history(frozen_trial(trial))
    return f"run-{history[0] if history else trial.number}"


def re_runs(study: optuna.Study) -> dict[int, int]:
    """Dead trial -> the trial that re-runs it.

    Args:
        study: the study.
    """
    return {
        retry_history(trial)[-1]: trial.number
        for trial in study.get_trials(deepcopy=False)
        if retry_history(trial)
    }


def trial_reason(trial: optuna.trial.FrozenTrial, re_run_as: int | None) -> str:
    """Why `trial` did not finish (empty for a complete trial), for the outputs.

    Args:
        trial: a trial of the study.
        re_run_as: the trial that re-runs it, if any.
    """
    state = trial.state.name
    worker = trial.user_attrs.get(WORKER_ATTR, "?")
    if state == "COMPLETE":
        return ""
    if state == "PRUNED":
        return f"pruned at step {trial.last_step}" if trial.last_step is not None else "pruned"
    if state == "RUNNING":
        return f"running in worker {worker}"
    if state != "FAIL":
        return state.lower()
    if ERROR_ATTR in trial.user_attrs:
        return f"failed: {trial.user_attrs[ERROR_ATTR]}"
    if trial.user_attrs.get(INTERRUPTED_ATTR):
        cause = f"interrupted (Ctrl-C) in worker {worker}"
    else:
        cause = f"its worker {worker} stopped sending heartbeats (killed or preempted)"
    if re_run_as is None:
        return f"{cause}; not re-run (--max_retries reached, or none queued)"
    return f"{cause}; re-run as trial {re_run_as}"
