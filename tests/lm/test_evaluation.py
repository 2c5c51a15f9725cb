"""ROUGE-L generation evaluation, the teacher-divergence measurement and RougeLCallback."""

from __future__ import annotations

import math

import pytest
import torch
from testing_utils import (
    build_abkd_trainer,
    build_conversational_dataset,
    build_prompt_completion_dataset,
    build_tiny_causal_lm,
)

from abkd_trainer.divergences import get_divergence
from abkd_trainer.lm.evaluation import (
    RougeLCallback,
    prompts_and_references,
    rouge_l_evaluate,
    rouge_l_score,
    sampling_config,
    teacher_divergence,
)

# ----------------------------------------------------------------------------- rouge_l_score
# Expected values computed by hand: F = 2 * LCS / (len(prediction) + len(reference)) in tokens.


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("the cat sat on the mat", "the cat sat on the mat", 100.0),
        # LCS "the cat on the mat" = 5 of 6 and 6 tokens: 2 * 5 / 12
        ("the cat sat on the mat", "the cat is on the mat", 100 * 10 / 12),
        # LCS "the red fox" = 3; P = 3/3, R = 3/5: 2 * 3 / 8
        ("the red fox", "the quick red fox jumps", 75.0),
        # order matters for a subsequence: LCS of a b c d / d c b a is 1: 2 * 1 / 8
        ("a b c d", "d c b a", 25.0),
        ("owl fish", "the fox eats mice", 0.0),
        ("", "the fox", 0.0),
        # lower-cased, punctuation dropped
        ("The Fox, eats MICE.", "the fox eats mice", 100.0),
        # Porter stemming of words longer than three letters: running -> run, dogs -> dog
        ("running dogs", "run dog", 100.0),
    ],
)
def test_rouge_l_score_matches_hand_computed_lcs_f_measure(prediction, reference, expected):
    assert rouge_l_score(prediction, reference) == pytest.approx(expected)


def test_rouge_l_score_takes_the_best_of_several_references():
    # vs "a b": LCS 1 of (2, 2) -> 50; vs "a c": LCS 2 of (2, 2) -> 100
    assert rouge_l_score("a c", ["b a", "a c"]) == pytest.approx(100.0)
    assert rouge_l_score("a c", ["b a", "x y z"]) == pytest.approx(50.0)


def test_rouge_l_score_rejects_an_empty_reference_list():
    with pytest.raises(ValueError, match="at least one reference"):
        rouge_l_score("a", [])


# ----------------------------------------------------------------------------- rouge_l_evaluate


