"""The distillation section added to TRL's generated model card."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from huggingface_hub import EvalResult

SECTION_TITLE = "## Distillation"
# TRL's lm_model_card.md template: the section goes in front of the first of these headings.
_ANCHORS = ("### Framework versions", "## Citations")
# What TRL's template says when the student has no Hub id (a local path or a model built from a
# config): a link to a model called "None".
_NO_BASE_MODEL_SENTENCE = (
    "This model is a fine-tuned version of [None](https://huggingface.co/None)"
)


# A snapshot in the Hub cache: .../models--<org>--<name>/snapshots/<revision>.
_CACHE_SNAPSHOT = re.compile(
    r"(?:^|[\\/])models--(.+?)--([^\\/]+)[\\/]snapshots[\\/][^\\/]+[\\/]?$"
)


def hub_id(name_or_path: str | os.PathLike | None) -> str | None:
    """The Hub repository `name_or_path` refers to, or None for a local path without one.

    A local directory that is a snapshot of the Hub cache gives back its repository id; any
    other existing path, or a string that cannot be a repository id (an absolute or relative
    path, a file name such as `train.jsonl`), gives None.
    """
    if not name_or_path:
        return None
    text = os.fspath(name_or_path)
    cached = _CACHE_SNAPSHOT.search(text)
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    if os.path.exists(text) or Path(text).suffix.lower() in _DATA_SUFFIXES:
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return None
    return text


def hub_id_or_name(name_or_path: str | os.PathLike) -> str:
    """A model's Hub id when it has one, else its folder's name (never an absolute path)."""
    return hub_id(name_or_path) or Path(os.fspath(name_or_path).rstrip("/\\")).name


# File suffixes that name data or weights, never a Hub repository.
_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".txt", ".safetensors")


def distillation_section(settings: Mapping[str, object]) -> str:
    """Markdown for the distillation set-up: a sentence and a two-column table of `settings`."""
    rows = "\n".join(f"| {name} | {_format(value)} |" for name, value in settings.items())
    return (
        f"{SECTION_TITLE}\n\n"
        "This model is a student distilled from the teacher below with ABKD (knowledge "
        "distillation with the alpha-beta divergence, "
        "[arXiv 2505.04560](https://arxiv.org/abs/2505.04560)).\n\n"
        "| setting | value |\n| --- | --- |\n"
        f"{rows}\n\n"
    )


def add_distillation_section(
    card_text: str, settings: Mapping[str, object], model_location: str | None = None
) -> str:
    """`card_text` with `distillation_section` inserted (replacing an earlier one).

    `model_location` (a local directory) replaces the `model="None"` that TRL's quick-start
    snippet shows for a model without a Hub id.
    """
    section = distillation_section(settings)
    card_text = card_text.replace(
        _NO_BASE_MODEL_SENTENCE, "This model is a student distilled with ABKD"
    )
    if model_location is not None:
        card_text = card_text.replace('model="None"', f'model="{model_location}"')
    if SECTION_TITLE in card_text:
        # A card rewritten at every checkpoint keeps a single, current section.
        start = card_text.index(SECTION_TITLE)
        following = [card_text.find(anchor, start) for anchor in _ANCHORS]
        end = min((index for index in following if index != -1), default=len(card_text))
        card_text = card_text[:start] + card_text[end:]
    for anchor in _ANCHORS:
        if anchor in card_text:
            index = card_text.index(anchor)
            return card_text[:index] + section + card_text[index:]
    return card_text.rstrip("\n") + "\n\n" + section


def _format(value: object) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|")  # keep the table intact


def add_model_index(card_text: str, model_name: str, eval_results: Sequence[EvalResult]) -> str:
    """`card_text` with its metadata's `model-index` set to `eval_results`."""
    from huggingface_hub import ModelCard

    card = ModelCard(card_text, ignore_metadata_errors=True)
    card.data.model_name = model_name
    card.data.eval_results = list(eval_results)
    return str(card)
