"""On-policy building blocks: prompts of collated rows, sampled batches, schedule, replay."""

from __future__ import annotations

import random

import pytest
import torch

from abkd_trainer.lm.on_policy import (
    BatchSource,
    OnPolicySchedule,
    ReplayBuffer,
    build_completion_batch,
    extract_prompts,
    load_replay_buffer,
    prompt_lengths,
    save_replay_buffer,
)

X = -100  # not supervised


def test_prompt_length_is_the_start_of_the_final_supervised_span():
    labels = torch.tensor(
        [
            [X, X, X, 4, 5, X],  # prompt/completion, right-padded
            [X, 2, X, X, 5, 6],  # two assistant turns: the prompt holds the first one
            [X, X, X, X, X, X],  # nothing supervised: all prompt
            [1, 2, 3, X, X, X],  # supervised from the start (plain text): empty prompt
        ]
    )
    assert prompt_lengths(labels).tolist() == [3, 4, 6, 0]


def test_extract_prompts_drops_padding_and_refuses_an_empty_prompt():
    batch = {
        "input_ids": torch.tensor([[11, 12, 13, 14, 0], [21, 22, 23, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]),
        "labels": torch.tensor([[X, X, 13, 14, X], [X, 22, 23, X, X]]),
    }
    assert [p.tolist() for p in extract_prompts(batch)] == [[11, 12], [21]]
    batch["labels"][1, 0] = 21
    with pytest.raises(ValueError, match="needs a prompt"):
        extract_prompts(batch)


def test_completion_batch_supervises_exactly_the_completions():
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4])]
    completions = [torch.tensor([5, 9]), torch.tensor([6, 7, 9])]
    batch = build_completion_batch(prompts, completions, pad_token_id=0, with_position_ids=True)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 5, 9], [4, 6, 7, 9, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["labels"].tolist() == [[X, X, X, 5, 9], [X, 6, 7, 9, X]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4]] * 2
    # The batch's prompts are recovered by the same rule the trainer applies to dataset batches.
    assert [p.tolist() for p in extract_prompts(batch)] == [[1, 2, 3], [4]]


def test_replay_buffer_keeps_the_latest_pairs_and_samples_reproducibly():
    buffer = ReplayBuffer(capacity=3)
    pairs = [(torch.tensor([i]), torch.tensor([10 + i])) for i in range(4)]
    buffer.add([p for p, _ in pairs], [c for _, c in pairs])
    assert len(buffer) == 3 and buffer.is_full
    prompts, completions = buffer.sample(3, random.Random(0))
    assert sorted(p.item() for p in prompts) == [1, 2, 3]  # the oldest pair was evicted
    assert all(c.item() == p.item() + 10 for p, c in zip(prompts, completions, strict=True))
    again, _ = buffer.sample(3, random.Random(0))
    assert [p.item() for p in again] == [p.item() for p in prompts]
    with pytest.raises(ValueError, match="buffer of 3"):
        buffer.sample(4, random.Random(0))


def test_replay_buffer_round_trips_through_a_checkpoint_file(tmp_path):
    buffer = ReplayBuffer(capacity=3)
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4]), torch.tensor([5, 6])]
    completions = [torch.tensor([7]), torch.tensor([8, 9, 10, 11]), torch.tensor([12, 13])]
    buffer.add(prompts, completions)
    path = save_replay_buffer(buffer, tmp_path / "checkpoint-4", process_index=1)
    assert path.name == "replay_buffer_1.safetensors"

    restored = ReplayBuffer(capacity=3)
    assert load_replay_buffer(restored, tmp_path / "checkpoint-4", process_index=1)
    assert len(restored) == 3 and restored.is_full
    # The same pairs in the same order: the same draws replay the same samples.
    for original, loaded in zip(
        buffer.sample(3, random.Random(5)), restored.sample(3, random.Random(5)), strict=True
    ):
        assert [t.tolist() for t in original] == [t.tolist() for t in loaded]
    # Eviction continues from the restored order: the oldest pair goes first.
    restored.add([torch.tensor([99])], [torch.tensor([98])])
    kept, _ = restored.sample(3, random.Random(0))
    assert sorted(p.tolist() for p in kept) == [[4], [5, 6], [99]]

    empty = ReplayBuffer(capacity=2)
    save_replay_buffer(empty, tmp_path / "empty", process_index=0)
    assert load_replay_buffer(restored, tmp_path / "empty", process_index=0)
    assert len(restored) == 0
    with pytest.warns(UserWarning, match="no replay buffer for process 0.*restarts empty"):
        assert not load_replay_buffer(restored, tmp_path / "nowhere", process_index=0)


