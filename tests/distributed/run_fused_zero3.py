"""A tiny distillation run with a chosen loss path, launched by ``test_fused_zero3.py``.

As one plain process it is the reference (``--use_fused_loss false``: both models' logits are
built); under ``torchrun`` with ``--deepspeed`` it is the sharded run (``--use_fused_loss true``:
hidden states and partitioned LM heads, gathered for the projection). Models are loaded with
``from_pretrained`` after the training arguments exist, so under ZeRO-3 they are partitioned while
loading. Each rank writes ``<report_dir>/rank<R>.json`` with the logged trajectory and how its
student engine holds the LM head.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from run_zero_distillation import NUM_EXAMPLES, describe_engine  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: testing_utils
from testing_utils import build_prompt_completion_dataset  # noqa: E402

from abkd_trainer import ABKDConfig, ABKDTrainer  # noqa: E402
from abkd_trainer.core.distributed import (  # noqa: E402
    CONFIGURED_STATE_ACCELERATOR_CONFIG,
    finish_distributed_run,
    init_cpu_distributed_state,
)

torch.set_num_threads(1)  # two ranks share two cores


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--student", type=Path, required=True, help="student model directory")
    parser.add_argument("--teacher", type=Path, required=True, help="teacher model directory")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--report_dir", type=Path, required=True)
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed JSON")
    parser.add_argument("--use_fused_loss", choices=("true", "false"), required=True)
    parser.add_argument("--per_device_train_batch_size", type=int, default=1)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=2)
    parser.add_argument("--max_steps", type=int, default=4)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return parser.parse_args()


def describe_lm_head(engine) -> dict[str, int]:
    """Full and locally stored sizes of the student's LM head weight on this rank."""
    weight = engine.module.get_output_embeddings().weight
    return {
        "full_numel": int(getattr(weight, "ds_numel", weight.numel())),
        "visible_numel": weight.numel(),
        "local_shard_numel": weight.ds_tensor.numel() if hasattr(weight, "ds_tensor") else -1,
        "tied_to_input_embeddings": weight is engine.module.get_input_embeddings().weight,
    }


def main() -> None:
    args = parse_args()
    configured_state = init_cpu_distributed_state(use_deepspeed=bool(args.deepspeed))
    training_args = ABKDConfig(
        output_dir=str(args.output_dir),
        deepspeed=args.deepspeed,
        accelerator_config=CONFIGURED_STATE_ACCELERATOR_CONFIG if configured_state else None,
        use_cpu=not args.deepspeed,
        use_fused_loss=args.use_fused_loss == "true",
        # Cross-entropy in the objective too, so its fused gradient is exercised.
        kd_ratio=0.5,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_steps=args.max_steps,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        max_length=64,
        bf16=False,
        fp16=False,
        seed=0,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)
    trainer = ABKDTrainer(
        model=student,
        teacher_model=teacher,
        args=training_args,
        train_dataset=build_prompt_completion_dataset(NUM_EXAMPLES),
        processing_class=tokenizer,
    )
    trainer.train()

    rank = dist.get_rank() if dist.is_initialized() else 0
    report = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "use_fused_loss": trainer.args.use_fused_loss,
        "history": [
            {key: entry.get(key) for key in ("step", "loss", "grad_norm", "kd_loss", "ce_loss")}
            for entry in trainer.state.log_history
            if "loss" in entry
        ],
    }
    if trainer.is_deepspeed_enabled:
        report["student"] = describe_engine(trainer.model_wrapped)
        report["lm_head"] = describe_lm_head(trainer.model_wrapped)
    args.report_dir.mkdir(parents=True, exist_ok=True)
    (args.report_dir / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    finish_distributed_run(skip_interpreter_teardown=True)


if __name__ == "__main__":
    main()
