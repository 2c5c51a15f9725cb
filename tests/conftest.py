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


@pytest.fixture
def hub_http(monkeypatch):
    """``hub_http(handler)`` answers every Hugging Face Hub request in the test.

    Replaces huggingface_hub's HTTP client (its ``set_client_factory`` hook) by one whose
    transport calls ``handler(request) -> response``, so nothing leaves the process; the Hub is
    online and ``HF_TOKEN`` holds a dummy token for the test's duration.
    """
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")

    def install(handler) -> None:
        set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(handler)))

    yield install
    set_client_factory(default_client_factory)
