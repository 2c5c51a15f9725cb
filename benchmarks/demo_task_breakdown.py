"""Where does a demo student lose ROUGE-L? Its held-out score per task of the demo's dataset.

The demo's test prompts mix five tasks (``scripts/build_demo_assets.py``): describing an animal,
questions about one, naming members of a category, and repeating or reversing a word list. For
each saved model (a demo run's ``output_dir``, or the teacher), this samples responses to every
test prompt as the demo's report does (T = 1, top-p 1, up to 24 new tokens, sampling seeds 0, 1,
2) and prints the mean ROUGE-L per task and overall as a markdown table.

    OMP_NUM_THREADS=1 python benchmarks/demo_task_breakdown.py demo-seeds/fused-seed0 \\
        demo-seeds/logits-seed2 abkd_trainer/demo_assets/teacher
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict

TASKS = ("describe", "question", "name", "repeat", "reverse")


def task_of(prompt: str) -> str:
    """The demo task a test prompt belongs to (its instruction's first words)."""
    instruction = prompt.removeprefix("question : ")
    for task in ("describe", "name", "repeat", "reverse"):
        if instruction.startswith(task):
            return task
    return "question"  # "what color ...", "what does ...", "where does ..."


def breakdown(model_dir: str, seeds: list[int], max_new_tokens: int) -> dict[str, float]:
    """Mean ROUGE-L per task (and ``"all"``) of the model saved in ``model_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    from abkd_trainer.lm.demo import load_demo_dataset
    from abkd_trainer.lm.evaluation import (
        generate_responses,
        prompts_and_references,
        rouge_l_score,
        sampling_config,
    )

    prompts, references = prompts_and_references(load_demo_dataset()["test"])
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = sampling_config(tokenizer, max_new_tokens=max_new_tokens)
    scores: dict[str, list[float]] = defaultdict(list)
    for seed in seeds:
        set_seed(seed)
        responses = generate_responses(model, tokenizer, prompts, config, batch_size=64)
        for prompt, response, reference in zip(prompts, responses, references, strict=True):
            score = rouge_l_score(response, reference)
            scores[task_of(prompt)].append(score)
            scores["all"].append(score)
    return {task: statistics.fmean(values) for task, values in scores.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dirs", nargs="+", help="Saved models (demo output_dirs).")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max_new_tokens", type=int, default=24)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    columns = [*TASKS, "all"]
    print("| model | " + " | ".join(columns) + " |")
    print("|" + " --- |" * (len(columns) + 1))
    for model_dir in args.model_dirs:
        result = breakdown(model_dir, args.seeds, args.max_new_tokens)
        cells = [f"{result[task]:.1f}" for task in columns]
        print(f"| {model_dir} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
