"""Build the offline demo's teacher, tokenizer and dataset (``abkd_trainer/demo_assets``).

The demo must run without any Hub access, so the repository ships everything it needs. This
script regenerates those assets from a seed:

1. a synthetic instruction task in prompt/completion format over a ~120-word vocabulary
   (facts about a small invented world, answered with randomly chosen paraphrases; reversing
   and repeating word lists; naming random members of a category), so the responses are
   multi-token and the teacher's next-token distributions are genuinely spread over several
   plausible continuations;
2. a word-level tokenizer (``tokenizers`` WordLevel model, saved as ``tokenizer.json``);
3. a small Llama-architecture teacher trained on the completions with plain PyTorch
   (completion-only cross-entropy) and saved with safetensors.

Run from the repository root (about 5 minutes on 2 CPU cores)::

    .venv/bin/python scripts/build_demo_assets.py

The output is deterministic for a given seed and torch build up to floating-point
non-determinism of multi-threaded CPU kernels.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parents[1] / "abkd_trainer" / "demo_assets"

PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"

ANIMALS = [
    "fox", "owl", "bear", "wolf", "frog", "duck", "goat", "mole", "crab", "seal",
    "hare", "lynx", "moth", "newt", "swan", "toad", "wren", "yak", "eel", "ant",
]  # fmt: skip
COLORS = ["red", "brown", "grey", "white", "black", "green", "yellow", "blue"]
HABITATS = ["forest", "river", "desert", "meadow", "swamp", "mountain", "cave", "lake"]
FOODS = ["mice", "fish", "seeds", "grass", "berries", "insects", "leaves", "worms"]
CATEGORIES = {"animals": ANIMALS, "colors": COLORS, "places": HABITATS, "foods": FOODS}
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
LIST_WORDS = ANIMALS + COLORS + FOODS  # the pool the list-manipulation tasks draw from

DESCRIBE_TEMPLATES = [
    "the {a} is {c} . it lives in the {h} and eats {f} .",
    "a {c} animal that lives in the {h} . the {a} eats {f} .",
    "the {a} lives in the {h} . it is {c} and it eats {f} .",
    "it eats {f} , it is {c} and it lives in the {h} .",
]
QUESTION_TEMPLATES = {
    "where does the {a} live ?": [
        "the {a} lives in the {h} .",
        "it lives in the {h} .",
        "in the {h} .",
    ],
    "what does the {a} eat ?": ["the {a} eats {f} .", "it eats {f} .", "{f} ."],
    "what color is the {a} ?": ["the {a} is {c} .", "it is {c} .", "{c} ."],
}


@dataclass(frozen=True)
class Facts:
    color: str
    habitat: str
    food: str


def make_world(rng: random.Random) -> dict[str, Facts]:
    """Assign every animal a random colour, habitat and food (the teacher memorises these)."""
    return {
        animal: Facts(rng.choice(COLORS), rng.choice(HABITATS), rng.choice(FOODS))
        for animal in ANIMALS
    }


def format_prompt(instruction: str) -> str:
    return f"question : {instruction} answer :"


def make_example(rng: random.Random, world: dict[str, Facts]) -> dict[str, str]:
    """One prompt/completion pair; the completion starts with a space, as SFTTrainer expects."""
    task = rng.choices(["describe", "question", "reverse", "repeat", "name"], [2, 2, 2, 2, 1])[0]
    if task in ("describe", "question"):
        animal = rng.choice(ANIMALS)
        facts = world[animal]
        if task == "describe":
            instruction = f"describe the {animal} ."
            template = rng.choice(DESCRIBE_TEMPLATES)
        else:
            instruction_template = rng.choice(sorted(QUESTION_TEMPLATES))
            instruction = instruction_template.format(a=animal)
            template = rng.choice(QUESTION_TEMPLATES[instruction_template])
        answer = template.format(a=animal, c=facts.color, h=facts.habitat, f=facts.food)
    elif task in ("reverse", "repeat"):
        words = rng.sample(LIST_WORDS, rng.randint(3, 5))
        instruction = f"{task} : {' '.join(words)}"
        answer = " ".join(reversed(words) if task == "reverse" else words) + " ."
    else:
        category = rng.choice(sorted(CATEGORIES))
        count = rng.choice(sorted(COUNT_WORDS))
        items = rng.sample(CATEGORIES[category], count)
        instruction = f"name {COUNT_WORDS[count]} {category} ."
        answer = " , ".join(items[:-1]) + f" and {items[-1]} ."
    return {"prompt": format_prompt(instruction), "completion": " " + answer}


def make_splits(
    rng: random.Random, world: dict[str, Facts], num_train: int, num_test: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Training rows and held-out rows.

    Held-out list tasks never repeat a training prompt; fact and naming prompts come from a
    small finite set, so held-out rows for them are fresh samples of the same questions with
    independently drawn reference paraphrases.
    """
    train = [make_example(rng, world) for _ in range(num_train)]
    seen_list_prompts = {
        row["prompt"]
        for row in train
        if row["prompt"].startswith(("question : reverse", "question : repeat"))
    }
    test: list[dict[str, str]] = []
    while len(test) < num_test:
        row = make_example(rng, world)
        if row["prompt"] not in seen_list_prompts:
            test.append(row)
    return train, test


