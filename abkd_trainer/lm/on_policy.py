"""On-policy distillation: which micro-batches train on sampled completions, and building them.

Each training micro-batch comes from one of four sources (:class:`BatchSource`): the dataset's
completions (off-policy), completions the current student samples for the batch's prompts
(on-policy, GKD's ``lmbda``), completions the teacher samples (sequence-level KD, ``seq_kd``), or
student samples replayed from a buffer (the adaptive schedule). :class:`OnPolicySchedule` draws
the source; :class:`OnPolicyBatches` swaps the completions of the micro-batches of one optimizer
step before the trainer counts their supervised tokens, so that the loss normalisation (the
supervised-token count of the whole accumulated, all-rank batch) counts the sampled tokens.

A sampled micro-batch has the layout SFTTrainer's collator produces: ``input_ids`` = prompt +
completion, right-padded; ``labels`` = the completion tokens and ``-100`` on the prompt and the
padding. The trainer's loss then supervises exactly the sampled tokens (the end-of-sequence token
included when it was sampled), and the teacher scores the same token sequences.

The prompt of a training example is read off its collated row: the tokens before its final
supervised span. For ``prompt``/``completion`` data (completion-only loss) that is the prompt, for
conversational data with ``assistant_only_loss=True`` every turn before the final assistant turn,
rendered with the chat template and its generation prompt (how SFTTrainer tokenises it).
"""

from __future__ import annotations

import contextlib
import enum
import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from abkd_trainer.lm.batches import IGNORE_INDEX
from abkd_trainer.lm.generation import CompletionSampler

if TYPE_CHECKING:
    from accelerate import Accelerator
    from datasets import Dataset, IterableDataset
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from abkd_trainer.lm.config import ABKDConfig


class BatchSource(str, enum.Enum):
    """Where a micro-batch's completions come from."""

    DATASET = "dataset"
    STUDENT = "student"
    TEACHER = "teacher"
    REPLAY = "replay"


# ------------------------------------------------------------------ prompts and sampled batches


def prompt_lengths(labels: torch.Tensor) -> torch.Tensor:
    """``(batch,)``: where each row's final supervised span starts (its prompt length).

    Args:
        labels: ``(batch, seq)`` unshifted labels, ``-100`` where a token is not supervised.

    Rows with no supervised token get ``seq`` (the whole row is prompt).
    """
    supervised = labels != IGNORE_INDEX
    previous = torch.nn.functional.pad(supervised[:, :-1], (1, 0), value=False)
    span_start = supervised & ~previous
    positions = torch.arange(labels.size(1), device=labels.device).expand_as(labels)
    last_start = torch.where(span_start, positions, -1).amax(dim=1)
    return torch.where(last_start >= 0, last_start, labels.size(1))


