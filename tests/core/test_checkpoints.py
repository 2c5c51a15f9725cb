"""Output-directory rules: which checkpoint to resume from, and when a folder is in use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from abkd_trainer.core.checkpoints import (
    OutputDirInUseError,
    check_output_dir_is_free,
    latest_complete_checkpoint,
    previous_run_files,
    resolve_resume_from_checkpoint,
)


def make_checkpoint(output_dir: Path, step: int, *, complete: bool = True) -> Path:
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"")
    if complete:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_latest_complete_checkpoint_orders_by_step_not_by_name(tmp_path):
    for step in (2, 10, 9):
        make_checkpoint(tmp_path, step)
    assert latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")


def test_an_incomplete_checkpoint_is_skipped_with_a_warning(tmp_path):
    make_checkpoint(tmp_path, 5)
    make_checkpoint(tmp_path, 10, complete=False)  # killed while saving
    with pytest.warns(UserWarning, match="incomplete checkpoint .*checkpoint-10"):
        assert latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-5")


@pytest.mark.parametrize("value", [True, "true", "True", "1"])
def test_true_in_any_spelling_resumes_from_the_latest_checkpoint(tmp_path, value):
    make_checkpoint(tmp_path, 3)
    assert resolve_resume_from_checkpoint(value, tmp_path) == str(tmp_path / "checkpoint-3")


@pytest.mark.parametrize("value", [None, False, "false", "False"])
def test_false_values_start_afresh(tmp_path, value):
    make_checkpoint(tmp_path, 3)
    assert resolve_resume_from_checkpoint(value, tmp_path) is None


def test_resuming_without_a_complete_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(ValueError, match="no complete `checkpoint-<step>`"):
        resolve_resume_from_checkpoint(True, tmp_path / "never-created")
    incomplete = make_checkpoint(tmp_path, 4, complete=False)
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume_from_checkpoint(str(incomplete), tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        resolve_resume_from_checkpoint(str(tmp_path / "checkpoint-99"), tmp_path)


def test_previous_run_files_lists_checkpoints_and_saved_models(tmp_path):
    assert previous_run_files(tmp_path) == []
    (tmp_path / "report.json").write_text("{}")  # a report alone is not a run to protect
    assert previous_run_files(tmp_path) == []
    make_checkpoint(tmp_path, 7)
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert previous_run_files(tmp_path) == ["checkpoint-7", "model.safetensors"]


def test_a_folder_in_use_is_refused_unless_resuming_or_overwriting(tmp_path):
    check_output_dir_is_free(tmp_path, resume_from_checkpoint=None, overwrite_output_dir=False)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(OutputDirInUseError) as error:
        check_output_dir_is_free(tmp_path, resume_from_checkpoint=None, overwrite_output_dir=False)
    message = str(error.value)
    assert "--resume_from_checkpoint" in message and "--overwrite_output_dir" in message
    assert "adapter_model.safetensors" in message
    check_output_dir_is_free(tmp_path, resume_from_checkpoint="true", overwrite_output_dir=False)
    check_output_dir_is_free(tmp_path, resume_from_checkpoint=None, overwrite_output_dir=True)
