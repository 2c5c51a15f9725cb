"""ABKDTrainer's objective, checked end to end against a from-the-formula reference.

``trainer.evaluate()`` runs dataset preparation, collation, both forwards, the shift, the mask,
the vocabulary cut and the reductions; the reference runs every sequence on its own, unpadded and
unpacked, with textbook float64 formulas. One eval batch holds the whole set, so ``eval_loss`` is
that batch's per-token mean.
"""

from __future__ import annotations

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
    reference_distillation_sums,
)

NUM_EXAMPLES = 6
REL = 1e-5


def expected_sequences(dataset_format, tokenizer):
    """Token ids and per-token target flags, built from the tokenizer alone (not the trainer)."""
    eos = [tokenizer.eos_token_id]
    sequences, targets = [], []
    if dataset_format in ("text", "packing"):
        for row in build_text_dataset(NUM_EXAMPLES)["text"]:
            ids = tokenizer(row)["input_ids"] + eos
            sequences.append(ids)
            targets.append([True] * len(ids))
    elif dataset_format == "prompt_completion":
        dataset = build_prompt_completion_dataset(NUM_EXAMPLES)
        for prompt, completion in zip(dataset["prompt"], dataset["completion"], strict=True):
            prompt_ids = tokenizer(prompt)["input_ids"]
            completion_ids = tokenizer(completion)["input_ids"] + eos
            sequences.append(prompt_ids + completion_ids)
            targets.append([False] * len(prompt_ids) + [True] * len(completion_ids))
    elif dataset_format == "conversational":
        for messages in build_conversational_dataset(NUM_EXAMPLES)["messages"]:
            encoded = tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            sequences.append(encoded["input_ids"])
            targets.append([bool(flag) for flag in encoded["assistant_masks"]])
    elif dataset_format == "conversational_prompt_completion":
        dataset = build_conversational_prompt_completion_dataset(NUM_EXAMPLES)
        for prompt, completion in zip(dataset["prompt"], dataset["completion"], strict=True):
            prompt_ids = tokenizer.apply_chat_template(
                prompt, tokenize=True, add_generation_prompt=True, return_dict=True
            )["input_ids"]
            full_ids = tokenizer.apply_chat_template(
                prompt + completion, tokenize=True, return_dict=True
            )["input_ids"]
            assert full_ids[: len(prompt_ids)] == prompt_ids
            sequences.append(full_ids)
            targets.append([False] * len(prompt_ids) + [True] * (len(full_ids) - len(prompt_ids)))
    else:
        raise ValueError(dataset_format)
    return sequences, targets


def dataset_for(dataset_format):
    if dataset_format in ("text", "packing"):
        return build_text_dataset(NUM_EXAMPLES)
    if dataset_format == "prompt_completion":
        return build_prompt_completion_dataset(NUM_EXAMPLES)
    if dataset_format == "conversational_prompt_completion":
        return build_conversational_prompt_completion_dataset(NUM_EXAMPLES)
    return build_conversational_dataset(NUM_EXAMPLES)


def format_overrides(dataset_format):
    if dataset_format == "packing":
        # Every document fits one packed row, so documents share a sequence and must not see
        # each other.
        return {"packing": True, "max_length": 512}
    if dataset_format == "conversational":
        return {"assistant_only_loss": True}
    return {}


def evaluate_against_reference(
    tmp_path,
    *,
    arch="qwen2",
    dataset_format="prompt_completion",
    student_vocab_size=None,
    teacher_vocab_size=None,
    reference_params=None,
    **overrides,
):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher(
        arch,
        tokenizer,
        student_vocab_size=student_vocab_size,
        teacher_vocab_size=teacher_vocab_size,
    )
    dataset = dataset_for(dataset_format)
    trainer = build_abkd_trainer(
        tmp_path,
        tokenizer=tokenizer,
        student=student,
        teacher=teacher,
        train_dataset=dataset,
        eval_dataset=dataset,
        per_device_eval_batch_size=NUM_EXAMPLES,
        **{**format_overrides(dataset_format), **overrides},
    )
    metrics = trainer.evaluate()
    sequences, targets = expected_sequences(dataset_format, tokenizer)
    reference = reference_distillation_sums(
        student,
        teacher,
        sequences,
        targets,
        vocab_size=len(tokenizer),
        divergence=trainer.args.divergence,
        **(reference_params or {"alpha": trainer.args.alpha, "beta": trainer.args.beta}),
    )
    return trainer, metrics, reference


