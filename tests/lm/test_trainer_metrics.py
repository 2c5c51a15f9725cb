"""ABKDTrainer is a drop-in SFTTrainer: its constructor arguments and its logged metrics.

Besides the distillation metrics, ABKDTrainer logs SFTTrainer's ``entropy``,
``mean_token_accuracy`` and ``num_tokens`` (same tokens, same definitions), and both models'
entropies ``student_entropy`` / ``teacher_entropy``, all from the loss pass itself.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from datasets import Dataset
from testing_utils import (
    build_abkd_trainer,
    build_prompt_completion_dataset,
    build_student_and_teacher,
    build_tiny_tokenizer,
    cpu_training_kwargs,
    reference_distillation_sums,
)
from trl import SFTConfig, SFTTrainer

from abkd_trainer import ABKDTrainer

BOTH_PATHS = pytest.mark.parametrize("fused", [True, False], ids=["fused", "logits"])
TEXTS = [
    "Hi. Yes.",
    "Name a colour. Blue.",
    "What is two plus two, exactly? Four, exactly four.",
    "Say a long sentence now. This is a much longer completion.",
]


def training_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "kd_loss" in entry]


@BOTH_PATHS
def test_entropies_and_accuracy_match_a_float64_reference(tmp_path, fused):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("llama", tokenizer)
    sequences = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in TEXTS]
    reference = reference_distillation_sums(
        student, teacher, sequences, [[True] * len(ids) for ids in sequences], len(tokenizer)
    )
    trainer = build_abkd_trainer(
        tmp_path,
        tokenizer=tokenizer,
        student=student,
        teacher=teacher,
        use_fused_loss=fused,
        train_dataset=Dataset.from_dict({"text": TEXTS}),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=1,
    )
    trainer.train()
    (log,) = training_logs(trainer)
    count = reference["count"]
    assert log["student_entropy"] == pytest.approx(reference["student_entropy"] / count, rel=1e-5)
    assert log["teacher_entropy"] == pytest.approx(reference["teacher_entropy"] / count, rel=1e-5)
    assert log["entropy"] == log["student_entropy"]
    assert log["mean_token_accuracy"] == pytest.approx(reference["correct"] / count, abs=1e-9)
    # Every input token, padding excluded (SFTTrainer counts the attention mask).
    assert log["num_tokens"] == sum(len(ids) for ids in sequences)
    # The random teacher is peaked, the random student near-uniform: the numbers mean something.
    assert log["teacher_entropy"] < log["student_entropy"] - 1.0


@BOTH_PATHS
def test_evaluation_logs_the_same_metrics(tmp_path, fused):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("qwen2", tokenizer)
    trainer = build_abkd_trainer(
        tmp_path, tokenizer=tokenizer, student=student, teacher=teacher, use_fused_loss=fused
    )
    metrics = trainer.evaluate(Dataset.from_dict({"text": TEXTS}))
    sequences = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in TEXTS]
    reference = reference_distillation_sums(
        student, teacher, sequences, [[True] * len(ids) for ids in sequences], len(tokenizer)
    )
    count = reference["count"]
    assert metrics["eval_student_entropy"] == pytest.approx(
        reference["student_entropy"] / count, rel=1e-5
    )
    assert metrics["eval_teacher_entropy"] == pytest.approx(
        reference["teacher_entropy"] / count, rel=1e-5
    )
    assert metrics["eval_entropy"] == metrics["eval_student_entropy"]
    assert metrics["eval_mean_token_accuracy"] == pytest.approx(reference["correct"] / count)
    assert metrics["eval_num_tokens"] == 0  # SFTTrainer's: tokens trained on so far


@BOTH_PATHS
def test_sft_metrics_equal_sfttrainers_own(tmp_path, fused):
    """Same student, data and order: SFTTrainer's first-step entropy and accuracy, and its
    running token count, are what ABKDTrainer logs."""
    tokenizer = build_tiny_tokenizer()
    dataset = build_prompt_completion_dataset()
    student, teacher = build_student_and_teacher("qwen2", tokenizer)
    common = {"per_device_train_batch_size": 2, "max_steps": 3, "logging_steps": 1}
    abkd = build_abkd_trainer(
        tmp_path / "abkd",
        tokenizer=tokenizer,
        student=student,
        teacher=teacher,
        train_dataset=dataset,
        use_fused_loss=fused,
        **common,
    )
    abkd.train()
    sft_student, _ = build_student_and_teacher("qwen2", tokenizer)
    sft = SFTTrainer(
        model=sft_student,
        args=SFTConfig(
            output_dir=str(tmp_path / "sft"), learning_rate=1e-3, **common, **cpu_training_kwargs()
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    sft.train()
    abkd_logs = training_logs(abkd)
    sft_logs = [entry for entry in sft.state.log_history if "entropy" in entry]
    assert [log["num_tokens"] for log in abkd_logs] == [log["num_tokens"] for log in sft_logs]
    assert abkd_logs[-1]["num_tokens"] > abkd_logs[0]["num_tokens"] > 0  # cumulative
    # Step 1 sees the same weights in both trainers.
    assert abkd_logs[0]["entropy"] == pytest.approx(sft_logs[0]["entropy"], rel=1e-4)
    assert abkd_logs[0]["mean_token_accuracy"] == pytest.approx(
        sft_logs[0]["mean_token_accuracy"], abs=1e-6
    )


# ----------------------------------------------------------------------------- constructor


def test_the_constructor_takes_every_sfttrainer_argument():
    sft_parameters = inspect.signature(SFTTrainer.__init__).parameters
    abkd_parameters = inspect.signature(ABKDTrainer.__init__).parameters
    missing = [name for name in sft_parameters if name not in abkd_parameters]
    assert missing == []
    for name, parameter in sft_parameters.items():
        if name not in ("self", "model"):
            assert abkd_parameters[name].default == parameter.default, name


def test_compute_loss_func_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match="distillation objective.*override `compute_loss`"):
        build_abkd_trainer(tmp_path, trainer_kwargs={"compute_loss_func": lambda *a, **k: 0.0})


def test_optimizer_cls_and_kwargs_is_used(tmp_path):
    trainer = build_abkd_trainer(
        tmp_path,
        trainer_kwargs={"optimizer_cls_and_kwargs": (torch.optim.SGD, {"momentum": 0.5})},
        max_steps=1,
    )
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer, torch.optim.SGD)
    assert trainer.optimizer.param_groups[0]["momentum"] == 0.5


def test_quantization_config_for_an_instantiated_student_is_ignored_like_sfttrainer(
    tmp_path, caplog
):
    from transformers import BitsAndBytesConfig

    trainer = build_abkd_trainer(
        tmp_path, trainer_kwargs={"quantization_config": BitsAndBytesConfig(load_in_4bit=True)}
    )
    assert not getattr(trainer.model, "is_loaded_in_4bit", False)
