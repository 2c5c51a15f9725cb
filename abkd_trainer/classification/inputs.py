"""What the teacher and the student are given: one batch, two sets of model inputs.

A teacher may need other inputs than its student: a ViT teacher at 224 pixels with ImageNet
normalisation and a MobileNet student at 96 pixels, or a BERT teacher with its own vocabulary and a
distilled student with another. Batches therefore carry the teacher's inputs under the student's
key names prefixed with `teacher_` (`teacher_pixel_values`, `teacher_input_ids`,
`teacher_attention_mask`, ...):

* `split_model_inputs` turns a batch into the student's inputs (every key but `labels` and the
  `teacher_` ones) and the teacher's: the `teacher_` keys with the prefix removed when the batch
  has any, else the student's own inputs (teacher and student share the preprocessing);
* `ClassifierDistillationCollator` builds such batches, from raw examples (an `image`, `img`,
  `text`, `sentence` or `audio` column, or the column you name) with one processor per model,
  or from examples already processed for both (`input_ids` and `teacher_input_ids`, padded
  with each model's tokenizer).

`ABKDClassifierTrainer` uses the collator by itself when given a `teacher_processing_class`, and
keeps the `teacher_` and raw input columns in the datasets (Trainer drops columns the student's
`forward` does not take).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, ProcessorMixin, default_data_collator

__all__ = [
    "LABEL_KEYS",
    "RAW_INPUT_COLUMNS",
    "TEACHER_PREFIX",
    "ClassifierDistillationCollator",
    "ModelInputs",
    "split_model_inputs",
]

# A batch key with this prefix is a teacher input: `teacher_pixel_values` -> `pixel_values`.
TEACHER_PREFIX = "teacher_"
# Keys holding the class ids (`label` is what datasets call them; collators write `labels`).
LABEL_KEYS = ("labels", "label")
# Dataset columns the collator processes itself when it is given no column name.
RAW_INPUT_COLUMNS = ("image", "img", "text", "sentence", "audio")


@dataclass
class ModelInputs:
    """One batch split for the two models.

    Attributes:
        student: keyword inputs of the student's forward (e.g. `pixel_values` `(B, C, H, W)`).
        teacher: keyword inputs of the teacher's forward.
        labels: `(B,)` class ids, `-100` for examples that do not count; None when the batch
            has none.
    """

    student: dict[str, Any]
    teacher: dict[str, Any]
    labels: torch.Tensor | None


def split_model_inputs(inputs: Mapping[str, Any]) -> ModelInputs:
    """The student's and the teacher's inputs, and the labels, of one batch (not modified).

    The teacher gets the batch's `teacher_<name>` entries as `<name>` when there is any, else
    the student's inputs.

    Args:
        inputs: one collated batch: the student's inputs, optional `teacher_` inputs and
            `labels`.
    """
    labels = inputs.get("labels")
    student = {
        key: value
        for key, value in inputs.items()
        if key not in LABEL_KEYS and not key.startswith(TEACHER_PREFIX)
    }
    teacher = {
        key[len(TEACHER_PREFIX) :]: value
        for key, value in inputs.items()
        if key.startswith(TEACHER_PREFIX)
    }
    return ModelInputs(student=student, teacher=teacher or dict(student), labels=labels)


def teacher_input_columns(teacher_forward_parameters: Sequence[str]) -> list[str]:
    """The dataset columns that hold teacher inputs: `teacher_<name>` for each forward argument."""
    return [f"{TEACHER_PREFIX}{name}" for name in teacher_forward_parameters if name != "labels"]


@dataclass
class ClassifierDistillationCollator:
    """Batches classification examples for a student and a teacher with their own preprocessing.

    Each example is a dict with a class id (`label` or `labels`) and either a raw input (a PIL
    image or array, a string, or an audio dict `{"array", "sampling_rate"}`, under
    `input_column`) or processed features (`pixel_values`, `input_ids`, ..., and optionally the
    teacher's under `teacher_` names).

    Args:
        processing_class: the student's image processor, tokenizer, feature extractor or
            processor; None collates processed features as they are (stacked).
        teacher_processing_class: the teacher's: it processes the raw input, or pads the
            examples' `teacher_` features (a tokenizer). None collates `teacher_` features as
            they are, and without them the teacher shares the student's inputs (see
            `split_model_inputs`).
        input_column: the column with the raw input; None takes the first of
            `RAW_INPUT_COLUMNS` present in the examples.
        max_length: longest tokenised text (truncated beyond it); None uses each tokenizer's
            limit.

    Returns (when called on a list of examples):
        A dict of tensors: the student's inputs, the teacher's under `teacher_` names, and
        `labels` `(B,)` (int64).
    """

    processing_class: Any = None
    teacher_processing_class: Any = None
    input_column: str | None = None
    max_length: int | None = None

    def dataset_columns(self) -> list[str]:
        """The dataset columns this collator reads beyond the student's forward arguments."""
        return [self.input_column] if self.input_column else list(RAW_INPUT_COLUMNS)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        column = self._raw_column(examples[0])
        batch = self._side(examples, self.processing_class, "", column)
        teacher = self._side(examples, self.teacher_processing_class, TEACHER_PREFIX, column)
        if self.teacher_processing_class is not None and not teacher:
            raise ValueError(
                "`teacher_processing_class` builds the teacher's inputs from the raw input (a "
                f"column among {', '.join(RAW_INPUT_COLUMNS)}, or `input_column`) or pads "
                f"`teacher_<name>` features, but the examples have neither: "
                f"{sorted(examples[0])}. Keep the raw column in the dataset (and "
                "`remove_unused_columns=False` with your own collator), or pass no "
                "teacher_processing_class to let the teacher share the student's inputs."
            )
        batch.update({f"{TEACHER_PREFIX}{key}": value for key, value in teacher.items()})
        labels = _labels(examples)
        if labels is not None:
            batch["labels"] = labels
        return batch

    def _raw_column(self, example: Mapping[str, Any]) -> str | None:
        if self.input_column is not None:
            if self.input_column not in example:
                raise KeyError(
                    f"input_column={self.input_column!r} is not in the examples, which have "
                    f"{sorted(example)}."
                )
            return self.input_column
        return next((name for name in RAW_INPUT_COLUMNS if name in example), None)

    def _side(
        self,
        examples: Sequence[Mapping[str, Any]],
        processor: Any,
        prefix: str,
        column: str | None,
    ) -> dict[str, Any]:
        """One model's inputs: its processor on the raw column, else its processed features."""
        if processor is not None and column is not None:
            return process_raw_inputs(
                [example[column] for example in examples], processor, self.max_length
            )
        features = [_features(example, prefix, column) for example in examples]
        if not features[0]:
            return {}
        if isinstance(processor, PreTrainedTokenizerBase) and "input_ids" in features[0]:
            return dict(processor.pad(features, return_tensors="pt"))
        return default_data_collator(features)


