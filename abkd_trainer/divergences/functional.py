"""Public divergence functions on logits (their names are registered in `registry`).

All functions share one keyword interface and return values in nats, computed and returned in
fp32 (float64 for float64 logits) whatever the logits' dtype:

* `student_logits`, `teacher_logits`: `(..., V)`, any float dtype, same shape. Only the
  student receives a gradient; the teacher is a constant target.
* `temperature`: divides both logit sets before the softmax. The result is **not** multiplied by
  `T**2` (as in TRL and Liger; multiply yourself for Hinton-style scaling).
* `mask`: `(...)` bool, True at the positions that count (e.g. supervised tokens).
* `reduction`: `"none"` (per position, shape `logits.shape[:-1]`), `"sum"`, or `"mean"`
  over counted positions.
* `chunk_size`: tokens per chunk of the memory-efficient driver (None: chosen from `V`).
"""

from __future__ import annotations

import torch

from abkd_trainer.divergences.chunked import chunked_divergence
from abkd_trainer.divergences.pointwise import (
    ABDivergence,
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    SkewForwardKL,
    SkewReverseKL,
    TotalVariation,
)

__all__ = [
    "ab_divergence",
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "total_variation",
]


def ab_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: float,
    beta: float,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Alpha-beta divergence D_AB^(alpha, beta)(p_teacher || q_student) per token (ABKD).

    `(1, 0)` is forward KL, `(0, 1)` reverse KL; the paper's GPT-2 recipe is `(0.2, 0.7)`.
    Exact and continuous in `(alpha, beta)`, including the limits `alpha = 0`, `beta = 0`,
    `alpha + beta = 0` and `alpha = beta = 0`.

    Args:
        student_logits: `(..., vocab)` student logits, e.g. `(batch, seq, vocab)`, any float
            dtype. The only input that receives a gradient.
        teacher_logits: `(..., vocab)` teacher logits, same shape, any float dtype; a constant
            target (no gradient).
        alpha: Hardness-concentration parameter, any finite number (1 with `beta = 0` is forward
            KL).
        beta: Confidence-concentration parameter, any finite number (1 with `alpha = 0` is reverse
            KL).
        temperature: Divides both logit sets before the softmax. The result is not multiplied by
            `T**2`.
        mask: `(...)` bool, e.g. `(batch, seq)`: True at the positions that count (the supervised
            tokens). None counts every position.
        reduction: `"none"` gives one value per position, shape `logits.shape[:-1]` (0 where
            `mask` is False); `"sum"` their sum over the counted positions; `"mean"` that sum
            divided by the number of counted positions (0 when there are none).
        chunk_size: Tokens per chunk of the memory-efficient driver (bounds its fp32
            temporaries); None picks it from the vocabulary size and the device.

    Returns:
        The divergence in nats, fp32 (float64 for float64 logits) whatever the logits' dtype: a
        scalar for `"sum"` and `"mean"`, shape `logits.shape[:-1]` for `"none"`.

    Raises:
        TypeError: The logits are not floating point.
        ValueError: The two logit tensors differ in shape, `mask` does not have the logits' shape
            without the vocabulary dimension, `temperature` is not a positive finite number,
            `reduction` is not `"none"`, `"sum"` or `"mean"`, or `chunk_size` is not a positive
            integer or None; or `alpha` or `beta` is not finite.
    """
    return chunked_divergence(
        student_logits,
        teacher_logits,
        ABDivergence(alpha, beta),
        temperature=temperature,
        mask=mask,
        reduction=reduction,
        chunk_size=chunk_size,
    )


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """KL(p_teacher || q_student), the true KL (teacher entropy included), per token.

    Args:
        student_logits: `(..., vocab)` student logits, e.g. `(batch, seq, vocab)`, any float
            dtype. The only input that receives a gradient.
        teacher_logits: `(..., vocab)` teacher logits, same shape, any float dtype; a constant
            target (no gradient).
        temperature: Divides both logit sets before the softmax. The result is not multiplied by
            `T**2`.
        mask: `(...)` bool, e.g. `(batch, seq)`: True at the positions that count (the supervised
            tokens). None counts every position.
        reduction: `"none"` gives one value per position, shape `logits.shape[:-1]` (0 where
            `mask` is False); `"sum"` their sum over the counted positions; `"mean"` that sum
            divided by the number of counted positions (0 when there are none).
        chunk_size: Tokens per chunk of the memory-efficient driver (bounds its fp32
            temporaries); None picks it from the vocabulary size and the device.

    Returns:
        The divergence in nats, fp32 (float64 for float64 logits) whatever the logits' dtype: a
        scalar for `"sum"` and `"mean"`, shape `logits.shape[:-1]` for `"none"`.

    Raises:
        TypeError: The logits are not floating point.
        ValueError: The two logit tensors differ in shape, `mask` does not have the logits' shape
            without the vocabulary dimension, `temperature` is not a positive finite number,
            `reduction` is not `"none"`, `"sum"` or `"mean"`, or `chunk_size` is not a positive
            integer or None.
    """
    return chunked_divergence(
        student_logits,
        teacher_logits,
        ForwardKL(),
        temperature=temperature,
        mask=mask,
        reduction=reduction,
        chunk_size=chunk_size,
    )


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """KL(q_student || p_teacher) per token.

    Args:
        student_logits: `(..., vocab)` student logits, e.g. `(batch, seq, vocab)`, any float
            dtype. The only input that receives a gradient.
        teacher_logits: `(..., vocab)` teacher logits, same shape, any float dtype; a constant
            target (no gradient).
        temperature: Divides both logit sets before the softmax. The result is not multiplied by
            `T**2`.
        mask: `(...)` bool, e.g. `(batch, seq)`: True at the positions that count (the supervised
            tokens). None counts every position.
        reduction: `"none"` gives one value per position, shape `logits.shape[:-1]` (0 where
            `mask` is False); `"sum"` their sum over the counted positions; `"mean"` that sum
            divided by the number of counted positions (0 when there are none).
        chunk_size: Tokens per chunk of the memory-efficient driver (bounds its fp32
            temporaries); None picks it from the vocabulary size and the device.

    Returns:
        The divergence in nats, fp32 (float64 for float64 logits) whatever the logits' dtype: a
        scalar for `"sum"` and `"mean"`, shape `logits.shape[:-1]` for `"none"`.

    Raises:
        TypeError: The logits are not floating point.
        ValueError: The two logit tensors differ in shape, `mask` does not have the logits' shape
            without the vocabulary dimension, `temperature` is not a positive finite number,
            `reduction` is not `"none"`, `"sum"` or `"mean"`, or `chunk_size` is not a positive
            integer or None.
    """
    return chunked_divergence(
        student_logits,
        teacher_logits,
        ReverseKL(),
        temperature=temperature,
        mask=mask,
        reduction=reduction,
        chunk_size=chunk_size,
    )


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float = 0.5,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """TRL's generalized JSD per token: `beta = 0` forward KL, `beta = 1` reverse KL.

    Args:
        student_logits: `(..., vocab)` student logits, e.g. `(batch, seq, vocab)`, any float
            dtype. The only input that receives a gradient.
        teacher_logits: `(..., vocab)` teacher logits, same shape, any float dtype; a constant
            target (no gradient).
        beta: Interpolation coefficient in [0, 1] (TRL's `GKDConfig.beta` convention): the
            mixture is `beta * p + (1 - beta) * q`.
        temperature: Divides both logit sets before the softmax. The result is not multiplied by
            `T**2`.
        mask: `(...)` bool, e.g. `(batch, seq)`: True at the positions that count (the supervised
            tokens). None counts every position.
        reduction: `"none"` gives one value per position, shape `logits.shape[:-1]` (0 where
            `mask` is False); `"sum"` their sum over the counted positions; `"mean"` that sum
            divided by the number of counted positions (0 when there are none).
        chunk_size: Tokens per chunk of the memory-efficient driver (bounds its fp32
            temporaries); None picks it from the vocabulary size and the device.

    Returns:
        The divergence in nats, fp32 (float64 for float64 logits) whatever the logits' dtype: a
        scalar for `"sum"` and `"mean"`, shape `logits.shape[:-1]` for `"none"`.

    Raises:
        TypeError: The logits are not floating point.
        ValueError: The two logit tensors differ in shape, `mask` does not have the logits' shape
            without the vocabulary dimension, `temperature` is not a positive finite number,
            `reduction` is not `"none"`, `"sum"` or `"mean"`, or `chunk_size` is not a positive
            integer or None; or `beta` is outside [0, 1].
    """
    return chunked_divergence(
        student_logits,
        teacher_logits,
        GeneralizedJSD(beta),
        temperature=temperature,
        mask=mask,
        reduction=reduction,
        chunk_size=chunk_size,
    )


def skew_forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    skew_lambda: float = 0.1,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """DistiLLM's skew forward KL, KL(p || lambda p + (1 - lambda) q), per token.

    Args:
        student_logits: `(..., vocab)` student logits, e.g. `(batch, seq, vocab)`, any float
            dtype. The only input that receives a gradient.
        teacher_logits: `(..., vocab)` teacher logits, same shape, any float dtype; a constant
            target (no gradient).
        skew_lambda: Skew coefficient `lambda` in [0, 1]: the teacher's share of the mixture the
            teacher is compared with (0 is forward KL).
        temperature: Divides both logit sets before the softmax. The result is not multiplied by
            `T**2`.
        mask: `(...)` bool, e.g. `(batch, seq)`: True at the positions that count (the supervised
            tokens). None counts every position.
        reduction: `"none"` gives one value per position, shape `logits.shape[:-1]` (0 where
            `mask` is False); `"sum"` their sum over the counted positions; `"mean"` that sum
            divided by the number of counted positions (0 when there are none).
        chunk_size: Tokens per chunk of the memory-efficient driver (bounds its fp32
            temporaries); None picks it from the vocabulary size and the device.

    Returns:
        The divergence in nats, fp32 (float64 for float64 logits) whatever the logits' dtype: a
        scalar for `"sum"` and `"mean"`, shape `logits.shape[:-1]` for `"none"`.

    Raises:
        TypeError: The logits are not floating point.
        ValueError: The two logit tensors differ in shape, `mask` does not have the logits' shape
            without the vocabulary dimension, `temperature` is not a positive finite number,
            `reduction` is not `"none"`, `"sum"` or `"mean"`, or `chunk_size` is not a positive
            integer or None; or `skew_lambda` is outside [0, 1].
    """
    return chunked_divergence(
        student_logits,
        teacher_logits,
        SkewForwardKL(skew_lambda),
        temperature=temperature,
        mask=mask,
        reduction=reduction,
        chunk_size=chunk_size,
    )


def skew_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    skew_lambda: float = 0.1,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """DistiLLM's skew reverse KL, KL(q || lambda q + (1 - lambda) p), per token.

    Args:
        student_logits: `(..., vocab)` student logits, e.g. `(batch, seq, vocab)`, any float
            dtype. The only input that receives a gradient.
        teacher_logits: `(..., vocab)` teacher logits, same shape, any float dtype; a constant
            target (no gradient).
        skew_lambda: Skew coefficient `lambda` in [0, 1]: the student's share of the mixture the
            student is compared with (0 is reverse KL).
        temperature: Divides both logit sets before the softmax. The result is not multiplied by
            `T**2`.
        mask: `(...)` bool, e.g. `(batch, seq)`: True at the positions that count (the supervised
            tokens). None counts every position.
        reduction: `"none"` gives one value per position, shape `logits.shape[:-1]` (0 where
            `mask` is False); `"sum"` their sum over the counted positions; `"mean"` that sum
            divided by the number of counted positions (0 when there are none).
        chunk_size: Tokens per chunk of the memory-efficient driver (bounds its fp32
            temporaries); None picks it from the vocabulary size and the device.

    Returns:
        The divergence in nats, fp32 (float64 for float64 logits) whatever the logits' dtype: a
        scalar for `"sum"` and `"mean"`, shape `logits.shape[:-1]` for `"none"`.

    Raises:
        TypeError: The logits are not floating point.
        ValueError: The two logit tensors differ in shape, `mask` does not have the logits' shape
            without the vocabulary dimension, `temperature` is not a positive finite number,
            `reduction` is not `"none"`, `"sum"` or `"mean"`, or `chunk_size` is not a positive
            integer or None; or `skew_lambda` is outside [0, 1].
    """
    return chunked_divergence(
        student_logits,
        teacher_logits,
        SkewReverseKL(skew_lambda),
        temperature=temperature,
        mask=mask,
        reduction=reduction,
        chunk_size=chunk_size,
    )


def total_variation(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Total variation distance 0.5 * sum_k |p_k - q_k| per token.

    Args:
        student_logits: `(..., vocab)` student logits, e.g. `(batch, seq, vocab)`, any float
            dtype. The only input that receives a gradient.
        teacher_logits: `(..., vocab)` teacher logits, same shape, any float dtype; a constant
            target (no gradient).
        temperature: Divides both logit sets before the softmax. The result is not multiplied by
            `T**2`.
        mask: `(...)` bool, e.g. `(batch, seq)`: True at the positions that count (the supervised
            tokens). None counts every position.
        reduction: `"none"` gives one value per position, shape `logits.shape[:-1]` (0 where
            `mask` is False); `"sum"` their sum over the counted positions; `"mean"` that sum
            divided by the number of counted positions (0 when there are none).
        chunk_size: Tokens per chunk of the memory-efficient driver (bounds its fp32
            temporaries); None picks it from the vocabulary size and the device.

    Returns:
        The divergence in nats, fp32 (float64 for float64 logits) whatever the logits' dtype: a
        scalar for `"sum"` and `"mean"`, shape `logits.shape[:-1]` for `"none"`.

    Raises:
        TypeError: The logits are not floating point.
        ValueError: The two logit tensors differ in shape, `mask` does not have the logits' shape
            without the vocabulary dimension, `temperature` is not a positive finite number,
            `reduction` is not `"none"`, `"sum"` or `"mean"`, or `chunk_size` is not a positive
            integer or None.
    """
    return chunked_divergence(
        student_logits,
        teacher_logits,
        TotalVariation(),
        temperature=temperature,
        mask=mask,
        reduction=reduction,
        chunk_size=chunk_size,
    )
