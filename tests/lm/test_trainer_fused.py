"""``ABKDTrainer(use_fused_loss=True)``: the materialised objective, without either model's logits.

The fused path feeds both decoders' final hidden states and LM heads to
``abkd_trainer.fused_linear_divergence``; the materialised path runs both models to their logits.
Both must give the same loss, the same metrics and the same gradient for every trainable
parameter, on every architecture, dataset format, padded vocabulary and PEFT set-up, while the
fused path never calls either LM head.
"""

from __future__ import annotations

import pytest
import torch
from testing_utils import (
    build_abkd_trainer,
    build_prompt_completion_dataset,
    build_student_and_teacher,
    build_text_dataset,
    build_tiny_tokenizer,
)
from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, Qwen2ForCausalLM

REL = 1e-5


def make_pair(arch="qwen2", **vocab_sizes):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher(arch, tokenizer, **vocab_sizes)
    return tokenizer, student, teacher


def fused_and_materialised(tmp_path, make_models, **overrides):
    """Two trainers on identical copies of the same models, differing only in the loss path."""
    trainers = {}
    for fused in (True, False):
        tokenizer, student, teacher = make_models()
        trainers[fused] = build_abkd_trainer(
            tmp_path / f"fused-{fused}",
            tokenizer=tokenizer,
            student=student,
            teacher=teacher,
            use_fused_loss=fused,
            **overrides,
        )
    return trainers[True], trainers[False]


def loss_and_gradients(trainer, inputs):
    """One training-mode loss on ``inputs`` and the gradient of every trainable parameter."""
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    num_items = (inputs["labels"][:, 1:] != -100).sum()
    loss = trainer.compute_loss(trainer.model, inputs, num_items_in_batch=num_items)
    loss.backward()
    grads = {
        name: param.grad.detach().clone()
        for name, param in trainer.model.named_parameters()
        if param.requires_grad
    }
    return loss.detach(), grads


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def assert_same_step(fused_trainer, materialised_trainer):
    inputs = first_batch(materialised_trainer)
    fused_loss, fused_grads = loss_and_gradients(fused_trainer, inputs)
    loss, grads = loss_and_gradients(materialised_trainer, inputs)
    assert fused_loss.item() == pytest.approx(loss.item(), rel=REL)
    assert fused_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        assert grad.abs().max() > 0, f"{name} received no gradient"
        torch.testing.assert_close(fused_grads[name], grad, rtol=REL, atol=1e-7, msg=name)


def assert_same_metrics(fused_trainer, materialised_trainer, eval_dataset):
    fused_metrics = fused_trainer.evaluate(eval_dataset)
    metrics = materialised_trainer.evaluate(eval_dataset)
    for key in ("eval_loss", "eval_kd_loss", "eval_ce_loss", "eval_teacher_agreement"):
        assert fused_metrics[key] == pytest.approx(metrics[key], rel=REL, abs=1e-9), key


# ----------------------------------------------------------------------------- same objective


@pytest.mark.parametrize(
    ("arch", "dataset", "overrides"),
    [
        ("qwen2", "prompt_completion", {}),
        ("qwen2", "text", {"packing": True, "max_length": 512}),
        ("llama", "prompt_completion", {"kd_ratio": 0.3, "temperature": 2.0}),
        ("gpt2", "prompt_completion", {"divergence": "jsd", "kd_ratio": 0.5}),
        ("qwen2", "prompt_completion", {"alpha": 1.0, "beta": 0.0, "loss_chunk_size": 3}),
    ],
    ids=["qwen2", "packing", "llama-ce-temperature", "gpt2-jsd", "fkl-limit-chunked"],
)
def test_same_loss_gradients_and_metrics_as_the_materialised_path(
    tmp_path, arch, dataset, overrides
):
    data = build_prompt_completion_dataset() if dataset == "prompt_completion" else None
    if dataset == "text":
        data = build_text_dataset()
    fused, materialised = fused_and_materialised(
        tmp_path, lambda: make_pair(arch), train_dataset=data, **overrides
    )
    assert_same_step(fused, materialised)
    assert_same_metrics(fused, materialised, data)


@pytest.mark.parametrize(
    "vocab_sizes",
    [{"teacher_vocab_size": 272}, {"student_vocab_size": 280, "teacher_vocab_size": 300}],
    ids=["padded-teacher", "padded-both"],
)
def test_padded_vocabularies(tmp_path, vocab_sizes):
    fused, materialised = fused_and_materialised(tmp_path, lambda: make_pair(**vocab_sizes))
    assert_same_step(fused, materialised)