class CannedGenerator(torch.nn.Module):
    """Stands in for a causal LM: ``generate`` appends one of two canned token sequences per row.

    Which one depends on a draw from the global torch RNG, so seeding decides the outcome, the
    way it decides a sampled response. Records the inputs it was called with.
    """

    def __init__(self, tokenizer, responses_by_prompt: dict[str, tuple[str, str]]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the module a device
        self.tokenizer = tokenizer
        self.responses = {
            tuple(tokenizer(prompt)["input_ids"]): tuple(
                tokenizer(text, add_special_tokens=False)["input_ids"] for text in pair
            )
            for prompt, pair in responses_by_prompt.items()
        }
        self.calls: list[dict] = []

    def generate(self, input_ids, attention_mask, generation_config):
        self.calls.append(
            {"input_ids": input_ids, "attention_mask": attention_mask, "config": generation_config}
        )
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            prompt = tuple(token for token, keep in zip(ids, mask, strict=True) if keep)
            choice = int(torch.randint(0, 2, ()).item())
            rows.append(ids + list(self.responses[prompt][choice]) + [self.tokenizer.eos_token_id])
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id
        return torch.tensor([row + [pad] * (width - len(row)) for row in rows])


def _expected_mean(choices_per_seed, table):
    """Hand-side mean over seeds of the mean over prompts, from the same RNG draws."""
    per_seed = [
        sum(table[i][c] for i, c in enumerate(choices)) / len(choices)
        for choices in choices_per_seed
    ]
    return sum(per_seed) / len(per_seed), per_seed


def test_rouge_l_evaluate_averages_over_prompts_then_seeds(tiny_tokenizer):
    prompts = ["Name a colour.", "Say hello to the whole wide world."]
    references = ["red and blue", "hello world"]
    canned = {
        prompts[0]: ("red and blue", "green"),  # F = 100 or 0
        prompts[1]: ("hello there world", "hello"),  # 2*2/(3+2) = 80, 2*1/(1+2) = 66.67
    }
    table = [[100.0, 0.0], [80.0, 200 / 3]]
    model = CannedGenerator(tiny_tokenizer, canned)
    seeds = (0, 1, 2, 3)

    result = rouge_l_evaluate(model, tiny_tokenizer, prompts, references, seeds=seeds, batch_size=1)

    # Replay the RNG draws the stub made: seed, then one draw per prompt in order.
    choices_per_seed = []
    for seed in seeds:
        torch.manual_seed(seed)
        choices_per_seed.append([int(torch.randint(0, 2, ()).item()) for _ in prompts])
    expected, expected_per_seed = _expected_mean(choices_per_seed, table)
    assert result.per_seed == pytest.approx(expected_per_seed)
    assert result.rouge_l == pytest.approx(expected)
    assert result.num_prompts == 2 and result.seeds == list(seeds)
    assert len({tuple(c) for c in choices_per_seed}) > 1, "seeds should not all draw alike"
    assert result.samples[0]["response"] in canned[prompts[0]]


def test_rouge_l_evaluate_left_pads_and_samples_without_top_k(tiny_tokenizer):
    prompts = ["Hi.", "A much longer prompt here."]
    model = CannedGenerator(tiny_tokenizer, {p: ("x", "x") for p in prompts})
    tiny_tokenizer.padding_side = "right"

    rouge_l_evaluate(model, tiny_tokenizer, prompts, ["x", "x"], seeds=(0,), batch_size=2)

    call = model.calls[0]
    mask = call["attention_mask"]
    assert mask[0, 0] == 0 and mask[0, -1] == 1, "the short prompt must be padded on the left"
    config = call["config"]
    assert config.do_sample and config.temperature == 1.0 and config.top_p == 1.0
    assert not config.top_k, "top-k would truncate the sampled distribution"
    assert tiny_tokenizer.padding_side == "right", "the caller's padding side is restored"


def test_rouge_l_evaluate_pads_with_eos_when_the_tokenizer_has_no_pad_token(tiny_tokenizer):
    # GPT-2's tokenizer has no pad token; SFTTrainer pads with EOS, and so does the evaluator.
    prompts = ["Hi.", "A longer prompt."]
    model = CannedGenerator(tiny_tokenizer, {p: ("x", "x") for p in prompts})
    tiny_tokenizer.pad_token = None

    rouge_l_evaluate(model, tiny_tokenizer, prompts, ["x", "x"], seeds=(0,), batch_size=2)

    assert model.calls[0]["input_ids"][0, 0] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.pad_token is None, "the tokenizer is left as it was"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_sampling_config_rejects_invalid_settings(tiny_tokenizer, kwargs, message):
    settings = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        sampling_config(tiny_tokenizer, **settings)


def test_rouge_l_evaluate_rejects_mismatched_inputs(tiny_tokenizer):
    model = CannedGenerator(tiny_tokenizer, {})
    with pytest.raises(ValueError, match="2 prompts but 1 references"):
        rouge_l_evaluate(model, tiny_tokenizer, ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="seed"):
        rouge_l_evaluate(model, tiny_tokenizer, ["a"], ["a"], seeds=())


def test_rouge_l_evaluate_is_reproducible_on_a_real_model(tiny_tokenizer):
    model = build_tiny_causal_lm("qwen2", tiny_tokenizer, hidden_size=32, num_layers=1, seed=0)
    prompts, references = prompts_and_references(build_prompt_completion_dataset(4))
    kwargs = {"seeds": (0, 1), "max_new_tokens": 6, "batch_size": 3}

    first = rouge_l_evaluate(model, tiny_tokenizer, prompts, references, **kwargs)
    second = rouge_l_evaluate(model, tiny_tokenizer, prompts, references, **kwargs)

    assert first.per_seed == second.per_seed
    assert 0.0 <= first.rouge_l <= 100.0
    assert len(first.samples) == 4

    model.train()
    rouge_l_evaluate(
        model, tiny_tokenizer, prompts[:1], references[:1], seeds=(0,), max_new_tokens=2
    )
    assert model.training, "the caller's train/eval mode is restored"


def test_rouge_l_evaluate_renders_conversational_prompts(tiny_tokenizer):
    dataset = build_conversational_dataset(2)
    prompts, references = prompts_and_references(dataset)
    model = CannedGenerator(
        tiny_tokenizer,
        {
            tiny_tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False): (
                r,
                r,
            )
            for p, r in zip(prompts, references, strict=True)
        },
    )
    # The stub only knows the chat-template renderings: a prompt sent any other way raises.
    result = rouge_l_evaluate(model, tiny_tokenizer, prompts, references, seeds=(0,))
    assert result.rouge_l == pytest.approx(100.0)