def process_raw_inputs(values: Sequence[Any], processor: Any, max_length: int | None) -> dict:
    """Run `processor` on a batch of raw inputs (images, strings, or audio dicts).

    Returns:
        The processor's tensors, e.g. `pixel_values` `(B, C, H, W)`, or `input_ids` and
        `attention_mask` `(B, L)` padded to the longest text, or `input_values` `(B, T)`.
    """
    first = values[0]
    if isinstance(first, str):
        encoded = processor(
            text=list(values),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
    elif isinstance(first, Mapping) and "array" in first:
        arrays = [value["array"] for value in values]
        audio_kwargs = {
            "sampling_rate": first.get("sampling_rate"),
            "padding": True,
            "return_tensors": "pt",
        }
        if isinstance(processor, ProcessorMixin):
            encoded = processor(audio=arrays, **audio_kwargs)
        else:  # a feature extractor: raw speech first
            encoded = processor(arrays, **audio_kwargs)
    else:
        encoded = processor(images=list(values), return_tensors="pt")
    return dict(encoded)


def _features(example: Mapping[str, Any], prefix: str, raw_column: str | None) -> dict:
    """One model's processed features of an example (names without `prefix`)."""
    if prefix:
        return {
            key[len(prefix) :]: value for key, value in example.items() if key.startswith(prefix)
        }
    return {
        key: value
        for key, value in example.items()
        if key not in LABEL_KEYS and key != raw_column and not key.startswith(TEACHER_PREFIX)
    }


def _labels(examples: Sequence[Mapping[str, Any]]) -> torch.Tensor | None:
    key = next((name for name in LABEL_KEYS if name in examples[0]), None)
    if key is None:
        return None
    return torch.tensor([int(example[key]) for example in examples], dtype=torch.long)
