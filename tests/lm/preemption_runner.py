"""Runs `abkd-train` and `abkd-cache-teacher` in child processes that SIGKILL themselves.

Used by `test_resume_after_kill.py`: `python preemption_runner.py WORK_DIR SEED [SCENARIOS]`
(with `tests/` on `PYTHONPATH`; SCENARIOS: comma-separated, of `off_policy`, `lmbda`,
`adaptive`, `cache`; default all). The
imports are paid once, here; every run is a child forked from this process that calls the
command's `main(argv)`, exactly as the console script does. A child meant to be killed installs
a test-only hook first (this file is the only place hooks exist: the package has none), which
sends the child SIGKILL at the chosen moment: at the end of an optimizer step, in the middle of a
checkpoint save (after the weights, or after the RNG states: before `trainer_state.json`), or
while on-policy completions are being sampled; for the cache writer, after a shard's files are
written and before the shard is renamed into place. The child writes what it was doing to a
marker file just before it dies, so that the test can check that the kill hit that moment.

The moments are drawn from `SEED`. Killed training runs are restarted with
`--resume_from_checkpoint true`, as a user on a preemptible machine would; a killed cache writer
with the same command. `WORK_DIR/results.json` records every run: its argv, the planned kill, how
the child ended (a signal or an exit code) and its marker.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

# Every import a run needs, before the first fork: the children share them.
import datasets
import torch  # noqa: F401
from testing_utils import build_prompt_completion_dataset, build_student_and_teacher
from testing_utils import build_tiny_tokenizer as tiny_tokenizer

import abkd_trainer.lm.trainer as trainer_module
from abkd_trainer.cli import cache_teacher as cache_cli
from abkd_trainer.cli import train as train_cli
from abkd_trainer.lm.on_policy import BatchSource

MAX_STEPS = 8
SAVE_STEPS = 2
CPU_FLAGS = ["--use_cpu", "true", "--bf16", "false", "--report_to", "none",
             "--disable_tqdm", "true", "--seed", "0"]  # fmt: skip
# The on-policy settings of each mode (off-policy, GKD's lmbda, the adaptive schedule).
MODES: dict[str, list[str]] = {
    "off_policy": [],
    "lmbda": ["--lmbda", "0.5"],
    "adaptive": [
        "--on_policy_schedule", "adaptive", "--lmbda", "0.75", "--replay_buffer_size", "4",
        "--eval_strategy", "steps", "--eval_steps", "2", "--adaptive_loss_eps", "0.0",
        "--adaptive_step", "0.25",
    ],
}  # fmt: skip
# Where a training child can die, in the order they come within an optimizer step `s`: the end of
# step s (before its checkpoint), its checkpoint after the weights, its checkpoint after the RNG
# states, sampling the completions of step s + 1.
MOMENTS = ("step", "save-weights", "save-rng", "sample")


def kill_plan(mode: str, seed: int, sampling_steps: set[int]) -> list[tuple[str, int]]:
    """Three `(moment, step)` kills at distinct steps, in the order a run meets them.

    Drawn from `seed`: the end of an optimizer step, one of the two moments within a checkpoint
    save (checkpoints come every `SAVE_STEPS` steps), and, for the on-policy modes, sampling
    (at a global step in `sampling_steps`, when the uninterrupted run sampled from the student;
    else another step end). Every kill comes after the first checkpoint, so that each restart has
    one to resume from.
    """
    rng = random.Random(f"preemption/{mode}/{seed}")
    first = SAVE_STEPS + 1
    moments = ["step", rng.choice(["save-weights", "save-rng"])]
    moments.append("sample" if mode != "off_policy" else "step")
    choices = {
        "step": list(range(first, MAX_STEPS)),
        "save-weights": list(range(2 * SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS)),
        "sample": sorted(step for step in sampling_steps if first <= step < MAX_STEPS),
    }
    choices["save-rng"] = choices["save-weights"]
    while True:
        plan = [(moment, rng.choice(choices[moment])) for moment in moments]
        if len({step for _, step in plan}) == len(plan):
            return sorted(plan, key=lambda kill: (kill[1], MOMENTS.index(kill[0])))


def die(marker: Path, description: str) -> None:
    """Record `description` in `marker`, then SIGKILL this process (no cleanup runs)."""
    marker.write_text(description)
    os.kill(os.getpid(), signal.SIGKILL)


def install_training_kill(moment: str, step: int, marker: Path) -> None:
    """Make `abkd-train` (in this child) build a trainer that SIGKILLs itself at `moment`."""
    from transformers import TrainerCallback

    base = trainer_module.ABKDTrainer

    class KillAtStepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                die(marker, f"step:{step}")

    class KillingTrainer(base):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if moment == "step":
                self.add_callback(KillAtStepEnd())
            if moment == "sample":
                sampler = self.on_policy.samplers[BatchSource.STUDENT]
                sample = sampler.sample

                def sample_then_die(prompts):
                    completions = sample(prompts)  # generated, not yet trained on
                    if self.state.global_step >= step:
                        die(marker, f"sample:{self.state.global_step}")
                    return completions

                sampler.sample = sample_then_die

        def save_model(self, output_dir=None, _internal_call=False):
            super().save_model(output_dir, _internal_call=_internal_call)
            saving_checkpoint = output_dir is not None and "checkpoint-" in str(output_dir)
            if moment == "save-weights" and saving_checkpoint and self.state.global_step == step:
                die(marker, f"save-weights:{step}:{sorted(os.listdir(output_dir))}")

        def _save_rng_state(self, output_dir):
            super()._save_rng_state(output_dir)
            if moment == "save-rng" and self.state.global_step == step:
                die(marker, f"save-rng:{step}:{sorted(os.listdir(output_dir))}")

    trainer_module.ABKDTrainer = KillingTrainer


def install_cache_kill(shard_number: int, marker: Path) -> None:
    """Make the cache writer (in this child) die after writing its `shard_number`-th shard's
    files, before renaming the shard into place."""
    save_to_disk = datasets.Dataset.save_to_disk
    calls = {"count": 0}

    def save_then_die(self, dataset_path, *args, **kwargs):
        save_to_disk(self, dataset_path, *args, **kwargs)
        calls["count"] += 1
        if calls["count"] == shard_number:
            die(marker, f"shard:{shard_number}:{Path(dataset_path).name}")

    datasets.Dataset.save_to_disk = save_then_die


def in_child(log_path: Path, body: Callable[[], int]) -> dict[str, Any]:
    """Run `body` in a forked child (output to `log_path`); how it ended."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            with open(log_path, "w") as log:
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                code = body()
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status)}
    return {"exit_code": os.WEXITSTATUS(status)}


