"""Where the default (alpha, beta) wins: a protocol grid of distillation methods on the demo.

The grid: learning rate {1e-3, 3e-3} x start {random weights, fine-tuned student} x budget {300,
1000 steps of 32 sequences}, 3 training seeds, every method of `GRID_METHODS` (the shipped
default AB (0.2, 0.7) with its warm-up, four other AB settings and the six baselines). Each run
is one `abkd_trainer.tools.comparison.compare_divergences` run (the README's comparison): the
same data order and initialisation per seed, scored by held-out ROUGE-L (100 test prompts,
sampling seeds 10-50) and the divergence to the teacher. The fine-tuned start is each seed's
student after 300 steps of cross-entropy at the demo's learning rate (3e-3), shared by every
cell and method of that seed.

The cheap choice (`--select`, on by default): per cell, one short run of every method at 10% of
the cell's steps (the schedule's warm-up shortened alike), training seed 0 (the user's own
student and data order), scored on 3 other sampling seeds (1, 2, 3); the pick is the best short
run. `--summarise` evaluates how often the pick's full-budget mean is within the seed spread of
the cell's first method, next to the default's.

    # run (resumable: every finished run has its own result file and is skipped next time)
    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/protocol_grid.py --workers 2
    python benchmarks/protocol_grid.py --cells ft-lr1e-3-300 --seeds 0 --methods ab fkl
    python benchmarks/protocol_grid.py --plan            # what would run, in order
    python benchmarks/protocol_grid.py --summarise       # table, win/loss, cheap choice

Runs go in the order: cheapest cell first, every job of a cell (its seeds, then its short
selection runs) before the next cell's. One job (cell, seed) runs the missing methods of that
cell and seed in a fresh process with one thread (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from abkd_trainer.tools.comparison import (
    DEFAULT_SAMPLING_SEEDS,
    METHODS,
    Method,
    compare_divergences,
    machine_description,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results" / "protocol_grid"
# Shared by every run and by the fine-tuning: the batch of the README's comparisons.
TASK_ARGS = ("--per_device_train_batch_size", "32")
SFT_STEPS = 300
TRAINING_SEEDS = (0, 1, 2)
DEMO_LR_WARMUP_STEPS = 30  # the demo's `warmup_steps`; the short selection runs scale it
SELECTION_FRACTION = 0.1
SELECTION_SEED = 0
SELECTION_SAMPLING_SEEDS = (1, 2, 3)
SELECT = "select"  # the pseudo-seed of a cell's short selection runs
DEFAULT_METHOD = "ab"


def _ab(alpha: str, beta: str, *extra: str) -> tuple[str, ...]:
    return ("--divergence", "ab", "--alpha", alpha, "--beta", beta, *extra)


# Key -> method. "ab" and the baselines are the README comparison's (tools.comparison.METHODS).
GRID_METHODS: dict[str, Method] = {
    "ab": METHODS["ab"],
    "ab-0.5-0.5": Method("AB (0.5, 0.5), default warm-up", _ab("0.5", "0.5")),
    "ab-0.8-0.3": Method("AB (0.8, 0.3), default warm-up", _ab("0.8", "0.3")),
    "ab-warmup-0.5": Method(
        "AB (0.2, 0.7), warm-up 0.5", _ab("0.2", "0.7", "--ab_warmup_ratio", "0.5")
    ),
    "ab-no-warmup": METHODS["ab-no-warmup"],
    **{key: METHODS[key] for key in ("fkl", "rkl", "jsd", "sfkl", "srkl", "tvd")},
}
AB_METHODS = tuple(key for key in GRID_METHODS if key.startswith("ab"))


@dataclass(frozen=True)
class Cell:
    """One protocol: learning rate, start (`random` or `ft`) and steps of distillation."""

    learning_rate: str
    start: str
    steps: int

    @property
    def name(self) -> str:
        return f"{self.start}-lr{self.learning_rate}-{self.steps}"

    @property
    def cost(self) -> tuple[int, int]:
        """Sort key: steps, then the fine-tuned start (it also needs the fine-tuning)."""
        return (self.steps, self.start == "ft")


def grid_cells() -> list[Cell]:
    """The 8 cells, cheapest first (lr 1e-3 before 3e-3 at equal cost)."""
    cells = [
        Cell(lr, start, steps)
        for steps in (300, 1000)
        for start in ("random", "ft")
        for lr in ("1e-3", "3e-3")
    ]
    return sorted(cells, key=lambda cell: cell.cost)


def parse_cell(name: str) -> Cell:
    for cell in grid_cells():
        if cell.name == name:
            return cell
    raise ValueError(f"Unknown cell {name!r}; cells: {[c.name for c in grid_cells()]}.")


def selection_steps(cell: Cell) -> int:
    return max(1, round(cell.steps * SELECTION_FRACTION))


def cell_method(cell: Cell, key: str, *, short: bool = False) -> Method:
    """The method `key` with the cell's learning rate and steps (a short run: 10% of them).

    The label carries the cell, so that every run has its own output directory.
    """
    method = GRID_METHODS[key]
    steps = selection_steps(cell) if short else cell.steps
    flags = [*method.flags, "--learning_rate", cell.learning_rate, "--max_steps", str(steps)]
    if short:
        warmup = max(1, round(DEMO_LR_WARMUP_STEPS * SELECTION_FRACTION))
        flags += ["--warmup_steps", str(warmup)]
    suffix = " short" if short else ""
    return Method(f"{cell.name}{suffix} {method.label}", tuple(flags))


def result_path(results_dir: Path, cell: str, method: str, seed: int | str) -> Path:
    """Where one run's result goes: `runs/CELL/METHOD-seedS.json` (`-select` for short runs)."""
    tag = SELECT if seed == SELECT else f"seed{seed}"
    return results_dir / "runs" / cell / f"{method}-{tag}.json"


