"""ABKDClassifierTrainer end to end: image, text and audio pairs, the teacher, metrics, checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from classifier_factories import (
    CLASS_NAMES,
    build_bert_classifier,
    build_image_dataset,
    build_image_trainer,
    build_mobilenet_classifier,
    build_resnet_classifier,
    build_reversed_byte_tokenizer,
    build_vit_classifier,
    build_wav2vec2_classifier,
    classifier_training_kwargs,
)
from datasets import Dataset
from PIL import Image
from testing_utils import build_tiny_tokenizer, reference_token_divergence
from transformers import ViTImageProcessorPil, Wav2Vec2FeatureExtractor

from abkd_trainer import ABKDClassifierConfig, ABKDClassifierTrainer, CollapseGuardCallback
from abkd_trainer.core.numerics import NonFiniteError

LOGGED = (
    "kd_loss",
    "ce_loss",
    "teacher_agreement",
    "student_entropy",
    "teacher_entropy",
    "accuracy",
    "teacher_accuracy",
    "alpha",
    "beta",
)


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_trained_student_and_frozen_teacher(trainer, student_before, teacher_before):
    after = parameters(trainer.model)
    assert any(not torch.equal(after[name], value) for name, value in student_before.items())
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    for name, value in parameters(teacher).items():
        assert torch.equal(value, teacher_before[name]), name
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}


@pytest.mark.parametrize("student_factory", [build_resnet_classifier, build_mobilenet_classifier])
def test_vit_teacher_distils_into_a_convolutional_student(tmp_path, student_factory):
    student, teacher = student_factory(), build_vit_classifier()
    student_before, teacher_before = parameters(student), parameters(teacher)
    trainer = build_image_trainer(
        tmp_path, student=student, teacher=teacher, eval_dataset=build_image_dataset(8, seed=1)
    )
    trainer.train()
    assert_trained_student_and_frozen_teacher(trainer, student_before, teacher_before)
    train_logs = [log for log in trainer.state.log_history if "kd_loss" in log]
    assert len(train_logs) == 2
    for log in train_logs:
        assert set(LOGGED) <= log.keys()
        assert all(math.isfinite(log[name]) for name in LOGGED)
    metrics = trainer.evaluate()
    assert {f"eval_{name}" for name in LOGGED} <= metrics.keys()
    assert any(isinstance(cb, CollapseGuardCallback) for cb in trainer.callback_handler.callbacks)


def test_logged_metrics_are_means_over_the_examples_of_the_logging_period(tmp_path):
    # lr 0: both steps see the same models, so the logged means are those over the 8 examples;
    # the uncounted examples make the two steps' counts differ (a mean of step means would not).
    dataset = build_image_dataset(8)
    labels = [-100, -100, -100, 3, 0, 1, 2, 3]
    dataset = dataset.remove_columns("label").add_column("label", labels)
    student = build_vit_classifier(hidden_size=16, num_layers=1, seed=4, initializer_range=0.1)
    trainer = build_image_trainer(
        tmp_path,
        student=student,
        train_dataset=dataset,
        eval_dataset=dataset,
        learning_rate=0.0,
        logging_steps=2,
        dataloader_drop_last=True,
        per_device_train_batch_size=4,
        alpha=0.8,
        beta=0.3,
        temperature=4.0,
        logit_standardization=False,
    )
    trainer.train()
    (log,) = [entry for entry in trainer.state.log_history if "kd_loss" in entry]

    batch = trainer.data_collator([dataset[i] for i in range(8)])
    with torch.no_grad():
        student_logits = trainer.model.eval()(pixel_values=batch["pixel_values"]).logits.double()
        teacher_logits = trainer.teacher_model(pixel_values=batch["pixel_values"]).logits.double()
    counted = batch["labels"] != -100
    kd = reference_token_divergence(
        teacher_logits, student_logits, "ab", alpha=0.8, beta=0.3, temperature=4.0
    )[counted]
    ce = torch.nn.functional.cross_entropy(student_logits, batch["labels"], reduction="none")
    accuracy = (student_logits.argmax(-1) == batch["labels"])[counted].double().mean()
    assert log["kd_loss"] == pytest.approx(kd.mean().item(), rel=1e-5)
    assert log["ce_loss"] == pytest.approx(ce[counted].mean().item(), rel=1e-5)
    assert log["accuracy"] == pytest.approx(accuracy.item(), abs=1e-12)

    metrics = trainer.evaluate()
    assert metrics["eval_kd_loss"] == pytest.approx(kd.mean().item(), rel=1e-5)
    assert metrics["eval_accuracy"] == pytest.approx(accuracy.item(), abs=1e-12)
    teacher_accuracy = (teacher_logits.argmax(-1) == batch["labels"])[counted].double().mean()
    assert metrics["eval_teacher_accuracy"] == pytest.approx(teacher_accuracy.item(), abs=1e-12)


def test_compute_metrics_sees_the_students_logits(tmp_path):
    seen = {}

    def compute_metrics(prediction):
        seen["shape"] = prediction.predictions.shape
        return {"accuracy": 0.5, "custom": 1.0}

    trainer = build_image_trainer(
        tmp_path,
        eval_dataset=build_image_dataset(6, seed=1),
        trainer_kwargs={"compute_metrics": compute_metrics},
    )
    metrics = trainer.evaluate()
    assert seen["shape"] == (6, 4)
    assert metrics["eval_custom"] == 1.0
    assert metrics["eval_accuracy"] == 0.5  # the user's value of the same name wins


def test_teacher_and_student_given_by_path(tmp_path):
    teacher, student = build_vit_classifier(), build_resnet_classifier()
    teacher.save_pretrained(tmp_path / "teacher")
    student.save_pretrained(tmp_path / "student")
    assert (tmp_path / "teacher" / "model.safetensors").is_file()
    trainer = ABKDClassifierTrainer(
        model=str(tmp_path / "student"),
        args=ABKDClassifierConfig(
            **classifier_training_kwargs(
                tmp_path / "run", teacher_model_name_or_path=str(tmp_path / "teacher")
            )
        ),
        train_dataset=build_image_dataset(),
    )
    assert trainer.teacher_name == str(tmp_path / "teacher")
    loaded = trainer.accelerator.unwrap_model(trainer.teacher_model)
    for name, value in parameters(teacher).items():
        assert torch.equal(parameters(loaded)[name], value)
    trainer.train()
    assert trainer.model.config.id2label == dict(enumerate(CLASS_NAMES))


def test_bf16_loaded_teacher_and_bf16_training(tmp_path):
    teacher = build_vit_classifier()
    teacher.save_pretrained(tmp_path / "teacher")
    for bf16 in (False, True):
        trainer = build_image_trainer(
            tmp_path / f"bf16-{bf16}",
            teacher=str(tmp_path / "teacher"),
            teacher_model_init_kwargs={"dtype": "bfloat16"},
            bf16=bf16,
        )
        assert next(trainer.teacher_model.parameters()).dtype == torch.bfloat16
        trainer.train()
        logs = [log for log in trainer.state.log_history if "kd_loss" in log]
        assert all(math.isfinite(log["loss"]) and math.isfinite(log["kd_loss"]) for log in logs)


def image_rows(num_examples: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), mode="L")
        for _ in range(num_examples)
    ]


def test_raw_images_with_a_teacher_processing_class_of_its_own(tmp_path):
    # The teacher sees 16x16 images, the student 8x8: each through its own processor.
    processor = ViTImageProcessorPil(
        size={"height": 8, "width": 8}, image_mean=[0.5], image_std=[0.5], do_convert_rgb=False
    )
    teacher_processor = ViTImageProcessorPil(
        size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.5], do_convert_rgb=False
    )
    dataset = Dataset.from_dict({"image": image_rows(8), "label": [i % 4 for i in range(8)]})
    teacher = build_vit_classifier(image_size=16)
    seen = []
    teacher.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["pixel_values"].shape), with_kwargs=True
    )
    trainer = build_image_trainer(
        tmp_path,
        teacher=teacher,
        train_dataset=dataset,
        trainer_kwargs={
            "processing_class": processor,
            "teacher_processing_class": teacher_processor,
        },
    )
    trainer.train()
    assert seen and all(shape[1:] == (1, 16, 16) for shape in seen)
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "preprocessor_config.json").is_file()  # the student's


def test_raw_text_with_a_teacher_tokenizer_of_its_own(tmp_path):
    tokenizer, teacher_tokenizer = build_tiny_tokenizer(), build_reversed_byte_tokenizer()
    dataset = Dataset.from_dict(
        {"text": ["a cat", "two dogs bark", "hot sun", "rain"] * 2, "label": [0, 1, 2, 3] * 2}
    )
    teacher = build_bert_classifier(
        vocab_size=len(teacher_tokenizer), seed=2, pad_token_id=teacher_tokenizer.pad_token_id
    )
    seen = []
    teacher.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True
    )
    student = build_bert_classifier(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    trainer = ABKDClassifierTrainer(
        model=student,
        teacher_model=teacher,
        args=ABKDClassifierConfig(**classifier_training_kwargs(tmp_path)),
        train_dataset=dataset,
        processing_class=tokenizer,
        teacher_processing_class=teacher_tokenizer,
    )
    trainer.train()
    texts = set(dataset["text"])
    decoded = {
        teacher_tokenizer.decode(ids, skip_special_tokens=True)
        for batch in seen
        for ids in batch.tolist()
    }
    assert decoded == texts  # the teacher read its own ids of the same texts


def test_an_audio_classifier_pair_trains(tmp_path):
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, do_normalize=True, return_attention_mask=True
    )
    rng = np.random.default_rng(0)
    dataset = Dataset.from_dict(
        {
            "audio": [
                {
                    "array": rng.standard_normal(400 + 40 * i).astype(np.float32),
                    "sampling_rate": 16000,
                }
                for i in range(8)
            ],
            "label": [i % 4 for i in range(8)],
        }
    )
    student, teacher = build_wav2vec2_classifier(seed=0), build_wav2vec2_classifier(seed=1)
    before = parameters(student)
    trainer = ABKDClassifierTrainer(
        model=student,
        teacher_model=teacher,
        args=ABKDClassifierConfig(**classifier_training_kwargs(tmp_path)),
        train_dataset=dataset,
        processing_class=extractor,
        teacher_processing_class=extractor,
    )
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in parameters(trainer.model).items())


def test_a_teacher_with_non_finite_weights_is_refused_at_construction(tmp_path):
    teacher = build_vit_classifier()
    with torch.no_grad():
        teacher.classifier.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"teacher has non-finite weights \(classifier.weight"):
        build_image_trainer(tmp_path, teacher=teacher)


def test_non_finite_teacher_logits_stop_training_before_the_update(tmp_path):
    # Finite weights whose logits overflow: caught at the first step, the student untouched.
    teacher = build_vit_classifier()
    with torch.no_grad():
        teacher.classifier.weight.fill_(3e38)
    student = build_resnet_classifier()
    before = parameters(student)
    trainer = build_image_trainer(tmp_path, student=student, teacher=teacher)
    with pytest.raises(
        NonFiniteError, match=r"teacher's log-probabilities are not finite .*step 1"
    ):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in parameters(trainer.model).items())


def test_model_init_students_are_aligned_with_the_teacher(tmp_path):
    trainer = ABKDClassifierTrainer(
        teacher_model=build_vit_classifier(),
        args=ABKDClassifierConfig(**classifier_training_kwargs(tmp_path)),
        train_dataset=build_image_dataset(),
        model_init=lambda: build_resnet_classifier(),
    )
    trainer.train()  # a fresh student from model_init
    assert trainer.model.config.id2label == dict(enumerate(CLASS_NAMES))


def test_default_arguments_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = ABKDClassifierTrainer(
        model=build_resnet_classifier(),
        teacher_model=build_vit_classifier(),
        train_dataset=build_image_dataset(4),
    )
    assert trainer.args.output_dir.endswith("ResNetForImageClassification-ABKD")
    assert trainer.args.bf16 is False


def test_missing_teacher_and_labels_are_explained(tmp_path):
    with pytest.raises(ValueError, match=r"needs a teacher: pass `teacher_model="):
        ABKDClassifierTrainer(
            model=build_resnet_classifier(),
            args=ABKDClassifierConfig(**classifier_training_kwargs(tmp_path)),
        )
    trainer = build_image_trainer(tmp_path, train_dataset=build_image_dataset(with_labels=False))
    with pytest.raises(KeyError, match=r"class ids in every batch under `labels`"):
        trainer.train()


@pytest.mark.parametrize("with_model_init", [False, True], ids=["model", "model_init"])
def test_resuming_from_a_checkpoint_continues_the_same_run(tmp_path, with_model_init):
    # A ViT student: transformers 5 saves it under renamed keys, which Trainer's resume misses.
    # With a model_init, Trainer rebuilds the student before loading the checkpoint.
    def student():
        return build_vit_classifier(hidden_size=16, num_layers=1, seed=4)

    def run(output_dir, **kwargs):
        trainer = build_image_trainer(
            output_dir,
            student=None if with_model_init else student(),
            trainer_kwargs={"model_init": student} if with_model_init else None,
            max_steps=4,
            per_device_train_batch_size=2,
            save_strategy="steps",
            save_steps=2,
        )
        trainer.train(**kwargs)
        return trainer

    uninterrupted = run(tmp_path / "whole")
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    saved = {path.name for path in checkpoint.iterdir()}
    assert "model.safetensors" in saved and "optimizer.pt" in saved
    resumed = run(tmp_path / "resumed", resume_from_checkpoint=str(checkpoint))
    for name, value in parameters(uninterrupted.model).items():
        torch.testing.assert_close(parameters(resumed.model)[name], value, rtol=1e-6, atol=1e-8)
    losses = [log["kd_loss"] for log in resumed.state.log_history if "kd_loss" in log]
    expected = [log["kd_loss"] for log in uninterrupted.state.log_history if "kd_loss" in log]
    # The resumed history is the checkpoint's (steps 1-2) followed by steps 3-4 trained anew.
    assert losses == pytest.approx(expected, rel=1e-6)


def test_a_search_trial_trains_with_its_own_temperature_and_weights(tmp_path):
    # Trainer writes a trial's parameters into `args`; the objective (built once at
    # construction) must follow them, or every trial would train with the first settings.
    trainer = build_image_trainer(
        tmp_path,
        eval_dataset=build_image_dataset(4),
        trainer_kwargs={"model_init": lambda: build_resnet_classifier()},
        max_steps=1,
        temperature=4.0,
    )

    def hp_space(trial):
        return {
            "temperature": trial.suggest_float("temperature", 2.5, 2.5),
            "kd_weight": trial.suggest_float("kd_weight", 3.0, 3.0),
        }

    trainer.hyperparameter_search(
        hp_space=hp_space, backend="optuna", n_trials=1, compute_objective=lambda m: m["eval_loss"]
    )
    objective = trainer.distillation_objective
    assert (objective.temperature, objective.divergence_weight) == (2.5, 3.0)
