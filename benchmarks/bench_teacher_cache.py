#!/usr/bin/env python
"""Live teacher vs offline teacher cache: step time, peak memory, cache size, demo ROUGE-L.

Two parts, both on CPU:

* ``steps``: for each model pair, write a teacher cache (``abkd_trainer.lm.teacher_cache.
  cache_teacher``, top-k ``--top-k``, bf16), then train the student for ``--steps`` optimizer
  steps with the live teacher and from the cache, each in a fresh Python process. Reported: the
  median step time (after ``--warmup`` steps), the peak extra resident memory of the training
  process (peak RSS during trainer construction and training minus the RSS before any model
  existed: weights, optimizer state, activations and, live, the teacher), the cache's size on
  disk per supervised token and the time to write it. Pairs:

  - ``demo``: the shipped demo teacher (0.86M parameters, vocabulary 80) and the demo's 0.14M
    student on the demo data (prompt/completion, max_length 64, batch 32), fp32.
  - ``tiny32k``: a 4-layer width-256 Llama teacher and a 2-layer width-64 student over a
    32000-word vocabulary (random weights) on random 127-word texts (batch 8, 1024 tokens per
    step), fp32: the share of the vocabulary-sized layers is that of a real small model.

* ``rouge``: the full demo (``abkd-train`` with no model, 1000 steps; ROUGE-L of responses sampled
  on 100 held-out prompts, mean over 3 sampling seeds) distilled from the live teacher and from
  demo caches at each ``--rouge-top-k`` (80 is the whole vocabulary), for each training seed in
  ``--seeds``. Reported: ROUGE-L of the student after training, mean and spread over the
  training seeds, and how much of the teacher's mass each cache's tail bucket holds (mean,
  median, 90th and 99th percentile over the training positions).

Everything runs with one intra-op thread (``OMP_NUM_THREADS=1``); the load average at start is
recorded, since the figures are taken on a shared machine.

Examples::

    python benchmarks/bench_teacher_cache.py steps --pairs demo tiny32k --steps 10
    python benchmarks/bench_teacher_cache.py rouge --rouge-top-k 8 64 80 --seeds 0 1
    python benchmarks/bench_teacher_cache.py steps --pairs demo --steps 3 --json   # quick check
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

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_divergence import PeakRSS, load_average, machine_info  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
PAIRS = ("demo", "tiny32k")
MODES = ("live", "cache")
TINY32K_VOCAB = 32000
TINY32K_ROWS = 64
TINY32K_WORDS = 127  # + end of text: 128 tokens per row
MiB = 2**20


# ----------------------------------------------------------------------------- model pairs


def _tiny32k_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {token: index for index, token in enumerate(specials)}
    vocab.update({f"w{i}": i + len(specials) for i in range(TINY32K_VOCAB - len(specials))})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def _tiny32k_model(hidden: int, layers: int, seed: int) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=TINY32K_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.1,
        pad_token_id=0, eos_token_id=1, bos_token_id=1,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _tiny32k_dataset() -> Any:
    import numpy as np
    from datasets import Dataset

    generator = np.random.default_rng(0)
    # Zipf-like word frequencies, as in text.
    words = np.minimum(generator.zipf(1.2, size=(TINY32K_ROWS, TINY32K_WORDS)), TINY32K_VOCAB - 4)
    return Dataset.from_dict({"text": [" ".join(f"w{w}" for w in row) for row in words]})


def build_pair(pair: str, with_teacher: bool) -> dict[str, Any]:
    """Student, teacher (None unless ``with_teacher``), tokenizer, dataset and training settings."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if pair == "demo":
        from abkd_trainer.lm.demo import (
            DEMO_DEFAULTS,
            DEMO_TEACHER_DIR,
            build_demo_student,
            load_demo_dataset,
        )

        teacher = AutoModelForCausalLM.from_pretrained(DEMO_TEACHER_DIR) if with_teacher else None
        return {
            "student": build_demo_student(AutoConfig.from_pretrained(DEMO_TEACHER_DIR)),
            "teacher": teacher,
            "teacher_name": str(DEMO_TEACHER_DIR),
            "tokenizer": AutoTokenizer.from_pretrained(DEMO_TEACHER_DIR),
            "dataset": load_demo_dataset()["train"],
            "settings": {
                "max_length": DEMO_DEFAULTS["max_length"],
                # 32 sequences a step: the demo's batch when the README's figures were measured.
                "per_device_train_batch_size": 32,
                # The setting the README's figures were measured at (the demo's until the
                # warm-up into (0.2, 0.7) became its default).
                "alpha": 0.8,
                "beta": 0.3,
                "ab_warmup_ratio": 0.0,
            },
        }
    if pair == "tiny32k":
        return {
            "student": _tiny32k_model(64, 2, seed=0),
            "teacher": _tiny32k_model(256, 4, seed=1) if with_teacher else None,
            "teacher_name": "tiny32k-teacher",
            "tokenizer": _tiny32k_tokenizer(),
            "dataset": _tiny32k_dataset(),
            "settings": {"max_length": 128, "per_device_train_batch_size": 8},
        }
    raise ValueError(f"unknown pair {pair!r}; choose from {PAIRS}")


