"""Fingerprints that tie a teacher cache to a training run: tokenizer, prepared data, settings."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from abkd_trainer.lm.config import ABKDConfig


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """SHA-256 of what decides token ids and chat formatting: the vocabulary (added tokens
    included), the chat template and the special tokens."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0])),
        "chat_template": tokenizer.chat_template,
        "special_tokens": {
            name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token")
        },
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def prepared_dataset_fingerprint(dataset: Dataset, batch_size: int = 4096) -> str:
    """SHA-256 of a prepared dataset's token ids, labels and packed lengths, row by row in order.

    Two prepared datasets with the same fingerprint feed the model the same tokens with the same
    supervised mask, so cached positions line up; any change in data, tokenizer, chat template,
    truncation, packing, loss masks or shuffling seed changes it.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = [
        name for name in ("input_ids", "labels", "seq_lengths") if name in dataset.column_names
    ]
    # One stream per column and nesting level, so that the result does not depend on how the
    # rows are batched here.
    streams: dict[str, Any] = {}

    def update(key: str, values: Any) -> None:
        streams.setdefault(key, hashlib.sha256()).update(
            np.asarray(values, dtype=np.int64).tobytes()
        )

    arrow = dataset.select_columns(columns).with_format("arrow")
    for start in range(0, len(dataset), batch_size):
        table = arrow[start : start + batch_size]
        for name in columns:
            values, level = table.column(name), 0
            while pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
                update(f"{name}/lengths{level}", pc.list_value_length(values))
                values, level = pc.list_flatten(values), level + 1
            update(f"{name}/values", values)
    digest = hashlib.sha256(json.dumps([columns, len(dataset)]).encode())
    for key in sorted(streams):
        digest.update(f"{key}:{streams[key].hexdigest()}".encode())
    return digest.hexdigest()


def preprocessing_settings(
    args: ABKDConfig, padding_free: bool, completion_only_loss: bool
) -> dict:
    """The settings that decide which positions a prepared row has and which are supervised."""
    settings = {
        "max_length": args.max_length,
        "packing": bool(args.packing),
        "padding_free": bool(padding_free),
        "completion_only_loss": bool(completion_only_loss),
        "assistant_only_loss": bool(args.assistant_only_loss),
        "truncation_mode": args.truncation_mode,
        "dataset_text_field": args.dataset_text_field,
        "shuffle_dataset": bool(args.shuffle_dataset),
    }
    if args.packing:
        settings["packing_strategy"] = args.packing_strategy
    if args.eval_packing is not None:
        settings["eval_packing"] = bool(args.eval_packing)
    if args.shuffle_dataset:
        settings["seed"] = args.seed
    return settings