def write_inputs(paths: dict[str, Path]) -> int:
    """A tiny student and teacher (saved with the tokenizer) and local train/test files."""
    tokenizer = tiny_tokenizer()
    student, teacher = build_student_and_teacher("qwen2", tokenizer)
    build_prompt_completion_dataset(8).to_json(paths["train"])
    build_prompt_completion_dataset(4).to_json(paths["test"])
    for name, model in (("student", student), ("teacher", teacher)):
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    return 0


def training_argv(paths: dict[str, Path], mode: str, output_dir: Path) -> list[str]:
    return [
        "--model_name_or_path", str(paths["student"]),
        "--teacher_model_name_or_path", str(paths["teacher"]),
        "--dataset_name", str(paths["train"]), "--dataset_test_file", str(paths["test"]),
        "--max_length", "48", "--max_new_tokens", "4",
        "--max_steps", str(MAX_STEPS), "--save_strategy", "steps", "--save_steps", str(SAVE_STEPS),
        "--logging_steps", "1", "--learning_rate", "1e-3",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2",
        *MODES[mode], "--output_dir", str(output_dir), *CPU_FLAGS,
    ]  # fmt: skip


def train(argv: list[str], kill: tuple[str, int] | None, marker: Path) -> int:
    """`abkd-train argv` in this child, killed at `kill` (a `(moment, step)`) if given."""
    if kill is not None:
        install_training_kill(*kill, marker)
    return train_cli.main(argv)


