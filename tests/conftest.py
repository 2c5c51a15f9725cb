"""Shared pytest set-up: offline by construction, small thread pool, tests/ importable.

pytest puts this directory on ``sys.path`` (rootdir-relative, no ``__init__.py``), so test modules
anywhere under ``tests/`` import the factories with ``from testing_utils import ...``.
"""

from __future__ import annotations

import os

# Never reach the Hub: models and tokenizers are built in code. Set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Weights & Biases and friends are opted out per run with report_to="none"; this covers stragglers.
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

# The machine has two cores shared by several jobs; one intra-op thread keeps runs predictable.
torch.set_num_threads(1)


@pytest.fixture
def tiny_tokenizer():
    """A fresh offline byte-level tokenizer (see ``testing_utils.build_tiny_tokenizer``)."""
    from testing_utils import build_tiny_tokenizer

    return build_tiny_tokenizer()
