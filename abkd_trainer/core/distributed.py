"""DeepSpeed plumbing for distillation: a sharded or replicated frozen teacher, and CPU ranks.

Two jobs live here:

* `prepare_deepspeed_teacher` wraps the frozen teacher as a DeepSpeed *inference* engine
  built from the student's DeepSpeed config. Under ZeRO-3 the teacher is partitioned across ranks
  like the student (no optimizer state); under ZeRO-0/1/2 it is replicated (stage 0), because those
  stages only shard optimizer state and gradients, which a frozen model does not have.
  TRL's `trl.models.utils.prepare_deepspeed` does the same job but writes its ZeRO-3 tuning under
  dotted keys (`"zero_optimization.stage3_param_persistence_threshold"`) that DeepSpeed ignores;
  `build_teacher_deepspeed_config` writes the nested keys DeepSpeed actually reads.

* `init_cpu_distributed_state` lets the same launch commands run DeepSpeed on CPU ranks
  (gloo), which is how the test-suite exercises real sharding without GPUs. Without a GPU,
  accelerate picks no process-group backend when told to use DeepSpeed, so every rank believes it
  is rank 0 of 1 and DeepSpeed rejects the batch size. The helper creates the process state itself
  with the gloo backend; the training arguments then reuse it
  (`accelerator_config={"use_configured_state": True}`). It does nothing when a hardware
  accelerator (CUDA, XPU, ...) is visible, so GPU runs are untouched.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only
    from accelerate import Accelerator
    from torch import nn
    from transformers import PretrainedConfig

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIGURED_STATE_ACCELERATOR_CONFIG",
    "build_teacher_deepspeed_config",
    "init_cpu_distributed_state",
    "model_hidden_size",
    "prepare_deepspeed_teacher",
    "prepare_teacher",
]

# What the training arguments need (``accelerator_config=...``) to reuse the state created by
# `init_cpu_distributed_state` instead of building a new, non-distributed one.
CONFIGURED_STATE_ACCELERATOR_CONFIG: dict[str, Any] = {"use_configured_state": True}
"""`accelerator_config` of the training arguments after
[`init_cpu_distributed_state`][abkd_trainer.core.distributed.init_cpu_distributed_state] returned
True: transformers then reuses that state instead of building a single-process one."""

# Top-level keys that only make sense with an optimizer; an inference engine gets none.
# DeepSpeed would otherwise build an optimizer (e.g. CPUAdam from `optimizer` + `offload_optimizer`)
# for a model that is never stepped, or a scheduler with no optimizer to attach to.
_TRAINING_ONLY_KEYS: tuple[str, ...] = ("optimizer", "scheduler", "gradient_clipping")

# ZeRO-3 keys whose "auto" value transformers derives from the model's hidden size (see
# `HfTrainerDeepSpeedConfig.trainer_config_finalize`); it fills them for the student only, at
# `train()` time, so the teacher's copy of the config still says "auto" when it is prepared.
_HIDDEN_SIZE_KEYS: tuple[str, ...] = (
    "reduce_bucket_size",
    "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold",
)

# DeepSpeed checks train_batch_size == micro_batch * accumulation * world_size for every engine.
_BATCH_KEYS: tuple[str, ...] = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
)


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value == "auto"


def model_hidden_size(config: PretrainedConfig | None) -> int | None:
    """The width that ZeRO-3's bucket and persistence sizes scale with, or `None` when unknown.

    Mirrors transformers' rule: `hidden_size`, else the largest of `hidden_sizes`, looking
    inside `text_config` for multimodal models (GPT-2 aliases `hidden_size` to `n_embd`).
    """
    for candidate in (config, getattr(config, "text_config", None)):
        if candidate is None:
            continue
        hidden_size = getattr(candidate, "hidden_size", None)
        if isinstance(hidden_size, int):
            return hidden_size
        hidden_sizes = getattr(candidate, "hidden_sizes", None)
        if hidden_sizes:
            return max(hidden_sizes)
    return None


def build_teacher_deepspeed_config(
    training_config: dict[str, Any],
    *,
    hidden_size: int | None,
    world_size: int,
    mixed_precision: str = "no",
) -> dict[str, Any]:
    """Derive the DeepSpeed config of a frozen teacher from the student's (training) config.

    Args:
        training_config: the student's DeepSpeed config, normally
            `accelerator.state.deepspeed_plugin.deepspeed_config`. It is not modified.
        hidden_size: the teacher's hidden size, used to fill ZeRO-3 sizes left "auto" or unset
            (`None`: those keys are dropped so that DeepSpeed's defaults apply).
        world_size: number of data-parallel ranks, used to make the batch-size keys consistent
            when some are still "auto" (DeepSpeed checks
            `train_batch_size == micro_batch * accumulation * world_size` even for an engine
            that never trains).
        mixed_precision: `"no"`, `"fp16"`, `"bf16"` or `"fp8"`
            (`accelerator.mixed_precision`), used only for `fp16.enabled` / `bf16.enabled`
            still at "auto".

    Returns:
        A new config dict without `optimizer`, `scheduler`, `gradient_clipping` and
        `offload_optimizer`.
        ZeRO stage 3 is kept (parameters partitioned, `offload_param` honoured) with
        `stage3_param_persistence_threshold` = 10 * hidden, `stage3_prefetch_bucket_size`
        = 0.9 * hidden^2 and `reduce_bucket_size` = hidden^2 wherever the user left them "auto"
        or unset (explicit values win). Any other stage becomes `{"stage": 0}`: replicated.

    Raises:
        ValueError: `world_size < 1`, or `zero_optimization.stage` is `"auto"`.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}.")
    config = copy.deepcopy(training_config)
    for key in _TRAINING_ONLY_KEYS:
        config.pop(key, None)

    zero_config = config.get("zero_optimization") or {}
    stage = zero_config.get("stage", 0)
    if _is_auto(stage):
        raise ValueError(
            "The DeepSpeed config has zero_optimization.stage='auto', so the teacher cannot be "
            "placed; set an explicit stage (0-3) in the DeepSpeed config."
        )
    if int(stage) == 3:
        zero_config.pop("offload_optimizer", None)  # `config` is a deep copy: safe to edit
        tuned_sizes: dict[str, int] = {}
        if hidden_size is not None:  # the values transformers and TRL pick for a model this wide
            tuned_sizes = {
                "reduce_bucket_size": hidden_size * hidden_size,
                "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                "stage3_param_persistence_threshold": 10 * hidden_size,
            }
        for key in _HIDDEN_SIZE_KEYS:
            if key in zero_config and not _is_auto(zero_config[key]):
                continue  # an explicit user value wins, e.g. 0 to partition every parameter
            if key in tuned_sizes:
                zero_config[key] = tuned_sizes[key]
            else:
                zero_config.pop(key, None)  # unknown width: DeepSpeed's defaults apply
        config["zero_optimization"] = zero_config
    else:
        # ZeRO-1/2 shard optimizer state and gradients; a frozen teacher has neither: replicate.
        config["zero_optimization"] = {"stage": 0}

    _resolve_batch_sizes(config, world_size)
    # accelerate runs "fp8" with DeepSpeed's bf16 engine (see DeepSpeedPlugin.set_mixed_precision).
    engine_precision = "bf16" if mixed_precision == "fp8" else mixed_precision
    for precision in ("fp16", "bf16"):
        block = config.get(precision)
        if isinstance(block, dict) and _is_auto(block.get("enabled")):
            block["enabled"] = engine_precision == precision
    return config


