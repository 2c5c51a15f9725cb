"""Mixed precision: SFTConfig's default ``bf16=True`` works with fp32, bf16 and mixed checkpoints.

On CPU, ``bf16=True`` is accelerate's bf16 autocast, as on a GPU. Both loss paths must run the
student and the teacher under it (the fused path calls the decoders itself, past the autocast that
accelerate wraps around ``forward``), and the fused path's start-up check must compare logits
computed in the same precision.
"""

from __future__ import annotations

import pytest
import torch
from testing_utils import (
    build_abkd_trainer,
    build_prompt_completion_dataset,
    build_student_and_teacher,
    build_tiny_tokenizer,
    cpu_training_kwargs,
)

from abkd_trainer import ABKDConfig, ABKDTrainer


def default_precision_kwargs() -> dict:
    """CPU test arguments without any precision flag: SFTConfig's own default (bf16) applies."""
    kwargs = cpu_training_kwargs()
    del kwargs["bf16"], kwargs["fp16"]
    return kwargs


def first_step_loss(tmp_path, *, fused: bool, bf16: bool, dtypes=(torch.float32, torch.float32)):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("qwen2", tokenizer)
    student.to(dtypes[0])
    teacher.to(dtypes[1])
    trainer = build_abkd_trainer(
        tmp_path / f"fused-{fused}-bf16-{bf16}",
        tokenizer=tokenizer,
        student=student,
        teacher=teacher,
        use_fused_loss=fused,
        bf16=bf16,
        max_steps=1,
    )
    trainer.train()
    return trainer.state.log_history[0]["loss"]


def test_the_default_precision_is_bf16():
    # The premise of this module: what users get without a precision flag.
    assert ABKDConfig(output_dir="unused", use_cpu=True).bf16 is True


def test_fp32_student_and_teacher_construct_and_train_under_the_default_bf16(tmp_path):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("llama", tokenizer)
    args = ABKDConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        logging_steps=1,
        **default_precision_kwargs(),
    )
    trainer = ABKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=build_prompt_completion_dataset(),
        processing_class=tokenizer,
    )
    assert trainer.args.bf16 and trainer.accelerator.mixed_precision == "bf16"
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(0.0 < loss < 20.0 for loss in losses)
    assert next(student.parameters()).dtype == torch.float32  # autocast, not a cast


def test_fused_and_logits_paths_give_the_same_first_step_loss_under_bf16(tmp_path):
    fused = first_step_loss(tmp_path, fused=True, bf16=True)
    logits = first_step_loss(tmp_path, fused=False, bf16=True)
    fp32 = first_step_loss(tmp_path, fused=False, bf16=False)
    # Same bf16 GEMMs on both paths: equal far within bf16's resolution (2^-8 relative)...
    assert fused == pytest.approx(logits, rel=1e-3)
    # ...while both really ran in bf16: fp32 gives a visibly different loss (0.4% here).
    assert abs(logits - fp32) > 1e-3 * fp32


@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float32),
    ],
    ids=["bf16-bf16", "fp32-student-bf16-teacher", "bf16-student-fp32-teacher"],
)
def test_bf16_and_mixed_checkpoints_agree_on_both_paths(tmp_path, dtypes):
    fused = first_step_loss(tmp_path, fused=True, bf16=True, dtypes=dtypes)
    logits = first_step_loss(tmp_path, fused=False, bf16=True, dtypes=dtypes)
    assert fused == pytest.approx(logits, rel=1e-2)


def test_the_start_up_check_still_refuses_undeclared_logit_processing_under_bf16(tmp_path):
    from transformers import Qwen2ForCausalLM

    class ScaledLogitsQwen2(Qwen2ForCausalLM):
        def forward(self, *args, **kwargs):
            outputs = super().forward(*args, **kwargs)
            outputs.logits = 1.25 * outputs.logits
            return outputs

    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("qwen2", tokenizer)
    odd_teacher = ScaledLogitsQwen2(teacher.config)
    odd_teacher.load_state_dict(teacher.state_dict())
    with pytest.raises(ValueError, match="computes something else"):
        build_abkd_trainer(
            tmp_path, tokenizer=tokenizer, student=student, teacher=odd_teacher, bf16=True
        )
