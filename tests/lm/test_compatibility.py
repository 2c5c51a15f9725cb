"""The configuration is checked against both models at construction, not at the first long batch."""

from __future__ import annotations

import pytest
from testing_utils import (
    build_abkd_trainer,
    build_student_and_teacher,
    build_text_dataset,
    build_tiny_causal_lm,
    build_tiny_tokenizer,
)

from abkd_trainer.lm.compatibility import check_position_limits, position_limit


def test_position_limit_reads_learned_and_rotary_configs():
    tokenizer = build_tiny_tokenizer()
    gpt2 = build_tiny_causal_lm("gpt2", tokenizer, hidden_size=8, num_layers=1, seed=0)
    llama = build_tiny_causal_lm("llama", tokenizer, hidden_size=8, num_layers=1, seed=0)
    gpt2.config.n_positions = 32
    llama.config.max_position_embeddings = 48
    assert position_limit(gpt2) == 32
    assert position_limit(llama) == 48
    check_position_limits(32, {"student": gpt2, "teacher": llama})
    check_position_limits(None, {"student": gpt2})  # no truncation: nothing to check here


@pytest.mark.parametrize("who", ["student", "teacher"])
@pytest.mark.parametrize("packing", [False, True])
def test_a_max_length_beyond_a_models_positions_fails_at_construction(tmp_path, who, packing):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("gpt2", tokenizer)
    (student if who == "student" else teacher).config.n_positions = 32
    what = "packed sequence length" if packing else "sequence length"
    with pytest.raises(
        ValueError,
        match=rf"`max_length=64` \(the {what}\) exceeds the {who}'s position limit: "
        r"GPT2LMHeadModel supports 32 positions \(`n_positions`.*`--max_length`\) to at most 32",
    ):
        build_abkd_trainer(
            tmp_path,
            tokenizer=tokenizer,
            student=student,
            teacher=teacher,
            train_dataset=build_text_dataset(),
            max_length=64,
            packing=packing,
        )
    # At the limit it trains.
    trainer = build_abkd_trainer(
        tmp_path,
        tokenizer=tokenizer,
        student=student,
        teacher=teacher,
        train_dataset=build_text_dataset(),
        max_length=32,
        packing=packing,
        max_steps=1,
    )
    trainer.train()
