"""Gradient accumulation gives the update, and the logs, of one large batch."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from testing_utils import (
    SUPPORTED_ARCHS,
    build_abkd_trainer,
    build_student_and_teacher,
    build_tiny_tokenizer,
    reference_distillation_sums,
)

# Prompts and completions of clearly different lengths, so a per-micro-batch mean (the classic
# accumulation bug) weights tokens differently from the large batch.
PROMPTS = ["Hi.", "Name a colour.", "What is two plus two, exactly?", "Say a long sentence now."]
COMPLETIONS = [" Yes.", " Blue.", " Four, exactly four.", " This is a much longer completion."]


def uneven_dataset() -> Dataset:
    return Dataset.from_dict({"prompt": PROMPTS, "completion": COMPLETIONS})


def one_sgd_step(tmp_path, arch, batch_size, accumulation):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher(arch, tokenizer)
    initial = {name: p.detach().clone() for name, p in student.named_parameters()}
    trainer = build_abkd_trainer(
        tmp_path / f"b{batch_size}-ga{accumulation}",
        tokenizer=tokenizer,
        student=student,
        teacher=teacher,
        train_dataset=uneven_dataset(),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,  # no clipping: compare raw updates
    )
    trainer.train()
    final = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return trainer, initial, final


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_accumulation_matches_one_large_batch(tmp_path, arch):
    _, initial, large_batch = one_sgd_step(tmp_path, arch, batch_size=4, accumulation=1)
    _, _, accumulated = one_sgd_step(tmp_path, arch, batch_size=1, accumulation=4)
    largest_update = max((large_batch[n] - initial[n]).abs().max().item() for n in initial)
    assert largest_update > 1e-3, "the step must move the weights for the comparison to mean much"
    for name in initial:
        torch.testing.assert_close(accumulated[name], large_batch[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_logged_metrics_are_token_weighted_over_accumulation(tmp_path, arch):
    # `text` rows supervise their first token too: a count of unshifted labels (what Trainer
    # does for GPT-2) would be off by one per row and show up in `loss`.
    texts = [prompt + completion for prompt, completion in zip(PROMPTS, COMPLETIONS, strict=True)]
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher(arch, tokenizer)
    # The reference uses the weights before the single step, the ones the logged losses saw.
    sequences = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
    targets = [[True] * len(ids) for ids in sequences]
    reference = reference_distillation_sums(
        student, teacher, sequences, targets, vocab_size=len(tokenizer)
    )

    trainer = build_abkd_trainer(
        tmp_path,
        tokenizer=tokenizer,
        student=student,
        teacher=teacher,
        train_dataset=Dataset.from_dict({"text": texts}),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=4,
        max_steps=1,
        ab_warmup_ratio=0.0,  # the reference uses the configured (alpha, beta)
    )
    trainer.train()
    (log,) = [entry for entry in trainer.state.log_history if "kd_loss" in entry]
    count = reference["count"]
    assert log["kd_loss"] == pytest.approx(reference["kd"] / count, rel=1e-5)
    assert log["ce_loss"] == pytest.approx(reference["ce"] / count, rel=1e-5)
    assert log["teacher_agreement"] == pytest.approx(reference["agree"] / count, abs=1e-9)
    # Trainer's `loss` sums the per-micro-batch losses, each already divided by the step's
    # token count, so it is the same token-weighted mean.
    assert log["loss"] == pytest.approx(reference["kd"] / count, rel=1e-5)
