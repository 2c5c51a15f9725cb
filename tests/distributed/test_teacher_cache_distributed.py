"""The offline teacher on two CPU ranks (gloo), through ``torchrun`` and the two CLIs.

* ``abkd-cache-teacher`` on two ranks (DDP, and ZeRO-3 with every teacher parameter partitioned)
  writes the same cache as one process: shards are spread over the ranks by index, so their
  contents do not depend on the number of processes. The shard sizes leave one rank with fewer
  teacher forwards, which ZeRO-3 must pad with idle forwards to keep its collectives in step.
* ``abkd-train --teacher_cache`` on two ranks (ZeRO-2 and ZeRO-3, gradient accumulation 2)
  follows the single-process trajectory with the same global batch, as the live teacher does in
  ``test_deepspeed_launchers.py``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from abkd_trainer.lm.teacher_cache import MANIFEST_NAME, TeacherCache

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TIMEOUT_S = 600
# 16 rows: every optimizer step sees whole batches on 1 and on 2 ranks (the global batch is 4).
NUM_ROWS = 16
SHARD_SIZE = 5  # shards of 5, 5, 5, 1 rows: rank 0 runs 6 teacher batches of 2, rank 1 only 4
MAX_STEPS = 4
RTOL = 1e-5
CPU_FLAGS = ["--bf16", "false", "--report_to", "none", "--disable_tqdm", "true",
             "--dataloader_num_workers", "0", "--seed", "0"]  # fmt: skip


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("ACCELERATE_", "LOCAL_", "MASTER_", "TORCHELASTIC_"))
        and name not in ("RANK", "WORLD_SIZE", "GROUP_RANK", "ROLE_RANK")
    }
    env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")  # fmt: skip
    return env


def _run(module: str, args: list[str], ranks: int, log: Path) -> None:
    if ranks == 1:
        command = [sys.executable, "-m", module, *args]
    else:
        command = [str(BIN / "torchrun"), f"--nproc_per_node={ranks}",
                   f"--master_port={_free_port()}", "-m", module, *args]  # fmt: skip
    with log.open("w") as handle:
        completed = subprocess.run(
            command, cwd=REPO_ROOT, env=_env(), stdout=handle, stderr=subprocess.STDOUT,
            timeout=TIMEOUT_S, check=False,
        )  # fmt: skip
    if completed.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
        pytest.fail(f"{' '.join(command)} exited with {completed.returncode}:\n{tail}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from testing_utils import build_student_and_teacher, build_tiny_tokenizer

    root = tmp_path_factory.mktemp("teacher_cache")
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("qwen2", tokenizer)
    paths = {"root": root, "data": root / "train.jsonl"}
    for name, model in (("student", student), ("teacher", teacher)):
        paths[name] = root / name
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    rows = [
        {"prompt": f"Count to {i}.", "completion": " " + " ".join("0123456789"[: i % 9 + 1])}
        for i in range(NUM_ROWS)
    ]
    Dataset.from_list(rows).to_json(paths["data"])
    config = json.loads((REPO_ROOT / "examples" / "deepspeed" / "zero3.json").read_text())
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    paths["zero3"] = root / "zero3.json"
    paths["zero3"].write_text(json.dumps(config))
    paths["zero2"] = REPO_ROOT / "examples" / "deepspeed" / "zero2.json"
    caches = {}

    def cache(kind: str) -> Path:
        if kind not in caches:
            output = root / f"cache-{kind}"
            args = [
                "--teacher_model_name_or_path", str(paths["teacher"]),
                "--model_name_or_path", str(paths["student"]),
                "--dataset_name", str(paths["data"]), "--max_length", "32",
                "--top_k", "16", "--cache_shard_size", str(SHARD_SIZE),
                "--per_device_eval_batch_size", "2", "--output_dir", str(output), *CPU_FLAGS,
            ]  # fmt: skip
            if kind == "zero3":
                args += ["--deepspeed", str(paths["zero3"])]
            else:
                args += ["--use_cpu", "true"]
            ranks = 1 if kind == "one" else 2
            _run("abkd_trainer.cli.cache_teacher", args, ranks, root / f"{kind}.log")
            caches[kind] = output
        return caches[kind]

    paths["cache"] = cache
    paths["histories"] = {}
    return paths


@pytest.mark.parametrize("kind", ["ddp", "zero3"])
def test_two_ranks_write_the_cache_of_one(setup, kind):
    one, two = TeacherCache(setup["cache"]("one")), TeacherCache(setup["cache"](kind))
    one_manifest = json.loads((one.path / MANIFEST_NAME).read_text())
    two_manifest = json.loads((two.path / MANIFEST_NAME).read_text())
    assert two_manifest.pop("written_by")["num_processes"] == 2
    one_manifest.pop("written_by")
    one_manifest["splits"]["train"].pop("num_bytes")
    two_manifest["splits"]["train"].pop("num_bytes")
    assert two_manifest == one_manifest
    rows = range(NUM_ROWS)
    expected, actual = one.rows(rows), two.rows(rows)
    assert torch.equal(actual.topk_ids, expected.topk_ids)
    # DDP runs the same forwards; ZeRO-3 gathers the same weights, so equal up to rounding.
    torch.testing.assert_close(actual.topk_log_probs, expected.topk_log_probs, rtol=0, atol=1e-6)
    torch.testing.assert_close(actual.tail_log_prob, expected.tail_log_prob, rtol=0, atol=1e-6)


def _train_history(setup, name: str, ranks: int, extra: list[str]) -> list[dict]:
    """The logged steps of a training run from the 1-process cache (each run once per module)."""
    if name in setup["histories"]:
        return setup["histories"][name]
    output = setup["root"] / name
    per_device = 2 if ranks == 1 else 1
    args = [
        "--model_name_or_path", str(setup["student"]),
        "--teacher_cache", str(setup["cache"]("one")),
        "--dataset_name", str(setup["data"]), "--max_length", "32",
        "--per_device_train_batch_size", str(per_device), "--gradient_accumulation_steps", "2",
        "--max_steps", str(MAX_STEPS), "--logging_steps", "1", "--learning_rate", "1e-3",
        "--lr_scheduler_type", "constant", "--save_strategy", "steps",
        "--save_steps", str(MAX_STEPS), "--save_only_model", "true",
        "--output_dir", str(output), *CPU_FLAGS, *extra,
    ]  # fmt: skip
    _run("abkd_trainer", args, ranks, setup["root"] / f"{name}.log")
    state = json.loads((output / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    setup["histories"][name] = [log for log in state["log_history"] if "kd_loss" in log]
    return setup["histories"][name]


@pytest.mark.parametrize("stage", [2, 3])
def test_training_from_the_cache_on_two_zero_ranks_matches_one_process(setup, stage):
    reference = _train_history(setup, "train-one", 1, ["--use_cpu", "true"])
    sharded = _train_history(
        setup, f"train-zero{stage}", 2, ["--deepspeed", str(setup[f"zero{stage}"])]
    )
    assert len(reference) == len(sharded) == MAX_STEPS
    for expected, actual in zip(reference, sharded, strict=True):
        for key in ("loss", "kd_loss", "grad_norm", "teacher_agreement"):
            assert actual[key] == pytest.approx(expected[key], rel=RTOL), (key, actual, expected)
