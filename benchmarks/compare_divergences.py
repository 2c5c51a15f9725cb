"""Compare distillation divergences on one task under one budget (the ABKD paper's protocol).

Every method distils the same student (optionally fine-tuned first with ``--sft_steps``) with the
same steps and learning rate, for each training seed; each result is scored by held-out ROUGE-L
(5 sampling seeds) and its forward / reverse KL to the teacher. Writes comparison.md,
comparison.json and comparison.png (error bars: std over training seeds) into --output_dir.

    # the offline demo, 300 steps per run, every method, 1 training seed (about 5 minutes on
    # one core)
    OMP_NUM_THREADS=1 python benchmarks/compare_divergences.py
    # from a fine-tuned student, 3 training seeds, the full demo budget
    python benchmarks/compare_divergences.py --sft_steps 300 --training_seeds 0 1 2 \\
        --task_args="--max_steps 1000"  # the demo's budget (1000 steps of 64)
    # your own task: any abkd-train flags
    python benchmarks/compare_divergences.py --methods fkl ab --task_args="--model_name_or_path \\
        S --teacher_model_name_or_path T --dataset_name train.jsonl --dataset_test_file \\
        test.jsonl --max_steps 500 --learning_rate 1e-4"
    # seeds run separately (e.g. on two machines), then one table
    python benchmarks/compare_divergences.py --merge out-seed0 out-seed1 --output_dir out
    # a custom setting: "LABEL: abkd-train flags"
    python benchmarks/compare_divergences.py --methods fkl --custom "AB (0.5, 0.5): --alpha 0.5 \\
        --beta 0.5"
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from abkd_trainer.tools.comparison import METHODS, Comparison, Method, compare_divergences

# The default budget per run on the demo: 300 steps of 32 sequences (the demo trains 1000 of 64;
# same learning rate and schedule shape), so that every method with 1 training seed fits in a few
# minutes on a CPU. (32 a step was the demo's own batch when the README's tables were measured.)
DEFAULT_TASK_ARGS = "--max_steps 300 --per_device_train_batch_size 32"


def parse_methods(keys: list[str], custom: list[str]) -> list[Method]:
    methods = [METHODS[key] for key in keys]
    for spec in custom:
        label, separator, flags = spec.partition(":")
        if not separator or not label.strip():
            raise SystemExit(f'--custom takes "LABEL: abkd-train flags", got {spec!r}.')
        methods.append(Method(label.strip(), tuple(shlex.split(flags))))
    return methods


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--task_args",
        default=DEFAULT_TASK_ARGS,
        help="abkd-train flags shared by every run: the task (none: the offline demo) and the "
        f"budget (default {DEFAULT_TASK_ARGS!r}).",
    )
    parser.add_argument(
        "--methods",
        nargs="*",
        default=list(METHODS),
        choices=list(METHODS),
        help="Methods to compare (default: all).",
    )
    parser.add_argument(
        "--custom",
        action="append",
        default=[],
        help='An extra method, "LABEL: abkd-train flags"; may be repeated.',
    )
    parser.add_argument("--training_seeds", nargs="+", type=int, default=[0])
    parser.add_argument(
        "--sft_steps",
        type=int,
        default=0,
        help="Fine-tune each seed's student with the cross-entropy (--kd_ratio 0) for this many "
        "steps first (0: distil the student as the task gives it).",
    )
    parser.add_argument("--sampling_seeds", nargs="+", type=int, default=[10, 20, 30, 40, 50])
    parser.add_argument("--output_dir", default="compare-divergences")
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        help="Instead of running: merge the comparison.json of earlier runs of this script (the "
        "same task and methods, different training seeds) into --output_dir.",
    )
    args = parser.parse_args(argv)
    if args.merge:
        comparison = Comparison.merge([Comparison.load(path) for path in args.merge])
        comparison.write(args.output_dir)
        print(comparison.to_markdown())
        return 0

    methods = parse_methods(args.methods, args.custom)
    command = "python benchmarks/compare_divergences.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    start = time.perf_counter()

    def progress(comparison, row):
        print(
            f"[{time.perf_counter() - start:7.1f} s] seed {row['seed']} {row['method']}: "
            f"ROUGE-L {row['rouge_l']:.2f}, forward KL to teacher {row['fkl_to_teacher']:.4f}",
            flush=True,
        )
        comparison.write(args.output_dir)  # partial results survive an interrupted sweep

    comparison = compare_divergences(
        shlex.split(args.task_args),
        methods,
        training_seeds=args.training_seeds,
        sft_steps=args.sft_steps,
        sampling_seeds=args.sampling_seeds,
        work_dir=f"{args.output_dir}/runs",
        on_run=progress,
    )
    comparison.settings["command"] = command
    comparison.settings["wall_time_s"] = round(time.perf_counter() - start, 1)
    paths = comparison.write(args.output_dir)
    print("\n" + comparison.to_markdown())
    print("Written: " + ", ".join(str(path) for path in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
