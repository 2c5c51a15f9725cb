"""The (alpha, beta) schedule: warm-up from forward KL, then alpha_end / beta_end."""

from __future__ import annotations

import math

import pytest
from testing_utils import build_abkd_trainer, cpu_training_kwargs

from abkd_trainer import ABKDConfig
from abkd_trainer.core.schedules import (
    DEFAULT_WARMUP_RATIO,
    alpha_beta_at_step,
    effective_warmup_ratio,
    linear_schedule,
    resolve_warmup_steps,
    scheduled_alpha_beta,
)


@pytest.mark.parametrize(
    ("start", "end", "step", "total", "expected"),
    [
        (0.2, None, 5, 10, 0.2),
        (0.2, 1.0, 0, 10, 0.2),
        (0.2, 1.0, 5, 10, 0.6),
        (0.2, 1.0, 10, 10, 1.0),
        (0.2, 1.0, 15, 10, 1.0),
        (0.7, 0.1, 3, 4, 0.25),
        (0.2, 1.0, 0, 0, 0.2),
    ],
)
def test_linear_schedule(start, end, step, total, expected):
    assert linear_schedule(start, end, step, total) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("total", "steps", "ratio", "expected"),
    [
        (1000, 0, 0.3, 300),
        (1000, 50, 0.3, 50),  # steps win when > 0, as in TrainingArguments
        (10, 0, 0.25, 3),  # ceil, like TrainingArguments.get_warmup_steps
        (10, 0, 0.0, 0),
        (10, 40, 0.0, 10),  # never longer than training
        (0, 0, 0.5, 0),
    ],
)
def test_warmup_length(total, steps, ratio, expected):
    assert resolve_warmup_steps(total, steps, ratio) == expected


def test_warmup_moves_from_forward_kl_in_a_straight_line_then_holds():
    values = [
        alpha_beta_at_step(step, 10, alpha=0.2, beta=0.7, warmup_steps=4) for step in range(11)
    ]
    assert values[0] == (1.0, 0.0)
    assert values[1] == pytest.approx((0.8, 0.175))
    assert values[2] == pytest.approx((0.6, 0.35))
    assert values[3] == pytest.approx((0.4, 0.525))
    assert all(value == pytest.approx((0.2, 0.7)) for value in values[4:])
    # Linear in alpha and in alpha + beta: the path the authors' scripts schedule.
    sums = [a + b for a, b in values[:5]]
    assert sums == pytest.approx([1.0, 0.975, 0.95, 0.925, 0.9])


def test_cosine_shape_and_custom_start():
    values = [
        alpha_beta_at_step(
            step,
            8,
            alpha=0.2,
            beta=0.7,
            warmup_steps=4,
            warmup_start=(0.5, 0.5),
            warmup_shape="cosine",
        )
        for step in range(5)
    ]
    fractions = [0.5 * (1 - math.cos(math.pi * k / 4)) for k in range(4)] + [1.0]
    expected = [(0.5 - 0.3 * f, 0.5 + 0.2 * f) for f in fractions]
    for value, want in zip(values, expected, strict=True):
        assert value == pytest.approx(want)


def test_zero_warmup_is_the_configured_values_or_the_linear_schedule():
    assert alpha_beta_at_step(0, 10, alpha=0.2, beta=0.7) == (0.2, 0.7)
    assert alpha_beta_at_step(9, 10, alpha=0.2, beta=0.7) == (0.2, 0.7)
    assert alpha_beta_at_step(5, 10, alpha=0.2, beta=0.7, alpha_end=1.0, beta_end=0.3) == (
        pytest.approx((0.6, 0.5))
    )


def test_end_values_run_over_the_steps_after_the_warmup():
    def at(step):
        return alpha_beta_at_step(
            step, 10, alpha=0.2, beta=0.7, alpha_end=0.6, beta_end=0.3, warmup_steps=6
        )

    assert at(0) == (1.0, 0.0)
    assert at(3) == pytest.approx((0.6, 0.35))
    assert at(6) == pytest.approx((0.2, 0.7))  # warm-up reached its target
    assert at(8) == pytest.approx((0.4, 0.5))  # half-way through the remaining 4 steps
    assert at(10) == pytest.approx((0.6, 0.3))


