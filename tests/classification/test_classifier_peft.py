"""A LoRA student: adapters and the classifier head train, the backbone and the teacher do not."""

from __future__ import annotations

import pytest
import torch
from classifier_factories import (
    build_bert_classifier,
    build_text_classification_dataset,
    classifier_training_kwargs,
)
from testing_utils import build_tiny_tokenizer

from abkd_trainer import ABKDClassifierConfig, ABKDClassifierTrainer
from abkd_trainer.classification.models import classifier_head_modules

peft = pytest.importorskip("peft", reason="the `peft` extra is not installed")


def lora_trainer(tmp_path, lora):
    tokenizer = build_tiny_tokenizer()
    student = build_bert_classifier(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    teacher = build_bert_classifier(
        vocab_size=len(tokenizer),
        seed=2,
        initializer_range=0.5,
        pad_token_id=tokenizer.pad_token_id,
    )
    return ABKDClassifierTrainer(
        model=student,
        teacher_model=teacher,
        args=ABKDClassifierConfig(**classifier_training_kwargs(tmp_path, max_steps=3)),
        train_dataset=build_text_classification_dataset(tokenizer, 8),
        eval_dataset=build_text_classification_dataset(tokenizer, 4),
        processing_class=tokenizer,
        peft_config=lora,
    )


def test_lora_student_trains_adapters_and_its_head(tmp_path):
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0)
    trainer = lora_trainer(tmp_path, lora)
    assert lora.modules_to_save is None  # the user's config is not modified
    student = trainer.model
    assert isinstance(student, peft.PeftModel)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    teacher_before = [p.detach().clone() for p in trainer.teacher_model.parameters()]
    trainer.train()

    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    assert any("lora_" in name for name in trainable)
    assert any("classifier" in name and "modules_to_save" in name for name in trainable)
    assert all("lora_" in name or "modules_to_save" in name for name in trainable)
    for name, p in student.named_parameters():
        if name in trainable and "lora_A" not in name:  # A moves from the second step on
            assert not torch.equal(p, before[name]), name
        elif name not in trainable:
            assert torch.equal(p, before[name]), name
    for p, p_before in zip(trainer.teacher_model.parameters(), teacher_before, strict=True):
        assert torch.equal(p, p_before)
    assert "eval_accuracy" in trainer.evaluate()  # labels are gathered for a PEFT student

    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    saved = peft.PeftConfig.from_pretrained(tmp_path / "adapter")
    assert "classifier" in saved.modules_to_save


def test_head_modules_are_the_children_beside_the_backbone():
    tokenizer = build_tiny_tokenizer()
    assert classifier_head_modules(build_bert_classifier(vocab_size=len(tokenizer))) == [
        "classifier"
    ]


def test_a_peft_model_with_a_peft_config_is_refused(tmp_path):
    lora = peft.LoraConfig(r=2, target_modules=["query"])
    tokenizer = build_tiny_tokenizer()
    student = peft.get_peft_model(build_bert_classifier(vocab_size=len(tokenizer)), lora)
    with pytest.raises(ValueError, match=r"already a PEFT model"):
        ABKDClassifierTrainer(
            model=student,
            teacher_model=build_bert_classifier(vocab_size=len(tokenizer)),
            args=ABKDClassifierConfig(**classifier_training_kwargs(tmp_path)),
            peft_config=lora,
        )
