"""What the loss reads from a collated SFT batch: next-token targets and token counts."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_targets(batch: dict[str, Any]) -> torch.Tensor:
    """`(batch, seq)`: the token each position predicts, `-100` where none is supervised.

    `labels` shifted left by one with `-100` appended (a collator's ready-made
    `shift_labels` are used as they are). Aligned with the logits, so these need no slicing.
    """
    if "shift_labels" in batch:
        return batch["shift_labels"]
    if "labels" not in batch:
        raise ValueError(
            "ABKDTrainer needs `labels` in every batch (-100 where a token is not supervised); "
            f"the batch has {sorted(batch)}. Use SFTTrainer's dataset preparation or a collator "
            "that builds labels."
        )
    return F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)


def input_token_count(batch: dict[str, Any]) -> torch.Tensor:
    """Input tokens of a batch, padding excluded, as SFTTrainer counts them for `num_tokens`.

    `attention_mask.sum()`, or the packed length of a padding-free batch (`position_ids` of
    shape `(1, N)` and no attention mask).
    """
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    if "position_ids" in batch:
        return torch.tensor(batch["position_ids"].shape[1], device=batch["position_ids"].device)
    return torch.tensor(batch["input_ids"].numel(), device=batch["input_ids"].device)
