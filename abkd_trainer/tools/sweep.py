"""``abkd-sweep``: choose (alpha, beta) (and optionally learning rate and temperature) with Optuna.

Every trial is a short distillation from the same student initialisation (``set_seed(seed)``
before the student is built) with the same data order; the teacher is loaded once. The sampler
is Optuna's TPE (``--sampler grid`` walks a grid), and Optuna's median pruner stops trials whose
intermediate evaluations fall below the median of earlier trials at the same step (never at the
final evaluation: a finished trial keeps its result). The objective is any metric of
``Trainer.evaluate``; by default

* ``eval_rouge_l`` (maximised), the ROUGE-L of sampled responses on the test split, when the
  test split has prompts and references (``prompt``/``completion`` or ``messages``);
* otherwise ``eval_reference_kl`` (minimised): forward KL(teacher || student) on the evaluation
  split's supervised tokens. The training loss ``eval_kd_loss`` is *not* comparable across trials
  (each trial measures its own divergence), so a fixed reference divergence is used instead.

Flags and ``--config`` YAML files are those of ``abkd-train`` plus :class:`SweepArguments`; with no
model and dataset the demo is swept. Outputs in ``--output_dir``: ``trials.csv``,
``heatmap.png`` (the objective over the (alpha, beta) plane) and ``best.yaml``, which
``abkd-train --config best.yaml`` runs as is.

Scale-out: with ``--storage URL`` (an Optuna RDB URL: ``sqlite:///sweep.db`` for the workers of
one machine, ``postgresql://...`` or ``mysql://...`` for many) every ``abkd-sweep`` started with the
same ``--storage`` and ``--study_name`` joins one study; together they run ``--n_trials``
trials. Each worker writes the outputs of the whole study when it stops.

**How this uses ``Trainer.hyperparameter_search``.** The trials run through transformers' Optuna
integration (``run_hp_search_optuna``): the trainer is built once with its teacher, a
``model_init`` rebuilds the student for every trial, ``hp_space`` suggests the parameters, which
the Trainer writes into ``args``, and the Trainer reports every evaluation to the trial and
raises ``TrialPruned`` when the pruner says so. Storage, study name, sampler and pruner go to
``optuna.create_study`` through the ``**kwargs`` of ``hyperparameter_search``. Three things are
glue around it, each because the integration has no hook for it:

* the trial budget shared by several workers: ``study.optimize`` gets no callbacks (so no
  ``MaxTrialsCallback``), so each worker calls ``hyperparameter_search(n_trials=1)`` until the
  study holds ``n_trials`` trials; a trial that another worker's trial pushed over the budget in
  the moment between that check and its creation is pruned at once and marked ``over_budget``
  (left out of every output), so no trial runs beyond the budget;
* the study is created here first (so that its first worker, alone, enqueues the reference
  points: forward KL, reverse KL and the paper's settings) and read back for the outputs, since
  ``hyperparameter_search`` returns only the best run;
* ``SweepMetricsCallback`` adds ``eval_reference_kl`` to the metrics of every evaluation
  (``on_evaluate`` receives the dict that the Trainer then reports; ``RougeLCallback`` adds
  ``eval_rouge_l`` the same way).
"""

from __future__ import annotations

import argparse
import csv
import enum
import functools
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

if TYPE_CHECKING:
    import optuna
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from abkd_trainer.lm.config import ABKDConfig
    from abkd_trainer.lm.trainer import ABKDTrainer

# (alpha, beta) points marked on the heat map and, by default, tried first.
REFERENCE_POINTS: dict[str, tuple[float, float]] = {
    "forward KL": (1.0, 0.0),
    "reverse KL": (0.0, 1.0),
    "paper GPT-2": (0.2, 0.7),
    "paper OpenLLaMA": (0.1, 0.8),
    "paper vision": (0.8, 0.3),
}
ROUGE_L_METRIC = "eval_rouge_l"
REFERENCE_KL_METRIC = "eval_reference_kl"
# Metrics that are better when larger; every other metric is minimised unless --direction says.
_MAXIMISED_METRICS = ("rouge", "agreement", "accuracy", "bleu", "f1")
_OVER_BUDGET_ATTR = "over_budget"
_MAX_STEPS_ATTR = "max_steps"

# Defaults that differ from abkd-train's in every sweep: intermediate evaluations for the pruner,
# no checkpoints (a trial's model is thrown away).
SWEEP_DEFAULTS: dict[str, Any] = {
    "eval_strategy": "steps",
    "eval_steps": 0.25,
    "save_strategy": "no",
}
# The demo sweep: the demo's settings (abkd_trainer.lm.demo.DEMO_DEFAULTS) with 12 shorter trials,
# 300 steps of 32 sequences (the demo trains 1000 of 64), and three evaluations each. Sized for
# two CPU cores shared with other jobs (load average ~9): 65-110 s per trial, at most 20 minutes
# in all.
SWEEP_DEMO_DEFAULTS: dict[str, Any] = {
    "output_dir": "abkd-sweep-output",
    "n_trials": 12,
    "max_steps": 300,
    "per_device_train_batch_size": 32,
    "eval_steps": 100,
    "logging_steps": 100,
    "rouge_l_eval": False,  # the sweep computes ROUGE-L as its objective itself
    "disable_tqdm": True,
}