@dataclass(frozen=True)
class Job:
    """The missing methods of one cell and seed (or the cell's short runs: seed `select`)."""

    cell: Cell
    seed: int | str
    methods: tuple[str, ...]

    @property
    def sft_seed(self) -> int | None:
        """The fine-tuned student this job needs (None: it starts from random weights)."""
        if self.cell.start != "ft":
            return None
        return SELECTION_SEED if self.seed == SELECT else int(self.seed)


def plan_jobs(
    results_dir: Path,
    cells: Sequence[Cell],
    seeds: Sequence[int],
    methods: Sequence[str],
    *,
    select: bool = True,
) -> list[Job]:
    """The jobs still to run, in order: cell by cell (cheapest first), seeds, then selection.

    A run whose result file exists is left out; a job with nothing left is dropped.
    """
    jobs = []
    for cell in sorted(cells, key=lambda cell: cell.cost):
        for seed in [*seeds, *([SELECT] if select else [])]:
            missing = tuple(
                key
                for key in methods
                if not result_path(results_dir, cell.name, key, seed).exists()
            )
            if missing:
                jobs.append(Job(cell, seed, missing))
    return jobs


def next_runnable(pending: Sequence[Job], running: Iterable[Job], sft_ready: set[int]) -> int:
    """Index of the first pending job that may start now, or -1.

    A job needing a fine-tuned student that does not exist yet waits while another running job
    needs (so makes) the same one: two processes must not fine-tune into one directory.
    """
    busy = {job.sft_seed for job in running if job.sft_seed is not None}
    for index, job in enumerate(pending):
        seed = job.sft_seed
        if seed is None or seed in sft_ready or seed not in busy:
            return index
    return -1


def sft_ready_seeds(work_dir: Path) -> set[int]:
    """Seeds whose fine-tuned student is complete (`compare_divergences` writes its marker last)."""
    ready = set()
    for marker in work_dir.glob("sft-seed*/sft_args.json"):
        ready.add(int(marker.parent.name.removeprefix("sft-seed")))
    return ready


def run_job(job: Job, results_dir: Path, work_dir: Path) -> None:
    """Run one job in this process; write each run's result file as soon as it is scored."""
    short = job.seed == SELECT
    seed = SELECTION_SEED if short else int(job.seed)
    methods = [cell_method(job.cell, key, short=short) for key in job.methods]
    key_of = {method.label: key for method, key in zip(methods, job.methods, strict=True)}
    machine = machine_description()

    def write(comparison: Any, row: dict[str, Any]) -> None:
        key = key_of[row["method"]]
        flags = [*TASK_ARGS, *methods[job.methods.index(key)].flags]
        record = result_record(job, key, flags, row, comparison.reference_rows, machine)
        write_result(results_dir, record)

    compare_divergences(
        TASK_ARGS,
        methods,
        training_seeds=[seed],
        sft_steps=SFT_STEPS if job.cell.start == "ft" else 0,
        sampling_seeds=SELECTION_SAMPLING_SEEDS if short else DEFAULT_SAMPLING_SEEDS,
        work_dir=work_dir,
        on_run=write,
    )


