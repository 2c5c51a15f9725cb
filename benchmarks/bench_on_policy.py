#!/usr/bin/env python
"""On-policy ABKD on the offline demo task: what sampling buys, what a step costs, against TRL.

Two experiments, each training run in a fresh Python process (so that its peak resident memory
is its own), one intra-op thread:

``quality``: the demo teacher (``abkd_trainer/demo_assets``) distilled into the demo student
from two starting points, a random initialisation (the demo's) and a student first fine-tuned
on the dataset's completions (``--sft-steps`` of SFT, cross-entropy only: the paper's setting,
whose students start from SFT checkpoints). For each start, each (alpha, beta) of ``--ab`` and
each data source (off-policy, ``lmbda`` 0.5, ``lmbda`` 1, the adaptive schedule starting at 0 as
in the authors' code), the student is trained for ``--steps`` optimizer steps and scored by
ROUGE-L on held-out test prompts (sampled at T = 1, mean over ``--rouge-seeds``). Then each
on-policy source is trained again for the number of steps that fits in the wall time the
off-policy run took (equal wall time; the step count comes from the first run's measured step
time). 200 training rows are held out as the development set the adaptive schedule evaluates on
(every ``steps / 6`` steps, and before training); every run trains on the remaining rows.

``cost``: time per optimizer step (median of the step-to-step intervals after ``--warmup``
steps, generation included) and peak resident memory of: ABKDTrainer off-policy, ABKDTrainer
with ``lmbda=1`` (AB and generalized JSD), and TRL's ``DistillationTrainer`` (on-policy only,
generalized JSD beta 0.5, transformers generation) on the same model pair, prompts, batch size
and completion length; then again with exactly ``max_new_tokens`` sampled tokens per sequence
for every trainer (``min_new_tokens``), so that each step does the same work whatever the
students have learnt.

Memory: ``peak_rss_mb`` is the process's peak resident set (``VmHWM``), ``training_rss_mb`` the
peak during ``train()`` minus the resident set just before it (models, data and libraries
loaded; the kernel's peak counter is reset there through ``/proc/self/clear_refs``).

Examples::

    python benchmarks/bench_on_policy.py quality --steps 300 --output on_policy_quality.jsonl
    python benchmarks/bench_on_policy.py cost --steps 40
    python benchmarks/bench_on_policy.py table on_policy_quality.jsonl on_policy_cost.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
REPO_ROOT = SCRIPT.parents[1]
DEV_ROWS = 200
TEST_PROMPTS = 100
MAX_NEW_TOKENS = 24  # the demo's ROUGE-L response cap; also the sampled completion length
FIXED_LENGTH = {"min_new_tokens": MAX_NEW_TOKENS}
SOURCES = {
    "off-policy": {},
    "lmbda 0.5": {"lmbda": 0.5},
    "lmbda 1": {"lmbda": 1.0},
    "adaptive": {"on_policy_schedule": "adaptive", "lmbda": 0.0},
}


# ------------------------------------------------------------------ one run (in its own process)


def _memory_mb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process from /proc, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (``VmHWM``) at the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def _demo_data() -> tuple[Any, Any, Any]:
    from abkd_trainer.lm.demo import load_demo_dataset

    dataset = load_demo_dataset()
    train = dataset["train"].select(range(DEV_ROWS, len(dataset["train"])))
    dev = dataset["train"].select(range(DEV_ROWS))
    test = dataset["test"].select(range(TEST_PROMPTS))
    return train, dev, test


def _models(init: str, sft_dir: str | None, seed: int) -> tuple[Any, Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from abkd_trainer.lm.demo import DEMO_TEACHER_DIR, build_demo_student

    tokenizer = AutoTokenizer.from_pretrained(DEMO_TEACHER_DIR)
    teacher = AutoModelForCausalLM.from_pretrained(DEMO_TEACHER_DIR, dtype=torch.float32)
    if init == "sft":
        student = AutoModelForCausalLM.from_pretrained(sft_dir, dtype=torch.float32)
    else:
        student = build_demo_student(teacher.config, seed=seed)
    return tokenizer, teacher, student


class _StepTimer:
    """Wall-clock time of every optimizer step, measured between consecutive ``on_step_end``."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                timer.last = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                now = time.perf_counter()
                timer.intervals.append(now - timer.last)
                timer.last = now

        self.intervals: list[float] = []
        self.last = 0.0
        self.callback = Callback()

    def median(self, warmup: int) -> float:
        timed = self.intervals[warmup:] or self.intervals
        return statistics.median(timed)


