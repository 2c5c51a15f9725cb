"""Completion sampling: EOS trimming, left padding, and the transformers ``generate`` sampler."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from testing_utils import build_tiny_causal_lm, build_tiny_tokenizer

from abkd_trainer.lm.generation import (
    CompletionSampler,
    TransformersCompletionSampler,
    build_generation_config,
    left_pad,
    trim_completions,
)

EOS, PAD = 7, 0


def test_trim_keeps_tokens_up_to_and_including_the_first_eos():
    generated = torch.tensor(
        [
            [5, 6, EOS, PAD, PAD],  # finished early: padding after the EOS is dropped
            [5, EOS, 9, EOS, 3],  # only the first EOS ends the sequence
            [1, 2, 3, 4, 5],  # no EOS: the whole row (hit max_new_tokens)
            [EOS, PAD, PAD, PAD, PAD],  # an immediate EOS is one sampled token
        ]
    )
    rows = trim_completions(generated, [EOS])
    assert [row.tolist() for row in rows] == [[5, 6, EOS], [5, EOS], [1, 2, 3, 4, 5], [EOS]]


def test_trim_when_padding_is_the_eos_token():
    # GPT-2 style: pad == eos, so the padding after the first EOS looks like more EOS tokens.
    generated = torch.tensor([[4, EOS, EOS, EOS], [4, 4, 4, EOS]])
    rows = trim_completions(generated, [EOS, 8])
    assert [row.tolist() for row in rows] == [[4, EOS], [4, 4, 4, EOS]]


def test_trim_with_several_eos_ids_and_a_length_cap():
    generated = torch.tensor([[1, 8, 2], [1, 2, 3]])
    rows = trim_completions(generated, [EOS, 8], max_new_tokens=2)
    assert [row.tolist() for row in rows] == [[1, 8], [1, 2]]


def test_left_pad():
    batch = left_pad([torch.tensor([1, 2, 3]), torch.tensor([4])], pad_token_id=PAD)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [PAD, PAD, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_generation_kwargs_override_the_named_fields():
    config = build_generation_config(
        max_new_tokens=5,
        temperature=0.7,
        top_p=0.9,
        top_k=0,
        eos_token_id=[EOS],
        pad_token_id=PAD,
        generation_kwargs={"temperature": 1.3, "repetition_penalty": 1.2},
    )
    assert config.do_sample and config.use_cache
    assert (config.max_new_tokens, config.top_p, config.top_k) == (5, 0.9, 0)
    assert config.temperature == 1.3 and config.repetition_penalty == 1.2


@pytest.fixture
def tokenizer():
    return build_tiny_tokenizer()


def make_sampler(model, tokenizer, max_new_tokens=6, max_total_length=None):
    config = build_generation_config(
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return TransformersCompletionSampler(
        lambda: model, Accelerator(cpu=True), config, max_total_length=max_total_length
    )


def test_sampler_matches_generate_per_prompt_and_restores_train_mode(tokenizer):
    model = build_tiny_causal_lm("llama", tokenizer, hidden_size=32, num_layers=1, seed=0)
    model.train()
    sampler = make_sampler(model, tokenizer)
    assert isinstance(sampler, CompletionSampler)
    prompts = [torch.tensor(tokenizer.encode(text)) for text in ("Say hi.", "A longer prompt.")]

    torch.manual_seed(0)
    completions = sampler.sample(prompts)
    assert model.training  # back in train mode
    assert len(completions) == 2
    for completion in completions:
        assert 1 <= len(completion) <= 6
        eos_positions = (completion == tokenizer.eos_token_id).nonzero().flatten().tolist()
        assert eos_positions in ([], [len(completion) - 1])  # EOS only as the last token

    # Left padding and batching do not change what a prompt's completion is: greedy decoding of
    # each prompt on its own gives the batched result.
    sampler.generation_config.do_sample = False
    batched = sampler.sample(prompts)
    model.eval()
    for prompt, completion in zip(prompts, batched, strict=True):
        alone = model.generate(
            prompt[None],
            attention_mask=torch.ones_like(prompt)[None],
            do_sample=False,
            max_new_tokens=6,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )[0, len(prompt) :]
        expected = trim_completions(alone[None], [tokenizer.eos_token_id])[0]
        assert completion.tolist() == expected.tolist()


def test_sampler_is_reproducible_under_a_seed(tokenizer):
    model = build_tiny_causal_lm("qwen2", tokenizer, hidden_size=32, num_layers=1, seed=0)
    sampler = make_sampler(model, tokenizer, max_new_tokens=8)
    prompts = [torch.tensor(tokenizer.encode("Pick a number."))] * 3
    torch.manual_seed(3)
    first = [c.tolist() for c in sampler.sample(prompts)]
    torch.manual_seed(3)
    second = [c.tolist() for c in sampler.sample(prompts)]
    assert first == second
    assert len({tuple(c) for c in first}) > 1  # identical prompts, different samples


def test_completions_stop_at_the_models_positions(tokenizer):
    # GPT-2's learned position table has 12 rows: 8 prompt tokens leave room for 4 new ones.
    model = build_tiny_causal_lm("gpt2", tokenizer, hidden_size=16, num_layers=1, seed=0)
    model.config.n_positions = 12
    model.transformer.wpe.weight.data = model.transformer.wpe.weight.data[:12]
    model.transformer.wpe.num_embeddings = 12
    model.generation_config.eos_token_id = None  # no early stop: completions take all the room
    prompts = [torch.arange(3, 11), torch.arange(3, 8)]  # 8 and 5 tokens
    uncapped = make_sampler(model, tokenizer, max_new_tokens=6)
    uncapped.eos_token_ids = []
    uncapped.generation_config.eos_token_id = None
    with pytest.raises(IndexError):  # what a 14th position does to a learned table
        uncapped.sample(prompts)

    capped = make_sampler(model, tokenizer, max_new_tokens=6, max_total_length=12)
    capped.eos_token_ids = []
    capped.generation_config.eos_token_id = None
    completions = capped.sample(prompts)
    # The batch is left-padded to 8 tokens, so both rows get the 4 positions that are left.
    assert [len(c) for c in completions] == [4, 4]
    # Room to spare: max_new_tokens applies unchanged.
    assert [len(c) for c in capped.sample([torch.arange(3, 6)])] == [6]

    with pytest.raises(ValueError, match="leaves no room for a completion within the models' 12"):
        capped.sample([torch.arange(3, 15)])
