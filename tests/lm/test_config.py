"""ABKDConfig: defaults, help text, validation at construction, command-line parsing."""

from __future__ import annotations

import dataclasses
import math

import pytest
from testing_utils import cpu_training_kwargs
from transformers import HfArgumentParser
from trl import SFTConfig

from abkd_trainer import DIVERGENCE_NAMES, ABKDConfig

ABKD_FIELDS = (
    "alpha",
    "beta",
    "alpha_end",
    "beta_end",
    "ab_warmup_ratio",
    "ab_warmup_steps",
    "ab_warmup_start_alpha",
    "ab_warmup_start_beta",
    "ab_warmup_shape",
    "temperature",
    "divergence",
    "jsd_beta",
    "skew_lambda",
    "kd_ratio",
    "teacher_model_name_or_path",
    "teacher_model_init_kwargs",
    "loss_chunk_size",
    "disable_dropout",
)


def make_config(tmp_path, **overrides) -> ABKDConfig:
    return ABKDConfig(output_dir=str(tmp_path), **{**cpu_training_kwargs(), **overrides})


def test_is_an_sft_config_with_the_paper_defaults(tmp_path):
    config = make_config(tmp_path)
    assert isinstance(config, SFTConfig)
    assert (config.alpha, config.beta) == (0.2, 0.7)  # the paper's GPT-2 recipe
    assert config.divergence == "ab"
    assert config.temperature == 1.0
    assert config.kd_ratio == 1.0
    assert config.alpha_end is None and config.beta_end is None
    assert config.disable_dropout is True
    assert config.teacher_model_name_or_path is None
    assert config.loss_chunk_size is None


def test_every_distillation_field_has_help_text():
    fields = {f.name: f for f in dataclasses.fields(ABKDConfig)}
    for name in ABKD_FIELDS:
        assert name in fields, name
        help_text = fields[name].metadata.get("help", "")
        assert len(help_text) > 20, f"{name} has no useful help: {help_text!r}"


@pytest.mark.parametrize(
    ("field_name", "value"),
    [
        ("alpha", math.nan),
        ("alpha", math.inf),
        ("beta", math.nan),
        ("beta", -math.inf),
        ("alpha_end", math.nan),
        ("beta_end", math.inf),
        ("temperature", 0.0),
        ("temperature", -1.0),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("kd_ratio", -0.1),
        ("kd_ratio", 1.5),
        ("kd_ratio", math.nan),
        ("jsd_beta", 1.2),
        ("skew_lambda", -0.5),
        ("divergence", "kl"),
        ("loss_chunk_size", 0),
        ("loss_chunk_size", 2.5),
        ("ab_warmup_ratio", -0.1),
        ("ab_warmup_ratio", 1.5),
        ("ab_warmup_ratio", math.nan),
        ("ab_warmup_steps", -1),
        ("ab_warmup_steps", 2.5),
        ("ab_warmup_start_alpha", math.nan),
        ("ab_warmup_start_beta", math.inf),
        ("ab_warmup_shape", "exponential"),
    ],
)
def test_invalid_values_raise_naming_the_field(tmp_path, field_name, value):
    with pytest.raises(ValueError, match=f"`{field_name}`"):
        make_config(tmp_path, **{field_name: value})


@pytest.mark.parametrize("field_name", ["alpha", "beta", "kd_ratio", "temperature"])
def test_non_numbers_are_rejected(tmp_path, field_name):
    with pytest.raises(ValueError, match=f"`{field_name}` must be a number"):
        make_config(tmp_path, **{field_name: "0.5"})


def test_schedule_end_values_need_the_ab_divergence(tmp_path):
    with pytest.raises(ValueError, match="`alpha_end`"):
        make_config(tmp_path, divergence="fkl", alpha_end=0.5)
    config = make_config(tmp_path, divergence="ab", alpha_end=0.5, beta_end=0.1)
    assert (config.alpha_end, config.beta_end) == (0.5, 0.1)


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_every_registered_divergence_is_accepted(tmp_path, divergence):
    assert make_config(tmp_path, divergence=divergence).divergence == divergence


def test_boundary_values_are_valid(tmp_path):
    # Limits of the AB family and the ends of the unit intervals are legitimate settings.
    config = make_config(tmp_path, alpha=0.0, beta=0.0, kd_ratio=0.0, jsd_beta=1.0, skew_lambda=0.0)
    assert (config.alpha, config.beta, config.kd_ratio) == (0.0, 0.0, 0.0)
    assert make_config(tmp_path, alpha=1, beta=0, kd_ratio=1).alpha == 1


def test_teacher_init_kwargs_accept_a_json_string(tmp_path):
    config = make_config(tmp_path, teacher_model_init_kwargs='{"dtype": "bfloat16"}')
    assert config.teacher_model_init_kwargs == {"dtype": "bfloat16"}


def test_teacher_init_kwargs_reject_other_types(tmp_path):
    with pytest.raises(ValueError, match="`teacher_model_init_kwargs`"):
        make_config(tmp_path, teacher_model_init_kwargs="bfloat16")


def test_command_line_parsing(tmp_path):
    parser = HfArgumentParser(ABKDConfig)
    (config,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--use_cpu",
            "--bf16",
            "false",
            "--report_to",
            "none",
            "--alpha",
            "0.5",
            "--beta",
            "0.25",
            "--beta_end",
            "0.75",
            "--divergence",
            "ab",
            "--kd_ratio",
            "0.9",
            "--teacher_model_name_or_path",
            "org/teacher",
            "--teacher_model_init_kwargs",
            '{"dtype": "float32"}',
            "--loss_chunk_size",
            "64",
        ]
    )
    assert (config.alpha, config.beta, config.beta_end) == (0.5, 0.25, 0.75)
    assert config.alpha_end is None
    assert config.kd_ratio == 0.9
    assert config.teacher_model_name_or_path == "org/teacher"
    assert config.teacher_model_init_kwargs == {"dtype": "float32"}
    assert config.loss_chunk_size == 64


