"""Non-finite teacher or student outputs stop training before they reach the student's weights."""

from __future__ import annotations

import math

import pytest
import torch
from testing_utils import build_abkd_trainer, build_student_and_teacher, build_tiny_tokenizer
from transformers import TrainerCallback

from abkd_trainer.core.numerics import (
    NonFiniteError,
    check_finite_outputs,
    check_finite_step,
    non_finite_parameters,
)

BOTH_PATHS = pytest.mark.parametrize("fused", [True, False], ids=["fused", "logits"])


def poison_(model, value=math.nan):
    """Write ``value`` into one entry of the final norm's weight: every logit becomes non-finite."""
    with torch.no_grad():
        model.model.norm.weight[0] = value


def make_models():
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("qwen2", tokenizer)
    return tokenizer, student, teacher


def test_non_finite_parameters_names_them():
    _, student, _ = make_models()
    assert non_finite_parameters(student) == []
    poison_(student, math.inf)
    assert non_finite_parameters(student) == ["model.norm.weight (1 of 32 values)"]


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_start_up_probe_refuses_a_non_finite_model(value):
    _, _, teacher = make_models()
    check_finite_outputs("teacher", teacher.eval())  # a healthy teacher passes
    poison_(teacher, value)
    with pytest.raises(NonFiniteError, match=r"teacher.*non-finite logits.*model\.norm\.weight"):
        check_finite_outputs("teacher", teacher)


@BOTH_PATHS
@pytest.mark.parametrize("who", ["teacher", "student"])
def test_construction_refuses_a_non_finite_model(tmp_path, fused, who):
    tokenizer, student, teacher = make_models()
    poison_(teacher if who == "teacher" else student)
    with pytest.raises(NonFiniteError, match=rf"The {who} .*fp16 overflow.*corrupted weights"):
        build_abkd_trainer(
            tmp_path, tokenizer=tokenizer, student=student, teacher=teacher, use_fused_loss=fused
        )


class _PoisonAfterFirstStep(TrainerCallback):
    """Corrupts a model after optimizer step 1 and remembers the student's weights then."""

    def __init__(self, trainer, who):
        self.trainer, self.who = trainer, who
        self.student_after_step_1 = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != 1:
            return
        model = self.trainer.teacher_model if self.who == "teacher" else self.trainer.model
        poison_(model)
        self.student_after_step_1 = {
            name: param.detach().clone() for name, param in self.trainer.model.named_parameters()
        }


@BOTH_PATHS
def test_a_teacher_turning_nan_stops_training_before_the_optimizer_step(tmp_path, fused):
    tokenizer, student, teacher = make_models()
    trainer = build_abkd_trainer(
        tmp_path,
        tokenizer=tokenizer,
        student=student,
        teacher=teacher,
        use_fused_loss=fused,
        max_steps=3,
        save_strategy="steps",
        save_steps=1,
    )
    poisoner = _PoisonAfterFirstStep(trainer, "teacher")
    trainer.add_callback(poisoner)
    with pytest.raises(NonFiniteError) as error:
        trainer.train()
    message = str(error.value)
    assert "teacher's log-probabilities are not finite" in message
    assert "training step 2" in message and "before this step's optimizer update" in message
    assert "fp16 overflow" in message and "corrupted weights" in message
    # The student is exactly what step 1 left: no NaN update was applied...
    for name, param in trainer.model.named_parameters():
        torch.testing.assert_close(param, poisoner.student_after_step_1[name], rtol=0, atol=0)
    # ...and the only checkpoint is the good one of step 1.
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]


@BOTH_PATHS
def test_a_student_turning_nan_stops_training_with_a_clear_error(tmp_path, fused):
    tokenizer, student, teacher = make_models()
    trainer = build_abkd_trainer(
        tmp_path,
        tokenizer=tokenizer,
        student=student,
        teacher=teacher,
        use_fused_loss=fused,
        max_steps=3,
    )
    trainer.add_callback(_PoisonAfterFirstStep(trainer, "student"))
    with pytest.raises(NonFiniteError, match=r"student's logits are not finite.*training step 2"):
        trainer.train()


@BOTH_PATHS
def test_evaluation_with_a_nan_teacher_fails_instead_of_logging_nonsense(tmp_path, fused):
    from testing_utils import build_prompt_completion_dataset

    tokenizer, student, teacher = make_models()
    trainer = build_abkd_trainer(
        tmp_path, tokenizer=tokenizer, student=student, teacher=teacher, use_fused_loss=fused
    )
    poison_(trainer.teacher_model)
    with pytest.raises(NonFiniteError, match="during the evaluation after step 0"):
        trainer.evaluate(build_prompt_completion_dataset(2))


def test_check_finite_step_names_what_is_not_finite():
    finite = torch.tensor(1.0)
    check_finite_step(
        teacher_entropy_sum=finite, student_entropy_sum=finite, loss=finite, step=3, training=True
    )
    with pytest.raises(NonFiniteError, match="loss is not finite"):
        check_finite_step(
            teacher_entropy_sum=finite,
            student_entropy_sum=finite,
            loss=torch.tensor(math.inf),
            step=3,
            training=True,
        )
    with pytest.raises(NonFiniteError, match="teacher's log-probabilities"):
        check_finite_step(
            teacher_entropy_sum=torch.tensor(math.nan),
            student_entropy_sum=torch.tensor(math.nan),
            loss=torch.tensor(math.nan),
            step=3,
            training=True,
        )
