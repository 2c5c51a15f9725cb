"""A LoRA student trains its adapters only; the base weights and the teacher stay put."""

from __future__ import annotations

import pytest
import torch
from testing_utils import build_abkd_trainer

peft = pytest.importorskip("peft", reason="the `peft` extra is not installed")


def test_lora_student_trains_only_its_adapters(tmp_path):
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = build_abkd_trainer(
        tmp_path, trainer_kwargs={"peft_config": lora}, max_steps=3, learning_rate=1e-2
    )
    student = trainer.model
    assert isinstance(student, peft.PeftModel)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    teacher_before = [p.detach().clone() for p in trainer.teacher_model.parameters()]
    trainer.train()

    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for name, p in student.named_parameters() if name in trainable}
    for name, p in student.named_parameters():
        moved = not torch.equal(p, before[name])
        # Adapters move (B starts at zero, A follows from step 2); everything else is frozen.
        assert moved == (name in trainable), name
    for p, p_before in zip(trainer.teacher_model.parameters(), teacher_before, strict=True):
        assert torch.equal(p, p_before)

    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
