"""abkd-train-classifier: flags and YAML, demo detection, and short runs on a user's image folder
and text files (teacher and student saved in temporary folders, nothing downloaded)."""

from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
from classifier_factories import (
    build_bert_classifier,
    build_resnet_classifier,
    build_reversed_byte_tokenizer,
    build_vit_classifier,
)
from testing_utils import build_tiny_tokenizer

from abkd_trainer.classification.config import ABKDClassifierConfig
from abkd_trainer.classification.demo import DEMO_DEFAULTS, DEMO_TEACHER_DIR
from abkd_trainer.cli.train_classifier import is_demo_run, main, make_parser, parse_args
from abkd_trainer.core.checkpoints import OutputDirInUseError

RUN = ["--model_name_or_path", "s", "--teacher_model_name_or_path", "t", "--dataset_name", "d"]
SHORT_RUN = [
    "--max_steps", "2", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8",
    "--use_cpu", "true", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
    "--logging_steps", "1", "--learning_rate", "1e-2",
]  # fmt: skip


# ----------------------------------------------------------------------------- arguments


def test_every_config_field_is_a_flag():
    parser = make_parser()
    options = parser._option_string_actions
    for config_field in dataclasses.fields(ABKDClassifierConfig):
        if config_field.init:
            assert f"--{config_field.name}" in options, config_field.name
    for name in ("model_name_or_path", "dataset_name", "input_column", "ignore_mismatched_sizes"):
        assert f"--{name}" in options


def test_demo_defaults_apply_only_to_the_demo():
    script_args, training_args, model_args, demo = parse_args([])
    assert demo
    assert training_args.max_steps == DEMO_DEFAULTS["max_steps"]
    assert training_args.teacher_model_name_or_path == str(DEMO_TEACHER_DIR)
    assert training_args.output_dir == DEMO_DEFAULTS["output_dir"]
    _, training_args, model_args, demo = parse_args([*RUN, "--output_dir", "out"])
    assert not demo
    assert training_args.max_steps == -1 and training_args.eval_strategy == "no"
    assert (model_args.model_name_or_path, script_args.dataset_name) == ("s", None)
    assert model_args.lora_task_type is None  # not TRL's CAUSAL_LM for a classifier


def test_yaml_config_sets_defaults_and_the_command_line_wins(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "model_name_or_path: s\nteacher_model_name_or_path: t\ndataset_name: d\n"
        "output_dir: out\nkd_weight: 2.5\nalpha: 0.5\ndivergence: ab\ninput_column: sentence\n"
    )
    script_args, training_args, _, demo = parse_args(["--config", str(config), "--alpha", "0.6"])
    assert not demo
    assert (training_args.kd_weight, training_args.alpha) == (2.5, 0.6)
    assert script_args.input_column == "sentence"


def test_naming_only_some_of_student_teacher_dataset_is_an_error():
    assert is_demo_run(["--max_steps", "5"])
    with pytest.raises(ValueError, match="Missing --teacher_model_name_or_path, --dataset_name"):
        is_demo_run(["--model_name_or_path", "s"])


# ----------------------------------------------------------------------------- image folder


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """An imagefolder (classes cat / dog, train and test subfolders; 5 cats and 3 dogs to test),
    a ViT teacher naming the classes in the other order (dog, cat) and biased to say "dog", with
    its image processor, and a 4-label ResNet student saved without a processor."""
    from PIL import Image
    from transformers import ViTImageProcessor

    root = tmp_path_factory.mktemp("image_run")
    rng = np.random.default_rng(0)
    for split, counts in (("train", {"cat": 6, "dog": 6}), ("test", {"cat": 5, "dog": 3})):
        for name, count in counts.items():
            folder = root / "data" / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
                Image.fromarray(pixels, mode="L").save(folder / f"{index}.png")
    teacher = build_vit_classifier(num_labels=2, class_names=("dog", "cat"))
    with torch.no_grad():
        teacher.classifier.bias.copy_(torch.tensor([20.0, -20.0]))  # always "dog"
    teacher.save_pretrained(root / "teacher")
    processor = ViTImageProcessor(size={"height": 8, "width": 8}, image_mean=[0.5], image_std=[0.5])
    processor.save_pretrained(root / "teacher")
    build_resnet_classifier(num_labels=4).save_pretrained(root / "student")
    return root


