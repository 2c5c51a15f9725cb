"""Single-process tests of ``abkd_trainer.core.distributed`` and of the shipped launcher configs.

The multi-process behaviour (real sharding under each launcher) is in
``test_deepspeed_launchers.py``; these tests pin down the config the teacher engine gets, the
guards of the CPU helper, and that every example config is one the tools accept.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from abkd_trainer.core import distributed
from abkd_trainer.core.distributed import (
    build_teacher_deepspeed_config,
    init_cpu_distributed_state,
    model_hidden_size,
    prepare_deepspeed_teacher,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
HIDDEN = 48


def _example_deepspeed_config(name: str) -> dict:
    return json.loads((EXAMPLES / "deepspeed" / f"{name}.json").read_text())


def _resolved_as_by_trainer(config: dict, *, micro_batch: int = 2, accumulation: int = 4) -> dict:
    """The example with the batch keys filled as transformers does before the teacher is built."""
    config = dict(config)
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["gradient_accumulation_steps"] = accumulation
    config["train_batch_size"] = micro_batch * accumulation * 2
    return config


def _parsed_by_deepspeed(config: dict):
    """What DeepSpeed itself reads from ``config`` (single process: world size 1)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig(config)


# ----------------------------------------------------------------- build_teacher_deepspeed_config


@pytest.mark.parametrize("name", ["zero3", "zero3_offload"])
def test_zero3_teacher_gets_hidden_size_tuning_that_deepspeed_reads(name):
    student_config = _example_deepspeed_config(name)
    teacher_config = build_teacher_deepspeed_config(
        _resolved_as_by_trainer(student_config), hidden_size=HIDDEN, world_size=2
    )

    zero = teacher_config["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["stage3_param_persistence_threshold"] == 10 * HIDDEN
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * HIDDEN * HIDDEN)
    assert zero["reduce_bucket_size"] == HIDDEN * HIDDEN
    assert not any("." in key for key in teacher_config), "dotted keys are ignored by DeepSpeed"
    parsed = _parsed_by_deepspeed({**teacher_config, "train_batch_size": 8})
    assert parsed.zero_config.param_persistence_threshold == 10 * HIDDEN
    assert parsed.zero_config.prefetch_bucket_size == int(0.9 * HIDDEN * HIDDEN)


def test_dotted_keys_like_trls_do_not_reach_deepspeed():
    # The reason build_teacher_deepspeed_config exists: TRL's prepare_deepspeed writes these.
    config = _resolved_as_by_trainer(_example_deepspeed_config("zero3"))
    config["train_batch_size"] = 8
    config["zero_optimization"].pop("stage3_param_persistence_threshold")
    config["zero_optimization.stage3_param_persistence_threshold"] = 10 * HIDDEN

    parsed = _parsed_by_deepspeed(config)

    assert parsed.zero_config.param_persistence_threshold != 10 * HIDDEN


def test_explicit_zero3_sizes_win_over_hidden_size_tuning():
    student_config = _resolved_as_by_trainer(_example_deepspeed_config("zero3"))
    student_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    student_config["zero_optimization"]["stage3_prefetch_bucket_size"] = 12345

    zero = build_teacher_deepspeed_config(student_config, hidden_size=HIDDEN, world_size=2)[
        "zero_optimization"
    ]

    assert zero["stage3_param_persistence_threshold"] == 0
    assert zero["stage3_prefetch_bucket_size"] == 12345
    assert zero["reduce_bucket_size"] == HIDDEN * HIDDEN  # was "auto"


def test_zero3_sizes_left_to_deepspeed_defaults_when_width_unknown():
    student_config = _resolved_as_by_trainer(_example_deepspeed_config("zero3"))

    teacher_config = build_teacher_deepspeed_config(student_config, hidden_size=None, world_size=2)

    zero = teacher_config["zero_optimization"]
    assert "auto" not in zero.values()
    assert "stage3_param_persistence_threshold" not in zero