@dataclass
class SweepArguments:
    """The arguments ``abkd-sweep`` adds to those of ``abkd-train``."""

    n_trials: int = field(
        default=16,
        metadata={
            "help": "Trials of the study in total, shared by all workers of one --storage study "
            "(the demo sweep defaults to 12)."
        },
    )
    storage: str | None = field(
        default=None,
        metadata={
            "help": "Optuna RDB storage URL (e.g. sqlite:///sweep.db, postgresql://host/db). "
            "Workers started with the same --storage and --study_name share one study. None: "
            "in memory, one worker."
        },
    )
    study_name: str = field(default="abkd-sweep", metadata={"help": "Name of the Optuna study."})
    sampler: str = field(
        default="tpe",
        metadata={"help": "'tpe' (Optuna's TPESampler) or 'grid' (--grid_alpha x --grid_beta)."},
    )
    alpha_range: list[float] = field(
        default_factory=lambda: [0.0, 1.0],
        metadata={"help": "Low and high alpha of the TPE search."},
    )
    beta_range: list[float] = field(
        default_factory=lambda: [0.0, 1.0],
        metadata={"help": "Low and high beta of the TPE search."},
    )
    grid_alpha: list[float] = field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
        metadata={"help": "Alpha values of --sampler grid."},
    )
    grid_beta: list[float] = field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
        metadata={"help": "Beta values of --sampler grid."},
    )
    learning_rate_range: list[float] | None = field(
        default=None,
        metadata={"help": "If set (low high), also search the learning rate, log-uniformly."},
    )
    temperature_range: list[float] | None = field(
        default=None,
        metadata={"help": "If set (low high), also search the divergence temperature."},
    )
    objective_metric: str | None = field(
        default=None,
        metadata={
            "help": "Metric of Trainer.evaluate to optimise, e.g. eval_rouge_l, "
            "eval_reference_kl, eval_loss, eval_teacher_agreement. None: eval_rouge_l when the "
            "test split has prompts and references, else eval_reference_kl (forward KL to the "
            "teacher, the same divergence for every trial)."
        },
    )
    direction: str | None = field(
        default=None,
        metadata={"help": "'maximize' or 'minimize'; None infers it from the metric's name."},
    )
    enqueue_reference_points: bool = field(
        default=True,
        metadata={
            "help": "Start a new TPE study with forward KL (1, 0), reverse KL (0, 1) and the "
            "paper's (0.2, 0.7), (0.1, 0.8), (0.8, 0.3) (those inside the search ranges)."
        },
    )
    pruner_startup_trials: int = field(
        default=3,
        metadata={"help": "MedianPruner: trials that are never pruned before pruning starts."},
    )
    pruner_warmup_steps: int = field(
        default=0,
        metadata={"help": "MedianPruner: training steps of a trial before it may be pruned."},
    )
    no_pruning: bool = field(default=False, metadata={"help": "Run every trial to the end."})
    heldout_fraction: float = field(
        default=0.05,
        metadata={
            "help": "When the dataset has no test split, this fraction of the training rows "
            "(at most 1000) is held out for evaluation."
        },
    )

    def __post_init__(self) -> None:
        if self.n_trials < 1:
            raise ValueError(f"`n_trials` must be >= 1, got {self.n_trials}.")
        if self.sampler not in ("tpe", "grid"):
            raise ValueError(f"`sampler` must be 'tpe' or 'grid', got {self.sampler!r}.")
        if self.direction not in (None, "maximize", "minimize"):
            raise ValueError(
                f"`direction` must be 'maximize' or 'minimize', got {self.direction!r}."
            )
        for name in ("alpha_range", "beta_range", "learning_rate_range", "temperature_range"):
            bounds = getattr(self, name)
            if bounds is not None and (len(bounds) != 2 or not bounds[0] < bounds[1]):
                raise ValueError(f"`{name}` must be two numbers, low < high, got {bounds}.")
        for name in ("learning_rate_range", "temperature_range"):
            bounds = getattr(self, name)
            if bounds is not None and bounds[0] <= 0:
                raise ValueError(f"`{name}` must be positive, got {bounds}.")
        if self.sampler == "grid" and (not self.grid_alpha or not self.grid_beta):
            raise ValueError("`grid_alpha` and `grid_beta` need at least one value each.")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"`heldout_fraction` must be in (0, 1), got {self.heldout_fraction}.")