def build_tokenizer(rows: list[dict[str, str]]) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over every word in ``rows``; decoding joins words with spaces."""
    words = sorted({word for row in rows for word in (row["prompt"] + row["completion"]).split()})
    vocab = {token: index for index, token in enumerate([PAD, UNK, EOS, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=EOS,
        padding_side="left",  # generation pads on the left; training collators pad explicitly
        model_max_length=64,
    )


def build_teacher(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def encode(
    tokenizer: PreTrainedTokenizerFast, rows: list[dict[str, str]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` (n, L) and completion-only ``labels`` (n, L), -100 elsewhere."""
    sequences, label_rows = [], []
    for row in rows:
        prompt_ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        completion_ids = completion_ids + [tokenizer.eos_token_id]
        sequences.append(prompt_ids + completion_ids)
        label_rows.append([-100] * len(prompt_ids) + completion_ids)
    length = max(map(len, sequences))
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    labels = torch.full((len(rows), length), -100)
    for index, (sequence, label_row) in enumerate(zip(sequences, label_rows, strict=True)):
        input_ids[index, : len(sequence)] = torch.tensor(sequence)
        labels[index, : len(label_row)] = torch.tensor(label_row)
    return input_ids, labels


def train_teacher(
    model: LlamaForCausalLM,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
) -> list[float]:
    """Completion-only cross-entropy with AdamW and a warm-up + cosine schedule."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.01)
    warmup = max(1, steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    attention_mask = labels.ne(-100) | input_ids.ne(model.config.pad_token_id)
    losses: list[float] = []
    model.train()
    start = time.perf_counter()
    for step in range(steps):
        batch = torch.randint(0, input_ids.shape[0], (batch_size,), generator=generator)
        loss = model(
            input_ids=input_ids[batch], attention_mask=attention_mask[batch], labels=labels[batch]
        ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            recent = sum(losses[-200:]) / len(losses[-200:])
            print(
                f"step {step:5d}  loss {recent:.4f}  {time.perf_counter() - start:6.1f}s",
                flush=True,
            )
    model.eval()
    return losses


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train", type=int, default=8000)
    parser.add_argument("--num_test", type=int, default=200)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    args = parser.parse_args()
    # One thread: bitwise-reproducible CPU kernels, and matrices this small gain nothing from more.
    torch.set_num_threads(1)

    rng = random.Random(args.seed)
    world = make_world(rng)
    train_rows, test_rows = make_splits(rng, world, args.num_train, args.num_test)
    tokenizer = build_tokenizer(train_rows + test_rows)
    teacher = build_teacher(tokenizer, args.seed)
    num_params = sum(p.numel() for p in teacher.parameters())
    print(f"vocabulary {len(tokenizer)} words, teacher {num_params / 1e6:.2f}M parameters")

    input_ids, labels = encode(tokenizer, train_rows)
    losses = train_teacher(
        teacher,
        input_ids,
        labels,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
    )

    output_dir: Path = args.output_dir
    (output_dir / "teacher").mkdir(parents=True, exist_ok=True)
    teacher.generation_config.pad_token_id = tokenizer.pad_token_id
    teacher.save_pretrained(output_dir / "teacher")  # safetensors
    tokenizer.save_pretrained(output_dir / "teacher")
    write_jsonl(output_dir / "train.jsonl", train_rows)
    write_jsonl(output_dir / "test.jsonl", test_rows)
    manifest = {
        "built_by": "scripts/build_demo_assets.py",
        "arguments": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "teacher_parameters": num_params,
        "teacher_final_train_loss": sum(losses[-200:]) / len(losses[-200:]),
        "vocabulary_size": len(tokenizer),
        "world": {animal: vars(facts) for animal, facts in world.items()},
    }
    manifest["arguments"]["output_dir"] = "abkd_trainer/demo_assets"
    (output_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {output_dir}")


if __name__ == "__main__":
    main()
