"""Teacher-forcing inputs: prompt + reference rows, and where they predict the reference.

Both `abkd_trainer.lm.evaluation.teacher_divergence` and `abkd_trainer.tools.mass_allocation`
feed the student and the teacher the same rows and compare their next-token distributions where
the reference response is predicted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# A prompt: plain text, or a conversation (a list of `{"role": ..., "content": ...}` messages).
Prompt = str | list[dict[str, Any]]


def encode_prompt_completion(
    tokenizer: PreTrainedTokenizerBase, prompt: Prompt, completion: str
) -> tuple[list[int], int]:
    """Token ids of `prompt` + `completion` and where the completion starts in them.

    Text prompts get the tokenizer's EOS appended, as SFTTrainer adds it; conversational prompts
    (lists of messages) are rendered with the chat template, the completion as the assistant turn.

    Returns:
        `(ids, start)`: the ids of the whole sequence, and the index of its first completion
        token (where the prompt-only and the full tokenization first differ).
    """
    if isinstance(prompt, str):
        prompt_ids = tokenizer(prompt)["input_ids"]
        full_ids = tokenizer(prompt + completion + (tokenizer.eos_token or ""))["input_ids"]
    else:
        prompt_ids = tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True
        )
        messages = [*prompt, {"role": "assistant", "content": completion}]
        full_ids = tokenizer.apply_chat_template(messages, tokenize=True)
        prompt_ids = prompt_ids["input_ids"] if isinstance(prompt_ids, Mapping) else prompt_ids
        full_ids = full_ids["input_ids"] if isinstance(full_ids, Mapping) else full_ids
    # The completion starts where the two tokenizations diverge (as in TRL's SFTTrainer).
    start = 0
    for token, other in zip(prompt_ids, full_ids, strict=False):
        if token != other:
            break
        start += 1
    return list(full_ids), start


def teacher_forcing_batch(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    references: Sequence[str],
    pad_token_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt + reference rows, right-padded with `pad_token_id`, for teacher forcing.

    Args:
        tokenizer: the tokenizer both models read.
        prompts: plain-text prompts or chat messages (see `encode_prompt_completion`).
        references: one reference response per prompt.
        pad_token_id: the id written after each row's last token (masked out).

    Returns:
        `(input_ids, attention_mask, response_mask)`, each `(batch, longest)`, on the CPU;
        `response_mask[b, t]` marks the logits at position `t` that predict a response token
        (`t + 1`, EOS included).
    """
    encoded = [
        encode_prompt_completion(tokenizer, prompt, reference)
        for prompt, reference in zip(prompts, references, strict=True)
    ]
    length = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
    response_mask = torch.zeros((len(encoded), length), dtype=torch.bool)
    for row, (ids, completion_start) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        response_mask[row, max(completion_start - 1, 0) : len(ids) - 1] = True
    return input_ids, attention_mask, response_mask


__all__ = ["encode_prompt_completion", "teacher_forcing_batch"]