def _import_optuna():
    try:
        import optuna
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "abkd-sweep needs Optuna: pip install 'abkd-trainer[sweep]' (or `pip install optuna`)."
        ) from error
    return optuna


def infer_direction(metric: str) -> str:
    """``"maximize"`` for ROUGE-like and agreement metrics, ``"minimize"`` for losses."""
    return "maximize" if any(key in metric for key in _MAXIMISED_METRICS) else "minimize"


# ----------------------------------------------------------------------------- evaluation


def reference_kl(trainer: ABKDTrainer) -> float:
    """Forward KL(teacher || student) per supervised token of the evaluation split, in nats.

    The same divergence for every trial, whatever (alpha, beta) the trial trains with.
    """
    import torch

    from abkd_trainer.divergences import forward_kl
    from abkd_trainer.lm.batches import IGNORE_INDEX, next_token_targets

    model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
    was_training = model.training
    model.eval()
    vocab_size = trainer.vocab_size
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in trainer.get_eval_dataloader():
            batch = trainer._prepare_inputs(batch)
            mask = next_token_targets(batch).ne(IGNORE_INDEX)
            inputs = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels")}
            student_logits = model(**inputs, use_cache=False).logits[..., :vocab_size]
            teacher_logits = trainer.teacher_model(**inputs, use_cache=False).logits
            kl = forward_kl(student_logits, teacher_logits[..., :vocab_size], mask=mask)
            total += float(kl) * int(mask.sum())
            count += int(mask.sum())
    model.train(was_training)
    return total / max(count, 1)


class SweepMetricsCallback(TrainerCallback):
    """Adds ``eval_reference_kl`` to every evaluation's metrics and records them on the trial.

    It also records the trial's number of training steps (for :func:`spare_final_evaluation`).

    ``Trainer.evaluate`` hands its metrics dict to ``on_evaluate`` and then reports that same
    dict to the hyperparameter search (``Trainer._report_to_hp_search``), so a value added here
    reaches the trial and its pruner (``RougeLCallback`` adds ``eval_rouge_l`` the same way; add
    it first). Every numeric metric is stored on the running trial as a user attribute, for
    ``trials.csv``.

    Args:
        trainer: the sweep's trainer.
        current_trial: returns the running Optuna trial (or None).
    """

    def __init__(self, trainer: ABKDTrainer, current_trial: Callable[[], Any]) -> None:
        self.trainer = trainer
        self.current_trial = current_trial

    def on_train_begin(self, args, state, control, **kwargs):
        trial = self.current_trial()
        if trial is not None:  # for spare_final_evaluation
            trial.set_user_attr(_MAX_STEPS_ATTR, state.max_steps)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = reference_kl(self.trainer)
        if metrics is not None:
            metrics[REFERENCE_KL_METRIC] = value
        self.trainer.log({REFERENCE_KL_METRIC: value})
        trial = self.current_trial()
        if trial is not None:
            for name, metric in {**(metrics or {}), REFERENCE_KL_METRIC: value}.items():
                if isinstance(metric, (int, float)):
                    trial.set_user_attr(name, float(metric))


# ----------------------------------------------------------------------------- the study


def _search_space(sweep_args: SweepArguments) -> dict[str, tuple[float, float, bool]]:
    """name -> (low, high, log scale) of every searched ``ABKDConfig`` field."""
    space = {
        "alpha": (*sweep_args.alpha_range, False),
        "beta": (*sweep_args.beta_range, False),
    }
    if sweep_args.learning_rate_range is not None:
        space["learning_rate"] = (*sweep_args.learning_rate_range, True)
    if sweep_args.temperature_range is not None:
        space["temperature"] = (*sweep_args.temperature_range, False)
    return space


def _grid(sweep_args: SweepArguments) -> dict[str, list[float]]:
    grid = {"alpha": list(sweep_args.grid_alpha), "beta": list(sweep_args.grid_beta)}
    if sweep_args.learning_rate_range is not None:
        grid["learning_rate"] = list(sweep_args.learning_rate_range)
    if sweep_args.temperature_range is not None:
        grid["temperature"] = list(sweep_args.temperature_range)
    return grid


def make_sampler(sweep_args: SweepArguments, seed: int) -> optuna.samplers.BaseSampler:
    optuna = _import_optuna()
    if sweep_args.sampler == "grid":
        return optuna.samplers.GridSampler(_grid(sweep_args), seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(sweep_args: SweepArguments) -> optuna.pruners.BasePruner:
    optuna = _import_optuna()
    if sweep_args.no_pruning:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=sweep_args.pruner_startup_trials,
        n_warmup_steps=sweep_args.pruner_warmup_steps,
    )


