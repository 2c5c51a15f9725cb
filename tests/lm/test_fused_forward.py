"""The fused forward: hidden states of both causal LMs, the objective on their heads."""

from __future__ import annotations

import pytest
import torch
from testing_utils import build_tiny_causal_lm, build_tiny_tokenizer

from abkd_trainer.core.objective import DistillationObjective
from abkd_trainer.lm.fused_forward import FusedForward
from abkd_trainer.lm.models import fused_logit_transforms


def _call_directly(wrapper, module, method, *args):
    # Stands in for TRL's forward redirection: without a DDP/DeepSpeed wrapper it is a call.
    return method(*args)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fused_forward_gives_the_logits_route_loss_and_sums(arch):
    tokenizer = build_tiny_tokenizer()
    # Eval mode: dropout would make the two forwards differ (gradients still flow).
    student = build_tiny_causal_lm(arch, tokenizer, hidden_size=32, num_layers=1, seed=0).eval()
    teacher = build_tiny_causal_lm(arch, tokenizer, hidden_size=48, num_layers=2, seed=1).eval()
    objective = DistillationObjective(
        "ab",
        parameters={},
        temperature=1.0,
        divergence_weight=0.6,
        ce_weight=0.4,
        vocab_size=len(tokenizer),
    )
    inputs = {"input_ids": torch.tensor([[1, 5, 7, 9, 2], [1, 6, 8, 2, 0]]), "use_cache": False}
    targets = torch.tensor([[5, 7, 9, 2, -100], [6, 8, 2, -100, -100]])
    params = {"alpha": 0.3, "beta": 0.6}

    fused = FusedForward(
        fused_logit_transforms({"student": student, "teacher": teacher}),
        unwrap_model=lambda model: model,
        forward_redirection=_call_directly,
    )
    loss_sum, sums = fused.objective_sums(
        objective, student, teacher, inputs, targets, params, cached_teacher=None
    )
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    reference = objective.loss_from_logits(
        student(**inputs).logits, teacher_logits, targets, params
    )
    torch.testing.assert_close(loss_sum, reference.loss_sum, rtol=1e-5, atol=1e-6)
    for name, value in reference.sums.items():
        torch.testing.assert_close(sums[name], value, rtol=1e-5, atol=1e-6, msg=name)
    # The student's head gets a gradient through the fused projection; the teacher's does not.
    loss_sum.backward()
    assert student.get_output_embeddings().weight.grad is not None
    assert teacher.get_output_embeddings().weight.grad is None
