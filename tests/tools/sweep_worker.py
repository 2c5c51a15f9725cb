"""One `abkd-sweep` worker for the preemption tests: the command itself, plus a hook to stall.

    python tests/tools/sweep_worker.py <abkd-sweep flags>

With `ABKD_SWEEP_STALL_MARKER=<path>` set, the worker stalls once its first trial has saved a
complete checkpoint: it writes `{"pid", "trial", "step", "run_dir"}` to that path and sleeps, as a
worker does in the middle of a long trial, until the test kills it with SIGKILL. Its heartbeats go
on while it sleeps (Optuna's thread on a database, the sweep's thread on a journal), so only the
kill makes the trial look dead. The hook lives here only; the package has none.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from abkd_trainer.tools.sweep import main


class StallAfterFirstCheckpoint(TrainerCallback):
    """After the first checkpoint save (`on_save` follows the complete checkpoint), report and
    sleep until killed."""

    def __init__(self, marker: str) -> None:
        self.marker = Path(marker)

    def on_save(self, args, state, control, **kwargs):
        run_dir = Path(args.output_dir)
        checkpoints = sorted(
            str(p.relative_to(run_dir)) for p in run_dir.glob("run-*/checkpoint-*")
        )
        report = {"pid": os.getpid(), "step": state.global_step, "checkpoints": checkpoints}
        self.marker.write_text(json.dumps(report))
        time.sleep(600)


if __name__ == "__main__":
    marker = os.environ.get("ABKD_SWEEP_STALL_MARKER")
    callbacks = [StallAfterFirstCheckpoint(marker)] if marker else []
    sys.exit(main(sys.argv[1:], callbacks=callbacks))