def image_flags(root, output_dir):
    return [
        "--model_name_or_path", str(root / "student"),
        "--teacher_model_name_or_path", str(root / "teacher"),
        "--dataset_name", str(root / "data"),
        "--processor_name_or_path", str(root / "teacher"),
        "--ignore_mismatched_sizes", "true",
        "--output_dir", str(output_dir), *SHORT_RUN,
    ]  # fmt: skip


def test_image_folder_run_trains_a_new_head_and_reports(image_run, tmp_path):
    from transformers import AutoModelForImageClassification

    output_dir = tmp_path / "out"
    assert main(image_flags(image_run, output_dir)) == 0
    report = json.loads((output_dir / "report.json").read_text())
    assert report["training"]["global_step"] == 2
    assert report["evaluation"]["num_examples"] == 8
    # The student got the dataset's classes in the dataset's order (a new 2-label head).
    student = AutoModelForImageClassification.from_pretrained(output_dir)
    assert student.config.id2label == {0: "cat", 1: "dog"}
    # The teacher (dog, cat) was re-mapped: it always says "dog", right for 3 of the 8 test
    # images; read column by column (no re-mapping) it would say "cat", right for 5 of them.
    assert report["teacher"]["accuracy"] == pytest.approx(3 / 8)
    card = (output_dir / "README.md").read_text()
    assert "Teacher classes re-ordered" in card
    assert (output_dir / "preprocessor_config.json").is_file()


def test_a_used_output_dir_is_refused_before_loading(image_run, tmp_path):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "model.safetensors").write_bytes(b"earlier run")
    with pytest.raises(OutputDirInUseError, match="--resume_from_checkpoint"):
        main(image_flags(image_run, output_dir))


# ----------------------------------------------------------------------------- text files


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """CSV files with `sentence` and string labels, a BERT teacher with its own tokenizer, and a
    smaller BERT student with another tokenizer and no class names."""
    root = tmp_path_factory.mktemp("text_run")
    sentences = ["a cat sat", "dogs bark", "the sun is hot", "rain again", "blue sky today"]
    for split, rows in (("train", 12), ("test", 6)):
        with open(root / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["sentence", "label", "idx"])
            for index in range(rows):
                sentence = sentences[index % len(sentences)]
                writer.writerow([sentence, "pos" if index % 2 else "neg", index])
    teacher_tokenizer = build_reversed_byte_tokenizer()
    teacher = build_bert_classifier(
        vocab_size=len(teacher_tokenizer),
        num_labels=2,
        class_names=("neg", "pos"),
        pad_token_id=teacher_tokenizer.pad_token_id,
    )
    teacher.save_pretrained(root / "teacher")
    teacher_tokenizer.save_pretrained(root / "teacher")
    student_tokenizer = build_tiny_tokenizer()
    student = build_bert_classifier(
        vocab_size=len(student_tokenizer),
        num_labels=2,
        class_names=None,
        hidden_size=16,
        num_layers=1,
        pad_token_id=student_tokenizer.pad_token_id,
    )
    student.save_pretrained(root / "student")
    student_tokenizer.save_pretrained(root / "student")
    return root


def text_flags(root, output_dir, *extra):
    return [
        "--model_name_or_path", str(root / "student"),
        "--teacher_model_name_or_path", str(root / "teacher"),
        "--dataset_name", str(root / "train.csv"),
        "--dataset_test_file", str(root / "test.csv"),
        "--output_dir", str(output_dir), "--max_length", "32", *SHORT_RUN, *extra,
    ]  # fmt: skip


def test_text_files_with_string_labels_and_a_teacher_tokenizer(text_run, tmp_path):
    from transformers import AutoModelForSequenceClassification

    output_dir = tmp_path / "out"
    flags = text_flags(text_run, output_dir, "--divergence", "fkl", "--eval_strategy", "steps")
    assert main([*flags, "--eval_steps", "1"]) == 0
    report = json.loads((output_dir / "report.json").read_text())
    assert report["training"]["divergence"] == "fkl" and "alpha" not in report["training"]
    assert report["evaluation"]["num_examples"] == 6
    student = AutoModelForSequenceClassification.from_pretrained(output_dir)
    assert student.config.id2label == {0: "neg", 1: "pos"}  # the teacher's names, taken over
    assert (output_dir / "tokenizer.json").is_file()


def test_missing_label_column_is_reported_with_the_flag(text_run, tmp_path):
    flags = text_flags(text_run, tmp_path / "out", "--label_column", "stars")
    with pytest.raises(ValueError, match=r"'idx', 'label', 'sentence'\]; --label_column 'stars'"):
        main(flags)
