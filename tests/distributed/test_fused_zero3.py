"""``use_fused_loss=True`` on two CPU ranks under ZeRO-3 trains exactly like the materialised loss.

Two runs of ``run_fused_zero3.py`` on the same global batch (4 sequences per optimizer step):
one plain process building both models' logits (the reference), and two ``torchrun`` ranks under
ZeRO-3 with every parameter partitioned, untied LM heads included, computing the loss from hidden
states and the heads gathered just for the projection. The student's head is the case that can go
wrong: its own forward never runs, so only the gather and autograd bring its gradient back to the
partitioned parameter. Equal loss and gradient-norm trajectories over several steps show it does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from test_deepspeed_launchers import BIN, RTOL, WORLD_SIZE, Launches, _free_port, _launch

pytestmark = pytest.mark.slow

RUNNER = Path(__file__).with_name("run_fused_zero3.py")
MAX_STEPS = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from testing_utils import build_tiny_causal_lm, build_tiny_tokenizer

    root = tmp_path_factory.mktemp("fused_zero3")
    tokenizer = build_tiny_tokenizer()
    models = {}
    # Llama unties its LM head from the input embeddings (Qwen2's tiny test models tie them).
    for role, hidden_size, seed in (("student", 32, 1), ("teacher", 48, 2)):
        model = build_tiny_causal_lm(
            "llama", tokenizer, hidden_size=hidden_size, num_layers=2, seed=seed
        )
        models[role] = root / role
        model.save_pretrained(models[role])
        tokenizer.save_pretrained(models[role])
    zero3_config = Launches(root / "launches").deepspeed_config(3)

    def launch(name: str, fused: bool, sharded: bool) -> list[dict]:
        report_dir = root / name / "reports"
        script = [
            str(RUNNER),
            f"--student={models['student']}",
            f"--teacher={models['teacher']}",
            f"--output_dir={root / name / 'output'}",
            f"--report_dir={report_dir}",
            f"--use_fused_loss={'true' if fused else 'false'}",
            f"--max_steps={MAX_STEPS}",
        ]
        if sharded:
            command = [str(BIN / "torchrun"), f"--nproc_per_node={WORLD_SIZE}",
                       f"--master_port={_free_port()}", *script,
                       f"--deepspeed={zero3_config}"]  # fmt: skip
        else:
            command = [sys.executable, *script, f"--per_device_train_batch_size={WORLD_SIZE}"]
        _launch([command], root / f"{name}.log")
        num_ranks = WORLD_SIZE if sharded else 1
        return [json.loads((report_dir / f"rank{r}.json").read_text()) for r in range(num_ranks)]

    return {
        "reference": launch("materialised-single", fused=False, sharded=False),
        "fused_zero3": launch("fused-zero3", fused=True, sharded=True),
    }


def test_lm_heads_are_partitioned_and_untied(runs):
    for rank, report in enumerate(runs["fused_zero3"]):
        assert report["rank"] == rank and report["world_size"] == WORLD_SIZE
        assert report["use_fused_loss"] is True
        assert report["student"]["stage"] == 3
        head = report["lm_head"]
        assert not head["tied_to_input_embeddings"]
        assert head["visible_numel"] == 0  # partitioned outside the loss
        assert head["local_shard_numel"] * WORLD_SIZE == pytest.approx(head["full_numel"], rel=0.01)
    assert runs["reference"][0]["use_fused_loss"] is False


def test_fused_zero3_trajectory_equals_the_materialised_single_process(runs):
    expected = runs["reference"][0]["history"]
    assert len(expected) == MAX_STEPS
    for report in runs["fused_zero3"]:
        actual = report["history"]
        assert [entry["step"] for entry in actual] == [entry["step"] for entry in expected]
        for key in ("loss", "grad_norm", "kd_loss", "ce_loss"):
            torch.testing.assert_close(
                torch.tensor([entry[key] for entry in actual], dtype=torch.float64),
                torch.tensor([entry[key] for entry in expected], dtype=torch.float64),
                rtol=RTOL,
                atol=0.0,
                msg=lambda message, key=key: f"{key} trajectory differs: {message}",
            )
    # The run really moved the student (a gradient-free head would still train the rest).
    assert expected[0]["loss"] != expected[-1]["loss"]
