"""One tiny classifier distillation run, launched by `test_classifier_zero3.py`.

The same file runs as a single plain process (the reference) or as N DeepSpeed ranks started by
`torchrun`, `deepspeed` or `accelerate launch`; on CPU it uses gloo through
`abkd_trainer.core.distributed.init_cpu_distributed_state`. Student and teacher (two ViT image
classifiers of different sizes: no batch norm, whose statistics would depend on how the global
batch is split) are given to the trainer *by path*, so it loads them after the training arguments
exist and ZeRO-3 partitions them while loading.

Each rank writes `<report_dir>/rank<R>.json`: how the student and teacher engines hold their
parameters and optimizer state, and the logged trajectory (loss, grad norm and the distillation
metrics of every step). Rank 0 writes the trained student's gathered weights to
`<report_dir>/gathered_student.safetensors`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS / "distributed"), str(TESTS / "classification"), str(TESTS)]
from classifier_factories import build_image_dataset  # noqa: E402
from run_zero_distillation import describe_engine, gathered_state_dict  # noqa: E402

from abkd_trainer import ABKDClassifierConfig, ABKDClassifierTrainer  # noqa: E402
from abkd_trainer.core.distributed import (  # noqa: E402
    CONFIGURED_STATE_ACCELERATOR_CONFIG,
    finish_distributed_run,
    init_cpu_distributed_state,
)

torch.set_num_threads(1)  # two ranks share two cores

NUM_EXAMPLES = 32
LOGGED = ("loss", "grad_norm", "kd_loss", "ce_loss", "teacher_agreement", "student_entropy",
          "teacher_entropy", "accuracy")  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--student", type=Path, required=True, help="student model directory")
    parser.add_argument("--teacher", type=Path, required=True, help="teacher model directory")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--report_dir", type=Path, required=True)
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed JSON (torchrun / deepspeed)")
    parser.add_argument("--per_device_train_batch_size", type=int, default=2)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=2)
    parser.add_argument("--max_steps", type=int, default=4)
    # The `deepspeed` launcher appends --local_rank=N; the rank is read from the environment.
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # Without --deepspeed, DeepSpeed may still come from `accelerate launch`: None reads its env.
    configured_state = init_cpu_distributed_state(use_deepspeed=True if args.deepspeed else None)
    uses_deepspeed = bool(args.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    config = ABKDClassifierConfig(
        output_dir=str(args.output_dir),
        deepspeed=args.deepspeed,
        accelerator_config=CONFIGURED_STATE_ACCELERATOR_CONFIG if configured_state else None,
        use_cpu=not uses_deepspeed,  # only the single-process reference runs without DeepSpeed
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_steps=args.max_steps,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        seed=0,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    dataset = build_image_dataset(NUM_EXAMPLES)
    # Every fourth example does not count: the ranks' micro-batches hold different numbers of
    # counted examples, so only the all-process normalisation matches the single process.
    dataset = dataset.remove_columns("label").add_column(
        "label", [-100 if i % 4 == 3 else i % 4 for i in range(NUM_EXAMPLES)]
    )
    trainer = ABKDClassifierTrainer(
        model=str(args.student),
        teacher_model=str(args.teacher),
        args=config,
        train_dataset=dataset,
    )
    trainer.train()

    rank = dist.get_rank() if dist.is_initialized() else 0
    report: dict[str, Any] = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "history": [
            {"step": entry["step"], **{key: entry[key] for key in LOGGED}}
            for entry in trainer.state.log_history
            if "loss" in entry
        ],
    }
    if trainer.is_deepspeed_enabled:
        report["student"] = describe_engine(trainer.model_wrapped)
        report["teacher"] = describe_engine(trainer.teacher_model)
        weights = gathered_state_dict(trainer.model_wrapped)  # a collective under ZeRO-3
    else:
        weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    args.report_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        save_file(weights, str(args.report_dir / "gathered_student.safetensors"))
    (args.report_dir / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    finish_distributed_run(skip_interpreter_teardown=True)


if __name__ == "__main__":
    main()
