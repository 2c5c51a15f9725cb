"""Non-finite numbers stop training where they appear, never after they reach the student.

One NaN in a frozen teacher (a corrupted weight, an fp16 overflow) turns every student weight NaN
within one optimizer step, and nothing downstream notices: the loss logs as NaN or 0, argmax of
NaN rows "agrees", and `save_model` writes the broken model. Two checks prevent that:

* at construction, `check_finite_outputs` runs each model on a few tokens (under the
  training autocast) and names the non-finite parameters if the logits are not finite;
* at every loss computation, `check_finite_step` reads sums the loss pass computes anyway
  (both models' entropies over the supervised positions, which are finite exactly when every
  log-probability is, and the loss) and raises before backward and the optimizer step, so the
  student and the last checkpoint stay as they were.

Neither check needs another pass over the vocabulary; the per-step check costs one device-to-host
read of three scalars.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = [
    "NonFiniteError",
    "check_finite_outputs",
    "check_finite_step",
    "non_finite_parameters",
    "probe_input_ids",
]

_LIKELY_CAUSES = (
    "Likely causes: an fp16 overflow (load the model in bfloat16 or float32, e.g. "
    '`teacher_model_init_kwargs={"dtype": "bfloat16"}` / `--dtype bfloat16`, or train with '
    "`bf16=True` instead of `fp16=True`) or corrupted weights (NaN/inf in the checkpoint)."
)


class NonFiniteError(FloatingPointError):
    """A model produced NaN or infinite outputs where the loss reads them."""


def probe_input_ids(model: nn.Module, num_tokens: int = 4) -> torch.Tensor:
    """`(1, num_tokens)` token ids `0, 1, ...` on `model`'s device, for start-up probes."""
    vocab_size = model.config.get_text_config().vocab_size
    return torch.arange(min(num_tokens, vocab_size), device=model.device).unsqueeze(0)


def non_finite_parameters(model: nn.Module, limit: int = 5) -> list[str]:
    """Names (with NaN/inf counts) of up to `limit` parameters or buffers that are not finite.

    Partitioned parameters (DeepSpeed ZeRO-3 shards, shape `(0,)`) are skipped.
    """
    found = []
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        bad = int((~torch.isfinite(tensor.detach())).sum())
        if bad:
            found.append(f"{name} ({bad} of {tensor.numel()} values)")
            if len(found) == limit:
                break
    return found


@torch.no_grad()
def check_finite_outputs(who: str, model: nn.Module, logits: torch.Tensor | None = None) -> None:
    """Raise `NonFiniteError` unless `model`'s logits on a short probe are all finite.

    Args:
        who: `"teacher"` or `"student"`, for the message.
        model: a transformers causal LM (in eval mode for a deterministic probe).
        logits: `(1, n, V)` logits of `probe_input_ids` if the caller already ran them;
            otherwise the model is run here (call it under the training autocast).
    """
    if logits is None:
        logits = model(input_ids=probe_input_ids(model), use_cache=False).logits
    if bool(torch.isfinite(logits).all()):
        return
    culprits = non_finite_parameters(model)
    where = (
        f" Non-finite weights: {', '.join(culprits)}."
        if culprits
        else " Every weight is finite, so the overflow happens in the forward pass."
    )
    raise NonFiniteError(
        f"The {who} ({type(model).__name__}) gives non-finite logits on a {logits.shape[1]}-token "
        f"probe input, so it cannot be distilled {'from' if who == 'teacher' else 'into'}."
        f"{where} {_LIKELY_CAUSES}"
    )


def check_finite_step(
    *,
    teacher_entropy_sum: torch.Tensor,
    student_entropy_sum: torch.Tensor,
    loss: torch.Tensor,
    step: int,
    training: bool,
) -> None:
    """Raise `NonFiniteError` if this micro-batch's teacher, student or loss is not finite.

    Args:
        teacher_entropy_sum: the sum of the teacher's per-token entropy over the supervised
            positions of the micro-batch (non-finite iff some log-probability is).
        student_entropy_sum: the same sum for the student.
        loss: the scalar loss about to be back-propagated.
        step: the optimizer step being computed (`state.global_step + 1` in training).
        training: whether this is a training step (else an evaluation after step `step`).
    """
    values = torch.stack([teacher_entropy_sum, student_entropy_sum, loss]).detach()
    teacher_ok, student_ok, loss_ok = torch.isfinite(values.float()).tolist()  # one host read
    if teacher_ok and student_ok and loss_ok:
        return
    when = (
        f"at training step {step}; training stopped before this step's optimizer update, so the "
        "student and the last saved checkpoint are unaffected"
        if training
        else f"during the evaluation after step {step}"
    )
    if not teacher_ok:
        raise NonFiniteError(
            f"The teacher's log-probabilities are not finite at supervised positions ({when}). "
            f"{_LIKELY_CAUSES} `abkd_trainer.core.numerics.non_finite_parameters(teacher)` lists "
            "non-finite weights."
        )
    if not student_ok:
        raise NonFiniteError(
            f"The student's logits are not finite at supervised positions ({when}). The student "
            "diverged (lower `learning_rate`, set `max_grad_norm`) or overflowed in half "
            f"precision. {_LIKELY_CAUSES}"
        )
    raise NonFiniteError(
        f"The loss is not finite ({when}) although both models' outputs are. Please report this "
        "with the divergence settings (`divergence`, `alpha`, `beta`, `temperature`)."
    )