def _config(output_dir: str, settings: dict[str, Any], **overrides: Any) -> Any:
    from abkd_trainer import ABKDConfig

    return ABKDConfig(
        output_dir=output_dir, use_cpu=True, bf16=False, report_to="none", disable_tqdm=True,
        save_strategy="no", dataloader_num_workers=0, seed=0, learning_rate=1e-3,
        logging_steps=1, per_device_eval_batch_size=32, **settings, **overrides,
    )  # fmt: skip


# ----------------------------------------------------------------------------- subprocess work


def write_cache(pair: str, directory: str, top_k: int) -> dict[str, Any]:
    """Write the pair's cache (in this process); return its size and the time it took."""
    from abkd_trainer.lm.teacher_cache import TeacherCache, cache_teacher

    built = build_pair(pair, with_teacher=True)
    start = time.perf_counter()
    cache_teacher(
        built["teacher"], _config(directory, built["settings"]), built["dataset"],
        built["tokenizer"], top_k=top_k, log_prob_dtype="bfloat16",
    )  # fmt: skip
    elapsed = time.perf_counter() - start
    info = TeacherCache(directory).manifest.splits["train"]
    return {
        "cache_write_s": elapsed,
        "cache_bytes": info.num_bytes,
        "supervised_tokens": info.num_supervised_tokens,
        "bytes_per_token": info.num_bytes / max(1, info.num_supervised_tokens),
        "payload_bytes_per_token": top_k * (4 + 2) + 2,  # int32 ids, bf16 log-probs, bf16 tail
    }


def measure_training(pair: str, mode: str, cache: str | None, steps: int, warmup: int) -> dict:
    """Train ``warmup + steps`` steps live or from ``cache``; median step time, peak memory."""
    from transformers import TrainerCallback

    from abkd_trainer import ABKDTrainer

    built = build_pair(pair, with_teacher=False)  # the live teacher is loaded below, measured
    memory = PeakRSS()
    memory.reset()
    baseline = memory.current()
    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as output_dir:
        if mode == "live":
            teacher = build_pair(pair, with_teacher=True)["teacher"]
            extra = {}
        else:
            teacher, extra = None, {"teacher_cache": cache}
        trainer = ABKDTrainer(
            model=built["student"], teacher_model=teacher,
            args=_config(output_dir, built["settings"], max_steps=warmup + steps, **extra),
            train_dataset=built["dataset"], processing_class=built["tokenizer"],
            callbacks=[StepTimer()],
        )  # fmt: skip
        trainer.train()
    timed = step_times[warmup:]
    return {
        "pair": pair,
        "mode": mode,
        "step_s": statistics.median(timed),
        "step_s_spread": (min(timed), max(timed)),
        "peak_extra_mib": (memory.peak() - baseline) / MiB,
    }


def _subprocess(argv: list[str]) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, __file__, *argv], capture_output=True, text=True, check=False,
        cwd=REPO_ROOT,
    )  # fmt: skip
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the two parts


def run_steps(pairs: list[str], top_k: int, steps: int, warmup: int, workdir: Path) -> list[dict]:
    results = []
    for pair in pairs:
        cache = workdir / f"cache-{pair}-top{top_k}"
        size = _subprocess(["_write_cache", pair, str(cache), str(top_k)])
        for mode in MODES:
            result = _subprocess(["_train", pair, mode, str(cache), str(steps), str(warmup)])
            results.append({**result, **(size if mode == "cache" else {}), "top_k": top_k})
    return results


def run_rouge(top_ks: list[int], seeds: list[int], max_steps: int, workdir: Path) -> list[dict]:
    """The demo, live and from each cache, per training seed; ROUGE-L after training."""
    runs: list[dict] = []
    common = ["--max_steps", str(max_steps), "--eval_strategy", "no", "--disable_tqdm", "true",
              # The README's figures: the demo at (0.8, 0.3) without the warm-up and with 32
              # sequences a step, its settings before the warm-up into (0.2, 0.7) and 64 a step
              # became the defaults.
              "--alpha", "0.8", "--beta", "0.3", "--ab_warmup_ratio", "0",
              "--per_device_train_batch_size", "32"]  # fmt: skip
    # Caches and runs already in ``workdir`` are reused (an interrupted benchmark resumes).
    for top_k in top_ks:
        cache = workdir / f"demo-cache-top{top_k}"
        _cli(["abkd_trainer.cli.cache_teacher", "--top_k", str(top_k), "--output_dir", str(cache)])
    for seed in seeds:
        for label, extra in [("live", [])] + [
            (f"cache k={k}", ["--teacher_cache", str(workdir / f"demo-cache-top{k}")])
            for k in top_ks
        ]:
            output = workdir / f"demo-{label.replace(' ', '-')}-seed{seed}"
            start = time.perf_counter()
            if not (output / "report.json").is_file():
                _cli(["abkd_trainer", "--output_dir", str(output), "--seed", str(seed),
                      "--overwrite_output_dir", "true", *common, *extra])  # fmt: skip
            report = json.loads((output / "report.json").read_text())
            runs.append({
                "run": label, "seed": seed, "wall_s": time.perf_counter() - start,
                "rouge_l": report["student_after"]["rouge_l"],
                "rouge_l_sampling_std": report["student_after"]["rouge_l_std"],
            })  # fmt: skip
    return runs


