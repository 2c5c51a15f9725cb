"""ABKDTrainer on sampled completions: lmbda, seq_kd, adaptive schedule, normalisation, resume."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from datasets import Dataset
from testing_utils import (
    build_abkd_trainer,
    build_conversational_dataset,
    build_conversational_prompt_completion_dataset,
    build_prompt_completion_dataset,
    build_student_and_teacher,
    build_text_dataset,
    build_tiny_tokenizer,
    reference_distillation_sums,
)
from transformers import TrainerCallback

from abkd_trainer import DIVERGENCE_NAMES
from abkd_trainer.lm.on_policy import BatchSource, OnPolicySchedule

X = -100


class Recorder:
    """Records a model's ``generate`` results and the batches ``compute_loss`` trains on."""

    def __init__(self, trainer, *models_by_name: tuple[str, Any]) -> None:
        self.generated: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.generate_calls: dict[str, int] = {}
        for name, model in models_by_name:
            self._wrap_generate(name, model)
        self.losses: list[tuple[dict[str, torch.Tensor], Any]] = []
        compute_loss = trainer.compute_loss

        def recording_compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.losses.append(({k: v.clone() for k, v in inputs.items()}, num_items_in_batch))
            return compute_loss(model, inputs, return_outputs, num_items_in_batch)

        trainer.compute_loss = recording_compute_loss

    def _wrap_generate(self, name, model):
        generate = model.generate
        self.generated[name] = []
        self.generate_calls[name] = 0

        def recording_generate(input_ids, attention_mask, **kwargs):
            sequences = generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            self.generate_calls[name] += 1
            for row in range(len(input_ids)):
                prompt = input_ids[row][attention_mask[row].bool()]
                self.generated[name].append((prompt, sequences[row, input_ids.size(1) :]))
            return sequences

        model.generate = recording_generate  # this test's own model instance only


