"""`abkd-sweep`: choose (alpha, beta) (and optionally learning rate and temperature) with Optuna.

Every trial is a short distillation from the same student initialisation (`set_seed(seed)`
before the student is built) with the same data order; the teacher is loaded once. The sampler
is Optuna's TPE (`--sampler grid` walks a grid), and Optuna's median pruner stops trials whose
intermediate evaluations fall below the median of earlier trials at the same step (never at the
final evaluation: a finished trial keeps its result). The objective is any metric of
`Trainer.evaluate`; by default `eval_rouge_l` (maximised) when the test split has prompts and
references, otherwise `eval_reference_kl` (minimised; see `metrics`).

Flags and `--config` YAML files are those of `abkd-train` plus `SweepArguments`; with no model
and dataset the demo is swept. Outputs in `--output_dir`: `trials.csv`, `heatmap.png` (the
objective over the (alpha, beta) plane) and `best.yaml`, which `abkd-train --config best.yaml`
runs as is.

Scale-out: with `--storage` (an SQLAlchemy URL: `sqlite:///sweep.db` for the workers of one
machine, `postgresql+psycopg2://...` or `mysql+pymysql://...` for many; or a journal file on a
shared file system, `journal:///shared/sweep.log`) every `abkd-sweep` started with the same
`--storage` and `--study_name` joins one study; together they run `--n_trials` trials. Each
worker writes the outputs of the whole study when it stops.

Preemption: a running trial records heartbeats in the storage; one whose worker died (SIGKILL,
a preempted machine) is found by the next worker that looks, marked failed and re-run with the
same parameters in the same folder, from its last complete checkpoint when it saved one (see
`storage` and `study`). Failed trials never use the budget, so the study ends with `n_trials`
finished trials.

**How this uses transformers' hyperparameter search.** A trial runs as
`Trainer.hyperparameter_search` runs one with Optuna: the trainer is built once with its teacher,
a `model_init` rebuilds the student for every trial, `hp_space` suggests the parameters, which
the Trainer writes into `args`, and the Trainer reports every evaluation to the trial and raises
`TrialPruned` when the pruner says so. The glue around it, each because the integration has no
hook for it:

- the sweep calls `Study.optimize` itself (one trial at a time) instead of
  `hyperparameter_search`, because a re-run must be trained with `resume_from_checkpoint`,
  which `hyperparameter_search` never passes;
- the trial budget shared by several workers: each worker runs one trial at a time until the
  study holds `n_trials` finished or running trials; a trial that another worker's trial pushed
  over the budget in the moment between that check and its creation is pruned at once and marked
  `over_budget` (left out of every output), so no trial runs beyond the budget;
- the study is created here first (so that its first worker, alone, enqueues the reference
  points: forward KL, reverse KL and the paper's settings) and read back for the outputs;
- `SweepMetricsCallback` adds `eval_reference_kl` to the metrics of every evaluation
  (`on_evaluate` receives the dict that the Trainer then reports; `RougeLCallback` adds
  `eval_rouge_l` the same way).

The modules, by concern:

- `search_space`: the arguments, search space, samplers, pruners and `hp_space`;
- `metrics`: the objective and the reference KL;
- `trials`: the budget (which trials count, claiming one) and what became of each trial;
- `storage`: the storages, a journal's heartbeats, failing and re-queueing dead trials;
- `study`: the study and its workers, `run_trainer_sweep` for any Trainer with a `model_init`;
- `lm`: `run_sweep` for `ABKDTrainer`;
- `classification`: `abkd-sweep --task classification`, the sweep of `ABKDClassifierTrainer`
  runs (objective `eval_accuracy`; with no model, teacher and dataset, the digits demo);
- `outputs`: `trials.csv`, the heat map, `best.yaml`;
- `command`: the parser and `main`.
"""

from abkd_trainer.tools.sweep.classification import (
    ACCURACY_METRIC,
    run_classifier_sweep_command,
)
from abkd_trainer.tools.sweep.command import (
    DESCRIPTION,
    SWEEP_DEFAULTS,
    SWEEP_DEMO_DEFAULTS,
    explicit_train_arguments,
    main,
    make_sweep_parser,
    parse_sweep_args,
)
from abkd_trainer.tools.sweep.lm import make_model_init, run_sweep
from abkd_trainer.tools.sweep.metrics import (
    REFERENCE_KL_METRIC,
    ROUGE_L_METRIC,
    SweepMetricsCallback,
    TrialMetricsCallback,
    choose_objective,
    infer_direction,
    reference_kl,
)
from abkd_trainer.tools.sweep.outputs import (
    draw_heatmap,
    trial_rows,
    write_best_yaml,
    write_sweep_outputs,
    write_trials_csv,
)
from abkd_trainer.tools.sweep.search_space import (
    REFERENCE_POINTS,
    SweepArguments,
    make_hp_space,
    make_pruner,
    make_sampler,
    spare_final_evaluation,
)
from abkd_trainer.tools.sweep.storage import SweepStorage, open_storage, storage_kind
from abkd_trainer.tools.sweep.study import SweepResult, create_or_load_study, run_trainer_sweep
from abkd_trainer.tools.sweep.trials import claim_trial, counted_trials, trial_reason

__all__ = [
    "ACCURACY_METRIC",
    "DESCRIPTION",
    "REFERENCE_KL_METRIC",
    "REFERENCE_POINTS",
    "ROUGE_L_METRIC",
    "SWEEP_DEFAULTS",
    "SWEEP_DEMO_DEFAULTS",
    "SweepArguments",
    "SweepMetricsCallback",
    "SweepResult",
    "SweepStorage",
    "TrialMetricsCallback",
    "choose_objective",
    "claim_trial",
    "counted_trials",
    "create_or_load_study",
    "draw_heatmap",
    "explicit_train_arguments",
    "infer_direction",
    "main",
    "make_hp_space",
    "make_model_init",
    "make_pruner",
    "make_sampler",
    "make_sweep_parser",
    "open_storage",
    "parse_sweep_args",
    "reference_kl",
    "run_classifier_sweep_command",
    "run_sweep",
    "run_trainer_sweep",
    "spare_final_evaluation",
    "storage_kind",
    "trial_reason",
    "trial_rows",
    "write_best_yaml",
    "write_sweep_outputs",
    "write_trials_csv",
]
