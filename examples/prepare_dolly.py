"""Write Dolly as prompt/completion JSONL files, split and prompted as in the ABKD paper.

The paper (like MiniLLM and DistiLLM, whose data pipeline it reuses) trains on
databricks-dolly-15k as released in MiniLLM's ``MiniLLM/dolly`` dataset repository:
``raw.jsonl`` minus its first 1000 rows (their development set) for training, and the 500-row
``valid.jsonl`` as the held-out test set; prompts use the Alpaca template the SFT'd GPT-2
teachers (``MiniLLM/teacher-gpt2-1.5B``) were trained with, and prompts longer than 256
tokens are dropped. Usage::

    python examples/prepare_dolly.py --output_dir data/dolly              # GPT-2 (plain text)
    python examples/prepare_dolly.py --output_dir data/dolly-chat --conversational  # chat models

Then point ``abkd-train`` at ``<output_dir>/train.jsonl`` (``--dataset_name``) and
``<output_dir>/test.jsonl`` (``--dataset_test_file``). ``dev.jsonl`` holds the 1000 development
rows, for runs that select or adapt on an evaluation loss (the adaptive on-policy schedule).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

SOURCE_REPO = "MiniLLM/dolly"
NUM_DEV_ROWS = 1000  # leading rows of raw.jsonl that MiniLLM keeps out of training
MAX_PROMPT_TOKENS = 256
HEADER = "Below is an instruction that describes a task"
TEMPLATE = HEADER + ". Write a response that appropriately completes the request.\n\n"
TEMPLATE_WITH_INPUT = (
    HEADER + ", paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)


def text_prompt(instruction: str, context: str) -> str:
    """The Alpaca-style prompt; the response follows the final newline."""
    if context:
        return (
            f"{TEMPLATE_WITH_INPUT}### Instruction:\n{instruction}\n\n"
            f"### Input:\n{context}\n\n### Response:\n"
        )
    return f"{TEMPLATE}### Instruction:\n{instruction}\n\n### Response:\n"


def to_row(example: dict[str, Any], conversational: bool) -> dict[str, Any]:
    instruction, context, output = (
        example["instruction"],
        example.get("input") or "",
        example["output"],
    )
    if conversational:
        user = f"{instruction}\n\n{context}" if context else instruction
        return {
            "prompt": [{"role": "user", "content": user}],
            "completion": [{"role": "assistant", "content": output}],
        }
    return {"prompt": text_prompt(instruction, context), "completion": output}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=Path("data/dolly"))
    parser.add_argument(
        "--conversational",
        action="store_true",
        help="write chat messages (for models with a chat template) instead of text prompts",
    )
    parser.add_argument(
        "--tokenizer",
        default="openai-community/gpt2",
        help="tokenizer that measures the 256-token prompt limit",
    )
    args = parser.parse_args()

    from datasets import load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    raw = load_dataset(SOURCE_REPO, data_files={"raw": "raw.jsonl", "test": "valid.jsonl"})
    splits = {
        "train": raw["raw"].select(range(NUM_DEV_ROWS, len(raw["raw"]))),
        "dev": raw["raw"].select(range(NUM_DEV_ROWS)),  # the authors' development set
        "test": raw["test"],
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        kept = 0
        with (args.output_dir / f"{name}.jsonl").open("w") as handle:
            for example in split:
                prompt = text_prompt(example["instruction"], example.get("input") or "")
                if len(tokenizer(prompt)["input_ids"]) > MAX_PROMPT_TOKENS:
                    continue
                handle.write(json.dumps(to_row(example, args.conversational)) + "\n")
                kept += 1
        print(f"{name}: kept {kept} of {len(split)} rows -> {args.output_dir / f'{name}.jsonl'}")


if __name__ == "__main__":
    main()
