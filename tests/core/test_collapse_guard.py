"""The collapse guard: warns once on a collapsing student, stays silent on a healthy one."""

from __future__ import annotations

import logging

import pytest
from transformers import TrainerControl, TrainerState

from abkd_trainer import ABKDConfig
from abkd_trainer.core.collapse_guard import CollapseGuardCallback, collapse_diagnosis

HEALTHY = {"student_entropy": 1.2, "teacher_entropy": 0.16, "teacher_agreement": 0.64}
# The demo at (0.2, 0.7) from random init: as peaked as the teacher, right half of the time.
COLLAPSED = {"student_entropy": 0.25, "teacher_entropy": 0.16, "teacher_agreement": 0.48}
START = {"student_entropy": 4.36, "teacher_entropy": 0.19, "teacher_agreement": 0.07}


def feed(guard, logs_sequence, args=None):
    args = args or ABKDConfig(output_dir="unused", use_cpu=True, alpha=0.2, beta=0.7)
    state = TrainerState()
    guard.on_train_begin(args, state, TrainerControl())
    for step, logs in enumerate(logs_sequence, start=1):
        state.global_step = 10 * step
        guard.on_log(args, state, TrainerControl(), logs=dict(logs))
    return guard


def test_diagnosis_bounds():
    # -log(0.48) = 0.73 nats is what 48% agreement justifies; half of it is the bound.
    diagnosis = collapse_diagnosis(COLLAPSED)
    assert diagnosis.entropy_bound == pytest.approx(0.5 * 0.7340, rel=1e-3)
    assert diagnosis.collapsing
    assert not collapse_diagnosis(HEALTHY)  # agreement 0.64 >= 0.6
    # A real LLM teacher: the teacher's entropy is the larger term.
    sharp = collapse_diagnosis(
        {"student_entropy": 0.1, "teacher_entropy": 1.8, "teacher_agreement": 0.3}
    )
    assert sharp.entropy_bound == pytest.approx(0.9) and sharp.collapsing
    # Near-zero agreement cannot make a near-uniform student "too certain".
    uniform = collapse_diagnosis(
        {"student_entropy": 5.5, "teacher_entropy": 3.0, "teacher_agreement": 0.0}
    )
    assert not uniform.collapsing
    assert collapse_diagnosis({"loss": 1.0}) is None
    assert collapse_diagnosis({**COLLAPSED, "teacher_agreement": float("nan")}) is None


def test_fires_once_after_patience_consecutive_collapsed_logs(caplog):
    guard = CollapseGuardCallback()
    with caplog.at_level(logging.WARNING):
        feed(guard, [START, COLLAPSED, COLLAPSED, COLLAPSED, COLLAPSED, COLLAPSED])
    assert guard.fired_at_step == 40  # logs 2, 3 and 4
    messages = [r.getMessage() for r in caplog.records if "collapsing" in r.getMessage()]
    assert len(messages) == 1
    message = messages[0]
    for expected in (
        "step 40",
        "(alpha, beta) = (0.2, 0.7)",
        "alpha + beta < 1",
        "reverse KL",
        "zero-forcing",
        "`ab_warmup_ratio` / `ab_warmup_steps`",
        "a larger alpha",
        "`kd_ratio` < 1",
        "fine-tuned",
    ):
        assert expected in message


def test_noisy_logs_do_not_fire():
    guard = feed(
        CollapseGuardCallback(),
        [START, COLLAPSED, HEALTHY, COLLAPSED, COLLAPSED, HEALTHY, COLLAPSED] * 3,
    )
    assert guard.fired_at_step is None


def test_an_overconfident_student_that_is_recovering_does_not_fire():
    # E.g. an SFT'd student trained with forward KL: over-confident at first, less so each log.
    logs = [
        {"student_entropy": entropy, "teacher_entropy": 1.5, "teacher_agreement": 0.45}
        for entropy in (0.30, 0.32, 0.35, 0.38, 0.41)
    ]
    assert feed(CollapseGuardCallback(), logs).fired_at_step is None


