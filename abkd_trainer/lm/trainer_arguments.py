"""What `ABKDTrainer` is given, checked before anything is built: its config and its teacher."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn
from transformers import PreTrainedModel, TrainingArguments
from trl.trainer.utils import get_config_model_id

from abkd_trainer.lm.config import ABKDConfig


def resolve_trainer_arguments(
    args: ABKDConfig | TrainingArguments | None,
    model: Any,
    teacher_model: str | PreTrainedModel | nn.Module | None,
    compute_loss_func: Callable | None,
) -> tuple[ABKDConfig, str | PreTrainedModel | nn.Module | None]:
    """`args` as an ABKDConfig, and the teacher (by default `args.teacher_model_name_or_path`).

    Args:
        args: the trainer's `args`.
        model: the student, an instance or a name (names the default config's output folder).
        teacher_model: the trainer's `teacher_model`.
        compute_loss_func: the trainer's `compute_loss_func`, which must be None.

    Raises:
        ValueError: a `compute_loss_func`; both a teacher and a teacher cache, or neither;
            `teacher_model_init_kwargs` with an instantiated teacher.
    """
    if compute_loss_func is not None:
        raise ValueError(
            "ABKDTrainer does not take `compute_loss_func`: its loss is the distillation "
            "objective set by ABKDConfig (`divergence`, `alpha`, `beta`, `temperature`, "
            "`kd_ratio`), computed from both models' outputs, which a function of the "
            "student's outputs alone cannot see. Subclass ABKDTrainer and override "
            "`compute_loss` to change it."
        )
    args = as_abkd_config(args, model)
    if teacher_model is None:
        teacher_model = args.teacher_model_name_or_path
    if args.teacher_cache is not None and teacher_model is not None:
        raise ValueError(
            "`teacher_cache` replaces the teacher: pass no `teacher_model` when training "
            "from a teacher cache (its manifest names the teacher that wrote it)."
        )
    if teacher_model is None and args.teacher_cache is None:
        raise ValueError(
            "ABKDTrainer needs a teacher: pass `teacher_model=` (a model or a name/path), "
            "set `teacher_model_name_or_path` in ABKDConfig, or train from a cache written "
            "by abkd-cache-teacher with `teacher_cache`."
        )
    if not isinstance(teacher_model, str) and args.teacher_model_init_kwargs is not None:
        raise ValueError(
            "`teacher_model_init_kwargs` only applies to a teacher given by name, but "
            "`teacher_model` is already instantiated. Load it with those arguments yourself, "
            "or pass its name instead."
        )
    return args, teacher_model


def as_abkd_config(args: ABKDConfig | TrainingArguments | None, model: Any) -> ABKDConfig:
    """`args` as an ABKDConfig (SFTTrainer does the same for SFTConfig): None gives the default
    config, writing to `<model name>-ABKD`; TrainingArguments are converted.

    Raises:
        TypeError: `args` is neither.
    """
    if args is None:
        model_name = model if isinstance(model, str) else get_config_model_id(model.config)
        return ABKDConfig(f"{str(model_name).split('/')[-1]}-ABKD")
    if isinstance(args, ABKDConfig):
        return args
    if isinstance(args, TrainingArguments):
        dict_args = args.to_dict()
        dict_args["hub_token"] = args.hub_token  # to_dict hides it
        return ABKDConfig(**dict_args)
    raise TypeError(
        f"`args` must be an ABKDConfig or TrainingArguments, got {type(args).__name__}."
    )
