"""The teacher: how it is given, loaded, checked against the tokenizer, frozen and placed."""

from __future__ import annotations

import pytest
import torch
from testing_utils import (
    build_abkd_trainer,
    build_prompt_completion_dataset,
    build_student_and_teacher,
    build_tiny_causal_lm,
    build_tiny_tokenizer,
    cpu_training_kwargs,
)
from transformers import TrainingArguments

from abkd_trainer import ABKDConfig, ABKDTrainer


def save_teacher(directory, teacher, tokenizer):
    teacher.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_teacher_is_frozen_in_eval_mode_on_the_student_device_and_never_optimised(tmp_path):
    trainer = build_abkd_trainer(tmp_path, max_steps=3)
    teacher = trainer.teacher_model
    before = {name: p.detach().clone() for name, p in teacher.named_parameters()}
    trainer.train()

    assert all(not p.requires_grad for p in teacher.parameters())
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised.isdisjoint(id(p) for p in teacher.parameters())
    assert optimised == {id(p) for p in trainer.model.parameters() if p.requires_grad}
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=0)

    trainer.model.train()  # what Trainer does at every step
    assert not any(module.training for module in teacher.modules())
    student_device = next(trainer.model.parameters()).device
    assert {p.device for p in teacher.parameters()} == {student_device}


def test_teacher_dropout_never_applies(tmp_path):
    tokenizer = build_tiny_tokenizer()
    student, _ = build_student_and_teacher("gpt2", tokenizer)
    teacher = build_tiny_causal_lm("gpt2", tokenizer, hidden_size=64, num_layers=2, seed=1)
    teacher.config.resid_pdrop = teacher.config.embd_pdrop = teacher.config.attn_pdrop = 0.5
    for module in teacher.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    trainer = build_abkd_trainer(tmp_path, tokenizer=tokenizer, student=student, teacher=teacher)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    trainer.teacher_model.train()  # even a caller switching it back cannot bring dropout back
    losses = {trainer.compute_loss(trainer.model, dict(batch)).item() for _ in range(3)}
    assert len(losses) == 1


def test_student_dropout_is_disabled_by_default(tmp_path):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("gpt2", tokenizer)
    assert any(m.p > 0 for m in student.modules() if isinstance(m, torch.nn.Dropout))
    trainer = build_abkd_trainer(tmp_path, tokenizer=tokenizer, student=student, teacher=teacher)
    assert all(m.p == 0 for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout))


def test_teacher_given_by_path_is_loaded_with_its_init_kwargs(tmp_path):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("llama", tokenizer)
    teacher_dir = save_teacher(tmp_path / "teacher", teacher, tokenizer)
    trainer = build_abkd_trainer(
        tmp_path / "run",
        tokenizer=tokenizer,
        student=student,
        teacher=teacher_dir,
        teacher_model_init_kwargs={"dtype": "bfloat16"},
    )
    assert {p.dtype for p in trainer.teacher_model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    assert trainer.teacher_name == teacher_dir
    metrics = trainer.evaluate(build_prompt_completion_dataset(4))
    assert 0 < metrics["eval_kd_loss"] < float("inf")


def test_teacher_defaults_to_the_configured_name_or_path(tmp_path):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("qwen2", tokenizer)
    teacher_dir = save_teacher(tmp_path / "teacher", teacher, tokenizer)
    args = ABKDConfig(
        output_dir=str(tmp_path / "run"),
        teacher_model_name_or_path=teacher_dir,
        **cpu_training_kwargs(),
    )
    trainer = ABKDTrainer(
        model=student,
        args=args,
        train_dataset=build_prompt_completion_dataset(4),
        processing_class=tokenizer,
    )
    assert trainer.teacher_name == teacher_dir
    loaded = dict(trainer.teacher_model.named_parameters())
    for name, p in teacher.named_parameters():
        torch.testing.assert_close(loaded[name], p)


def test_a_teacher_is_required(tmp_path):
    tokenizer = build_tiny_tokenizer()
    student, _ = build_student_and_teacher("qwen2", tokenizer)
    args = ABKDConfig(output_dir=str(tmp_path), **cpu_training_kwargs())
    with pytest.raises(ValueError, match="needs a teacher"):
        ABKDTrainer(
            model=student,
            args=args,
            train_dataset=build_prompt_completion_dataset(4),
            processing_class=tokenizer,
        )


def test_init_kwargs_with_an_instantiated_teacher_raise(tmp_path):
    with pytest.raises(ValueError, match="teacher_model_init_kwargs"):
        build_abkd_trainer(tmp_path, teacher_model_init_kwargs={"dtype": "bfloat16"})


def test_a_teacher_with_another_tokenizer_raises_naming_both(tmp_path):
    student_tokenizer = build_tiny_tokenizer()
    teacher_tokenizer = build_tiny_tokenizer(extra_special_tokens=["<|tool_call|>"])
    student, _ = build_student_and_teacher("qwen2", student_tokenizer)
    _, teacher = build_student_and_teacher("qwen2", teacher_tokenizer)
    teacher_dir = save_teacher(tmp_path / "teacher", teacher, teacher_tokenizer)
    with pytest.raises(ValueError) as raised:
        build_abkd_trainer(
            tmp_path / "run", tokenizer=student_tokenizer, student=student, teacher=teacher_dir
        )
    message = str(raised.value)
    assert teacher_dir in message
    assert "261 tokens" in message and "260 tokens" in message
    assert "<|tool_call|>" in message


def test_a_teacher_narrower_than_the_tokenizer_raises(tmp_path):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("qwen2", tokenizer)
    teacher.resize_token_embeddings(200)
    with pytest.raises(ValueError, match=r"teacher \(Qwen2ForCausalLM\) has 200 output logits"):
        build_abkd_trainer(tmp_path, tokenizer=tokenizer, student=student, teacher=teacher)


def test_plain_training_arguments_are_converted(tmp_path):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("qwen2", tokenizer)
    args = TrainingArguments(output_dir=str(tmp_path), **cpu_training_kwargs())
    trainer = ABKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=build_prompt_completion_dataset(4),
        processing_class=tokenizer,
    )
    assert isinstance(trainer.args, ABKDConfig)
    assert (trainer.args.alpha, trainer.args.beta) == (0.2, 0.7)
