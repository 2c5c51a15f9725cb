"""The model card of an `ABKDTrainer` run: its citation and the distillation set-up it lists."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from huggingface_hub import EvalResult

from abkd_trainer.core.model_card import (
    add_distillation_section,
    add_model_index,
    hub_id,
    hub_id_or_name,
)
from abkd_trainer.core.schedules import effective_warmup_ratio
from abkd_trainer.divergences.registry import divergence_config_fields, divergence_spec
from abkd_trainer.lm.config import ABKDConfig
from abkd_trainer.lm.evaluation import RougeLCallback
from abkd_trainer.lm.on_policy import on_policy_settings

# The paper TRL's model card cites (`Trainer._paper`).
ABKD_PAPER = {
    "title": "ABKD: Pursuing a Proper Allocation of the Probability Mass in Knowledge "
    "Distillation via α-β-Divergence",
    "id": "2505.04560",
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @inproceedings{wang2025abkd,
            title        = {{ABKD: Pursuing a Proper Allocation of the Probability Mass in
                             Knowledge Distillation via $\\alpha$-$\\beta$-Divergence}},
            author       = {Guanghui Wang and Zhiyong Yang and Zitai Wang and Shi Wang and
                            Qianqian Xu and Qingming Huang},
            year         = 2025,
            booktitle    = {Proceedings of the 42nd International Conference on Machine
                            Learning, {ICML} 2025},
            eprint       = {2505.04560},
            archivePrefix = {arXiv},
        }"""),
}


def distillation_card_settings(
    args: ABKDConfig, teacher_name: str, cache_top_k: int | None = None
) -> dict[str, Any]:
    """Setting name -> value, in the order the card's table shows them.

    Args:
        args: the run's configuration.
        teacher_name: the teacher (a Hub id is shown as a link).
        cache_top_k: the `k` of the teacher cache trained from, or None (a live teacher).
    """
    settings: dict[str, Any] = {
        "Teacher": hub_id_or_name(teacher_name),
        "Divergence": args.divergence,
    }
    if cache_top_k is not None:
        settings["Teacher cache"] = f"top-{cache_top_k} log-probabilities"
    settings.update(divergence_card_settings(args))
    settings.update(temperature=args.temperature, kd_ratio=args.kd_ratio)
    settings.update(on_policy_settings(args))
    return settings


def divergence_card_settings(args: ABKDConfig) -> dict[str, Any]:
    """The divergence's settings: the fields the registry names for it (its parameters, and the
    schedule fields that are set), then the (alpha, beta) warm-up."""
    settings = {
        field: getattr(args, field)
        for field in divergence_config_fields(args.divergence)
        if getattr(args, field) is not None
    }
    if divergence_spec(args.divergence).scheduled:
        if args.ab_warmup_steps > 0:
            settings["ab_warmup_steps"] = args.ab_warmup_steps
        else:
            settings["ab_warmup_ratio"] = effective_warmup_ratio(args)
    return settings


def add_distillation_card_sections(
    card_path: Path,
    settings: dict[str, Any],
    *,
    model_location: str,
    callbacks: Sequence[Any],
    model_name: str,
    global_step: int,
) -> None:
    """Add the distillation section (`settings`) and any ROUGE-L results of `callbacks` to the
    model card at `card_path` (written by TRL), in place.

    Args:
        card_path: the card (`README.md`).
        settings: `distillation_card_settings` of the run.
        model_location: the Hub repository or the folder the card's usage snippet loads from.
        callbacks: the trainer's callbacks (a `RougeLCallback` among them adds its results).
        model_name: the name the results are reported under.
        global_step: the step the results belong to.
    """
    card_text = add_distillation_section(
        card_path.read_text(encoding="utf-8"), settings, model_location=model_location
    )
    card_text = add_rouge_l_results(
        card_text, callbacks, model_name=model_name, global_step=global_step
    )
    card_path.write_text(card_text, "utf-8")


def rouge_l_eval_result(
    rouge_l: float,
    *,
    dataset: str | None,
    split: str | None = None,
    seeds: Sequence[int] = (),
    num_prompts: int | None = None,
) -> EvalResult:
    """A `model-index` entry for the ROUGE-L of sampled responses (`lm.evaluation`).

    `dataset` is a Hub id (then also the entry's dataset type) or a local path (named by its
    file or folder name, typed `local`).
    """
    from huggingface_hub import EvalResult

    dataset_id = hub_id(dataset)
    return EvalResult(
        task_type="text-generation",
        task_name="Instruction following (sampled responses, T=1, top-p 1)",
        dataset_type=dataset_id or "local",
        dataset_name=hub_id_or_name(dataset) if dataset else "held-out prompts",
        dataset_split=split,
        metric_type="rouge",
        metric_name="ROUGE-L",
        metric_value=round(float(rouge_l), 4),
        metric_config="rougeL",
        metric_args={
            "seeds": list(seeds),
            "num_prompts": num_prompts,
            "temperature": 1.0,
            "top_p": 1.0,
        },  # fmt: skip
    )


def add_rouge_l_results(
    card_text: str, callbacks: Sequence[Any], *, model_name: str, global_step: int
) -> str:
    """Add the ROUGE-L of the saved model, if a `RougeLCallback` measured it, as `model-index`.

    The score is the callback's `student_after` (after training, with the best model when
    `load_best_model_at_end`), else its evaluation at `global_step` (a checkpoint); with
    neither, `card_text` is returned unchanged.
    """
    for callback in callbacks:
        if not isinstance(callback, RougeLCallback):
            continue
        result = callback.results.get("student_after")
        if result is not None:
            rouge_l, seeds, num_prompts = result.rouge_l, result.seeds, result.num_prompts
        else:
            scores = [p["rouge_l"] for p in callback.history if p["step"] == global_step]
            if not scores:
                continue
            rouge_l, seeds = scores[-1], callback.generation_kwargs["seeds"]
            num_prompts = len(callback.prompts)
        entry = rouge_l_eval_result(
            rouge_l,
            dataset=callback.dataset_name,
            split=callback.dataset_split,
            seeds=seeds,
            num_prompts=num_prompts,
        )
        return add_model_index(card_text, model_name, [entry])
    return card_text