def _common_training_args(spec: dict[str, Any], output_dir: str) -> dict[str, Any]:
    return {
        "output_dir": output_dir,
        "max_steps": spec["steps"],
        "per_device_train_batch_size": spec["batch_size"],
        "learning_rate": spec["learning_rate"],
        "lr_scheduler_type": "cosine",
        "warmup_steps": min(30, spec["steps"] // 10),
        "weight_decay": 0.01,
        "logging_steps": max(1, spec["steps"] // 10),
        "save_strategy": "no",
        "report_to": "none",
        "bf16": False,
        "gradient_checkpointing": False,
        "use_cpu": True,
        "seed": spec["seed"],
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
    }


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one configuration in this process; return its measurements."""
    import torch

    torch.set_num_threads(spec["threads"])
    from transformers import set_seed

    set_seed(spec["seed"])
    train, dev, test = _demo_data()
    tokenizer, teacher, student = _models(spec["init"], spec.get("sft_dir"), spec["seed"])
    timer = _StepTimer()
    output_dir = tempfile.mkdtemp(prefix="bench-on-policy-")
    common = _common_training_args(spec, output_dir)

    if spec["trainer"] == "sft":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(
            model=student,
            args=SFTConfig(**common, max_length=64),
            train_dataset=train,
            processing_class=tokenizer,
            callbacks=[timer.callback],
        )
    elif spec["trainer"] == "trl":
        from trl import DistillationConfig, DistillationTrainer

        config = DistillationConfig(
            **common,
            max_completion_length=spec["max_new_tokens"],
            temperature=1.0,
            top_p=1.0,
            beta=spec.get("jsd_beta", 0.5),
            generation_kwargs=spec.get("generation_kwargs"),
        )
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=config,
            train_dataset=train.remove_columns("completion"),
            processing_class=tokenizer,
            callbacks=[timer.callback],
        )
    else:
        from abkd_trainer import ABKDConfig, ABKDTrainer

        adaptive = spec.get("on_policy_schedule") == "adaptive"
        config = ABKDConfig(
            **common,
            max_length=64,
            divergence=spec.get("divergence", "ab"),
            alpha=spec.get("alpha", 0.2),
            beta=spec.get("beta", 0.7),
            # The README's numbers were measured at a fixed (alpha, beta), before the warm-up
            # became the default: keep measuring exactly that.
            ab_warmup_ratio=spec.get("ab_warmup_ratio", 0.0),
            jsd_beta=spec.get("jsd_beta", 0.5),
            lmbda=spec.get("lmbda", 0.0),
            on_policy_schedule=spec.get("on_policy_schedule", "constant"),
            max_new_tokens=spec["max_new_tokens"],
            generation_kwargs=spec.get("generation_kwargs"),
            eval_strategy="steps" if adaptive else "no",
            eval_steps=max(1, spec["steps"] // 6),
            eval_on_start=adaptive,
            per_device_eval_batch_size=64,
        )
        trainer = ABKDTrainer(
            model=student,
            teacher_model=teacher,
            args=config,
            train_dataset=train,
            eval_dataset=dev if adaptive else None,
            processing_class=tokenizer,
            callbacks=[timer.callback],
        )

    set_up_peak = _memory_mb("VmHWM")
    _reset_peak_rss()  # from here on, VmHWM is the peak of training
    rss_before = _memory_mb("VmRSS")
    metrics = trainer.train().metrics
    training_peak = _memory_mb("VmHWM")
    result = {
        **{k: v for k, v in spec.items() if k not in ("sft_dir", "threads")},
        "train_runtime_s": metrics["train_runtime"],
        "median_step_s": timer.median(spec.get("warmup", 0)),
        "peak_rss_mb": max(set_up_peak, training_peak),
        # (max: the counter restarts at the RSS of the reset, a page or two off rss_before)
        "training_rss_mb": max(training_peak - rss_before, 0.0),
    }
    history = trainer.state.log_history
    fractions = [log["on_policy_fraction"] for log in history if "on_policy_fraction" in log]
    if fractions:
        result["mean_on_policy_fraction"] = statistics.fmean(fractions)
    # Sampled completion length: ours logs `completion_length`, TRL `completions/mean_length`.
    lengths = [
        log.get("completion_length", log.get("completions/mean_length"))
        for log in history
        if "completion_length" in log or "completions/mean_length" in log
    ]
    if lengths:
        result["mean_completion_length"] = statistics.fmean(lengths)
    probabilities = [
        log["on_policy_probability"] for log in history if "on_policy_probability" in log
    ]
    if probabilities:
        result["final_on_policy_probability"] = probabilities[-1]
    if spec.get("save_to"):
        trainer.save_model(spec["save_to"])
    if spec.get("evaluate", True):
        from abkd_trainer.lm.evaluation import prompts_and_references, rouge_l_evaluate

        prompts, references = prompts_and_references(test)
        model = trainer.accelerator.unwrap_model(trainer.model)
        scores = rouge_l_evaluate(
            model,
            tokenizer,
            prompts,
            references,
            seeds=spec["rouge_seeds"],
            max_new_tokens=MAX_NEW_TOKENS,
        )
        result["rouge_l"], result["rouge_l_std"] = scores.rouge_l, scores.rouge_l_std
    return result


# ------------------------------------------------------------------ drivers


def _in_subprocess(spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "run", "--spec", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"run failed: {spec}\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _emit(result: dict[str, Any], output: Path | None) -> None:
    line = json.dumps(result)
    print(line, flush=True)
    if output is not None:
        with output.open("a") as handle:
            handle.write(line + "\n")


def quality(args: argparse.Namespace) -> list[dict[str, Any]]:
    base = {
        "trainer": "abkd",
        "batch_size": args.batch_size,
        "max_new_tokens": MAX_NEW_TOKENS,
        "threads": args.threads,
        "rouge_seeds": args.rouge_seeds,
        "seed": args.seed,
    }
    results = []
    sft_dir = str(Path(args.work_dir) / "sft-student")
    if "sft" in args.inits:
        sft = {**base, "trainer": "sft", "init": "random", "steps": args.sft_steps}
        sft.update(learning_rate=3e-3, save_to=sft_dir, name="SFT student (the sft start)")
        results.append(_in_subprocess(sft))
        _emit(results[-1], args.output)
    for init in args.inits:
        learning_rate = 3e-3 if init == "random" else 1e-3
        for alpha, beta in args.ab:
            equal_steps: dict[str, dict[str, Any]] = {}
            for source, overrides in SOURCES.items():
                spec = {**base, **overrides, "init": init, "sft_dir": sft_dir, "alpha": alpha}
                spec.update(beta=beta, learning_rate=learning_rate, steps=args.steps)
                spec.update(source=source, budget="equal steps")
                equal_steps[source] = _in_subprocess(spec)
                results.append(equal_steps[source])
                _emit(results[-1], args.output)
            budget = equal_steps["off-policy"]["train_runtime_s"]
            for source, overrides in SOURCES.items():
                measured = equal_steps[source]
                steps = round(args.steps * budget / measured["train_runtime_s"])
                if source == "off-policy" or steps >= args.steps:
                    continue
                spec = {**base, **overrides, "init": init, "sft_dir": sft_dir, "alpha": alpha}
                spec.update(beta=beta, learning_rate=learning_rate, steps=max(steps, 1))
                spec.update(source=source, budget=f"equal time ({budget:.0f} s)")
                results.append(_in_subprocess(spec))
                _emit(results[-1], args.output)
    return results


def cost(args: argparse.Namespace) -> list[dict[str, Any]]:
    base = {
        "init": "random",
        "batch_size": args.batch_size,
        "max_new_tokens": MAX_NEW_TOKENS,
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "learning_rate": 3e-3,
        "seed": args.seed,
        "evaluate": False,
    }
    cases = [
        {"name": "ABKDTrainer off-policy, AB (0.8, 0.3)", "trainer": "abkd", "alpha": 0.8,
         "beta": 0.3},
        {"name": "ABKDTrainer lmbda=1, AB (0.8, 0.3)", "trainer": "abkd", "alpha": 0.8,
         "beta": 0.3, "lmbda": 1.0},
        {"name": "ABKDTrainer lmbda=1, JSD beta 0.5", "trainer": "abkd", "divergence": "jsd",
         "lmbda": 1.0},
        {"name": "TRL DistillationTrainer, JSD beta 0.5", "trainer": "trl"},
        # The same work per step for everyone: exactly max_new_tokens sampled tokens per sequence
        # (how soon a student samples EOS otherwise depends on what it has learnt so far).
        {"name": "ABKDTrainer lmbda=1, AB (0.8, 0.3), 24 tokens", "trainer": "abkd", "alpha": 0.8,
         "beta": 0.3, "lmbda": 1.0, "generation_kwargs": FIXED_LENGTH},
        {"name": "ABKDTrainer lmbda=1, JSD beta 0.5, 24 tokens", "trainer": "abkd",
         "divergence": "jsd", "lmbda": 1.0, "generation_kwargs": FIXED_LENGTH},
        {"name": "TRL DistillationTrainer, JSD beta 0.5, 24 tokens", "trainer": "trl",
         "generation_kwargs": FIXED_LENGTH},
    ]  # fmt: skip
    if args.cases:
        cases = [case for case in cases if any(word in case["name"] for word in args.cases)]
    results = []
    # Round-robin repeats: a shared machine's load drifts, and interleaving spreads it evenly.
    for repeat in range(args.repeats):
        for case in cases:
            results.append(_in_subprocess({**base, **case, "repeat": repeat}))
            _emit(results[-1], args.output)
    return results


def _median_by_name(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per case name (first-seen order): the median of each measurement over repeats."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        by_name.setdefault(result["name"], []).append(result)
    rows = []
    for runs in by_name.values():
        row = {**runs[0], "runs": len(runs)}
        for key in ("median_step_s", "peak_rss_mb", "training_rss_mb", "mean_completion_length"):
            values = [run[key] for run in runs if run.get(key) is not None]
            if values:
                row[key] = statistics.median(values)
        rows.append(row)
    return rows


def markdown_tables(results: list[dict[str, Any]]) -> str:
    """The README tables of ``quality`` and ``cost`` results (JSON lines of this script)."""
    lines = []
    quality_rows = [r for r in results if r.get("trainer") in ("abkd", "sft") and "rouge_l" in r]
    if quality_rows:
        lines += [
            "| start | (alpha, beta) | completions | budget | steps | train s | s / step "
            "| ROUGE-L | +/- (sampling seeds) | student-sampled share |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in quality_rows:
            if r["trainer"] == "sft":
                label = ("random", "-", "dataset (SFT, cross-entropy)", "-")
            else:
                label = (r["init"], f"({r['alpha']}, {r['beta']})", r["source"], r["budget"])
            share = r.get("mean_on_policy_fraction")
            if "final_on_policy_probability" in r:
                share = f"{share:.2f} (final p {r['final_on_policy_probability']:.1f})"
            elif share is not None:
                share = f"{share:.2f}"
            lines.append(
                "| " + " | ".join(label) + f" | {r['steps']} | {r['train_runtime_s']:.0f} "
                f"| {r['train_runtime_s'] / r['steps']:.3f} | {r['rouge_l']:.2f} "
                f"| {r['rouge_l_std']:.2f} | {share if share is not None else 0} |"
            )
    cost_rows = _median_by_name([r for r in results if "name" in r and not r.get("evaluate", 1)])
    if cost_rows:
        lines += [
            "",
            "| trainer | runs | s / step (median) | vs TRL | mean sampled tokens | peak RSS MiB "
            "| RSS growth in training MiB |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in cost_rows:
            fixed = r["name"].endswith("tokens")
            trl = next(
                (
                    t
                    for t in cost_rows
                    if t["trainer"] == "trl" and t["name"].endswith("tokens") == fixed
                ),
                None,
            )
            ratio = f"{r['median_step_s'] / trl['median_step_s']:.2f}x" if trl else ""
            length = r.get("mean_completion_length")
            length = f"{length:.1f}" if length is not None else "-"
            lines.append(
                f"| {r['name']} | {r['runs']} | {r['median_step_s']:.3f} | {ratio} | {length} "
                f"| {r['peak_rss_mb']:.0f} | {r['training_rss_mb']:.0f} |"
            )
    return "\n".join(lines)


def _pair(text: str) -> tuple[float, float]:
    alpha, beta = (float(part) for part in text.split(","))
    return alpha, beta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="one configuration (internal; JSON spec)")
    run.add_argument("--spec", required=True)
    for name in ("quality", "cost"):
        command = commands.add_parser(name)
        command.add_argument("--steps", type=int, default=300 if name == "quality" else 40)
        command.add_argument("--batch-size", type=int, default=32)
        command.add_argument("--threads", type=int, default=1)
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--output", type=Path, default=None, help="append JSON lines here")
    quality_parser = commands.choices["quality"]
    quality_parser.add_argument("--sft-steps", type=int, default=300)
    quality_parser.add_argument("--inits", nargs="+", default=["random", "sft"])
    quality_parser.add_argument("--ab", type=_pair, nargs="+", default=[(0.2, 0.7), (0.8, 0.3)])
    quality_parser.add_argument("--rouge-seeds", type=int, nargs="+", default=[0, 1, 2])
    quality_parser.add_argument("--work-dir", default=tempfile.mkdtemp(prefix="bench-on-policy-"))
    commands.choices["cost"].add_argument("--warmup", type=int, default=5)
    commands.choices["cost"].add_argument("--repeats", type=int, default=1)
    commands.choices["cost"].add_argument(
        "--cases", nargs="+", default=None, help="only cases whose name contains one of these"
    )
    table = commands.add_parser("table", help="markdown tables from JSON-lines results")
    table.add_argument("results", type=Path, nargs="+")
    args = parser.parse_args(argv)

    if args.command == "run":
        print(json.dumps(run_one(json.loads(args.spec))), flush=True)
        return 0
    if args.command == "table":
        lines = [line for path in args.results for line in path.read_text().splitlines()]
        print(markdown_tables([json.loads(line) for line in lines if line.startswith("{")]))
        return 0
    started = time.time()
    results = quality(args) if args.command == "quality" else cost(args)
    print(json.dumps({"command": args.command, "runs": len(results),
                      "wall_s": round(time.time() - started, 1)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
