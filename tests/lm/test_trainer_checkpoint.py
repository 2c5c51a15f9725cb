"""Saving writes the student alone, in safetensors; resuming reproduces the loss trajectory."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from testing_utils import build_abkd_trainer, build_student_and_teacher, build_tiny_tokenizer
from transformers import AutoModelForCausalLM


def safetensors_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})  # noqa: SIM118
    return shapes


def assert_holds_exactly_the_student(directory: Path, model) -> None:
    """Every stored tensor is a student tensor, and reloading gives the student back."""
    student = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    stored = safetensors_shapes(directory)
    assert stored and stored.items() <= student.items()  # tied weights are stored once
    reloaded = AutoModelForCausalLM.from_pretrained(directory)
    trained = model.state_dict()
    assert reloaded.state_dict().keys() == trained.keys()
    for name, tensor in reloaded.state_dict().items():
        torch.testing.assert_close(tensor, trained[name], rtol=0, atol=0)


def test_save_model_writes_a_loadable_student_and_no_teacher(tmp_path):
    trainer = build_abkd_trainer(tmp_path / "run", arch="llama")
    trainer.train()
    output_dir = tmp_path / "student"
    trainer.save_model(str(output_dir))

    assert (output_dir / "model.safetensors").is_file()
    assert not list(output_dir.glob("pytorch_model*")), "weights must be safetensors only"
    assert_holds_exactly_the_student(output_dir, trainer.model)
    assert (output_dir / "README.md").is_file()  # the model card travels with the weights


def test_checkpoints_hold_only_the_student(tmp_path):
    trainer = build_abkd_trainer(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file()
    assert_holds_exactly_the_student(checkpoint, trainer.model)
    teacher_bytes = sum(p.numel() * p.element_size() for p in trainer.teacher_model.parameters())
    stored_bytes = sum(path.stat().st_size for path in checkpoint.rglob("*") if path.is_file())
    assert stored_bytes < teacher_bytes  # nothing of the (larger) teacher is written


def losses_by_step(trainer) -> dict[int, float]:
    return {log["step"]: log["loss"] for log in trainer.state.log_history if "loss" in log}


def fresh_trainer(output_dir, **overrides):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("qwen2", tokenizer)
    return build_abkd_trainer(
        output_dir,
        tokenizer=tokenizer,
        student=student,
        teacher=teacher,
        max_steps=6,  # 8 examples, batch 2: the run crosses an epoch boundary
        save_strategy="steps",
        save_steps=3,
        # The schedule must resume from the restored step too: warm-up over steps 0-2, then
        # alpha_end over steps 3-5 (resumed at checkpoint-3, the boundary between them).
        ab_warmup_ratio=0.5,
        alpha_end=0.9,
        **overrides,
    )


def test_resume_from_checkpoint_reproduces_the_uninterrupted_losses(tmp_path):
    uninterrupted = fresh_trainer(tmp_path / "full")
    uninterrupted.train()
    expected = losses_by_step(uninterrupted)
    assert sorted(expected) == [1, 2, 3, 4, 5, 6]
    assert len(set(expected.values())) == 6  # the steps really differ

    resumed = fresh_trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    # log_history comes back with the checkpoint (steps 1-3); steps 4-6 are trained again.
    assert resumed.state.global_step == 6
    observed = losses_by_step(resumed)
    assert sorted(observed) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert observed[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7)
    alphas = [log["alpha"] for log in resumed.state.log_history if "alpha" in log]
    warmup = [1.0 - 0.8 * k / 3 for k in range(3)]  # from forward KL's 1 towards 0.2
    assert alphas == pytest.approx(warmup + [0.2 + 0.7 * k / 3 for k in range(3)])


def test_resume_true_skips_an_incomplete_checkpoint(tmp_path):
    uninterrupted = fresh_trainer(tmp_path / "full")
    uninterrupted.train()
    expected = losses_by_step(uninterrupted)
    # The run was killed while writing its second checkpoint: no trainer_state.json.
    (tmp_path / "full" / "checkpoint-6" / "trainer_state.json").unlink()

    resumed = fresh_trainer(tmp_path / "full")
    with pytest.warns(UserWarning, match="incomplete checkpoint .*checkpoint-6"):
        resumed.train(resume_from_checkpoint=True)

    assert resumed.state.global_step == 6
    observed = losses_by_step(resumed)
    for step in (4, 5, 6):
        assert observed[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7)


def test_training_afresh_in_a_used_output_dir_warns_once(tmp_path):
    build_abkd_trainer(tmp_path, save_strategy="steps", save_steps=2).train()
    assert (tmp_path / "checkpoint-2").is_dir()

    second = build_abkd_trainer(tmp_path, save_strategy="no")
    with pytest.warns(UserWarning, match="already holds an earlier run .*checkpoint-2") as record:
        second.train()
    assert sum("earlier run" in str(warning.message) for warning in record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        second.train()  # warned once already


def test_overwrite_output_dir_removes_the_earlier_runs_checkpoints(tmp_path):
    build_abkd_trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=2).train()
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        build_abkd_trainer(
            tmp_path, max_steps=2, save_strategy="steps", save_steps=2, overwrite_output_dir=True
        ).train()

    # Only the new run's checkpoint is left, so resuming "from the latest" finds the new run.
    assert [path.name for path in tmp_path.glob("checkpoint-*")] == ["checkpoint-2"]
    state = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["max_steps"] == 2
