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
    """One cached split: its prepared dataset's size and fingerprint, and its shards."""

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
    is checked against the training run (`TeacherCache.check_compatible`). `tokenizer_splitting`
    (see `tokenizer_splitting`) is None in caches written before it was recorded: their
    tokenizer's behaviour is then checked through the prepared datasets' fingerprints alone.
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
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TeacherCacheManifest:
        data = json.loads(text)
        data["splits"] = {name: SplitInfo(**info) for name, info in data["splits"].items()}
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:  # written by a newer abkd-trainer: read what this version knows
            logger.warning(f"Ignoring the teacher cache manifest's unknown fields {unknown}.")
        return cls(**{key: value for key, value in data.items() if key in known})

    def settings(self) -> dict[str, Any]:
        """What must agree between two runs writing into the same directory."""
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
