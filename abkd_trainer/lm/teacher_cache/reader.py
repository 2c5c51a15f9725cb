"""Reading a teacher cache and training from it: the rows, the compatibility check, the collator."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from abkd_trainer.divergences.coarsened import CachedTeacher
from abkd_trainer.lm.teacher_cache.fingerprints import (
    first_splitting_difference,
    prepared_dataset_fingerprint,
    tokenizer_fingerprint,
    tokenizer_splitting,
)
from abkd_trainer.lm.teacher_cache.manifest import (
    BATCH_KEYS,
    CACHE_COLUMNS,
    CACHE_FORMAT_VERSION,
    LOG_PROB_DTYPES,
    MANIFEST_NAME,
    ROW_COLUMN,
    SplitInfo,
    TeacherCacheManifest,
    shard_dir,
)

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase


class TeacherCache:
    """A teacher cache on disk: the manifest and, per split, the rows (memory-mapped Arrow).

    Written by [`cache_teacher`][abkd_trainer.lm.teacher_cache.writer.cache_teacher] or
    `abkd-cache-teacher`; `ABKDConfig(teacher_cache=...)` opens one for training. Rows are
    numbered across the splits in manifest order (`train` first), each row holding the cached
    teacher at every supervised position of one prepared example.

    Args:
        path: The cache directory (the writer's `output_dir`, holding `manifest.json`).

    Attributes:
        path: The cache directory.
        manifest: The cache's
            [`TeacherCacheManifest`][abkd_trainer.lm.teacher_cache.manifest.TeacherCacheManifest].

    Raises:
        FileNotFoundError: `path` holds no `manifest.json`.
        ValueError: The cache has another format version, or is incomplete (its writer was
            interrupted or still runs).
    """

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
        """The number of tokens cached per position, `k`."""
        return self.manifest.top_k

    def dataset(self, split: str) -> Dataset:
        """The cached rows of `split` (shards concatenated), formatted as numpy arrays.

        Args:
            split: A cached split name, `"train"` or `"eval"`.

        Returns:
            A `datasets.Dataset` with the columns `topk_ids`, `topk_log_probs` and `tail_log_prob`,
            one row per prepared example (loaded once, then kept).

        Raises:
            ValueError: The cache does not hold `split`.
        """
        if split not in self._datasets:
            from datasets import concatenate_datasets, load_from_disk

            info = self._split_info(split)
            shards = [
                load_from_disk(str(shard_dir(self.path, split, shard)))
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
        """Where `split` starts in the cache's row numbering (the splits in manifest order).

        Args:
            split: A cached split name.

        Returns:
            The number of rows of the splits before it.

        Raises:
            ValueError: The cache does not hold `split`.
        """
        offset = 0
        for name, info in self.manifest.splits.items():
            if name == split:
                return offset
            offset += info.num_rows
        self._split_info(split)  # raises, naming the cached splits
        raise AssertionError("unreachable")

    def rows(self, indices: Sequence[int]) -> CachedTeacher:
        """The cached positions of the rows `indices`, concatenated in that order.

        Args:
            indices: Row numbers across splits (see `row_offset`), e.g. the `teacher_cache_row`
                column of a batch's examples.

        Returns:
            A `CachedTeacher` with one row per supervised position of those examples, in order:
            `topk_ids` `(n, k)` int64, `topk_log_probs` `(n, k)` and `tail_log_prob` `(n,)` fp32
            log-probabilities in nats (temperature 1).

        Raises:
            IndexError: An index is outside the cache.
        """
        arrow_type, torch_dtype = LOG_PROB_DTYPES[self.manifest.log_prob_dtype]
        k = self.top_k
        columns: dict[str, list[np.ndarray]] = {name: [] for name in CACHE_COLUMNS}
        for split, local_rows in self._by_split(indices):
            batch = self.dataset(split)[local_rows]
            for name in CACHE_COLUMNS:
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
        """Consecutive runs of `indices` that fall in one split, as (split, local rows)."""
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
        """Check that the cache was written for this training run.

        Args:
            tokenizer: The training run's tokenizer (its vocabulary, chat template, special
                tokens and how it splits text).
            preprocessing: `preprocessing_settings` of the run (max_length, packing, loss masks,
                shuffling seed, ...).
            datasets: Split name (`"train"`, `"eval"`) -> the run's prepared dataset.

        Raises:
            ValueError: The first mismatch, named with its fix: another tokenizer (vocabulary, chat
                template, special tokens, or the way it splits text), other preprocessing settings,
                a split the cache lacks, or a prepared dataset of another size or fingerprint.
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
        self._check_tokenizer_splitting(tokenizer, f"{fix}, with the student's tokenizer")
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
                    "Another dataset, split, formatting function or shuffling seed, or a "
                    "tokenizer that splits text differently (same vocabulary, another class or "
                    "normalizer / pre-tokenizer)? " + fix + "."
                )

    def _check_tokenizer_splitting(self, tokenizer: PreTrainedTokenizerBase, fix: str) -> None:
        """Raise `ValueError` when `tokenizer` splits text unlike the cache's tokenizer."""
        cached = self.manifest.tokenizer_splitting
        if cached is None:  # an older cache: the prepared datasets' fingerprints decide
            return
        differing = first_splitting_difference(cached, tokenizer_splitting(tokenizer))
        if differing is None:
            return
        part = {
            "normalizer": "its normalizer",
            "pre_tokenizer": "its pre-tokenizer",
            "model": "its tokenization model (merges or options)",
            "post_processor": "its post-processor (the special tokens it adds)",
            "probe": "the ids it gives a probe text",
        }[differing]
        classes = (
            f" (it was {self.manifest.tokenizer_class}, the training run's is "
            f"{type(tokenizer).__name__})"
            if self.manifest.tokenizer_class not in (None, type(tokenizer).__name__)
            else ""
        )
        raise ValueError(
            f"The teacher cache at {self.path} was written with a tokenizer that splits text "
            f"differently from the training run's: the vocabulary, chat template and special "
            f"tokens agree, but {part} differs{classes}. The same tokenizer.json loaded as "
            "another tokenizer class does this. The cached positions would not be the training "
            f"run's tokens. {fix}, or load the tokenizer the way the cache's writer did."
        )