def supervised_rows(batch) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, supervised ids) of each row of a sampled or dataset batch."""
    rows = []
    for ids, labels, mask in zip(
        batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True
    ):
        ids, labels = ids[mask.bool()], labels[mask.bool()]
        supervised = labels != X
        first = int(supervised.nonzero()[0]) if supervised.any() else len(ids)
        assert bool(supervised[first:].all()), "the supervised tokens are one final span"
        rows.append((ids[:first].tolist(), ids[first:].tolist()))
    return rows


def trimmed(completion: torch.Tensor, eos: int) -> list[int]:
    tokens = completion.tolist()
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def on_policy_trainer(tmp_path, *, tokenizer=None, student=None, teacher=None, **overrides):
    tokenizer = tokenizer or build_tiny_tokenizer()
    if student is None:
        student, teacher = build_student_and_teacher("qwen2", tokenizer)
    settings = {"max_new_tokens": 6, "gradient_accumulation_steps": 2, "max_steps": 3}
    return build_abkd_trainer(
        tmp_path,
        tokenizer=tokenizer,
        student=student,
        teacher=teacher,
        **{**settings, **overrides},
    )


def step_logs(trainer, key):
    return {log["step"]: log[key] for log in trainer.state.log_history if key in log}


# ------------------------------------------------------------------ lmbda = 1


@pytest.mark.parametrize("use_fused_loss", [True, False])
def test_lmbda_one_trains_exactly_on_the_students_samples(tmp_path, use_fused_loss):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("qwen2", tokenizer)
    initial_student = copy.deepcopy(student)
    trainer = on_policy_trainer(
        tmp_path,
        tokenizer=tokenizer,
        student=student,
        teacher=teacher,
        lmbda=1.0,
        use_fused_loss=use_fused_loss,
        ab_warmup_ratio=0.0,  # the loss reference uses the configured (alpha, beta)
    )
    recorder = Recorder(trainer, ("student", student), ("teacher", teacher))
    trainer.train()

    eos = tokenizer.eos_token_id
    # One batched generate per optimizer step, covering every micro-batch (2 x 2 prompts).
    assert recorder.generate_calls == {"student": 3, "teacher": 0}
    samples = recorder.generated["student"]
    assert len(samples) == 12 and len(recorder.losses) == 6
    for micro, (batch, num_items) in enumerate(recorder.losses):
        rows = supervised_rows(batch)
        for row, (prompt, supervised) in enumerate(rows):
            sample_prompt, completion = samples[2 * micro + row]
            assert prompt == sample_prompt.tolist()
            assert supervised == trimmed(completion, eos)  # exactly the sampled tokens
            assert 1 <= len(supervised) <= 6
        # Normalised by the sampled tokens of the whole optimizer step (both micro-batches).
        step = micro // 2
        step_tokens = sum(len(trimmed(c, eos)) for _, c in samples[4 * step : 4 * step + 4])
        assert int(num_items) == step_tokens

    # The prompts are the dataset's prompts.
    dataset_prompts = {tuple(tokenizer(p)["input_ids"]) for p in trainer.train_dataset["prompt"]}
    assert {tuple(p.tolist()) for p, _ in samples} <= dataset_prompts

    # The first step's loss is the AB-divergence over the sampled tokens, token-normalised.
    first_step = [row for batch, _ in recorder.losses[:2] for row in supervised_rows(batch)]
    sequences = [prompt + supervised for prompt, supervised in first_step]
    targets = [
        [False] * len(prompt) + [True] * len(supervised) for prompt, supervised in first_step
    ]
    reference = reference_distillation_sums(
        initial_student,
        teacher,
        sequences,
        targets,
        vocab_size=len(tokenizer),
        alpha=0.2,
        beta=0.7,
    )
    assert step_logs(trainer, "loss")[1] == pytest.approx(
        reference["kd"] / reference["count"], rel=1e-4
    )
    assert step_logs(trainer, "on_policy_fraction") == {1: 1.0, 2: 1.0, 3: 1.0}
    lengths = step_logs(trainer, "completion_length")
    assert lengths[1] == pytest.approx(reference["count"] / 4)
    assert all(t >= 0 for t in step_logs(trainer, "generation_time").values())


@pytest.mark.parametrize("divergence", DIVERGENCE_NAMES)
def test_every_divergence_gives_the_same_loss_on_both_paths(tmp_path, divergence):
    losses = {}
    for fused in (True, False):
        trainer = on_policy_trainer(
            tmp_path / str(fused),
            lmbda=1.0,
            max_steps=1,
            divergence=divergence,
            use_fused_loss=fused,
            kd_ratio=0.8,
        )
        trainer.train()
        losses[fused] = step_logs(trainer, "loss")[1]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert 0 < losses[True] < float("inf")


def test_accumulation_and_batch_size_give_the_same_on_policy_update(tmp_path):
    def one_step(batch_size, accumulation):
        trainer = on_policy_trainer(
            tmp_path / f"{batch_size}x{accumulation}",
            lmbda=1.0,
            max_steps=1,
            train_dataset=Dataset.from_dict(
                {
                    "prompt": ["Hi.", "Name a colour.", "What is two plus two?", "Say it."],
                    "completion": [" Yes.", " Blue.", " Four.", " It."],
                }
            ),
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            optim="sgd",
            learning_rate=1.0,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=0.0,
        )
        initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        return initial, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    # Both generate the same 4 prompts in one call (same seed), so the samples are the same.
    initial, large = one_step(4, 1)
    _, accumulated = one_step(1, 4)
    assert max((large[n] - initial[n]).abs().max().item() for n in initial) > 1e-3
    for name in initial:
        torch.testing.assert_close(accumulated[name], large[name], rtol=0, atol=1e-5)


# ------------------------------------------------------------------ seq_kd and mixing


def test_seq_kd_trains_on_the_teachers_samples(tmp_path):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("llama", tokenizer)
    trainer = on_policy_trainer(
        tmp_path, tokenizer=tokenizer, student=student, teacher=teacher, seq_kd=True
    )
    recorder = Recorder(trainer, ("student", student), ("teacher", teacher))
    trainer.train()
    assert recorder.generate_calls == {"student": 0, "teacher": 3}
    samples = recorder.generated["teacher"]
    for micro, (batch, _) in enumerate(recorder.losses):
        for row, (prompt, supervised) in enumerate(supervised_rows(batch)):
            sample_prompt, completion = samples[2 * micro + row]
            assert prompt == sample_prompt.tolist()
            assert supervised == trimmed(completion, tokenizer.eos_token_id)
    assert step_logs(trainer, "teacher_sampled_fraction") == {1: 1.0, 2: 1.0, 3: 1.0}
    assert step_logs(trainer, "on_policy_fraction") == {1: 0.0, 2: 0.0, 3: 0.0}


def test_lmbda_half_mixes_student_samples_and_dataset_completions(tmp_path):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("qwen2", tokenizer)
    trainer = on_policy_trainer(
        tmp_path, tokenizer=tokenizer, student=student, teacher=teacher, lmbda=0.5, max_steps=6
    )
    recorder = Recorder(trainer, ("student", student))
    trainer.train()

    schedule = OnPolicySchedule("constant", lmbda=0.5, seed=trainer.args.seed)
    expected = [schedule.uniform(step, micro) < 0.5 for step in range(6) for micro in range(2)]
    assert 0 < sum(expected) < 12  # this seed mixes
    # (SFTTrainer's preparation appended the EOS text to the completions.)
    dataset_completions = {
        tuple(tokenizer(c)["input_ids"]) for c in trainer.train_dataset["completion"]
    }
    assert all(c[-1] == tokenizer.eos_token_id for c in dataset_completions)
    samples = iter(recorder.generated["student"])
    for (batch, _), from_student in zip(recorder.losses, expected, strict=True):
        for _prompt, supervised in supervised_rows(batch):
            if from_student:
                _, completion = next(samples)
                assert supervised == trimmed(completion, tokenizer.eos_token_id)
            else:
                assert tuple(supervised) in dataset_completions
    assert next(samples, None) is None  # no sample was generated and not trained on
    fractions = step_logs(trainer, "on_policy_fraction")
    for step in range(6):
        assert fractions[step + 1] == sum(expected[2 * step : 2 * step + 2]) / 2


def test_lmbda_zero_changes_nothing(tmp_path):
    def losses(**overrides):
        trainer = on_policy_trainer(tmp_path / str(overrides), max_steps=2, **overrides)
        assert trainer.on_policy is None  # no sampler, no schedule callback
        assert not any(
            isinstance(cb, OnPolicySchedule) for cb in trainer.callback_handler.callbacks
        )
        trainer.train()
        assert "on_policy_fraction" not in trainer.state.log_history[0]
        return step_logs(trainer, "loss")

    # lmbda=0 (constant schedule, no seq_kd) leaves the off-policy trajectory unchanged, whatever
    # the generation settings.
    assert losses() == losses(lmbda=0.0, max_new_tokens=3, generation_temperature=0.5)


def test_same_seed_gives_the_same_samples_and_trajectory(tmp_path):
    runs = []
    for run in range(2):
        tokenizer = build_tiny_tokenizer()
        student, teacher = build_student_and_teacher("qwen2", tokenizer)
        trainer = on_policy_trainer(
            tmp_path / str(run),
            tokenizer=tokenizer,
            student=student,
            teacher=teacher,
            lmbda=0.5,
            seq_kd=True,
            max_steps=4,
        )
        recorder = Recorder(trainer, ("student", student), ("teacher", teacher))
        trainer.train()
        samples = {
            name: [completion.tolist() for _, completion in pairs]
            for name, pairs in recorder.generated.items()
        }
        runs.append((samples, step_logs(trainer, "loss")))
    assert runs[0] == runs[1]
    assert runs[0][0]["student"] and runs[0][0]["teacher"]


# ------------------------------------------------------------------ prompts


@pytest.mark.parametrize(
    ("dataset", "overrides", "match"),
    [
        (build_text_dataset(), {}, "plain `text` dataset"),
        (build_conversational_dataset(), {}, "assistant_only_loss=True"),
        (
            Dataset.from_dict({"prompt": ["Hi."] * 4, "completion": [" Yes."] * 4}),
            {"completion_only_loss": False},
            "completion_only_loss",
        ),
    ],
)
@pytest.mark.parametrize("mode", [{"lmbda": 0.5}, {"seq_kd": True}])
def test_data_without_prompts_is_refused_at_construction(tmp_path, dataset, overrides, match, mode):
    with pytest.raises(ValueError, match=match):
        on_policy_trainer(tmp_path, train_dataset=dataset, **overrides, **mode)


@pytest.mark.parametrize(
    ("dataset", "overrides"),
    [
        (build_conversational_dataset(), {"assistant_only_loss": True}),
        (build_conversational_prompt_completion_dataset(), {}),
    ],
)
def test_conversational_prompts_are_the_turns_before_the_answer_with_a_generation_prompt(
    tmp_path, dataset, overrides
):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("qwen2", tokenizer)
    trainer = on_policy_trainer(
        tmp_path,
        tokenizer=tokenizer,
        student=student,
        teacher=teacher,
        lmbda=1.0,
        max_steps=1,
        train_dataset=dataset,
        **overrides,
    )
    recorder = Recorder(trainer, ("student", student))
    trainer.train()
    if "messages" in dataset.column_names:
        conversations = [messages[:-1] for messages in dataset["messages"]]
    else:
        conversations = dataset["prompt"]
    rendered = {
        tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        for turns in conversations
    }
    prompts = [tokenizer.decode(p) for p, _ in recorder.generated["student"]]
    assert len(prompts) == 4 and set(prompts) <= rendered
    assert all(p.endswith("<|im_start|>assistant\n") for p in prompts)


# ------------------------------------------------------------------ adaptive schedule


def adaptive_trainer(tmp_path, **overrides):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("qwen2", tokenizer)
    settings = {
        "on_policy_schedule": "adaptive",
        "eval_strategy": "steps",
        "eval_steps": 1000,
        "gradient_accumulation_steps": 1,
        "eval_dataset": Dataset.from_dict({"prompt": ["Hi."] * 2, "completion": [" Yes."] * 2}),
    }
    settings.update(overrides)
    trainer = on_policy_trainer(
        tmp_path, tokenizer=tokenizer, student=student, teacher=teacher, **settings
    )
    return trainer, student


def live_schedule(trainer) -> OnPolicySchedule:
    return next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, OnPolicySchedule))


def test_adaptive_schedule_replays_buffered_student_samples(tmp_path):
    trainer, student = adaptive_trainer(tmp_path, lmbda=1.0, replay_buffer_size=4, max_steps=8)
    recorder = Recorder(trainer, ("student", student))
    trainer.train()

    # Steps 0-1 fill the buffer (2 sequences each); then a micro-batch replays with probability t/T.
    schedule = OnPolicySchedule("adaptive", lmbda=1.0, seed=trainer.args.seed)
    sources = [schedule.choose(step, 0, 8, replay_buffer_full=step >= 2) for step in range(8)]
    assert sources[:2] == [BatchSource.STUDENT] * 2
    assert BatchSource.REPLAY in sources and BatchSource.DATASET not in sources
    generated = {
        (tuple(p.tolist()), tuple(trimmed(c, trainer.processing_class.eos_token_id)))
        for p, c in recorder.generated["student"]
    }
    assert len(recorder.generated["student"]) == 2 * sources.count(BatchSource.STUDENT)
    for batch, _ in recorder.losses:
        rows = {(tuple(p), tuple(s)) for p, s in supervised_rows(batch)}
        assert rows <= generated  # fresh or replayed, always a student sample
    replay = step_logs(trainer, "replay_fraction")
    assert [replay[s + 1] for s in range(8)] == [float(s is BatchSource.REPLAY) for s in sources]
    assert step_logs(trainer, "on_policy_probability")[8] == 1.0
    assert step_logs(trainer, "replay_buffer_size")[8] == 4.0


def test_adaptive_probability_rises_when_the_eval_loss_worsens(tmp_path):
    trainer, _ = adaptive_trainer(tmp_path, lmbda=0.0, max_steps=2)
    schedule = live_schedule(trainer)
    handler, args, state, control = (
        trainer.callback_handler,
        trainer.args,
        trainer.state,
        trainer.control,
    )
    handler.on_evaluate(args, state, control, metrics={"eval_loss": 3.0})
    handler.on_evaluate(args, state, control, metrics={"eval_loss": 2.5})  # improves
    assert schedule.probability == 0.0
    for _ in range(10):  # worsens past eps each time: +0.1 until 1.0
        handler.on_evaluate(
            args, state, control, metrics={"eval_loss": schedule.reference_loss + 0.2}
        )
    assert schedule.probability == pytest.approx(1.0)
    trainer.train()  # the risen probability is what training uses: every batch sampled
    assert step_logs(trainer, "on_policy_fraction") == {1: 1.0, 2: 1.0}
    assert step_logs(trainer, "on_policy_probability") == {1: 1.0, 2: 1.0}


def test_adaptive_schedule_reads_real_evaluations(tmp_path):
    trainer, _ = adaptive_trainer(
        tmp_path, lmbda=0.2, adaptive_loss_eps=0.0, eval_steps=1, max_steps=3, eval_on_start=True
    )
    trainer.train()
    eval_losses = [log["eval_loss"] for log in trainer.state.log_history if "eval_loss" in log]
    assert len(eval_losses) == 4  # on start, then after each step
    expected = OnPolicySchedule("adaptive", lmbda=0.2, adaptive_loss_eps=0.0)
    for loss in eval_losses:
        expected.update(loss)
    schedule = live_schedule(trainer)
    assert (schedule.probability, schedule.reference_loss) == (
        expected.probability,
        expected.reference_loss,
    )


@pytest.mark.parametrize(
    ("overrides", "match"),
    [({"eval_dataset": None}, "eval_dataset"), ({"eval_strategy": "no"}, "eval_strategy")],
)
def test_adaptive_schedule_needs_evaluations(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        adaptive_trainer(tmp_path, lmbda=0.1, **overrides)


# ------------------------------------------------------------------ resume


class RaiseProbabilityAtStep(TrainerCallback):
    """Feeds ``schedule`` two evaluations at ``step``, the second worse, so that it rises."""

    def __init__(self, step, schedule):
        self.step = step
        self.schedule = schedule

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            # Far above the real losses (~4), so that later real evaluations never rise again.
            self.schedule.update(100.0)
            self.schedule.update(100.5)


def resumable_trainer(output_dir):
    trainer, _ = adaptive_trainer(
        output_dir,
        lmbda=0.0,
        adaptive_step=0.5,
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
        gradient_accumulation_steps=2,
    )
    trainer.add_callback(RaiseProbabilityAtStep(2, live_schedule(trainer)))
    return trainer


def test_resume_restores_the_schedule_and_continues_the_trajectory(tmp_path):
    uninterrupted = resumable_trainer(tmp_path / "full")
    uninterrupted.train()
    assert live_schedule(uninterrupted).probability == 0.5
    fractions = step_logs(uninterrupted, "on_policy_fraction")
    assert fractions[1] == fractions[2] == 0.0 and any(fractions[s] > 0 for s in (4, 5, 6))

    resumed = resumable_trainer(tmp_path / "resumed")
    assert live_schedule(resumed).probability == 0.0
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    schedule = live_schedule(resumed)
    assert (schedule.probability, schedule.reference_loss) == (0.5, 100.5)
    expected_losses, observed_losses = step_logs(uninterrupted, "loss"), step_logs(resumed, "loss")
    resumed_fractions = step_logs(resumed, "on_policy_fraction")
    for step in (4, 5, 6):
        assert resumed_fractions[step] == fractions[step]
        assert observed_losses[step] == pytest.approx(expected_losses[step], rel=1e-6, abs=1e-7)


def test_resume_restores_the_replay_buffer_and_continues_the_trajectory(tmp_path):
    def replaying_trainer(output_dir):
        trainer, _ = adaptive_trainer(
            output_dir,
            lmbda=1.0,
            replay_buffer_size=4,
            max_steps=8,
            save_strategy="steps",
            save_steps=4,
        )
        return trainer

    uninterrupted = replaying_trainer(tmp_path / "full")
    uninterrupted.train()
    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert (checkpoint / "replay_buffer_0.safetensors").is_file()
    replayed = step_logs(uninterrupted, "replay_fraction")
    # The steps after the checkpoint replay samples drawn before it (the buffer was full).
    assert any(replayed[step] > 0 for step in (5, 6, 7, 8))

    resumed = replaying_trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert step_logs(resumed, "replay_buffer_size")[5] == 4.0  # full at once, not refilling
    expected, observed = step_logs(uninterrupted, "loss"), step_logs(resumed, "loss")
    for step in (5, 6, 7, 8):
        assert step_logs(resumed, "replay_fraction")[step] == replayed[step]
        assert observed[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7)


# ------------------------------------------------------------------ model card


def test_model_card_records_the_on_policy_settings(tmp_path):
    from huggingface_hub import ModelCard

    trainer, _ = adaptive_trainer(tmp_path / "on", lmbda=0.2, max_new_tokens=7)
    trainer.create_model_card()
    text = ModelCard.load(tmp_path / "on" / "README.md").text
    for row in ("| lmbda | 0.2 |", "| on_policy_schedule | adaptive |", "| max_new_tokens | 7 |"):
        assert row in text
    assert "| replay_buffer_size | 1000 |" in text

    off = on_policy_trainer(tmp_path / "off")
    off.create_model_card()
    assert "lmbda" not in ModelCard.load(tmp_path / "off" / "README.md").text


def test_samples_never_pass_either_models_position_limit(tmp_path):
    tokenizer = build_tiny_tokenizer()
    student, teacher = build_student_and_teacher("gpt2", tokenizer)
    prompts = build_prompt_completion_dataset()["prompt"]  # the trainer's default dataset
    longest_prompt = max(len(tokenizer(prompt)["input_ids"]) for prompt in prompts)
    # The teacher's config allows 3 tokens after the longest prompt; the student allows more.
    limit = longest_prompt + 3
    teacher.config.n_positions = limit
    trainer = on_policy_trainer(
        tmp_path,
        tokenizer=tokenizer,
        student=student,
        teacher=teacher,
        lmbda=1.0,
        max_new_tokens=12,
        max_length=limit,
    )
    recorder = Recorder(trainer, ("student", student))
    trainer.train()

    lengths = [int(mask.sum()) for batch, _ in recorder.losses for mask in batch["attention_mask"]]
    assert max(lengths) <= limit
    completions = [len(c) for _, c in recorder.generated["student"]]
    assert max(completions) < 12  # cut short: 12 new tokens would not fit
