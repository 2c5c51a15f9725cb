"""What an output directory already holds: resuming from it, or refusing to overwrite it.

A second run into the `output_dir` of an earlier one would interleave its checkpoints with the
old ones, let `save_total_limit` rotate the old run's checkpoints away, and make a later
`resume_from_checkpoint=True` pick the old run's last checkpoint. The HF example scripts
therefore refuse such a folder unless the user says `--resume_from_checkpoint` (continue) or
`--overwrite_output_dir` (start afresh); `abkd-train` does the same
(`check_output_dir_is_free`), and `ABKDTrainer.train()` warns
(`prepare_output_dir`).

A checkpoint is complete once Trainer has written its `trainer_state.json`, the last file of
`Trainer._save_checkpoint`; a run killed while saving leaves one without it, which resuming
skips with a warning instead of failing on it.
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils import (
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

TRAINER_STATE_NAME = "trainer_state.json"
# Files whose presence means a model was saved in the folder (full weights or a PEFT adapter).
SAVED_MODEL_FILES = (
    SAFE_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    "adapter_model.safetensors",
    "adapter_model.bin",
)
_CHECKPOINT_PATTERN = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# Spellings of "resume from the latest checkpoint" (a bare `--resume_from_checkpoint` gives "true").
_TRUE_STRINGS = ("true", "yes", "1")
_FALSE_STRINGS = ("false", "no", "0", "none", "")
# Output directories already warned about in this process (warn once per folder).
_WARNED_OUTPUT_DIRS: set[Path] = set()


class OutputDirInUseError(ValueError):
    """`output_dir` holds an earlier run and the user said neither resume nor overwrite."""


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-<step>` folders of `output_dir`, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    steps = {
        path: int(match.group(1))
        for path in output_dir.iterdir()
        if path.is_dir() and (match := _CHECKPOINT_PATTERN.match(path.name))
    }
    return sorted(steps, key=steps.__getitem__)


def is_complete_checkpoint(path: str | Path) -> bool:
    """Whether Trainer finished writing the checkpoint (its `trainer_state.json` exists)."""
    return (Path(path) / TRAINER_STATE_NAME).is_file()


def latest_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The highest-step complete checkpoint in `output_dir`, or None.

    Newer incomplete checkpoints (a run killed while saving) are skipped with a warning.
    """
    # transformers' own choice first: the highest step, complete in the usual case.
    latest = get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None
    if latest is None or is_complete_checkpoint(latest):
        return latest
    for checkpoint in reversed(checkpoint_dirs(output_dir)):
        if is_complete_checkpoint(checkpoint):
            return str(checkpoint)
        warnings.warn(
            f"Skipping the incomplete checkpoint {checkpoint} (no {TRAINER_STATE_NAME}: the run "
            "was probably stopped while saving it). Delete it once you no longer need it.",
            stacklevel=3,
        )
    return None


def wants_latest_checkpoint(value: Any) -> bool | None:
    """Interpret `resume_from_checkpoint`: True (latest), False (none) or None (a path)."""
    if value is None or isinstance(value, bool):
        return bool(value)
    text = str(value).strip().lower()
    if text in _TRUE_STRINGS:
        return True
    if text in _FALSE_STRINGS:
        return False
    return None