def test_command_line_rejects_invalid_values(tmp_path):
    parser = HfArgumentParser(ABKDConfig)
    with pytest.raises(ValueError, match="`temperature`"):
        parser.parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--use_cpu", "--bf16", "false", "--temperature", "0"]
        )


# ------------------------------------------------------------------ on-policy distillation

ON_POLICY_FIELDS = (
    "lmbda",
    "seq_kd",
    "on_policy_schedule",
    "adaptive_step",
    "adaptive_loss_eps",
    "replay_buffer_size",
    "max_new_tokens",
    "generation_temperature",
    "generation_top_p",
    "generation_top_k",
    "generation_kwargs",
    "ds3_gather_for_generation",
)


def test_on_policy_defaults_keep_off_policy_distillation(tmp_path):
    config = make_config(tmp_path)
    assert (config.lmbda, config.seq_kd, config.on_policy_schedule) == (0.0, False, "constant")
    assert not config.uses_sampled_completions
    assert (config.adaptive_step, config.adaptive_loss_eps, config.replay_buffer_size) == (
        0.1,
        0.1,
        1000,
    )
    assert (config.max_new_tokens, config.generation_temperature) == (128, 1.0)
    assert (config.generation_top_p, config.generation_top_k) == (1.0, 0)
    assert config.generation_kwargs is None and config.ds3_gather_for_generation is True
    for name in ON_POLICY_FIELDS:
        help_text = next(f for f in dataclasses.fields(ABKDConfig) if f.name == name).metadata
        assert len(help_text.get("help", "")) > 20, name


@pytest.mark.parametrize(
    ("overrides", "uses_samples"),
    [
        ({"lmbda": 0.5}, True),
        ({"seq_kd": True}, True),
        ({"on_policy_schedule": "adaptive", "eval_strategy": "steps"}, True),
        ({"lmbda": 0.0, "max_new_tokens": 4}, False),
    ],
)
def test_uses_sampled_completions(tmp_path, overrides, uses_samples):
    assert make_config(tmp_path, **overrides).uses_sampled_completions is uses_samples


@pytest.mark.parametrize(
    ("field_name", "value"),
    [
        ("lmbda", -0.1),
        ("lmbda", 1.5),
        ("lmbda", math.nan),
        ("on_policy_schedule", "linear"),
        ("adaptive_step", 0.0),
        ("adaptive_step", 1.5),
        ("adaptive_loss_eps", -0.1),
        ("replay_buffer_size", 0),
        ("replay_buffer_size", 2.5),
        ("max_new_tokens", 0),
        ("generation_temperature", 0.0),
        ("generation_temperature", math.inf),
        ("generation_top_p", 0.0),
        ("generation_top_p", 1.1),
        ("generation_top_k", -1),
        ("generation_top_k", 1.5),
        ("generation_kwargs", "greedy"),
        ("generation_kwargs", {"num_return_sequences": 2}),
    ],
)
def test_invalid_on_policy_values_raise_naming_the_field(tmp_path, field_name, value):
    with pytest.raises(ValueError, match=f"`{field_name}`"):
        make_config(tmp_path, **{field_name: value})


@pytest.mark.parametrize("overrides", [{"packing": True}, {"padding_free": True}])
def test_on_policy_refuses_packed_batches(tmp_path, overrides):
    with pytest.raises(ValueError, match="packing=False"):
        make_config(tmp_path, lmbda=0.5, max_length=64, **overrides)
    make_config(tmp_path, max_length=64, **overrides)  # fine off-policy


def test_adaptive_schedule_needs_an_eval_strategy(tmp_path):
    with pytest.raises(ValueError, match="eval_strategy"):
        make_config(tmp_path, on_policy_schedule="adaptive")
    config = make_config(tmp_path, on_policy_schedule="adaptive", eval_strategy="steps")
    assert config.lmbda == 0.0  # the authors' start: off-policy until the eval loss worsens


def test_on_policy_command_line(tmp_path):
    parser = HfArgumentParser(ABKDConfig)
    (config,) = parser.parse_args_into_dataclasses(
        [
            "--output_dir", str(tmp_path), "--use_cpu", "--bf16", "false", "--report_to", "none",
            "--lmbda", "0.5", "--seq_kd", "--on_policy_schedule", "adaptive",
            "--eval_strategy", "steps", "--adaptive_step", "0.2", "--adaptive_loss_eps", "0.05",
            "--replay_buffer_size", "64", "--max_new_tokens", "32",
            "--generation_temperature", "0.8", "--generation_top_p", "0.95",
            "--generation_top_k", "50", "--generation_kwargs", '{"repetition_penalty": 1.1}',
            "--ds3_gather_for_generation", "false",
        ]
    )  # fmt: skip
    assert (config.lmbda, config.seq_kd, config.on_policy_schedule) == (0.5, True, "adaptive")
    assert (config.adaptive_step, config.adaptive_loss_eps, config.replay_buffer_size) == (
        0.2,
        0.05,
        64,
    )
    assert (config.max_new_tokens, config.generation_temperature) == (32, 0.8)
    assert (config.generation_top_p, config.generation_top_k) == (0.95, 50)
    assert config.generation_kwargs == {"repetition_penalty": 1.1}
    assert config.ds3_gather_for_generation is False