def test_teacher_config_has_no_training_state_and_keeps_param_offload():
    student_config = _resolved_as_by_trainer(_example_deepspeed_config("zero3_offload"))
    student_config["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}

    teacher_config = build_teacher_deepspeed_config(
        student_config, hidden_size=HIDDEN, world_size=2
    )

    for key in ("optimizer", "scheduler", "gradient_clipping"):
        assert key not in teacher_config
    assert "offload_optimizer" not in teacher_config["zero_optimization"]
    assert teacher_config["zero_optimization"]["offload_param"]["device"] == "cpu"
    # The caller's config (the student's, shared with the Trainer) is left alone.
    assert "optimizer" in student_config
    assert "offload_optimizer" in student_config["zero_optimization"]
    assert student_config["zero_optimization"]["stage3_param_persistence_threshold"] == "auto"


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_teacher_is_replicated_below_zero3(stage):
    student_config = _resolved_as_by_trainer(_example_deepspeed_config("zero2"))
    student_config["zero_optimization"]["stage"] = stage

    teacher_config = build_teacher_deepspeed_config(
        student_config, hidden_size=HIDDEN, world_size=2
    )

    assert teacher_config["zero_optimization"] == {"stage": 0}


def test_batch_keys_keep_trainer_values():
    student_config = _resolved_as_by_trainer(
        _example_deepspeed_config("zero2"), micro_batch=3, accumulation=5
    )

    teacher_config = build_teacher_deepspeed_config(
        student_config, hidden_size=HIDDEN, world_size=2
    )

    assert teacher_config["train_micro_batch_size_per_gpu"] == 3
    assert teacher_config["gradient_accumulation_steps"] == 5
    assert teacher_config["train_batch_size"] == 30


@pytest.mark.parametrize("world_size", [1, 4])
def test_auto_batch_keys_become_consistent_for_deepspeed(world_size):
    student_config = _example_deepspeed_config("zero3")  # batch keys still "auto"

    teacher_config = build_teacher_deepspeed_config(
        student_config, hidden_size=HIDDEN, world_size=world_size
    )

    micro_batch = teacher_config["train_micro_batch_size_per_gpu"]
    accumulation = teacher_config["gradient_accumulation_steps"]
    assert teacher_config["train_batch_size"] == micro_batch * accumulation * world_size
    if world_size == 1:  # DeepSpeed's own consistency check runs with its world size, 1 here
        _parsed_by_deepspeed(teacher_config)


@pytest.mark.parametrize(
    ("mixed_precision", "expected_bf16", "expected_fp16"),
    [("no", False, False), ("bf16", True, False), ("fp16", False, True), ("fp8", True, False)],
)
def test_auto_precision_follows_the_accelerator(mixed_precision, expected_bf16, expected_fp16):
    teacher_config = build_teacher_deepspeed_config(
        _example_deepspeed_config("zero3"),
        hidden_size=HIDDEN,
        world_size=1,
        mixed_precision=mixed_precision,
    )

    assert teacher_config["bf16"]["enabled"] is expected_bf16
    assert teacher_config["fp16"]["enabled"] is expected_fp16


def test_auto_stage_is_rejected_with_a_fix():
    student_config = _example_deepspeed_config("zero3")
    student_config["zero_optimization"]["stage"] = "auto"

    with pytest.raises(ValueError, match="explicit stage"):
        build_teacher_deepspeed_config(student_config, hidden_size=HIDDEN, world_size=1)


def test_config_without_zero_block_gives_stage_zero():
    teacher_config = build_teacher_deepspeed_config(
        {"train_micro_batch_size_per_gpu": 1}, hidden_size=HIDDEN, world_size=1
    )

    assert teacher_config["zero_optimization"] == {"stage": 0}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (SimpleNamespace(hidden_size=64), 64),
        (SimpleNamespace(hidden_sizes=[32, 96, 64]), 96),
        (SimpleNamespace(text_config=SimpleNamespace(hidden_size=80)), 80),
        (SimpleNamespace(vocab_size=10), None),
        (None, None),
    ],
)
def test_model_hidden_size(config, expected):
    assert model_hidden_size(config) == expected