def resolve_resume_from_checkpoint(value: str | bool | None, output_dir: str | Path) -> str | None:
    """The checkpoint folder to resume from, or None to start afresh.

    Args:
        value: `resume_from_checkpoint` as given: None / False / `"false"` (start afresh),
            True / `"true"` (the latest complete checkpoint of `output_dir`) or a path.
        output_dir: the run's output directory.

    Raises:
        ValueError: resuming was asked for but there is no complete checkpoint to resume from.
    """
    latest = wants_latest_checkpoint(value)
    if latest is False:
        return None
    if latest:
        checkpoint = latest_complete_checkpoint(output_dir)
        if checkpoint is None:
            raise ValueError(
                f"`resume_from_checkpoint` asks to resume from the latest checkpoint in "
                f"{output_dir}, but it holds no complete `{PREFIX_CHECKPOINT_DIR}-<step>` folder "
                f"(one with {TRAINER_STATE_NAME}). Pass a checkpoint's path, or drop "
                "`--resume_from_checkpoint` to start a new run."
            )
        return checkpoint
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        raise ValueError(f"`resume_from_checkpoint`: {value} is not a directory.")
    if not is_complete_checkpoint(path):
        raise ValueError(
            f"`resume_from_checkpoint`: {value} is not a complete checkpoint (no "
            f"{TRAINER_STATE_NAME}; was the run stopped while saving it?). Pass an earlier "
            "checkpoint, or `true` for the latest complete one."
        )
    return str(path)


def previous_run_files(output_dir: str | Path) -> list[str]:
    """Checkpoint folders and saved-model files that an earlier run left in `output_dir`."""
    output_dir = Path(output_dir)
    found = [path.name for path in checkpoint_dirs(output_dir)]
    found += [name for name in SAVED_MODEL_FILES if (output_dir / name).is_file()]
    return found


def _describe(files: list[str], limit: int = 4) -> str:
    shown = ", ".join(files[:limit])
    return shown + (f" and {len(files) - limit} more" if len(files) > limit else "")


def check_output_dir_is_free(
    output_dir: str | Path, *, resume_from_checkpoint: Any, overwrite_output_dir: bool
) -> None:
    """Refuse an `output_dir` holding an earlier run unless resuming or overwriting (CLI rule).

    Raises:
        OutputDirInUseError: naming what the folder holds and both options.
    """
    if overwrite_output_dir or wants_latest_checkpoint(resume_from_checkpoint) is not False:
        return
    files = previous_run_files(output_dir)
    if files:
        raise OutputDirInUseError(
            f"The output directory {output_dir} already holds an earlier run ({_describe(files)}). "
            "Continue it with --resume_from_checkpoint (the latest complete checkpoint, or give a "
            "checkpoint's path), start afresh with --overwrite_output_dir (deletes its "
            "checkpoint folders; the saved model is replaced at the end), or choose another "
            "--output_dir."
        )


def prepare_output_dir(
    args: Any, resume_from_checkpoint: str | bool | None, *, is_main_process: bool
) -> str | None:
    """What `ABKDTrainer.train()` does with `output_dir` before Trainer's own `train()`.

    Resolves `resume_from_checkpoint` (True: the latest *complete* checkpoint). When starting
    afresh in a folder that holds an earlier run, `args.overwrite_output_dir` deletes its
    checkpoint folders (main process), otherwise a warning (once per folder) says what will be
    mixed or overwritten.

    Returns:
        The checkpoint folder to hand to `Trainer.train`, or None.
    """
    checkpoint = resolve_resume_from_checkpoint(resume_from_checkpoint, args.output_dir)
    if checkpoint is not None or not is_main_process:
        return checkpoint
    output_dir = Path(args.output_dir)
    if getattr(args, "overwrite_output_dir", False):
        for stale in checkpoint_dirs(output_dir):
            shutil.rmtree(stale)
        return None
    files = previous_run_files(output_dir)
    key = output_dir.resolve()
    if files and key not in _WARNED_OUTPUT_DIRS:
        _WARNED_OUTPUT_DIRS.add(key)
        warnings.warn(
            f"output_dir {output_dir} already holds an earlier run ({_describe(files)}) and "
            "`train()` was called without `resume_from_checkpoint`: this run's checkpoints will "
            "be mixed with (and `save_total_limit` may delete) the earlier ones, and its model "
            "replaces the saved one. Pass `resume_from_checkpoint=True` to continue, set "
            "`overwrite_output_dir=True` to start afresh, or use another output_dir.",
            stacklevel=3,
        )
    return None
