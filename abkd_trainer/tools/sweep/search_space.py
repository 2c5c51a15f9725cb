"""What `abkd-sweep` searches and how: its arguments, the search space, samplers and pruners.

[SweepArguments][abkd_trainer.tools.sweep.search_space.SweepArguments] holds the flags that
`abkd-sweep` adds to those of `abkd-train`. From them come the search space (`alpha`, `beta`
and optionally `learning_rate` and `temperature`), the grid of `--sampler grid`, Optuna's sampler
and pruner, and the `hp_space` that suggests a trial's parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna

# (alpha, beta) points marked on the heat map and, by default, tried first.
REFERENCE_POINTS: dict[str, tuple[float, float]] = {
    "forward KL": (1.0, 0.0),
    "reverse KL": (0.0, 1.0),
    "paper GPT-2": (0.2, 0.7),
    "paper OpenLLaMA": (0.1, 0.8),
    "paper vision": (0.8, 0.3),
}
# The trial's user attribute holding its number of training steps (see `spare_final_evaluation`).
MAX_STEPS_ATTR = "max_steps"


@dataclass
class SweepArguments:
    """The arguments `abkd-sweep` adds to those of `abkd-train` (or `abkd-train-classifier`).

    Each is also a flag (`--n_trials 32`) and a `--config` YAML key; `--help` shows the same
    descriptions.

    Parameters: Task and study
        task: `"lm"` sweeps `abkd-train` runs, `"classification"` `abkd-train-classifier` runs.
        n_trials: trials of the study in total, finished (complete or pruned), shared by all
            workers of one study; failed trials do not count.
        storage: where the study lives: None (memory, one worker), an SQLAlchemy URL
            (`sqlite:///sweep.db`, `postgresql+psycopg2://user:pass@host/db`) or a journal file
            (`journal:///shared/sweep.log`, or a path ending in `.log`).
        study_name: the Optuna study; workers with the same `storage` and `study_name` share it.

    Parameters: Search space
        sampler: `"tpe"` (Optuna's TPE) or `"grid"` (`grid_alpha` x `grid_beta`).
        alpha_range: low and high alpha of the TPE search.
        beta_range: low and high beta of the TPE search.
        grid_alpha: the alpha values of the grid.
        grid_beta: the beta values of the grid.
        learning_rate_range: if set, the learning rate is searched too, log-uniformly.
        temperature_range: if set, the divergence temperature is searched too.
        enqueue_reference_points: start a new TPE study with forward KL, reverse KL and the
            paper's settings (those inside the ranges).

    Parameters: Objective and pruning
        objective_metric: the metric of `Trainer.evaluate` to optimise; None: `eval_rouge_l` or
            `eval_reference_kl` for `task="lm"`, `eval_accuracy` for classifiers.
        direction: `"maximize"` or `"minimize"`; None infers it from the metric's name.
        pruner_startup_trials: trials the median pruner never prunes before pruning starts.
        pruner_warmup_steps: training steps of a trial before it may be pruned.
        no_pruning: run every trial to the end.
        heldout_fraction: without a test split, this fraction of the training rows (at most
            1000) is held out for evaluation (`task="lm"`).

    Parameters: Preemption
        heartbeat_interval: seconds between the heartbeats of a running trial.
        grace_period: seconds without a heartbeat after which a running trial is dead (its
            worker killed or preempted) and re-run; None: twice `heartbeat_interval`.
        max_retries: how often the parameters of a trial whose worker died are re-run.
    """

    task: str = field(
        default="lm",
        metadata={
            "help": "What to sweep: 'lm' (abkd-train runs of ABKDTrainer) or 'classification' "
            "(abkd-train-classifier runs of ABKDClassifierTrainer; objective eval_accuracy). "
            "The other flags are those of that command."
        },
    )
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
            "help": "Where the study lives: an SQLAlchemy URL (sqlite:///sweep.db for one "
            "machine, postgresql+psycopg2://user:pass@host/db or mysql+pymysql://... for "
            "several) or a journal file on a shared file system (journal:///shared/sweep.log, "
            "or any path ending in .log). Workers started with the same --storage and "
            "--study_name share one study. None: in memory, one worker."
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
            "eval_reference_kl, eval_loss, eval_teacher_agreement, eval_accuracy. None: for "
            "--task lm eval_rouge_l when the test split has prompts and references, else "
            "eval_reference_kl (forward KL to the teacher, the same divergence for every "
            "trial); for --task classification eval_accuracy."
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
    heartbeat_interval: int = field(
        default=60,
        metadata={
            "help": "Seconds between the heartbeats a running trial records in --storage; a "
            "trial without one for --grace_period seconds is taken for dead (its worker killed "
            "or preempted), marked failed and re-run."
        },
    )
    grace_period: int | None = field(
        default=None,
        metadata={
            "help": "Seconds without a heartbeat after which a running trial is dead. None: "
            "twice --heartbeat_interval. Longer than the worst stall of your storage (a busy "
            "database, an NFS server), or live trials are re-run."
        },
    )
    max_retries: int = field(
        default=3,
        metadata={
            "help": "How often the parameters of a trial whose worker died are re-run; past "
            "that the trial stays failed and a new trial takes its place."
        },
    )
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
        if self.task not in ("lm", "classification"):
            raise ValueError(f"`task` must be 'lm' or 'classification', got {self.task!r}.")
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
        if self.heartbeat_interval < 1 or (self.grace_period is not None and self.grace_period < 1):
            raise ValueError(
                "`heartbeat_interval` and `grace_period` are whole seconds >= 1, got "
                f"{self.heartbeat_interval} and {self.grace_period}."
            )
        if self.max_retries < 0:
            raise ValueError(f"`max_retries` must be >= 0, got {self.max_retries}.")
        from abkd_trainer.tools.sweep.storage import storage_kind  # (it imports this module)

        storage_kind(self.storage)  # an unknown form is refused here, before any training
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"`heldout_fraction` must be in (0, 1), got {self.heldout_fraction}.")


def import_optuna() -> Any:
    """The `optuna` module, or an `ImportError` that names the `sweep` extra.

    Raises:
        ImportError: Optuna is not installed.
    """
    try:
        import optuna
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "abkd-sweep needs Optuna: pip install 'abkd-trainer[sweep]' (or `pip install optuna`)."
        ) from error
    return optuna


def search_space(sweep_args: SweepArguments) -> dict[str, tuple[float, float, bool]]:
    """The searched configuration fields and their ranges.

    Args:
        sweep_args: the search.

    Returns:
        Field name -> `(low, high, log scale)`; `alpha` and `beta` always, `learning_rate`
        (log scale) and `temperature` when their ranges are given.
    """
    space = {
        "alpha": (*sweep_args.alpha_range, False),
        "beta": (*sweep_args.beta_range, False),
    }
    if sweep_args.learning_rate_range is not None:
        space["learning_rate"] = (*sweep_args.learning_rate_range, True)
    if sweep_args.temperature_range is not None:
        space["temperature"] = (*sweep_args.temperature_range, False)
    return space


def grid_points(sweep_args: SweepArguments) -> dict[str, list[float]]:
    """The grid of `--sampler grid`: field name -> its values.

    `alpha` and `beta` take `--grid_alpha` and `--grid_beta`; a searched learning rate or
    temperature takes the two ends of its range.

    Args:
        sweep_args: the search.
    """
    grid = {"alpha": list(sweep_args.grid_alpha), "beta": list(sweep_args.grid_beta)}
    if sweep_args.learning_rate_range is not None:
        grid["learning_rate"] = list(sweep_args.learning_rate_range)
    if sweep_args.temperature_range is not None:
        grid["temperature"] = list(sweep_args.temperature_range)
    return grid


def grid_size(sweep_args: SweepArguments) -> int:
    """The number of points of the grid of `--sampler grid`.

    Args:
        sweep_args: the search.
    """
    size = 1
    for values in grid_points(sweep_args).values():
        size *= len(values)
    return size


def make_sampler(sweep_args: SweepArguments, seed: int) -> optuna.samplers.BaseSampler:
    """Optuna's `GridSampler` over `grid_points` for `--sampler grid`, else its `TPESampler`.

    Args:
        sweep_args: the search.
        seed: the sampler's seed (the training seed), so that a sweep can be repeated.
    """
    optuna = import_optuna()
    if sweep_args.sampler == "grid":
        return optuna.samplers.GridSampler(grid_points(sweep_args), seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(sweep_args: SweepArguments) -> optuna.pruners.BasePruner:
    """Optuna's `MedianPruner` with the sweep's start-up trials and warm-up steps.

    Args:
        sweep_args: the search; with `no_pruning`, a `NopPruner`.
    """
    optuna = import_optuna()
    if sweep_args.no_pruning:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=sweep_args.pruner_startup_trials,
        n_warmup_steps=sweep_args.pruner_warmup_steps,
    )


def spare_final_evaluation(pruner: optuna.pruners.BasePruner) -> optuna.pruners.BasePruner:
    """`pruner`, except at a trial's last training step.

    The Trainer reports the final evaluation too, and a plain median pruner would discard a
    trial that has already finished (its value lost, though its cost was paid). The last step
    is the trial's user attribute `max_steps`, set by `SweepMetricsCallback`.

    Args:
        pruner: the pruner that decides at every other step.
    """
    optuna = import_optuna()

    class SpareFinalEvaluation(optuna.pruners.BasePruner):
        def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
            max_steps = trial.user_attrs.get(MAX_STEPS_ATTR)
            if max_steps is not None and (trial.last_step or 0) >= max_steps:
                return False
            return pruner.prune(study, trial)

    return SpareFinalEvaluation()


def make_hp_space(
    sweep_args: SweepArguments, on_trial: Callable[[Any], None]
) -> Callable[[Any], dict[str, float]]:
    """The `hp_space` of Trainer's hyperparameter search: it suggests the searched fields.

    Args:
        sweep_args: the search.
        on_trial: called with the trial first; it may raise `optuna.TrialPruned` to skip it.

    Returns:
        A function of an Optuna trial returning field name -> the trial's value.
    """
    space = search_space(sweep_args)
    grid = grid_points(sweep_args) if sweep_args.sampler == "grid" else None

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


def reference_points_in_space(sweep_args: SweepArguments) -> list[dict[str, float]]:
    """The `REFERENCE_POINTS` inside the alpha and beta ranges, as trial parameters, in order.

    Args:
        sweep_args: the search.
    """
    return [
        {"alpha": alpha, "beta": beta}
        for alpha, beta in REFERENCE_POINTS.values()
        if sweep_args.alpha_range[0] <= alpha <= sweep_args.alpha_range[1]
        and sweep_args.beta_range[0] <= beta <= sweep_args.beta_range[1]
    ]
