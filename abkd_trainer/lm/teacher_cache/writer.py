"""Offline teacher: compute its top-k log-probabilities once, then train without it.

:func:`cache_teacher` runs a teacher over a dataset with exactly ``ABKDTrainer``'s preprocessing
(it builds the same ``SFTTrainer`` dataset preparation and collator, so tokenisation, truncation,
packing and the supervised mask are the trainer's own) and stores, for every supervised position,
the teacher's ``k`` most likely token ids (int32), their raw ``log_softmax`` values (temperature
1; bf16 by default) and the log of the remaining mass. ``ABKDTrainer`` then trains from it with
``ABKDConfig(teacher_cache=...)`` and no teacher model, using the divergence between the coarsened
distributions (:mod:`abkd_trainer.divergences.coarsened`).

On disk (``output_dir``)::

    manifest.json                 # what was cached and how (see TeacherCacheManifest)
    train/shard-00000/ ...        # one `datasets` dataset (save_to_disk, Arrow) per shard
    eval/shard-00000/ ...         # when an evaluation split was cached

Row ``i`` of a split (shards concatenated in order) belongs to row ``i`` of the prepared dataset
``SFTTrainer`` builds for that split; its columns hold the row's supervised positions in order,
flattened: ``topk_ids`` (``n * k`` int32), ``topk_log_probs`` (``n * k``) and ``tail_log_prob``
(``n``), the log-probabilities as bf16 bit patterns (uint16), float16 or float32.

Shards are spread over the processes of an ``accelerate launch`` / ``torchrun`` run (shard ``s``
goes to process ``s % world_size``), so the cache does not depend on the number of processes; a
shard is written to a temporary directory and renamed when complete, so a rerun skips the finished
shards. The teacher may be sharded with DeepSpeed ZeRO-3 (every process then runs the same number
of forward passes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from abkd_trainer.divergences.coarsened import CachedTeacher

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from abkd_trainer.lm.config import ABKDConfig

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_FORMAT_VERSION",
    "DEFAULT_TOP_K",
    "LOG_PROB_DTYPES",
    "MANIFEST_NAME",
    "ROW_COLUMN",
    "TeacherCache",
    "TeacherCacheCollator",
    "TeacherCacheManifest",
    "cache_teacher",
    "pop_cached_teacher",
    "prepared_dataset_fingerprint",
    "tokenizer_fingerprint",
]

CACHE_FORMAT_VERSION = 1
DEFAULT_TOP_K = 64
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
_CACHE_COLUMNS = ("topk_ids", "topk_log_probs", "tail_log_prob")
DEFAULT_SHARD_SIZE = 1024


# ----------------------------------------------------------------------------- fingerprints


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


# ----------------------------------------------------------------------------- manifest


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
    """``manifest.json`` of a teacher cache.

    ``teacher``, ``dataset`` and ``written_by`` are informational; everything else is checked
    against the training run (:meth:`TeacherCache.check_compatible`).
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

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TeacherCacheManifest:
        data = json.loads(text)
        data["splits"] = {name: SplitInfo(**info) for name, info in data["splits"].items()}
        return cls(**data)

    def settings(self) -> dict[str, Any]:
        """What must agree between two runs writing into the same directory."""
        return {
            "teacher": self.teacher,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
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


# ----------------------------------------------------------------------------- reading


def _shard_dir(root: Path, split: str, shard: int) -> Path:
    return root / split / f"shard-{shard:05d}"


class TeacherCache:
    """A teacher cache on disk: the manifest and, per split, the rows (memory-mapped Arrow)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"No teacher cache at {self.path} ({MANIFEST_NAME} is missing). Write one with "
                "`abkd-cache-teacher --output_dir DIR ...` (or abkd_trainer.lm.teacher_cache."
                "cache_teacher) first."
            )
        self.manifest = TeacherCacheManifest.from_json(manifest_path.read_text())
        if self.manifest.format_version != CACHE_FORMAT_VERSION:
            raise ValueError(
                f"The teacher cache at {self.path} has format version "
                f"{self.manifest.format_version}; this abkd-trainer reads version "
                f"{CACHE_FORMAT_VERSION}. Rewrite the cache with this version."
            )
        if not self.manifest.complete:
            raise ValueError(
                f"The teacher cache at {self.path} is incomplete (a writer was interrupted or is "
                "still running). Rerun the same abkd-cache-teacher command: it skips the "
                "finished shards."
            )
        self._datasets: dict[str, Dataset] = {}

    @property
    def top_k(self) -> int:
        return self.manifest.top_k

    def dataset(self, split: str) -> Dataset:
        """The cached rows of ``split`` (shards concatenated), formatted as numpy arrays."""
        if split not in self._datasets:
            from datasets import concatenate_datasets, load_from_disk

            info = self._split_info(split)
            shards = [
                load_from_disk(str(_shard_dir(self.path, split, shard)))
                for shard in range(info.num_shards)
            ]
            self._datasets[split] = concatenate_datasets(shards).with_format("numpy")
        return self._datasets[split]

    def _split_info(self, split: str) -> SplitInfo:
        if split not in self.manifest.splits:
            raise ValueError(
                f"The teacher cache at {self.path} holds the splits "
                f"{sorted(self.manifest.splits)}, not {split!r}. Cache it too (abkd-cache-teacher "
                "with an evaluation dataset and `--eval_strategy` other than 'no')."
            )
        return self.manifest.splits[split]

    def row_offset(self, split: str) -> int:
        """Where ``split`` starts in the cache's row numbering (the splits in manifest order)."""
        offset = 0
        for name, info in self.manifest.splits.items():
            if name == split:
                return offset
            offset += info.num_rows
        self._split_info(split)  # raises, naming the cached splits
        raise AssertionError("unreachable")

    def rows(self, indices: Sequence[int]) -> CachedTeacher:
        """The cached positions of the rows ``indices`` (numbered across splits, see
        :meth:`row_offset`), concatenated in that order."""
        arrow_type, torch_dtype = LOG_PROB_DTYPES[self.manifest.log_prob_dtype]
        k = self.top_k
        columns: dict[str, list[np.ndarray]] = {name: [] for name in _CACHE_COLUMNS}
        for split, local_rows in self._by_split(indices):
            batch = self.dataset(split)[local_rows]
            for name in _CACHE_COLUMNS:
                columns[name].extend(np.asarray(row).reshape(-1) for row in batch[name])

        def concat(name: str, dtype: str) -> torch.Tensor:
            parts = columns[name]
            return torch.from_numpy(
                np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
            )

        def decode(values: torch.Tensor) -> torch.Tensor:
            if arrow_type == "uint16":
                values = values.view(torch.int16).view(torch_dtype)
            return values.float()

        ids = concat("topk_ids", "int32").long().reshape(-1, k)
        log_probs = decode(concat("topk_log_probs", arrow_type)).reshape(-1, k)
        tail = decode(concat("tail_log_prob", arrow_type))
        return CachedTeacher(ids, log_probs, tail)

    def _by_split(self, indices: Sequence[int]) -> Iterator[tuple[str, list[int]]]:
        """Consecutive runs of ``indices`` that fall in one split, as (split, local rows)."""
        bounds, offset = [], 0
        for name, info in self.manifest.splits.items():
            bounds.append((name, offset, offset + info.num_rows))
            offset += info.num_rows
        run_split, run_rows = None, []
        for index in indices:
            found = next(((n, lo) for n, lo, hi in bounds if lo <= index < hi), None)
            if found is None:
                raise IndexError(f"Row {index} is outside the teacher cache ({offset} rows).")
            name, low = found
            if name != run_split and run_rows:
                yield run_split, run_rows
                run_rows = []
            run_split = name
            run_rows.append(int(index) - low)
        if run_rows:
            yield run_split, run_rows

    def check_compatible(
        self,
        *,
        tokenizer: PreTrainedTokenizerBase,
        preprocessing: dict[str, Any],
        datasets: dict[str, Dataset],
    ) -> None:
        """Raise ``ValueError`` naming the first mismatch between the cache and a training run.

        Args:
            tokenizer: the training run's tokenizer (its vocabulary and chat template).
            preprocessing: :func:`preprocessing_settings` of the run.
            datasets: split name (``"train"``, ``"eval"``) -> the run's prepared dataset.
        """
        manifest = self.manifest
        where = f"The teacher cache at {self.path}"
        fix = "Rewrite the cache with the training settings (abkd-cache-teacher takes its flags)"
        if (
            tokenizer_fingerprint(tokenizer) != manifest.tokenizer_fingerprint
            or len(tokenizer) != manifest.vocab_size
        ):
            raise ValueError(
                f"{where} was written with another tokenizer (vocabulary of "
                f"{manifest.vocab_size} tokens, or another chat template / special tokens) than "
                f"the training run's ({len(tokenizer)} tokens). {fix}, with the student's "
                "tokenizer (`--model_name_or_path`)."
            )
        for name in sorted(set(manifest.preprocessing) | set(preprocessing)):
            cached, current = manifest.preprocessing.get(name), preprocessing.get(name)
            if cached != current:
                raise ValueError(
                    f"{where} was written with {name}={cached!r}, but training uses "
                    f"{name}={current!r}. {fix}, or train with {name}={cached!r}."
                )
        for split, dataset in datasets.items():
            info = self._split_info(split)
            fingerprint = prepared_dataset_fingerprint(dataset)
            if len(dataset) != info.num_rows or fingerprint != info.fingerprint:
                raise ValueError(
                    f"{where} does not match the {split} data: it was written for a prepared "
                    f"dataset of {info.num_rows} rows (fingerprint {info.fingerprint[:12]}), the "
                    f"training run prepares {len(dataset)} rows (fingerprint {fingerprint[:12]}). "
                    "Another dataset, split, formatting function or shuffling seed? " + fix + "."
                )


# ----------------------------------------------------------------------------- training side


class TeacherCacheCollator:
    """Wraps the trainer's collator: collates as before, then adds the rows' cached teacher.

    Each example carries :data:`ROW_COLUMN`; the batch gains :data:`BATCH_KEYS`, the cached
    positions of its examples in example order, which is the order of ``(labels shifted) !=
    -100`` in the collated batch (row-major, or along the single row of a padding-free batch).
    """

    def __init__(self, collator: Any, cache: TeacherCache) -> None:
        self.collator = collator
        self.cache = cache

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if any(ROW_COLUMN not in example for example in examples):
            raise ValueError(
                f"A batch has no `{ROW_COLUMN}` column: only the datasets given to ABKDTrainer "
                "when it was built are in the teacher cache (a dataset passed to evaluate() "
                "later is not)."
            )
        rows = [int(example[ROW_COLUMN]) for example in examples]
        batch = self.collator(
            [{key: value for key, value in ex.items() if key != ROW_COLUMN} for ex in examples]
        )
        cached = self.cache.rows(rows)
        batch.update(
            zip(
                BATCH_KEYS,
                (cached.topk_ids, cached.topk_log_probs, cached.tail_log_prob),
                strict=True,
            )
        )
        return batch


def pop_cached_teacher(inputs: dict[str, Any]) -> CachedTeacher | None:
    """Remove the cached teacher from a collated batch and return it (None if it has none)."""
    if BATCH_KEYS[0] not in inputs:
        return None
    return CachedTeacher(*(inputs.pop(key) for key in BATCH_KEYS))


def attach_teacher_cache(trainer: Any, path: str | os.PathLike) -> TeacherCache:
    """Make an ``ABKDTrainer`` train from the cache at ``path`` (called from its ``__init__``).

    Checks the cache against the trainer's tokenizer, preprocessing and prepared datasets, adds
    :data:`ROW_COLUMN` to those datasets and wraps the collator so that every batch carries its
    cached teacher rows.
    """
    from datasets import Dataset

    cache = TeacherCache(path)
    datasets = {"train": trainer.train_dataset}
    if trainer.eval_dataset is not None:
        datasets["eval"] = trainer.eval_dataset
    for split, dataset in datasets.items():
        if not isinstance(dataset, Dataset):
            raise ValueError(
                f"Training from a teacher cache needs the {split} dataset as one map-style "
                f"`datasets.Dataset` (got {type(dataset).__name__}): the cache is indexed by "
                "its rows. Streaming datasets and dicts of evaluation datasets are not supported."
            )
    cache.check_compatible(
        tokenizer=trainer._tokenizer,
        preprocessing=preprocessing_settings(
            trainer.args, trainer.padding_free, trainer.completion_only_loss
        ),
        datasets=datasets,
    )
    trainer.train_dataset = _with_row_ids(trainer.train_dataset, cache.row_offset("train"))
    if trainer.eval_dataset is not None:
        trainer.eval_dataset = _with_row_ids(trainer.eval_dataset, cache.row_offset("eval"))
    trainer.data_collator = TeacherCacheCollator(trainer.data_collator, cache)
    # Trainer drops dataset columns the model's forward does not take; keep the row ids.
    trainer._set_signature_columns_if_needed()
    if ROW_COLUMN not in trainer._signature_columns:
        trainer._signature_columns = [*trainer._signature_columns, ROW_COLUMN]
    return cache


def _with_row_ids(dataset: Dataset, offset: int) -> Dataset:
    rows = np.arange(offset, offset + len(dataset), dtype=np.int64)
    return dataset.add_column(ROW_COLUMN, rows)


# ----------------------------------------------------------------------------- writing


def _encode_log_probs(values: torch.Tensor, log_prob_dtype: str) -> np.ndarray:
    arrow_type, torch_dtype = LOG_PROB_DTYPES[log_prob_dtype]
    values = values.to(torch_dtype).cpu()
    if arrow_type == "uint16":
        return values.view(torch.int16).numpy().view(np.uint16)
    return values.numpy()


def _cache_features(log_prob_dtype: str) -> Any:
    from datasets import Features, List, Value

    value_type = LOG_PROB_DTYPES[log_prob_dtype][0]
    return Features(
        {
            "topk_ids": List(Value("int32")),
            "topk_log_probs": List(Value(value_type)),
            "tail_log_prob": List(Value(value_type)),
        }
    )


@dataclass
class _Writer:
    """One process's view of a cache run: the teacher, the collator and where shards go."""

    teacher: Any  # the forward wrapper (DeepSpeed engine, or the model itself)
    teacher_module: Any  # the unwrapped causal LM
    collator: Any
    transform: Any
    vocab_size: int
    top_k: int
    log_prob_dtype: str
    batch_size: int
    chunk_size: int
    device: torch.device

    @torch.no_grad()
    def teacher_rows(self, examples: list[dict[str, Any]]) -> list[CachedTeacher]:
        """The cached rows of each example (its supervised positions, in order)."""
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        from abkd_trainer.divergences.fused_linear import _project_into
        from abkd_trainer.lm.batches import next_token_targets
        from abkd_trainer.lm.models import final_hidden_states

        batch = self.collator(examples)
        targets = next_token_targets(batch)
        model_inputs = {
            key: value.to(self.device) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()
            if key not in ("labels", "shift_labels")
        }
        model_inputs["use_cache"] = False
        hidden = self._forward(final_hidden_states, model_inputs)
        supervised = targets.reshape(-1).ne(-100).to(hidden.device)
        hidden = hidden.reshape(-1, hidden.shape[-1])[supervised]
        head = self.teacher_module.get_output_embeddings()
        bias = getattr(head, "bias", None)
        parts = []
        with maybe_gather_lm_head_ctx(head.weight, bias):
            weight = head.weight[: self.vocab_size]
            for start in range(0, hidden.shape[0], self.chunk_size):
                tile = hidden[start : start + self.chunk_size]
                logits = torch.empty(
                    (tile.shape[0], self.vocab_size),
                    dtype=torch.promote_types(tile.dtype, torch.float32),
                    device=tile.device,
                )
                tile_bias = None if bias is None else bias[: self.vocab_size]
                _project_into(logits, tile.to(weight.dtype), weight, tile_bias)
                parts.append(CachedTeacher.from_logits(self.transform.apply_(logits), self.top_k))
        rows = _concat(parts, self.top_k, hidden.device)
        return _rows_per_example(rows, targets, examples, batch)

    def _forward(self, function: Any, model_inputs: dict[str, Any]) -> torch.Tensor:
        # Through the wrapper's forward, so that a ZeRO-3 teacher gathers its layers (as the
        # trainer does for a live teacher).
        from trl.models.utils import _ForwardRedirection

        if self.teacher is self.teacher_module:
            return function(self.teacher_module, model_inputs)
        return _ForwardRedirection()(
            self.teacher, self.teacher_module, function, self.teacher_module, model_inputs
        )

    def encode(self, examples: list[dict[str, Any]]) -> dict[str, list[np.ndarray]]:
        columns: dict[str, list[np.ndarray]] = {
            "topk_ids": [],
            "topk_log_probs": [],
            "tail_log_prob": [],
        }
        for cached in self.teacher_rows(examples):
            columns["topk_ids"].append(cached.topk_ids.to(torch.int32).cpu().numpy().reshape(-1))
            columns["topk_log_probs"].append(
                _encode_log_probs(cached.topk_log_probs.reshape(-1), self.log_prob_dtype)
            )
            columns["tail_log_prob"].append(
                _encode_log_probs(cached.tail_log_prob, self.log_prob_dtype)
            )
        return columns

    def idle_forward(self) -> None:
        """A forward pass on one padding token, for ZeRO-3 processes that have run out of work."""
        pad_id = self.collator.pad_token_id
        self.teacher_rows([{"input_ids": [pad_id], "labels": [-100]}])


def _concat(parts: list[CachedTeacher], top_k: int, device: torch.device) -> CachedTeacher:
    if not parts:
        return CachedTeacher(
            torch.zeros(0, top_k, dtype=torch.long, device=device),
            torch.zeros(0, top_k, device=device),
            torch.zeros(0, device=device),
        )
    return CachedTeacher(
        *(
            torch.cat(tensors)
            for tensors in zip(
                *((p.topk_ids, p.topk_log_probs, p.tail_log_prob) for p in parts), strict=True
            )
        )
    )


def _rows_per_example(
    rows: CachedTeacher,
    targets: torch.Tensor,
    examples: list[dict[str, Any]],
    batch: dict[str, Any],
) -> list[CachedTeacher]:
    """Split a batch's cached positions (row-major over ``targets != -100``) by example."""
    supervised = targets.ne(-100)
    if supervised.shape[0] == len(examples):
        counts = supervised.sum(dim=1).tolist()
    elif supervised.shape[0] == 1:  # padding-free: the examples are concatenated along one row
        lengths = [len(example["input_ids"]) for example in examples]
        spans = supervised[0, : sum(lengths)].split(lengths)
        counts = [int(span.sum()) for span in spans]
    else:
        raise ValueError(
            f"Cannot assign a collated batch of shape {tuple(batch['input_ids'].shape)} to "
            f"{len(examples)} examples."
        )
    if sum(counts) != rows.num_rows:
        raise RuntimeError("Supervised positions outside the examples' spans.")
    out, start = [], 0
    for count in counts:
        out.append(rows.select(slice(start, start + count)))
        start += count
    return out


def cache_teacher(
    teacher_model: str | PreTrainedModel,
    args: ABKDConfig,
    train_dataset: Dataset,
    processing_class: PreTrainedTokenizerBase,
    eval_dataset: Dataset | None = None,
    *,
    top_k: int = DEFAULT_TOP_K,
    log_prob_dtype: str = "bfloat16",
    shard_size: int = DEFAULT_SHARD_SIZE,
    formatting_func: Any = None,
) -> Path:
    """Run ``teacher_model`` over the prepared datasets and write a teacher cache.

    Args:
        teacher_model: the teacher, or its name/path (loaded with
            ``args.teacher_model_init_kwargs``, sharded under a ZeRO-3 ``args.deepspeed``).
        args: the :class:`~abkd_trainer.ABKDConfig` of the training run to come: its
            preprocessing fields (``max_length``, ``packing``, ``completion_only_loss``,
            ``assistant_only_loss``, ``dataset_text_field``, ``seed``, ...) decide the positions;
            the cache goes to ``args.output_dir``; ``per_device_eval_batch_size`` rows go
            through the teacher at once.
        train_dataset, eval_dataset, processing_class, formatting_func: what the training run
            will pass to ``ABKDTrainer`` (``eval_dataset`` only if it evaluates; the tokenizer
            is the student's).
        top_k: token ids kept per position (``len(processing_class)`` keeps all of them; the
            divergence is then the full one).
        log_prob_dtype: ``"bfloat16"`` (default), ``"float16"`` or ``"float32"``.
        shard_size: prepared rows per shard, the unit of resumption and of work per process.

    Returns:
        The cache directory (``args.output_dir``), complete on every process.
    """
    from trl import SFTTrainer

    from abkd_trainer import __version__
    from abkd_trainer.divergences.fused_linear import LogitTransform, default_fused_chunk_size
    from abkd_trainer.lm.models import load_teacher, verify_fused_logits

    if log_prob_dtype not in LOG_PROB_DTYPES:
        raise ValueError(
            f"`log_prob_dtype` must be one of {sorted(LOG_PROB_DTYPES)}, got {log_prob_dtype!r}."
        )
    for name, value in (("top_k", top_k), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    vocab_size = len(processing_class)
    if top_k > vocab_size:
        raise ValueError(
            f"`top_k={top_k}` exceeds the tokenizer's {vocab_size} tokens; use at most "
            f"{vocab_size} (which caches the whole distribution)."
        )
    teacher_name = teacher_model if isinstance(teacher_model, str) else None
    if isinstance(teacher_model, str):
        teacher_model = load_teacher(teacher_model, args)
    teacher_name = teacher_name or teacher_model.config.name_or_path or type(teacher_model).__name__
    teacher_model.requires_grad_(False)

    # The trainer's own dataset preparation and collator: an SFTTrainer over these datasets
    # with the same arguments prepares exactly what ABKDTrainer will (it is an SFTTrainer).
    preparer = SFTTrainer(
        model=teacher_model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
        formatting_func=formatting_func,
    )
    accelerator = preparer.accelerator
    teacher_model.eval()
    teacher = teacher_model
    if preparer.is_deepspeed_enabled:
        from abkd_trainer.core.distributed import prepare_deepspeed_teacher

        teacher = prepare_deepspeed_teacher(teacher_model, accelerator)
        teacher.eval()  # (DeepSpeedEngine.eval returns None)
    transform = LogitTransform.from_config(teacher_model.config)
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    zero3 = is_deepspeed_zero3_enabled()
    if not zero3:
        verify_fused_logits("teacher", teacher_model, transform)

    splits = {"train": preparer.train_dataset}
    if preparer.eval_dataset is not None:
        splits["eval"] = preparer.eval_dataset
    manifest = TeacherCacheManifest(
        teacher=str(teacher_name),
        tokenizer_fingerprint=tokenizer_fingerprint(preparer._tokenizer),
        vocab_size=vocab_size,
        top_k=top_k,
        log_prob_dtype=log_prob_dtype,
        preprocessing=preprocessing_settings(
            args, preparer.padding_free, preparer.completion_only_loss
        ),
        splits={
            name: SplitInfo(
                num_rows=len(dataset),
                fingerprint=prepared_dataset_fingerprint(dataset),
                shard_size=shard_size,
                num_shards=math.ceil(len(dataset) / shard_size),
            )
            for name, dataset in splits.items()
        },
        dataset={
            name: getattr(source, "_fingerprint", None)
            for name, source in (("train", train_dataset), ("eval", eval_dataset))
            if source is not None
        },
        written_by={"abkd_trainer": __version__, "num_processes": accelerator.num_processes},
    )
    root = Path(args.output_dir)
    if _begin_run(root, manifest, accelerator):
        return root

    writer = _Writer(
        teacher=teacher,
        teacher_module=teacher_model,
        collator=preparer.data_collator,
        transform=transform,
        vocab_size=vocab_size,
        top_k=top_k,
        log_prob_dtype=log_prob_dtype,
        batch_size=args.per_device_eval_batch_size,
        chunk_size=default_fused_chunk_size(vocab_size, args.device),
        device=args.device,
    )
    for split, dataset in splits.items():
        _write_split(writer, root, split, dataset, manifest.splits[split], accelerator, zero3)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _finish_manifest(root, manifest)
    accelerator.wait_for_everyone()
    return root


def _begin_run(root: Path, manifest: TeacherCacheManifest, accelerator: Any) -> bool:
    """Check a previous run in ``root`` against this one and record this run's manifest.

    Returns True when ``root`` already holds this exact cache, complete.
    """
    manifest_path = root / MANIFEST_NAME
    if manifest_path.is_file():
        previous = TeacherCacheManifest.from_json(manifest_path.read_text())
        old, new = previous.settings(), manifest.settings()
        if old != new:
            differing = next(key for key in new if old.get(key) != new.get(key))
            raise ValueError(
                f"{root} already holds a teacher cache written with other settings ({differing}: "
                f"{old.get(differing)!r}, now {new.get(differing)!r}). Write to another "
                "--output_dir, or delete that directory to start over."
            )
        if previous.complete:
            logger.info(f"The teacher cache in {root} is already complete.")
            return True
    accelerator.wait_for_everyone()  # everyone has read the previous manifest
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        _write_atomically(manifest_path, manifest.to_json())
    accelerator.wait_for_everyone()
    return False


def _write_split(
    writer: _Writer,
    root: Path,
    split: str,
    dataset: Dataset,
    info: SplitInfo,
    accelerator: Any,
    zero3: bool,
) -> None:
    """Write this process's shards of ``split`` (shard ``s`` belongs to process ``s % world``)."""
    from datasets import Dataset as ArrowDataset
    from tqdm.auto import tqdm

    rank, world = accelerator.process_index, accelerator.num_processes
    rounds = math.ceil(info.num_shards / world)
    pending = [
        shard
        for shard in range(rank, info.num_shards, world)
        if not _shard_dir(root, split, shard).is_dir()
    ]
    progress = tqdm(
        total=sum(_shard_rows(info, shard) for shard in pending),
        desc=f"Caching the teacher ({split}, process {rank})",
        unit="rows",
        disable=not accelerator.is_local_main_process,
    )
    for round_index in range(rounds):
        shard = round_index * world + rank
        batches = (
            list(_shard_batches(dataset, info, shard, writer.batch_size))
            if shard in pending
            else []
        )
        # ZeRO-3 forwards are collective: every process runs as many as the busiest one.
        steps = len(batches)
        if zero3:
            steps = int(accelerator.gather(torch.tensor([steps], device=writer.device)).max())
        columns: dict[str, list[np.ndarray]] = {name: [] for name in _CACHE_COLUMNS}
        for step in range(steps):
            if step >= len(batches):
                writer.idle_forward()
                continue
            for name, values in writer.encode(batches[step]).items():
                columns[name].extend(values)
            progress.update(len(batches[step]))
        if batches:
            target = _shard_dir(root, split, shard)
            temporary = target.with_name(f"{target.name}.tmp-{rank}")
            shutil.rmtree(temporary, ignore_errors=True)
            features = _cache_features(writer.log_prob_dtype)
            shard_dataset = ArrowDataset.from_dict(columns, features=features)
            with _quiet_datasets_progress():
                shard_dataset.save_to_disk(str(temporary))
            os.replace(temporary, target)  # a shard directory exists only once it is complete
    progress.close()


@contextlib.contextmanager
def _quiet_datasets_progress() -> Iterator[None]:
    """No per-shard "Saving the dataset" bars under the writer's own progress bar."""
    from datasets.utils import logging as datasets_logging

    was_enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            datasets_logging.enable_progress_bar()


def _shard_rows(info: SplitInfo, shard: int) -> int:
    return min(info.shard_size, info.num_rows - shard * info.shard_size)


def _shard_batches(
    dataset: Dataset, info: SplitInfo, shard: int, batch_size: int
) -> Iterator[list[dict[str, Any]]]:
    start = shard * info.shard_size
    stop = start + _shard_rows(info, shard)
    for batch_start in range(start, stop, batch_size):
        rows = dataset[batch_start : min(batch_start + batch_size, stop)]
        yield [dict(zip(rows, values, strict=True)) for values in zip(*rows.values(), strict=True)]


def _finish_manifest(root: Path, manifest: TeacherCacheManifest) -> None:
    import pyarrow.compute as pc
    from datasets import load_from_disk

    for split, info in manifest.splits.items():
        missing = [s for s in range(info.num_shards) if not _shard_dir(root, split, s).is_dir()]
        if missing:
            raise RuntimeError(f"Shards {missing} of the {split} split were not written.")
        tokens = 0
        for shard in range(info.num_shards):
            table = load_from_disk(str(_shard_dir(root, split, shard))).data.column("tail_log_prob")
            tokens += int(pc.sum(pc.list_value_length(table)).as_py() or 0)
        info.num_supervised_tokens = tokens
        info.num_bytes = sum(p.stat().st_size for p in (root / split).rglob("*") if p.is_file())
    manifest.complete = True
    _write_atomically(root / MANIFEST_NAME, manifest.to_json())


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
