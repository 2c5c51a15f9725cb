"""Setting on-policy sampling up for a training run: the schedule, the samplers, the batches."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from abkd_trainer.lm.generation import TransformersCompletionSampler, build_generation_config
from abkd_trainer.lm.on_policy.completions import OnPolicyBatches
from abkd_trainer.lm.on_policy.prompts import check_dataset_has_prompts
from abkd_trainer.lm.on_policy.schedule import OnPolicySchedule

if TYPE_CHECKING:
    import torch.nn as nn
    from accelerate import Accelerator
    from datasets import Dataset, IterableDataset
    from transformers import GenerationConfig, PreTrainedTokenizerBase

    from abkd_trainer.lm.config import ABKDConfig


def on_policy_settings(args: ABKDConfig) -> dict[str, Any]:
    """The on-policy fields of `args` for the model card; empty when training is off-policy."""
    if not args.uses_sampled_completions:
        return {}
    names = ["lmbda", "seq_kd", "on_policy_schedule"]
    if args.on_policy_schedule == "adaptive":
        names += ["adaptive_step", "adaptive_loss_eps", "replay_buffer_size"]
    names += ["max_new_tokens", "generation_temperature", "generation_top_p", "generation_top_k"]
    return {name: getattr(args, name) for name in names}


def build_on_policy_schedule(
    args: ABKDConfig,
    train_dataset: Dataset | IterableDataset | None,
    eval_dataset: Any,
) -> OnPolicySchedule:
    """The `OnPolicySchedule` callback of a run, once its training data has prompts.

    Args:
        args: the run's configuration (`lmbda`, `seq_kd`, `on_policy_schedule`, ...).
        train_dataset: the prepared training data (None: not checked).
        eval_dataset: the evaluation data; a dict of them names the evaluation whose loss the
            adaptive schedule follows (the first: Trainer logs `eval_<name>_loss` per dataset).

    Raises:
        ValueError: the training data has no prompt to sample from.
    """
    if train_dataset is not None:
        check_dataset_has_prompts(train_dataset, args)
    eval_loss_key = "eval_loss"
    if isinstance(eval_dataset, dict):  # Trainer logs eval_<name>_loss per dataset
        eval_loss_key = f"eval_{next(iter(eval_dataset))}_loss"
    return OnPolicySchedule(
        schedule=args.on_policy_schedule,
        lmbda=args.lmbda,
        seq_kd=args.seq_kd,
        adaptive_step=args.adaptive_step,
        adaptive_loss_eps=args.adaptive_loss_eps,
        seed=args.seed,
        eval_loss_key=eval_loss_key,
    )


def build_on_policy_batches(
    args: ABKDConfig,
    *,
    schedule: Callable[[], OnPolicySchedule],
    tokenizer: PreTrainedTokenizerBase,
    data_collator: Any,
    student: nn.Module,
    teacher: nn.Module | None,
    current_student: Callable[[], nn.Module],
    accelerator: Accelerator,
) -> OnPolicyBatches:
    """The `OnPolicyBatches` of a run, with `transformers` samplers for its models.

    Args:
        args: the run's configuration (generation settings, `seq_kd`, `replay_buffer_size`).
        schedule: returns the run's live `OnPolicySchedule` (the Trainer may replace
            callback instances when it restores them from a checkpoint).
        tokenizer: the run's tokenizer (padding and end-of-sequence ids).
        data_collator: the run's collator; its `pad_token_id` pads the sampled batches.
        student: the student (its generation config's end-of-sequence ids end samples too).
        teacher: the prepared teacher, or None (teacher cache); it samples with `seq_kd`.
        current_student: returns the student as training runs it (the Trainer wraps it when
            training starts), for sampling.
        accelerator: the run's accelerator.
    """
    pad_token_id = getattr(data_collator, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = (
            tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else (tokenizer.eos_token_id)
        )
    generation_config = _generation_config(args, tokenizer, student, pad_token_id)
    # Both models read every sampled sequence: neither may be asked past its positions.
    limits = _position_limits([student, teacher], accelerator)

    def sampler(get_model: Callable[[], Any]) -> TransformersCompletionSampler:
        return TransformersCompletionSampler(
            get_model,
            accelerator,
            generation_config,
            gather_deepspeed3_params=args.ds3_gather_for_generation,
            max_total_length=min(limits) if limits else None,
        )

    return OnPolicyBatches(
        schedule=schedule,
        student_sampler=sampler(current_student),
        teacher_sampler=sampler(lambda: teacher) if args.seq_kd else None,
        pad_token_id=pad_token_id,
        replay_buffer_size=args.replay_buffer_size,
        accelerator=accelerator,
    )


def _generation_config(
    args: ABKDConfig, tokenizer: PreTrainedTokenizerBase, student: nn.Module, pad_token_id: int
) -> GenerationConfig:
    """Sampling settings of `args`; samples end at the tokenizer's or the student's EOS ids."""
    eos_token_ids = {tokenizer.eos_token_id} - {None}
    generation_defaults = getattr(student, "generation_config", None)
    model_eos = getattr(generation_defaults, "eos_token_id", None)
    eos_token_ids |= set([model_eos] if isinstance(model_eos, int) else model_eos or [])
    return build_generation_config(
        max_new_tokens=args.max_new_tokens,
        temperature=args.generation_temperature,
        top_p=args.generation_top_p,
        top_k=args.generation_top_k,
        eos_token_id=sorted(eos_token_ids) or None,
        pad_token_id=pad_token_id,
        generation_kwargs=args.generation_kwargs,
    )


def _position_limits(models: list[nn.Module | None], accelerator: Accelerator) -> list[int]:
    """The position limits (tokens) of the given models that have one."""
    from abkd_trainer.lm.compatibility import position_limit
    from abkd_trainer.lm.models import causal_lm

    limits = [
        position_limit(causal_lm(accelerator.unwrap_model(model)))
        for model in models
        if model is not None
    ]
    return [limit for limit in limits if limit is not None]
