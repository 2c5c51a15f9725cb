"""Preparing classification datasets for abkd-train-classifier: columns, labels, splits,
processors; every error names what was found and the fix."""

from __future__ import annotations

import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from abkd_trainer.classification.data import (
    align_dataset_labels,
    check_label_range,
    dataset_class_names,
    encode_string_labels,
    find_classification_columns,
    load_processing_class,
    normalize_columns,
    prepare_classification_splits,
    same_preprocessing,
)


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        (["image", "label"], ("image", "label", "image", "image")),
        (["img", "labels", "id"], ("img", "labels", "image", "image")),
        (["pixel_values", "label"], ("pixel_values", "label", "image", "pixel_values")),
        (["sentence", "label", "idx"], ("sentence", "label", "text", "text")),
        (["text", "label"], ("text", "label", "text", "text")),
        (["audio", "label"], ("audio", "label", "audio", "audio")),
    ],
)
def test_finds_the_usual_input_and_label_columns(columns, expected):
    found = find_classification_columns(columns)
    assert (found.input, found.label, found.modality, found.normalized_input) == expected


def test_named_columns_win_and_missing_names_are_reported():
    found = find_classification_columns(
        ["review", "stars", "text"], input_column="review", label_column="stars"
    )
    assert (found.input, found.label, found.modality) == ("review", "stars", "text")
    assert find_classification_columns(["picture", "y"], input_column="picture", label_column="y")
    with pytest.raises(ValueError, match=r"\['image', 'label'\]; --input_column 'photo'"):
        find_classification_columns(["image", "label"], input_column="photo")
    with pytest.raises(ValueError, match="--label_column 'class'"):
        find_classification_columns(["image", "label"], label_column="class")


def test_errors_list_the_columns_found_and_the_flag_to_use():
    with pytest.raises(ValueError, match=r"\['label', 'photo'\].*--input_column COLUMN"):
        find_classification_columns(["photo", "label"], where="The 'train' split")
    with pytest.raises(ValueError, match=r"several.*\(image, text\).*--input_column"):
        find_classification_columns(["image", "text", "label"])
    with pytest.raises(ValueError, match=r"`label` or `labels`.*--label_column COLUMN"):
        find_classification_columns(["image", "class"])


def test_normalize_renames_to_what_the_collator_reads():
    dataset = Dataset.from_dict({"img": [1, 2], "labels": [0, 1], "extra": [5, 6]})
    columns = find_classification_columns(dataset.column_names)
    normalized = normalize_columns(dataset, columns)
    assert normalized.column_names == ["image", "label", "extra"]
    clash = Dataset.from_dict({"photo": [1], "image": [2], "label": [0]})
    with pytest.raises(ValueError, match="already has"):
        normalize_columns(
            clash, find_classification_columns(clash.column_names, input_column="photo")
        )


def test_string_labels_get_one_numbering_across_splits():
    splits = {
        "train": Dataset.from_dict({"text": ["a", "b", "c"], "label": ["pos", "neg", "pos"]}),
        "test": Dataset.from_dict({"text": ["d"], "label": ["neg"]}),
    }
    encoded = encode_string_labels(splits)
    assert dataset_class_names(encoded["train"]) == ("neg", "pos")
    assert dataset_class_names(encoded["test"]) == ("neg", "pos")
    assert encoded["train"]["label"] == [1, 0, 1] and encoded["test"]["label"] == [0]
    # The teacher's order, when it names every class found.
    by_teacher = encode_string_labels(splits, preferred_names=["pos", "neg", "neutral"])
    assert by_teacher["train"]["label"] == [0, 1, 0]
    assert dataset_class_names(by_teacher["test"]) == ("pos", "neg", "neutral")
    assert encode_string_labels(splits, preferred_names=["positive"])["train"]["label"] == [1, 0, 1]


def test_integer_and_class_labels_pass_and_other_labels_are_refused():
    ints = Dataset.from_dict({"text": ["a"], "label": [3]})
    assert encode_string_labels({"train": ints})["train"] is ints
    floats = Dataset.from_dict({"text": ["a"], "label": [0.5]})
    with pytest.raises(ValueError, match="regression and multi-label"):
        encode_string_labels({"train": floats})


def _named(labels, names):
    features = Features({"x": Value("int64"), "label": ClassLabel(names=names)})
    return Dataset.from_dict({"x": list(range(len(labels))), "label": labels}, features=features)


def test_labels_are_renumbered_to_the_students_order():
    dataset = _named([0, 1, 2, 1], ["cat", "dog", "eel"])
    aligned = align_dataset_labels(dataset, ("eel", "cat", "dog"))
    assert aligned["label"] == [1, 2, 0, 2]
    assert dataset_class_names(aligned) == ("eel", "cat", "dog")
    assert align_dataset_labels(dataset, ("cat", "dog", "eel")) is dataset
    with pytest.raises(ValueError, match=r"'eel' is not a class of the student.*'owl'"):
        align_dataset_labels(dataset, ("cat", "dog", "owl"), where="The training split")


def test_label_range_is_checked_with_a_hint_for_unlabelled_test_splits():
    check_label_range(Dataset.from_dict({"label": [0, 1, -100]}), 2)
    with pytest.raises(ValueError, match=r"label 5 \(1 labels out of range\).*2 classes"):
        check_label_range(Dataset.from_dict({"label": [0, 5, 1]}), 2)
    with pytest.raises(ValueError, match="unlabelled test split.*--dataset_test_split"):
        check_label_range(Dataset.from_dict({"label": [-1, -1]}), 2)


def test_prepare_splits_finds_columns_and_holds_out_a_stratified_test_split():
    labels = [index % 2 for index in range(20)]
    train = _named(labels, ["even", "odd"]).rename_column("x", "sentence")
    prepared = prepare_classification_splits(DatasetDict({"train": train}), test_size=0.2, seed=3)
    assert (len(prepared.train), len(prepared.test)) == (16, 4)
    assert sorted(prepared.test["label"]) == [0, 0, 1, 1]
    assert prepared.columns.modality == "text" and "text" in prepared.train.column_names
    assert prepared.class_names == ("even", "odd")
    no_test = prepare_classification_splits(DatasetDict({"train": train}))
    assert no_test.test is None and len(no_test.train) == 20
    with pytest.raises(
        ValueError, match=r"no 'train' split.*\['validation'\].*--dataset_train_split"
    ):
        prepare_classification_splits(DatasetDict({"validation": train}), source="data.csv")


def test_processors_load_by_modality_and_compare_by_settings(tmp_path, tiny_tokenizer):
    from transformers import ViTImageProcessor

    ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(tmp_path / "a")
    ViTImageProcessor(size={"height": 8, "width": 8}).save_pretrained(tmp_path / "b")
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "c")
    first, second, other = (
        load_processing_class(str(tmp_path / name), "image", who="student") for name in "abc"
    )
    assert same_preprocessing(first, second)
    assert not same_preprocessing(first, other)
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    tokenizer = load_processing_class(str(tmp_path / "tok"), "text", who="teacher")
    assert same_preprocessing(tokenizer, tiny_tokenizer)
    assert not same_preprocessing(tokenizer, first)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--teacher_processor_name_or_path"):
        load_processing_class(str(tmp_path / "empty"), "image", who="teacher")