def spare_final_evaluation(pruner: optuna.pruners.BasePruner) -> optuna.pruners.BasePruner:
    """``pruner``, except at a trial's last training step.

    The Trainer reports the final evaluation too, and a plain median pruner would discard a
    trial that has already finished (its value lost, though its cost was paid). The last step
    is the trial's user attribute ``max_steps``, set by :class:`SweepMetricsCallback`.
    """
    optuna = _import_optuna()

    class SpareFinalEvaluation(optuna.pruners.BasePruner):
        def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
            max_steps = trial.user_attrs.get(_MAX_STEPS_ATTR)
            if max_steps is not None and (trial.last_step or 0) >= max_steps:
                return False
            return pruner.prune(study, trial)

    return SpareFinalEvaluation()


def make_hp_space(
    sweep_args: SweepArguments, on_trial: Callable[[Any], None]
) -> Callable[[Any], dict[str, float]]:
    """The ``hp_space`` of ``Trainer.hyperparameter_search``: suggests the searched fields.

    ``on_trial(trial)`` is called first; it may raise ``optuna.TrialPruned`` to skip the trial.
    """
    space = _search_space(sweep_args)
    grid = _grid(sweep_args) if sweep_args.sampler == "grid" else None

    def hp_space(trial: optuna.Trial) -> dict[str, float]:
        on_trial(trial)
        if grid is not None:  # GridSampler picks from its grid; the bounds only need to hold it
            return {
                name: trial.suggest_float(name, min(values), max(values))
                for name, values in grid.items()
            }
        return {
            name: trial.suggest_float(name, low, high, log=log)
            for name, (low, high, log) in space.items()
        }

    return hp_space


def _reference_points_in_space(sweep_args: SweepArguments) -> list[dict[str, float]]:
    return [
        {"alpha": alpha, "beta": beta}
        for alpha, beta in REFERENCE_POINTS.values()
        if sweep_args.alpha_range[0] <= alpha <= sweep_args.alpha_range[1]
        and sweep_args.beta_range[0] <= beta <= sweep_args.beta_range[1]
    ]


def open_storage(url: str | None, attempts: int = 5) -> optuna.storages.BaseStorage:
    """The study storage: in memory for ``None``, else an RDB storage for ``url``.

    Workers that start together on a new database race to create its tables (one of them gets
    an ``IntegrityError``), so opening is retried. SQLite waits up to a minute for a lock instead
    of failing with "database is locked" while another worker writes.
    """
    optuna = _import_optuna()
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

    Returns:
        ``(study, storage)``: the storage object that ``hyperparameter_search`` must be given to
        find the same study.
    """
    optuna = _import_optuna()
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
        for params in _reference_points_in_space(sweep_args)[: sweep_args.n_trials]:
            study.enqueue_trial(params, user_attrs={"reference_point": True})
    return study, storage


def counted_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that use the budget: started ones, except those skipped as over budget."""
    optuna = _import_optuna()
    return [
        trial
        for trial in study.get_trials(deepcopy=False)
        if trial.state != optuna.trial.TrialState.WAITING
        and not trial.user_attrs.get(_OVER_BUDGET_ATTR)
    ]


def claim_trial(trial: optuna.Trial, n_trials: int) -> None:
    """Record the worker on ``trial``; skip it if ``n_trials`` earlier trials hold the budget.

    Trial numbers are assigned atomically by the storage, so "the trials numbered below this
    one, skips excluded" is the same list for every worker: exactly the first ``n_trials`` run.

    Raises:
        optuna.TrialPruned: over budget; the trial is marked ``over_budget`` (outputs skip it).
    """
    optuna = _import_optuna()
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    earlier = [
        other
        for other in trial.study.get_trials(deepcopy=False)
        if other.number < trial.number and not other.user_attrs.get(_OVER_BUDGET_ATTR)
    ]
    if len(earlier) >= n_trials:
        trial.set_user_attr(_OVER_BUDGET_ATTR, True)
        raise optuna.TrialPruned(f"the study's {n_trials} trials are taken by other workers")


# ----------------------------------------------------------------------------- running it


@dataclass
class SweepResult:
    """What :func:`run_sweep` found: the study, the objective and the files it wrote."""

    study: Any
    metric: str
    direction: str
    best_params: dict[str, float] | None
    best_value: float | None
    files: list[Path]


def make_model_init(
    student: str | Callable[[], PreTrainedModel],
    args: ABKDConfig,
    peft_config: Any = None,
) -> Callable[[], PreTrainedModel]:
    """A ``model_init`` that rebuilds the student as ``SFTTrainer`` would for a new trial.

    ``student`` is a name/path (loaded with ``args.model_init_kwargs``, as ``SFTTrainer`` does)
    or a zero-argument factory. The Trainer seeds every trial (``set_seed(args.seed)``) before
    calling it, so every trial starts from the same weights. LoRA adapters from ``peft_config``
    are added again and dropout is disabled (``args.disable_dropout``), as ``ABKDTrainer`` does
    for the model it is constructed with.
    """

    def model_init() -> PreTrainedModel:
        from trl.trainer.utils import create_model_from_path, disable_dropout_in_model

        if isinstance(student, str):
            kwargs = dict(args.model_init_kwargs or {})
            kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            model = create_model_from_path(student, **kwargs)
        else:
            model = student()
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if args.disable_dropout:
            disable_dropout_in_model(model)
        return model

    return model_init


