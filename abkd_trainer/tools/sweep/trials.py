"""The trials of a shared study: which use the budget, how a worker claims one, the best one.

Several workers (one `abkd-sweep` each) share a study through its storage. Trial numbers are
assigned atomically by the storage, so "the trials numbered below this one" is the same list for
every worker, and the budget is shared by claiming: a trial runs only if fewer than `n_trials`
earlier trials hold the budget.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

from abkd_trainer.tools.sweep.search_space import import_optuna

if TYPE_CHECKING:
    import optuna

# The trial's user attributes: skipped because the budget was taken; the worker that ran it.
OVER_BUDGET_ATTR = "over_budget"
WORKER_ATTR = "worker"


def worker_name() -> str:
    """This worker's name in the study: `host:pid`."""
    return f"{socket.gethostname()}:{os.getpid()}"


def counted_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that use the budget: started ones, except those skipped as over budget.

    Args:
        study: the shared study.
    """
    optuna = import_optuna()
    return [
        trial
        for trial in study.get_trials(deepcopy=False)
        if trial.state != optuna.trial.TrialState.WAITING
        and not trial.user_attrs.get(OVER_BUDGET_ATTR)
    ]


def claim_trial(trial: optuna.Trial, n_trials: int) -> None:
    """Record the worker on `trial`; skip it if `n_trials` earlier trials hold the budget.

    Trial numbers are assigned atomically by the storage, so "the trials numbered below this
    one, skips excluded" is the same list for every worker: exactly the first `n_trials` run.

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
        if other.number < trial.number and not other.user_attrs.get(OVER_BUDGET_ATTR)
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
