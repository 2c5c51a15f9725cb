"""Student and teacher as the loss sees them.

Loading and placing the frozen teacher, the checks that the two models can be compared token by
token (one vocabulary, finite outputs, logits the fused loss can rebuild), and the way the fused
loss reaches a causal LM's decoder and LM head without building its logits. Used by
`ABKDTrainer` and by the teacher-cache writer, so that both load and check
a teacher the same way.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.logging import get_logger
from accelerate.utils import is_peft_model
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from trl.trainer.utils import create_model_from_path, get_config_model_id

from abkd_trainer.core.numerics import check_finite_outputs, probe_input_ids
from abkd_trainer.divergences.fused_linear import LogitTransform

if TYPE_CHECKING:
    from accelerate import Accelerator

    from abkd_trainer.lm.config import ABKDConfig

logger = get_logger(__name__)


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside `model` (a PEFT model's base, with its adapters)."""
    return model.get_base_model() if is_peft_model(model) else model


def final_hidden_states(causal_lm: nn.Module, model_inputs: dict[str, Any]) -> torch.Tensor:
    """`(batch, seq, H)` hidden states the LM head would project (after the final norm).

    `base_model` is the decoder of a causal LM (`model`, `transformer`, ...): what the
    model's own forward runs before its LM head.
    """
    return causal_lm.base_model(**model_inputs).last_hidden_state


def load_teacher(name_or_path: str, args: ABKDConfig) -> PreTrainedModel:
    """Load the teacher with `args.teacher_model_init_kwargs` (dtype, attention, ...)."""
    init_kwargs = dict(args.teacher_model_init_kwargs or {})
    # The teacher goes whole onto the student's device; "auto" would spread it over every GPU.
    init_kwargs.setdefault("device_map", None)
    init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return create_model_from_path(name_or_path, **init_kwargs)



def check_shared_vocabulary(
    student: nn.Module,
    teacher: nn.Module | None,
    tokenizer: PreTrainedTokenizerBase,
    *,
    teacher_name: str,
    teacher_source: str | None,
    trust_remote_code: bool = False,
) -> None:
    """Raise early if teacher and student cannot share `tokenizer`.

    Both models need at least `len(tokenizer)` logits (more is embedding padding), and a
    teacher saved with a tokenizer must have this one's vocabulary, id by id. `teacher_source`
    is the name or path the teacher was loaded from (None for an instance). Without a teacher
    (training from a cache, whose tokenizer was checked when it was attached) only the student is
    checked.
    """
    vocab_size = len(tokenizer)
    student_name = get_config_model_id(student.config) or type(student).__name__
    widths = {f"student ({student_name})": student.config.get_text_config().vocab_size}
    if teacher is not None:
        widths[f"teacher ({teacher_name})"] = teacher.config.get_text_config().vocab_size
    for who, width in widths.items():
        if width < vocab_size:
            raise ValueError(
                f"The {who} has {width} output logits but the tokenizer has {vocab_size} "
                "tokens, so they cannot share it. Teacher and student must use the same "
                "tokenizer: pick a teacher from the student's model family (padded embedding "
                "rows are fine)."
            )
    if teacher is None:
        return
    teacher_tokenizer = _saved_tokenizer(teacher, teacher_source, trust_remote_code)
    if teacher_tokenizer is None:
        return
    student_vocab = tokenizer.get_vocab()
    teacher_vocab = teacher_tokenizer.get_vocab()
    if student_vocab != teacher_vocab:
        differing = sorted(
            set(student_vocab.items()) ^ set(teacher_vocab.items()), key=lambda item: item[1]
        )
        raise ValueError(
            f"The teacher's tokenizer ({teacher_tokenizer.name_or_path or teacher_name}, "
            f"{len(teacher_vocab)} tokens) differs from the student's processing_class "
            f"({tokenizer.name_or_path or 'given tokenizer'}, {len(student_vocab)} "
            f"tokens); first differing entry (token, id): {differing[0]}. ABKD compares "
            "next-token distributions id by id, so both models must share one vocabulary. Use "
            "a teacher from the student's model family."
        )