def _check_single_process(args: ABKDConfig) -> None:
    if args.deepspeed is not None or args.world_size > 1:
        raise ValueError(
            "abkd-sweep runs each trial in one process (no DeepSpeed, no multi-process "
            "launchers). To use several devices or machines, start one abkd-sweep worker per "
            "device with the same --storage and --study_name."
        )


def run_sweep(
    student: str | Callable[[], PreTrainedModel],
    teacher_model: str | PreTrainedModel | None,
    args: ABKDConfig,
    sweep_args: SweepArguments,
    train_dataset: Dataset,
    eval_dataset: Dataset,
    processing_class: PreTrainedTokenizerBase,
    *,
    peft_config: Any = None,
    rouge_prompts: Sequence[Any] | None = None,
    rouge_references: Sequence[Any] | None = None,
    rouge_kwargs: dict[str, Any] | None = None,
    best_config: dict[str, Any] | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> SweepResult:
    """Search (alpha, beta) and friends; write ``trials.csv``, ``heatmap.png``, ``best.yaml``.

    Args:
        student: the student's name/path or a zero-argument factory (see :func:`make_model_init`).
        teacher_model: the teacher (an instance or a name, loaded once); None uses
            ``args.teacher_model_name_or_path``.
        args: the training arguments of every trial; the searched fields are overwritten per
            trial. ``eval_strategy``/``eval_steps`` set the intermediate evaluations the pruner
            sees; ``args.output_dir`` receives the outputs.
        sweep_args: the search (see :class:`SweepArguments`).
        train_dataset, eval_dataset, processing_class: as for ``ABKDTrainer``.
        peft_config: LoRA configuration of the student, re-applied per trial.
        rouge_prompts, rouge_references: test prompts and references; when given, every
            evaluation also scores ``eval_rouge_l`` (the default objective).
        rouge_kwargs: keyword arguments of ``RougeLCallback`` (``seeds``, ``max_new_tokens``,
            ``batch_size``).
        best_config: the ``abkd-train`` settings the sweep ran with (flag -> value); ``best.yaml``
            is this mapping with the best trial's parameters.
        sampler, pruner: Optuna objects replacing the ones ``sweep_args`` describes.
    """
    from abkd_trainer.lm.evaluation import RougeLCallback
    from abkd_trainer.lm.trainer import ABKDTrainer

    _import_optuna()
    _check_single_process(args)
    metric, direction = choose_objective(sweep_args, has_rouge_prompts=bool(rouge_prompts))
    model_init = make_model_init(student, args, peft_config)
    trainer = ABKDTrainer(
        model=model_init(),
        teacher_model=teacher_model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
    )
    trainer.model_init = model_init  # read by Trainer.train(trial=...) to rebuild the student

    sampler = sampler or make_sampler(sweep_args, seed=args.seed)
    pruner = spare_final_evaluation(pruner or make_pruner(sweep_args))
    study, storage = create_or_load_study(sweep_args, direction, sampler=sampler, pruner=pruner)
    running: dict[str, Any] = {"trial": None}
    if rouge_prompts:
        trainer.add_callback(
            RougeLCallback(trainer, rouge_prompts, rouge_references, **(rouge_kwargs or {}))
        )
    trainer.add_callback(SweepMetricsCallback(trainer, current_trial=lambda: running["trial"]))
    print(
        f"abkd-sweep: objective {metric} ({direction}), {sweep_args.n_trials} trials in study "
        f"{sweep_args.study_name!r}."
    )
    search_kwargs = {
        "compute_objective": functools.partial(_objective_value, metric),
        "direction": direction,
        "study_name": sweep_args.study_name,
        "storage": storage,
        "sampler": sampler,
        "pruner": pruner,
    }
    while len(counted_trials(study)) < sweep_args.n_trials:
        _run_one_trial(trainer, study, sweep_args, running, search_kwargs)
        if sweep_args.sampler == "grid" and _grid_exhausted(study, sweep_args):
            break
    running["trial"] = None

    files = write_sweep_outputs(study, sweep_args, metric, direction, args.output_dir, best_config)
    best = _best_trial(study)
    return SweepResult(
        study=study,
        metric=metric,
        direction=direction,
        best_params=dict(best.params) if best else None,
        best_value=best.value if best else None,
        files=files,
    )


def choose_objective(sweep_args: SweepArguments, has_rouge_prompts: bool) -> tuple[str, str]:
    """``(metric, direction)``: ``--objective_metric`` or the default described above."""
    metric = sweep_args.objective_metric or (
        ROUGE_L_METRIC if has_rouge_prompts else REFERENCE_KL_METRIC
    )
    if metric == ROUGE_L_METRIC and not has_rouge_prompts:
        raise ValueError(
            "The objective eval_rouge_l needs test prompts and references (a test split with "
            "prompt/completion or messages columns); choose another --objective_metric."
        )
    return metric, sweep_args.direction or infer_direction(metric)


def _objective_value(metric: str, metrics: dict[str, float]) -> float:
    if metric not in metrics:
        raise KeyError(
            f"The objective {metric!r} is not among the evaluation metrics {sorted(metrics)}; "
            "choose one of them with --objective_metric."
        )
    return metrics[metric]


def _run_one_trial(
    trainer: ABKDTrainer,
    study: optuna.Study,
    sweep_args: SweepArguments,
    running: dict[str, Any],
    search_kwargs: dict[str, Any],
) -> None:
    """One trial through ``Trainer.hyperparameter_search``; ``running["trial"]`` is set to it."""
    optuna = _import_optuna()

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


def _grid_exhausted(study: optuna.Study, sweep_args: SweepArguments) -> bool:
    """GridSampler stops its study once every grid point has a trial; so does this loop."""
    return len(counted_trials(study)) >= math.prod(len(v) for v in _grid(sweep_args).values())


def _best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:  # no completed trial
        return None


# ----------------------------------------------------------------------------- outputs


def trial_rows(study: optuna.Study, metric: str, direction: str) -> list[dict[str, Any]]:
    """One row per trial of the study (over-budget skips left out), for ``trials.csv``."""
    rows = []
    param_names = sorted({name for trial in study.trials for name in trial.params})
    for trial in study.get_trials(deepcopy=False):
        if trial.user_attrs.get(_OVER_BUDGET_ATTR) or trial.state.name == "WAITING":
            continue
        seconds = None
        if trial.datetime_start is not None and trial.datetime_complete is not None:
            seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
        last_step, last_value = None, None
        if trial.intermediate_values:
            last_step = max(trial.intermediate_values)
            last_value = trial.intermediate_values[last_step]
        rows.append(
            {
                "number": trial.number,
                **{name: trial.params.get(name) for name in param_names},
                "value": trial.value,
                "state": trial.state.name,
                "seconds": None if seconds is None else round(seconds, 2),
                "metric": metric,
                "direction": direction,
                "last_reported_step": last_step,
                "last_reported_value": last_value,
                ROUGE_L_METRIC: trial.user_attrs.get(ROUGE_L_METRIC),
                REFERENCE_KL_METRIC: trial.user_attrs.get(REFERENCE_KL_METRIC),
                "reference_point": bool(trial.user_attrs.get("reference_point", False)),
                "worker": trial.user_attrs.get("worker"),
            }
        )
    return rows


def write_trials_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    columns = list(dict.fromkeys(key for row in rows for key in row)) or ["number"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _draw_completed_trials(
    figure: Any, axis: Any, complete: list[dict[str, Any]], metric: str, direction: str
) -> None:
    """Interpolated surface, coloured points with their values, colour bar, best trial."""
    from matplotlib.tri import Triangulation

    cmap = "viridis" if direction == "maximize" else "viridis_r"
    alphas = [row["alpha"] for row in complete]
    betas = [row["beta"] for row in complete]
    values = [row["value"] for row in complete]
    if len(complete) >= 3:
        try:
            surface = axis.tricontourf(
                Triangulation(alphas, betas), values, levels=14, cmap=cmap, alpha=0.85
            )
        except (ValueError, RuntimeError):  # all points on one line: no triangulation
            surface = None
    else:
        surface = None
    points = axis.scatter(alphas, betas, c=values, cmap=cmap, edgecolors="black", s=55, zorder=3)
    for alpha, beta, value in zip(alphas, betas, values, strict=True):
        axis.annotate(
            f"{value:.3g}",
            (alpha, beta),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=7,
            zorder=6,
        )
    colorbar = figure.colorbar(surface or points, ax=axis)
    colorbar.set_label(f"{metric} ({'higher' if direction == 'maximize' else 'lower'} is better)")
    best = (max if direction == "maximize" else min)(complete, key=lambda row: row["value"])
    axis.scatter(
        [best["alpha"]],
        [best["beta"]],
        marker="*",
        s=380,
        color="gold",
        edgecolors="black",
        zorder=5,
        label=f"best ({best['alpha']:.2f}, {best['beta']:.2f}): {best['value']:.4g}",
    )


def draw_heatmap(
    rows: list[dict[str, Any]], metric: str, direction: str, path: Path, title: str = ""
) -> Path:
    """The objective over the (alpha, beta) plane, reference points and the best trial marked.

    Completed trials are coloured by their final value and, with three or more not on one line,
    interpolated linearly over their triangulation; pruned trials are grey crosses with their
    last reported value and its step (not comparable with final values).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    complete = [row for row in rows if row["state"] == "COMPLETE" and row["value"] is not None]
    pruned = [row for row in rows if row["state"] == "PRUNED"]
    figure, axis = plt.subplots(figsize=(10, 6))
    if complete:
        _draw_completed_trials(figure, axis, complete, metric, direction)
    if pruned:
        axis.scatter(
            [row["alpha"] for row in pruned],
            [row["beta"] for row in pruned],
            marker="x",
            color="grey",
            s=45,
            zorder=4,
            label="pruned (last value @ step)",
        )
        for row in pruned:
            if row["last_reported_value"] is not None:
                axis.annotate(
                    f"{row['last_reported_value']:.3g}@{row['last_reported_step']}",
                    (row["alpha"], row["beta"]),
                    textcoords="offset points",
                    xytext=(5, -9),
                    fontsize=6,
                    color="grey",
                )
    for index, (name, (alpha, beta)) in enumerate(REFERENCE_POINTS.items()):
        axis.scatter(
            [alpha],
            [beta],
            marker="s",
            s=110,
            facecolors="none",
            edgecolors=f"C{index + 1}",
            linewidths=2,
            zorder=4,
            label=f"{name} ({alpha:g}, {beta:g})",
        )
    every_alpha = [row["alpha"] for row in rows] + [a for a, _ in REFERENCE_POINTS.values()]
    every_beta = [row["beta"] for row in rows] + [b for _, b in REFERENCE_POINTS.values()]
    axis.set_xlim(min(every_alpha) - 0.05, max(every_alpha) + 0.05)
    axis.set_ylim(min(every_beta) - 0.05, max(every_beta) + 0.05)
    axis.set_xlabel("alpha (hardness-concentration)")
    axis.set_ylabel("beta (confidence-concentration)")
    axis.set_title(title or f"abkd-sweep: {metric} over (alpha, beta), {len(rows)} trials")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.25, 1.0), framealpha=0.9)
    axis.grid(alpha=0.25)
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def write_best_yaml(
    best: optuna.trial.FrozenTrial,
    base_config: dict[str, Any],
    metric: str,
    direction: str,
    path: Path,
) -> Path:
    """``base_config`` with the best trial's parameters, as an ``abkd-train --config`` file."""
    import yaml

    config = {**base_config, **best.params}
    header = (
        f"# abkd-sweep best trial {best.number}: {metric} = {best.value:.6g} ({direction}).\n"
        "# Run it with: abkd-train --config best.yaml (the trial's training length is kept;\n"
        "# raise max_steps / num_train_epochs for the full run).\n"
    )
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return path


def write_sweep_outputs(
    study: optuna.Study,
    sweep_args: SweepArguments,
    metric: str,
    direction: str,
    output_dir: str | os.PathLike,
    best_config: dict[str, Any] | None,
) -> list[Path]:
    """``trials.csv``, ``heatmap.png`` and (once a trial completed) ``best.yaml``."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study, metric, direction)
    files = [write_trials_csv(rows, output_dir / "trials.csv")]
    files.append(draw_heatmap(rows, metric, direction, output_dir / "heatmap.png"))
    best = _best_trial(study)
    if best is not None:
        # Not the sweep's own directory: the run would mix its files with the sweep's.
        base = {**(best_config or {}), "output_dir": str(output_dir / "best-run")}
        files.append(write_best_yaml(best, base, metric, direction, output_dir / "best.yaml"))
    return files


# ----------------------------------------------------------------------------- command line


def make_sweep_parser() -> Any:
    """The ``abkd-train`` parser with :class:`SweepArguments` added."""
    from abkd_trainer.cli.train import make_parser

    return make_parser(
        prog="abkd-sweep",
        extra_dataclass_types=(SweepArguments,),
        description=__doc__.split("\n\n")[0],
    )


def parse_sweep_args(argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    """``(script, training, model, mixture, sweep, is_demo)`` from ``argv`` and ``--config``."""
    from abkd_trainer.cli.train import parse_args
    from abkd_trainer.lm.demo import DEMO_DEFAULTS

    return parse_args(
        argv,
        parser=make_sweep_parser(),
        defaults=SWEEP_DEFAULTS,
        demo_defaults={**DEMO_DEFAULTS, **SWEEP_DEMO_DEFAULTS},
    )


def _yaml_value(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_yaml_value(item) for item in value]
    return value


def explicit_train_arguments(argv: Sequence[str], demo: bool) -> dict[str, Any]:
    """The ``abkd-train`` settings given in ``--config`` and on the command line (no defaults).

    The sweep's own flags are left out; for the demo, the trial's length and batch size are
    added, since the demo sweep's trials are shorter than the demo.
    """
    import yaml

    argv = list(argv)
    config: dict[str, Any] = {}
    if "--config" in argv:
        index = argv.index("--config")
        with open(argv[index + 1]) as handle:
            config = yaml.safe_load(handle) or {}
        del argv[index : index + 2]
    parser = make_sweep_parser()
    for action in parser._actions:  # only what the user typed ends up in the namespace
        action.default = argparse.SUPPRESS
    given, _ = parser.parse_known_args(argv)
    config.update(vars(given))
    sweep_only = {f.name for f in fields(SweepArguments)}
    explicit = {key: _yaml_value(value) for key, value in config.items() if key not in sweep_only}
    if demo:
        for key in ("max_steps", "per_device_train_batch_size"):
            explicit.setdefault(key, SWEEP_DEMO_DEFAULTS[key])
    return explicit


def _sweep_data(
    script_args: Any, mixture_args: Any, sweep_args: SweepArguments, seed: int, demo: bool
) -> tuple[Dataset, Dataset, bool]:
    """Training and evaluation splits; the latter held out from training when there is none."""
    from abkd_trainer.cli.train import load_datasets

    if demo:
        from abkd_trainer.lm.demo import load_demo_dataset

        datasets = load_demo_dataset()
    else:
        datasets = load_datasets(script_args, mixture_args)
    train = datasets[script_args.dataset_train_split]
    if script_args.dataset_test_split in datasets:
        return train, datasets[script_args.dataset_test_split], True
    size = min(1000, max(1, int(len(train) * sweep_args.heldout_fraction)))
    split = train.train_test_split(test_size=size, seed=seed)
    print(
        f"abkd-sweep: no {script_args.dataset_test_split!r} split; holding out {size} training "
        "rows for evaluation."
    )
    return split["train"], split["test"], False


def _rouge_rows(eval_dataset: Dataset, script_args: Any) -> tuple[list, list] | None:
    from abkd_trainer.lm.evaluation import prompts_and_references

    if not {"prompt", "completion"} <= set(eval_dataset.column_names) and (
        "messages" not in eval_dataset.column_names
    ):
        return None
    rows = eval_dataset
    if script_args.rouge_l_num_prompts is not None:
        rows = rows.select(range(min(script_args.rouge_l_num_prompts, len(rows))))
    return prompts_and_references(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of ``abkd-sweep`` and ``python -m abkd_trainer.tools.sweep``."""
    from transformers import AutoConfig, AutoTokenizer
    from trl import get_peft_config

    from abkd_trainer.cli.train import set_model_init_kwargs

    argv = list(sys.argv[1:] if argv is None else argv)
    _import_optuna()
    script_args, training_args, model_args, mixture_args, sweep_args, demo = parse_sweep_args(argv)
    if demo:
        from abkd_trainer.lm.demo import (
            build_demo_student,
            limit_cpu_threads_for_demo,
            require_demo_assets,
        )

        require_demo_assets()
        limit_cpu_threads_for_demo()
        teacher_path = training_args.teacher_model_name_or_path
        tokenizer = AutoTokenizer.from_pretrained(teacher_path)
        teacher_config = AutoConfig.from_pretrained(teacher_path)
        student = lambda: build_demo_student(teacher_config, seed=training_args.seed)  # noqa: E731
        print(
            "abkd-sweep: no model or dataset given, sweeping the offline demo "
            f"(output in {os.path.abspath(training_args.output_dir)})."
        )
    else:
        # As abkd-train does: the model flags become SFTTrainer's model_init_kwargs.
        set_model_init_kwargs(model_args, training_args)
        student = model_args.model_name_or_path
        tokenizer = AutoTokenizer.from_pretrained(
            student,
            revision=model_args.model_revision,
            trust_remote_code=training_args.trust_remote_code,
        )
    train, evaluation, _ = _sweep_data(
        script_args, mixture_args, sweep_args, training_args.seed, demo
    )
    rouge = _rouge_rows(evaluation, script_args)
    start = time.perf_counter()
    result = run_sweep(
        student,
        None,  # the trainer loads args.teacher_model_name_or_path once
        training_args,
        sweep_args,
        train,
        evaluation,
        tokenizer,
        peft_config=get_peft_config(model_args),
        rouge_prompts=rouge[0] if rouge else None,
        rouge_references=rouge[1] if rouge else None,
        rouge_kwargs={
            "seeds": script_args.rouge_l_seeds,
            "max_new_tokens": script_args.rouge_l_max_new_tokens,
            "batch_size": script_args.rouge_l_batch_size,
        },
        best_config=explicit_train_arguments(argv, demo),
    )
    elapsed = time.perf_counter() - start
    print(
        f"\nabkd-sweep: {len(trial_rows(result.study, result.metric, result.direction))} "
        f"trials in the study, this worker's run took {elapsed / 60:.1f} min."
    )
    if result.best_params is not None:
        print(
            f"Best: {result.best_params} with {result.metric} = {result.best_value:.4g} "
            f"({result.direction})."
        )
    print("Wrote " + ", ".join(str(path) for path in result.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
