"""`abkd-cache-teacher`: run a teacher once over a dataset and store its top-k log-probabilities.

Takes `abkd-train`'s flags (the same `trl.TrlParser` over the script arguments,
`ABKDConfig`, `trl.ModelConfig` and the dataset mixtures, so a
training YAML works as it is) plus `--top_k`, `--cache_dtype` and `--cache_shard_size`.
The preprocessing flags (`--max_length`, `--packing`, `--completion_only_loss`,
`--assistant_only_loss`, `--dataset_text_field`, `--seed`, ...) must be those of the
training run, which checks them against the cache's manifest. `--model_name_or_path` names the
student whose tokenizer training uses (default: the teacher's). The evaluation split is cached too
when `--eval_strategy` is not `no`. Runs under `accelerate launch` / `torchrun` /
`deepspeed` with the shards spread over the processes (`--deepspeed` with a ZeRO-3 config
shards the teacher), and skips the shards a previous run finished:

    abkd-cache-teacher --teacher_model_name_or_path Qwen/Qwen2.5-7B-Instruct \\
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name data/train.jsonl \\
        --max_length 1024 --top_k 64 --output_dir cache/qwen7b-top64
    abkd-train --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --teacher_cache cache/qwen7b-top64 \\
        --dataset_name data/train.jsonl --max_length 1024 --output_dir out

With no teacher and no dataset it caches the demo teacher on the demo data (the settings of
`abkd-train`'s demo) into `abkd-demo-teacher-cache`; `abkd-train --teacher_cache
abkd-demo-teacher-cache` then runs the demo from it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trl import TrlParser

DEMO_CACHE_DIR = "abkd-demo-teacher-cache"


@dataclass
class TeacherCacheArguments:
    """What to keep of the teacher's distribution at each supervised position."""

    top_k: int = field(
        default=64,
        metadata={
            "help": "Token ids kept per supervised position (their log-probabilities and the log "
            "of the remaining mass are stored too). The tokenizer's size keeps everything."
        },
    )
    cache_dtype: str = field(
        default="bfloat16",
        metadata={
            "help": "Storage of the log-probabilities: 'bfloat16' (6 bytes per id and "
            "log-probability), 'float16' or 'float32'. Ids are int32."
        },
    )
    cache_shard_size: int = field(
        default=1024,
        metadata={
            "help": "Prepared rows per shard: the unit of work per process and of resumption."
        },
    )


def make_parser(prog: str | None = "abkd-cache-teacher") -> TrlParser:
    """`abkd-train`'s parser with `TeacherCacheArguments` added."""
    from trl import DatasetMixtureConfig, ModelConfig, TrlParser

    from abkd_trainer.cli.train import script_arguments_class
    from abkd_trainer.lm.config import ABKDConfig

    dataclass_types = (
        script_arguments_class(),
        TeacherCacheArguments,
        ABKDConfig,
        ModelConfig,
        DatasetMixtureConfig,
    )
    return TrlParser(
        dataclass_types,
        prog=prog,
        description=__doc__.split("\n\n")[0],
        epilog="Every flag can also be set in a YAML file given with --config FILE.yaml.",
    )


def parse_args(argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    """`(script, cache, training, model, mixture, is_demo)` from `argv`."""
    from abkd_trainer.cli.common import init_cpu_distributed, requested_values
    from abkd_trainer.lm.demo import DEMO_DEFAULTS

    argv = list(sys.argv[1:] if argv is None else argv)
    requested = requested_values(
        argv, ("teacher_model_name_or_path", "dataset_name", "datasets", "output_dir")
    )
    demo = not any(key in requested for key in ("teacher_model_name_or_path", "dataset_name"))
    demo = demo and "datasets" not in requested
    if not demo and not (
        "teacher_model_name_or_path" in requested
        and ("dataset_name" in requested or "datasets" in requested)
        and "output_dir" in requested
    ):
        raise ValueError(
            "abkd-cache-teacher needs --teacher_model_name_or_path, --dataset_name (or "
            "`datasets:` in the YAML config) and --output_dir; give none of the first two to "
            "cache the demo teacher."
        )
    parser = make_parser()
    overrides: dict[str, Any] = {}
    if demo and not any(token in ("-h", "--help") for token in argv):
        overrides = {**DEMO_DEFAULTS, "output_dir": DEMO_CACHE_DIR}
    deepspeed = requested_values(argv, ("deepspeed",)).get("deepspeed")
    if init_cpu_distributed(deepspeed is not None):
        from abkd_trainer.core.distributed import CONFIGURED_STATE_ACCELERATOR_CONFIG

        overrides["accelerator_config"] = CONFIGURED_STATE_ACCELERATOR_CONFIG
    if overrides:
        parser.set_defaults_with_config(**overrides)
    return (*parser.parse_args_and_config(argv), demo)


def run(
    script_args: Any, cache_args: Any, training_args: Any, model_args: Any, mixture_args: Any,
    demo: bool,
) -> str:  # fmt: skip
    """Write the cache; return its directory."""
    from transformers import AutoTokenizer

    from abkd_trainer.cli.train import load_datasets, select_split
    from abkd_trainer.lm.teacher_cache import cache_teacher

    if demo:
        from abkd_trainer.lm.demo import limit_cpu_threads_for_demo, load_demo_dataset

        limit_cpu_threads_for_demo()
        datasets = load_demo_dataset()
    else:
        datasets = load_datasets(script_args, mixture_args)
    teacher = training_args.teacher_model_name_or_path
    # The tokenizer the training run will use: the student's (same family as the teacher's).
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path or teacher,
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
    )
    train_dataset = select_split(datasets, script_args.dataset_train_split, "training")
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = select_split(datasets, script_args.dataset_test_split, "evaluation")
    path = cache_teacher(
        teacher,
        training_args,
        train_dataset,
        tokenizer,
        eval_dataset,
        top_k=cache_args.top_k,
        log_prob_dtype=cache_args.cache_dtype,
        shard_size=cache_args.cache_shard_size,
    )
    return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of `abkd-cache-teacher`.

    Also `python -m abkd_trainer.cli.cache_teacher`.
    """
    script_args, cache_args, training_args, model_args, mixture_args, demo = parse_args(argv)
    cpu_deepspeed = training_args.accelerator_config.use_configured_state
    path = run(script_args, cache_args, training_args, model_args, mixture_args, demo)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"Teacher cache written to {os.path.abspath(path)}.")
    from abkd_trainer.core.distributed import finish_distributed_run

    finish_distributed_run(skip_interpreter_teardown=cpu_deepspeed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
