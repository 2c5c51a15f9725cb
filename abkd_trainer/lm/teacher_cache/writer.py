"""Writing a teacher cache: the teacher's top-k rows of every supervised position, in shards.

Shards are spread over the processes of an `accelerate launch` / `torchrun` run (shard `s`
goes to process `s % world_size`), so the cache does not depend on the number of processes; a
shard is written to a temporary directory and renamed when complete, so a rerun skips the finished
shards and the finished cache is byte-identical to one written without interruption. The teacher
may be sharded with DeepSpeed ZeRO-3 (every process then runs the same number of forward passes).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from abkd_trainer.divergences.coarsened import CachedTeacher
from abkd_trainer.lm.teacher_cache.fingerprints import (
    prepared_dataset_fingerprint,
    preprocessing_settings,
    tokenizer_fingerprint,
    tokenizer_splitting,
)
from abkd_trainer.lm.teacher_cache.manifest import (
    CACHE_COLUMNS,
    DEFAULT_SHARD_SIZE,
    DEFAULT_TOP_K,
    LOG_PROB_DTYPES,
    MANIFEST_NAME,
    SplitInfo,
    TeacherCacheManifest,
    shard_dir,
    write_atomically,
)

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from abkd_trainer.lm.config import ABKDConfig

logger = logging.getLogger(__name__)


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
    zero3: bool = False  # ZeRO-3 forwards are collective (see _write_split)

    @torch.no_grad()
    def teacher_rows(self, examples: list[dict[str, Any]]) -> list[CachedTeacher]:
        """The cached rows of each example (its supervised positions, in order)."""
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        from abkd_trainer.divergences.projection import project_into as _project_into
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
    """Split a batch's cached positions (row-major over `targets != -100`) by example."""
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
    """Run `teacher_model` over the prepared datasets and write a teacher cache.

    Args:
        teacher_model: the teacher, or its name/path (loaded with
            `args.teacher_model_init_kwargs`, sharded under a ZeRO-3 `args.deepspeed`).
        args: the `ABKDConfig` of the training run to come: its
            preprocessing fields (`max_length`, `packing`, `completion_only_loss`,
            `assistant_only_loss`, `dataset_text_field`, `seed`, ...) decide the positions;
            the cache goes to `args.output_dir`; `per_device_eval_batch_size` rows go
            through the teacher at once.
        train_dataset: what the training run will pass to `ABKDTrainer` as its
            `train_dataset`.
        processing_class: the tokenizer of the training run (the student's).
        eval_dataset: the training run's `eval_dataset`, if it evaluates.
        formatting_func: the training run's `formatting_func`, if any.
        top_k: token ids kept per position (`len(processing_class)` keeps all of them; the
            divergence is then the full one).
        log_prob_dtype: `"bfloat16"` (default), `"float16"` or `"float32"`.
        shard_size: prepared rows per shard, the unit of resumption and of work per process.

    Returns:
        The cache directory (`args.output_dir`), complete on every process. A rerun of the same
        command skips the shards already written (and does nothing on a complete cache).

    Raises:
        ValueError: `log_prob_dtype` is not one of the three, `top_k` or `shard_size` is not a
            positive integer, `top_k` exceeds the tokenizer's vocabulary, or `args.output_dir`
            holds a cache written with other settings (teacher, tokenizer, `top_k`, dtype,
            preprocessing or data).
    """
    vocab_size = len(processing_class)
    _check_cache_arguments(top_k, log_prob_dtype, shard_size, vocab_size)
    teacher_model, teacher_name = _frozen_teacher(teacher_model, args)

    # The trainer's own dataset preparation and collator: an SFTTrainer over these datasets
    # with the same arguments prepares exactly what ABKDTrainer will (it is an SFTTrainer).
    from trl import SFTTrainer

    preparer = SFTTrainer(
        model=teacher_model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
        formatting_func=formatting_func,
    )
    writer = _prepare_writer(teacher_model, preparer, args, vocab_size, top_k, log_prob_dtype)
    splits = {"train": preparer.train_dataset}
    if preparer.eval_dataset is not None:
        splits["eval"] = preparer.eval_dataset
    accelerator = preparer.accelerator
    manifest = TeacherCacheManifest(
        teacher=teacher_name,
        # SFTTrainer set the tokenizer's padding and end-of-sequence tokens up in place.
        tokenizer_fingerprint=tokenizer_fingerprint(processing_class),
        tokenizer_splitting=tokenizer_splitting(processing_class),
        tokenizer_class=type(processing_class).__name__,
        vocab_size=vocab_size,
        top_k=top_k,
        log_prob_dtype=log_prob_dtype,
        preprocessing=preprocessing_settings(
            args, preparer.padding_free, preparer.completion_only_loss
        ),
        splits=_split_infos(splits, shard_size),
        dataset={
            name: getattr(source, "_fingerprint", None)
            for name, source in (("train", train_dataset), ("eval", eval_dataset))
            if source is not None
        },
        written_by=_written_by(accelerator.num_processes),
    )
    root = Path(args.output_dir)
    if _begin_run(root, manifest, accelerator):
        return root

    for split, dataset in splits.items():
        _write_split(writer, root, split, dataset, manifest.splits[split], accelerator)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _finish_manifest(root, manifest)
    accelerator.wait_for_everyone()
    return root


