"""The offline classifier demo: shipped assets, the build scripts' logic, and a short demo run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from testing_utils import load_script

from abkd_trainer.classification import demo
from abkd_trainer.cli.train_classifier import main

build_assets = load_script("scripts/build_digits_assets.py", "build_digits_assets")
train_teacher = load_script("scripts/train_digits_teacher.py", "train_digits_teacher")


# ----------------------------------------------------------------------------- shipped assets


def test_shipped_digits_are_a_stratified_split_of_all_1797_images():
    datasets = demo.load_demo_dataset()
    train, test = datasets["train"], datasets["test"]
    assert (len(train), len(test)) == (1438, 359)
    assert train.features["label"].names == [str(digit) for digit in range(10)]
    for split in (train, test):
        image = split[0]["image"]
        assert (image.mode, image.size) == ("L", (8, 8))
    train_counts = np.bincount(train["label"], minlength=10)
    test_counts = np.bincount(test["label"], minlength=10)
    # scikit-learn's digits have 174-183 images per class; each gives round(20%) to the test split.
    assert np.all(np.abs(test_counts - 0.2 * (train_counts + test_counts)) <= 0.5)
    licence = (demo.DEMO_DIGITS_DIR / "README.md").read_text()
    assert "CC BY 4.0" in licence and "scikit-learn" in licence


def test_shipped_teacher_is_small_and_scores_what_its_summary_says():
    from transformers import AutoModelForImageClassification

    summary = json.loads((demo.DEMO_TEACHER_DIR / "training_summary.json").read_text())
    assert (demo.DEMO_TEACHER_DIR / "model.safetensors").stat().st_size < 500_000
    teacher = AutoModelForImageClassification.from_pretrained(demo.DEMO_TEACHER_DIR).eval()
    assert teacher.config.id2label == {index: str(index) for index in range(10)}
    processor = demo.load_demo_image_processor()
    test = demo.load_demo_dataset()["test"]
    pixels = processor(list(test["image"]), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (359, 1, 8, 8)
    assert -1.0 <= pixels.min() < pixels.max() <= 1.0
    with torch.no_grad():
        predictions = teacher(pixel_values=pixels).logits.argmax(-1)
    accuracy = (predictions == torch.tensor(list(test["label"]))).float().mean().item()
    assert accuracy == pytest.approx(summary["test_accuracy"], abs=1e-4)
    assert accuracy > 0.95


def test_demo_student_is_a_smaller_vit_with_the_teachers_classes():
    from transformers import AutoConfig

    teacher_config = AutoConfig.from_pretrained(demo.DEMO_TEACHER_DIR)
    student = demo.build_demo_student(teacher_config, seed=0)
    again = demo.build_demo_student(teacher_config, seed=0)
    other = demo.build_demo_student(teacher_config, seed=1)
    assert student.config.model_type == "vit"
    assert student.config.id2label == teacher_config.id2label
    parameters = sum(p.numel() for p in student.parameters())
    summary = json.loads((demo.DEMO_TEACHER_DIR / "training_summary.json").read_text())
    assert parameters * 4 < summary["parameters"]
    first = next(student.parameters())
    assert torch.equal(first, next(again.parameters()))
    assert not torch.equal(first, next(other.parameters()))


# ----------------------------------------------------------------------------- build scripts


def test_stratified_split_is_disjoint_complete_seeded_and_per_class():
    labels = np.repeat(np.arange(3), [10, 20, 31])
    train, test = build_assets.stratified_split(labels, 0.2, seed=0)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(len(labels)))
    assert not set(train) & set(test)
    assert np.bincount(labels[test]).tolist() == [2, 4, 6]
    again_train, again_test = build_assets.stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(test, again_test) and np.array_equal(train, again_train)
    assert not np.array_equal(test, build_assets.stratified_split(labels, 0.2, seed=1)[1])
    with pytest.raises(ValueError, match="test_fraction"):
        build_assets.stratified_split(labels, 1.0, seed=0)


def test_png_conversion_scales_counts_to_bytes_losslessly():
    import io

    from PIL import Image

    counts = np.arange(64).reshape(8, 8) % 17
    image = Image.open(io.BytesIO(build_assets.to_png(counts)))
    assert image.mode == "L"
    assert np.array_equal(np.asarray(image), np.rint(counts * 255 / 16).astype(np.uint8))


def test_shift_collator_moves_images_and_keeps_labels():
    from PIL import Image

    processor = train_teacher.build_image_processor()
    pixels = np.zeros((8, 8), dtype=np.uint8)
    pixels[3:5, 3:5] = 255  # a blob away from the border: a shift of one pixel keeps all of it
    rows = [{"image": Image.fromarray(pixels, mode="L"), "label": 7}] * 16
    plain = train_teacher.ShiftCollator(processor, seed=0, max_shift=0)(rows)
    shifted = train_teacher.ShiftCollator(processor, seed=0, max_shift=1)(rows)
    assert plain["pixel_values"].shape == shifted["pixel_values"].shape == (16, 1, 8, 8)
    assert plain["labels"].tolist() == [7] * 16
    bright = (shifted["pixel_values"] > 0).flatten(1).sum(-1)
    assert torch.all(bright == 4)  # the blob is moved, never cut
    assert not torch.equal(shifted["pixel_values"], plain["pixel_values"])


def test_teacher_training_is_deterministic(tmp_path):
    for run in ("first", "second"):
        folder = tmp_path / run
        folder.mkdir()
        for name in demo.DEMO_DATA_FILES.values():
            (folder / name).write_bytes((demo.DEMO_DIGITS_DIR / name).read_bytes())
        train_teacher.main(["--digits_dir", str(folder), "--epochs", "1", "--batch_size", "128"])
    first, second = (tmp_path / run / "teacher" for run in ("first", "second"))
    weights = (first / "model.safetensors").read_bytes()
    assert weights == (second / "model.safetensors").read_bytes()
    summary = json.loads((first / "training_summary.json").read_text())
    assert summary["optimizer_steps"] == 12  # ceil(1438 / 128)
    assert (first / "preprocessor_config.json").is_file()


# ----------------------------------------------------------------------------- the demo


def test_demo_distils_the_teacher_and_writes_the_report(tmp_path):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    output_dir = tmp_path / "demo"
    flags = ["--output_dir", str(output_dir), "--max_steps", "100", "--warmup_steps", "10"]
    flags += ["--eval_steps", "50", "--logging_steps", "50", "--disable_tqdm", "true"]
    assert main(flags) == 0

    report = json.loads((output_dir / "report.json").read_text())
    for row in ("teacher", "student_before", "student_after"):
        assert 0.0 <= report[row]["accuracy"] <= 1.0
    summary = json.loads((demo.DEMO_TEACHER_DIR / "training_summary.json").read_text())
    assert report["teacher"]["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-4)
    assert report["student_before"]["accuracy"] < 0.3  # ten classes, random weights
    assert report["student_after"]["accuracy"] > report["student_before"]["accuracy"] + 0.2
    assert report["training"]["global_step"] == 100
    assert report["evaluation"]["num_examples"] == 359
    for name in ("report.md", "accuracy.png", "README.md", "preprocessor_config.json"):
        assert (output_dir / name).is_file(), name

    # The saved student and processor reproduce the reported accuracy.
    student = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    processor = AutoImageProcessor.from_pretrained(output_dir)
    test = demo.load_demo_dataset()["test"]
    with torch.no_grad():
        logits = student(**processor(list(test["image"]), return_tensors="pt")).logits
    accuracy = (logits.argmax(-1) == torch.tensor(list(test["label"]))).float().mean().item()
    assert accuracy == pytest.approx(report["student_after"]["accuracy"], abs=1e-4)
    assert "sklearn-digits-8x8" in (output_dir / "README.md").read_text()