# ----------------------------------------------------------------------------- prompts/references


def test_prompts_and_references_reads_trl_formats():
    prompts, references = prompts_and_references(build_prompt_completion_dataset(2))
    assert prompts == ["Name a colour.", "What is two plus two?"]
    assert references == [" Blue.", " Four."]

    prompts, references = prompts_and_references(build_conversational_dataset(1))
    assert [m["role"] for m in prompts[0]] == ["system", "user"]
    assert references == ["Blue."]

    conversational_pc = [
        {
            "prompt": [{"role": "user", "content": "Hi"}],
            "completion": [{"role": "assistant", "content": "Hello"}],
        }
    ]
    assert prompts_and_references(conversational_pc) == (
        [[{"role": "user", "content": "Hi"}]],
        ["Hello"],
    )


def test_prompts_and_references_rejects_unusable_rows():
    with pytest.raises(ValueError, match="needs `prompt` and"):
        prompts_and_references([{"text": "hello"}])
    with pytest.raises(ValueError, match="last message must be the assistant"):
        prompts_and_references([{"messages": [{"role": "user", "content": "Hi"}]}])


# ----------------------------------------------------------------------------- teacher_divergence


def test_teacher_divergence_is_the_mean_over_response_tokens(tiny_tokenizer):
    student = build_tiny_causal_lm("llama", tiny_tokenizer, hidden_size=32, num_layers=1, seed=0)
    teacher = build_tiny_causal_lm(
        "llama", tiny_tokenizer, hidden_size=32, num_layers=1, seed=1, initializer_range=0.3
    )
    prompts, references = ["Say hi.", "Name a long colour."], [" Hi!", " Ultramarine."]
    fkl = get_divergence("fkl")

    measured = teacher_divergence(
        student, teacher, tiny_tokenizer, prompts, references, {"fkl": fkl}, batch_size=2
    )

    # By hand: each row on its own (no padding); the predictions of response tokens and EOS.
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, reference in zip(prompts, references, strict=True):
            prompt_ids = tiny_tokenizer(prompt)["input_ids"]
            ids = tiny_tokenizer(prompt + reference + tiny_tokenizer.eos_token)["input_ids"]
            input_ids = torch.tensor([ids])
            p = teacher(input_ids=input_ids).logits[0].double().softmax(-1)
            q = student(input_ids=input_ids).logits[0].double().softmax(-1)
            per_position = (p * (p.log() - q.log())).sum(-1)
            # position t predicts token t + 1; response tokens are len(prompt_ids) .. len(ids) - 1
            total += per_position[len(prompt_ids) - 1 : len(ids) - 1].sum().item()
            count += len(ids) - len(prompt_ids)
    assert measured["fkl"] == pytest.approx(total / count, rel=1e-4)


def test_teacher_divergence_is_zero_for_the_teacher_itself(tiny_tokenizer):
    teacher = build_tiny_causal_lm("qwen2", tiny_tokenizer, hidden_size=32, num_layers=1, seed=1)
    result = teacher_divergence(
        teacher,
        teacher,
        tiny_tokenizer,
        ["Hi."],
        [" Hello."],
        {"fkl": get_divergence("fkl"), "rkl": get_divergence("rkl")},
    )
    assert result == {"fkl": pytest.approx(0.0, abs=1e-6), "rkl": pytest.approx(0.0, abs=1e-6)}


# ----------------------------------------------------------------------------- RougeLCallback


