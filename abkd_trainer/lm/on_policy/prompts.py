"""Prompts of collated training batches, and training batches of sampled completions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from abkd_trainer.lm.batches import IGNORE_INDEX

if TYPE_CHECKING:
    from datasets import Dataset, IterableDataset

    from abkd_trainer.lm.config import ABKDConfig


def prompt_lengths(labels: torch.Tensor) -> torch.Tensor:
    """`(batch,)`: where each row's final supervised span starts (its prompt length).

    Args:
        labels: `(batch, seq)` unshifted labels, `-100` where a token is not supervised.

    Rows with no supervised token get `seq` (the whole row is prompt).
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
    """A right-padded training batch of `prompt + completion` that supervises the completions.

    Returns `input_ids`, `attention_mask` and `labels` (completion tokens; `-100` on the
    prompt and the padding), all `(batch, longest)`, plus `position_ids` if asked for.
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
