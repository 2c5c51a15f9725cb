"""What every training command does the same way, before loading and after training.

`abkd-train`, `abkd-train-classifier` and `abkd-cache-teacher` read some values off the command
line before the parser runs (a DeepSpeed run on CPU needs its process group before the training
arguments exist), refuse a used output folder before loading any model, and end a run by uploading
what was saved (`--push_to_hub`) and tearing the process group down. Each command keeps its own
arguments, data loading and report.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "check_before_loading",
    "init_cpu_distributed",
    "push_and_end",
    "requested_values",
    "run_command",
]


def requested_values(argv: Sequence[str], names: Sequence[str]) -> dict[str, Any]:
    """Values of `names` given on the command line or in the `--config` YAML (not defaults).

    Args:
        argv: the command line, without the program name.
        names: field names, without the leading `--`.

    Returns:
        `{name: value}` for each name given; a command-line value wins over the YAML's. Values
        from the command line are strings.
    """
    import yaml

    values: dict[str, Any] = {}
    argv = list(argv)
    if "--config" in argv:
        config_path = argv[argv.index("--config") + 1]
        with open(config_path) as handle:
            config = yaml.safe_load(handle) or {}
        values.update({name: config[name] for name in names if config.get(name) is not None})
    for index, token in enumerate(argv):
        for name in names:
            flag = f"--{name}"
            if token == flag and index + 1 < len(argv):
                values[name] = argv[index + 1]
            elif token.startswith(flag + "="):
                values[name] = token.split("=", 1)[1]
    return values


def init_cpu_distributed(use_deepspeed: bool) -> bool:
    """Create the process group of a DeepSpeed run on CPU ranks before the arguments exist.

    Args:
        use_deepspeed: whether the command line names a DeepSpeed config.

    Returns:
        True when it created one; the training arguments must then reuse it
        (`accelerator_config=CONFIGURED_STATE_ACCELERATOR_CONFIG`, see
        `abkd_trainer.core.distributed`).
    """
    from abkd_trainer.core.distributed import init_cpu_distributed_state

    return init_cpu_distributed_state(use_deepspeed=True if use_deepspeed else None)


def check_before_loading(training_args: Any) -> str | None:
    """Checks that fail at once rather than after loading models or training.

    A reused `output_dir` (unless resuming or `--overwrite_output_dir`), a resume without a
    checkpoint, and (`--push_to_hub`, main process) a Hub that cannot be written to.

    Args:
        training_args: an `ABKDConfig` or `ABKDClassifierConfig`.

    Returns:
        The checkpoint folder to resume from, or None.
    """
    from abkd_trainer.core.checkpoints import (
        check_output_dir_is_free,
        resolve_resume_from_checkpoint,
    )
    from abkd_trainer.core.hub import check_hub_access

    check_output_dir_is_free(
        training_args.output_dir,
        resume_from_checkpoint=training_args.resume_from_checkpoint,
        overwrite_output_dir=training_args.overwrite_output_dir,
    )
    checkpoint = resolve_resume_from_checkpoint(
        training_args.resume_from_checkpoint, training_args.output_dir
    )
    if training_args.push_to_hub and training_args.process_index == 0:
        check_hub_access(training_args.hub_token)
    return checkpoint


def push_and_end(trainer: Any, **push_kwargs: Any) -> None:
    """Upload (`--push_to_hub`) once everything is saved locally, then end the run.

    Args:
        trainer: the trained `ABKDTrainer` or `ABKDClassifierTrainer`.
        **push_kwargs: passed to `trainer.push_to_hub` (e.g. `dataset_name`).

    Raises:
        HubUploadError: after every rank is done, when the upload failed; the message lists the
            local files and the command that retries the upload.
    """
    from abkd_trainer.core.hub import HubUploadError, upload_failure_message

    args = trainer.args
    upload_error = None
    if args.push_to_hub:
        try:
            trainer.push_to_hub(**push_kwargs)
        except Exception as error:  # network, auth, quota: reported once every rank is done
            upload_error = error
    trainer.accelerator.wait_for_everyone()
    trainer.end()  # finish trackers and destroy the process group
    if upload_error is not None:
        repo_id = trainer.hub_model_id or args.hub_model_id or "<repo_id>"
        message = upload_failure_message(upload_error, repo_id, args.output_dir, args.hub_revision)
        raise HubUploadError(message) from upload_error


def run_command(prog: str, run: Callable[[], None], *, cpu_deepspeed: bool) -> int:
    """Run a training command's body and turn its outcome into the exit status.

    Args:
        prog: the command's name, prefixed to the upload error.
        run: trains, saves and reports (and uploads, through `push_and_end`).
        cpu_deepspeed: whether the run is DeepSpeed on CPU ranks, whose gloo process group
            needs the hard exit of `abkd_trainer.core.distributed.finish_distributed_run`.

    Returns:
        0, or 1 when only the upload failed (training, saving and the report succeeded).
    """
    from abkd_trainer.core.distributed import finish_distributed_run
    from abkd_trainer.core.hub import HubUploadError

    try:
        run()
    except HubUploadError as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return 1
    finish_distributed_run(skip_interpreter_teardown=cpu_deepspeed)
    return 0