def _resolve_batch_sizes(config: dict[str, Any], world_size: int) -> None:
    """Replace "auto" batch keys by values consistent with `world_size` (in place).

    Inside a Trainer these keys are already resolved from the training arguments; this only
    matters when the teacher is prepared outside one. The teacher never steps, so the values are
    nominal.
    """
    if not any(_is_auto(config.get(key)) for key in _BATCH_KEYS):
        return
    micro_batch = config.get("train_micro_batch_size_per_gpu")
    accumulation = config.get("gradient_accumulation_steps")
    micro_batch = 1 if micro_batch is None or _is_auto(micro_batch) else int(micro_batch)
    accumulation = 1 if accumulation is None or _is_auto(accumulation) else int(accumulation)
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["gradient_accumulation_steps"] = accumulation
    config["train_batch_size"] = micro_batch * accumulation * world_size


def prepare_deepspeed_teacher(teacher_model: nn.Module, accelerator: Accelerator) -> nn.Module:
    """Wrap a frozen teacher as a DeepSpeed inference engine matching the student's ZeRO stage.

    Under ZeRO-3 each rank keeps 1/world_size of every teacher parameter, gathered layer by layer
    in the forward pass (so every rank must run the teacher forward the same number of times,
    which a Trainer's `compute_loss` does); under ZeRO-0/1/2 each rank holds a full copy. No
    optimizer state is created. `build_teacher_deepspeed_config` gives the exact config.

    Args:
        teacher_model: the teacher, e.g. an `AutoModelForCausalLM`. Loading it *after* the
            training arguments exist lets ZeRO-3 partition it while loading (`zero.Init`), so no
            rank ever holds the whole model.
        accelerator: the Trainer's accelerator; DeepSpeed must be enabled on it.

    Returns:
        The DeepSpeed engine in eval mode, every parameter with `requires_grad=False`. Call it
        like the model (`engine(input_ids=..., attention_mask=...)`); the model is
        `engine.module`.

    Raises:
        ValueError: DeepSpeed is not enabled on `accelerator`, or its config's ZeRO stage is
            `"auto"`.
    """
    deepspeed_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if deepspeed_plugin is None:
        raise ValueError(
            "prepare_deepspeed_teacher needs an accelerator with DeepSpeed enabled: pass a "
            "DeepSpeed config (`--deepspeed examples/deepspeed/zero3.json`) or launch with a "
            "DeepSpeed accelerate config (`--config_file examples/accelerate/zero3.yaml`)."
        )
    import deepspeed  # deferred: importing DeepSpeed initialises its accelerator and is slow

    # Freeze before wrapping so that DeepSpeed never sees a trainable teacher parameter.
    teacher_model.requires_grad_(False)
    config = build_teacher_deepspeed_config(
        deepspeed_plugin.deepspeed_config,
        hidden_size=model_hidden_size(getattr(teacher_model, "config", None)),
        world_size=accelerator.num_processes,
        mixed_precision=str(accelerator.mixed_precision),
    )
    engine, *_ = deepspeed.initialize(model=teacher_model, config=config)
    engine.eval()
    return engine


