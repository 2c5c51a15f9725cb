"""Checking the Hub before training, and the retry command after a failed upload.

No request leaves the process: huggingface_hub's HTTP client is replaced (its documented
``set_client_factory`` hook) by one whose transport answers from a handler in the test.
"""

from __future__ import annotations

import httpx2
import pytest
from huggingface_hub import constants
from testing_utils import hub_no_network, hub_whoami

from abkd_trainer.core.hub import (
    HubAccessError,
    check_hub_access,
    retry_upload_command,
    upload_failure_message,
)


def test_a_writable_token_passes(hub_http):
    hub_http(hub_whoami("write"))
    assert check_hub_access() == "tester"


def test_no_network_names_the_hub_and_the_flag(hub_http):
    hub_http(hub_no_network)
    with pytest.raises(HubAccessError) as error:
        check_hub_access()
    message = str(error.value)
    assert "--push_to_hub" in message and "Hugging Face Hub" in message
    assert "Name or service not known" in message
    assert "hf upload" in message  # how to upload later instead


def test_a_read_only_token_is_refused(hub_http):
    hub_http(hub_whoami("read"))
    with pytest.raises(HubAccessError, match="read-only"):
        check_hub_access()


def test_a_rejected_token_is_reported(hub_http):
    hub_http(lambda request: httpx2.Response(401, json={"error": "Invalid credentials"}))
    with pytest.raises(HubAccessError, match="rejected the token"):
        check_hub_access()


def test_no_token_says_how_to_log_in(hub_http, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"))
    hub_http(hub_no_network)
    with pytest.raises(HubAccessError, match="hf auth login"):
        check_hub_access()


def test_offline_mode_fails_without_a_request(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubAccessError, match="HF_HUB_OFFLINE"):
        check_hub_access()


def test_the_failure_message_lists_the_local_files_and_the_retry_command(tmp_path):
    for name in ("model.safetensors", "README.md", "report.json"):
        (tmp_path / name).write_text("x")
    (tmp_path / "checkpoint-5").mkdir()
    message = upload_failure_message(ConnectionError("reset"), "acme/student", tmp_path)
    assert "README.md, model.safetensors, report.json" in message
    assert retry_upload_command("acme/student", tmp_path) in message
    assert retry_upload_command("acme/s", "out dir", "v1") == (
        "hf upload acme/s 'out dir' . --exclude 'checkpoint-*' --exclude '_*' --revision v1"
    )
