"""The classifier loss contract, against a float64 reference built from textbook formulas.

`loss = sum_i [ce_weight * CE(z_S_i, y_i) + kd_weight * D(p_T_i || q_S_i)] / N` over the counted
examples (`labels != -100`), `p_T`, `q_S` the softmaxes at `temperature` (after a z-score per row
with `logit_standardization`), no `T**2`; its gradient; the (alpha, beta) warm-up; and one
optimizer step on 8 examples at once equal to 4 accumulated micro-batches of 2.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from classifier_factories import (
    build_bert_classifier,
    build_image_dataset,
    build_resnet_classifier,
    build_reversed_byte_tokenizer,
    build_text_classification_dataset,
    build_vit_classifier,
    classifier_training_kwargs,
)
from testing_utils import build_tiny_tokenizer, reference_token_divergence

from abkd_trainer import ABKDClassifierConfig, ABKDClassifierTrainer

# fp32 trainer against a float64 reference: the models' own fp32 rounding dominates.
LOSS_RTOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 2e-4, 1e-6


def reference_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    divergence: str,
    alpha: float,
    beta: float,
    temperature: float,
    kd_weight: float,
    ce_weight: float,
    standardize: bool = False,
) -> torch.Tensor:
    """The loss contract in float64, from `(B, C)` logits and `(B,)` labels."""
    counted = labels != -100
    student, teacher = student_logits[counted].double(), teacher_logits[counted].double()

    def zscore(logits):
        mean, std = logits.mean(-1, keepdim=True), logits.std(-1, keepdim=True)
        return (logits - mean) / (std + 1e-7)

    kd = reference_token_divergence(
        zscore(teacher) if standardize else teacher,
        zscore(student) if standardize else student,
        divergence,
        alpha=alpha,
        beta=beta,
        temperature=temperature,
    )
    ce = -student.log_softmax(-1).gather(-1, labels[counted, None]).squeeze(-1)
    return (kd_weight * kd + ce_weight * ce).sum() / counted.sum()


def student_gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.double() for name, p in model.named_parameters() if p.grad is not None}


def check_loss_and_gradient(trainer, batch, student_inputs, teacher_inputs, settings):
    """The trainer's fp32 loss and student gradient against the float64 reference."""
    student64 = copy.deepcopy(trainer.model).double().train()
    teacher64 = copy.deepcopy(trainer.teacher_model).double().eval()
    trainer.model.train()
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()

    student_logits = student64(
        **{k: v.double() if v.is_floating_point() else v for k, v in student_inputs.items()}
    ).logits
    with torch.no_grad():
        teacher_logits = teacher64(
            **{k: v.double() if v.is_floating_point() else v for k, v in teacher_inputs.items()}
        ).logits
    expected = reference_loss(student_logits, teacher_logits, batch["labels"], **settings)
    expected.backward()

    torch.testing.assert_close(loss.double(), expected.detach(), rtol=LOSS_RTOL, atol=0.0)
    actual_grads, expected_grads = student_gradients(trainer.model), student_gradients(student64)
    assert actual_grads.keys() == expected_grads.keys() and actual_grads
    for name, grad in expected_grads.items():
        torch.testing.assert_close(
            actual_grads[name],
            grad,
            rtol=GRAD_RTOL,
            atol=GRAD_ATOL,
            msg=lambda m, name=name: f"{name}: {m}",
        )


def image_trainer(tmp_path, **config):
    return ABKDClassifierTrainer(
        model=build_resnet_classifier(),
        teacher_model=build_vit_classifier(),
        args=ABKDClassifierConfig(**classifier_training_kwargs(tmp_path, **config)),
        train_dataset=build_image_dataset(8),
    )


def loss_settings(args: ABKDClassifierConfig) -> dict:
    return {
        "divergence": args.divergence,
        "alpha": args.alpha,
        "beta": args.beta,
        "temperature": args.temperature,
        "kd_weight": args.kd_weight,
        "ce_weight": args.ce_weight,
        "standardize": args.logit_standardization,
    }