def _saved_tokenizer(
    model: nn.Module, source: str | None, trust_remote_code: bool
) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved with `model`, when there is one to compare against."""
    location = source or get_config_model_id(model.config)
    # An instantiated teacher is only checked against a local tokenizer: looking a bare model id
    # up on the Hub at construction would surprise users who built the teacher offline.
    if not location or (source is None and not os.path.isdir(location)):
        return None
    try:
        return AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        logger.info(
            f"No tokenizer found for the teacher at {location!r} ({error}); "
            "skipping the vocabulary check."
        )
        return None


def fused_logit_transforms(models: dict[str, nn.Module]) -> dict[str, LogitTransform]:
    """Each causal LM's logit scale and soft-cap, after checking that the fused loss can run it.

    Args:
        models: role (`"student"`, `"teacher"`) -> the model as given (PEFT or not).

    Raises early if `use_fused_loss` cannot reproduce a model's logits from its head.
    """
    student = models.get("student")
    # (An adapter on `lm_head` is refused by SFTTrainer itself, whose log-probabilities are fused
    # the same way.)
    if student is not None and is_peft_model(student):
        from peft import PromptLearningConfig

        if any(isinstance(c, PromptLearningConfig) for c in student.peft_config.values()):
            raise ValueError(
                "`use_fused_loss=True` calls the student's decoder directly, which skips the "
                "virtual tokens of prompt-learning adapters (prompt/prefix tuning, P-tuning). "
                "Use a weight adapter such as LoRA, or set `use_fused_loss=False`."
            )
    transforms = {}
    for who, model in models.items():
        head = causal_lm(model).get_output_embeddings()
        if not isinstance(getattr(head, "weight", None), torch.Tensor):
            raise ValueError(
                f"`use_fused_loss=True` needs the {who}'s LM head to be a linear layer with "
                f"a `weight`, but `get_output_embeddings()` returned {type(head).__name__}. "
                "Set `use_fused_loss=False` for this model."
            )
        transforms[who] = LogitTransform.from_config(causal_lm(model).config)
    return transforms


def check_startup_outputs(
    models: dict[str, nn.Module],
    accelerator: Accelerator,
    fused_transforms: dict[str, LogitTransform] | None,
) -> None:
    """Run each model on a few tokens: refuse non-finite logits and, with the fused loss
    (`fused_transforms` given), logits that it would not rebuild.

    Runs in eval mode under the autocast training uses (accelerate's, for `bf16` / `fp16`),
    so that both sides of the comparison are computed in the same precision.
    """
    for who, model in models.items():
        lm = causal_lm(model)
        was_training = lm.training
        lm.eval()
        try:
            with accelerator.autocast():
                if fused_transforms is not None:
                    verify_fused_logits(who, lm, fused_transforms[who])
                else:
                    check_finite_outputs(who, lm)
        finally:
            lm.train(was_training)


@torch.no_grad()
def verify_fused_logits(who: str, causal_lm: nn.Module, transform: LogitTransform) -> None:
    """Raise unless `transform(lm_head(decoder(x)))` reproduces `causal_lm(x).logits`.

    The fused loss rebuilds the logits from the decoder's output and the head's weights; a model
    whose forward does something else to them (an unknown scaling, a second head) would silently
    train on another objective. One short forward of each kind settles it. Call it in eval mode
    and under the autocast of training: both sides then round the same way (under bf16 autocast
    the LM head's GEMM runs in bf16 on both), so the comparison is like with like.
    Non-finite logits are refused first (`nan > tolerance` would be False).
    """
    input_ids = probe_input_ids(causal_lm)
    logits = causal_lm(input_ids=input_ids, use_cache=False).logits
    check_finite_outputs(who, causal_lm, logits)
    hidden = final_hidden_states(causal_lm, {"input_ids": input_ids, "use_cache": False})
    head = causal_lm.get_output_embeddings()
    bias = getattr(head, "bias", None)
    rebuilt = transform.apply_(F.linear(hidden, head.weight, bias).float())
    logits = logits.float()
    # 16-bit logits are rounded (bf16: 8 significant bits); a missed transform is off by far more.
    device_type = hidden.device.type
    half_precision = hidden.dtype in (torch.float16, torch.bfloat16) or (
        torch.is_autocast_enabled(device_type)
        and torch.get_autocast_dtype(device_type) in (torch.float16, torch.bfloat16)
    )
    tolerance = 3e-2 if half_precision else 1e-4
    error = (logits - rebuilt).abs().max().item() if logits.shape == rebuilt.shape else math.inf
    scale = max(1.0, logits.abs().max().item())
    if not error <= tolerance * scale:
        raise ValueError(
            f"`use_fused_loss=True` rebuilds the {who}'s logits as lm_head(decoder output) with "
            f"logit scale {transform.scale} and soft-cap {transform.softcap}, but this "
            f"{type(causal_lm).__name__} computes something else (max difference {error:.3g}). "
            "Set `use_fused_loss=False` for this model."
        )
