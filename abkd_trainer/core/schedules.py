"""Schedules of the alpha-beta divergence's `(alpha, beta)` over training.

Two pieces, applied in this order:

1. **Warm-up** (on by default): training starts at `(alpha, beta) = (1, 0)`, forward KL, and
   moves along a straight line to the configured `(alpha, beta)` over the first
   `ab_warmup_steps` optimizer steps (or `ceil(ab_warmup_ratio * max_steps)`; by default
   the whole run), then holds.
   Why: with `alpha + beta < 1` (the paper's `(0.2, 0.7)`) the divergence contains
   `+ sum_k q_k^(a+b) / (a (a+b))`, which a peaked student lowers on *any* token, and the
   gradient on a logit carries `q_k^beta`, so a student that does not yet overlap the teacher
   collapses onto wrong tokens and stays there. Forward KL has neither effect: it first pulls the
   student's mass onto the teacher's support, after which the mode-seeking setting refines it.
2. **Linear end schedule** (`alpha_end` / `beta_end`, off by default): after the warm-up,
   `(alpha, beta)` moves linearly from the configured values to `(alpha_end, beta_end)` over
   the remaining steps. Without a warm-up this is the plain linear schedule over all steps; and
   with an end schedule the default warm-up is off (it is a path of its own), unless
   `ab_warmup_ratio` / `ab_warmup_steps` ask for one.

The straight line from `(1, 0)` to `(alpha, beta)` is also linear in `alpha` and in
`alpha + beta` (the quantities the authors' scripts schedule), and since the divergence is
continuous in `(alpha, beta)` everywhere, the path crosses no discontinuity.

Everything is a pure function of the optimizer step, so a resumed run continues the same
schedule from its checkpoint's `global_step`.
"""

from __future__ import annotations

import math
from typing import Protocol


class AlphaBetaSettings(Protocol):
    """The fields of a config that schedule `(alpha, beta)`: those of `DivergenceArguments`.

    Both [`ABKDConfig`][abkd_trainer.lm.config.ABKDConfig] and
    [`ABKDClassifierConfig`][abkd_trainer.classification.config.ABKDClassifierConfig] have them;
    any object with these attributes (a namespace in a test) works too.

    Attributes:
        alpha: The configured alpha, reached at the end of the warm-up.
        beta: The configured beta, reached at the end of the warm-up.
        alpha_end: Alpha at the last step of a linear end schedule; None holds `alpha`.
        beta_end: Beta at the last step of a linear end schedule; None holds `beta`.
        ab_warmup_ratio: Fraction of the optimizer steps the warm-up takes; None: the default
            (see [`effective_warmup_ratio`][abkd_trainer.core.schedules.effective_warmup_ratio]).
        ab_warmup_steps: Warm-up length in optimizer steps; overrides the ratio when > 0.
        ab_warmup_start_alpha: Alpha at step 0 of the warm-up (1.0: forward KL with beta 0).
        ab_warmup_start_beta: Beta at step 0 of the warm-up.
        ab_warmup_shape: Speed along the warm-up path, a key of `WARMUP_SHAPES` (`"linear"` or
            `"cosine"`).
    """

    alpha: float
    beta: float
    alpha_end: float | None
    beta_end: float | None
    ab_warmup_ratio: float | None
    ab_warmup_steps: int
    ab_warmup_start_alpha: float
    ab_warmup_start_beta: float
    ab_warmup_shape: str


# The default warm-up covers the whole run. Measured on the demo (docs/collapse-and-warmup.md):
# from random weights ratio 1.0 scored 77 where 0.5 scored 65 and 0.1 30; from a fine-tuned
# student 1.0 and 0.5 tied (52.6 and 53.6), both above forward KL (45.3).
DEFAULT_WARMUP_RATIO = 1.0
# Shapes of the warm-up: progress p in [0, 1] -> fraction of the way from the start to the target.
WARMUP_SHAPES: dict[str, str] = {
    "linear": "constant speed along the path",
    "cosine": "half-cosine ease, 0.5 * (1 - cos(pi * p)): slow at both ends",
}


def linear_schedule(start: float, end: float | None, step: int, total_steps: int) -> float:
    """A hyper-parameter moving linearly from `start` (step 0) to `end` (step `total_steps`).

    Args:
        start: The value at step 0.
        end: The value at step `total_steps` and after; None holds `start` (a constant).
        step: The optimizer step (0-based); steps outside `[0, total_steps]` are clamped.
        total_steps: The number of steps the move takes; `<= 0` gives `start`.

    Returns:
        The value at `step`.
    """
    if end is None or total_steps <= 0:
        return start
    progress = min(max(step / total_steps, 0.0), 1.0)
    return start + (end - start) * progress


def effective_warmup_ratio(args: AlphaBetaSettings) -> float:
    """The warm-up ratio a config asks for, its None default resolved.

    Args:
        args: A config with the scheduling fields (see
            [`AlphaBetaSettings`][abkd_trainer.core.schedules.AlphaBetaSettings]).

    Returns:
        `args.ab_warmup_ratio` when set; for None (the default) `DEFAULT_WARMUP_RATIO` (1.0, the
        whole run), or 0.0 when `alpha_end` / `beta_end` are set (an explicit path of their own).
    """
    if args.ab_warmup_ratio is not None:
        return args.ab_warmup_ratio
    if args.alpha_end is not None or args.beta_end is not None:
        return 0.0
    return DEFAULT_WARMUP_RATIO


