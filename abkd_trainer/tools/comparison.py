"""Compare distillation divergences on one task under one budget (the ABKD paper's protocol).

For each training seed: optionally fine-tune the student on the task first (`kd_ratio=0`, the
paper's students start fine-tuned), then distil it with each method (a divergence with its
parameters and schedule) under the same steps, learning rate and data order, and score the
result on held-out prompts: ROUGE-L of sampled responses (T = 1, top-p 1, mean over sampling
seeds, `abkd_trainer.lm.evaluation.rouge_l_evaluate`) and the divergence to the teacher on the
references (`abkd_trainer.lm.evaluation.teacher_divergence`). The task is anything
`abkd-train` accepts, given as its command-line flags (none: the offline demo):

    from abkd_trainer.tools.comparison import DEFAULT_METHODS, compare_divergences

    comparison = compare_divergences(["--max_steps", "300"], DEFAULT_METHODS, training_seeds=[0, 1])
    comparison.write("compare-out")  # comparison.md, comparison.json, comparison.png

`benchmarks/compare_divergences.py` is the command-line front end.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from abkd_trainer.core.divergence_arguments import DivergenceArguments
from abkd_trainer.divergences.registry import DIVERGENCE_NAMES, divergence_spec

# The paper's 5 sampling seeds.
DEFAULT_SAMPLING_SEEDS = (10, 20, 30, 40, 50)
# Divergences to the teacher on the held-out references (nats per response token).
TEACHER_DIVERGENCES = ("fkl", "rkl")


@dataclass(frozen=True)
class Method:
    """A distillation setting: a label and the `abkd-train` flags that select it.

    Args:
        label: the method's name in the table and the chart (unique within a comparison).
        flags: `abkd-train` flags that select it, e.g. `("--divergence", "fkl")`; they override
            the task's flags.
    """

    label: str
    flags: tuple[str, ...]


def baseline_method(name: str) -> Method:
    """A registry divergence at its configuration defaults, labelled with its name and the
    default values of its parameters (`"JSD (0.5)"`, `"FKL"`)."""
    defaults = {field.name: field.default for field in fields(DivergenceArguments)}
    values = [defaults[name] for name in divergence_spec(name).parameter_fields.values()]
    label = name.upper() + (f" ({', '.join(f'{value:g}' for value in values)})" if values else "")
    return Method(label, ("--divergence", name))


# Key -> method; the paper's baselines (every registry divergence but the alpha-beta one) with their
# default parameters, and ABKD's GPT-2 setting with and without the warm-up from forward KL.
METHODS: dict[str, Method] = {
    **{name: baseline_method(name) for name in DIVERGENCE_NAMES if name != "ab"},
    "ab-no-warmup": Method(
        "AB (0.2, 0.7), no warm-up",
        ("--divergence", "ab", "--alpha", "0.2", "--beta", "0.7", "--ab_warmup_ratio", "0"),
    ),
    "ab": Method(
        "AB (0.2, 0.7), default warm-up", ("--divergence", "ab", "--alpha", "0.2", "--beta", "0.7")
    ),
}
DEFAULT_METHODS: tuple[Method, ...] = tuple(METHODS.values())


@dataclass
class Comparison:
    """Per-run scores and what produced them; `summary` aggregates over training seeds.

    Args:
        runs: one row per (method, training seed): `method`, `seed`, `train_seconds`, `rouge_l`,
            `rouge_l_sampling_std` and the divergences to the teacher (`fkl_to_teacher`, ...).
        reference_rows: the same scores for the teacher and, with `sft_steps`, the fine-tuned
            student each method starts from.
        settings: what produced them: the task's flags, seeds, methods and the machine.
    """

    runs: list[dict[str, Any]] = field(default_factory=list)
    reference_rows: list[dict[str, Any]] = field(default_factory=list)  # teacher, SFT'd student
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Comparison:
        """Read a `comparison.json` written by `write`.

        Args:
            path: The `comparison.json` file, or the directory holding it.

        Returns:
            The comparison, with its runs, reference rows and settings (the summary is recomputed).
        """
        path = Path(path)
        data = json.loads((path / "comparison.json" if path.is_dir() else path).read_text())
        return cls(data["runs"], data["reference_rows"], data["settings"])

    @classmethod
    def merge(cls, parts: Sequence[Comparison]) -> Comparison:
        """One comparison from several runs on the same task (other seeds or other methods).

        The teacher is kept once, a fine-tuned student once per seed; the settings are the first
        part's, with the methods, training seeds, commands and wall times of all parts.

        Args:
            parts: The comparisons to merge, e.g. read with `load`.

        Returns:
            A new comparison holding every part's runs.

        Raises:
            ValueError: `parts` is empty.
        """
        if not parts:
            raise ValueError("Nothing to merge.")
        merged = cls(settings=dict(parts[0].settings))
        seen = set()
        for part in parts:
            merged.runs += part.runs
            for row in part.reference_rows:
                # The teacher once; a fine-tuned student once per seed (parts may share seeds).
                key = row["method"] if row["method"] == "teacher" else (row["method"], row["seed"])
                if key not in seen:
                    seen.add(key)
                    merged.reference_rows.append(row)
            merged.settings["methods"] = {
                **merged.settings.get("methods", {}),
                **part.settings.get("methods", {}),
            }
        merged.settings["training_seeds"] = sorted(
            {seed for part in parts for seed in part.settings.get("training_seeds", [])}
        )
        for key in ("command", "wall_time_s"):
            merged.settings[key] = [part.settings.get(key) for part in parts]
        return merged

    def summary(self) -> list[dict[str, Any]]:
        """One row per method (in run order): mean, std, min, max over training seeds.

        Returns:
            Dicts with `method`, `num_seeds` and, for each score present (`rouge_l`,
            `fkl_to_teacher`, `rkl_to_teacher`), its mean and `_std`, `_min`, `_max` (std 0.0 for a
            single seed). ROUGE-L is in points (0-100), the divergences in nats per response token.
        """
        by_method: dict[str, list[dict[str, Any]]] = {}
        for run in self.reference_rows + self.runs:
            by_method.setdefault(run["method"], []).append(run)
        rows = []
        for method, runs in by_method.items():
            row: dict[str, Any] = {"method": method, "num_seeds": len(runs)}
            for key in ("rouge_l", *(f"{name}_to_teacher" for name in TEACHER_DIVERGENCES)):
                values = [run[key] for run in runs if run.get(key) is not None]
                if values:
                    row[key] = statistics.fmean(values)
                    row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
                    row[f"{key}_min"], row[f"{key}_max"] = min(values), max(values)
            rows.append(row)
        return rows

    def to_markdown(self) -> str:
        """The summary as a Markdown table (std, min and max blank for a single run).

        Returns:
            The table, one line per method, ending in a newline.
        """
        lines = [
            "| method | runs | ROUGE-L (mean over training seeds) | std | min | max | "
            "forward KL to teacher | reverse KL to teacher |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in self.summary():
            cells = [row["method"], str(row["num_seeds"])]
            if "rouge_l" in row:
                suffixes = ("", "_std", "_min", "_max") if row["num_seeds"] > 1 else ("",)
                cells += [f"{row['rouge_l' + suffix]:.2f}" for suffix in suffixes]
                cells += [""] * (4 - len(suffixes))
            else:
                cells += [""] * 4
            for key in ("fkl_to_teacher", "rkl_to_teacher"):
                cells.append(f"{row[key]:.4f}" if key in row else "")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def write(self, output_dir: str | os.PathLike) -> list[Path]:
        """Write `comparison.json`, `comparison.md` and `comparison.png` into `output_dir`.

        Args:
            output_dir: The directory; created if missing, files in it overwritten.

        Returns:
            The three paths written: the JSON (settings, summary, runs), the Markdown table with the
            settings, and the bar chart.
        """
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        json_path = output_dir / "comparison.json"
        json_path.write_text(
            json.dumps(
                {
                    "settings": self.settings,
                    "summary": self.summary(),
                    "runs": self.runs,
                    "reference_rows": self.reference_rows,
                },
                indent=2,
            )
            + "\n"
        )
        md_path = output_dir / "comparison.md"
        md_path.write_text(self.to_markdown() + "\n" + _settings_markdown(self.settings))
        png_path = output_dir / "comparison.png"
        plot_comparison(self, png_path)
        return [json_path, md_path, png_path]


def _settings_markdown(settings: Mapping[str, Any]) -> str:
    lines = [f"- {key}: {value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def plot_comparison(comparison: Comparison, path: str | os.PathLike) -> None:
    """Bar chart of mean ROUGE-L per method with error bars (std over training seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in comparison.summary() if "rouge_l" in row]
    figure, axes = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2.0), 4.5))
    positions = range(len(rows))
    axes.bar(
        positions,
        [row["rouge_l"] for row in rows],
        yerr=[row["rouge_l_std"] for row in rows],
        capsize=4,
        color=["0.6" if row["method"] in _reference_methods(comparison) else "C0" for row in rows],
    )
    axes.set_xticks(list(positions), [row["method"] for row in rows], rotation=30, ha="right")
    axes.set_ylabel("held-out ROUGE-L")
    settings = comparison.settings
    start = (
        f", student fine-tuned {settings['sft_steps']} steps first"
        if settings.get("sft_steps")
        else ""
    )
    axes.set_title(
        f"{settings.get('task', '')}{start}\n{len(settings.get('training_seeds', []))} training "
        "seeds; error bars: std over training seeds",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _reference_methods(comparison: Comparison) -> set[str]:
    return {row["method"] for row in comparison.reference_rows}


def machine_description() -> dict[str, Any]:
    """Where the numbers come from: platform, CPU count, torch threads and library versions."""
    import torch
    import transformers
    import trl

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


def _score(
    model: Any,
    teacher: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    references: Sequence[Any],
    *,
    sampling_seeds: Sequence[int],
    max_new_tokens: int,
    batch_size: int,
    with_divergence: bool = True,
) -> dict[str, Any]:
    from abkd_trainer.divergences import get_divergence
    from abkd_trainer.lm.evaluation import rouge_l_evaluate, teacher_divergence

    result = rouge_l_evaluate(
        model,
        tokenizer,
        prompts,
        references,
        seeds=sampling_seeds,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    scores: dict[str, Any] = {"rouge_l": result.rouge_l, "rouge_l_sampling_std": result.rouge_l_std}
    if with_divergence:
        divergences = {name: get_divergence(name) for name in TEACHER_DIVERGENCES}
        first_references = [ref if isinstance(ref, str) else ref[0] for ref in references]
        measured = teacher_divergence(
            model, teacher, tokenizer, prompts, first_references, divergences, batch_size=batch_size
        )
        scores.update({f"{name}_to_teacher": value for name, value in measured.items()})
    return scores


def _train(argv: Sequence[str], init_dir: Path | None) -> tuple[Any, Any, Any]:
    """Parse `abkd-train` flags, build the run's student (from `init_dir` when given), train.

    Returns:
        (trainer, script_args, inputs).
    """
    from transformers import AutoModelForCausalLM
    from trl import get_peft_config

    from abkd_trainer.cli.train import load_run_inputs, parse_args
    from abkd_trainer.lm.trainer import ABKDTrainer

    script_args, training_args, model_args, mixture_args, demo = parse_args(argv)
    inputs = load_run_inputs(script_args, training_args, model_args, mixture_args, demo)
    model = inputs.model
    if init_dir is not None:
        if model_args.use_peft:
            raise ValueError("Fine-tuning first (sft_steps > 0) is not supported with --use_peft.")
        init_kwargs = {k: v for k, v in (training_args.model_init_kwargs or {}).items() if v}
        model = AutoModelForCausalLM.from_pretrained(init_dir, **init_kwargs)
        training_args.model_init_kwargs = None  # used above; the trainer gets a model object
    trainer = ABKDTrainer(
        model=model,
        args=training_args,
        train_dataset=inputs.train_dataset,
        processing_class=inputs.tokenizer,
        peft_config=get_peft_config(model_args),
    )
    trainer.train()
    return trainer, script_args, inputs


def compare_divergences(
    task_args: Sequence[str] = (),
    methods: Sequence[Method] = DEFAULT_METHODS,
    *,
    training_seeds: Sequence[int] = (0,),
    sft_steps: int = 0,
    sampling_seeds: Sequence[int] = DEFAULT_SAMPLING_SEEDS,
    work_dir: str | os.PathLike = "compare-divergences",
    on_run: Callable[[Comparison, dict[str, Any]], None] | None = None,
) -> Comparison:
    """Distil with every method for every training seed under the same budget; score each run.

    Args:
        task_args: `abkd-train` flags naming the task and the budget shared by all methods
            (models, dataset, `--max_steps`, `--learning_rate`, ...); empty: the offline demo
            with its defaults. The test split is scored (its first `--rouge_l_num_prompts`
            prompts, responses up to `--rouge_l_max_new_tokens`).
        methods: the settings to compare; their flags override `task_args`.
        training_seeds: `--seed` of each repetition (data order, initialisation; the demo's
            student is initialised from it).
        sft_steps: when > 0, each seed's student is first fine-tuned on the task for this many
            steps with the cross-entropy only (`--kd_ratio 0`, same other flags), and every
            method starts from that student; it is scored as "student after SFT".
        sampling_seeds: ROUGE-L sampling seeds (the paper uses 5).
        work_dir: where the runs' output directories and the fine-tuned students go; a student
            fine-tuned there before with the same flags is reused.
        on_run: called with the comparison so far and each finished run's row (e.g. to print
            progress and write partial results).

    Returns:
        The [`Comparison`][abkd_trainer.tools.comparison.Comparison]; call its
        [`write`][abkd_trainer.tools.comparison.Comparison.write] to save the table and the chart.

    Raises:
        ValueError: `methods` or `training_seeds` is empty, two methods share a label, or
            `sft_steps > 0` with `--use_peft` in `task_args`.
    """
    import torch

    if not methods or not training_seeds:
        raise ValueError("compare_divergences needs at least one method and one training seed.")
    labels = [method.label for method in methods]
    if len(set(labels)) != len(labels):
        raise ValueError(f"Method labels must be unique, got {labels}.")
    work_dir = Path(work_dir)
    # The evaluation needs the test split; periodic evaluation and checkpoints would only cost.
    common = ["--rouge_l_eval", "true", "--eval_strategy", "no", "--save_strategy", "no"]
    common += ["--report_to", "none", "--disable_tqdm", "true"]
    comparison = Comparison(
        settings=_settings(task_args, methods, training_seeds, sft_steps, sampling_seeds)
    )
    teacher_scored = False
    for seed in training_seeds:
        seed_flags = ["--seed", str(seed)]
        init_dir = None
        if sft_steps > 0:
            init_dir = work_dir / f"sft-seed{seed}"
            sft_flags = ["--kd_ratio", "0", "--max_steps", str(sft_steps)]
            _fine_tune_once([*task_args, *sft_flags, *seed_flags, *common], init_dir)
        for method in methods:
            run_dir = work_dir / f"{_slug(method.label)}-seed{seed}"
            argv = [*task_args, *method.flags, *seed_flags, "--output_dir", str(run_dir), *common]
            start = time.perf_counter()
            trainer, script_args, inputs = _train(argv, init_dir)
            train_seconds = time.perf_counter() - start
            prompts, references = _test_prompts(inputs, script_args)
            score = _scorer(trainer, inputs, prompts, references, script_args, sampling_seeds)
            with torch.no_grad():
                if not teacher_scored:
                    row = {"method": "teacher", "seed": seed}
                    row.update(score(trainer.teacher_model, with_divergence=False))
                    comparison.reference_rows.append(row)
                    teacher_scored = True
                if init_dir is not None and method is methods[0]:
                    sft_student = _load_like(trainer.model, init_dir)
                    row = {"method": "student after SFT", "seed": seed}
                    row.update(score(sft_student))
                    comparison.reference_rows.append(row)
                row = {"method": method.label, "seed": seed, "train_seconds": train_seconds}
                row.update(score(trainer.model))
            comparison.runs.append(row)
            if on_run is not None:
                on_run(comparison, row)
    return comparison


def _settings(
    task_args: Sequence[str],
    methods: Sequence[Method],
    training_seeds: Sequence[int],
    sft_steps: int,
    sampling_seeds: Sequence[int],
) -> dict[str, Any]:
    """What produced a comparison: the task, the methods' flags, the seeds, the machine."""
    return {
        "task": "offline demo" if not task_args else " ".join(task_args),
        "task_args": list(task_args),
        "training_seeds": list(training_seeds),
        "sft_steps": sft_steps,
        "sampling_seeds": list(sampling_seeds),
        "methods": {method.label: " ".join(method.flags) for method in methods},
        "machine": machine_description(),
    }


def _test_prompts(inputs: Any, script_args: Any) -> tuple[list[Any], list[Any]]:
    """The scored prompts and references: the first `rouge_l_num_prompts` rows of the test split."""
    from abkd_trainer.lm.evaluation import prompts_and_references

    rows = inputs.test_dataset
    if script_args.rouge_l_num_prompts is not None:
        rows = rows.select(range(min(script_args.rouge_l_num_prompts, len(rows))))
    return prompts_and_references(rows)


def _fine_tune_once(argv: list[str], output_dir: Path) -> None:
    """Fine-tune and save the student, unless `output_dir` holds one from the same flags.

    Reusing it lets the methods of one seed run in several calls (e.g. to spread a sweep).
    """
    marker = output_dir / "sft_args.json"
    if marker.is_file() and json.loads(marker.read_text()) == argv:
        return
    trainer, _, _ = _train([*argv, "--output_dir", str(output_dir)], None)
    trainer.save_model(str(output_dir))
    marker.write_text(json.dumps(argv))


def _scorer(
    trainer: Any,
    inputs: Any,
    prompts: Sequence[Any],
    references: Sequence[Any],
    script_args: Any,
    sampling_seeds: Sequence[int],
) -> Callable[..., dict[str, Any]]:
    """`score(model, with_divergence=True)` bound to this task's prompts and settings."""

    def score(model: Any, with_divergence: bool = True) -> dict[str, Any]:
        return _score(
            model,
            trainer.teacher_model,
            inputs.tokenizer,
            prompts,
            references,
            sampling_seeds=sampling_seeds,
            max_new_tokens=script_args.rouge_l_max_new_tokens,
            batch_size=script_args.rouge_l_batch_size,
            with_divergence=with_divergence,
        )

    return score


def _load_like(model: Any, directory: Path) -> Any:
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(directory, dtype=model.dtype)
    return loaded.to(model.device).eval()


def _slug(label: str) -> str:
    slug = "".join(char if char.isalnum() else "-" for char in label.lower())
    return "-".join(part for part in slug.split("-") if part)


__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_SAMPLING_SEEDS",
    "METHODS",
    "Comparison",
    "Method",
    "baseline_method",
    "compare_divergences",
    "machine_description",
    "plot_comparison",
]
