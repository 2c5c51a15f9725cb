"""Compare distillation divergences for classifiers on the digits demo, under one budget.

Every method distils the demo's shipped ResNet teacher into the demo's ViT student
(`abkd_trainer.classification.demo`) with `ABKDClassifierTrainer`, the same optimizer steps,
learning rate, schedule and data order (Trainer's seedable sampler: the order depends on the seed
only), once per training seed, from two starting points:

- `random`: the freshly initialised student (seeded by the training seed), as in the demo;
- `ce`: that student first trained with cross-entropy alone (a plain `Trainer`, `--ce_steps`),
  as the ABKD paper's students start from a trained model.

Each run is scored by held-out top-1 accuracy (and agreement with the teacher) on the demo's 359
test images (1 image = 0.28 points). `comparison.md` (mean and standard deviation over the seeds,
and per seed paired differences against `--reference`), `comparison.json` and `comparison.png`
go to `--output_dir`, with the command, the machine and the date. Finished runs are kept in
`--output_dir/runs/` (one JSON file each, written atomically) and skipped when the script is
rerun, so it resumes; each process trains on one CPU thread.

    # the measurement of docs/classifier.md: two processes on disjoint seeds, then the summary
    python benchmarks/compare_classifier_divergences.py --seeds 0 1 2 3 4 &
    python benchmarks/compare_classifier_divergences.py --seeds 5 6 7 8 9; wait
    python benchmarks/compare_classifier_divergences.py
    # a few methods, one seed, a shorter budget
    python benchmarks/compare_classifier_divergences.py --methods kd ab --seeds 0 --steps 100
    # an (alpha, beta) found elsewhere (e.g. by abkd-sweep), as an extra row
    python benchmarks/compare_classifier_divergences.py --ab "0.6,0.4:AB after abkd-sweep"

Method groups: `divergences` (CE alone, KD, reverse KL, JSD, TVD, LSD, AB at the authors'
(0.8, 0.3), with and without standardised logits), `grid` (AB at (alpha, beta) around the
authors' point) and `settings` (AB (0.8, 0.3) at other temperatures and loss weights, to choose
the configuration defaults).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: one thread per run

import argparse
import hashlib
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the summary module beside this file
from compare_classifier_summary import INITS, aggregate, plot, to_markdown

# The settings every run shares unless its method overrides them: the authors' CIFAR temperature
# with the Hinton-equivalent weight kd_weight = T**2. The budget (--steps) is chosen to separate
# methods: long runs converge to within a few test images of each other.
COMMON_SETTINGS: dict[str, Any] = {
    "temperature": 4.0,
    "kd_weight": 16.0,
    "ce_weight": 1.0,
    "ab_warmup_ratio": 0.0,
    # Pinned: a run must not depend on the config's defaults (raw logits unless a row says so).
    "logit_standardization": False,
}
TRAINING_SETTINGS: dict[str, Any] = {
    "per_device_train_batch_size": 64,
    "learning_rate": 3e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,  # a fraction of the run
    "weight_decay": 0.01,
}
DEFAULT_SEEDS = tuple(range(10))
REFERENCE = "kd"


@dataclass(frozen=True)
class Method:
    """A distillation setting: its key, table label, group and `ABKDClassifierConfig` fields.

    Attributes:
        key: a short name, used in `--methods` and in run folders.
        label: the row label of the table.
        group: `"divergences"`, `"grid"`, `"settings"` or `"custom"`.
        overrides: config fields that differ from `COMMON_SETTINGS` (e.g. `divergence`).
    """

    key: str
    label: str
    group: str
    overrides: Mapping[str, Any] = field(default_factory=dict)


def ab_method(
    alpha: float, beta: float, *, label: str | None = None, group: str = "grid", key: str = ""
) -> Method:
    """The alpha-beta divergence at `(alpha, beta)` with the shared settings.

    Args:
        alpha: alpha of the alpha-beta divergence.
        beta: beta of the alpha-beta divergence.
        label: the row label; by default `AB (alpha, beta)`.
        group: the table section.
        key: the method key; by default `ab_<alpha>_<beta>`.
    """
    return Method(
        key=key or f"ab_{alpha:g}_{beta:g}",
        label=label or f"AB ({alpha:g}, {beta:g})",
        group=group,
        overrides={"divergence": "ab", "alpha": alpha, "beta": beta},
    )


def settings_method(
    temperature: float, kd_weight: float, ce_weight: float, ab_warmup_ratio: float = 0.0
) -> Method:
    """AB (0.8, 0.3) at another temperature, loss weights or (alpha, beta) warm-up ratio."""
    warmup = f", warm-up {ab_warmup_ratio:g}" if ab_warmup_ratio else ""
    return Method(
        key=f"ab_T{temperature:g}_kd{kd_weight:g}_ce{ce_weight:g}_wu{ab_warmup_ratio:g}",
        label=f"AB (0.8, 0.3), T={temperature:g}, kd_weight={kd_weight:g}, "
        f"ce_weight={ce_weight:g}{warmup}",
        group="settings",
        overrides={
            "divergence": "ab",
            "alpha": 0.8,
            "beta": 0.3,
            "temperature": temperature,
            "kd_weight": kd_weight,
            "ce_weight": ce_weight,
            "ab_warmup_ratio": ab_warmup_ratio,
        },
    )


def build_methods() -> dict[str, Method]:
    """Every predefined method by key, in table order (groups `divergences`, `grid`, `settings`)."""
    ab, ablsd = {"divergence": "ab", "alpha": 0.8, "beta": 0.3}, {"alpha": 0.9, "beta": 0.3}
    standardised = {"logit_standardization": True}
    # The authors' ABLSD is AB (0.9, 0.3) on standardised logits, at their T = 2, b = 9 and
    # gamma = 0.1 (`ablsd_recipe`) and at the shared settings (`ablsd`).
    recipe = {"temperature": 2.0, "kd_weight": 9.0, "ce_weight": 0.1}
    rows = (
        ("ce", "CE alone (no teacher)", {"divergence": "fkl", "kd_weight": 0.0}),
        ("kd", "KD (forward KL)", {"divergence": "fkl"}),
        ("rkl", "reverse KL", {"divergence": "rkl"}),
        ("jsd", "JSD (0.5)", {"divergence": "jsd", "jsd_beta": 0.5}),
        ("tvd", "TVD", {"divergence": "tvd"}),
        ("lsd", "LSD (forward KL, standardised logits)", {"divergence": "fkl", **standardised}),
        ("ab", "AB (0.8, 0.3), the authors'", ab),
        ("ab_ls", "AB (0.8, 0.3), standardised logits", {**ab, **standardised}),
        ("ablsd", "ABLSD (0.9, 0.3), standardised logits", {**ab, **ablsd, **standardised}),
        ("ablsd_recipe", "ABLSD (0.9, 0.3), T=2, kd_weight=9, ce_weight=0.1",
         {**ab, **ablsd, **standardised, **recipe}),
    )  # fmt: skip
    methods = [Method(key, label, "divergences", overrides) for key, label, overrides in rows]
    methods += [ab_method(a, b) for a, b in ((0.5, 0.3), (1.1, 0.3), (0.8, 0.1), (0.8, 0.5))]
    # The shared setting itself (T=4, kd_weight=16, ce_weight=1) is the `ab` row.
    settings = ((1, 1, 1), (1, 1, 0), (2, 4, 1), (4, 1, 1), (4, 32, 1), (4, 16, 0), (4, 16, 1, 0.5))
    methods += [settings_method(*setting) for setting in settings]
    return {method.key: method for method in methods}


METHODS: dict[str, Method] = build_methods()
GROUPS = ("divergences", "grid", "settings")
# Paired comparisons stated beside the table (method, against): the questions behind the
# configuration defaults.
COMPARISONS = (
    ("ab", "kd"),
    ("ab", "ce"),
    ("kd", "ce"),
    ("lsd", "kd"),
    ("ab_ls", "ab"),
    ("ablsd", "ab"),
    ("ab", "ab_T4_kd1_ce1_wu0"),
    ("ab", "ab_T1_kd1_ce1_wu0"),
    ("ab", "ab_T4_kd16_ce0_wu0"),
)


def parse_ab(spec: str) -> Method:
    """A method of the `custom` group from `--ab`.

    Args:
        spec: `"ALPHA,BETA"` or `"ALPHA,BETA:LABEL"`.

    Raises:
        SystemExit: when `spec` is not of that form.
    """
    values, _, label = spec.partition(":")
    try:
        alpha, beta = (float(value) for value in values.split(","))
    except ValueError as error:
        raise SystemExit(f'--ab takes "ALPHA,BETA" or "ALPHA,BETA:LABEL", got {spec!r}.') from error
    return ab_method(alpha, beta, label=label.strip() or None, group="custom")


def select_methods(keys: Sequence[str], extra: Sequence[str] = ()) -> list[Method]:
    """The methods named by keys or group names, then the `--ab` ones, each once, in that order.

    Args:
        keys: method keys or group names (`divergences`, `grid`, `settings`).
        extra: `--ab` specifications (see `parse_ab`).

    Raises:
        SystemExit: for an unknown key, naming the valid ones.
    """
    chosen: dict[str, Method] = {}
    for key in keys:
        if key in GROUPS:
            chosen.update({m.key: m for m in METHODS.values() if m.group == key})
        elif key in METHODS:
            chosen[key] = METHODS[key]
        else:
            raise SystemExit(
                f"Unknown method {key!r}; choose from {', '.join([*GROUPS, *METHODS])}."
            )
    for spec in extra:
        method = parse_ab(spec)
        chosen[method.key] = method
    return list(chosen.values())


def run_config(method: Method, seed: int, steps: int, output_dir: str) -> dict[str, Any]:
    """The `ABKDClassifierConfig` keyword arguments of one run: the method's overrides on the
    shared settings, and the same budget, schedule and seed handling for every method."""
    settings = {**COMMON_SETTINGS, **TRAINING_SETTINGS, **method.overrides}
    return {
        **settings,
        "output_dir": output_dir,
        "max_steps": steps,
        "seed": seed,
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": max(steps, 1),
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


# ----------------------------------------------------------------------------- data and models


class TensorClassificationDataset:
    """`pixel_values` `(N, 1, 8, 8)` and `labels` `(N,)` as a map-style dataset of dicts."""

    def __init__(self, pixel_values: Any, labels: Any) -> None:
        self.pixel_values, self.labels = pixel_values, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"pixel_values": self.pixel_values[index], "labels": self.labels[index]}


@dataclass
class DemoTask:
    """The data, preprocessed once, and the teacher.

    Attributes:
        train: the training split.
        test_pixels: `(M, C, H, W)` held-out images, preprocessed.
        test_labels: `(M,)` their class ids.
        teacher: the frozen teacher (eval mode).
        build_student: `seed -> model`, a freshly initialised student.
    """

    train: Any
    test_pixels: Any
    test_labels: Any
    teacher: Any
    build_student: Callable[[int], Any]


def load_demo_task() -> DemoTask:
    """The demo's digits (1438 training, 359 test images), its teacher and its student builder."""
    import torch
    from transformers import AutoModelForImageClassification

    from abkd_trainer.classification import demo

    datasets = demo.load_demo_dataset()
    processor = demo.load_demo_image_processor()

    def tensors(split: str) -> tuple[Any, Any]:
        rows = datasets[split]
        pixels = processor(list(rows["image"]), return_tensors="pt")["pixel_values"]
        return pixels, torch.tensor(list(rows["label"]))

    teacher = AutoModelForImageClassification.from_pretrained(demo.DEMO_TEACHER_DIR).eval()
    (train_pixels, train_labels), (test_pixels, test_labels) = tensors("train"), tensors("test")
    return DemoTask(
        TensorClassificationDataset(train_pixels, train_labels),
        test_pixels,
        test_labels,
        teacher,
        lambda seed: demo.build_demo_student(teacher.config, seed=seed),
    )


