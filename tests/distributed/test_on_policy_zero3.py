"""On-policy distillation (``lmbda=1``) and sequence-level KD (``seq_kd``) on two CPU ranks under
ZeRO-3, against plain DDP.

``run_zero_distillation.py --lmbda 1`` on prompt/completion data: every micro-batch's completions
are sampled by the student on each rank, then scored by the teacher. Three ``torchrun`` launches
with 2 ranks and the same global batch: plain DDP (the reference), ZeRO-3 with the student's
weights gathered for generation, and ZeRO-3 generating from the partitioned student (layers
fetched as the forward reaches them, ranks kept in step by ``synced_gpus``). Sampling is seeded
per (step, rank), so all three sample the same completions; equal loss and gradient-norm
trajectories then show that generation, the teacher's scoring of the sampled sequences and the
token normalisation across ranks behave the same with both models partitioned. With ``seq_kd``
the teacher samples instead, so generation runs on its partitioned inference engine.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_deepspeed_launchers import (
    MAX_STEPS,
    Launches,
    _assert_rank_holds_its_share,
    _assert_same_trajectory,
)

pytestmark = pytest.mark.slow

ON_POLICY_ARGS = ("--lmbda=1.0", "--max_new_tokens=6")


@pytest.fixture(scope="module")
def launches(tmp_path_factory) -> Launches:
    return Launches(tmp_path_factory.mktemp("on_policy_zero3"))


def _sampling_runs(launches: Launches, name: str, args: tuple[str, ...]) -> tuple[Any, ...]:
    """DDP (the reference), ZeRO-3 gathering the sampling model's weights for generation, and
    ZeRO-3 generating from them partitioned; returns the reference history and the two runs,
    after checking that both follow the reference step for step, completions included."""
    ddp = launches.run(f"ddp-{name}", "torchrun-ddp", None, extra_args=args)
    gathered = launches.run(f"zero3-{name}", "torchrun", 3, extra_args=args)
    partitioned = launches.run(
        f"zero3-{name}-no-gather",
        "torchrun",
        3,
        extra_args=(*args, "--ds3_gather_for_generation=false"),
    )
    reference = ddp.reports[0]["history"]
    assert [entry["step"] for entry in reference] == list(range(1, MAX_STEPS + 1))
    for entry in reference:
        assert 1.0 <= entry["completion_length"] <= 6.0
    for run in (gathered, partitioned):
        for report in run.reports:
            _assert_same_trajectory(report["history"], reference)
            assert [entry["completion_length"] for entry in report["history"]] == [
                entry["completion_length"] for entry in reference
            ]
    return reference, gathered, partitioned


def test_zero3_on_policy_run_partitions_both_models_and_matches_ddp(launches):
    reference, gathered, partitioned = _sampling_runs(launches, "on-policy", ON_POLICY_ARGS)
    for entry in reference:
        assert entry["on_policy_fraction"] == 1.0  # every sequence sampled by the student
    for run in (gathered, partitioned):
        for rank, report in enumerate(run.reports):
            _assert_rank_holds_its_share(report, rank, stage=3)


SEQ_KD_ARGS = ("--seq_kd", "--max_new_tokens=6")


def test_zero3_seq_kd_samples_from_the_partitioned_teacher_and_matches_ddp(launches):
    # seq_kd: every micro-batch's completions are sampled by the teacher, which under ZeRO-3 is
    # a partitioned inference engine (gathered for generation, or not).
    reference, gathered, partitioned = _sampling_runs(launches, "seq-kd", SEQ_KD_ARGS)
    for entry in reference:
        assert entry["teacher_sampled_fraction"] == 1.0
        assert entry["on_policy_fraction"] == 0.0
    for rank, report in enumerate(gathered.reports):
        _assert_rank_holds_its_share(report, rank, stage=3)
    for report in partitioned.reports:
        # Generating from the partitioned teacher puts its LM head into DeepSpeed's trace; the
        # loss's teacher forward (the decoder only) then prefetches the head's weight (tied to the
        # embedding), which is still gathered after the last step: one parameter, no more.
        student, teacher = report["student"], report["teacher"]
        assert student["num_not_available"] == student["num_params"]
        assert student["visible_numel"] == 0
        assert teacher["num_zero3_params"] == teacher["num_params"]
        assert teacher["num_not_available"] >= teacher["num_params"] - 1
