"""How robust is the demo? Run ``abkd-train`` (the offline demo) for several training seeds with
the fused and the logits loss path and report the student's held-out ROUGE-L: mean and spread
(max - min) over all runs, and per path.

    OMP_NUM_THREADS=1 python benchmarks/demo_seeds.py                 # seeds 0 1 2, both paths
    python benchmarks/demo_seeds.py --jobs 2 --extra="--max_steps 300"   # explore a setting

Each run is a fresh ``python -m abkd_trainer`` process, exactly what ``make demo`` runs, with
``--seed S`` (which also seeds the demo student's initialisation) and, for the logits path,
``--use_fused_loss false``. Writes demo_seeds.json and demo_seeds.md into --output_dir.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PATH_FLAGS = {"fused": [], "logits": ["--use_fused_loss", "false"]}


def run_demo(seed: int, path: str, extra: list[str], output_dir: Path) -> dict:
    run_dir = output_dir / f"{path}-seed{seed}"
    command = [sys.executable, "-m", "abkd_trainer", "--seed", str(seed), *PATH_FLAGS[path]]
    command += [*extra, "--output_dir", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    (output_dir / f"{path}-seed{seed}.log").write_text(completed.stdout + completed.stderr)
    if completed.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{completed.stderr[-3000:]}")
    report = json.loads((run_dir / "report.json").read_text())
    return {
        "seed": seed,
        "path": path,
        "student_after": report["student_after"]["rouge_l"],
        "student_before": report["student_before"]["rouge_l"],
        "teacher": report["teacher"]["rouge_l"],
        "fkl_to_teacher": report["student_after"]["divergence_to_teacher"].get("fkl"),
        "wall_time_s": round(seconds, 1),
    }


def summarise(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "spread": max(values) - min(values),
        "min": min(values),
        "max": max(values),
    }


def to_markdown(runs: list[dict], summary: dict[str, dict[str, float]]) -> str:
    seeds = sorted({run["seed"] for run in runs})
    paths = [path for path in PATH_FLAGS if any(run["path"] == path for run in runs)]
    by_key = {(run["path"], run["seed"]): run for run in runs}
    header = ["loss path", *(f"seed {seed}" for seed in seeds), "mean", "spread (max - min)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for path in [*paths, "all"]:
        cells = [path if path != "all" else "all runs"]
        for seed in seeds:
            run = by_key.get((path, seed))
            cells.append(f"{run['student_after']:.2f}" if run else "")
        cells += [f"{summary[path]['mean']:.2f}", f"{summary[path]['spread']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--paths", nargs="+", choices=list(PATH_FLAGS), default=list(PATH_FLAGS))
    parser.add_argument("--extra", default="", help="More abkd-train flags for every run.")
    parser.add_argument("--jobs", type=int, default=1, help="Runs in parallel (1 thread each).")
    parser.add_argument("--output_dir", default="demo-seeds")
    args = parser.parse_args(argv)

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    extra = shlex.split(args.extra)
    jobs = [(seed, path) for path in args.paths for seed in args.seeds]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_demo, seed, path, extra, output_dir) for seed, path in jobs]
        runs = []
        for future in futures:
            runs.append(future.result())
            run = runs[-1]
            print(f"{run['path']:6s} seed {run['seed']}: student after {run['student_after']:.2f}")
    summary = {
        path: summarise([r["student_after"] for r in runs if r["path"] == path])
        for path in args.paths
    }
    summary["all"] = summarise([run["student_after"] for run in runs])
    command = "python benchmarks/demo_seeds.py " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    import platform

    import torch

    settings = {
        "command": command,
        "extra_flags": extra,
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')} per run, {args.jobs} run(s) "
        f"at a time, torch {torch.__version__}",
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    (output_dir / "demo_seeds.json").write_text(
        json.dumps({"settings": settings, "summary": summary, "runs": runs}, indent=2) + "\n"
    )
    table = to_markdown(runs, summary)
    (output_dir / "demo_seeds.md").write_text(
        table + "\n" + "\n".join(f"- {k}: {v}" for k, v in settings.items()) + "\n"
    )
    print("\n" + table)
    print(f"teacher ROUGE-L {statistics.fmean(r['teacher'] for r in runs):.2f}; {settings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
