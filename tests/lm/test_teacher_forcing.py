"""Teacher-forcing rows: prompt + reference, right padding, and the positions that predict the
reference."""

from __future__ import annotations

import pytest
import torch
from testing_utils import build_conversational_prompt_completion_dataset

from abkd_trainer.lm.teacher_forcing import encode_prompt_completion, teacher_forcing_batch


def test_text_rows_are_prompt_reference_eos_and_the_mask_predicts_reference_tokens(tiny_tokenizer):
    prompts, references = ["Say hi.", "Name a long colour, please."], [" Hi!", " Ultramarine blue."]

    input_ids, attention_mask, response_mask = teacher_forcing_batch(
        tiny_tokenizer, prompts, references, pad_token_id=-7
    )

    rows = [
        tiny_tokenizer(p + r + tiny_tokenizer.eos_token)["input_ids"]
        for p, r in zip(prompts, references, strict=True)
    ]
    assert input_ids.shape == attention_mask.shape == response_mask.shape
    assert input_ids.shape == (2, max(map(len, rows)))
    assert response_mask.dtype == torch.bool
    for row, (prompt, ids) in enumerate(zip(prompts, rows, strict=True)):
        length = len(ids)
        assert input_ids[row, :length].tolist() == ids
        assert (input_ids[row, length:] == -7).all()  # right padding with the given id
        assert attention_mask[row].tolist() == [1] * length + [0] * (input_ids.shape[1] - length)
        # Logits at t predict token t + 1: the counted predictions are the reference and EOS.
        prompt_length = len(tiny_tokenizer(prompt)["input_ids"])
        predicted = input_ids[row, 1:][response_mask[row, :-1]].tolist()
        assert predicted == ids[prompt_length:]
        assert predicted[-1] == tiny_tokenizer.eos_token_id
        assert not response_mask[row, length - 1 :].any()


def test_conversational_rows_count_the_assistant_turn(tiny_tokenizer):
    dataset = build_conversational_prompt_completion_dataset(2)
    prompts = dataset["prompt"]
    references = [completion[0]["content"] for completion in dataset["completion"]]

    input_ids, _, response_mask = teacher_forcing_batch(tiny_tokenizer, prompts, references, 0)

    for row, (prompt, reference) in enumerate(zip(prompts, references, strict=True)):
        ids, start = encode_prompt_completion(tiny_tokenizer, prompt, reference)
        assert 0 < start < len(ids)
        assert response_mask[row].sum().item() == len(ids) - start
        assert input_ids[row, 1:][response_mask[row, :-1]].tolist() == ids[start:]


def test_prompts_and_references_must_pair_up(tiny_tokenizer):
    with pytest.raises(ValueError):
        teacher_forcing_batch(tiny_tokenizer, ["a", "b"], [" c"], 0)
