"""Teacher and student classifiers: loading by name, freezing and placing the teacher, PEFT.

Any model whose output has `.logits` of shape `(batch, num_labels)` can be distilled. Given by
name or path, a model is loaded with the transformers Auto class of its task, picked from the
config's `architectures` (image, sequence or audio classification), from safetensors weights.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
from typing import TYPE_CHECKING, Any

import torch.nn as nn
from transformers import (
    AutoConfig,
    AutoModelForAudioClassification,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    PreTrainedModel,
)
from transformers.models.auto import modeling_auto
from transformers.utils import SAFE_WEIGHTS_NAME

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel

logger = logging.getLogger(__name__)
__all__ = [
    "CLASSIFICATION_TASKS",
    "classification_task",
    "classifier_head_modules",
    "forward_parameters",
    "load_classifier",
    "model_name",
    "restore_renamed_checkpoint_weights",
    "wrap_with_peft",
]

# Hub task name -> (Auto class, model_type -> architecture name(s) of that task).
CLASSIFICATION_TASKS: dict[str, tuple[type, dict[str, Any]]] = {
    "image-classification": (
        AutoModelForImageClassification,
        modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
    ),
    "text-classification": (
        AutoModelForSequenceClassification,
        modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    ),
    "audio-classification": (
        AutoModelForAudioClassification,
        modeling_auto.MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES,
    ),
}


def _architecture_names(mapping: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    for value in mapping.values():
        names.update((value,) if isinstance(value, str) else value)
    return names


def _task_of(architectures: list[str] | None, model_type: str | None) -> str | None:
    """The classification task of a config, from its architectures, else its model type."""
    for architecture in architectures or ():
        for task, (_, mapping) in CLASSIFICATION_TASKS.items():
            if architecture in _architecture_names(mapping):
                return task
    if architectures:
        return None  # saved as something else (a base model, a causal LM)
    tasks = [task for task, (_, mapping) in CLASSIFICATION_TASKS.items() if model_type in mapping]
    return tasks[0] if len(tasks) == 1 else None


def classification_task(model: nn.Module) -> str | None:
    """`"image-classification"`, `"text-classification"`, `"audio-classification"` or None."""
    config = getattr(model, "config", None)
    architectures = [type(_base_model(model)).__name__]
    return _task_of(architectures, getattr(config, "model_type", None))


def load_classifier(
    name_or_path: str, init_kwargs: dict[str, Any] | None, *, who: str
) -> PreTrainedModel:
    """Load a classifier with the Auto class of its task, from safetensors weights.

    Args:
        name_or_path: a Hub id or a local directory saved with `save_pretrained`.
        init_kwargs: keyword arguments of `from_pretrained` (`dtype`, `num_labels`, ...).
            `use_safetensors` defaults to True and `device_map` to None (the trainer places
            the model).
        who: `"teacher"` or `"student"`, for messages.

    Raises:
        ValueError: the config names no image, sequence or audio classification architecture.
    """
    kwargs = dict(init_kwargs or {})
    trust_remote_code = kwargs.get("trust_remote_code", False)
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    task = _task_of(getattr(config, "architectures", None), config.model_type)
    if task is None:
        saved_as = getattr(config, "architectures", None) or config.model_type
        raise ValueError(
            f"The {who} {name_or_path!r} is saved as {saved_as!r}, "
            "which is not an image, sequence or audio classification model "
            "(AutoModelForImageClassification, AutoModelForSequenceClassification, "
            f"AutoModelForAudioClassification). Load the {who} yourself and pass the instance."
        )
    kwargs.setdefault("use_safetensors", True)
    kwargs.setdefault("device_map", None)
    auto_class = CLASSIFICATION_TASKS[task][0]
    return auto_class.from_pretrained(name_or_path, **kwargs)


def model_name(model: nn.Module, source: str | None = None) -> str:
    """How to name a model in messages and model cards: its source, Hub id or class."""
    config = getattr(model, "config", None)
    return source or getattr(config, "_name_or_path", "") or type(_base_model(model)).__name__


def forward_parameters(model: nn.Module) -> list[str]:
    """The named arguments of the (unwrapped) model's `forward`."""
    parameters = inspect.signature(_base_model(model).forward).parameters.values()
    return [p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]



def classifier_head_modules(model: nn.Module) -> list[str]:
    """The names of the modules around a classifier's backbone: its (new) head.

    These are the direct children of the model that hold parameters, other than the backbone
    (`model.base_model_prefix`): `["classifier"]` for ViT, ResNet or BERT classifiers,
    `["projector", "classifier"]` for Wav2Vec2, `["pre_classifier", "classifier"]` for
    DistilBERT.
    """
    backbone = getattr(model, "base_model_prefix", None)
    return [
        name
        for name, child in model.named_children()
        if name != backbone and any(True for _ in child.parameters())
    ]


def wrap_with_peft(model: nn.Module, peft_config: PeftConfig) -> PeftModel:
    """`model` with adapters from `peft_config`, its classifier head fully trainable.

    The head is added to a copy of `peft_config.modules_to_save` (as PEFT does for
    `task_type="SEQ_CLS"`): a student's head is usually new or re-sized, and a frozen random
    head could not learn the classes. Pass a `PeftModel` instead to keep the head frozen.
    """
    from peft import get_peft_model

    config = copy.deepcopy(peft_config)
    head = classifier_head_modules(model)
    modules = list(getattr(config, "modules_to_save", None) or [])
    config.modules_to_save = modules + [name for name in head if name not in modules]
    return get_peft_model(model, config)


def restore_renamed_checkpoint_weights(model: nn.Module, checkpoint: str | os.PathLike) -> bool:
    """Load a checkpoint's weights into `model` when they were saved under other key names.

    transformers 5 saves some models (ViT, for one) under their original checkpoint key names
    and renames the keys back in `from_pretrained`, but `Trainer` resumes with
    `load_state_dict(strict=False)` on the saved keys, which then match nothing, so the run would
    silently continue from the weights it was built with (transformers issue #43701). When the
    saved keys are not the model's, the weights are loaded here through `from_pretrained`;
    Trainer's own load then changes nothing (and warns about the keys it could not place).

    Args:
        model: the student as trained (not a PEFT or DeepSpeed-wrapped model).
        checkpoint: a `checkpoint-<step>` folder written by Trainer.

    Returns:
        Whether the weights were loaded here.
    """
    from accelerate.utils import is_peft_model
    from safetensors import safe_open

    weights = os.path.join(checkpoint, SAFE_WEIGHTS_NAME)
    if is_peft_model(model) or not os.path.isfile(weights):
        return False  # adapters are loaded by PEFT; sharded or .bin checkpoints are left alone
    with safe_open(weights, framework="pt") as handle:
        saved_keys = set(handle.keys())
    if saved_keys <= set(model.state_dict()):
        return False
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    reloaded = type(model).from_pretrained(checkpoint, dtype=dtype, device_map=None)
    model.load_state_dict(reloaded.state_dict())
    logger.info(
        "Loaded the student from %s with its saved key names converted; Trainer's warnings "
        "about missing and unexpected keys that follow are expected.",
        checkpoint,
    )
    return True


def _base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT or DeepSpeed wrapper."""
    from accelerate.utils import is_peft_model

    if is_peft_model(model):
        return model.get_base_model()
    module = getattr(model, "module", None)  # DeepSpeed / DDP wrappers
    return module if isinstance(module, nn.Module) else model
