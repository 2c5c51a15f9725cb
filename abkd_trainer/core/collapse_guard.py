"""A warning when the student collapses onto tokens the teacher does not choose.

With `alpha + beta < 1` the alpha-beta divergence rewards a peaked student (the term
`sum_k q_k^(alpha+beta) / (alpha (alpha+beta))`), and the gradient on a token's logit scales
with `q_k^beta`: once a student far from the teacher (a random initialisation, a different
task) has put its mass on a wrong token, nothing pulls it back. Reverse KL `(0, 1)` can show the
same zero-forcing. The symptom shows in metrics the trainer logs anyway: the student becomes *more
certain than it has reason to be* while it keeps disagreeing with the teacher.

`CollapseGuardCallback` reads the train logs and warns once when, for `patience`
consecutive logs,

1. top-1 agreement with the teacher stays low: `teacher_agreement < max_agreement` (0.6), and
2. the student's entropy is far below what either the teacher or its own agreement justifies:
   `student_entropy < entropy_ratio * max(teacher_entropy, -log(teacher_agreement))` (ratio 0.5;
   the agreement floored at 0.01),
3. and has fallen since the first train log (an over-confident student that forward KL is
   making less so is not collapsing).

`-log(agreement)` matters for near-deterministic teachers (the demo teacher's entropy is 0.16
nats), where a collapsed student is about as certain as the teacher, not far below it. Any
distribution satisfies `H(q) >= -log max_k q_k`, so by Jensen a mean entropy below `-log(a)`
means the student's mean top-1 probability exceeds `a`, the rate at which its top-1 is the
teacher's: it is more certain than its agreement allows. Condition 2 asks for less than half of
that entropy.

Measured on the shipped demo over 3 training seeds (`benchmarks/collapse_guard.py`; the table is
on the documentation's Benchmarks page): at `(alpha, beta) = (0.2, 0.7)` from random init the
student ends at entropy 0.16-0.26 nats and agreement 0.43-0.50 (cross-entropy 5-6 nats) and the
guard fires at step 80; forward KL, reverse KL, `(0.8, 0.3)` and the linear path from `(1, 0)`
into `(0.2, 0.7)` keep the student's entropy at 1.0-1.4 nats, never closer to the bound than a
factor 4.6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from abkd_trainer.divergences.registry import divergence_spec

__all__ = ["CollapseGuardCallback", "CollapseDiagnosis", "collapse_diagnosis"]

logger = logging.get_logger(__name__)

# Defaults, see the module docstring.
DEFAULT_MAX_AGREEMENT = 0.6
DEFAULT_ENTROPY_RATIO = 0.5
DEFAULT_PATIENCE = 3
# -log(0.01) = 4.6 nats caps the entropy that an agreement near zero can "justify".
_AGREEMENT_FLOOR = 0.01


@dataclass(frozen=True)
class CollapseDiagnosis:
    """What one train log says about a collapse (entropies in nats, agreement in [0, 1])."""

    student_entropy: float
    teacher_entropy: float
    teacher_agreement: float
    entropy_bound: float  # entropy_ratio * max(teacher_entropy, -log(teacher_agreement))

    @property
    def collapsing(self) -> bool:
        return self.student_entropy < self.entropy_bound


def collapse_diagnosis(
    logs: dict[str, float],
    *,
    max_agreement: float = DEFAULT_MAX_AGREEMENT,
    entropy_ratio: float = DEFAULT_ENTROPY_RATIO,
) -> CollapseDiagnosis | None:
    """The diagnosis of one train log, or None if it lacks the metrics or agreement is high.

    Args:
        logs: a train log of `ABKDTrainer` (`student_entropy`,
            `teacher_entropy`, `teacher_agreement`).
        max_agreement: agreement at or above which the student is not considered collapsing.
        entropy_ratio: the fraction of `max(teacher_entropy, -log(agreement))` below which the
            student's entropy counts as collapsed.
    """
    try:
        student = float(logs["student_entropy"])
        teacher = float(logs["teacher_entropy"])
        agreement = float(logs["teacher_agreement"])
    except (KeyError, TypeError, ValueError):
        return None
    if not all(map(math.isfinite, (student, teacher, agreement))) or agreement >= max_agreement:
        return None
    # Floored: at (near) zero agreement -log would make any entropy "too low", a uniform one too.
    warranted = -math.log(max(agreement, _AGREEMENT_FLOOR))
    return CollapseDiagnosis(student, teacher, agreement, entropy_ratio * max(teacher, warranted))


class CollapseGuardCallback(TrainerCallback):
    """Warn once when the student's entropy collapses while it disagrees with the teacher.

    Added by `ABKDTrainer` by default (remove it with
    `trainer.remove_callback(CollapseGuardCallback)`). It only reads the train logs, so it costs
    nothing and changes nothing; after it fires, `fired_at_step` and `diagnosis` say when and
    why.

    Args:
        max_agreement: top-1 agreement at or above which the student is not collapsing (0.6).
        entropy_ratio: how far below `max(teacher_entropy, -log(agreement))` the student's
            entropy must fall (0.5).
        patience: consecutive collapsing train logs needed (3), so that one noisy log never fires.
    """

    def __init__(
        self,
        max_agreement: float = DEFAULT_MAX_AGREEMENT,
        entropy_ratio: float = DEFAULT_ENTROPY_RATIO,
        patience: int = DEFAULT_PATIENCE,
    ) -> None:
        if not 0.0 < max_agreement <= 1.0:
            raise ValueError(f"`max_agreement` must lie in (0, 1], got {max_agreement}.")
        if not 0.0 < entropy_ratio <= 1.0:
            raise ValueError(f"`entropy_ratio` must lie in (0, 1], got {entropy_ratio}.")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"`patience` must be a positive integer, got {patience!r}.")
        self.max_agreement = max_agreement
        self.entropy_ratio = entropy_ratio
        self.patience = patience
        self.fired_at_step: int | None = None
        self.diagnosis: CollapseDiagnosis | None = None
        self._first_student_entropy: float | None = None
        self._streak = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._first_student_entropy = None
        self._streak = 0

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs,
    ) -> None:
        if self.fired_at_step is not None or not logs or "student_entropy" not in logs:
            return  # fired already, or an eval / summary log
        if self._first_student_entropy is None:
            self._first_student_entropy = float(logs["student_entropy"])
        diagnosis = collapse_diagnosis(
            logs, max_agreement=self.max_agreement, entropy_ratio=self.entropy_ratio
        )
        fell = diagnosis is not None and diagnosis.student_entropy < self._first_student_entropy
        self._streak = self._streak + 1 if fell and diagnosis.collapsing else 0
        if self._streak < self.patience:
            return
        self.fired_at_step, self.diagnosis = state.global_step, diagnosis
        if state.is_world_process_zero:
            logger.warning(collapse_message(diagnosis, state.global_step, args, logs))


def collapse_message(
    diagnosis: CollapseDiagnosis, step: int, args: TrainingArguments, logs: dict[str, float]
) -> str:
    """The warning: what was seen, the likely cause for this configuration, and the remedies."""
    divergence = getattr(args, "divergence", "ab")
    parameter_fields = divergence_spec(divergence).parameter_fields
    setting = f"divergence={divergence!r}"
    if parameter_fields:
        # The logged values are the scheduled ones (a warm-up moves alpha and beta); the
        # configured ones stand in before the first log.
        values = [
            logs.get(param, getattr(args, name, math.nan))
            for param, name in parameter_fields.items()
        ]
        names = ", ".join(parameter_fields)
        shown = ", ".join(f"{value:.3g}" for value in values)
        setting += f" at ({names}) = ({shown})" if len(values) > 1 else f" at {names} = {shown}"
    return (
        f"The student may be collapsing (step {step}): its entropy is "
        f"{diagnosis.student_entropy:.3f} nats (teacher: {diagnosis.teacher_entropy:.3f}) while "
        f"its top-1 token agrees with the teacher's only {diagnosis.teacher_agreement:.1%} of the "
        f"time, so it is far more certain than that agreement justifies (bound "
        f"{diagnosis.entropy_bound:.3f} nats). Likely cause, with {setting}: a mode-seeking "
        "objective (alpha + beta < 1, or reverse KL) trained from a student far from the teacher. "
        "The gradient on a token's logit scales with the student's own probability q^beta, so "
        "once its mass sits on a wrong token nothing pulls it back (zero-forcing). Remedies: warm "
        "up from forward KL into (alpha, beta) (`ab_warmup_ratio` / `ab_warmup_steps`); a larger "
        "alpha (towards forward KL, e.g. 0.5-1.0); mix in cross-entropy with `kd_ratio` < 1; or "
        "start from a student fine-tuned on the task (an SFT run, e.g. `kd_ratio=0`)."
    )