def evaluate(model: Any, task: DemoTask) -> dict[str, float]:
    """Top-1 scores on every held-out image.

    Returns:
        `accuracy` and `teacher_agreement` (fractions), `correct` (images right) and
        `num_test` (images scored).
    """
    import torch

    model.eval()
    with torch.no_grad():
        predictions = model(pixel_values=task.test_pixels).logits.argmax(-1)
        teacher = task.teacher(pixel_values=task.test_pixels).logits.argmax(-1)
    correct = int((predictions == task.test_labels).sum())
    return {
        "accuracy": correct / len(task.test_labels),
        "teacher_agreement": (predictions == teacher).float().mean().item(),
        "correct": correct,
        "num_test": len(task.test_labels),
    }


def ce_init_path(work_dir: Path, seed: int, steps: int) -> Path:
    """The cached CE-trained student: named by seed, steps and a digest of the training settings."""
    digest = hashlib.sha256(json.dumps(TRAINING_SETTINGS, sort_keys=True).encode()).hexdigest()
    return work_dir / f"ce_init_seed{seed}_steps{steps}_{digest[:8]}.safetensors"


def ce_trained_student(task: DemoTask, seed: int, steps: int, work_dir: Path) -> Any:
    """The student trained with cross-entropy alone for `steps` (a plain `Trainer`), cached in
    `work_dir` as safetensors, so that reruns and every method share it."""
    from safetensors.torch import load_file, save_file
    from transformers import PrinterCallback, Trainer, TrainingArguments

    student = task.build_student(seed)
    path = ce_init_path(work_dir, seed, steps)
    if path.is_file():
        student.load_state_dict(load_file(path))
        return student
    with tempfile.TemporaryDirectory() as scratch:
        arguments = TrainingArguments(
            output_dir=scratch,
            max_steps=steps,
            seed=seed,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            logging_steps=max(steps, 1),
            **TRAINING_SETTINGS,
        )
        trainer = Trainer(model=student, args=arguments, train_dataset=task.train)
        trainer.remove_callback(PrinterCallback)  # the script prints its own progress
        trainer.train()
    work_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, partial)
    os.replace(partial, path)
    return student


