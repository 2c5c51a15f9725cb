"""Checks, at trainer construction, that the configuration fits both models.

A mismatch found here costs a second; found at the first long batch it costs an `IndexError`
after the dataset was prepared and maybe a checkpoint written.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn as nn

__all__ = ["POSITION_LIMIT_ATTRIBUTES", "check_position_limits", "position_limit"]

# Config attributes that bound a model's sequence length: `max_position_embeddings` (Llama, Qwen2,
# Mistral, Gemma, ...), `n_positions` (GPT-2, GPT-Neo's predecessors, BLOOM-style configs).
POSITION_LIMIT_ATTRIBUTES = ("max_position_embeddings", "n_positions")


def position_limit(model: nn.Module) -> int | None:
    """The longest sequence `model` supports according to its config, or None if it declares none.

    Learned position tables (GPT-2) fail with an `IndexError` beyond it; rotary models run but
    outside the context they were trained for.
    """
    limit = _position_limit_and_name(model)
    return None if limit is None else limit[0]


def check_position_limits(
    max_length: int | None, models: Mapping[str, nn.Module], *, packing: bool = False
) -> None:
    """Raise `ValueError` if `max_length` exceeds a model's position limit.

    Args:
        max_length: `SFTConfig.max_length`, the truncation length and, with `packing`, the
            length of a packed sequence. None (no truncation) cannot be checked here.
        models: role (`"student"`, `"teacher"`) -> transformers model.
        packing: whether sequences are packed (only changes the message).
    """
    if max_length is None:
        return
    for role, model in models.items():
        limit = _position_limit_and_name(model)
        if limit is None or max_length <= limit[0]:
            continue
        what = "packed sequence length" if packing else "sequence length"
        raise ValueError(
            f"`max_length={max_length}` (the {what}) exceeds the {role}'s position limit: "
            f"{type(model).__name__} supports {limit[0]} positions (`{limit[1]}` in its config). "
            f"Set `max_length` (`--max_length`) to at most {limit[0]}; a sequence beyond it would "
            "fail at the first long batch (learned position embeddings) or run outside the "
            "context the model was trained for (rotary ones)."
        )


def _position_limit_and_name(model: nn.Module) -> tuple[int, str] | None:
    """`(limit, config attribute)`, the attribute under its own name (GPT-2's `n_positions`
    also answers to `max_position_embeddings` through `attribute_map`)."""
    config = model.config.get_text_config()
    aliases = getattr(config, "attribute_map", {}) or {}
    for name in POSITION_LIMIT_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, aliases.get(name, name)
    return None
