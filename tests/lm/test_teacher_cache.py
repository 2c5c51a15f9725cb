"""The teacher cache's building blocks: fingerprints, the manifest, storage dtypes."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from testing_utils import build_prompt_completion_dataset, build_student_and_teacher
from transformers import AutoTokenizer

from abkd_trainer import ABKDConfig
from abkd_trainer.lm.teacher_cache import (
    LOG_PROB_DTYPES,
    SPLITTING_PROBE,
    TeacherCache,
    TeacherCacheManifest,
    cache_teacher,
    prepared_dataset_fingerprint,
    tokenizer_fingerprint,
    tokenizer_splitting,
)


def _prepared(input_ids, labels, seq_lengths=None):
    columns = {"input_ids": input_ids, "labels": labels}
    if seq_lengths is not None:
        columns["seq_lengths"] = seq_lengths
    return Dataset.from_dict(columns)


def test_dataset_fingerprint_sees_tokens_masks_row_boundaries_and_packing():
    base = _prepared([[1, 2], [3]], [[1, -100], [3]], [[1, 1], [1]])
    variants = [
        _prepared([[1, 2], [4]], [[1, -100], [4]], [[1, 1], [1]]),  # a token
        _prepared([[1, 2], [3]], [[1, 2], [3]], [[1, 1], [1]]),  # the loss mask
        _prepared([[1], [2, 3]], [[1], [-100, 3]], [[1], [1, 1]]),  # where rows split
        _prepared([[1, 2], [3]], [[1, -100], [3]], [[2], [1]]),  # packed document lengths
        _prepared([[3], [1, 2]], [[3], [1, -100]], [[1], [1, 1]]),  # row order
    ]
    fingerprint = prepared_dataset_fingerprint(base)
    assert fingerprint == prepared_dataset_fingerprint(base.select([0, 1]))  # content, not object
    assert fingerprint == prepared_dataset_fingerprint(base, batch_size=1)
    for variant in variants:
        assert prepared_dataset_fingerprint(variant) != fingerprint


def test_tokenizer_fingerprint_sees_the_chat_template(tiny_tokenizer):
    fingerprint = tokenizer_fingerprint(tiny_tokenizer)
    tiny_tokenizer.chat_template = tiny_tokenizer.chat_template.replace("<|im_end|>", "\n", 1)
    assert tokenizer_fingerprint(tiny_tokenizer) != fingerprint


def as_tokenizer_class(tokenizer, class_name, directory):
    """`tokenizer` saved to `directory` and loaded back as `class_name` (same tokenizer.json)."""
    tokenizer.save_pretrained(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = class_name
    config_path.write_text(json.dumps(config))
    return AutoTokenizer.from_pretrained(directory)


def test_tokenizer_splitting_sees_how_text_is_split_with_the_same_vocabulary(
    tmp_path, tiny_tokenizer
):
    splitting = tokenizer_splitting(tiny_tokenizer)
    # Saved and loaded again as its own class: the same behaviour, the same digests.
    reloaded = as_tokenizer_class(tiny_tokenizer, type(tiny_tokenizer).__name__, tmp_path / "a")
    assert tokenizer_splitting(reloaded) == splitting
    # The same tokenizer.json loaded as Qwen2's class: Qwen2 builds its own normalizer (NFC) and
    # pre-tokenizer. The vocabulary, template and special tokens agree; the splitting does not.
    qwen = as_tokenizer_class(tiny_tokenizer, "Qwen2Tokenizer", tmp_path / "b")
    assert tokenizer_fingerprint(qwen) == tokenizer_fingerprint(tiny_tokenizer)
    qwen_splitting = tokenizer_splitting(qwen)
    assert qwen_splitting["normalizer"] != splitting["normalizer"]
    assert qwen_splitting["pre_tokenizer"] != splitting["pre_tokenizer"]
    # NFC composes the probe's decomposed accent: the probe's ids differ too.
    assert qwen(SPLITTING_PROBE)["input_ids"] != tiny_tokenizer(SPLITTING_PROBE)["input_ids"]
    assert qwen_splitting["probe"] != splitting["probe"]


def test_manifest_of_an_older_or_newer_version_reads(tmp_path):
    manifest = TeacherCacheManifest(
        teacher="t", tokenizer_fingerprint="f", vocab_size=3, top_k=2, log_prob_dtype="float32",
        preprocessing={}, splits={},
    )  # fmt: skip
    data = json.loads(manifest.to_json())
    del data["tokenizer_splitting"], data["tokenizer_class"]  # written before they existed
    older = TeacherCacheManifest.from_json(json.dumps(data))
    assert older.tokenizer_splitting is None and older == manifest
    data["field_of_a_later_version"] = 1
    assert TeacherCacheManifest.from_json(json.dumps(data)) == manifest


@pytest.mark.parametrize("dtype", sorted(LOG_PROB_DTYPES))
def test_stored_log_probs_round_to_the_storage_dtype(tmp_path, tiny_tokenizer, dtype):
    _, teacher = build_student_and_teacher("qwen2", tiny_tokenizer)
    args = ABKDConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    path = cache_teacher(teacher, args, build_prompt_completion_dataset(4), tiny_tokenizer,
                         top_k=5, log_prob_dtype=dtype, shard_size=2)  # fmt: skip
    cache = TeacherCache(path)
    assert cache.manifest == TeacherCacheManifest.from_json(cache.manifest.to_json())
    rows = cache.rows(range(4))
    storage = LOG_PROB_DTYPES[dtype][1]
    # Decoded values are exactly representable in the storage dtype, sorted, and below 0.
    assert torch.equal(rows.topk_log_probs, rows.topk_log_probs.to(storage).float())
    assert bool((rows.topk_log_probs.diff(dim=-1) <= 0).all())
    assert bool((rows.tail_log_prob < 0).all()) and rows.topk_ids.dtype == torch.int64
    total = torch.cat([rows.topk_log_probs, rows.tail_log_prob[:, None]], -1).exp().sum(-1)
    torch.testing.assert_close(total, torch.ones_like(total), rtol=0, atol=2e-2)


def test_invalid_arguments_are_refused(tmp_path, tiny_tokenizer):
    _, teacher = build_student_and_teacher("qwen2", tiny_tokenizer)
    args = ABKDConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    dataset = build_prompt_completion_dataset(2)
    with pytest.raises(ValueError, match="top_k=1000"):
        cache_teacher(teacher, args, dataset, tiny_tokenizer, top_k=1000)
    with pytest.raises(ValueError, match="log_prob_dtype"):
        cache_teacher(teacher, args, dataset, tiny_tokenizer, log_prob_dtype="int8")
    with pytest.raises(ValueError, match="shard_size"):
        cache_teacher(teacher, args, dataset, tiny_tokenizer, shard_size=0)
