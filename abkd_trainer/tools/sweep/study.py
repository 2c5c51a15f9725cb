"""The study and its workers: opening the storage, creating or joining the study, running trials.

`run_trainer_sweep` takes a trainer built once (with its teacher and a `model_init`), creates or
joins the study, and runs one trial at a time through `Trainer.hyperparameter_search` until the
study's budget is taken; then it writes the outputs of the whole study.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abkd_trainer.tools.sweep.metrics import TrialMetricsCallback, objective_value
from abkd_trainer.tools.sweep.outputs import write_sweep_outputs
from abkd_trainer.tools.sweep.search_space import (
    SweepArguments,
    grid_size,
    import_optuna,
    make_hp_space,
    make_pruner,
    make_sampler,
    reference_points_in_space,
    spare_final_evaluation,
)
from abkd_trainer.tools.sweep.trials import best_trial, claim_trial, counted_trials

if TYPE_CHECKING:
    import optuna


def open_storage(url: str | None, attempts: int = 5) -> optuna.storages.BaseStorage:
    """The study storage: in memory for `None`, else an RDB storage for `url`.

    Workers that start together on a new database race to create its tables (one of them gets
    an `IntegrityError`), so opening is retried. SQLite waits up to a minute for a lock instead
    of failing with "database is locked" while another worker writes.

    Args:
        url: an SQLAlchemy URL (`sqlite:///sweep.db`, `postgresql://...`), or None.
        attempts: how often to try opening it.
    """
    optuna = import_optuna()
    if url is None:
        return optuna.storages.InMemoryStorage()
    from sqlalchemy.exc import SQLAlchemyError

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
        except SQLAlchemyError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def create_or_load_study(
    sweep_args: SweepArguments,
    direction: str,
    *,
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
) -> tuple[optuna.Study, Any]:
    """Create the study (enqueueing the reference points) or join an existing one.

    Args:
        sweep_args: the search; its `storage` and `study_name` name the study.
        direction: `"maximize"` or `"minimize"`; an existing study must have it.
        sampler: the study's sampler.
        pruner: the study's pruner.

    Returns:
        `(study, storage)`: the storage object that `hyperparameter_search` must be given to
        find the same study.

    Raises:
        ValueError: the existing study optimises in the other direction.
    """
    optuna = import_optuna()
    storage = open_storage(sweep_args.storage)
    try:
        # Creation is atomic in a database: exactly one worker creates the study and enqueues.
        study = optuna.create_study(
            study_name=sweep_args.study_name,
            storage=storage,
            direction=direction,
            sampler=sampler,
            pruner=pruner,
        )
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(
            study_name=sweep_args.study_name, storage=storage, sampler=sampler, pruner=pruner
        )
        if study.direction.name.lower() != direction:
            raise ValueError(
                f"Study {sweep_args.study_name!r} in {sweep_args.storage} is a "
                f"{study.direction.name.lower()} study, this sweep wants to {direction}. Use "
                "another --study_name or the same objective."
            ) from None
        return study, storage
    # A grid already holds the reference points it contains.
    if sweep_args.enqueue_reference_points and sweep_args.sampler == "tpe":
        for params in reference_points_in_space(sweep_args)[: sweep_args.n_trials]:
            study.enqueue_trial(params, user_attrs={"reference_point": True})
    return study, storage


@dataclass
class SweepResult:
    """What a sweep found ([run_sweep][abkd_trainer.tools.sweep.lm.run_sweep]).

    Attributes:
        study: the Optuna study (every worker's trials).
        metric: the objective's name.
        direction: `"maximize"` or `"minimize"`.
        best_params: the best completed trial's parameters, or None.
        best_value: the best completed trial's value, or None.
        files: the outputs written.
    """

    study: Any
    metric: str
    direction: str
    best_params: dict[str, float] | None
    best_value: float | None
    files: list[Path]


def check_single_process(args: Any) -> None:
    """Refuse DeepSpeed and multi-process launches: a trial runs in one process.

    Args:
        args: the training arguments.

    Raises:
        ValueError: naming the alternative (one worker per device on one study).
    """
    if args.deepspeed is not None or args.world_size > 1:
        raise ValueError(
            "abkd-sweep runs each trial in one process (no DeepSpeed, no multi-process "
            "launchers). To use several devices or machines, start one abkd-sweep worker per "
            "device with the same --storage and --study_name."
        )


def run_trainer_sweep(
    trainer: Any,
    sweep_args: SweepArguments,
    *,
    metric: str,
    direction: str,
    best_config: dict[str, Any] | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    metrics_callback: Callable[[Callable[[], Any]], Any] = TrialMetricsCallback,
) -> SweepResult:
    """Run the study's trials on `trainer` until its budget is taken; write the outputs.

    Args:
        trainer: a `transformers.Trainer` with a `model_init` (the student of every trial);
            its `args` carry the searched fields and `args.output_dir` receives the outputs.
        sweep_args: the search.
        metric: the objective, a metric of `trainer.evaluate()`.
        direction: `"maximize"` or `"minimize"`.
        best_config: the settings the sweep ran with (flag -> value), the base of `best.yaml`.
        sampler: an Optuna sampler replacing the one `sweep_args` describes.
        pruner: an Optuna pruner replacing the one `sweep_args` describes.
        metrics_callback: builds the callback that records each trial's metrics, from a function
            returning the running trial (`TrialMetricsCallback` by default).

    Returns:
        The study, the objective and the files written.
    """
    args = trainer.args
    sampler = sampler or make_sampler(sweep_args, seed=args.seed)
    pruner = spare_final_evaluation(pruner or make_pruner(sweep_args))
    study, storage = create_or_load_study(sweep_args, direction, sampler=sampler, pruner=pruner)
    running: dict[str, Any] = {"trial": None}
    trainer.add_callback(metrics_callback(lambda: running["trial"]))
    print(
        f"abkd-sweep: objective {metric} ({direction}), {sweep_args.n_trials} trials in study "
        f"{sweep_args.study_name!r}."
    )
    search_kwargs = {
        "compute_objective": functools.partial(objective_value, metric),
        "direction": direction,
        "study_name": sweep_args.study_name,
        "storage": storage,
        "sampler": sampler,
        "pruner": pruner,
    }
    while len(counted_trials(study)) < sweep_args.n_trials:
        run_one_trial(trainer, study, sweep_args, running, search_kwargs)
        if sweep_args.sampler == "grid" and grid_exhausted(study, sweep_args):
            break
    running["trial"] = None

    files = write_sweep_outputs(study, sweep_args, metric, direction, args.output_dir, best_config)
    best = best_trial(study)
    return SweepResult(
        study=study,
        metric=metric,
        direction=direction,
        best_params=dict(best.params) if best else None,
        best_value=best.value if best else None,
        files=files,
    )


def run_one_trial(
    trainer: Any,
    study: optuna.Study,
    sweep_args: SweepArguments,
    running: dict[str, Any],
    search_kwargs: dict[str, Any],
) -> None:
    """One trial through `Trainer.hyperparameter_search`; `running["trial"]` is set to it.

    Args:
        trainer: the sweep's trainer (with its `model_init`).
        study: the shared study.
        sweep_args: the search.
        running: holds the running trial under `"trial"`, for the sweep's callbacks.
        search_kwargs: the other arguments of `hyperparameter_search`.
    """
    optuna = import_optuna()

    def on_trial(trial: optuna.Trial) -> None:
        running["trial"] = trial
        claim_trial(trial, sweep_args.n_trials)

    running["trial"] = None
    try:
        trainer.hyperparameter_search(
            hp_space=make_hp_space(sweep_args, on_trial),
            n_trials=1,
            backend="optuna",
            load_if_exists=True,
            **search_kwargs,
        )
    except ValueError:
        # run_hp_search_optuna reads study.best_trial at the end, which raises while no trial of
        # the study has completed: fine when this worker's trial was pruned (or over budget).
        # Any other ValueError, e.g. from a failed trial, propagates.
        trial = running["trial"]
        states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
        if trial is None or states.get(trial.number) != optuna.trial.TrialState.PRUNED:
            raise


def grid_exhausted(study: optuna.Study, sweep_args: SweepArguments) -> bool:
    """Whether every grid point has a trial (GridSampler then stops its study; so does the loop).

    Args:
        study: the shared study.
        sweep_args: the search.
    """
    return len(counted_trials(study)) >= grid_size(sweep_args)