def _frozen_teacher(
    teacher_model: str | PreTrainedModel, args: ABKDConfig
) -> tuple[PreTrainedModel, str]:
    """The teacher (loaded when given by name), without gradients, and the name to record."""
    teacher_name = teacher_model if isinstance(teacher_model, str) else None
    if isinstance(teacher_model, str):
        from abkd_trainer.lm.models import load_teacher

        teacher_model = load_teacher(teacher_model, args)
    teacher_name = teacher_name or teacher_model.config.name_or_path or type(teacher_model).__name__
    teacher_model.requires_grad_(False)
    return teacher_model, str(teacher_name)


def _check_cache_arguments(
    top_k: int, log_prob_dtype: str, shard_size: int, vocab_size: int
) -> None:
    """Raise `ValueError` naming the first bad `cache_teacher` argument."""
    if log_prob_dtype not in LOG_PROB_DTYPES:
        raise ValueError(
            f"`log_prob_dtype` must be one of {sorted(LOG_PROB_DTYPES)}, got {log_prob_dtype!r}."
        )
    for name, value in (("top_k", top_k), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if top_k > vocab_size:
        raise ValueError(
            f"`top_k={top_k}` exceeds the tokenizer's {vocab_size} tokens; use at most "
            f"{vocab_size} (which caches the whole distribution)."
        )


def _split_infos(splits: dict[str, Dataset], shard_size: int) -> dict[str, SplitInfo]:
    return {
        name: SplitInfo(
            num_rows=len(dataset),
            fingerprint=prepared_dataset_fingerprint(dataset),
            shard_size=shard_size,
            num_shards=math.ceil(len(dataset) / shard_size),
        )
        for name, dataset in splits.items()
    }


def _written_by(num_processes: int) -> dict[str, Any]:
    from abkd_trainer import __version__

    return {"abkd_trainer": __version__, "num_processes": num_processes}


def _prepare_writer(
    teacher_model: PreTrainedModel,
    preparer: Any,
    args: ABKDConfig,
    vocab_size: int,
    top_k: int,
    log_prob_dtype: str,
) -> _Writer:
    """The teacher in eval mode (a DeepSpeed inference engine under DeepSpeed), checked, and the
    collator of `preparer` (an `SFTTrainer` over the run's datasets), ready to write rows."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    from abkd_trainer.divergences.fused_linear import LogitTransform, default_fused_chunk_size
    from abkd_trainer.lm.models import verify_fused_logits

    teacher_model.eval()
    teacher = teacher_model
    if preparer.is_deepspeed_enabled:
        from abkd_trainer.core.distributed import prepare_deepspeed_teacher

        teacher = prepare_deepspeed_teacher(teacher_model, preparer.accelerator)
        teacher.eval()  # (DeepSpeedEngine.eval returns None)
    transform = LogitTransform.from_config(teacher_model.config)
    zero3 = is_deepspeed_zero3_enabled()
    if not zero3:
        verify_fused_logits("teacher", teacher_model, transform)
    return _Writer(
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
        zero3=zero3,
    )


def _begin_run(root: Path, manifest: TeacherCacheManifest, accelerator: Any) -> bool:
    """Check a previous run in `root` against this one and record this run's manifest.

    Returns True when `root` already holds this exact cache, complete.
    """
    manifest_path = root / MANIFEST_NAME
    if manifest_path.is_file():
        previous = TeacherCacheManifest.from_json(manifest_path.read_text())
        old, new = previous.settings(), manifest.settings()
        if previous.tokenizer_splitting is None:
            # Written before the splitting was recorded; the prepared datasets' fingerprints
            # (compared here too) show the same tokens either way.
            new["tokenizer_splitting"] = None
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
        write_atomically(manifest_path, manifest.to_json())
    accelerator.wait_for_everyone()
    return False


def _write_split(
    writer: _Writer,
    root: Path,
    split: str,
    dataset: Dataset,
    info: SplitInfo,
    accelerator: Any,
) -> None:
    """Write this process's shards of `split` (shard `s` belongs to process `s % world`)."""
    from datasets import Dataset as ArrowDataset
    from tqdm.auto import tqdm

    rank, world = accelerator.process_index, accelerator.num_processes
    rounds = math.ceil(info.num_shards / world)
    pending = [
        shard
        for shard in range(rank, info.num_shards, world)
        if not shard_dir(root, split, shard).is_dir()
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
        if writer.zero3:
            steps = int(accelerator.gather(torch.tensor([steps], device=writer.device)).max())
        columns: dict[str, list[np.ndarray]] = {name: [] for name in CACHE_COLUMNS}
        for step in range(steps):
            if step >= len(batches):
                writer.idle_forward()
                continue
            for name, values in writer.encode(batches[step]).items():
                columns[name].extend(values)
            progress.update(len(batches[step]))
        if batches:
            target = shard_dir(root, split, shard)
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
        missing = [s for s in range(info.num_shards) if not shard_dir(root, split, s).is_dir()]
        if missing:
            raise RuntimeError(f"Shards {missing} of the {split} split were not written.")
        tokens = 0
        for shard in range(info.num_shards):
            table = load_from_disk(str(shard_dir(root, split, shard))).data.column("tail_log_prob")
            tokens += int(pc.sum(pc.list_value_length(table)).as_py() or 0)
        info.num_supervised_tokens = tokens
        info.num_bytes = sum(p.stat().st_size for p in (root / split).rglob("*") if p.is_file())
    manifest.complete = True
    write_atomically(root / MANIFEST_NAME, manifest.to_json())