def sampling_steps(output_dir: Path) -> set[int]:
    """The global steps at which a finished run sampled from the student (for the next step)."""
    state = json.loads((output_dir / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    return {log["step"] - 1 for log in state["log_history"] if log.get("on_policy_fraction", 0) > 0}


def run_training(paths: dict[str, Path], work_dir: Path, mode: str, seed: int) -> dict[str, Any]:
    """The uninterrupted run, then the same run killed at the planned moments and resumed."""
    reference = work_dir / mode / "uninterrupted"
    reference_argv = training_argv(paths, mode, reference)
    log = work_dir / mode / "uninterrupted.log"
    unused_marker = work_dir / mode / "uninterrupted.marker"
    outcome = in_child(log, partial(train, reference_argv, None, unused_marker))
    runs = [{"argv": reference_argv, **outcome}]
    plan = kill_plan(mode, seed, sampling_steps(reference))
    argv = training_argv(paths, mode, work_dir / mode / "killed")
    for attempt, kill in enumerate([*plan, None]):
        if attempt > 0:  # a restart: continue from the latest complete checkpoint
            argv = [*training_argv(paths, mode, work_dir / mode / "killed"),
                    "--resume_from_checkpoint", "true"]  # fmt: skip
        marker = work_dir / mode / f"killed-{attempt}.marker"
        log = work_dir / mode / f"killed-{attempt}.log"
        outcome = in_child(log, partial(train, argv, kill, marker))
        runs.append(
            {
                "argv": argv,
                "planned": None if kill is None else f"{kill[0]}:{kill[1]}",
                "marker": marker.read_text() if marker.is_file() else None,
                **outcome,
            }
        )
    return {"plan": [f"{moment}:{step}" for moment, step in plan], "runs": runs}


def cache_argv(paths: dict[str, Path], output_dir: Path) -> list[str]:
    return [
        "--teacher_model_name_or_path", str(paths["teacher"]),
        "--model_name_or_path", str(paths["student"]),
        "--dataset_name", str(paths["train"]), "--dataset_test_file", str(paths["test"]),
        "--eval_strategy", "steps", "--max_length", "48", "--top_k", "12",
        "--cache_shard_size", "1", "--output_dir", str(output_dir), *CPU_FLAGS,
    ]  # fmt: skip


def write_cache(argv: list[str], shard_number: int | None, marker: Path) -> int:
    """`abkd-cache-teacher argv` in this child, killed in its `shard_number`-th shard if given."""
    if shard_number is not None:
        install_cache_kill(shard_number, marker)
    return cache_cli.main(argv)


def run_cache_writer(paths: dict[str, Path], work_dir: Path, seed: int) -> dict[str, Any]:
    """A clean cache, then the same command killed in the middle of a shard and rerun."""
    folder = work_dir / "cache"
    clean, killed = cache_argv(paths, folder / "clean"), cache_argv(paths, folder / "killed")
    # 12 shards (8 training rows, 4 evaluation rows, one per shard).
    shard_number = random.Random(f"preemption/cache/{seed}").randint(2, 10)
    marker = folder / "killed.marker"
    log = folder / "clean.log"
    runs = [{"argv": clean, **in_child(log, partial(write_cache, clean, None, marker))}]
    outcome = in_child(folder / "killed-0.log", partial(write_cache, killed, shard_number, marker))
    runs.append(
        {
            "argv": killed,
            "planned": f"shard:{shard_number}",
            "marker": marker.read_text() if marker.is_file() else None,
            **outcome,
        }
    )
    leftovers = sorted(path.name for path in (folder / "killed").rglob("*.tmp-*"))
    outcome = in_child(folder / "killed-1.log", partial(write_cache, killed, None, marker))
    runs.append({"argv": killed, "planned": None, **outcome})
    return {"runs": runs, "temporary_dirs_after_kill": leftovers}


def main(work_dir: str, seed: str, scenarios: str = ",".join([*MODES, "cache"])) -> int:
    """Run the `scenarios` (comma-separated: training modes and `cache`) into `work_dir`."""
    names = scenarios.split(",")
    work_dir = Path(work_dir)
    for name in (*MODES, "cache"):
        (work_dir / name).mkdir(parents=True, exist_ok=True)
    paths = {name: work_dir / name for name in ("student", "teacher")}
    paths.update(train=work_dir / "train.jsonl", test=work_dir / "test.jsonl")
    written = in_child(work_dir / "inputs.log", partial(write_inputs, paths))
    if written != {"exit_code": 0}:
        raise RuntimeError(f"Writing the tiny models failed ({written}): see inputs.log.")
    results: dict[str, Any] = {
        mode: run_training(paths, work_dir, mode, int(seed)) for mode in MODES if mode in names
    }
    if "cache" in names:
        results["cache"] = run_cache_writer(paths, work_dir, int(seed))
    (work_dir / "results.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