@pytest.mark.parametrize(
    ("arch", "dataset_format"),
    [
        ("qwen2", "text"),
        ("qwen2", "prompt_completion"),
        ("qwen2", "conversational"),
        ("qwen2", "conversational_prompt_completion"),
        ("qwen2", "packing"),
        ("llama", "prompt_completion"),
        ("llama", "packing"),
        ("gpt2", "prompt_completion"),
        ("gpt2", "packing"),
    ],
)
def test_eval_loss_and_metrics_match_the_reference(tmp_path, arch, dataset_format):
    _, metrics, reference = evaluate_against_reference(
        tmp_path, arch=arch, dataset_format=dataset_format
    )
    count = reference["count"]
    expected_kd = reference["kd"] / count
    assert expected_kd > 1e-3  # a peaked teacher and a random student really disagree
    assert metrics["eval_loss"] == pytest.approx(expected_kd, rel=REL)
    assert metrics["eval_kd_loss"] == pytest.approx(expected_kd, rel=REL)
    assert metrics["eval_ce_loss"] == pytest.approx(reference["ce"] / count, rel=REL)
    assert metrics["eval_teacher_agreement"] == pytest.approx(reference["agree"] / count, abs=1e-9)
    assert (metrics["eval_alpha"], metrics["eval_beta"]) == (0.2, 0.7)


def test_completion_only_and_assistant_only_supervise_fewer_tokens():
    # Guards the reference itself: the formats above must really differ in what they supervise.
    tokenizer = build_tiny_tokenizer()
    for dataset_format in (
        "prompt_completion",
        "conversational",
        "conversational_prompt_completion",
    ):
        sequences, targets = expected_sequences(dataset_format, tokenizer)
        for ids, flags in zip(sequences, targets, strict=True):
            assert 0 < sum(flags) < len(ids) - 5
            assert not any(flags[:5]), "the prompt / system turn must not be supervised"
    sequences, targets = expected_sequences("conversational", tokenizer)
    supervised = [token for token, flag in zip(sequences[0], targets[0], strict=True) if flag]
    supervised_text = tokenizer.decode(supervised)
    assert supervised_text == "Blue.<|im_end|>"


@pytest.mark.parametrize(
    ("student_vocab_size", "teacher_vocab_size"), [(None, 272), (280, None), (264, 300)]
)
def test_padded_vocabulary_rows_do_not_change_the_loss(
    tmp_path, student_vocab_size, teacher_vocab_size
):
    trainer, metrics, reference = evaluate_against_reference(
        tmp_path, student_vocab_size=student_vocab_size, teacher_vocab_size=teacher_vocab_size
    )
    assert metrics["eval_kd_loss"] == pytest.approx(reference["kd"] / reference["count"], rel=REL)
    # Make the padded rows dominate every softmax they take part in: the loss must not move.
    real_vocab = len(trainer.processing_class)
    for model in (trainer.model, trainer.teacher_model):
        with torch.no_grad():
            head = model.get_output_embeddings()
            head.weight[real_vocab:] = 5.0 * head.weight[:real_vocab].abs().max()
            if getattr(head, "bias", None) is not None:
                head.bias[real_vocab:] = 100.0
    assert trainer.evaluate()["eval_kd_loss"] == pytest.approx(metrics["eval_kd_loss"], rel=REL)


def test_kd_ratio_zero_is_the_students_cross_entropy(tmp_path):
    trainer, metrics, reference = evaluate_against_reference(tmp_path, kd_ratio=0.0)
    assert metrics["eval_loss"] == pytest.approx(reference["ce"] / reference["count"], rel=REL)
    # The reference cross-entropy agrees with transformers' own causal-LM loss.
    tokenizer = trainer.processing_class
    prompt_ids = tokenizer("Name a colour.")["input_ids"]
    completion_ids = tokenizer(" Blue.")["input_ids"] + [tokenizer.eos_token_id]
    input_ids = torch.tensor([prompt_ids + completion_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + completion_ids])
    with torch.no_grad():
        hf_loss = trainer.model(input_ids=input_ids, labels=labels).loss.item()
    single = reference_distillation_sums(
        trainer.model,
        trainer.teacher_model,
        [input_ids[0].tolist()],
        [[label != -100 for label in labels[0].tolist()]],
        vocab_size=len(tokenizer),
    )
    assert hf_loss == pytest.approx(single["ce"] / single["count"], rel=REL)


