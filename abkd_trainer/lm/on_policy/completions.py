"""Swapping the completions of an optimizer step's micro-batches for sampled ones."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from abkd_trainer.lm.generation import CompletionSampler
from abkd_trainer.lm.on_policy.prompts import build_completion_batch, extract_prompts
from abkd_trainer.lm.on_policy.replay import ReplayBuffer, load_replay_buffer, save_replay_buffer
from abkd_trainer.lm.on_policy.schedule import BatchSource, OnPolicySchedule

if TYPE_CHECKING:
    from accelerate import Accelerator

# Per-window sums behind the logged metrics, in this order.
_METRIC_SUMS = (
    "sequences",
    "student_sequences",
    "teacher_sequences",
    "replayed_sequences",
    "sampled_sequences",
    "sampled_tokens",
    "generation_seconds",
    "optimizer_steps",
)


class OnPolicyBatches:
    """Replaces the completions of an optimizer step's micro-batches by sampled ones.

    Args:
        schedule: returns the live `OnPolicySchedule` (the Trainer may replace callback
            instances when it restores them from a checkpoint, so it is looked up, not held).
        student_sampler: samples from the current student.
        teacher_sampler: samples from the teacher; needed with `seq_kd`.
        pad_token_id: padding of the built batches.
        replay_buffer_size: capacity of the adaptive schedule's replay buffer.
        accelerator: reduces the logged sums over processes.
    """

    def __init__(
        self,
        schedule: Callable[[], OnPolicySchedule],
        student_sampler: CompletionSampler,
        teacher_sampler: CompletionSampler | None,
        pad_token_id: int,
        replay_buffer_size: int,
        accelerator: Accelerator,
    ) -> None:
        self.schedule = schedule
        self.samplers = {BatchSource.STUDENT: student_sampler, BatchSource.TEACHER: teacher_sampler}
        self.pad_token_id = pad_token_id
        self.replay_buffer = ReplayBuffer(replay_buffer_size)
        self.accelerator = accelerator
        self._sums = torch.zeros(len(_METRIC_SUMS), dtype=torch.float64)

    def save_state(self, checkpoint_dir: str) -> None:
        """Write the state a resumed run needs into `checkpoint_dir`, on every process.

        That is the replay buffer (adaptive schedule); the schedule's own state travels in
        `trainer_state.json`, and sampling keeps no state (its seeds are functions of the run's
        seed and the step). Call it on every process before Trainer's checkpoint files: it ends
        once every process has written its file.
        """
        if not self.schedule().is_adaptive:
            return
        save_replay_buffer(self.replay_buffer, checkpoint_dir, self.accelerator.process_index)
        # trainer_state.json (rank 0) marks the checkpoint complete: only after every buffer.
        self.accelerator.wait_for_everyone()

    def load_state(self, checkpoint_dir: str) -> None:
        """Restore what `save_state` wrote into `checkpoint_dir` (a warning if it is missing)."""
        if self.schedule().is_adaptive:
            load_replay_buffer(self.replay_buffer, checkpoint_dir, self.accelerator.process_index)

    def replace_completions(
        self, batches: list[dict[str, Any]], step: int, max_steps: int
    ) -> list[dict[str, Any]]:
        """The micro-batches of optimizer step `step`, each from its drawn source.

        Generation is batched: one call per sampling model covers every micro-batch of the step
        that draws it (the student's weights do not change within an optimizer step).
        """
        schedule = self.schedule()
        sources = self._draw_sources(schedule, batches, step, max_steps)
        prompts = [
            extract_prompts(batch) if source is not BatchSource.DATASET else None
            for batch, source in zip(batches, sources, strict=True)
        ]
        completions = self._generate(sources, prompts, schedule.seed, step)

        output = []
        for index, (batch, source) in enumerate(zip(batches, sources, strict=True)):
            if source is BatchSource.DATASET:
                output.append(batch)
                continue
            batch_prompts = prompts[index]
            if source is BatchSource.REPLAY:
                rng = random.Random(
                    f"abkd-replay/{schedule.seed}/{step}/{index}/{self.accelerator.process_index}"
                )
                batch_prompts, batch_completions = self.replay_buffer.sample(
                    len(batch_prompts), rng
                )
                device = batch["input_ids"].device
                batch_prompts = [prompt.to(device) for prompt in batch_prompts]
            else:
                batch_completions = completions[index]
                if source is BatchSource.STUDENT and schedule.is_adaptive:
                    self.replay_buffer.add(batch_prompts, batch_completions)
            output.append(
                build_completion_batch(
                    batch_prompts,
                    batch_completions,
                    self.pad_token_id,
                    with_position_ids="position_ids" in batch,
                )
            )
            self._count(source, batch_completions)
        self._sums[_METRIC_SUMS.index("sequences")] += sum(len(b["input_ids"]) for b in batches)
        self._sums[_METRIC_SUMS.index("optimizer_steps")] += 1
        return output

    def _draw_sources(
        self,
        schedule: OnPolicySchedule,
        batches: list[dict[str, Any]],
        step: int,
        max_steps: int,
    ) -> list[BatchSource]:
        # The buffer fills as the step's student batches are added, in micro-batch order. Every
        # process holds its own buffer of its own samples; with equal micro-batch sizes on all
        # processes (accelerate's `even_batches`, the default) they fill alike, so all processes
        # draw the same sources.
        buffered = len(self.replay_buffer)
        sources = []
        for index, batch in enumerate(batches):
            full = buffered >= self.replay_buffer.capacity
            source = schedule.choose(step, index, max_steps, replay_buffer_full=full)
            if source is BatchSource.STUDENT and schedule.is_adaptive:
                buffered += len(batch["input_ids"])
            sources.append(source)
        return sources

    def _generate(
        self,
        sources: list[BatchSource],
        prompts: list[list[torch.Tensor] | None],
        seed: int,
        step: int,
    ) -> list[list[torch.Tensor] | None]:
        """One batched `sample` call per sampling model; completions per micro-batch.

        Each call samples under a seed derived from `(seed, step, model, process)` in a forked
        RNG: the samples do not depend on what else consumed random numbers before (a resumed run
        restores the Trainer's RNG only after fetching its first batches), and sampling leaves the
        training RNG stream (dropout, data order) untouched.
        """
        completions: list[list[torch.Tensor] | None] = [None] * len(sources)
        for source in (BatchSource.STUDENT, BatchSource.TEACHER):
            indices = [i for i, s in enumerate(sources) if s is source]
            if not indices:
                continue
            sampler = self.samplers[source]
            if sampler is None:
                raise RuntimeError(f"No completion sampler for {source.value} batches.")
            flat = [prompt for i in indices for prompt in prompts[i]]
            start = time.perf_counter()
            rank = self.accelerator.process_index
            with _seeded_rng(f"abkd-generate/{seed}/{step}/{source.value}/{rank}", flat[0].device):
                sampled = sampler.sample(flat)
            self._sums[_METRIC_SUMS.index("generation_seconds")] += time.perf_counter() - start
            offset = 0
            for i in indices:
                completions[i] = sampled[offset : offset + len(prompts[i])]
                offset += len(prompts[i])
        return completions

    def _count(self, source: BatchSource, completions: Sequence[torch.Tensor]) -> None:
        key = {
            BatchSource.STUDENT: "student_sequences",
            BatchSource.TEACHER: "teacher_sequences",
            BatchSource.REPLAY: "replayed_sequences",
        }[source]
        self._sums[_METRIC_SUMS.index(key)] += len(completions)
        if source is not BatchSource.REPLAY:
            self._sums[_METRIC_SUMS.index("sampled_sequences")] += len(completions)
            self._sums[_METRIC_SUMS.index("sampled_tokens")] += sum(len(c) for c in completions)

    def pop_metrics(self) -> dict[str, float]:
        """Metrics of the window since the last call, over all processes; then reset.

        Call it on every process at the same points (it reduces across processes).
        `on_policy_fraction` (fresh student samples / sequences), `completion_length` (mean
        tokens of freshly sampled completions), `generation_time` (seconds per optimizer step
        spent sampling, mean over processes); with `seq_kd` `teacher_sampled_fraction`; with
        the adaptive schedule `replay_fraction`, `on_policy_probability` and
        `replay_buffer_size` (sequences, this process).
        """
        sums = self.accelerator.reduce(
            self._sums.to(self.accelerator.device), reduction="sum"
        ).tolist()
        self._sums.zero_()
        totals = dict(zip(_METRIC_SUMS, sums, strict=True))
        if totals["sequences"] == 0:
            return {}
        schedule = self.schedule()
        metrics = {"on_policy_fraction": totals["student_sequences"] / totals["sequences"]}
        if totals["sampled_sequences"] > 0:
            metrics["completion_length"] = totals["sampled_tokens"] / totals["sampled_sequences"]
        # Both sums run over processes: the ratio is the per-process mean.
        metrics["generation_time"] = totals["generation_seconds"] / totals["optimizer_steps"]
        if schedule.seq_kd:
            metrics["teacher_sampled_fraction"] = totals["teacher_sequences"] / totals["sequences"]
        if schedule.is_adaptive:
            metrics["replay_fraction"] = totals["replayed_sequences"] / totals["sequences"]
            metrics["on_policy_probability"] = schedule.probability
            metrics["replay_buffer_size"] = float(len(self.replay_buffer))
        return metrics


@contextlib.contextmanager
def _seeded_rng(key: str, device: torch.device) -> Iterator[None]:
    """Run the body under torch's RNG seeded from `key`, then restore the previous state."""
    devices = [device] if device.type not in ("cpu", "meta") else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else None):
        torch.manual_seed(random.Random(key).getrandbits(63))
        yield
