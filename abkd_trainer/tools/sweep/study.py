"""The study and its workers: creating or joining the study, running trials, re-running dead ones.

[run_trainer_sweep][abkd_trainer.tools.sweep.study.run_trainer_sweep] takes a trainer built once
(with its teacher and a `model_init`), creates or joins the study and runs one trial at a time
until the study holds `n_trials` finished trials; then it writes the outputs of the whole study.

A trial runs as `Trainer.hyperparameter_search` runs one with Optuna (transformers'
`run_hp_search_optuna`): the trainer's `hp_search_backend`, `hp_space`, `hp_name` and
`compute_objective` are set, `Study.optimize` calls an objective that calls
`trainer.train(trial=trial)`, the Trainer rebuilds the student with `model_init`, writes the
trial's parameters into `args`, reports every evaluation to the trial and raises `TrialPruned`
when the pruner says so. The sweep drives `Study.optimize` itself, not through
`hyperparameter_search`, for one reason: a re-run of a dead trial must call
`trainer.train(resume_from_checkpoint=..., trial=trial)`, and `hyperparameter_search` never
passes a checkpoint. Optuna's `Study.optimize` records the heartbeats of a trial in a database.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterator
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
from abkd_trainer.tools.sweep.storage import SweepStorage, open_storage
from abkd_trainer.tools.sweep.trials import (
    ERROR_ATTR,
    INTERRUPTED_ATTR,
    RESUMED_FROM_ATTR,
    best_trial,
    claim_trial,
    counted_trials,
    frozen_trial,
    retry_history,
    run_name,
    running_trials,
)

if TYPE_CHECKING:
    import optuna


def create_or_load_study(
    sweep_args: SweepArguments,
    direction: str,
    *,
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
    storage: Any = None,
) -> tuple[optuna.Study, Any]:
    """Create the study (enqueueing the reference points) or join an existing one.

    Args:
        sweep_args: the search; its `storage` and `study_name` name the study.
        direction: `"maximize"` or `"minimize"`; an existing study must have it.
        sampler: the study's sampler.
        pruner: the study's pruner.
        storage: the Optuna storage; None opens `sweep_args.storage` (without heartbeats).

    Returns:
        `(study, storage)`.

    Raises:
        ValueError: the existing study optimises in the other direction.
    """
    optuna = import_optuna()
    storage = open_storage(sweep_args.storage) if storage is None else storage
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
    command: str = "abkd-train",
) -> SweepResult:
    """Run the study's trials on `trainer` until it holds `n_trials` finished ones; write outputs.

    Before each trial, and every few seconds while the budget is held by running trials of other
    workers, the worker looks for trials whose worker died (no heartbeat for
    `sweep_args.grace_period` seconds), marks them failed and queues their parameters again; a
    queued re-run is the next trial a worker takes. So a worker stops only once no trial of the
    study is running, and its outputs cover the finished study.

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
        command: the training command that runs `best.yaml` (`abkd-train`,
            `abkd-train-classifier`), for its header.

    Returns:
        The study, the objective and the files written.
    """
    sampler = sampler or make_sampler(sweep_args, seed=trainer.args.seed)
    pruner = spare_final_evaluation(pruner or make_pruner(sweep_args))
    storage = SweepStorage.open(
        sweep_args.storage,
        heartbeat_interval=sweep_args.heartbeat_interval,
        grace_period=sweep_args.grace_period,
        max_retries=sweep_args.max_retries,
    )
    study, _ = create_or_load_study(
        sweep_args, direction, sampler=sampler, pruner=pruner, storage=storage.storage
    )
    running: dict[str, Any] = {"trial": None}
    trainer.add_callback(metrics_callback(lambda: running["trial"]))
    print(
        f"abkd-sweep: objective {metric} ({direction}), {sweep_args.n_trials} trials in study "
        f"{sweep_args.study_name!r}."
    )
    objective = make_trial_objective(trainer, storage, sweep_args, running)
    hp_space = make_hp_space(sweep_args, on_trial=lambda trial: None)
    with search_hooks(trainer, hp_space, functools.partial(objective_value, metric)):
        while next_step(study, storage, sweep_args) == "run":
            run_one_trial(study, storage, objective, running)
    running["trial"] = None

    files = write_sweep_outputs(
        study, sweep_args, metric, direction, trainer.args.output_dir, best_config, command
    )
    best = best_trial(study)
    return SweepResult(
        study=study,
        metric=metric,
        direction=direction,
        best_params=dict(best.params) if best else None,
        best_value=best.value if best else None,
        files=files,
    )


def next_step(study: optuna.Study, storage: SweepStorage, sweep_args: SweepArguments) -> str:
    """`"run"` another trial, or `"stop"`; waits while other workers' trials hold the budget.

    Dead trials are failed and queued again first. A grid sweep stops once every grid point has
    a trial.

    Args:
        study: the shared study.
        storage: the study's storage.
        sweep_args: the search.
    """
    waiting_for: list[int] = []
    while True:
        for number in storage.fail_stale_trials(study):
            print(
                f"abkd-sweep: trial {number} sent no heartbeat for {storage.grace_period} s (its "
                "worker was killed or preempted): marked failed and queued again."
            )
        held = len(counted_trials(study))
        if sweep_args.sampler == "grid" and held >= grid_size(sweep_args):
            return "stop"
        if held < sweep_args.n_trials:
            return "run"
        others = [trial.number for trial in running_trials(study)]
        if not others:
            return "stop"
        if others != waiting_for:
            waiting_for = others
            print(
                f"abkd-sweep: the budget is taken; waiting for the running trials {others} (a "
                "trial whose worker dies is re-run here)."
            )
        time.sleep(min(storage.heartbeat_interval, 2))


@contextlib.contextmanager
def search_hooks(
    trainer: Any, hp_space: Callable[[Any], dict[str, float]], compute_objective: Callable
) -> Iterator[None]:
    """Set what `Trainer.hyperparameter_search` sets before its trials (and unset the backend).

    Args:
        trainer: the sweep's trainer.
        hp_space: suggests a trial's parameters (the Trainer writes them into `args`).
        compute_objective: the objective's value from an evaluation's metrics.

    Raises:
        ValueError: the trainer has no `model_init`.
    """
    from transformers.trainer_utils import HPSearchBackend

    if trainer.model_init is None:
        raise ValueError("A sweep needs a trainer with a `model_init` (the student of a trial).")
    trainer.hp_search_backend = HPSearchBackend.OPTUNA
    trainer.hp_space = hp_space
    trainer.hp_name = run_name  # a re-run trains in its dead predecessor's folder
    trainer.compute_objective = compute_objective
    try:
        yield
    finally:
        trainer.hp_search_backend = None


def make_trial_objective(
    trainer: Any, storage: SweepStorage, sweep_args: SweepArguments, running: dict[str, Any]
) -> Callable[[Any], float]:
    """The objective `Study.optimize` calls: claim the trial, train it (resuming a re-run), score.

    An error is recorded on the trial (user attribute `error`) before Optuna marks it failed and
    re-raises it; Ctrl-C is recorded as `interrupted`.

    Args:
        trainer: the sweep's trainer.
        storage: the study's storage (a journal's heartbeats).
        sweep_args: the search.
        running: receives the running trial under `"trial"`, for the sweep's callbacks.
    """
    optuna = import_optuna()

    def objective(trial: optuna.Trial) -> float:
        running["trial"] = trial
        with storage.heartbeat(trial):
            claim_trial(trial, sweep_args.n_trials)
            checkpoint = resume_checkpoint(trial, trainer.args.output_dir)
            resumed = (
                None if checkpoint is None else os.path.relpath(checkpoint, trainer.args.output_dir)
            )
            trial.set_user_attr(RESUMED_FROM_ATTR, resumed)
            try:
                value = train_trial(trainer, trial, checkpoint)
            except optuna.TrialPruned:
                raise
            except KeyboardInterrupt:
                trial.set_user_attr(INTERRUPTED_ATTR, True)
                raise
            except Exception as error:
                trial.set_user_attr(ERROR_ATTR, f"{type(error).__name__}: {error}"[:500])
                raise
            if value is None or not math.isfinite(value):
                trial.set_user_attr(ERROR_ATTR, f"the objective's value is {value}")
            return value

    return objective


def train_trial(trainer: Any, trial: optuna.Trial, checkpoint: str | None) -> float:
    """What `run_hp_search_optuna`'s objective does in one process, resuming from `checkpoint`.

    Args:
        trainer: the sweep's trainer.
        trial: the running trial.
        checkpoint: the checkpoint folder to resume from, or None.

    Returns:
        The objective's value: at the last evaluation, or from an evaluation after training.
    """
    from accelerate.utils.memory import release_memory

    trainer.objective = None
    trainer.train(resume_from_checkpoint=checkpoint, trial=trial)
    if getattr(trainer, "objective", None) is None:  # no evaluation during training
        trainer.objective = trainer.compute_objective(trainer.evaluate())
    trainer.model_wrapped, trainer.model = release_memory(trainer.model_wrapped, trainer.model)
    trainer.accelerator.clear()
    return trainer.objective


def resume_checkpoint(trial: optuna.Trial, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint a re-run resumes from: the last complete one in its chain's folder, if the
    Trainer wrote it for the same parameters (its `trainer_state.json`'s `trial_params`).

    A trial of its own never resumes; nor does a re-run whose folder holds another study's
    checkpoints.

    Args:
        trial: the trial starting (its parameters are those of the dead trial it re-runs).
        output_dir: the sweep's output folder.
    """
    from abkd_trainer.core.checkpoints import TRAINER_STATE_NAME, latest_complete_checkpoint

    frozen = frozen_trial(trial)
    if not retry_history(frozen):
        return None
    checkpoint = latest_complete_checkpoint(os.path.join(output_dir, run_name(frozen)))
    if checkpoint is None:
        return None
    with open(os.path.join(checkpoint, TRAINER_STATE_NAME)) as handle:
        written_for = json.load(handle).get("trial_params")
    return checkpoint if written_for == frozen.params else None


def run_one_trial(
    study: optuna.Study,
    storage: SweepStorage,
    objective: Callable[[Any], float],
    running: dict[str, Any],
) -> None:
    """One trial through `Study.optimize` (which records a database's heartbeats).

    A trial stopped by Ctrl-C is queued again with its parameters (the next worker resumes it
    from its checkpoint) before the `KeyboardInterrupt` propagates; an error propagates.

    Args:
        study: the shared study.
        storage: the study's storage.
        objective: from `make_trial_objective`.
        running: holds the running trial under `"trial"`.
    """
    running["trial"] = None
    try:
        study.optimize(objective, n_trials=1)
    except KeyboardInterrupt:
        trial = running["trial"]
        if trial is not None:
            storage.queue_again(study, frozen_trial(trial))
        raise
    finally:
        running["trial"] = None