def distil(task: DemoTask, student: Any, method: Method, seed: int, steps: int) -> dict[str, Any]:
    """Train `student` with `method` for `steps`; the held-out scores and the training time."""
    from transformers import PrinterCallback

    from abkd_trainer.classification.config import ABKDClassifierConfig
    from abkd_trainer.classification.trainer import ABKDClassifierTrainer

    with tempfile.TemporaryDirectory() as scratch:  # nothing is saved; one per run and process
        args = ABKDClassifierConfig(**run_config(method, seed, steps, scratch))
        trainer = ABKDClassifierTrainer(
            model=student, teacher_model=task.teacher, args=args, train_dataset=task.train
        )
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return {**evaluate(trainer.model, task), "train_seconds": round(seconds, 2)}


# ----------------------------------------------------------------------------- runs


def run_path(
    runs_dir: Path, init: str, method: Method, seed: int, steps: int, ce_steps: int
) -> Path:
    """Where one run's result is kept; the name carries a digest of everything that sets the
    run (shared and method settings, budget), so a changed setting is run again."""
    settings = run_config(method, seed, steps, "")
    settings["ce_steps"] = ce_steps if init == "ce" else 0
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return runs_dir / init / method.key / f"seed{seed}-{digest}.json"


def write_json_atomic(path: Path, value: Any) -> None:
    """Write `value` as JSON so that a killed process leaves the old file or the new, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(partial, path)


def read_result(path: Path) -> dict[str, Any] | None:
    """A finished run's result, or None when there is none (or an unreadable one, rerun)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        print(f"Unreadable result {path}: running it again.", file=sys.stderr)
        return None


