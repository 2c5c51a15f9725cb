"""Student and teacher as the loss sees them: decoder access, rebuilt logits, vocabularies."""

from __future__ import annotations

import pytest
import torch
from testing_utils import build_tiny_causal_lm, build_tiny_tokenizer

from abkd_trainer.divergences.fused_linear import LogitTransform
from abkd_trainer.lm.models import (
    causal_lm,
    check_shared_vocabulary,
    final_hidden_states,
    fused_logit_transforms,
    verify_fused_logits,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_head_of_final_hidden_states_is_the_models_logits(tokenizer, arch):
    model = build_tiny_causal_lm(arch, tokenizer, hidden_size=32, num_layers=1, seed=0).eval()
    input_ids = torch.tensor([[1, 5, 7, 9, 2]])
    hidden = final_hidden_states(model, {"input_ids": input_ids, "use_cache": False})
    assert hidden.shape == (1, 5, 32)
    logits = model(input_ids=input_ids).logits
    torch.testing.assert_close(model.get_output_embeddings()(hidden), logits)
    verify_fused_logits("student", model, LogitTransform.from_config(model.config))


def test_a_wrong_logit_transform_is_refused(tokenizer):
    model = build_tiny_causal_lm("llama", tokenizer, hidden_size=32, num_layers=1, seed=0).eval()
    with pytest.raises(
        ValueError, match="teacher's logits.*logit scale 2.0.*computes something else"
    ):
        verify_fused_logits("teacher", model, LogitTransform(scale=2.0))


def test_causal_lm_and_transforms_see_through_a_peft_adapter(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = build_tiny_causal_lm("qwen2", tokenizer, hidden_size=32, num_layers=1, seed=0)
    adapted = get_peft_model(
        model, LoraConfig(task_type="CAUSAL_LM", r=2, target_modules="all-linear")
    )
    assert causal_lm(adapted) is model
    assert causal_lm(model) is model
    transforms = fused_logit_transforms({"student": adapted})
    assert transforms["student"] == LogitTransform.from_config(model.config)


def test_a_narrower_teacher_is_refused_naming_its_width(tokenizer):
    student = build_tiny_causal_lm("llama", tokenizer, hidden_size=16, num_layers=1, seed=0)
    teacher = build_tiny_causal_lm("llama", tokenizer, hidden_size=16, num_layers=1, seed=1)
    teacher.config.vocab_size = len(tokenizer) - 1
    with pytest.raises(
        ValueError, match=rf"teacher \(my-teacher\) has {len(tokenizer) - 1} output"
    ):
        check_shared_vocabulary(
            student, teacher, tokenizer, teacher_name="my-teacher", teacher_source=None
        )
    # Without a teacher (training from a cache) only the student is checked, and it fits.
    check_shared_vocabulary(student, None, tokenizer, teacher_name="cache", teacher_source=None)