def resolve_warmup_steps(total_steps: int, warmup_steps: int = 0, warmup_ratio: float = 0.0) -> int:
    """Number of warm-up steps, with TrainingArguments' convention: `warmup_steps` wins when > 0.

    Args:
        total_steps: The run's optimizer steps (`max_steps`); negative counts as 0.
        warmup_steps: Warm-up length in steps; used when > 0.
        warmup_ratio: Fraction of `total_steps`, used when `warmup_steps` is 0:
            `ceil(warmup_ratio * total_steps)` steps.

    Returns:
        The warm-up length in optimizer steps, never more than `total_steps` (nor below 0).
    """
    steps = warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * max(total_steps, 0))
    return min(steps, max(total_steps, 0))


def _eased(progress: float, shape: str) -> float:
    progress = min(max(progress, 0.0), 1.0)
    if shape == "linear":
        return progress
    if shape == "cosine":
        return 0.5 * (1.0 - math.cos(math.pi * progress))
    raise ValueError(f"Unknown warm-up shape {shape!r}; choose one of {', '.join(WARMUP_SHAPES)}.")


def alpha_beta_at_step(
    step: int,
    total_steps: int,
    *,
    alpha: float,
    beta: float,
    alpha_end: float | None = None,
    beta_end: float | None = None,
    warmup_steps: int = 0,
    warmup_start: tuple[float, float] = (1.0, 0.0),
    warmup_shape: str = "linear",
) -> tuple[float, float]:
    """`(alpha, beta)` for the optimizer step `step` (0-based) of a `total_steps`-step run.

    Steps `0 .. warmup_steps - 1` move from `warmup_start` towards `(alpha, beta)`, reached
    at step `warmup_steps`; then `(alpha, beta)` moves linearly to `(alpha_end, beta_end)`
    over the remaining steps, reached at `total_steps`.

    Args:
        step: The optimizer step, 0-based (the trainer's `global_step`).
        total_steps: The run's optimizer steps. With `total_steps <= 0` (no training planned,
            e.g. `evaluate()` alone) the configured `(alpha, beta)` is returned.
        alpha: The alpha reached at the end of the warm-up.
        beta: The beta reached at the end of the warm-up.
        alpha_end: Alpha at `total_steps`; None holds `alpha` after the warm-up.
        beta_end: Beta at `total_steps`; None holds `beta` after the warm-up.
        warmup_steps: Warm-up length in steps, clamped to `[0, total_steps]`; 0 disables it.
        warmup_start: `(alpha, beta)` at step 0 of the warm-up; `(1.0, 0.0)` is forward KL.
        warmup_shape: Speed along the warm-up path: `"linear"` or `"cosine"` (a key of
            `WARMUP_SHAPES`).

    Returns:
        The `(alpha, beta)` pair at `step`.

    Raises:
        ValueError: `warmup_shape` is not a key of `WARMUP_SHAPES` (raised at a warm-up step).
    """
    if total_steps <= 0:
        return alpha, beta
    warmup_steps = min(max(warmup_steps, 0), total_steps)
    if step < warmup_steps:
        fraction = _eased(step / warmup_steps, warmup_shape)
        start_alpha, start_beta = warmup_start
        return (
            start_alpha + (alpha - start_alpha) * fraction,
            start_beta + (beta - start_beta) * fraction,
        )
    remaining = total_steps - warmup_steps
    return (
        linear_schedule(alpha, alpha_end, step - warmup_steps, remaining),
        linear_schedule(beta, beta_end, step - warmup_steps, remaining),
    )


def scheduled_alpha_beta(
    args: AlphaBetaSettings, step: int, total_steps: int
) -> tuple[float, float]:
    """`(alpha, beta)` of a config at an optimizer step, warm-up and end schedule applied.

    Args:
        args: An [`ABKDConfig`][abkd_trainer.lm.config.ABKDConfig],
            [`ABKDClassifierConfig`][abkd_trainer.classification.config.ABKDClassifierConfig] or
            any object with the fields of
            [`AlphaBetaSettings`][abkd_trainer.core.schedules.AlphaBetaSettings].
        step: The optimizer step, 0-based.
        total_steps: The run's optimizer steps (`max_steps`).

    Returns:
        The `(alpha, beta)` pair at `step`, as
        [`alpha_beta_at_step`][abkd_trainer.core.schedules.alpha_beta_at_step] computes it.

    Raises:
        ValueError: `args.ab_warmup_shape` is not a key of `WARMUP_SHAPES` (at a warm-up step).
    """
    return alpha_beta_at_step(
        step,
        total_steps,
        alpha=args.alpha,
        beta=args.beta,
        alpha_end=args.alpha_end,
        beta_end=args.beta_end,
        warmup_steps=resolve_warmup_steps(
            total_steps, args.ab_warmup_steps, effective_warmup_ratio(args)
        ),
        warmup_start=(args.ab_warmup_start_alpha, args.ab_warmup_start_beta),
        warmup_shape=args.ab_warmup_shape,
    )