def extract_prompts(batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The prompt token ids of each row of a collated batch (see the module docstring).

    Raises:
        ValueError: a row has an empty prompt (every token of it is supervised).
    """
    lengths = prompt_lengths(batch["labels"]).tolist()
    attention_mask = batch.get("attention_mask")
    prompts = []
    for row, length in enumerate(lengths):
        tokens = batch["input_ids"][row, :length]
        if attention_mask is not None:
            tokens = tokens[attention_mask[row, :length].bool()]
        if len(tokens) == 0:
            raise ValueError(
                "On-policy distillation needs a prompt in every training example, but a batch row "
                "is supervised from its first token on. Use prompt/completion data (with "
                "completion_only_loss) or conversational data with assistant_only_loss=True."
            )
        prompts.append(tokens)
    return prompts


def build_completion_batch(
    prompts: Sequence[torch.Tensor],
    completions: Sequence[torch.Tensor],
    pad_token_id: int,
    with_position_ids: bool = False,
) -> dict[str, torch.Tensor]:
    """A right-padded training batch of ``prompt + completion`` that supervises the completions.

    Returns ``input_ids``, ``attention_mask`` and ``labels`` (completion tokens; ``-100`` on the
    prompt and the padding), all ``(batch, longest)``, plus ``position_ids`` if asked for.
    """
    device = prompts[0].device
    sequences = [
        torch.cat([prompt, completion.to(device)])
        for prompt, completion in zip(prompts, completions, strict=True)
    ]
    longest = max(len(sequence) for sequence in sequences)
    shape = (len(sequences), longest)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros(shape, dtype=torch.long, device=device)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long, device=device)
    for row, (prompt, sequence) in enumerate(zip(prompts, sequences, strict=True)):
        input_ids[row, : len(sequence)] = sequence
        attention_mask[row, : len(sequence)] = 1
        labels[row, len(prompt) : len(sequence)] = sequence[len(prompt) :]
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if with_position_ids:
        batch["position_ids"] = torch.arange(longest, device=device).expand(shape).clone()
    return batch


def check_dataset_has_prompts(dataset: Dataset | IterableDataset, args: ABKDConfig) -> None:
    """Raise at construction unless the prepared training data has a prompt to sample from.

    Inspects the first prepared example: its labels must start unsupervised (the prompt) and
    supervise something after it.
    """
    columns = set(getattr(dataset, "column_names", None) or [])
    first = next(iter(dataset))
    labels = first.get("labels")
    has_prompt = (
        labels is not None
        and len(labels) > 0
        and labels[0] == IGNORE_INDEX
        and any(label != IGNORE_INDEX for label in labels)
    )
    if has_prompt:
        return
    if "prompt" in columns:
        fix = (
            "this prompt/completion dataset supervises the prompt too: leave "
            "`completion_only_loss` at its default (None) or set it to True"
        )
    elif "messages" in columns:
        fix = (
            "this conversational dataset supervises every turn: set `assistant_only_loss=True` "
            "(with a chat template that marks assistant turns with {% generation %})"
        )
    else:
        fix = (
            f"a plain `{args.dataset_text_field}` dataset has no prompt to sample from: use a "
            "prompt/completion or a conversational dataset"
        )
    raise ValueError(
        "On-policy distillation (`lmbda > 0`, `seq_kd` or `on_policy_schedule='adaptive'`) "
        f"samples completions for the training prompts, but {fix}, or set `lmbda=0` and "
        "`seq_kd=False` to distil on the dataset's completions."
    )


# ------------------------------------------------------------------ replay buffer


class ReplayBuffer:
    """The latest ``capacity`` sampled ``(prompt, completion)`` pairs, on the CPU."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._pairs: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._pairs)

    @property
    def is_full(self) -> bool:
        return len(self._pairs) >= self.capacity

    def add(self, prompts: Sequence[torch.Tensor], completions: Sequence[torch.Tensor]) -> None:
        for prompt, completion in zip(prompts, completions, strict=True):
            self._pairs.append((prompt.detach().cpu(), completion.detach().cpu()))

    def sample(
        self, num_sequences: int, rng: random.Random
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``num_sequences`` distinct pairs drawn uniformly (``rng`` makes it reproducible)."""
        if num_sequences > len(self._pairs):
            raise ValueError(
                f"Cannot replay {num_sequences} sequences from a buffer of {len(self._pairs)}."
            )
        pairs = rng.sample(list(self._pairs), k=num_sequences)
        return [prompt for prompt, _ in pairs], [completion for _, completion in pairs]


# ------------------------------------------------------------------ schedule


class OnPolicySchedule(TrainerCallback, ExportableState):
    """Draws each micro-batch's :class:`BatchSource`; the adaptive variant follows evaluations.

    ``"constant"``: with ``u`` uniform in [0, 1), the student samples when ``u < lmbda``; otherwise
    the teacher does (``seq_kd``) or the dataset's completions are used (GKD).

    ``"adaptive"`` (DistiLLM, Ko et al. 2024, as in the ABKD authors' ``finetune.py``): the
    probability ``p`` starts at ``lmbda``. At step ``t`` of ``T``, with the "decreasing" replay
    ratio ``s = p (1 - t / T)``: ``u < s``, or ``u < p`` while the replay buffer is not yet full,
    samples from the student (into the buffer); otherwise ``u < p`` replays a micro-batch from
    the buffer; otherwise as the constant schedule's non-student case. After each evaluation,
    when the loss (``eval_loss``) is at least ``adaptive_loss_eps`` above the reference (the first
    evaluation's loss, then the loss at the latest rise), ``p`` rises by ``adaptive_step`` (capped
    at 1) and that loss becomes the reference. Evaluate once before training
    (``eval_on_start=True``) to take the reference there, as the authors do.

    ``u`` is a function of ``(seed, step, micro-batch index)`` alone, so every process draws the
    same sources (ZeRO-3 generation is collective), runs are reproducible, and a resumed run draws
    what the uninterrupted one would have. ``probability`` and ``reference_loss`` are saved in
    checkpoints (``TrainerState.stateful_callbacks``) and restored when training resumes.
    """

    def __init__(
        self,
        schedule: str = "constant",
        lmbda: float = 0.0,
        seq_kd: bool = False,
        adaptive_step: float = 0.1,
        adaptive_loss_eps: float = 0.1,
        seed: int = 0,
        eval_loss_key: str = "eval_loss",
    ) -> None:
        self.schedule = schedule
        self.lmbda = lmbda
        self.seq_kd = seq_kd
        self.adaptive_step = adaptive_step
        self.adaptive_loss_eps = adaptive_loss_eps
        self.seed = seed
        self.eval_loss_key = eval_loss_key
        self.probability = lmbda
        self.reference_loss: float | None = None

    @property
    def is_adaptive(self) -> bool:
        return self.schedule == "adaptive"

    def uniform(self, step: int, micro_batch: int) -> float:
        """The draw of micro-batch ``micro_batch`` of optimizer step ``step``, in [0, 1)."""
        # str seeds are hashed with SHA-512: stable across processes and Python runs.
        return random.Random(f"abkd-on-policy/{self.seed}/{step}/{micro_batch}").random()

    def choose(
        self, step: int, micro_batch: int, max_steps: int, replay_buffer_full: bool
    ) -> BatchSource:
        """The source of micro-batch ``micro_batch`` of step ``step`` of ``max_steps``."""
        u = self.uniform(step, micro_batch)
        fallback = BatchSource.TEACHER if self.seq_kd else BatchSource.DATASET
        if not self.is_adaptive:
            return BatchSource.STUDENT if u < self.probability else fallback
        progress = min(step / max_steps, 1.0) if max_steps > 0 else 0.0
        sample_threshold = self.probability * (1.0 - progress)
        if u < sample_threshold or (u < self.probability and not replay_buffer_full):
            return BatchSource.STUDENT
        if u < self.probability:
            return BatchSource.REPLAY
        return fallback

    def update(self, eval_loss: float) -> None:
        """Adaptive rule after an evaluation with loss ``eval_loss``."""
        if not self.is_adaptive or not math.isfinite(eval_loss):
            return
        if self.reference_loss is None:
            self.reference_loss = eval_loss
        elif eval_loss >= self.reference_loss + self.adaptive_loss_eps:
            # Rounded so that ten rises of 0.1 reach exactly 1.0 (no floating-point drift).
            self.probability = min(round(self.probability + self.adaptive_step, 12), 1.0)
            self.reference_loss = eval_loss

    # TrainerCallback / ExportableState

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if metrics and self.eval_loss_key in metrics:
            self.update(float(metrics[self.eval_loss_key]))

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # On resume, `state` was loaded from the checkpoint's trainer_state.json. The schedule is
        # part of the training state (like the learning-rate schedule), so it is restored even
        # when `restore_callback_states_from_checkpoint` is off; on a fresh run this reads back
        # the initial values.
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, dict):
            for name, value in saved.get("attributes", {}).items():
                setattr(self, name, value)

    def state(self) -> dict[str, Any]:
        return {
            "args": {
                "schedule": self.schedule,
                "lmbda": self.lmbda,
                "seq_kd": self.seq_kd,
                "adaptive_step": self.adaptive_step,
                "adaptive_loss_eps": self.adaptive_loss_eps,
                "seed": self.seed,
                "eval_loss_key": self.eval_loss_key,
            },
            "attributes": {
                "probability": self.probability,
                "reference_loss": self.reference_loss,
            },
        }


# ------------------------------------------------------------------ swapping completions

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
        schedule: returns the live :class:`OnPolicySchedule` (the Trainer may replace callback
            instances when it restores them from a checkpoint, so it is looked up, not held).
        student_sampler: samples from the current student.
        teacher_sampler: samples from the teacher; needed with ``seq_kd``.
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

    def replace_completions(
        self, batches: list[dict[str, Any]], step: int, max_steps: int
    ) -> list[dict[str, Any]]:
        """The micro-batches of optimizer step ``step``, each from its drawn source.

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
        """One batched ``sample`` call per sampling model; completions per micro-batch.

        Each call samples under a seed derived from ``(seed, step, model, process)`` in a forked
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
        ``on_policy_fraction`` (fresh student samples / sequences), ``completion_length`` (mean
        tokens of freshly sampled completions), ``generation_time`` (seconds per optimizer step
        spent sampling, mean over processes); with ``seq_kd`` ``teacher_sampled_fraction``; with
        the adaptive schedule ``replay_fraction``, ``on_policy_probability`` and
        ``replay_buffer_size`` (sequences, this process).
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
    """Run the body under torch's RNG seeded from ``key``, then restore the previous state."""
    devices = [device] if device.type not in ("cpu", "meta") else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else None):
        torch.manual_seed(random.Random(key).getrandbits(63))
        yield


def on_policy_settings(args: ABKDConfig) -> dict[str, Any]:
    """The on-policy fields of ``args`` for the model card; empty when training is off-policy."""
    if not args.uses_sampled_completions:
        return {}
    names = ["lmbda", "seq_kd", "on_policy_schedule"]
    if args.on_policy_schedule == "adaptive":
        names += ["adaptive_step", "adaptive_loss_eps", "replay_buffer_size"]
    names += ["max_new_tokens", "generation_temperature", "generation_top_p", "generation_top_k"]
    return {name: getattr(args, name) for name in names}


def on_policy_batches_for_trainer(trainer: Any) -> OnPolicyBatches:
    """Set on-policy sampling up for an ``ABKDTrainer`` (called at the end of its ``__init__``).

    Checks that the training data has prompts, registers the :class:`OnPolicySchedule` callback
    and builds ``transformers`` samplers for the student (``trainer.model_wrapped``, looked up at
    each call because the Trainer wraps it when training starts) and, with ``seq_kd``, the
    teacher.
    """
    from abkd_trainer.lm.compatibility import position_limit
    from abkd_trainer.lm.generation import TransformersCompletionSampler, build_generation_config
    from abkd_trainer.lm.models import causal_lm

    args = trainer.args
    if trainer.train_dataset is not None:
        check_dataset_has_prompts(trainer.train_dataset, args)
    eval_loss_key = "eval_loss"
    if isinstance(trainer.eval_dataset, dict):  # Trainer logs eval_<name>_loss per dataset
        eval_loss_key = f"eval_{next(iter(trainer.eval_dataset))}_loss"
    trainer.add_callback(
        OnPolicySchedule(
            schedule=args.on_policy_schedule,
            lmbda=args.lmbda,
            seq_kd=args.seq_kd,
            adaptive_step=args.adaptive_step,
            adaptive_loss_eps=args.adaptive_loss_eps,
            seed=args.seed,
            eval_loss_key=eval_loss_key,
        )
    )

    tokenizer = trainer._tokenizer
    pad_token_id = getattr(trainer.data_collator, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = (
            tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else (tokenizer.eos_token_id)
        )
    eos_token_ids = {tokenizer.eos_token_id} - {None}
    generation_defaults = getattr(trainer.model, "generation_config", None)
    model_eos = getattr(generation_defaults, "eos_token_id", None)
    eos_token_ids |= set([model_eos] if isinstance(model_eos, int) else model_eos or [])
    generation_config = build_generation_config(
        max_new_tokens=args.max_new_tokens,
        temperature=args.generation_temperature,
        top_p=args.generation_top_p,
        top_k=args.generation_top_k,
        eos_token_id=sorted(eos_token_ids) or None,
        pad_token_id=pad_token_id,
        generation_kwargs=args.generation_kwargs,
    )

    # Both models read every sampled sequence: neither may be asked past its positions.
    models = [trainer.model, trainer.teacher_model]
    limits = [
        position_limit(causal_lm(trainer.accelerator.unwrap_model(model)))
        for model in models
        if model is not None
    ]
    limits = [limit for limit in limits if limit is not None]

    def sampler(get_model: Callable[[], Any]) -> TransformersCompletionSampler:
        return TransformersCompletionSampler(
            get_model,
            trainer.accelerator,
            generation_config,
            gather_deepspeed3_params=args.ds3_gather_for_generation,
            max_total_length=min(limits) if limits else None,
        )

    def live_schedule() -> OnPolicySchedule:
        return next(
            callback
            for callback in trainer.callback_handler.callbacks
            if isinstance(callback, OnPolicySchedule)
        )

    return OnPolicyBatches(
        schedule=live_schedule,
        student_sampler=sampler(lambda: trainer.model_wrapped),
        teacher_sampler=sampler(lambda: trainer.teacher_model) if args.seq_kd else None,
        pad_token_id=pad_token_id,
        replay_buffer_size=args.replay_buffer_size,
        accelerator=trainer.accelerator,
    )
