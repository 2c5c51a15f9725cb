"""Offline teacher: compute its top-k log-probabilities once, then train without it.

`cache_teacher` runs a teacher over a dataset with exactly `ABKDTrainer`'s preprocessing
(it builds the same `SFTTrainer` dataset preparation and collator, so tokenisation, truncation,
packing and the supervised mask are the trainer's own) and stores, for every supervised position,
the teacher's `k` most likely token ids (int32), their raw `log_softmax` values (temperature
1; bf16 by default) and the log of the remaining mass. `ABKDTrainer` then trains from it with
`ABKDConfig(teacher_cache=...)` and no teacher model, using the divergence between the coarsened
distributions (`abkd_trainer.divergences.coarsened`).

On disk (`output_dir`):

    manifest.json                 # what was cached and how (see TeacherCacheManifest)
    train/shard-00000/ ...        # one `datasets` dataset (save_to_disk, Arrow) per shard
    eval/shard-00000/ ...         # when an evaluation split was cached

Row `i` of a split (shards concatenated in order) belongs to row `i` of the prepared dataset
`SFTTrainer` builds for that split; its columns hold the row's supervised positions in order,
flattened: `topk_ids` (`n * k` int32), `topk_log_probs` (`n * k`) and `tail_log_prob`
(`n`), the log-probabilities as bf16 bit patterns (uint16), float16 or float32.

Shards are spread over the processes of an `accelerate launch` / `torchrun` run (shard `s`
goes to process `s % world_size`), so the cache does not depend on the number of processes; a
shard is written to a temporary directory and renamed when complete, so a rerun skips the finished
shards. The teacher may be sharded with DeepSpeed ZeRO-3 (every process then runs the same number
of forward passes).

The package's modules: `manifest` (the layout and
`manifest.json`), `fingerprints` (what ties a cache to a
training run), `writer` (`cache_teacher`) and
`reader` (`TeacherCache` and training from it).
"""

from abkd_trainer.lm.teacher_cache.fingerprints import (
    SPLITTING_PROBE,
    prepared_dataset_fingerprint,
    preprocessing_settings,
    tokenizer_fingerprint,
    tokenizer_splitting,
)
from abkd_trainer.lm.teacher_cache.manifest import (
    BATCH_KEYS,
    CACHE_FORMAT_VERSION,
    DEFAULT_SHARD_SIZE,
    DEFAULT_TOP_K,
    LOG_PROB_DTYPES,
    MANIFEST_NAME,
    ROW_COLUMN,
    SplitInfo,
    TeacherCacheManifest,
)
from abkd_trainer.lm.teacher_cache.reader import (
    CachedTraining,
    TeacherCache,
    TeacherCacheCollator,
    pop_cached_teacher,
    train_from_cache,
)
from abkd_trainer.lm.teacher_cache.writer import cache_teacher

__all__ = [
    "BATCH_KEYS",
    "CACHE_FORMAT_VERSION",
    "DEFAULT_SHARD_SIZE",
    "DEFAULT_TOP_K",
    "LOG_PROB_DTYPES",
    "MANIFEST_NAME",
    "ROW_COLUMN",
    "SPLITTING_PROBE",
    "CachedTraining",
    "SplitInfo",
    "TeacherCache",
    "TeacherCacheCollator",
    "TeacherCacheManifest",
    "cache_teacher",
    "pop_cached_teacher",
    "prepared_dataset_fingerprint",
    "preprocessing_settings",
    "tokenizer_fingerprint",
    "tokenizer_splitting",
    "train_from_cache",
]
