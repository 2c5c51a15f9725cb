"""The fused loss's forward: both backbones' final hidden states, then the objective on the heads.

On the fused path (`use_fused_loss=True`) neither model's `(batch, seq, vocab)` logits are built:
the objective's kernels project the supervised positions of the final hidden states a tile at a
time (see `DistillationObjective.loss_from_hidden_states`). `ABKDTrainer` runs this forward
inside the student wrapper's forward (TRL's forward redirection), so that DDP's and ZeRO-3's
hooks see it; the teacher's backbone goes through its own wrapper, so that a ZeRO-3 teacher
gathers its layers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from trl.trainer.utils import maybe_gather_lm_head_ctx

from abkd_trainer.core.objective import DistillationObjective, HiddenStates, LinearHead
from abkd_trainer.divergences.coarsened import CachedTeacher
from abkd_trainer.divergences.projection import LogitTransform
from abkd_trainer.lm.models import causal_lm, final_hidden_states

__all__ = ["FusedForward"]


@dataclass(frozen=True)
class FusedForward:
    """What the fused forward needs of the trainer, given once at set-up.

    Attributes:
        logit_transforms: each role's (`"student"`, `"teacher"`) logit scale and soft-cap, as
            checked at start-up (`abkd_trainer.lm.models.fused_logit_transforms`).
        unwrap_model: the accelerator's `unwrap_model` (the teacher's model inside its engine).
        forward_redirection: TRL's `_ForwardRedirection()`, to call a backbone through its
            wrapper's forward.
    """

    logit_transforms: Mapping[str, LogitTransform]
    unwrap_model: Callable[[nn.Module], nn.Module]
    forward_redirection: Callable[..., Any]

    def objective_sums(
        self,
        objective: DistillationObjective,
        student: nn.Module,
        teacher_model: nn.Module | None,
        model_inputs: dict[str, Any],
        targets: torch.Tensor,
        divergence_params: dict[str, float],
        cached_teacher: CachedTeacher | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective's summed loss and logged sums from hidden states and LM heads.

        Args:
            objective: the trainer's distillation objective.
            student: the unwrapped student (a causal LM, or a PEFT model around one).
            teacher_model: the prepared teacher (its wrapper or engine); unused with
                `cached_teacher`.
            model_inputs: the keyword inputs both models get (`input_ids`, `attention_mask`,
                packing's `position_ids`, ...).
            targets: `(batch, seq)` next-token targets, `-100` where nothing is supervised.
            divergence_params: the divergence's parameters at this step (`alpha`, `beta`, ...).
            cached_teacher: the cached top-k teacher rows of the supervised positions, or None
                for the live teacher.

        Returns:
            `(loss_sum, sums)`: the summed objective (a scalar) and the summed logged metrics.
        """
        student_lm = causal_lm(student)
        student_states = self.hidden_states(
            student_lm, final_hidden_states(student_lm, model_inputs), "student"
        )
        teacher = cached_teacher
        if teacher is None:
            teacher_lm = self.unwrap_model(teacher_model)
            with torch.no_grad():
                # Through the teacher's own wrapper, so that a ZeRO-3 teacher gathers its layers.
                teacher_hidden = self.forward_redirection(
                    teacher_model, teacher_lm, final_hidden_states, teacher_lm, model_inputs
                )
            teacher = self.hidden_states(teacher_lm, teacher_hidden, "teacher")
        heads = [student_states.head]
        if isinstance(teacher, HiddenStates):
            heads.append(teacher.head)
        # Under ZeRO-3 the heads are partitioned and their own forward (which would gather them)
        # never runs: gather them for the projection. The student's weight gradient is built
        # here, in the forward, and reaches the partitioned parameter through autograd.
        with maybe_gather_lm_head_ctx(*(t for head in heads for t in (head.weight, head.bias))):
            output = objective.loss_from_hidden_states(
                student_states, teacher, targets, divergence_params
            )
        return output.loss_sum, output.sums

    def hidden_states(self, model: nn.Module, hidden: torch.Tensor, role: str) -> HiddenStates:
        """`hidden` with `model`'s LM head and the logit transform checked for `role`.

        Args:
            model: a causal LM (its `get_output_embeddings()` is the head).
            hidden: `(batch, seq, hidden)` final hidden states of `model`.
            role: `"student"` or `"teacher"`.
        """
        head = model.get_output_embeddings()
        return HiddenStates(
            hidden,
            LinearHead(head.weight, getattr(head, "bias", None), self.logit_transforms[role]),
        )
