"""ABKDTrainer from an offline teacher cache (issue 13).

Promises: with k = V the cache reproduces the live teacher's losses and gradients (1e-5) on every
dataset format and both loss paths; with k < V the loss is the coarsened divergence (float64
reference); training never loads a teacher; a cache that does not match the run is refused.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from testing_utils import (
    build_abkd_trainer,
    build_conversational_dataset,
    build_conversational_prompt_completion_dataset,
    build_prompt_completion_dataset,
    build_student_and_teacher,
    build_text_dataset,
    build_tiny_tokenizer,
    cpu_training_kwargs,
    reference_token_divergence,
)
from transformers import AutoTokenizer

from abkd_trainer import ABKDConfig, ABKDTrainer
from abkd_trainer.lm.teacher_cache import MANIFEST_NAME, TeacherCache, cache_teacher

RTOL = ATOL = 1e-5
FORMATS = {
    "text": (build_text_dataset, {}),
    "prompt_completion": (build_prompt_completion_dataset, {}),
    "conversational_assistant_only": (build_conversational_dataset, {"assistant_only_loss": True}),
    "conversational_prompt_completion": (build_conversational_prompt_completion_dataset, {}),
    "packing": (build_text_dataset, {"packing": True, "max_length": 64}),
}


def _config(output_dir, **overrides) -> ABKDConfig:
    settings = {
        **cpu_training_kwargs(),
        "output_dir": str(output_dir),
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 3,
        "max_steps": 3,
        "logging_steps": 1,
        "learning_rate": 1e-3,
        **overrides,
    }
    return ABKDConfig(**settings)


def _write_cache(directory, teacher, tokenizer, dataset, *, k, dtype="float32", eval_dataset=None,
                 **overrides):  # fmt: skip
    args = _config(directory, **overrides)
    return cache_teacher(
        teacher, args, dataset, tokenizer, eval_dataset,
        top_k=k, log_prob_dtype=dtype, shard_size=3,
    )  # fmt: skip


def _cached_trainer(output_dir, cache, student, tokenizer, dataset, eval_dataset=None, **overrides):
    return ABKDTrainer(
        model=student,
        args=_config(output_dir, teacher_cache=str(cache), **overrides),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )


def _first_batch_loss_and_grads(trainer, rows=(0, 1, 2)):
    """Loss and student gradients of one fixed batch (prepared rows ``rows``) through
    ``compute_loss``, as a training step computes them."""
    examples = [trainer.train_dataset[i] for i in rows]
    inputs = trainer._prepare_inputs(trainer.data_collator(examples))
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in trainer.model.named_parameters()}
    return loss.detach(), grads


@pytest.mark.parametrize("use_fused_loss", [True, False], ids=["fused", "logits"])
@pytest.mark.parametrize("dataset_format", sorted(FORMATS))
def test_full_vocabulary_cache_equals_the_live_teacher(tmp_path, dataset_format, use_fused_loss):
    build_dataset, overrides = FORMATS[dataset_format]
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("qwen2", tokenizer)
    dataset = build_dataset(8)
    cache = _write_cache(tmp_path / "cache", teacher, tokenizer, dataset, k=len(tokenizer),
                         **overrides)  # fmt: skip
    settings = {"use_fused_loss": use_fused_loss, "kd_ratio": 0.8, **overrides}

    live = build_abkd_trainer(
        tmp_path / "live", tokenizer=tokenizer, student=copy.deepcopy(student), teacher=teacher,
        train_dataset=dataset, per_device_eval_batch_size=3, max_steps=3, **settings,
    )  # fmt: skip
    cached = _cached_trainer(
        tmp_path / "cached", cache, copy.deepcopy(student), tokenizer, dataset, **settings
    )
    assert cached.teacher_model is None

    live_loss, live_grads = _first_batch_loss_and_grads(live)
    cached_loss, cached_grads = _first_batch_loss_and_grads(cached)
    torch.testing.assert_close(cached_loss, live_loss, rtol=RTOL, atol=ATOL)
    for name, grad in live_grads.items():
        torch.testing.assert_close(cached_grads[name], grad, rtol=RTOL, atol=ATOL, msg=name)

    # A short training run follows the same trajectory (losses, metrics, gradient norms).
    live.model.zero_grad()
    cached.model.zero_grad()
    live.train()
    cached.train()
    keys = ("loss", "kd_loss", "ce_loss", "teacher_agreement", "grad_norm", "student_entropy",
            "teacher_entropy", "mean_token_accuracy")  # fmt: skip
    live_logs = [log for log in live.state.log_history if "kd_loss" in log]
    cached_logs = [log for log in cached.state.log_history if "kd_loss" in log]
    assert len(live_logs) == len(cached_logs) == 3
    for live_log, cached_log in zip(live_logs, cached_logs, strict=True):
        for key in keys:
            assert cached_log[key] == pytest.approx(live_log[key], rel=RTOL, abs=ATOL), key


@pytest.mark.parametrize("use_fused_loss", [True, False], ids=["fused", "logits"])
def test_top_k_cache_loss_is_the_coarsened_divergence(tmp_path, use_fused_loss):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("qwen2", tokenizer)
    dataset = build_prompt_completion_dataset(6)
    k = 8
    cache = _write_cache(tmp_path / "cache", teacher, tokenizer, dataset, k=k)
    trainer = _cached_trainer(
        tmp_path / "run", cache, student, tokenizer, dataset, use_fused_loss=use_fused_loss,
        alpha=0.3, beta=0.6, temperature=1.5,
    )  # fmt: skip
    examples = [trainer.train_dataset[i] for i in range(4)]
    inputs = trainer._prepare_inputs(trainer.data_collator(examples))
    targets = torch.nn.functional.pad(inputs["labels"][:, 1:], (0, 1), value=-100)
    supervised = targets != -100
    with torch.no_grad():
        model_inputs = {k: v for k, v in inputs.items() if k.startswith(("input_ids", "attention"))}
        student_logits = student(**model_inputs).logits[supervised].double()
        teacher_logits = teacher(**model_inputs).logits[supervised].double()
        # Independent coarsening: the teacher's float64 top-k, probabilities summed in float64.
        ids = teacher_logits.topk(k, dim=-1).indices
        buckets = []
        for logits in (student_logits, teacher_logits):
            probs = logits.softmax(-1)
            picked = probs.gather(-1, ids)
            buckets.append(torch.cat([picked, 1 - picked.sum(-1, keepdim=True)], -1).log())
        expected = reference_token_divergence(
            buckets[1], buckets[0], "ab", alpha=0.3, beta=0.6, temperature=1.5
        ).mean()
    assert torch.equal(inputs["teacher_topk_ids"], ids)
    loss = trainer.compute_loss(trainer.model, inputs)
    assert loss.item() == pytest.approx(expected.item(), rel=RTOL)


def test_training_never_loads_the_teacher(tmp_path):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("qwen2", tokenizer)
    teacher_dir = tmp_path / "teacher"
    teacher.save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    dataset = build_text_dataset(6)
    cache = _write_cache(tmp_path / "cache", str(teacher_dir), tokenizer, dataset, k=16,
                         dtype="bfloat16")  # fmt: skip
    shutil.rmtree(teacher_dir)

    trainer = _cached_trainer(tmp_path / "run", cache, student, tokenizer, dataset)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "kd_loss" in log]
    assert len(logs) == 3 and all(log["kd_loss"] > 0 for log in logs)
    manifest = json.loads((cache / MANIFEST_NAME).read_text())
    assert manifest["teacher"] == str(teacher_dir) and manifest["top_k"] == 16
    assert manifest["splits"]["train"]["num_supervised_tokens"] > 0
    trainer.save_model()
    card = (tmp_path / "run" / "README.md").read_text()
    assert teacher_dir.name in card


@pytest.fixture
def written_cache(tmp_path):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("qwen2", tokenizer)
    dataset = build_prompt_completion_dataset(6)
    cache = _write_cache(tmp_path / "cache", teacher, tokenizer, dataset, k=4, max_length=64)
    return cache, student, teacher, tokenizer, dataset


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_length": 32}, "max_length=64.*max_length=32"),
        ({"completion_only_loss": False}, "completion_only_loss"),
        (
            {"dataset": build_prompt_completion_dataset(5)},
            "does not match the train data.* or a tokenizer that splits text differently",
        ),
        ({"tokenizer": build_tiny_tokenizer(extra_special_tokens=["<x>"])}, "another tokenizer"),
        ({"eval_dataset": build_prompt_completion_dataset(3)}, "not 'eval'"),
    ],
    ids=["max_length", "loss_mask", "dataset", "tokenizer", "uncached_eval_split"],
)
def test_mismatched_cache_is_refused(tmp_path, written_cache, change, message):
    cache, student, _, tokenizer, dataset = written_cache
    change = dict(change)
    tokenizer = change.pop("tokenizer", tokenizer)
    dataset = change.pop("dataset", dataset)
    eval_dataset = change.pop("eval_dataset", None)
    with pytest.raises(ValueError, match=message):
        _cached_trainer(
            tmp_path / "run", cache, student, tokenizer, dataset, eval_dataset,
            max_length=change.pop("max_length", 64), eval_strategy="no", **change,
        )  # fmt: skip


def test_a_tokenizer_that_splits_text_differently_is_refused_by_name(tmp_path, written_cache):
    cache, student, _, tokenizer, dataset = written_cache
    # The cache's tokenizer.json loaded as Qwen2's tokenizer class, which builds its own
    # normalizer (NFC) and pre-tokenizer: the same vocabulary, chat template and special tokens.
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    config_path = tmp_path / "tokenizer" / "tokenizer_config.json"
    config_path.write_text(
        json.dumps({**json.loads(config_path.read_text()), "tokenizer_class": "Qwen2Tokenizer"})
    )
    other_class = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert other_class.get_vocab() == tokenizer.get_vocab()
    # This ASCII data even tokenizes alike, so the prepared datasets' fingerprints agree: only
    # the tokenizer's own fingerprint can tell.
    prepared = _cached_trainer(tmp_path / "ok", cache, student, tokenizer, dataset, max_length=64)
    assert (
        other_class(dataset[0]["prompt"])["input_ids"]
        == tokenizer(dataset[0]["prompt"])["input_ids"]
    )
    with pytest.raises(ValueError, match="splits text differently.*normalizer.*Qwen2Tokenizer"):
        _cached_trainer(tmp_path / "run", cache, student, other_class, dataset, max_length=64)
    assert prepared.teacher_cache is not None


def test_a_cache_without_the_splitting_fingerprint_still_trains(tmp_path, written_cache):
    cache, student, _, tokenizer, dataset = written_cache
    manifest = json.loads((cache / MANIFEST_NAME).read_text())
    del manifest["tokenizer_splitting"], manifest["tokenizer_class"]  # an older writer's manifest
    (cache / MANIFEST_NAME).write_text(json.dumps(manifest))
    trainer = _cached_trainer(tmp_path / "run", cache, student, tokenizer, dataset, max_length=64)
    trainer.train()
    assert trainer.state.global_step == 3


def test_incomplete_cache_and_conflicting_teacher_are_refused(tmp_path, written_cache):
    cache, student, teacher, tokenizer, dataset = written_cache
    with pytest.raises(ValueError, match="not both"):
        _config(tmp_path, teacher_cache=str(cache), teacher_model_name_or_path="t")
    with pytest.raises(ValueError, match="no `teacher_model`"):
        ABKDTrainer(model=student, teacher_model=teacher, args=_config(tmp_path / "run",
                    teacher_cache=str(cache), max_length=64), train_dataset=dataset,
                    processing_class=tokenizer)  # fmt: skip
    manifest = json.loads((cache / MANIFEST_NAME).read_text())
    manifest["complete"] = False
    (cache / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="incomplete"):
        TeacherCache(cache)
    with pytest.raises(FileNotFoundError, match="abkd-cache-teacher"):
        TeacherCache(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "on_policy",
    [{"lmbda": 0.5}, {"seq_kd": True}, {"on_policy_schedule": "adaptive"}],
    ids=["lmbda", "seq_kd", "adaptive"],  # adaptive starts at lmbda = 0, then rises
)
def test_on_policy_settings_are_refused(tmp_path, on_policy):
    settings = {**cpu_training_kwargs(), "output_dir": str(tmp_path), "teacher_cache": "c"}
    ABKDConfig(**settings)  # off-policy: fine
    with pytest.raises(ValueError, match="on-policy / sequence-level"):
        ABKDConfig(**settings, **on_policy)


def test_evaluation_split_and_resume(tmp_path):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("qwen2", tokenizer)
    dataset, eval_dataset = build_prompt_completion_dataset(8), build_prompt_completion_dataset(4)
    cache = _write_cache(tmp_path / "cache", teacher, tokenizer, dataset, k=len(tokenizer),
                         eval_dataset=eval_dataset, eval_strategy="steps")  # fmt: skip
    reference = TeacherCache(cache)
    expected = reference.rows(range(12))

    # An interrupted run: one shard missing, the manifest not marked complete. The rerun
    # rewrites only that shard.
    manifest = json.loads((cache / MANIFEST_NAME).read_text())
    manifest["complete"] = False
    (cache / MANIFEST_NAME).write_text(json.dumps(manifest))
    shutil.rmtree(cache / "train" / "shard-00001")
    kept = (cache / "train" / "shard-00000" / "state.json").stat().st_mtime_ns
    _write_cache(tmp_path / "cache", teacher, tokenizer, dataset, k=len(tokenizer),
                 eval_dataset=eval_dataset, eval_strategy="steps")  # fmt: skip
    assert (cache / "train" / "shard-00000" / "state.json").stat().st_mtime_ns == kept
    resumed = TeacherCache(cache).rows(range(12))
    assert torch.equal(resumed.topk_ids, expected.topk_ids)
    assert torch.equal(resumed.topk_log_probs, expected.topk_log_probs)

    live = build_abkd_trainer(
        tmp_path / "live", tokenizer=tokenizer, student=copy.deepcopy(student), teacher=teacher,
        train_dataset=dataset, eval_dataset=eval_dataset, per_device_eval_batch_size=3,
        eval_strategy="steps",
    )  # fmt: skip
    cached = _cached_trainer(tmp_path / "run", cache, copy.deepcopy(student), tokenizer, dataset,
                             eval_dataset, eval_strategy="steps")  # fmt: skip
    live_metrics, cached_metrics = live.evaluate(), cached.evaluate()
    for key in ("eval_loss", "eval_kd_loss", "eval_teacher_agreement"):
        assert cached_metrics[key] == pytest.approx(live_metrics[key], rel=RTOL), key

    # Writing into a directory that holds a cache of other settings is refused.
    with pytest.raises(ValueError, match="other settings"):
        _write_cache(tmp_path / "cache", teacher, tokenizer, dataset, k=3)