def test_model_hidden_size_of_gpt2_reads_n_embd():
    from transformers import GPT2Config

    assert model_hidden_size(GPT2Config(n_embd=40, n_head=4)) == 40


def test_prepare_deepspeed_teacher_without_deepspeed_names_the_fix():
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None))

    with pytest.raises(ValueError, match="examples/deepspeed/zero3.json"):
        prepare_deepspeed_teacher(object(), accelerator)


# ----------------------------------------------------------------- init_cpu_distributed_state

_LAUNCHER_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


@pytest.fixture
def no_accelerate_state(monkeypatch):
    """A clean accelerate state for the test, and the previous one restored afterwards."""
    from accelerate import PartialState

    monkeypatch.setattr(PartialState, "_shared_state", {})
    for name in (*_LAUNCHER_VARIABLES, "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    return PartialState


def test_cpu_helper_ignores_single_process_runs(no_accelerate_state):
    assert init_cpu_distributed_state(use_deepspeed=True) is False
    assert no_accelerate_state._shared_state == {}


def test_cpu_helper_ignores_runs_without_deepspeed(no_accelerate_state, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")

    assert init_cpu_distributed_state(use_deepspeed=False) is False
    assert init_cpu_distributed_state() is False  # ACCELERATE_USE_DEEPSPEED unset
    assert no_accelerate_state._shared_state == {}


def test_cpu_helper_leaves_gpu_runs_alone(no_accelerate_state, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setattr(distributed, "_has_hardware_accelerator", lambda: True)

    assert init_cpu_distributed_state() is False
    assert no_accelerate_state._shared_state == {}


def test_cpu_helper_keeps_an_existing_state(no_accelerate_state, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    existing = {"sentinel": True}
    monkeypatch.setattr(no_accelerate_state, "_shared_state", existing)

    assert init_cpu_distributed_state(use_deepspeed=True) is False
    assert no_accelerate_state._shared_state is existing


# ----------------------------------------------------------------- shipped example configs


@pytest.mark.parametrize(("name", "stage"), [("zero2", 2), ("zero3", 3), ("zero3_offload", 3)])
def test_example_deepspeed_configs_resolve_from_training_arguments(name, stage):
    config = _example_deepspeed_config(name)
    assert config["zero_optimization"]["stage"] == stage
    for key in (
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "train_batch_size",
    ):
        assert config[key] == "auto", f"{name}.json: {key} must follow the training arguments"
    if stage == 3:
        # Without it, save_model under ZeRO-3 writes no usable weights.
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_offload_example_uses_a_deepspeed_optimizer():
    # ZeRO-Offload refuses a torch optimizer unless zero_force_ds_cpu_optimizer is false.
    config = _example_deepspeed_config("zero3_offload")
    assert config["optimizer"]["type"] == "AdamW"
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


@pytest.mark.parametrize(
    ("name", "distributed_type", "deepspeed_file"),
    [
        ("zero2", "DEEPSPEED", "examples/deepspeed/zero2.json"),
        ("zero3", "DEEPSPEED", "examples/deepspeed/zero3.json"),
        ("multi_gpu", "MULTI_GPU", None),
    ],
)
def test_example_accelerate_configs_load(name, distributed_type, deepspeed_file):
    from accelerate.commands.config.config_args import load_config_from_file

    path = EXAMPLES / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))

    assert config.distributed_type == distributed_type
    if deepspeed_file is not None:
        assert config.deepspeed_config["deepspeed_config_file"] == deepspeed_file
        assert (EXAMPLES.parent / deepspeed_file).is_file()
        # accelerate rejects mixed_precision next to a deepspeed_config_file.
        assert "mixed_precision" not in yaml.safe_load(path.read_text())


def test_finish_distributed_run_is_a_no_op_without_a_process_group():
    from abkd_trainer.core.distributed import finish_distributed_run

    # Must neither raise nor end the process (skip_interpreter_teardown only applies to ranks).
    assert finish_distributed_run(skip_interpreter_teardown=True) is None
