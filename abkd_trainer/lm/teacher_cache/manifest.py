"""What a teacher cache holds and where: its constants, `manifest.json` and the shard layout."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
DEFAULT_TOP_K = 64
DEFAULT_SHARD_SIZE = 1024
MANIFEST_NAME = "manifest.json"
# Column added to the prepared datasets: the cache row of each prepared row. It rides through
# shuffling, sharding over processes and gradient accumulation with the row itself.
ROW_COLUMN = "teacher_cache_row"
# Keys of a collated batch holding the cached teacher, one row per supervised position.
BATCH_KEYS = ("teacher_topk_ids", "teacher_topk_log_probs", "teacher_tail_log_prob")
# Storage of the log-probabilities: name -> (Arrow value type, torch dtype). Arrow has no
# bfloat16, so bf16 values are stored as their 16-bit patterns.
LOG_PROB_DTYPES: dict[str, tuple[str, torch.dtype]] = {
    "bfloat16": ("uint16", torch.bfloat16),
    "float16": ("float16", torch.float16),
    "float32": ("float32", torch.float32),
}
# The columns of a shard, in order.
CACHE_COLUMNS = ("topk_ids", "topk_log_probs", "tail_log_prob")


@dataclass
class SplitInfo:
    """One cached split: its prepared dataset's size and fingerprint, and its shards.

    Args:
        num_rows: Rows (prepared examples) of the split.
        fingerprint: SHA-256 of the prepared dataset's token ids, labels and packed lengths.
        shard_size: Rows per shard (the last shard may hold fewer).
        num_shards: Shards the split is stored in, `ceil(num_rows / shard_size)`.
        num_supervised_tokens: Cached positions over the split's shards; None until written.
        num_bytes: The split's size on disk in bytes; None until written.
    """

    num_rows: int
    fingerprint: str
    shard_size: int
    num_shards: int
    num_supervised_tokens: int | None = None
    num_bytes: int | None = None


@dataclass
class TeacherCacheManifest:
    """`manifest.json` of a teacher cache.

    `teacher`, `dataset`, `tokenizer_class` and `written_by` are informational; everything else
    is checked against the training run
    ([`TeacherCache.check_compatible`][abkd_trainer.lm.teacher_cache.reader.TeacherCache.check_compatible]).

    Args:
        teacher: The teacher's name or path.
        tokenizer_fingerprint: SHA-256 of the tokenizer's vocabulary (added tokens included),
            chat template and special tokens.
        vocab_size: `len(tokenizer)`: the cached ids lie in `[0, vocab_size)`.
        top_k: Tokens cached per position, `k`.
        log_prob_dtype: Storage dtype of the log-probabilities: `"bfloat16"`, `"float16"` or
            `"float32"`.
        preprocessing: The settings that decide the prepared rows' positions and supervision
            (max_length, packing, loss masks, shuffling seed, ...).
        splits: Split name (`"train"`, `"eval"`) -> its
            [`SplitInfo`][abkd_trainer.lm.teacher_cache.manifest.SplitInfo].
        dataset: Split name -> the source dataset's `datasets` fingerprint (informational).
        ids_dtype: Storage dtype of the token ids.
        complete: Whether every shard is written; a reader refuses an incomplete cache.
        format_version: The cache layout's version; a reader refuses another one.
        written_by: The writer's `abkd_trainer` version and number of processes.
        tokenizer_splitting: SHA-256 per part of how the tokenizer splits text (normalizer,
            pre-tokenizer, model, post-processor, a probe text's ids). None in caches written
            before it was recorded: the tokenizer's behaviour is then checked through the
            prepared datasets' fingerprints alone.
        tokenizer_class: The tokenizer's class name (informational).
    """

    teacher: str
    tokenizer_fingerprint: str
    vocab_size: int
    top_k: int
    log_prob_dtype: str
    preprocessing: dict[str, Any]
    splits: dict[str, SplitInfo]
    dataset: dict[str, Any] = field(default_factory=dict)
    ids_dtype: str = "int32"
    complete: bool = False
    format_version: int = CACHE_FORMAT_VERSION
    written_by: dict[str, Any] = field(default_factory=dict)
    tokenizer_splitting: dict[str, str] | None = None
    tokenizer_class: str | None = None

    def to_json(self) -> str:
        """The manifest as `manifest.json` text.

        Returns:
            Indented JSON with sorted keys and a final newline.
        """
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TeacherCacheManifest:
        """Read a manifest from `manifest.json` text.

        Fields this version does not know (a newer writer's) are ignored with a warning.

        Args:
            text: The JSON text.

        Returns:
            The manifest.
        """
        data = json.loads(text)
        data["splits"] = {name: SplitInfo(**info) for name, info in data["splits"].items()}
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:  # written by a newer abkd-trainer: read what this version knows
            logger.warning(f"Ignoring the teacher cache manifest's unknown fields {unknown}.")
        return cls(**{key: value for key, value in data.items() if key in known})

    def settings(self) -> dict[str, Any]:
        """What must agree between two runs writing into the same directory.

        Returns:
            The teacher, tokenizer fingerprints, vocabulary size, `top_k`, log-probability dtype,
            preprocessing, each split's `(num_rows, fingerprint, shard_size)` and format version.
        """
        return {
            "teacher": self.teacher,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "tokenizer_splitting": self.tokenizer_splitting,
            "vocab_size": self.vocab_size,
            "top_k": self.top_k,
            "log_prob_dtype": self.log_prob_dtype,
            "preprocessing": self.preprocessing,
            "splits": {
                name: (info.num_rows, info.fingerprint, info.shard_size)
                for name, info in self.splits.items()
            },
            "format_version": self.format_version,
        }


def shard_dir(root: Path, split: str, shard: int) -> Path:
    """The directory of shard `shard` of `split` in the cache at `root`."""
    return root / split / f"shard-{shard:05d}"


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never a part."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
