"""Per-token statistics logged next to the loss: entropies, top-1 agreement, token accuracy.

They are computed from logits that the loss computation already has in hand (a tile of the fused
kernel, a chunk of the materialised logits), so logging them never rebuilds a logits tensor.

Definitions, per supervised position (`V` the tokenizer's vocabulary, temperature 1):

* `student_entropy` / `teacher_entropy`: `H(q) = -sum_k q_k log q_k` in nats, of the model's
  own next-token distribution, i.e. the distribution it samples from at generation time. Loss
  temperature does not enter: it shapes the objective, not the model. The student's is what
  TRL's `SFTTrainer` logs as `entropy`.
* `token_accuracy`: 1 where the student's top-1 token is the target (SFTTrainer's
  `mean_token_accuracy`).
* `teacher_agreement`: 1 where the student's and the teacher's top-1 tokens are the same.

A row whose logits hold a NaN or `+inf` has a non-finite entropy (`-inf` logits, i.e. banned
tokens, are fine: they contribute `0 log 0 = 0`), which is how the trainer detects non-finite
outputs without another pass; such a row never counts as agreeing or accurate.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from abkd_trainer.divergences.chunked import default_chunk_size
from abkd_trainer.divergences.pointwise import LOG_PROB_FLOOR

__all__ = [
    "TokenStatistics",
    "log_probs_and_entropy",
    "row_statistics",
    "token_statistics",
]


class TokenStatistics(NamedTuple):
    """Per-row statistics `(n,)`, or their sums (scalars), in fp32 (float64 for float64 logits).

    `teacher_agreement` and `token_accuracy` are 1.0 / 0.0 per row.
    """

    student_entropy: torch.Tensor
    teacher_entropy: torch.Tensor
    teacher_agreement: torch.Tensor
    token_accuracy: torch.Tensor


def log_probs_and_entropy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(log_probs, probs, entropy)` of `(n, V)` logits, in fp32 or wider.

    `log_probs` and `probs` are `(n, V)`, `entropy` `(n,)` in nats. `-inf` logits give
    probability 0 and no entropy contribution; NaN or `+inf` logits give a NaN entropy.
    """
    log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
    probs = log_probs.exp()
    # clamp keeps NaN (a broken row must stay visible) but turns 0 * -inf into 0 * floor = 0.
    entropy = -(probs * log_probs.clamp(min=LOG_PROB_FLOOR)).sum(-1)
    return log_probs, probs, entropy


def row_statistics(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    student_entropy: torch.Tensor | None = None,
) -> TokenStatistics:
    """Per-row `TokenStatistics` of `(n, V)` logits and `(n,)` target ids.

    `student_entropy` may be passed when the caller already has it (the fused kernel shares the
    student's softmax with its cross-entropy).
    """
    if student_entropy is None:
        student_entropy = log_probs_and_entropy(student_logits)[2]
    teacher_entropy = log_probs_and_entropy(teacher_logits)[2]
    return statistics_against_teacher(
        student_logits, student_entropy, teacher_entropy, teacher_logits.argmax(-1), labels
    )


def statistics_against_teacher(
    student_logits: torch.Tensor,
    student_entropy: torch.Tensor,
    teacher_entropy: torch.Tensor,
    teacher_top1: torch.Tensor,
    labels: torch.Tensor,
) -> TokenStatistics:
    """`TokenStatistics` from the student's `(n, V)` logits and `(n,)` entropies and
    whatever summary of the teacher there is: its `(n,)` entropies (nats) and top-1 ids (from
    live logits or a cache). A row whose entropy is not finite never counts as agreeing."""
    finite = torch.isfinite(student_entropy) & torch.isfinite(teacher_entropy)
    student_top1 = student_logits.argmax(-1)
    agreement = (student_top1 == teacher_top1) & finite
    accuracy = (student_top1 == labels) & torch.isfinite(student_entropy)
    return TokenStatistics(
        student_entropy=student_entropy,
        teacher_entropy=teacher_entropy,
        teacher_agreement=agreement.to(student_entropy.dtype),
        token_accuracy=accuracy.to(student_entropy.dtype),
    )


@torch.no_grad()
def token_statistics(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    chunk_size: int | None = None,
) -> TokenStatistics:
    """Sums of `TokenStatistics` over the positions where `mask` is True.

    Args:
        student_logits: `(..., V)` the student's logits (any float dtype, not modified).
        teacher_logits: `(..., V)` the teacher's, same shape.
        targets: `(...)` next-token ids (only read where `mask` is True).
        mask: `(...)` bool, the supervised positions.
        chunk_size: rows per fp32 temporary; None picks `default_chunk_size(V, device)`.

    Returns:
        Scalar sums (divide by `mask.sum()` for means), fp32 (float64 for float64 logits).
    """
    vocab = student_logits.shape[-1]
    rows = mask.reshape(-1).nonzero().squeeze(-1)
    student_2d = student_logits.reshape(-1, vocab)
    teacher_2d = teacher_logits.reshape(-1, vocab)
    targets_1d = targets.reshape(-1)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    sums = torch.zeros(len(TokenStatistics._fields), dtype=dtype, device=student_logits.device)
    for index in rows.split(chunk_size or default_chunk_size(vocab, student_logits.device)):
        statistics = row_statistics(
            student_2d.index_select(0, index),
            teacher_2d.index_select(0, index),
            targets_1d.index_select(0, index),
        )
        sums += torch.stack([value.sum() for value in statistics])
    return TokenStatistics(*sums.unbind())
