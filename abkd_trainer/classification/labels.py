"""The label spaces of teacher and student: checked at construction, aligned by class name.

A classifier's logits are indexed by class id, and two independently trained classifiers need
not number their classes alike: a teacher fine-tuned with `{0: "cat", 1: "dog"}` and a student
set up with `{0: "dog", 1: "cat"}` agree on the classes but not on the columns, and distilling
column by column would teach the student to swap them. `align_label_spaces` compares the two
configs' `id2label` names once, before training:

* different `num_labels`: refused, naming both models and both counts;
* the same names in the same order (or names on one side only): nothing to do;
* the same names in another order: a fixed permutation, applied to the teacher's logits at every
  step (`LabelAlignment.teacher_to_student`), puts them in the student's order;
* different names: refused, naming the first class the other model lacks.

transformers gives every config default names (`LABEL_0`, `LABEL_1`, ...); they carry no
information and count as absent. A student without names takes the teacher's, so the saved student
(and its model card, its pipeline) knows what it predicts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

__all__ = [
    "LabelAlignment",
    "align_label_spaces",
    "check_single_label_classifier",
    "class_names",
]

# What PretrainedConfig writes when a config is built without id2label.
_DEFAULT_NAME = re.compile(r"^LABEL_(\d+)$")
# Problem types whose labels are not one class id per example.
_UNSUPPORTED_PROBLEM_TYPES = ("multi_label_classification", "regression")


@dataclass(frozen=True)
class LabelAlignment:
    """How the teacher's classes map onto the student's.

    Attributes:
        num_labels: the shared number of classes `C`.
        permutation: `(C,)` long tensor, `permutation[s]` = the teacher's column of the student's
            class `s`; None when the columns already agree.
        class_names: the student's class names in id order, or None when neither model names
            its classes.
    """

    num_labels: int
    permutation: torch.Tensor | None = None
    class_names: tuple[str, ...] | None = None

    def teacher_to_student(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The teacher's `(batch, C)` logits with their columns in the student's class order.

        Args:
            teacher_logits: `(batch, C)` logits in the teacher's class order.
        """
        if self.permutation is None:
            return teacher_logits
        return teacher_logits.index_select(-1, self.permutation.to(teacher_logits.device))


def class_names(config: PretrainedConfig) -> tuple[str, ...] | None:
    """The class names of `config` in id order, or None when it has none of its own.

    `id2label` counts as absent when it is missing, does not cover ids `0 .. num_labels - 1`, or
    holds only transformers' default names (`LABEL_<id>`).
    """
    id2label: Mapping[int, str] | None = getattr(config, "id2label", None)
    if not id2label:
        return None
    mapping = {int(index): str(name) for index, name in id2label.items()}
    if sorted(mapping) != list(range(config.num_labels)):
        return None
    names = tuple(mapping[index] for index in range(config.num_labels))
    defaults = (_DEFAULT_NAME.match(name) for name in names)
    if all(match is not None and int(match.group(1)) == i for i, match in enumerate(defaults)):
        return None
    return names


def check_single_label_classifier(config: PretrainedConfig, who: str) -> None:
    """Refuse classifiers whose labels are not one class id per example.

    Raises:
        ValueError: for `problem_type` `"multi_label_classification"` or `"regression"`.
    """
    problem_type = getattr(config, "problem_type", None)
    if problem_type in _UNSUPPORTED_PROBLEM_TYPES:
        raise ValueError(
            f"The {who} is configured for problem_type={problem_type!r}, but "
            "ABKDClassifierTrainer distils single-label classifiers: one softmax over the "
            "classes and one class id per example (problem_type 'single_label_classification' "
            "or unset)."
        )


def align_label_spaces(
    student_config: PretrainedConfig,
    teacher_config: PretrainedConfig,
    *,
    student_name: str = "student",
    teacher_name: str = "teacher",
) -> LabelAlignment:
    """Check that teacher and student classify into the same classes; map the teacher's onto them.

    A student without class names takes the teacher's (`id2label` and `label2id` are set on
    `student_config`, in place).

    Args:
        student_config: the student's config (`num_labels`, `id2label`).
        teacher_config: the teacher's config.
        student_name: how to name the student in error messages.
        teacher_name: how to name the teacher in error messages.

    Returns:
        The alignment to apply to the teacher's logits.

    Raises:
        ValueError: different numbers of classes; names that differ (naming the first class one
            model lacks); duplicate names that leave the mapping ambiguous; a multi-label or
            regression model.
    """
    check_single_label_classifier(student_config, f"student ({student_name})")
    check_single_label_classifier(teacher_config, f"teacher ({teacher_name})")
    num_student, num_teacher = student_config.num_labels, teacher_config.num_labels
    if num_student != num_teacher:
        raise ValueError(
            f"The teacher ({teacher_name}) has {num_teacher} labels but the student "
            f"({student_name}) has {num_student}; distillation compares their class "
            "distributions entry by entry, so both need the same classes. Give the student the "
            f"teacher's head size (e.g. `num_labels={num_teacher}` and the teacher's `id2label` "
            "in its config, or `model_init_kwargs={'num_labels': ..., "
            "'ignore_mismatched_sizes': True}` for a student loaded by name)."
        )
    student_names, teacher_names = class_names(student_config), class_names(teacher_config)
    if teacher_names is None or student_names == teacher_names:
        return LabelAlignment(num_student, None, student_names)
    if student_names is None:
        student_config.id2label = dict(enumerate(teacher_names))
        student_config.label2id = {name: index for index, name in enumerate(teacher_names)}
        return LabelAlignment(num_student, None, teacher_names)
    return LabelAlignment(
        num_student,
        _permutation(student_names, teacher_names, student_name, teacher_name),
        student_names,
    )


def _permutation(
    student_names: tuple[str, ...],
    teacher_names: tuple[str, ...],
    student_name: str,
    teacher_name: str,
) -> torch.Tensor:
    """`(C,)` teacher column of each student class; the names must be a reordering."""
    for who, names in ((student_name, student_names), (teacher_name, teacher_names)):
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(
                f"The class names of {who} repeat {duplicates}, so its classes cannot be matched "
                "to the other model's by name. Give every class a distinct name in `id2label`."
            )
    teacher_index = {name: index for index, name in enumerate(teacher_names)}
    for index, name in enumerate(student_names):
        if name not in teacher_index:
            lacking = next(n for n in teacher_names if n not in set(student_names))
            raise ValueError(
                f"The student ({student_name}) and the teacher ({teacher_name}) name different "
                f"classes: the student's class {index} {name!r} is not among the teacher's, and "
                f"the teacher's {lacking!r} is not among the student's. Give the student the "
                "teacher's `id2label` (its classes, in any order)."
            )
    return torch.tensor([teacher_index[name] for name in student_names], dtype=torch.long)