def result_record(
    job: Job,
    key: str,
    flags: Sequence[str],
    row: Mapping[str, Any],
    reference_rows: Sequence[Mapping[str, Any]],
    machine: Mapping[str, Any],
) -> dict[str, Any]:
    """One run's result file: what ran (cell, method, seed, flags), its scores and where."""
    return {
        "cell": job.cell.name,
        "method": key,
        "label": GRID_METHODS[key].label,
        "seed": job.seed,
        "training_seed": SELECTION_SEED if job.seed == SELECT else int(job.seed),
        "flags": list(flags),
        "sft_steps": SFT_STEPS if job.cell.start == "ft" else 0,
        "row": dict(row),
        "reference_rows": [dict(reference) for reference in reference_rows],
        "machine": dict(machine),
        "load_average": _load_average(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write_result(results_dir: Path, record: Mapping[str, Any]) -> Path:
    path = result_path(results_dir, record["cell"], record["method"], record["seed"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def _load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def job_command(job: Job, results_dir: Path, work_dir: Path) -> list[str]:
    command = [sys.executable, str(Path(__file__).resolve()), "--run_job", job.cell.name]
    command += [str(job.seed), *job.methods]
    return command + ["--results_dir", str(results_dir), "--work_dir", str(work_dir)]


def run_jobs(jobs: list[Job], results_dir: Path, work_dir: Path, workers: int) -> int:
    """Run `jobs` in order, `workers` processes at a time (one thread each); failures logged."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    logs = work_dir / "logs"  # the runs' training logs (not committed)
    logs.mkdir(parents=True, exist_ok=True)
    pending, running, failures = list(jobs), {}, 0
    start = time.perf_counter()
    while pending or running:
        for job, process in list(running.items()):
            if process.poll() is not None:
                del running[job]
                failures += process.returncode != 0
                status = "done" if process.returncode == 0 else f"FAILED ({process.returncode})"
                print(
                    f"[{time.perf_counter() - start:7.0f} s] {_describe(job)} {status}", flush=True
                )
        while pending and len(running) < workers:
            index = next_runnable(pending, running, sft_ready_seeds(work_dir))
            if index < 0:
                break
            job = pending.pop(index)
            log = open(logs / f"{job.cell.name}-{job.seed}.log", "a")  # noqa: SIM115 (child owns it)
            command = job_command(job, results_dir, work_dir)
            running[job] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            print(f"[{time.perf_counter() - start:7.0f} s] {_describe(job)} started", flush=True)
        time.sleep(2)
    return failures


def _describe(job: Job) -> str:
    return f"{job.cell.name} seed {job.seed}: {len(job.methods)} method(s)"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cell_names = [cell.name for cell in grid_cells()]
    parser.add_argument("--cells", nargs="+", choices=cell_names, default=cell_names)
    parser.add_argument("--seeds", nargs="+", type=int, default=list(TRAINING_SEEDS))
    parser.add_argument(
        "--methods", nargs="+", choices=list(GRID_METHODS), default=list(GRID_METHODS)
    )
    parser.add_argument("--workers", type=int, default=1, help="Runs in parallel (1 thread each).")
    parser.add_argument(
        "--no_select", action="store_true", help="Skip the cheap choice's short runs."
    )
    parser.add_argument("--plan", action="store_true", help="Print the jobs left, in order.")
    parser.add_argument(
        "--summarise", action="store_true", help="Write the table and summaries; run nothing."
    )
    parser.add_argument("--results_dir", type=Path, default=RESULTS_DIR)
    parser.add_argument(
        "--work_dir",
        type=Path,
        default=Path("/tmp/protocol_grid_work"),
        help="Run output directories and the fine-tuned students (not committed).",
    )
    parser.add_argument("--run_job", nargs="+", metavar="CELL SEED METHOD", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1.")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_job:
        cell, seed, *methods = args.run_job
        job = Job(parse_cell(cell), seed if seed == SELECT else int(seed), tuple(methods))
        run_job(job, args.results_dir, args.work_dir)
        return 0
    if args.summarise:
        command = "python benchmarks/protocol_grid.py " + shlex.join(
            sys.argv[1:] if argv is None else argv
        )
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from protocol_grid_summary import write_summary

        for path in write_summary(args.results_dir, command):
            print(f"Written: {path}")
        return 0
    cells = [parse_cell(name) for name in args.cells]
    jobs = plan_jobs(args.results_dir, cells, args.seeds, args.methods, select=not args.no_select)
    for job in jobs:
        print(f"{_describe(job)}: {' '.join(job.methods)}")
    if args.plan or not jobs:
        return 0
    log_command(args.results_dir, sys.argv[1:] if argv is None else list(argv), len(jobs))
    return 1 if run_jobs(jobs, args.results_dir, args.work_dir, args.workers) else 0


def log_command(results_dir: Path, argv: Sequence[str], num_jobs: int) -> None:
    """Append this invocation (command, environment, time) to `commands.jsonl`."""
    results_dir.mkdir(parents=True, exist_ok=True)
    entry = {
        "command": "python benchmarks/protocol_grid.py " + shlex.join(argv),
        "niceness": os.nice(0),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "jobs": num_jobs,
    }
    with open(results_dir / "commands.jsonl", "a") as file:
        file.write(json.dumps(entry) + "\n")


if __name__ == "__main__":
    sys.exit(main())
