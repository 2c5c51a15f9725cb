"""What the training commands share: early output-folder and Hub checks, the upload and exit."""

from __future__ import annotations

import pytest
from testing_utils import hub_no_network

from abkd_trainer import ABKDClassifierConfig, ABKDConfig
from abkd_trainer.cli.common import (
    check_before_loading,
    push_and_end,
    requested_values,
    run_command,
)
from abkd_trainer.core.checkpoints import OutputDirInUseError
from abkd_trainer.core.hub import HubAccessError, HubUploadError

CONFIGS = pytest.mark.parametrize("config_class", [ABKDConfig, ABKDClassifierConfig])


def _used_output_dir(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text("{}")
    return tmp_path


@CONFIGS
def test_a_used_output_dir_is_refused_unless_resuming_or_overwriting(tmp_path, config_class):
    output_dir = str(_used_output_dir(tmp_path))
    with pytest.raises(OutputDirInUseError, match="--overwrite_output_dir"):
        check_before_loading(config_class(output_dir, use_cpu=True))
    assert check_before_loading(
        config_class(output_dir, use_cpu=True, overwrite_output_dir=True)
    ) is None  # fmt: skip
    resumed = check_before_loading(
        config_class(output_dir, use_cpu=True, resume_from_checkpoint="true")
    )
    assert resumed is not None and resumed.endswith("checkpoint-4")


@CONFIGS
def test_push_to_hub_without_network_is_refused_before_loading(tmp_path, config_class, hub_http):
    hub_http(hub_no_network)
    args = config_class(str(tmp_path), use_cpu=True, push_to_hub=True, hub_model_id="acme/s")
    with pytest.raises(HubAccessError, match="--push_to_hub"):
        check_before_loading(args)


def test_requested_values_reads_the_command_line_over_the_yaml(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("alpha: 0.5\nbeta: 0.4\n")
    argv = ["--config", str(config), "--alpha=0.2", "--deepspeed", "zero3.json"]
    assert requested_values(argv, ("alpha", "beta", "deepspeed", "kd_ratio")) == {
        "alpha": "0.2",
        "beta": 0.4,
        "deepspeed": "zero3.json",
    }


class _FailingUploadTrainer:
    """What `push_and_end` uses of a trainer, with an upload that fails."""

    class accelerator:  # noqa: N801 - stands in for the Accelerator instance
        @staticmethod
        def wait_for_everyone() -> None:
            pass

    def __init__(self, args) -> None:
        self.args, self.hub_model_id, self.ended, self.pushed = args, None, False, None

    def push_to_hub(self, **kwargs) -> None:
        self.pushed = kwargs
        raise ConnectionError("Name or service not known")

    def end(self) -> None:
        self.ended = True


def test_a_failed_upload_ends_the_run_then_exits_1_with_the_retry_command(tmp_path, capsys):
    args = ABKDClassifierConfig(
        str(tmp_path), use_cpu=True, push_to_hub=True, hub_model_id="acme/student"
    )
    trainer = _FailingUploadTrainer(args)
    with pytest.raises(HubUploadError):
        push_and_end(trainer, dataset_name="acme/data")
    assert trainer.ended and trainer.pushed == {"dataset_name": "acme/data"}

    assert run_command("abkd-x", lambda: push_and_end(trainer), cpu_deepspeed=False) == 1
    error = capsys.readouterr().err
    assert error.startswith("abkd-x: ") and "hf upload acme/student" in error
    assert run_command("abkd-x", lambda: None, cpu_deepspeed=False) == 0