def test_no_training_planned_gives_the_configured_values():
    # e.g. trainer.evaluate() before train(): the loss of the divergence the user asked for.
    assert alpha_beta_at_step(0, 0, alpha=0.2, beta=0.7, warmup_steps=100) == (0.2, 0.7)


def test_unknown_shape_is_an_error():
    with pytest.raises(ValueError, match="warm-up shape"):
        alpha_beta_at_step(0, 10, alpha=0.2, beta=0.7, warmup_steps=5, warmup_shape="step")


def make_config(tmp_path, **overrides) -> ABKDConfig:
    return ABKDConfig(output_dir=str(tmp_path), **{**cpu_training_kwargs(), **overrides})


def test_config_defaults_warm_up_over_the_whole_run(tmp_path):
    config = make_config(tmp_path)
    assert config.ab_warmup_ratio is None and config.ab_warmup_steps == 0
    assert effective_warmup_ratio(config) == DEFAULT_WARMUP_RATIO == 1.0
    assert (config.ab_warmup_start_alpha, config.ab_warmup_start_beta) == (1.0, 0.0)
    assert scheduled_alpha_beta(config, 0, 100) == (1.0, 0.0)
    assert scheduled_alpha_beta(config, 50, 100) == pytest.approx((0.6, 0.35))
    assert scheduled_alpha_beta(config, 99, 100) == pytest.approx((0.208, 0.693))
    assert scheduled_alpha_beta(config, 100, 100) == pytest.approx((0.2, 0.7))


def test_an_end_schedule_replaces_the_default_warmup_but_not_an_explicit_one(tmp_path):
    config = make_config(tmp_path, alpha_end=0.6, beta_end=0.3)
    assert effective_warmup_ratio(config) == 0.0
    assert scheduled_alpha_beta(config, 0, 10) == (0.2, 0.7)  # the end schedule's own start
    assert scheduled_alpha_beta(config, 5, 10) == pytest.approx((0.4, 0.5))
    explicit = make_config(tmp_path, alpha_end=0.6, beta_end=0.3, ab_warmup_ratio=0.6)
    assert scheduled_alpha_beta(explicit, 0, 10) == (1.0, 0.0)
    assert scheduled_alpha_beta(explicit, 6, 10) == pytest.approx((0.2, 0.7))
    assert scheduled_alpha_beta(explicit, 8, 10) == pytest.approx((0.4, 0.5))


def test_config_steps_win_over_ratio_and_zero_disables(tmp_path):
    config = make_config(tmp_path, ab_warmup_steps=10, ab_warmup_ratio=0.9)
    assert scheduled_alpha_beta(config, 5, 100) == pytest.approx((0.6, 0.35))
    assert scheduled_alpha_beta(config, 10, 100) == pytest.approx((0.2, 0.7))
    disabled = make_config(tmp_path, ab_warmup_ratio=0.0)
    assert scheduled_alpha_beta(disabled, 0, 100) == (0.2, 0.7)


def test_logged_alpha_and_beta_follow_the_warmup(tmp_path):
    trainer = build_abkd_trainer(tmp_path, max_steps=4, ab_warmup_steps=2)
    trainer.train()
    history = [log for log in trainer.state.log_history if "alpha" in log]
    # Step k trains (and logs) with the value at global_step k - 1.
    assert [log["alpha"] for log in history] == pytest.approx([1.0, 0.6, 0.2, 0.2])
    assert [log["beta"] for log in history] == pytest.approx([0.0, 0.35, 0.7, 0.7])
    assert trainer.current_alpha_beta() == pytest.approx((0.2, 0.7))


def test_trainer_schedule_is_a_function_of_the_restored_global_step(tmp_path):
    trainer = build_abkd_trainer(tmp_path, max_steps=10, ab_warmup_ratio=0.5)
    trainer.state.max_steps = 10
    trainer.state.global_step = 2  # as after loading checkpoint-2's trainer_state.json
    assert trainer.current_alpha_beta() == pytest.approx((0.68, 0.28))
