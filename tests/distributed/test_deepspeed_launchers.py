"""Two CPU ranks (gloo) under ZeRO-2 and ZeRO-3 through ``torchrun``, ``deepspeed`` and
``accelerate launch`` (and ZeRO-3 as two single-rank "nodes"), compared with one plain process
that sees the same global batch.

Every launch runs ``run_zero_distillation.py`` (6 optimizer steps, a 27k-parameter Qwen2 student,
a 54k-parameter Qwen2 teacher, global batch 4 = 2 ranks x 1 sequence x 2 accumulation steps) and
is started at most once per module run; the tests below read its per-rank reports. The ZeRO-3
config is ``examples/deepspeed/zero3.json`` with ``stage3_param_persistence_threshold: 0``, so
every parameter is partitioned however small (the default keeps parameters under 1e5 elements
whole, i.e. all of a tiny model). Subprocesses see no GPU, so the suite means the same on any
machine. The first DeepSpeed launch on a machine JIT-compiles DeepSpeed's shared-memory
communication op (needs a C++ compiler; cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("run_zero_distillation.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "examples"
BIN = Path(sys.executable).parent  # torchrun, deepspeed and accelerate live next to python

WORLD_SIZE = 2
MAX_STEPS = 6
SAVE_STEPS = 3
ACCUMULATION = 2
# fp32 on CPU: sharded runs differ from the single process only in the order of floating-point
# reductions (gloo all-reduce, flattened ZeRO buffers); measured differences are below 3e-7
# relative over 6 steps, so 1e-5 leaves room while a wrong normalisation (x2) or a skipped or
# doubled batch would be far outside it.
RTOL = 1e-5
LAUNCH_TIMEOUT_S = 600

LAUNCHERS = ("torchrun", "deepspeed", "accelerate")
STAGES = (2, 3)


@dataclass
class Run:
    """A finished launch: where it wrote, and each rank's report (index = rank)."""

    output_dir: Path
    report_dir: Path
    reports: list[dict]

    @property
    def history(self) -> list[dict]:
        return self.reports[0]["history"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _subprocess_env() -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        # A launcher's variables from an enclosing run would confuse the ones started here.
        if not name.startswith(("ACCELERATE_", "LOCAL_", "MASTER_", "TORCHELASTIC_"))
        and name not in ("RANK", "WORLD_SIZE", "GROUP_RANK", "ROLE_RANK")
    }
    env.update(
        CUDA_VISIBLE_DEVICES="",  # CPU ranks on every machine, GPU or not
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env


def _launch(commands: list[list[str]], log_path: Path) -> None:
    """Run ``commands`` concurrently (one per simulated node) and fail with their log tails."""
    processes = []
    with log_path.open("w") as log:
        for command in commands:
            # Own process group, so that a hung launch can be ended with all of its ranks.
            processes.append(
                subprocess.Popen(
                    command,
                    cwd=REPO_ROOT,
                    env=_subprocess_env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        returncodes = []
        for process in processes:
            try:
                returncodes.append(process.wait(timeout=LAUNCH_TIMEOUT_S))
            except subprocess.TimeoutExpired:
                for other in processes:
                    if other.poll() is None:
                        os.killpg(other.pid, signal.SIGKILL)
                        other.wait()
                returncodes.append(None)
                break
    if any(returncode != 0 for returncode in returncodes):
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-60:])
        shown = "\n".join(" ".join(command) for command in commands)
        pytest.fail(f"launch failed (exit codes {returncodes}):\n{shown}\n{tail}")


class Launches:
    """Starts each distinct run once per test session and remembers its result."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.models = self._save_tiny_models()
        self._runs: dict[str, Run] = {}

    def _save_tiny_models(self) -> dict[str, Path]:
        # Saved once and loaded by every run with from_pretrained: ZeRO-3 then loads the same
        # weights into partitioned parameters, whatever the launcher.
        from testing_utils import build_tiny_causal_lm, build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        paths = {}
        for role, hidden_size, seed in (("student", 32, 1), ("teacher", 48, 2)):
            model = build_tiny_causal_lm(
                "qwen2", tokenizer, hidden_size=hidden_size, num_layers=2, seed=seed
            )
            paths[role] = self.root / role
            model.save_pretrained(paths[role])
            tokenizer.save_pretrained(paths[role])
        return paths

    def deepspeed_config(self, stage: int) -> Path:
        """The example config for ``stage``, every parameter partitioned under ZeRO-3."""
        config = json.loads((EXAMPLES / "deepspeed" / f"zero{stage}.json").read_text())
        if stage == 3:
            config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        path = self.root / f"zero{stage}.json"
        path.write_text(json.dumps(config, indent=1))
        return path

    def accelerate_config(self, stage: int) -> Path:
        """The example accelerate config for ``stage``, pointing at :meth:`deepspeed_config`."""
        config = yaml.safe_load((EXAMPLES / "accelerate" / f"zero{stage}.yaml").read_text())
        config["deepspeed_config"]["deepspeed_config_file"] = str(self.deepspeed_config(stage))
        path = self.root / f"zero{stage}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def run(
        self,
        name: str,
        launcher: str | None,
        stage: int | None,
        *,
        resume_from: Path | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> Run:
        if name in self._runs:
            return self._runs[name]
        output_dir, report_dir = self.root / name / "output", self.root / name / "reports"
        script_args = [
            str(SCRIPT),
            f"--student={self.models['student']}",
            f"--teacher={self.models['teacher']}",
            f"--output_dir={output_dir}",
            f"--report_dir={report_dir}",
            f"--max_steps={MAX_STEPS}",
            f"--save_steps={SAVE_STEPS}",
            f"--gradient_accumulation_steps={ACCUMULATION}",
            "--save_final",
        ]
        if resume_from is not None:
            script_args.append(f"--resume_from_checkpoint={resume_from}")
        script_args.extend(extra_args)
        port = str(_free_port())
        if launcher is None:  # the reference: one plain process, the whole global batch
            commands = [[sys.executable, *script_args,
                         f"--per_device_train_batch_size={WORLD_SIZE}"]]  # fmt: skip
        elif launcher == "torchrun":
            commands = [[str(BIN / "torchrun"), f"--nproc_per_node={WORLD_SIZE}",
                         f"--master_port={port}", *script_args,
                         f"--deepspeed={self.deepspeed_config(stage)}"]]  # fmt: skip
        elif launcher == "torchrun-ddp":  # plain data parallelism on CPU (gloo), no DeepSpeed
            commands = [[str(BIN / "torchrun"), f"--nproc_per_node={WORLD_SIZE}",
                         f"--master_port={port}", *script_args]]  # fmt: skip
        elif launcher == "torchrun-2-nodes":
            # Two torchrun agents, one rank each, as on two machines: every rank is local rank 0.
            commands = [[str(BIN / "torchrun"), f"--nnodes={WORLD_SIZE}", "--nproc_per_node=1",
                         f"--node_rank={node}", "--master_addr=127.0.0.1",
                         f"--master_port={port}", *script_args,
                         f"--deepspeed={self.deepspeed_config(stage)}"]
                        for node in range(WORLD_SIZE)]  # fmt: skip
        elif launcher == "deepspeed":
            commands = [[str(BIN / "deepspeed"), f"--num_gpus={WORLD_SIZE}",
                         f"--master_port={port}", *script_args,
                         f"--deepspeed={self.deepspeed_config(stage)}"]]  # fmt: skip
        elif launcher == "accelerate":
            commands = [[str(BIN / "accelerate"), "launch",
                         f"--config_file={self.accelerate_config(stage)}",
                         f"--num_processes={WORLD_SIZE}", f"--main_process_port={port}",
                         *script_args]]  # fmt: skip
        else:
            raise ValueError(f"unknown launcher {launcher!r}")
        _launch(commands, self.root / f"{name}.log")
        num_ranks = 1 if launcher is None else WORLD_SIZE
        reports = [
            json.loads((report_dir / f"rank{rank}.json").read_text()) for rank in range(num_ranks)
        ]
        self._runs[name] = Run(output_dir=output_dir, report_dir=report_dir, reports=reports)
        return self._runs[name]

    def reference(self) -> Run:
        return self.run("reference", None, None)

    def sharded(self, launcher: str, stage: int) -> Run:
        return self.run(f"{launcher}-zero{stage}", launcher, stage)


@pytest.fixture(scope="module")
def launches(tmp_path_factory) -> Launches:
    return Launches(tmp_path_factory.mktemp("deepspeed_launchers"))


def _assert_same_trajectory(actual: list[dict], expected: list[dict]) -> None:
    assert [entry["step"] for entry in actual] == [entry["step"] for entry in expected]
    for key in ("loss", "grad_norm"):
        torch.testing.assert_close(
            torch.tensor([entry[key] for entry in actual], dtype=torch.float64),
            torch.tensor([entry[key] for entry in expected], dtype=torch.float64),
            rtol=RTOL,
            atol=0.0,
            msg=lambda message, key=key: f"{key} trajectory differs: {message}",
        )


def _assert_state_dicts_close(actual: dict, expected: dict, *, rtol: float, atol: float) -> None:
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=rtol, atol=atol, msg=name)


def _assert_rank_holds_its_share(report: dict, rank: int, stage: int) -> None:
    """How one rank's student and teacher engines hold parameters and optimizer state."""
    assert report["rank"] == rank
    assert report["world_size"] == WORLD_SIZE
    assert report["distributed_type"] == "DistributedType.DEEPSPEED"
    student, teacher = report["student"], report["teacher"]
    # Frozen teacher: nothing trainable, no optimizer state on any rank.
    assert not teacher["requires_grad"]
    assert teacher["optimizer_state_numel"] == 0
    assert student["requires_grad"]
    # The student's fp32 master weights are split across the ranks under ZeRO-2 and -3.
    assert student["optimizer_state_numel"] * WORLD_SIZE == pytest.approx(
        student["full_numel"], rel=0.01
    )
    if stage == 3:
        for model in (student, teacher):
            assert model["stage"] == 3
            assert model["param_persistence_threshold"] == 0
            assert model["num_zero3_params"] == model["num_params"]
            assert model["num_not_available"] == model["num_params"]
            assert model["num_persistent"] == 0
            assert model["visible_numel"] == 0
            # Each rank stores its 1/world_size slice (ZeRO pads each to a multiple).
            assert model["local_shard_numel"] * WORLD_SIZE == pytest.approx(
                model["full_numel"], rel=0.01
            )
    else:
        assert student["stage"] == stage
        assert student["visible_numel"] == student["full_numel"]  # weights replicated
        assert teacher["stage"] == 0
        assert teacher["visible_numel"] == teacher["full_numel"]
        assert teacher["num_zero3_params"] == 0


@pytest.mark.parametrize("stage", STAGES, ids=lambda stage: f"zero{stage}")
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_ranks_partition_student_and_teacher(launches, launcher, stage):
    run = launches.sharded(launcher, stage)

    for rank, report in enumerate(run.reports):
        _assert_rank_holds_its_share(report, rank, stage)


@pytest.mark.parametrize("stage", STAGES, ids=lambda stage: f"zero{stage}")
@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_loss_trajectory_matches_single_process_with_same_global_batch(launches, launcher, stage):
    reference = launches.reference()
    run = launches.sharded(launcher, stage)

    assert len(reference.history) == MAX_STEPS
    for report in run.reports:  # every rank logs the same, all-reduced values
        _assert_same_trajectory(report["history"], reference.history)


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_zero3_save_model_writes_consolidated_trained_weights(launches, launcher):
    from transformers import AutoModelForCausalLM

    run = launches.sharded(launcher, 3)
    reference = launches.reference()

    model, loading_info = AutoModelForCausalLM.from_pretrained(
        run.output_dir / "final", output_loading_info=True
    )

    assert not any(loading_info.values()), loading_info  # no missing/unexpected/mismatched keys
    saved = dict(model.named_parameters())
    gathered = load_file(run.report_dir / "gathered_student.safetensors")
    initial = load_file(launches.models["student"] / "model.safetensors")
    assert saved.keys() == gathered.keys()
    _assert_state_dicts_close(saved, gathered, rtol=0.0, atol=0.0)  # what the ranks trained
    assert any(not torch.equal(saved[name], initial[name]) for name in initial)
    # ...which is what one process training on the same global batches ends with.
    reference_weights = load_file(reference.report_dir / "gathered_student.safetensors")
    _assert_state_dicts_close(saved, reference_weights, rtol=1e-4, atol=1e-6)


def test_resume_from_zero3_checkpoint_continues_trajectory(launches):
    uninterrupted = launches.sharded("torchrun", 3)
    checkpoint = uninterrupted.output_dir / f"checkpoint-{SAVE_STEPS}"
    # A real ZeRO checkpoint: one optimizer-state shard per rank.
    shards = sorted(p.name for p in checkpoint.glob(f"global_step{SAVE_STEPS}/*optim_states.pt"))
    assert len(shards) == WORLD_SIZE, shards

    resumed = launches.run("torchrun-zero3-resumed", "torchrun", 3, resume_from=checkpoint)

    for report in resumed.reports:
        after_resume = [entry for entry in report["history"] if entry["step"] > SAVE_STEPS]
        assert [entry["step"] for entry in after_resume] == list(
            range(SAVE_STEPS + 1, MAX_STEPS + 1)
        )
        _assert_same_trajectory(after_resume, uninterrupted.history[SAVE_STEPS:])
    final_weights = load_file(resumed.report_dir / "gathered_student.safetensors")
    expected_weights = load_file(uninterrupted.report_dir / "gathered_student.safetensors")
    _assert_state_dicts_close(final_weights, expected_weights, rtol=1e-5, atol=1e-7)


def test_two_node_zero3_run_partitions_and_matches_single_process(launches):
    run = launches.sharded("torchrun-2-nodes", 3)

    for rank, report in enumerate(run.reports):
        _assert_rank_holds_its_share(report, rank, stage=3)
        _assert_same_trajectory(report["history"], launches.reference().history)
