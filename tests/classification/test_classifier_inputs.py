"""Teacher inputs in a batch (`teacher_<name>` keys) and the distillation collator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from classifier_factories import build_reversed_byte_tokenizer
from PIL import Image
from testing_utils import build_tiny_tokenizer
from transformers import ViTImageProcessorPil

from abkd_trainer.classification.inputs import ClassifierDistillationCollator, split_model_inputs


def test_teacher_keys_go_to_the_teacher_without_their_prefix():
    batch = {
        "pixel_values": torch.zeros(2, 1, 8, 8),
        "teacher_pixel_values": torch.ones(2, 1, 16, 16),
        "labels": torch.tensor([0, 1]),
    }
    split = split_model_inputs(batch)
    assert split.student.keys() == {"pixel_values"}
    assert split.teacher.keys() == {"pixel_values"}
    assert split.teacher["pixel_values"].shape == (2, 1, 16, 16)
    assert split.labels.tolist() == [0, 1]
    assert batch.keys() == {"pixel_values", "teacher_pixel_values", "labels"}  # not modified


def test_without_teacher_keys_the_teacher_shares_the_students_inputs():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.tensor([1, 0])}
    split = split_model_inputs(batch)
    assert split.student.keys() == split.teacher.keys() == {"input_ids"}


def test_tokenised_features_are_padded_with_each_models_tokenizer():
    tokenizer, teacher_tokenizer = build_tiny_tokenizer(), build_reversed_byte_tokenizer()
    texts = ["a cat", "dogs bark loudly"]
    examples = [
        {**{k: v[i] for k, v in tokenizer(texts).items()},
         **{f"teacher_{k}": v[i] for k, v in teacher_tokenizer(texts).items()},
         "label": i}
        for i in range(2)
    ]  # fmt: skip
    batch = ClassifierDistillationCollator(tokenizer, teacher_tokenizer)(examples)
    assert batch["input_ids"].shape == batch["teacher_input_ids"].shape == (2, 16)
    assert batch["input_ids"][0, -1] == tokenizer.pad_token_id
    assert batch["teacher_input_ids"][0, -1] == teacher_tokenizer.pad_token_id
    assert batch["labels"].dtype == torch.long and batch["labels"].tolist() == [0, 1]


def test_raw_images_are_processed_by_each_models_processor():
    def processor(size):
        return ViTImageProcessorPil(
            size={"height": size, "width": size},
            image_mean=[0.5],
            image_std=[0.5],
            do_convert_rgb=False,
        )

    image = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), mode="L")
    examples = [{"img": image, "labels": 3}, {"img": image, "labels": 1}]
    batch = ClassifierDistillationCollator(processor(8), processor(16))(examples)
    assert batch["pixel_values"].shape == (2, 1, 8, 8)
    assert batch["teacher_pixel_values"].shape == (2, 1, 16, 16)
    assert batch["labels"].tolist() == [3, 1]


def test_a_teacher_processor_without_raw_inputs_is_explained():
    collator = ClassifierDistillationCollator(None, build_tiny_tokenizer())
    with pytest.raises(ValueError, match=r"examples have neither"):
        collator([{"pixel_values": [[0.0]], "label": 0}])
    with pytest.raises(KeyError, match=r"input_column='review' is not in the examples"):
        ClassifierDistillationCollator(input_column="review")([{"text": "x", "label": 0}])
