"""Data parallelism (two CPU ranks, gloo) gives the update and the logs of one large batch.

The test launches this same file under ``torchrun --nproc_per_node 2``; each rank trains one
SGD step on half of an uneven batch (with gradient accumulation), and rank 0 writes the weights
and the step's log. The reference is the same step in this process on the whole batch at once.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # testing_utils, when run by torchrun
from testing_utils import (  # noqa: E402
    build_abkd_trainer,
    build_student_and_teacher,
    build_tiny_tokenizer,
)

WORLD_SIZE = 2
# Rows of clearly different lengths, so per-rank means would weight tokens wrongly.
TEXTS = [
    "Hi.",
    "Name a colour. Blue.",
    "What is two plus two, exactly? Four, exactly four.",
    "Say a long sentence now. This is a much longer completion than the others.",
]
METRICS = ("loss", "kd_loss", "ce_loss", "teacher_agreement")


def one_step(output_dir: Path, per_device_batch: int, accumulation: int):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("llama", tokenizer)
    trainer = build_abkd_trainer(
        output_dir,
        tokenizer=tokenizer,
        student=student,
        teacher=teacher,
        train_dataset=Dataset.from_dict({"text": TEXTS}),
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        kd_ratio=0.5,  # both loss terms take part in the gradient
    )
    trainer.train()
    (log,) = [entry for entry in trainer.state.log_history if "kd_loss" in entry]
    return trainer, {key: log[key] for key in METRICS}


def worker(output_dir: Path) -> None:
    from abkd_trainer.core.distributed import finish_distributed_run

    torch.set_num_threads(1)
    trainer, log = one_step(output_dir / "run", per_device_batch=1, accumulation=2)
    if trainer.accelerator.num_processes != WORLD_SIZE:
        raise RuntimeError(f"expected {WORLD_SIZE} ranks, got {trainer.accelerator.num_processes}")
    if trainer.accelerator.is_main_process:
        weights = trainer.accelerator.unwrap_model(trainer.model).state_dict()
        save_file(
            {k: v.contiguous() for k, v in weights.items()}, output_dir / "weights.safetensors"
        )
        (output_dir / "log.json").write_text(json.dumps(log))
    finish_distributed_run(skip_interpreter_teardown=True)  # gloo ranks may abort at exit


@pytest.mark.slow
def test_two_ranks_match_one_large_batch(tmp_path):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]
        ),
    }
    command = [
        str(Path(sys.executable).parent / "torchrun"),
        "--standalone",
        f"--nproc_per_node={WORLD_SIZE}",
        __file__,
        "--output_dir",
        str(tmp_path),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    reference, reference_log = one_step(tmp_path / "reference", per_device_batch=4, accumulation=1)
    distributed_log = json.loads((tmp_path / "log.json").read_text())
    for key in METRICS:
        assert distributed_log[key] == pytest.approx(reference_log[key], rel=1e-5), key

    distributed = load_file(tmp_path / "weights.safetensors")
    trained = reference.model.state_dict()
    assert distributed.keys() == trained.keys()
    for name, tensor in trained.items():
        torch.testing.assert_close(distributed[name], tensor, rtol=0, atol=1e-5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="one rank of test_two_ranks_match_one_large_batch")
    parser.add_argument("--output_dir", type=Path, required=True)
    worker(parser.parse_args().output_dir)
