"""Sampling completions for on-policy distillation, behind one small interface.

A `CompletionSampler` turns prompts (token ids) into completions (token ids). The trainer
only ever calls `sample`; `TransformersCompletionSampler` implements it with
`transformers`' `generate` on the (unwrapped) training model, and an inference engine (e.g.
vLLM through TRL's `VLLMGeneration`) can implement the same method later without touching the
trainer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
import torch.nn as nn
from transformers import GenerationConfig
from trl.models.utils import unwrap_model_for_generation

if TYPE_CHECKING:
    from accelerate import Accelerator


@runtime_checkable
class CompletionSampler(Protocol):
    """Samples one completion per prompt from some model."""

    def sample(self, prompts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Complete each prompt.

        Args:
            prompts: 1-D `LongTensor` prompt token ids, one per sequence, without padding.

        Returns:
            One 1-D `LongTensor` of completion token ids per prompt, on the prompts' device:
            the sampled tokens up to and including the first end-of-sequence token, or
            `max_new_tokens` tokens when none was sampled. Never padding, never empty.
        """
        ...


def build_generation_config(
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    eos_token_id: int | list[int] | None,
    pad_token_id: int,
    generation_kwargs: dict[str, Any] | None = None,
) -> GenerationConfig:
    """The `GenerationConfig` of on-policy sampling: plain sampling, KV cache, one sequence.

    `generation_kwargs` (any `GenerationConfig` field) override the named arguments.
    """
    config = {
        "do_sample": True,
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "use_cache": True,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "bos_token_id": None,
        **(generation_kwargs or {}),
    }
    return GenerationConfig(**config)


def _eos_token_ids(generation_config: GenerationConfig) -> list[int]:
    eos = generation_config.eos_token_id
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(token) for token in eos]


def trim_completions(
    generated: torch.Tensor, eos_token_ids: Sequence[int], max_new_tokens: int | None = None
) -> list[torch.Tensor]:
    """Cut generated rows after their first end-of-sequence token.

    Args:
        generated: `(batch, new_tokens)` token ids `generate` appended to the prompts; after a
            row's first EOS, `generate` fills it with padding (which may be the EOS id itself).
        eos_token_ids: the ids that end a sequence.
        max_new_tokens: optional cap on the kept length.

    Returns:
        One 1-D tensor per row: the tokens up to and including the first EOS (the EOS is a sampled
        token the student is trained on), or the whole row when it has none.
    """
    if max_new_tokens is not None:
        generated = generated[:, :max_new_tokens]
    length = generated.size(1)
    if eos_token_ids:
        is_eos = torch.isin(generated, torch.tensor(eos_token_ids, device=generated.device))
        # argmax of a boolean row is the first True; rows without one keep every token.
        first_eos = is_eos.int().argmax(dim=1)
        lengths = torch.where(is_eos.any(dim=1), first_eos + 1, length)
    else:
        lengths = torch.full((generated.size(0),), length, device=generated.device)
    return [row[:n] for row, n in zip(generated, lengths.tolist(), strict=True)]


def left_pad(sequences: Sequence[torch.Tensor], pad_token_id: int) -> dict[str, torch.Tensor]:
    """`input_ids` / `attention_mask` of shape `(batch, longest)`, padded on the left."""
    longest = max(len(sequence) for sequence in sequences)
    device = sequences[0].device
    input_ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long, device=device)
    for row, sequence in enumerate(sequences):
        if len(sequence):
            input_ids[row, -len(sequence) :] = sequence
            attention_mask[row, -len(sequence) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


class TransformersCompletionSampler:
    """`CompletionSampler` with `transformers`' `generate` on a training-time model.

    All prompts of a call go through one batched, left-padded `generate` with the KV cache, in
    eval mode and without gradients; the model's train/eval mode is restored afterwards.
    TRL's `unwrap_model_for_generation` unwraps DDP / DeepSpeed engines and, under ZeRO-3,
    gathers the partitioned weights for the duration of the call (`gather_deepspeed3_params`;
    without it every layer is fetched as the forward reaches it, and `generate` keeps the ranks
    in step with `synced_gpus`).

    Args:
        get_model: returns the (possibly wrapped) model to sample from. A callable, because the
            Trainer wraps the student only when training starts.
        accelerator: the trainer's `Accelerator`.
        generation_config: see `build_generation_config`.
        gather_deepspeed3_params: see above.
        max_total_length: the longest sequence (prompt + completion, in tokens) the models may
            see, e.g. the smaller of both models' position limits; a call whose longest prompt
            leaves less room than `max_new_tokens` samples shorter completions. None: no cap.
    """

    def __init__(
        self,
        get_model: Callable[[], nn.Module],
        accelerator: Accelerator,
        generation_config: GenerationConfig,
        gather_deepspeed3_params: bool = True,
        max_total_length: int | None = None,
    ) -> None:
        if generation_config.pad_token_id is None:
            raise ValueError("On-policy sampling needs a pad token id in the generation config.")
        self.get_model = get_model
        self.accelerator = accelerator
        self.generation_config = generation_config
        self.gather_deepspeed3_params = gather_deepspeed3_params
        self.max_total_length = max_total_length
        self.eos_token_ids = _eos_token_ids(generation_config)

    def _max_new_tokens(self, prompt_length: int) -> int:
        """`max_new_tokens`, cut so that a prompt of `prompt_length` tokens and its completion
        stay within `max_total_length` (learned position tables end there)."""
        max_new_tokens = self.generation_config.max_new_tokens
        if self.max_total_length is None:
            return max_new_tokens
        room = self.max_total_length - prompt_length
        if room < 1:
            raise ValueError(
                f"A prompt of {prompt_length} tokens leaves no room for a completion within the "
                f"models' {self.max_total_length} positions; lower `max_length` so that prompts "
                "are shorter than the position limit."
            )
        return min(max_new_tokens, room)

    @torch.no_grad()
    def sample(self, prompts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if not prompts:
            return []
        model = self.get_model()
        inputs = left_pad(prompts, self.generation_config.pad_token_id)
        max_new_tokens = self._max_new_tokens(inputs["input_ids"].size(1))
        with unwrap_model_for_generation(
            model, self.accelerator, gather_deepspeed3_params=self.gather_deepspeed3_params
        ) as unwrapped:
            was_training = unwrapped.training
            unwrapped.eval()
            try:
                sequences = unwrapped.generate(
                    **inputs,
                    generation_config=self.generation_config,
                    max_new_tokens=max_new_tokens,
                )
            finally:
                unwrapped.train(was_training)
        generated = sequences[:, inputs["input_ids"].size(1) :]
        return trim_completions(generated, self.eos_token_ids, max_new_tokens)
