"""Step cost of classifier distillation: ABKD against a plain Trainer step and the guide's pattern.

One image pair, the offline demo's (`abkd_trainer.classification.demo`): the shipped ResNet
teacher (97k parameters) and the ViT student (18k parameters), batches of 64 8x8 digits, AdamW,
one CPU thread. Four setups, each a `transformers.Trainer` run:

- `student_ce`: a plain `Trainer` step of the student with cross-entropy alone (context);
- `ce_plus_teacher`: the same plus a `torch.no_grad()` teacher forward on the batch, whose
  output is dropped: the irreducible cost of distilling;
- `guide`: the pattern of the transformers guide "Knowledge distillation for computer vision":
  a `Trainer` subclass whose `compute_loss` mixes `(1 - lambda) * CE` with
  `lambda * T**2 * KLDivLoss(batchmean)` (T = 5, lambda = 0.5, the guide's values);
- `abkd`: `ABKDClassifierTrainer` with the `ABKDClassifierConfig` defaults.

Measured per setup, in a fresh process per repeat (setups interleaved, so that the load of a
shared machine falls on all of them alike):

- **time per optimizer step**: the interval between consecutive `on_step_end` callbacks, i.e.
  the whole step as Trainer runs it (fetching the batch, forwards, loss, backward, clipping,
  optimizer and scheduler, the trainer's bookkeeping), after `--warmup` steps; the median per
  repeat, then the median and the range over the repeats;
- **peak tensor memory of one step**: the torch profiler's memory timeline (CPU, every tensor
  allocation and free; `export_memory_timeline`) over one later step: the peak of live tensor
  bytes, and its increase over the step's start (parameters, optimizer state and the batch
  are live before the step). This counts what torch allocates, not what the OS reports;
- **peak RSS** of the process (`resource.getrusage(...).ru_maxrss`), for scale: mostly the
  Python interpreter and the libraries.

    python benchmarks/bench_classifier_step.py                 # 5 repeats of 100 steps
    python benchmarks/bench_classifier_step.py --repeats 2 --steps 20

Writes `step_cost.json` and `step_cost.md` (with the machine, the command and the date) to
`--output_dir`.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported

import argparse
import json
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SETUPS = {
    "student_ce": "plain Trainer, student cross-entropy alone",
    "ce_plus_teacher": "(a) plain Trainer, cross-entropy + no_grad teacher forward",
    "guide": "(b) guide's ImageDistilTrainer pattern (KLDivLoss * T^2 + CE)",
    "abkd": "(c) ABKDClassifierTrainer, defaults",
}
BASELINE = "ce_plus_teacher"
GUIDE_TEMPERATURE, GUIDE_LAMBDA = 5.0, 0.5
TRAINING_SETTINGS: dict[str, Any] = {
    "per_device_train_batch_size": 64,
    "learning_rate": 3e-3,
    "lr_scheduler_type": "cosine",
    "weight_decay": 0.01,
}


# ----------------------------------------------------------------------------- the setups


def guide_loss(
    student_logits: Any,
    teacher_logits: Any,
    ce_loss: Any,
    temperature: float = GUIDE_TEMPERATURE,
    lambda_param: float = GUIDE_LAMBDA,
) -> Any:
    """The guide's objective: `(1 - lambda) * CE + lambda * T**2 * KL(p_T || q_S)`.

    Args:
        student_logits: `(B, C)` student logits.
        teacher_logits: `(B, C)` teacher logits.
        ce_loss: scalar, the student's mean cross-entropy with the labels.
        temperature: `T`, dividing both logit rows.
        lambda_param: the weight of the distillation term.

    Returns:
        The scalar loss; the KL term is `KLDivLoss(reduction="batchmean")`, a mean over the
        micro-batch (the guide's `compute_loss` ignores `num_items_in_batch`).
    """
    import torch.nn.functional as F

    soft_teacher = F.softmax(teacher_logits / temperature, dim=-1)
    log_soft_student = F.log_softmax(student_logits / temperature, dim=-1)
    kd = F.kl_div(log_soft_student, soft_teacher, reduction="batchmean") * temperature**2
    return (1 - lambda_param) * ce_loss + lambda_param * kd


def trainer_classes() -> dict[str, type]:
    """The `Trainer` subclasses of the `ce_plus_teacher` and `guide` setups (built lazily: no
    transformers import at module import)."""
    import torch
    from transformers import Trainer

    class TeacherForwardTrainer(Trainer):
        """A plain Trainer (the student's own cross-entropy) plus a dropped teacher forward."""

        def __init__(self, teacher: Any, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.teacher = teacher.to(self.args.device).eval()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with torch.no_grad():
                self.teacher(pixel_values=inputs["pixel_values"])
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    class GuideDistillationTrainer(Trainer):
        """The guide's pattern, written from its description (`guide_loss`)."""

        def __init__(self, teacher: Any, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.teacher = teacher.to(self.args.device).eval()

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs)
            with torch.no_grad():
                teacher_logits = self.teacher(pixel_values=inputs["pixel_values"]).logits
            loss = guide_loss(outputs.logits, teacher_logits, outputs.loss)
            return (loss, outputs) if return_outputs else loss

    return {"ce_plus_teacher": TeacherForwardTrainer, "guide": GuideDistillationTrainer}


def build_trainer(setup: str, student: Any, teacher: Any, train: Any, args: dict) -> Any:
    """The `Trainer` of one setup (see `SETUPS`) with the shared training arguments `args`."""
    from transformers import Trainer, TrainingArguments

    if setup == "abkd":
        from abkd_trainer import ABKDClassifierConfig, ABKDClassifierTrainer

        config = ABKDClassifierConfig(**args)
        return ABKDClassifierTrainer(
            model=student, teacher_model=teacher, args=config, train_dataset=train
        )
    arguments = TrainingArguments(**args)
    if setup == "student_ce":
        return Trainer(model=student, args=arguments, train_dataset=train)
    cls = trainer_classes()[setup]
    return cls(teacher=teacher, model=student, args=arguments, train_dataset=train)


# ----------------------------------------------------------------------------- measuring


def step_intervals(step_ends: Sequence[float], warmup: int, steps: int) -> list[float]:
    """Seconds of steps `warmup .. warmup + steps - 1` from the `on_step_end` times (step `k`
    takes `ends[k] - ends[k - 1]`; step 0 has no start and `warmup` must be >= 1)."""
    if warmup < 1 or len(step_ends) < warmup + steps:
        raise ValueError(
            f"Need warmup >= 1 and {warmup + steps} step ends, got warmup={warmup} and "
            f"{len(step_ends)}."
        )
    return [step_ends[k] - step_ends[k - 1] for k in range(warmup, warmup + steps)]


def timeline_peak(timeline: Sequence[Sequence[Any]]) -> dict[str, float]:
    """The peak of a memory timeline (`export_memory_timeline`: `[times, sizes per category]`).

    Returns:
        `peak_mib`: the most live tensor bytes at once, and `peak_increase_mib`: that peak minus
        the bytes live at the first sample (the step's start), both in MiB.
    """
    totals = [sum(sizes) for sizes in timeline[1]]
    if not totals:
        return {"peak_mib": 0.0, "peak_increase_mib": 0.0}
    return {
        "peak_mib": max(totals) / 2**20,
        "peak_increase_mib": (max(totals) - totals[0]) / 2**20,
    }


def step_recorder(profile_step: int | None) -> Any:
    """A callback that records each step's end time and, at `profile_step`, the memory timeline
    of that step (attribute `memory`)."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class StepRecorder(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.memory: dict[str, float] | None = None
            self._profiler = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == profile_step:
                self._profiler = profile(
                    activities=[ProfilerActivity.CPU],
                    profile_memory=True,
                    record_shapes=True,
                    with_stack=True,
                )
                self._profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            if self._profiler is not None:
                self._profiler.__exit__(None, None, None)
                with tempfile.TemporaryDirectory() as folder:
                    path = Path(folder) / "timeline.json"
                    with warnings.catch_warnings():  # deprecated for CUDA; CPU has no successor
                        warnings.simplefilter("ignore", FutureWarning)
                        self._profiler.export_memory_timeline(str(path), device="cpu")
                    self.memory = timeline_peak(json.loads(path.read_text()))
                self._profiler = None

    return StepRecorder()


def demo_pair() -> tuple[Any, Any, Any]:
    """The demo's teacher, a student builder and the training split as tensors."""
    import torch
    from transformers import AutoModelForImageClassification

    from abkd_trainer.classification import demo

    rows = demo.load_demo_dataset()["train"]
    processor = demo.load_demo_image_processor()
    pixels = processor(list(rows["image"]), return_tensors="pt")["pixel_values"]
    labels = torch.tensor(list(rows["label"]))
    train = [{"pixel_values": p, "labels": y} for p, y in zip(pixels, labels, strict=True)]
    teacher = AutoModelForImageClassification.from_pretrained(demo.DEMO_TEACHER_DIR).eval()
    return teacher, lambda: demo.build_demo_student(teacher.config, seed=0), train


def measure(setup: str, warmup: int, steps: int, profile: bool = True) -> dict[str, Any]:
    """Train one setup for `warmup + steps (+ 1 profiled)` steps in this process; its costs."""
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    teacher, build_student, train = demo_pair()
    profile_step = warmup + steps if profile else None
    recorder = step_recorder(profile_step)
    with tempfile.TemporaryDirectory() as scratch:
        args = {
            **TRAINING_SETTINGS,
            "output_dir": scratch,
            "max_steps": warmup + steps + int(profile),
            "use_cpu": True,
            "report_to": "none",
            "save_strategy": "no",
            "logging_steps": 10**6,  # no logging inside the measured steps
            "disable_tqdm": True,
            "dataloader_num_workers": 0,
            "seed": 0,
        }
        trainer = build_trainer(setup, build_student(), teacher, train, args)
        trainer.add_callback(recorder)
        trainer.train()
    intervals = step_intervals(recorder.ends, warmup, steps)
    return {
        "setup": setup,
        "step_ms": [1000 * seconds for seconds in intervals],
        "median_step_ms": 1000 * statistics.median(intervals),
        **(recorder.memory or {}),
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# ----------------------------------------------------------------------------- summary


def summarize(repeats: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per setup over the repeats: the median and range of the per-repeat median step times, the
    pooled quartiles of every step, the memory, and the overhead over `BASELINE`.

    Args:
        repeats: `measure` results (several per setup).
    """
    summary: dict[str, dict[str, Any]] = {}
    for setup in SETUPS:
        runs = [run for run in repeats if run["setup"] == setup]
        if not runs:
            continue
        medians = [run["median_step_ms"] for run in runs]
        pooled = [ms for run in runs for ms in run["step_ms"]]
        quartiles = statistics.quantiles(pooled, n=4) if len(pooled) > 1 else pooled * 3
        summary[setup] = {
            "repeats": len(runs),
            "median_ms": statistics.median(medians),
            "min_ms": min(medians),
            "max_ms": max(medians),
            "q1_ms": quartiles[0],
            "q3_ms": quartiles[-1],
            **{
                key: max(run[key] for run in runs)
                for key in ("peak_mib", "peak_increase_mib", "max_rss_mib")
                if all(key in run for run in runs)
            },
        }
    if BASELINE in summary:
        base = summary[BASELINE]["median_ms"]
        for entry in summary.values():
            entry["overhead_ms"] = entry["median_ms"] - base
            entry["ratio"] = entry["median_ms"] / base
    return summary


def to_markdown(summary: Mapping[str, Mapping[str, Any]], header: Mapping[str, Any]) -> str:
    """The step-cost table with the command, the machine and the date."""
    lines = [
        "# Classifier distillation: cost of one optimizer step",
        "",
        f"The demo's pair (ResNet teacher, ViT student), batches of {header['batch_size']} 8x8 "
        f"images, one CPU thread. Time: per optimizer step, median over {header['repeats']} "
        f"repeats (each a fresh process, setups interleaved) of the median of {header['steps']} "
        f"steps after {header['warmup']} warm-up steps; range: min-max of the repeats' medians; "
        "quartiles: of all steps. Memory: the peak of live tensor bytes during one step (torch "
        "profiler memory timeline) and its increase over the step's start; peak RSS of the "
        "process for scale.",
        "",
        "| setup | ms / step | range | quartiles | vs (a) | peak tensor MiB | increase MiB "
        "| peak RSS MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for setup, entry in summary.items():
        versus = (
            f"{entry['overhead_ms']:+.2f} ms ({entry['ratio']:.2f}x)" if "ratio" in entry else "-"
        )
        memory = [
            f"{entry[key]:.2f}" if key in entry else "-"
            for key in ("peak_mib", "peak_increase_mib", "max_rss_mib")
        ]
        lines.append(
            f"| {SETUPS[setup]} | {entry['median_ms']:.2f} | {entry['min_ms']:.2f}-"
            f"{entry['max_ms']:.2f} | {entry['q1_ms']:.2f}-{entry['q3_ms']:.2f} | {versus} | "
            + " | ".join(memory)
            + " |"
        )
    lines += [
        "",
        f"Command: `{header['command']}`",
        "",
        f"Machine: {header['machine']}; {header['date']}.",
        "",
    ]
    return "\n".join(lines)


def machine_description() -> str:
    """CPU model, core count and the main library versions."""
    import torch
    import transformers

    from abkd_trainer.core.reports import environment_info

    return (
        f"{environment_info('cpu')['device']}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, transformers {transformers.__version__}"
    )


def run_worker(setup: str, warmup: int, steps: int) -> dict[str, Any]:
    """One repeat of one setup in a fresh Python process (`--worker`); its `measure` result."""
    command = [sys.executable, __file__, "--worker", setup, "--warmup", str(warmup)]
    command += ["--steps", str(steps)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    """Measure every setup `--repeats` times, then write the json and markdown summaries."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--output_dir", default="benchmarks/results/classifier_step")
    parser.add_argument("--worker", choices=list(SETUPS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker, args.warmup, args.steps)))
        return 0
    repeats = []
    for repeat in range(args.repeats):
        for setup in args.setups:
            repeats.append(run_worker(setup, args.warmup, args.steps))
            print(f"repeat {repeat} {setup}: {repeats[-1]['median_step_ms']:.2f} ms", flush=True)
    header = {
        "command": "python benchmarks/bench_classifier_step.py "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": machine_description(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "batch_size": TRAINING_SETTINGS["per_device_train_batch_size"],
        "repeats": args.repeats,
        "warmup": args.warmup,
        "steps": args.steps,
    }
    summary = summarize(repeats)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    result = {"header": header, "summary": summary, "repeats": repeats}
    (output_dir / "step_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    markdown = to_markdown(summary, header)
    (output_dir / "step_cost.md").write_text(markdown)
    print("\n" + markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
