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


# Text that exercises what tokenizers disagree on: Unicode normalisation (a decomposed accent, a
# ligature, full-width and compatibility characters), case, digits, punctuation runs, runs of
# spaces, tabs and line breaks, several scripts, emoji with a modifier, markup and code, and the
# ChatML special-token strings.
SPLITTING_PROBE = (
    "Hello, World!  It's 2025:\t3.14 + 1e-3 = ?\n\n  naïve cafe\u0301 Straße ﬁne ½ Ｆｕｌｌ İ\r\n"
    "日本語のテキスト 한국어 русский текст العربية हिन्दी 🙂👍🏽 ...!!! ---\n"
    "<b>markup</b> def __init__(self): return {'key': [1, 2]}  # comment\n"
    "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>   trailing spaces   "
)
# The parts of a `tokenizers` backend that decide how text becomes ids, in the order text meets
# them, and the probe text's ids, which also cover tokenizers without such a backend.
SPLITTING_COMPONENTS = ("normalizer", "pre_tokenizer", "model", "post_processor", "probe")


def tokenizer_splitting(tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    """SHA-256 per part of how `tokenizer` splits text into ids (`SPLITTING_COMPONENTS`).

    For a fast tokenizer, the backend's normalizer, pre-tokenizer, model (its type, merges and
    options; the vocabulary too) and post-processor, as serialised by `tokenizers`; for every
    tokenizer, the ids of `SPLITTING_PROBE` with the special tokens the tokenizer adds. Two
    tokenizers with the same vocabulary can still split text differently, e.g. one
    `tokenizer.json` loaded as two tokenizer classes that each build their own pre-tokenizer.

    Returns:
        Component name -> hex digest (the backend's components are absent without a backend).
    """
    digests = {}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialised = json.loads(backend.to_str())
        for name in SPLITTING_COMPONENTS[:-1]:
            digests[name] = _sha256(serialised.get(name))
    probe_ids = tokenizer(SPLITTING_PROBE, add_special_tokens=True)["input_ids"]
    digests["probe"] = _sha256(list(probe_ids))
    return digests


def first_splitting_difference(cached: dict[str, str], current: dict[str, str]) -> str | None:
    """The first component (in `SPLITTING_COMPONENTS` order) whose digest differs, or None."""
    for name in SPLITTING_COMPONENTS:
        if cached.get(name) != current.get(name):
            return name
    return None


def _sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


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