@pytest.mark.parametrize(
    "config",
    [
        {},  # the defaults: AB (0.8, 0.3), T = 4, kd_weight = ce_weight = 1
        {"divergence": "fkl", "temperature": 2.0, "kd_weight": 3.0, "ce_weight": 0.25},
        {"logit_standardization": True, "alpha": 0.5, "beta": 0.6, "temperature": 2.0},
        {"ce_weight": 0.0, "temperature": 1.0},
    ],
    ids=["ab-defaults", "fkl-weighted", "ablsd", "kd-only"],
)
def test_image_classifier_loss_and_gradient_match_float64(tmp_path, config):
    # ViT teacher, ResNet student (batch norm in train mode: the reference runs the same batch).
    trainer = image_trainer(tmp_path, **config)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    batch["labels"][[1, 6]] = -100  # not counted
    inputs = {"pixel_values": batch["pixel_values"]}
    check_loss_and_gradient(trainer, batch, inputs, inputs, loss_settings(trainer.args))


def test_text_classifier_with_its_own_teacher_tokenizer_matches_float64(tmp_path):
    tokenizer, teacher_tokenizer = build_tiny_tokenizer(), build_reversed_byte_tokenizer()
    student_rows = build_text_classification_dataset(tokenizer, 6)
    teacher_rows = build_text_classification_dataset(teacher_tokenizer, 6, prefix="teacher_")
    dataset = student_rows.add_column("teacher_input_ids", teacher_rows["teacher_input_ids"])
    dataset = dataset.add_column("teacher_attention_mask", teacher_rows["teacher_attention_mask"])
    student = build_bert_classifier(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    teacher = build_bert_classifier(
        vocab_size=len(teacher_tokenizer),
        pad_token_id=teacher_tokenizer.pad_token_id,
        hidden_size=48,
        seed=3,
        initializer_range=0.5,
    )
    trainer = ABKDClassifierTrainer(
        model=student,
        teacher_model=teacher,
        args=ABKDClassifierConfig(
            **classifier_training_kwargs(
                tmp_path, disable_dropout=True, remove_unused_columns=False
            )
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
        teacher_processing_class=teacher_tokenizer,
    )
    batch = trainer.data_collator([dataset[i] for i in range(6)])
    # Each model got its own ids, padded with its own tokenizer.
    assert not torch.equal(batch["input_ids"][:, :3], batch["teacher_input_ids"][:, :3])
    assert (batch["teacher_input_ids"][batch["teacher_attention_mask"] == 0] == 256).all()
    batch["labels"][2] = -100
    student_inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    teacher_inputs = {
        "input_ids": batch["teacher_input_ids"],
        "attention_mask": batch["teacher_attention_mask"],
    }
    check_loss_and_gradient(
        trainer, batch, student_inputs, teacher_inputs, loss_settings(trainer.args)
    )


def test_hinton_kd_is_fkl_with_kd_weight_lambda_t_squared(tmp_path):
    # The transformers guide's ImageDistilTrainer: (1 - lambda) CE + lambda T^2 KLDiv(batchmean).
    lam, temperature = 0.5, 5.0
    trainer = image_trainer(
        tmp_path,
        divergence="fkl",
        temperature=temperature,
        kd_weight=lam * temperature**2,
        ce_weight=1 - lam,
        logit_standardization=False,  # the guide's KD is on raw logits
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
    trainer.model.eval()  # deterministic batch norm, so that both sides see the same logits
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        student = trainer.model(pixel_values=batch["pixel_values"]).logits.double()
        teacher = trainer.teacher_model(pixel_values=batch["pixel_values"]).logits.double()
    kl = F.kl_div(
        F.log_softmax(student / temperature, -1),
        F.softmax(teacher / temperature, -1),
        reduction="batchmean",
    )
    guide = (1 - lam) * F.cross_entropy(student, batch["labels"]) + lam * temperature**2 * kl
    torch.testing.assert_close(loss.double(), guide, rtol=1e-5, atol=0.0)


def test_ab_warmup_moves_alpha_beta_from_forward_kl_and_logs_them(tmp_path):
    trainer = image_trainer(
        tmp_path,
        alpha=0.8,
        beta=0.3,
        ab_warmup_ratio=1.0,
        max_steps=4,
        per_device_train_batch_size=2,
    )
    trainer.train()
    logged = [[log["alpha"], log["beta"]] for log in trainer.state.log_history if "alpha" in log]
    # Each step's loss uses the (alpha, beta) of the step it computes (0-based), reached by a
    # straight line from (1, 0) to (0.8, 0.3) over the 4 steps.
    expected = [[1.0 - 0.2 * step / 4, 0.3 * step / 4] for step in range(4)]
    torch.testing.assert_close(torch.tensor(logged), torch.tensor(expected), rtol=0, atol=1e-12)


def accumulated_weights(
    tmp_path, dataset, student, teacher, *, batch_size, accumulation, tokenizer, standardize
):
    trainer = ABKDClassifierTrainer(
        model=copy.deepcopy(student),
        teacher_model=teacher,
        args=ABKDClassifierConfig(
            **classifier_training_kwargs(
                tmp_path / f"{batch_size}x{accumulation}",
                per_device_train_batch_size=batch_size,
                gradient_accumulation_steps=accumulation,
                max_steps=1,
                optim="sgd",  # the update is proportional to the gradient (Adam's is not)
                learning_rate=0.5,
                max_grad_norm=0.0,  # no clipping, which would hide a wrong scale
                disable_dropout=True,
                logit_standardization=standardize,
            )
        ),
        train_dataset=dataset,
        processing_class=tokenizer,  # pads text batches (None: images, stacked)
    )
    trainer.train()
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}, trainer


@pytest.mark.parametrize("standardize", [False, True], ids=["raw", "standardized"])
@pytest.mark.parametrize("modality", ["image", "text"])
def test_accumulating_four_micro_batches_of_two_equals_one_batch_of_eight(
    tmp_path, modality, standardize
):
    if modality == "image":  # a ViT student: no batch norm, whose statistics depend on the batch
        tokenizer, dataset = None, build_image_dataset(8)
        student = build_vit_classifier(hidden_size=16, num_layers=1, seed=5, initializer_range=0.02)
        teacher = build_vit_classifier()
    else:
        tokenizer = build_tiny_tokenizer()
        dataset = build_text_classification_dataset(tokenizer, 8)
        student = build_bert_classifier(vocab_size=len(tokenizer))
        teacher = build_bert_classifier(vocab_size=len(tokenizer), seed=2, initializer_range=0.5)
    # Uncounted examples spread unevenly over the micro-batches: a per-micro-batch mean would
    # weight the examples differently from the mean over the whole batch.
    labels = list(dataset["label"])
    for index in (0, 1, 2):
        labels[index] = -100
    dataset = dataset.remove_columns("label").add_column("label", labels)
    initial = {name: p.detach().clone() for name, p in student.named_parameters()}

    settings = {"tokenizer": tokenizer, "standardize": standardize}
    one_batch, _ = accumulated_weights(
        tmp_path, dataset, student, teacher, batch_size=8, accumulation=1, **settings
    )
    accumulated, trainer = accumulated_weights(
        tmp_path, dataset, student, teacher, batch_size=2, accumulation=4, **settings
    )

    assert any(not torch.equal(one_batch[name], initial[name]) for name in initial)
    # The largest update of any weight: the scale of the float32 noise (key biases, whose
    # gradient is 0 in exact arithmetic, move by noise only).
    scale = max((weight - initial[name]).abs().max().item() for name, weight in one_batch.items())
    for name, weight in one_batch.items():
        # Standardised logits divide by each row's spread (about 0.01 for these tiny random
        # students), so the update is ~100x larger and float32 summation-order differences grow
        # with it (measured: at most 3e-4 of an element's update). Compare the updates then; a
        # wrong normalisation is off by a factor (e.g. 5/2 here), far outside either tolerance.
        update, expected = accumulated[name] - initial[name], weight - initial[name]
        atol = 1e-7 if not standardize else 1e-6 * scale
        torch.testing.assert_close(update, expected, rtol=1e-3 if standardize else 1e-5,
                                   atol=atol, msg=name)  # fmt: skip
    # The logged metrics are means over the 5 counted examples of the step, as with one batch.
    assert trainer.state.log_history[0]["loss"] > 0
