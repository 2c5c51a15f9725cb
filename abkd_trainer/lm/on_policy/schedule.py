"""Which source each training micro-batch's completions come from: the on-policy schedule."""

from __future__ import annotations

import enum
import math
import random
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments


class BatchSource(str, enum.Enum):
    """Where a micro-batch's completions come from."""

    DATASET = "dataset"
    STUDENT = "student"
    TEACHER = "teacher"
    REPLAY = "replay"


class OnPolicySchedule(TrainerCallback, ExportableState):
    """Draws each micro-batch's `BatchSource`; the adaptive variant follows evaluations.

    `"constant"`: with `u` uniform in [0, 1), the student samples when `u < lmbda`; otherwise
    the teacher does (`seq_kd`) or the dataset's completions are used (GKD).

    `"adaptive"` (DistiLLM, Ko et al. 2024, as in the ABKD authors' `finetune.py`): the
    probability `p` starts at `lmbda`. At step `t` of `T`, with the "decreasing" replay
    ratio `s = p (1 - t / T)`: `u < s`, or `u < p` while the replay buffer is not yet full,
    samples from the student (into the buffer); otherwise `u < p` replays a micro-batch from
    the buffer; otherwise as the constant schedule's non-student case. After each evaluation,
    when the loss (`eval_loss`) is at least `adaptive_loss_eps` above the reference (the first
    evaluation's loss, then the loss at the latest rise), `p` rises by `adaptive_step` (capped
    at 1) and that loss becomes the reference. Evaluate once before training
    (`eval_on_start=True`) to take the reference there, as the authors do.

    `u` is a function of `(seed, step, micro-batch index)` alone, so every process draws the
    same sources (ZeRO-3 generation is collective), runs are reproducible, and a resumed run draws
    what the uninterrupted one would have. `probability` and `reference_loss` are saved in
    checkpoints (`TrainerState.stateful_callbacks`) and restored when training resumes.
    """

    def __init__(
        self,
        schedule: str = "constant",
        lmbda: float = 0.0,
        seq_kd: bool = False,
        adaptive_step: float = 0.1,
        adaptive_loss_eps: float = 0.1,
        seed: int = 0,
        eval_loss_key: str = "eval_loss",
    ) -> None:
        self.schedule = schedule
        self.lmbda = lmbda
        self.seq_kd = seq_kd
        self.adaptive_step = adaptive_step
        self.adaptive_loss_eps = adaptive_loss_eps
        self.seed = seed
        self.eval_loss_key = eval_loss_key
        self.probability = lmbda
        self.reference_loss: float | None = None

    @property
    def is_adaptive(self) -> bool:
        return self.schedule == "adaptive"

    def uniform(self, step: int, micro_batch: int) -> float:
        """The draw of micro-batch `micro_batch` of optimizer step `step`, in [0, 1)."""
        # str seeds are hashed with SHA-512: stable across processes and Python runs.
        return random.Random(f"abkd-on-policy/{self.seed}/{step}/{micro_batch}").random()

    def choose(
        self, step: int, micro_batch: int, max_steps: int, replay_buffer_full: bool
    ) -> BatchSource:
        """The source of micro-batch `micro_batch` of step `step` of `max_steps`."""
        u = self.uniform(step, micro_batch)
        fallback = BatchSource.TEACHER if self.seq_kd else BatchSource.DATASET
        if not self.is_adaptive:
            return BatchSource.STUDENT if u < self.probability else fallback
        progress = min(step / max_steps, 1.0) if max_steps > 0 else 0.0
        sample_threshold = self.probability * (1.0 - progress)
        if u < sample_threshold or (u < self.probability and not replay_buffer_full):
            return BatchSource.STUDENT
        if u < self.probability:
            return BatchSource.REPLAY
        return fallback

    def update(self, eval_loss: float) -> None:
        """Adaptive rule after an evaluation with loss `eval_loss`."""
        if not self.is_adaptive or not math.isfinite(eval_loss):
            return
        if self.reference_loss is None:
            self.reference_loss = eval_loss
        elif eval_loss >= self.reference_loss + self.adaptive_loss_eps:
            # Rounded so that ten rises of 0.1 reach exactly 1.0 (no floating-point drift).
            self.probability = min(round(self.probability + self.adaptive_step, 12), 1.0)
            self.reference_loss = eval_loss

    # TrainerCallback / ExportableState

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if metrics and self.eval_loss_key in metrics:
            self.update(float(metrics[self.eval_loss_key]))

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # On resume, `state` was loaded from the checkpoint's trainer_state.json. The schedule is
        # part of the training state (like the learning-rate schedule), so it is restored even
        # when `restore_callback_states_from_checkpoint` is off; on a fresh run this reads back
        # the initial values.
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, dict):
            for name, value in saved.get("attributes", {}).items():
                setattr(self, name, value)

    def state(self) -> dict[str, Any]:
        return {
            "args": {
                "schedule": self.schedule,
                "lmbda": self.lmbda,
                "seq_kd": self.seq_kd,
                "adaptive_step": self.adaptive_step,
                "adaptive_loss_eps": self.adaptive_loss_eps,
                "seed": self.seed,
                "eval_loss_key": self.eval_loss_key,
            },
            "attributes": {
                "probability": self.probability,
                "reference_loss": self.reference_loss,
            },
        }
