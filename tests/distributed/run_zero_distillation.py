"""One tiny distillation run, launched by ``test_deepspeed_launchers.py`` under each launcher.

The same file runs as a single plain process (the reference) or as N DeepSpeed ranks started by
``torchrun``, ``deepspeed`` or ``accelerate launch``; on CPU it uses gloo through
``abkd_trainer.core.distributed.init_cpu_distributed_state``. The student and teacher are loaded
with
``from_pretrained`` from directories the test prepared, *after* the training arguments exist, so
under ZeRO-3 they are partitioned while loading, as a real run would do.

Each rank writes ``<report_dir>/rank<R>.json``: how the student and teacher engines hold their
parameters and optimizer state (after training), plus, from every rank, the logged loss and
grad-norm trajectory (with ``--lmbda``, also the on-policy fraction and completion length of each
step). With ``--save_final`` the run also calls ``trainer.save_model`` and rank 0
writes the live (gathered) student weights to ``<report_dir>/gathered_student.safetensors`` so that
the test can compare them with what ``save_model`` wrote.
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: testing_utils
from testing_utils import build_prompt_completion_dataset, build_text_dataset  # noqa: E402

from abkd_trainer import ABKDConfig, ABKDTrainer  # noqa: E402
from abkd_trainer.core.distributed import (  # noqa: E402
    CONFIGURED_STATE_ACCELERATOR_CONFIG,
    finish_distributed_run,
    init_cpu_distributed_state,
)

torch.set_num_threads(1)  # two ranks share two cores

NUM_EXAMPLES = 16


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--student", type=Path, required=True, help="student model directory")
    parser.add_argument("--teacher", type=Path, required=True, help="teacher model directory")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--report_dir", type=Path, required=True)
    parser.add_argument("--deepspeed", default=None, help="DeepSpeed JSON (torchrun / deepspeed)")
    parser.add_argument("--per_device_train_batch_size", type=int, default=1)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=2)
    parser.add_argument("--max_steps", type=int, default=6)
    parser.add_argument("--save_steps", type=int, default=3)
    parser.add_argument("--resume_from_checkpoint", default=None)
    parser.add_argument("--save_final", action="store_true", help="call trainer.save_model")
    # On-policy distillation: prompt/completion data, completions sampled by the student.
    parser.add_argument("--lmbda", type=float, default=0.0)
    parser.add_argument("--max_new_tokens", type=int, default=8)
    parser.add_argument("--seq_kd", action="store_true", help="train on the teacher's samples")
    parser.add_argument("--ds3_gather_for_generation", choices=("true", "false"), default="true")
    # The `deepspeed` launcher appends --local_rank=N; the rank is read from the environment.
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return parser.parse_args()


def describe_engine(engine: Any) -> dict[str, Any]:
    """How a DeepSpeed engine holds its parameters and optimizer state on this rank.

    Sizes are element counts. ``full_numel`` is the unpartitioned size of every parameter,
    ``visible_numel`` what ``param.numel()`` reports now (0 for a partitioned ZeRO-3 parameter),
    ``local_shard_numel`` the elements this rank stores for ZeRO-3 parameters (its shard), and
    ``optimizer_state_numel`` the fp32 master weights this rank owns.
    """
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    params = list(engine.module.parameters())
    is_zero3 = [hasattr(p, "ds_id") for p in params]
    optimizer = engine.optimizer
    fp32_groups = getattr(optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    if fp32_groups is None:
        fp32_groups = getattr(optimizer, "single_partition_of_fp32_groups", [])  # ZeRO-1/2
    return {
        "stage": engine.zero_optimization_stage(),
        "num_params": len(params),
        "num_zero3_params": sum(is_zero3),
        "num_not_available": sum(
            1 for p in params if getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE
        ),
        "num_persistent": sum(1 for p in params if getattr(p, "ds_persist", False)),
        "full_numel": sum(int(getattr(p, "ds_numel", p.numel())) for p in params),
        "visible_numel": sum(p.numel() for p in params),
        "local_shard_numel": sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor")),
        "requires_grad": any(p.requires_grad for p in params),
        "optimizer": type(optimizer).__name__ if optimizer is not None else None,
        "optimizer_state_numel": sum(t.numel() for t in fp32_groups),
        "param_persistence_threshold": engine.zero_param_persistence_threshold(),
    }


def gathered_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """The student's full weights, gathered from every rank's shard (a collective under ZeRO-3)."""
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return {name: p.detach().clone() for name, p in module.named_parameters()}


def main() -> None:
    args = parse_args()
    # Without --deepspeed, DeepSpeed may still come from `accelerate launch`: None reads its env.
    configured_state = init_cpu_distributed_state(use_deepspeed=True if args.deepspeed else None)

    training_args = ABKDConfig(
        output_dir=str(args.output_dir),
        deepspeed=args.deepspeed,
        accelerator_config=CONFIGURED_STATE_ACCELERATOR_CONFIG if configured_state else None,
        # Only the single-process reference runs without DeepSpeed; it must stay on the CPU.
        use_cpu=not (args.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"),
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_steps=args.max_steps,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_only_model=False,
        max_length=64,
        bf16=False,
        fp16=False,
        seed=0,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        lmbda=args.lmbda,
        seq_kd=args.seq_kd,
        max_new_tokens=args.max_new_tokens,
        ds3_gather_for_generation=args.ds3_gather_for_generation == "true",
    )
    tokenizer = AutoTokenizer.from_pretrained(args.student)
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)
    trainer = ABKDTrainer(
        model=student,
        teacher_model=teacher,
        args=training_args,
        # On-policy sampling needs prompts; off-policy runs keep supervising every token.
        train_dataset=(
            build_prompt_completion_dataset(NUM_EXAMPLES)
            if args.lmbda > 0 or args.seq_kd
            else build_text_dataset(NUM_EXAMPLES)
        ),
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)

    rank = dist.get_rank() if dist.is_initialized() else 0
    report: dict[str, Any] = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "history": [
            {
                "step": entry["step"],
                "loss": entry["loss"],
                "grad_norm": entry.get("grad_norm"),
                "on_policy_fraction": entry.get("on_policy_fraction"),
                "completion_length": entry.get("completion_length"),
                "teacher_sampled_fraction": entry.get("teacher_sampled_fraction"),
            }
            for entry in trainer.state.log_history
            if "loss" in entry
        ],
    }
    if trainer.is_deepspeed_enabled:
        report["student"] = describe_engine(trainer.model_wrapped)
        report["teacher"] = describe_engine(trainer.teacher_model)

    args.report_dir.mkdir(parents=True, exist_ok=True)
    if args.save_final:
        trainer.save_model(str(args.output_dir / "final"))
        # Gathering is a collective under ZeRO-3: every rank takes part, rank 0 writes.
        if trainer.is_deepspeed_enabled:
            weights = gathered_state_dict(trainer.model_wrapped)
        else:
            weights = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
        if rank == 0:
            save_file(weights, str(args.report_dir / "gathered_student.safetensors"))
    (args.report_dir / f"rank{rank}.json").write_text(json.dumps(report, indent=1))
    finish_distributed_run(skip_interpreter_teardown=True)


if __name__ == "__main__":
    main()
