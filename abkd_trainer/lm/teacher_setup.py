"""A training run's teacher: loaded when given by name, named, and checked against the student."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.nn as nn
from trl.trainer.utils import get_config_model_id

from abkd_trainer.lm.compatibility import check_position_limits
from abkd_trainer.lm.models import causal_lm, check_shared_vocabulary, load_teacher

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from abkd_trainer.lm.config import ABKDConfig


@dataclass
class CheckedTeacher:
    """What `load_checked_teacher` returns.

    Attributes:
        model: the teacher as given or loaded (not yet prepared), None when training from a cache.
        name: its name or path, model id or class; from a cache, the teacher its manifest names.
        models: role (`"student"`, `"teacher"`) -> model as given; no teacher from a cache.
    """

    model: nn.Module | None
    name: str
    models: dict[str, nn.Module]


def load_checked_teacher(
    teacher_model: str | PreTrainedModel | nn.Module | None,
    *,
    student: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    args: ABKDConfig,
    cached_teacher_name: str | None = None,
) -> CheckedTeacher:
    """Load the teacher (given by name), name it, and check it against the student.

    Load it after the training arguments and the accelerator exist, so that under ZeRO-3 it is
    created sharded (zero.Init) like the student.

    Args:
        teacher_model: the teacher, its name or path, or None when training from a cache.
        student: the student.
        tokenizer: the run's tokenizer; both models must share its vocabulary.
        args: the run's configuration (`teacher_model_init_kwargs`, `max_length`, `packing`).
        cached_teacher_name: the name a teacher cache's manifest records (no teacher given).

    Raises:
        ValueError: the models do not share the tokenizer's vocabulary, or `max_length` exceeds a
            model's positions.
    """
    teacher_source = teacher_model if isinstance(teacher_model, str) else None
    if isinstance(teacher_model, str):
        teacher_model = load_teacher(teacher_model, args)
    name = (
        cached_teacher_name
        if teacher_model is None
        else teacher_source
        or get_config_model_id(teacher_model.config)
        or type(teacher_model).__name__
    )
    check_shared_vocabulary(
        student,
        teacher_model,
        tokenizer,
        teacher_name=name,
        teacher_source=teacher_source,
        trust_remote_code=args.trust_remote_code,
    )
    models = {"student": student, "teacher": teacher_model}
    models = {role: model for role, model in models.items() if model is not None}
    check_position_limits(
        args.max_length,
        {role: causal_lm(model) for role, model in models.items()},
        packing=args.packing,
    )
    return CheckedTeacher(model=teacher_model, name=name, models=models)