def test_rouge_l_callback_records_teacher_and_train_boundaries(tmp_path):
    prompts, references = prompts_and_references(build_prompt_completion_dataset(3))
    trainer = build_abkd_trainer(tmp_path, max_steps=3)
    callback = RougeLCallback(
        trainer,
        prompts,
        references,
        seeds=(0,),
        max_new_tokens=4,
        evaluate_at_train_boundaries=True,
        evaluate_teacher=True,
        divergences={"fkl": get_divergence("fkl")},
    )
    trainer.add_callback(callback)
    trainer.train()

    assert set(callback.results) == {"teacher", "student_before", "student_after"}
    assert set(callback.divergence_results) == {"student_before", "student_after"}
    before = callback.divergence_results["student_before"]["fkl"]
    after = callback.divergence_results["student_after"]["fkl"]
    assert math.isfinite(before) and math.isfinite(after) and before > 0
    assert [h["step"] for h in callback.history] == [0, 3]
    assert any("eval_rouge_l" in entry for entry in trainer.state.log_history)


def test_rouge_l_callback_leaves_the_global_rng_untouched(tmp_path):
    import random

    import numpy as np

    prompts, references = prompts_and_references(build_prompt_completion_dataset(2))
    trainer = build_abkd_trainer(tmp_path)
    callback = RougeLCallback(trainer, prompts, references, seeds=(5,), max_new_tokens=3)
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    states = (torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())

    # on_evaluate samples with seed 5; dropout masks and data order after it must not change.
    callback.on_evaluate(trainer.args, trainer.state, trainer.control)

    assert torch.equal(torch.random.get_rng_state(), states[0])
    assert random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])


def test_rouge_l_callback_logs_at_each_evaluation(tmp_path):
    prompts, references = prompts_and_references(build_prompt_completion_dataset(2))
    trainer = build_abkd_trainer(
        tmp_path,
        max_steps=2,
        eval_strategy="steps",
        eval_steps=1,
        eval_dataset=build_prompt_completion_dataset(2),
    )
    callback = RougeLCallback(trainer, prompts, references, seeds=(0,), max_new_tokens=3)
    trainer.add_callback(callback)
    trainer.train()

    logged_steps = [e["step"] for e in trainer.state.log_history if "eval_rouge_l" in e]
    assert logged_steps == [1, 2]
    assert "student_before" not in callback.results  # boundaries are opt-in


def test_rouge_l_callback_needs_a_teacher_for_teacher_metrics(tmp_path):
    trainer = build_abkd_trainer(tmp_path)
    trainer.teacher_model = None  # e.g. a plain SFTTrainer
    with pytest.raises(ValueError, match="teacher_model"):
        RougeLCallback(trainer, ["a"], ["b"], evaluate_teacher=True)
    with pytest.raises(ValueError, match="1 prompts but 2 references"):
        RougeLCallback(trainer, ["a"], ["b", "c"])


def test_rouge_l_reaches_the_metrics_trainer_selects_the_best_checkpoint_from(tmp_path):
    prompts, references = prompts_and_references(build_prompt_completion_dataset(2))
    trainer = build_abkd_trainer(
        tmp_path,
        max_steps=3,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        eval_dataset=build_prompt_completion_dataset(2),
        metric_for_best_model="rouge_l",
        greater_is_better=True,
        load_best_model_at_end=True,
    )
    callback = RougeLCallback(trainer, prompts, references, seeds=(0,), max_new_tokens=3)
    trainer.add_callback(callback)
    trainer.train()  # Trainer raises KeyError if `eval_rouge_l` is not in the eval metrics

    scores = {point["step"]: point["rouge_l"] for point in callback.history}
    assert sorted(scores) == [1, 2, 3]
    best_step = max(scores, key=lambda step: (scores[step], -step))  # first of equal scores
    assert trainer.state.best_metric == scores[best_step]
    assert trainer.state.best_global_step == best_step
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{best_step}")


def test_on_evaluate_adds_the_score_to_the_metrics_dict(tmp_path):
    prompts, references = prompts_and_references(build_prompt_completion_dataset(2))
    trainer = build_abkd_trainer(tmp_path)
    callback = RougeLCallback(trainer, prompts, references, seeds=(0,), max_new_tokens=2)
    metrics = {"eval_loss": 1.0}
    callback.on_evaluate(trainer.args, trainer.state, trainer.control, metrics=metrics)
    assert metrics["eval_rouge_l"] == callback.history[-1]["rouge_l"]