def prepare_teacher(
    teacher_model: nn.Module, accelerator: Accelerator, is_deepspeed_enabled: bool
) -> nn.Module:
    """Freeze the teacher and place it as the student is placed, for either trainer.

    Under DeepSpeed the teacher becomes an inference engine that follows the student's ZeRO
    stage (partitioned under ZeRO-3, replicated otherwise; see `prepare_deepspeed_teacher`).
    Otherwise accelerate places it for evaluation: the device, and the mixed-precision autocast
    of training.

    Args:
        teacher_model: the frozen teacher (a causal LM or a classifier).
        accelerator: the Trainer's accelerator.
        is_deepspeed_enabled: the Trainer's `is_deepspeed_enabled`.

    Returns:
        The placed teacher in eval mode, every parameter with `requires_grad=False`.
    """
    teacher_model.requires_grad_(False)
    teacher_model.eval()
    if is_deepspeed_enabled:
        teacher_model = prepare_deepspeed_teacher(teacher_model, accelerator)
    else:
        teacher_model = accelerator.prepare_model(teacher_model, evaluation_mode=True)
    # Not `return teacher_model.eval()`: a DeepSpeedEngine's eval() returns None.
    teacher_model.eval()
    return teacher_model


def _has_hardware_accelerator() -> bool:
    """True when torch sees a CUDA/XPU/MPS/... device (accelerate then picks the backend itself)."""
    accelerator_api = getattr(torch, "accelerator", None)  # torch >= 2.6
    if accelerator_api is not None:
        return bool(accelerator_api.is_available())
    return torch.cuda.is_available()


def _launched_world_size() -> int:
    """World size announced by the launcher (torchrun, deepspeed, accelerate, mpirun); 1 if none."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        value = os.environ.get(name)
        if value:
            return int(value)
    return 1


def init_cpu_distributed_state(use_deepspeed: bool | None = None) -> bool:
    """Set up a gloo process group and accelerate state for DeepSpeed on CPU ranks, else no-op.

    Call it first thing in a training script, before the training arguments are created. When it
    returns `True`, create them with `accelerator_config=CONFIGURED_STATE_ACCELERATOR_CONFIG`
    (`{"use_configured_state": True}`) so that transformers reuses this state instead of
    building one that sees a single process.

    It acts only when all of these hold, and otherwise returns `False` touching nothing:
    no hardware accelerator is visible (GPU users are unaffected); the launcher started more than
    one process; DeepSpeed is requested (`use_deepspeed`, or when that is `None`,
    `ACCELERATE_USE_DEEPSPEED=true`, which `accelerate launch` sets for a DeepSpeed config);
    and no accelerate state exists yet.

    Plain (non-DeepSpeed) data parallelism on CPU does not need this: pass `use_cpu=True` to
    the training arguments and accelerate uses gloo by itself.

    Args:
        use_deepspeed: whether the run uses DeepSpeed (e.g. a `--deepspeed` value was given);
            `None` reads `ACCELERATE_USE_DEEPSPEED` from the environment.

    Returns:
        Whether the state was created here (then `use_configured_state` is required).
    """
    from accelerate import PartialState

    if use_deepspeed is None:
        use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if not use_deepspeed or _has_hardware_accelerator() or _launched_world_size() <= 1:
        return False
    if PartialState._shared_state:
        logger.warning("An accelerate state already exists; init_cpu_distributed_state kept it.")
        return False

    # accelerate initialises DeepSpeed's process group (and marks the state as DeepSpeed) only
    # when this variable is set; transformers sets it the same way, temporarily, for its state.
    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        state = PartialState(backend="gloo")
    finally:
        if previous is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
    logger.info("DeepSpeed on CPU: gloo rank %d of %d.", state.process_index, state.num_processes)
    return True


def finish_distributed_run(*, skip_interpreter_teardown: bool = False) -> None:
    """Leave the process group together at the end of a multi-process run.

    Every rank waits at a barrier, then destroys the default process group, so that no rank
    exits while others still talk to it. On CPU ranks (gloo, DeepSpeed's CPU accelerator) a
    background C++ thread still aborts some exits with "terminate called without an active
    exception" (seen in about 1 of 10 two-rank runs here, after all output was written).
    `skip_interpreter_teardown=True` then ends the process with `os._exit(0)` after flushing
    the standard streams, so those C++ destructors never run; use it only once everything has
    been saved. Does nothing in a single-process run.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    if skip_interpreter_teardown:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
