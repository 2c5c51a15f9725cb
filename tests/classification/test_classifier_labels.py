"""Label spaces: checked when the trainer is built, and aligned by class name."""

from __future__ import annotations

import pytest
import torch
from classifier_factories import (
    CLASS_NAMES,
    build_image_dataset,
    build_image_trainer,
    build_resnet_classifier,
    build_vit_classifier,
    label_maps,
)
from transformers import PretrainedConfig

from abkd_trainer.classification.labels import align_label_spaces, class_names


def config(num_labels: int, names=None, **kwargs) -> PretrainedConfig:
    return PretrainedConfig(num_labels=num_labels, **label_maps(names), **kwargs)


def test_default_label_names_count_as_absent():
    assert class_names(config(3)) is None  # LABEL_0, LABEL_1, LABEL_2
    assert class_names(config(2, ["LABEL_1", "LABEL_0"])) == ("LABEL_1", "LABEL_0")
    assert class_names(config(2, ["neg", "pos"])) == ("neg", "pos")


def test_different_numbers_of_labels_are_refused_naming_both(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"teacher \(ViTForImageClassification\) has 4 labels "
        r"but the student \(ResNetForImageClassification\) has 3",
    ):
        build_image_trainer(tmp_path, student=build_resnet_classifier(num_labels=3))


def test_same_classes_in_another_order_are_remapped_to_the_students_order(tmp_path):
    # The same teacher twice: once in its own order, once with its head's rows and id2label
    # permuted. After alignment both give the student the same targets, so the same loss.
    teacher = build_vit_classifier()
    order = [2, 0, 3, 1]  # permuted class s is the original class order[s]
    permuted = build_vit_classifier()
    permuted.classifier.weight.data = teacher.classifier.weight.data[order].clone()
    permuted.classifier.bias.data = teacher.classifier.bias.data[order].clone()
    permuted.config.id2label = {s: CLASS_NAMES[order[s]] for s in range(4)}
    permuted.config.label2id = {name: s for s, name in permuted.config.id2label.items()}
    student_names = list(CLASS_NAMES)
    student = build_resnet_classifier(class_names=student_names)

    losses, trainers = [], []
    for who in (teacher, permuted):
        trainer = build_image_trainer(tmp_path, student=student, teacher=who)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
        trainer.model.eval()
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, batch))
            trainers.append(trainer)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0.0)
    assert trainers[0].label_alignment.permutation is None
    # The student's class s is the permuted teacher's column order.index(s).
    assert trainers[1].label_alignment.permutation.tolist() == [order.index(s) for s in range(4)]
    logits = torch.arange(8.0).reshape(2, 4)
    remapped = trainers[1].label_alignment.teacher_to_student(logits)
    assert remapped.tolist() == [[row[order.index(s)] for s in range(4)] for row in logits.tolist()]


def test_different_class_names_are_refused_naming_the_first_mismatch(tmp_path):
    student = build_resnet_classifier(class_names=["zero", "one", "deux", "three"])
    with pytest.raises(
        ValueError,
        match=r"student's class 2 'deux' is not among the teacher's, "
        r"and the teacher's 'two' is not among the student's",
    ):
        build_image_trainer(tmp_path, student=student)


def test_duplicate_names_cannot_be_matched():
    with pytest.raises(ValueError, match=r"repeat \['a'\]"):
        align_label_spaces(config(3, ["a", "b", "c"]), config(3, ["a", "a", "b"]))


def test_a_student_without_names_takes_the_teachers(tmp_path):
    trainer = build_image_trainer(tmp_path, student=build_resnet_classifier(class_names=None))
    assert trainer.label_alignment.permutation is None
    assert trainer.model.config.id2label == dict(enumerate(CLASS_NAMES))
    assert trainer.model.config.label2id == {name: i for i, name in enumerate(CLASS_NAMES)}
    trainer.save_model(str(tmp_path / "saved"))
    saved = PretrainedConfig.from_pretrained(tmp_path / "saved")
    assert saved.id2label == dict(enumerate(CLASS_NAMES))


def test_a_teacher_without_names_keeps_the_students_order():
    student = config(2, ["pos", "neg"])
    alignment = align_label_spaces(student, config(2))
    assert alignment.permutation is None
    assert alignment.class_names == ("pos", "neg")
    assert student.id2label == {0: "pos", 1: "neg"}


@pytest.mark.parametrize("problem_type", ["multi_label_classification", "regression"])
def test_multi_label_and_regression_models_are_refused(tmp_path, problem_type):
    teacher = build_vit_classifier()
    teacher.config.problem_type = problem_type
    with pytest.raises(ValueError, match=f"problem_type='{problem_type}'"):
        build_image_trainer(tmp_path, teacher=teacher, train_dataset=build_image_dataset(4))
