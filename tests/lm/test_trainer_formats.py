"""Training runs on every dataset format SFTTrainer accepts, on every test architecture."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from testing_utils import (
    SUPPORTED_ARCHS,
    build_abkd_trainer,
    build_conversational_dataset,
    build_conversational_prompt_completion_dataset,
    build_prompt_completion_dataset,
    build_text_dataset,
)

FORMATS = {
    "text": (build_text_dataset, {}),
    "prompt_completion": (build_prompt_completion_dataset, {}),
    "conversational_assistant_only": (build_conversational_dataset, {"assistant_only_loss": True}),
    "conversational_prompt_completion": (build_conversational_prompt_completion_dataset, {}),
    "packing": (build_text_dataset, {"packing": True, "max_length": 64}),
}


@pytest.mark.parametrize("dataset_format", sorted(FORMATS))
@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_trains_and_reduces_the_divergence(tmp_path, arch, dataset_format):
    build_dataset, overrides = FORMATS[dataset_format]
    trainer = build_abkd_trainer(
        tmp_path,
        arch=arch,
        train_dataset=build_dataset(8),
        max_steps=8,
        learning_rate=3e-3,
        # One fixed objective, so that early and late kd_loss values are comparable.
        ab_warmup_ratio=0.0,
        **overrides,
    )
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logs = [log for log in trainer.state.log_history if "kd_loss" in log]
    assert len(logs) == 8
    assert all(math.isfinite(log["loss"]) and math.isfinite(log["ce_loss"]) for log in logs)
    assert all(0.0 <= log["teacher_agreement"] <= 1.0 for log in logs)
    assert any(
        not torch.equal(p, b) for p, b in zip(trainer.model.parameters(), before, strict=True)
    )
    # Distillation makes progress: late steps sit below early ones.
    first, last = logs[0]["kd_loss"] + logs[1]["kd_loss"], logs[-1]["kd_loss"] + logs[-2]["kd_loss"]
    assert last < first


def test_formatting_func_is_applied(tmp_path):
    source = build_prompt_completion_dataset(8)
    dataset = Dataset.from_dict({"question": source["prompt"], "answer": source["completion"]})
    trainer = build_abkd_trainer(
        tmp_path,
        train_dataset=dataset,
        trainer_kwargs={"formatting_func": lambda row: f"Q: {row['question']} A:{row['answer']}"},
    )
    decoded = trainer.processing_class.decode(trainer.train_dataset[0]["input_ids"])
    assert decoded.startswith("Q: ") and " A: " in decoded
    trainer.train()
    assert [log for log in trainer.state.log_history if "kd_loss" in log]