def tail_mass_statistics(cache_dir: Path) -> dict[str, float]:
    """How much of the teacher's mass the cache's tail bucket holds, over its train positions."""
    from abkd_trainer.lm.teacher_cache import TeacherCache

    cache = TeacherCache(cache_dir)
    tail = cache.rows(range(cache.manifest.splits["train"].num_rows)).tail_log_prob.exp()
    return {
        "top_k": cache.top_k,
        "mean": tail.mean().item(),
        "median": tail.median().item(),
        "p90": tail.quantile(0.9).item(),
        "p99": tail.quantile(0.99).item(),
    }


def _cli(argv: list[str]) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", *argv], capture_output=True, text=True, check=False, cwd=REPO_ROOT
    )
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{completed.stderr[-4000:]}")


def summarise_rouge(runs: list[dict]) -> list[dict]:
    summary = []
    for label in dict.fromkeys(run["run"] for run in runs):
        values = [run["rouge_l"] for run in runs if run["run"] == label]
        summary.append({
            "run": label, "rouge_l_mean": statistics.mean(values),
            "rouge_l_std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "seeds": [run["seed"] for run in runs if run["run"] == label],
        })  # fmt: skip
    return summary


def format_steps(results: list[dict]) -> str:
    lines = [
        "| pair | teacher | step s (median) | peak extra MiB | cache bytes / token "
        "| cache write s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        teacher = "live" if r["mode"] == "live" else f"cache, k = {r['top_k']}, bf16"
        size = f"{r['bytes_per_token']:.0f}" if "bytes_per_token" in r else ""
        write = f"{r['cache_write_s']:.1f}" if "cache_write_s" in r else ""
        lines.append(
            f"| {r['pair']} | {teacher} | {r['step_s']:.3f} | {r['peak_extra_mib']:.0f} "
            f"| {size} | {write} |"
        )
    return "\n".join(lines)


def format_rouge(summary: list[dict]) -> str:
    lines = ["| teacher | ROUGE-L after | +/- (training seeds) |", "| --- | --- | --- |"]
    for row in summary:
        lines.append(f"| {row['run']} | {row['rouge_l_mean']:.2f} | {row['rouge_l_std']:.2f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=["steps", "rouge", "all"])
    parser.add_argument("--pairs", nargs="+", choices=PAIRS, default=list(PAIRS))
    parser.add_argument("--top-k", type=int, default=64, help="cache k for the steps part")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--rouge-top-k", type=int, nargs="+", default=[8, 64, 80])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--max-steps", type=int, default=1000, help="demo training steps")
    parser.add_argument("--workdir", type=Path, default=None, help="keep caches and runs here")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_write_cache":  # internal: one subprocess per measurement
        print(json.dumps(write_cache(argv[1], argv[2], int(argv[3]))))
        return 0
    if argv and argv[0] == "_train":
        pair, mode, cache, steps, warmup = argv[1:6]
        print(json.dumps(measure_training(pair, mode, cache, int(steps), int(warmup))))
        return 0
    args = build_parser().parse_args(argv)
    import torch

    report: dict[str, Any] = {"machine": machine_info(torch.get_num_threads(), load_average())}
    with tempfile.TemporaryDirectory() as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.part in ("steps", "all"):
            report["steps"] = run_steps(args.pairs, args.top_k, args.steps, args.warmup, workdir)
        if args.part in ("rouge", "all"):
            runs = run_rouge(args.rouge_top_k, args.seeds, args.max_steps, workdir)
            report["rouge_runs"], report["rouge"] = runs, summarise_rouge(runs)
            report["tail_mass"] = [
                tail_mass_statistics(workdir / f"demo-cache-top{k}") for k in args.rouge_top_k
            ]
    report["machine"]["load_average_at_end"] = load_average()
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(json.dumps(report["machine"]))
    if "steps" in report:
        print(format_steps(report["steps"]))
    if "rouge" in report:
        print(format_rouge(report["rouge"]))
        for row in report["tail_mass"]:
            print(f"k = {row['top_k']}: teacher mass in the tail bucket " + ", ".join(
                f"{name} {row[name]:.2g}" for name in ("mean", "median", "p90", "p99")
            ))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