# ----------------------------------------------------------------------------- training side


class TeacherCacheCollator:
    """Wraps the trainer's collator: collates as before, then adds the rows' cached teacher.

    Each example carries `ROW_COLUMN`; the batch gains `BATCH_KEYS`, the cached
    positions of its examples in example order, which is the order of `(labels shifted) !=
    -100` in the collated batch (row-major, or along the single row of a padding-free batch).
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


@dataclass
class CachedTraining:
    """What a trainer installs to train from a teacher cache (see `train_from_cache`).

    Attributes:
        cache: the opened cache.
        train_dataset: the prepared training dataset with its cache rows in `ROW_COLUMN` (a
            column the trainer must keep: the model's forward does not take it).
        eval_dataset: the prepared evaluation dataset with its cache rows, or None.
        data_collator: the trainer's collator wrapped in a `TeacherCacheCollator`.
    """

    cache: TeacherCache
    train_dataset: Dataset
    eval_dataset: Dataset | None
    data_collator: TeacherCacheCollator


def train_from_cache(
    path: str | os.PathLike,
    *,
    tokenizer: PreTrainedTokenizerBase,
    preprocessing: dict[str, Any],
    train_dataset: Dataset,
    eval_dataset: Dataset | None,
    data_collator: Any,
) -> CachedTraining:
    """Open the cache at `path` for a training run, check it, and return what the run installs.

    Args:
        path: the cache directory (written by `cache_teacher` / `abkd-cache-teacher`).
        tokenizer: the run's tokenizer.
        preprocessing: `preprocessing_settings` of the run.
        train_dataset: the run's prepared training dataset (SFTTrainer's preparation).
        eval_dataset: the run's prepared evaluation dataset, or None.
        data_collator: the run's collator.

    Raises:
        ValueError: a dataset is not one map-style `datasets.Dataset`, or the cache does not
            match the run (see `TeacherCache.check_compatible`).
    """
    from datasets import Dataset

    cache = TeacherCache(path)
    datasets = {"train": train_dataset}
    if eval_dataset is not None:
        datasets["eval"] = eval_dataset
    for split, dataset in datasets.items():
        if not isinstance(dataset, Dataset):
            raise ValueError(
                f"Training from a teacher cache needs the {split} dataset as one map-style "
                f"`datasets.Dataset` (got {type(dataset).__name__}): the cache is indexed by "
                "its rows. Streaming datasets and dicts of evaluation datasets are not supported."
            )
    cache.check_compatible(tokenizer=tokenizer, preprocessing=preprocessing, datasets=datasets)
    return CachedTraining(
        cache=cache,
        train_dataset=_with_row_ids(train_dataset, cache.row_offset("train")),
        eval_dataset=None
        if eval_dataset is None
        else _with_row_ids(eval_dataset, cache.row_offset("eval")),
        data_collator=TeacherCacheCollator(data_collator, cache),
    )


def _with_row_ids(dataset: Dataset, offset: int) -> Dataset:
    rows = np.arange(offset, offset + len(dataset), dtype=np.int64)
    return dataset.add_column(ROW_COLUMN, rows)
