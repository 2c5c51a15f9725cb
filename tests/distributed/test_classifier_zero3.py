"""The classifier trainer on two CPU ranks under DeepSpeed, against one plain process.

Four launches of `run_classifier_distillation.py` (4 optimizer steps of a global batch of 8
images = 2 ranks x 2 images x 2 accumulation steps, a quarter of them with label -100): the
reference (one process, 4 images x 2 accumulation steps), ZeRO-3 under `torchrun` and under
`accelerate launch`, and ZeRO-2 under `deepspeed`. Under ZeRO-3 every parameter of the student
*and of the teacher* is partitioned (`stage3_param_persistence_threshold: 0`); under ZeRO-2 the
frozen teacher is replicated. Each must follow the reference's loss, gradient-norm and metric
trajectory and end with its weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_deepspeed_launchers import BIN, WORLD_SIZE, Launches, _free_port, _launch

pytestmark = pytest.mark.slow

# The classifier factories live beside the classifier tests (not on the path of this folder).
CLASSIFICATION_TESTS = str(Path(__file__).resolve().parents[1] / "classification")

RUNNER = Path(__file__).with_name("run_classifier_distillation.py")
# fp32 on CPU: the sharded runs differ from the single process only in the order of reductions.
RTOL = 1e-5
LAUNCHES = {
    "torchrun": ("torchrun", 3),
    "accelerate": ("accelerate", 3),
    "deepspeed": ("deepspeed", 2),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if CLASSIFICATION_TESTS not in sys.path:
        sys.path.append(CLASSIFICATION_TESTS)
    from classifier_factories import build_vit_classifier

    root = tmp_path_factory.mktemp("classifier_zero3")
    models = {
        # No key bias: its gradient is zero in exact arithmetic, so Adam would move it by the
        # sign of rounding noise, which differs between the sharded and the plain run.
        "student": build_vit_classifier(
            hidden_size=16, num_layers=1, seed=4, class_names=None, qkv_bias=False
        ),
        "teacher": build_vit_classifier(hidden_size=32, num_layers=2, seed=1),
    }
    paths = {}
    for role, model in models.items():
        paths[role] = root / role
        model.save_pretrained(paths[role])
    launches = Launches(root / "launches")  # the example DeepSpeed / accelerate configs

    def launch(name: str, launcher: str | None, stage: int | None) -> dict:
        report_dir = root / name / "reports"
        script = [
            str(RUNNER),
            f"--student={paths['student']}",
            f"--teacher={paths['teacher']}",
            f"--output_dir={root / name / 'output'}",
            f"--report_dir={report_dir}",
        ]
        port = f"--master_port={_free_port()}"
        if launcher is None:
            command = [sys.executable, *script, f"--per_device_train_batch_size={2 * WORLD_SIZE}"]
        elif launcher == "torchrun":
            command = [str(BIN / "torchrun"), f"--nproc_per_node={WORLD_SIZE}", port, *script,
                       f"--deepspeed={launches.deepspeed_config(stage)}"]  # fmt: skip
        elif launcher == "deepspeed":
            command = [str(BIN / "deepspeed"), f"--num_gpus={WORLD_SIZE}", port, *script,
                       f"--deepspeed={launches.deepspeed_config(stage)}"]  # fmt: skip
        else:
            command = [str(BIN / "accelerate"), "launch",
                       f"--config_file={launches.accelerate_config(stage)}",
                       f"--num_processes={WORLD_SIZE}", f"--main_process_port={_free_port()}",
                       *script]  # fmt: skip
        _launch([command], root / f"{name}.log")
        ranks = 1 if launcher is None else WORLD_SIZE
        return {
            "reports": [
                json.loads((report_dir / f"rank{r}.json").read_text()) for r in range(ranks)
            ],
            "weights": load_file(report_dir / "gathered_student.safetensors"),
            "stage": stage,
        }

    results = {"reference": launch("reference", None, None)}
    for name, (launcher, stage) in LAUNCHES.items():
        results[name] = launch(name, launcher, stage)
    return results


@pytest.mark.parametrize("name", list(LAUNCHES))
def test_student_and_teacher_are_held_as_the_zero_stage_says(runs, name):
    stage = runs[name]["stage"]
    for rank, report in enumerate(runs[name]["reports"]):
        assert (report["rank"], report["world_size"]) == (rank, WORLD_SIZE)
        assert report["distributed_type"] == "DistributedType.DEEPSPEED"
        student, teacher = report["student"], report["teacher"]
        assert not teacher["requires_grad"] and teacher["optimizer_state_numel"] == 0
        # The student's fp32 master weights are split over the ranks under ZeRO-2 and -3.
        assert student["optimizer_state_numel"] * WORLD_SIZE == pytest.approx(
            student["full_numel"], rel=0.02
        )
        if stage == 3:
            for model in (student, teacher):
                assert model["stage"] == 3
                assert model["num_zero3_params"] == model["num_params"]
                assert model["visible_numel"] == 0
                assert model["local_shard_numel"] * WORLD_SIZE == pytest.approx(
                    model["full_numel"], rel=0.02
                )
        else:
            assert student["stage"] == stage and teacher["stage"] == 0
            assert teacher["visible_numel"] == teacher["full_numel"]  # replicated


@pytest.mark.parametrize("name", list(LAUNCHES))
def test_trajectory_and_weights_match_one_process_with_the_same_global_batch(runs, name):
    reference = runs["reference"]["reports"][0]["history"]
    assert [entry["step"] for entry in reference] == [1, 2, 3, 4]
    for report in runs[name]["reports"]:  # every rank logs the same, all-reduced values
        history = report["history"]
        assert [entry["step"] for entry in history] == [1, 2, 3, 4]
        for key in reference[0]:
            if key == "step":
                continue
            torch.testing.assert_close(
                torch.tensor([entry[key] for entry in history], dtype=torch.float64),
                torch.tensor([entry[key] for entry in reference], dtype=torch.float64),
                rtol=RTOL,
                atol=1e-7,
                msg=lambda message, key=key: f"{key} differs: {message}",
            )
    expected, actual = runs["reference"]["weights"], runs[name]["weights"]
    assert actual.keys() == expected.keys()
    for key, weight in expected.items():
        torch.testing.assert_close(actual[key], weight, rtol=1e-4, atol=1e-6, msg=key)