def test_eval_logs_are_ignored():
    eval_logs = {f"eval_{key}": value for key, value in COLLAPSED.items()}
    assert feed(CollapseGuardCallback(), [START] + [eval_logs] * 5).fired_at_step is None


def test_bad_thresholds_are_refused():
    with pytest.raises(ValueError, match="patience"):
        CollapseGuardCallback(patience=0)
    with pytest.raises(ValueError, match="entropy_ratio"):
        CollapseGuardCallback(entropy_ratio=1.5)
    with pytest.raises(ValueError, match="max_agreement"):
        CollapseGuardCallback(max_agreement=0.0)


# ----------------------------------------------------------------------------- on real training


def train_demo_student(tmp_path, **settings):
    """The shipped demo teacher distilled into a random demo student (a short, fast variant of
    ``benchmarks/collapse_guard.py``); returns the trainer's collapse guard."""
    from testing_utils import cpu_training_kwargs
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from abkd_trainer import ABKDTrainer
    from abkd_trainer.lm.demo import DEMO_TEACHER_DIR, build_demo_student, load_demo_dataset

    tokenizer = AutoTokenizer.from_pretrained(DEMO_TEACHER_DIR)
    teacher = AutoModelForCausalLM.from_pretrained(DEMO_TEACHER_DIR)
    args = ABKDConfig(
        **{**cpu_training_kwargs(), "output_dir": str(tmp_path)},
        max_steps=90,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=10,
        max_length=64,
        gradient_checkpointing=False,
        **settings,
    )
    trainer = ABKDTrainer(
        model=build_demo_student(teacher.config),
        teacher_model=teacher,
        args=args,
        train_dataset=load_demo_dataset()["train"].select(range(1440)),
        processing_class=tokenizer,
    )
    trainer.train()
    (guard,) = [
        cb for cb in trainer.callback_handler.callbacks if isinstance(cb, CollapseGuardCallback)
    ]
    return guard, [log for log in trainer.state.log_history if "student_entropy" in log]


def test_fires_on_a_collapsing_demo_run(tmp_path):
    guard, logs = train_demo_student(
        tmp_path, divergence="ab", alpha=0.2, beta=0.7, ab_warmup_ratio=0.0
    )
    assert guard.fired_at_step is not None
    assert guard.diagnosis.student_entropy < 0.5  # from ~4.4 nats at random init
    assert guard.diagnosis.teacher_agreement < 0.6


def test_is_silent_on_a_healthy_forward_kl_demo_run(tmp_path):
    guard, logs = train_demo_student(tmp_path, divergence="fkl")
    assert guard.fired_at_step is None


def test_the_default_warmup_keeps_the_papers_setting_from_collapsing(tmp_path):
    guard, logs = train_demo_student(tmp_path, divergence="ab", alpha=0.2, beta=0.7)
    assert guard.fired_at_step is None
    assert logs[-1]["alpha"] < 0.3  # most of the way to (0.2, 0.7) by the last log
    assert logs[-1]["teacher_agreement"] > logs[0]["teacher_agreement"] + 0.2  # it did learn


@pytest.mark.parametrize(
    ("divergence", "expected"),
    [
        ("jsd", "divergence='jsd' at beta = 0.3"),
        ("srkl", "divergence='srkl' at skew_lambda = 0.2"),
        ("rkl", "with divergence='rkl': a mode-seeking"),
    ],
)
def test_message_names_the_configured_divergence_and_its_parameters(caplog, divergence, expected):
    # The registry says which fields configure each divergence; the message must follow it.
    args = ABKDConfig(
        output_dir="unused", use_cpu=True, divergence=divergence, jsd_beta=0.3, skew_lambda=0.2
    )
    with caplog.at_level(logging.WARNING):
        feed(CollapseGuardCallback(), [START] + [COLLAPSED] * 5, args=args)
    message = next(r.getMessage() for r in caplog.records if "collapsing" in r.getMessage())
    assert expected in message
    assert "at (alpha, beta)" not in message