def draw_counts(schedule, steps, max_steps, full=True):
    counts = dict.fromkeys(BatchSource, 0)
    for step in range(steps):
        for micro in range(4):
            counts[schedule.choose(step, micro, max_steps, replay_buffer_full=full)] += 1
    return counts


def test_constant_schedule_follows_lmbda_and_seq_kd():
    off = draw_counts(OnPolicySchedule("constant", lmbda=0.0), 50, 50)
    assert off[BatchSource.DATASET] == 200
    on = draw_counts(OnPolicySchedule("constant", lmbda=1.0), 50, 50)
    assert on[BatchSource.STUDENT] == 200
    half = draw_counts(OnPolicySchedule("constant", lmbda=0.5, seq_kd=True), 50, 50)
    assert set(half) == set(BatchSource) and half[BatchSource.DATASET] == 0
    assert half[BatchSource.REPLAY] == 0
    assert (
        70 < half[BatchSource.STUDENT] < 130
        and half[BatchSource.TEACHER] == 200 - half[BatchSource.STUDENT]
    )


def test_draws_depend_on_seed_step_and_micro_batch_only():
    a, b = OnPolicySchedule(lmbda=0.5, seed=1), OnPolicySchedule(lmbda=0.5, seed=1)
    assert [a.uniform(s, m) for s in range(5) for m in range(3)] == [
        b.uniform(s, m) for s in range(5) for m in range(3)
    ]
    assert a.uniform(0, 0) != OnPolicySchedule(lmbda=0.5, seed=2).uniform(0, 0)
    assert a.uniform(0, 0) != a.uniform(0, 1) != a.uniform(1, 0)


def test_adaptive_schedule_samples_until_the_buffer_is_full_then_replays_more_over_time():
    schedule = OnPolicySchedule("adaptive", lmbda=1.0)
    filling = draw_counts(schedule, 10, 10, full=False)
    assert filling[BatchSource.STUDENT] == 40  # u < p = 1 always, buffer not full
    # Buffer full: fresh samples with probability p (1 - t/T), replay otherwise (p = 1).
    early = draw_counts(schedule, 10, 1000, full=True)
    late = OnPolicySchedule("adaptive", lmbda=1.0)
    late_counts = dict.fromkeys(BatchSource, 0)
    for step in range(900, 910):
        for micro in range(4):
            late_counts[late.choose(step, micro, 1000, replay_buffer_full=True)] += 1
    assert early[BatchSource.STUDENT] > 30 and late_counts[BatchSource.REPLAY] > 30
    assert early[BatchSource.DATASET] == late_counts[BatchSource.DATASET] == 0
    zero = draw_counts(OnPolicySchedule("adaptive", lmbda=0.0), 10, 10, full=False)
    assert zero[BatchSource.DATASET] == 40  # the authors' start: off-policy until a rise


def test_adaptive_probability_rises_only_when_the_eval_loss_worsens_by_eps():
    schedule = OnPolicySchedule("adaptive", lmbda=0.0, adaptive_step=0.1, adaptive_loss_eps=0.1)
    schedule.update(2.0)  # first evaluation: the reference
    assert (schedule.probability, schedule.reference_loss) == (0.0, 2.0)
    schedule.update(1.5)  # better: nothing changes, the reference stays
    schedule.update(2.05)  # worse, but by less than eps
    assert (schedule.probability, schedule.reference_loss) == (0.0, 2.0)
    schedule.update(2.1)  # worse by eps
    assert schedule.probability == pytest.approx(0.1) and schedule.reference_loss == 2.1
    for loss in (2.3, 2.5, 2.7, 2.9, 3.1, 3.3, 3.5, 3.7, 3.9, 4.1, 4.3):
        schedule.update(loss)
    assert schedule.probability == 1.0  # capped
    schedule.update(float("nan"))
    assert schedule.probability == 1.0 and schedule.reference_loss == 4.3


def test_constant_schedule_ignores_evaluations():
    schedule = OnPolicySchedule("constant", lmbda=0.3)
    for loss in (1.0, 5.0, 9.0):
        schedule.update(loss)
    assert schedule.probability == 0.3


def test_schedule_state_round_trips():
    schedule = OnPolicySchedule("adaptive", lmbda=0.2, seed=4)
    schedule.update(1.0)
    schedule.update(1.5)
    restored = OnPolicySchedule.from_state(schedule.state())
    assert restored.state() == schedule.state()
    assert restored.probability == pytest.approx(0.3) and restored.reference_loss == 1.5