def test_kd_ratio_mixes_divergence_and_cross_entropy(tmp_path):
    _, metrics, reference = evaluate_against_reference(tmp_path, kd_ratio=0.25)
    count = reference["count"]
    expected = 0.25 * reference["kd"] / count + 0.75 * reference["ce"] / count
    assert metrics["eval_loss"] == pytest.approx(expected, rel=REL)
    # The logs keep the two parts apart.
    assert metrics["eval_kd_loss"] == pytest.approx(reference["kd"] / count, rel=REL)
    assert metrics["eval_ce_loss"] == pytest.approx(reference["ce"] / count, rel=REL)


def test_temperature_divides_both_logit_sets(tmp_path):
    _, metrics, reference = evaluate_against_reference(
        tmp_path, temperature=2.0, reference_params={"alpha": 0.2, "beta": 0.7, "temperature": 2.0}
    )
    assert metrics["eval_kd_loss"] == pytest.approx(reference["kd"] / reference["count"], rel=REL)


def test_other_divergences_are_used_when_named(tmp_path):
    _, metrics, reference = evaluate_against_reference(
        tmp_path, divergence="fkl", reference_params={}
    )
    assert metrics["eval_kd_loss"] == pytest.approx(reference["kd"] / reference["count"], rel=REL)
    assert "eval_alpha" not in metrics  # alpha and beta belong to the AB-divergence


def test_chunked_loss_gives_the_same_value(tmp_path):
    _, metrics, reference = evaluate_against_reference(tmp_path, loss_chunk_size=3)
    assert metrics["eval_kd_loss"] == pytest.approx(reference["kd"] / reference["count"], rel=REL)


def test_a_micro_batch_without_supervised_tokens_gives_a_zero_loss_with_a_graph(tmp_path):
    trainer = build_abkd_trainer(tmp_path)
    tokenizer = trainer.processing_class
    input_ids = torch.tensor([tokenizer("Nothing to learn here.")["input_ids"]])
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": torch.full_like(input_ids, -100),
    }
    trainer.model.train()
    for num_items in (None, torch.tensor(0), torch.tensor(7)):
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=num_items)
        assert loss.item() == 0.0
        assert loss.requires_grad
        loss.backward()
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        assert grads, "the zero loss must stay connected to the student's parameters"
        assert all(torch.all(g == 0) for g in grads)


def test_only_the_student_receives_gradients(tmp_path):
    trainer = build_abkd_trainer(tmp_path)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.parameters())
    assert all(p.grad is None for p in trainer.teacher_model.parameters())


def test_alpha_and_beta_follow_their_schedule(tmp_path):
    trainer = build_abkd_trainer(
        tmp_path,
        max_steps=4,
        alpha=0.2,
        alpha_end=1.0,
        beta=0.7,
        beta_end=0.3,
        ab_warmup_ratio=0.0,  # the linear schedule alone (tests/test_schedules.py: with warm-up)
    )
    trainer.train()
    history = [log for log in trainer.state.log_history if "alpha" in log]
    # Step k trains with the value at global_step k - 1.
    assert [log["alpha"] for log in history] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert [log["beta"] for log in history] == pytest.approx([0.7, 0.6, 0.5, 0.4])
    # After training the schedule sits at its end values, and the loss uses them.
    metrics = trainer.evaluate(build_prompt_completion_dataset(NUM_EXAMPLES))
    assert (metrics["eval_alpha"], metrics["eval_beta"]) == pytest.approx((1.0, 0.3))
    tokenizer = trainer.processing_class
    sequences, targets = expected_sequences("prompt_completion", tokenizer)
    reference = reference_distillation_sums(
        trainer.model,
        trainer.teacher_model,
        sequences,
        targets,
        vocab_size=len(tokenizer),
        alpha=1.0,
        beta=0.3,
    )
    assert metrics["eval_kd_loss"] == pytest.approx(reference["kd"] / reference["count"], rel=REL)