def _tiny_config_model(config_class, tokenizer, seed, **extra):
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        **extra,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


@pytest.mark.parametrize(
    ("config_class", "extra"),
    [
        # Gemma 2's final-logit soft-capping, low enough to bend the random logits.
        (Gemma2Config, {"final_logit_softcapping": 0.5, "head_dim": 8}),
        (CohereConfig, {"logit_scale": 0.25}),
    ],
    ids=["gemma2-softcap", "cohere-logit-scale"],
)
def test_logit_soft_capping_and_scaling_models(tmp_path, config_class, extra):
    def make_models():
        tokenizer = build_tiny_tokenizer()
        student = _tiny_config_model(config_class, tokenizer, seed=0, **extra)
        teacher = _tiny_config_model(config_class, tokenizer, seed=1, **extra)
        return tokenizer, student, teacher

    fused, materialised = fused_and_materialised(tmp_path, make_models)
    assert_same_step(fused, materialised)


def test_lora_student(tmp_path):
    from peft import LoraConfig

    # Random B matrices (PEFT starts them at zero), so that every adapter weight gets a gradient.
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    fused, materialised = fused_and_materialised(
        tmp_path, make_pair, trainer_kwargs={"peft_config": lora}
    )
    inputs = first_batch(materialised)
    _, grads = loss_and_gradients(materialised, inputs)
    assert grads and all("lora_" in name for name in grads)
    assert_same_step(fused, materialised)


# ----------------------------------------------------------------------------- no logits


def test_training_never_calls_either_lm_head(tmp_path):
    calls = {"student": 0, "teacher": 0}
    tokenizer, student, teacher = make_pair()
    for role, model in (("student", student), ("teacher", teacher)):
        model.get_output_embeddings().register_forward_hook(
            lambda *_, role=role: calls.__setitem__(role, calls[role] + 1)
        )
    trainer = build_abkd_trainer(
        tmp_path, tokenizer=tokenizer, student=student, teacher=teacher, use_fused_loss=True
    )
    calls.update(student=0, teacher=0)  # the start-up check runs each head once
    trainer.train()
    trainer.evaluate(build_prompt_completion_dataset())
    assert calls == {"student": 0, "teacher": 0}
    assert trainer.state.global_step == 2


def test_evaluation_with_compute_metrics_gets_the_logits(tmp_path):
    seen_shapes = []

    def compute_metrics(prediction):
        seen_shapes.append(prediction.predictions.shape)
        return {"seen": 1.0}

    tokenizer, student, teacher = make_pair()
    trainer = build_abkd_trainer(
        tmp_path,
        tokenizer=tokenizer,
        student=student,
        teacher=teacher,
        use_fused_loss=True,
        trainer_kwargs={"compute_metrics": compute_metrics},
    )
    metrics = trainer.evaluate(build_prompt_completion_dataset(2))
    assert metrics["eval_seen"] == 1.0
    assert seen_shapes and seen_shapes[0][-1] == len(tokenizer)


# ----------------------------------------------------------------------------- refusals


class _DoubledLogitsQwen2(Qwen2ForCausalLM):
    """A model whose forward post-processes its logits in a way no config attribute declares."""

    def forward(self, *args, **kwargs):
        outputs = super().forward(*args, **kwargs)
        outputs.logits = 2.0 * outputs.logits
        return outputs


def test_a_model_with_undeclared_logit_processing_is_refused(tmp_path):
    tokenizer, student, teacher = make_pair()
    odd_student = _DoubledLogitsQwen2(student.config)
    odd_student.load_state_dict(student.state_dict())
    with pytest.raises(ValueError, match="computes something else"):
        build_abkd_trainer(tmp_path, tokenizer=tokenizer, student=odd_student, teacher=teacher)
    # The materialised path is the way out, and accepts it.
    build_abkd_trainer(
        tmp_path, tokenizer=tokenizer, student=odd_student, teacher=teacher, use_fused_loss=False
    )


def test_prompt_learning_adapters_are_refused(tmp_path):
    from peft import PromptTuningConfig

    tokenizer, student, teacher = make_pair()
    prompt_tuning = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    with pytest.raises(ValueError, match="prompt-learning"):
        build_abkd_trainer(
            tmp_path,
            tokenizer=tokenizer,
            student=student,
            teacher=teacher,
            trainer_kwargs={"peft_config": prompt_tuning},
        )


def test_fused_loss_is_the_default():
    from abkd_trainer import ABKDConfig

    assert ABKDConfig(output_dir="unused", use_cpu=True).use_fused_loss is True