def run_all(
    methods: Sequence[Method],
    *,
    inits: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    ce_steps: int,
    runs_dir: Path,
    run_one: Callable[[str, Method, int], dict[str, Any]],
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every (init, seed, method) result, in that order, running only those without a result.

    Seeds are the middle loop so that an interrupted invocation leaves whole seeds (every method
    of a seed) behind. Kept results take the current label and group of their method.

    Args:
        methods: the methods to run.
        inits: the starting points (`INITS`).
        seeds: the training seeds.
        steps: optimizer steps per run.
        ce_steps: cross-entropy steps before the `ce` runs.
        runs_dir: where the result files are kept.
        run_one: `(init, method, seed) -> scores`; called for missing runs only.
        on_run: called with each new result (progress).

    Returns:
        The result rows (`init`, `method`, `label`, `group`, `seed`, scores, settings).
    """
    results = []
    for init in inits:
        for seed in seeds:
            for method in methods:
                path = run_path(runs_dir, init, method, seed, steps, ce_steps)
                row = read_result(path)
                if row is None:
                    row = {
                        "init": init,
                        "method": method.key,
                        "seed": seed,
                        "steps": steps,
                        "ce_steps": ce_steps if init == "ce" else 0,
                        "settings": {**COMMON_SETTINGS, **method.overrides},
                        **run_one(init, method, seed),
                    }
                    write_json_atomic(path, row)
                    if on_run is not None:
                        on_run({**row, "label": method.label})
                results.append({**row, "label": method.label, "group": method.group})
    return results


def machine_description() -> str:
    """CPU model, core count and the main library versions."""
    import torch
    import transformers

    from abkd_trainer.core.reports import environment_info

    info = environment_info("cpu")
    return (
        f"{info['device']}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )


# ----------------------------------------------------------------------------- command line


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command-line arguments (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--methods", nargs="+", default=list(GROUPS), help="Method keys or groups (default: all)."
    )
    parser.add_argument("--ab", action="append", default=[], help='Extra "ALPHA,BETA[:LABEL]".')
    parser.add_argument("--inits", nargs="+", default=list(INITS), choices=INITS)
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS))
    parser.add_argument("--steps", type=int, default=500, help="Optimizer steps per run.")
    parser.add_argument(
        "--ce_steps", type=int, default=300, help="Cross-entropy steps before `ce` runs."
    )
    parser.add_argument("--reference", default=REFERENCE, help="Method of the Δ columns.")
    parser.add_argument("--output_dir", default="benchmarks/results/classifier_comparison")
    return parser.parse_args(argv)


def teacher_accuracy(task: DemoTask) -> float:
    """The teacher's held-out top-1 accuracy (a fraction)."""
    import torch

    with torch.no_grad():
        predictions = task.teacher(pixel_values=task.test_pixels).logits.argmax(-1)
    return (predictions == task.test_labels).float().mean().item()


def make_header(
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    results: Sequence[Mapping[str, Any]],
    task: DemoTask,
    wall_time_s: float,
) -> dict[str, Any]:
    """What the summary states about the measurement: command, machine(s), date, budget."""
    machines = sorted({result.get("machine", "unrecorded") for result in results})
    return {
        "command": "python benchmarks/compare_classifier_divergences.py "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": "; ".join(machines),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "wall_time_s": wall_time_s,
        "seeds": list(args.seeds),
        "steps": args.steps,
        "ce_steps": args.ce_steps,
        "batch_size": TRAINING_SETTINGS["per_device_train_batch_size"],
        "learning_rate": TRAINING_SETTINGS["learning_rate"],
        "common_settings": dict(COMMON_SETTINGS),
        "reference": args.reference,
        "num_test": len(task.test_labels),
        "teacher_accuracy": teacher_accuracy(task),
        "num_runs": len(results),
        "train_seconds": sum(result["train_seconds"] for result in results),
    }


def write_outputs(
    results: Sequence[Mapping[str, Any]], header: Mapping[str, Any], output_dir: Path
) -> str:
    """Write `comparison.md`, `comparison.json` and `comparison.png`; return the markdown."""
    rows = aggregate(results, header["reference"])
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(rows, header, results, COMPARISONS)
    (output_dir / "comparison.md").write_text(markdown)
    summary = {"header": dict(header), "rows": rows, "runs": list(results)}
    write_json_atomic(output_dir / "comparison.json", summary)
    plot(rows, output_dir / "comparison.png", header["teacher_accuracy"])
    return markdown


def main(argv: Sequence[str] | None = None) -> int:
    """Run the missing runs, then write the summary; returns the exit status."""
    args = parse_arguments(argv)
    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    methods = select_methods(args.methods, args.ab)
    output_dir, machine = Path(args.output_dir), machine_description()
    runs_dir = output_dir / "runs"
    task = load_demo_task()
    start = time.perf_counter()

    def run_one(init: str, method: Method, seed: int) -> dict[str, Any]:
        if init == "ce":
            student = ce_trained_student(task, seed, args.ce_steps, runs_dir / "ce_init")
        else:
            student = task.build_student(seed)
        return {**distil(task, student, method, seed, args.steps), "machine": machine}

    def progress(row: Mapping[str, Any]) -> None:
        print(
            f"[{time.perf_counter() - start:7.1f} s] {row['init']:6s} seed {row['seed']} "
            f"{row['label']}: accuracy {100 * row['accuracy']:.2f}%",
            flush=True,
        )

    results = run_all(
        methods,
        inits=args.inits,
        seeds=args.seeds,
        steps=args.steps,
        ce_steps=args.ce_steps,
        runs_dir=runs_dir,
        run_one=run_one,
        on_run=progress,
    )
    header = make_header(args, argv, results, task, time.perf_counter() - start)
    print("\n" + write_outputs(results, header, output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
