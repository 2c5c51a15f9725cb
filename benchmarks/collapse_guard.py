#!/usr/bin/env python
"""Entropies, agreement and the collapse guard on the shipped demo, for several objectives.

Distils the demo teacher (``abkd_trainer/demo_assets/teacher``) into a freshly initialised demo
student with the demo's optimiser settings (batch 32, lr 3e-3, cosine, 30 warm-up steps, fp32 on
CPU), once per setting and training seed, and records every train log's ``student_entropy``,
``teacher_entropy`` and ``teacher_agreement``, and whether and at which step
:class:`~abkd_trainer.core.collapse_guard.CollapseGuardCallback` fired. No ROUGE-L here (see
``benchmarks/compare_divergences.py`` for that): this is about the guard's signal, so that its
thresholds rest on measurements.

Settings (``--settings``): ``ab-0.2-0.7`` (the paper's without the warm-up, collapses from random
init), ``rkl``, ``fkl``, ``ab-0.8-0.3`` (the demo's before the warm-up, also without it) and
``ab-warm`` (alpha 1 -> 0.2, beta 0 -> 0.7 linearly over
training with ``alpha_end`` / ``beta_end``).

Examples::

    python benchmarks/collapse_guard.py                        # all settings, seed 0, 300 steps
    python benchmarks/collapse_guard.py --settings fkl ab-0.2-0.7 --seeds 0 1 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

SETTINGS: dict[str, dict] = {
    # Without the default warm-up from forward KL, which prevents the collapse.
    "ab-0.2-0.7": {"divergence": "ab", "alpha": 0.2, "beta": 0.7, "ab_warmup_ratio": 0.0},
    "rkl": {"divergence": "rkl"},
    "fkl": {"divergence": "fkl"},
    "ab-0.8-0.3": {"divergence": "ab", "alpha": 0.8, "beta": 0.3, "ab_warmup_ratio": 0.0},
    "ab-warm": {"divergence": "ab", "alpha": 1.0, "beta": 0.0, "alpha_end": 0.2, "beta_end": 0.7},
}
# The demo's optimiser settings that matter for the dynamics, as they were when the README's
# figures were measured (abkd_trainer.lm.demo.DEMO_DEFAULTS has since moved to 64 sequences a step).
MEASURED_DEMO_SETTINGS: dict[str, object] = {
    "per_device_train_batch_size": 32,
    "learning_rate": 3e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 30,
    "weight_decay": 0.01,
    "max_length": 64,
    "bf16": False,
    "gradient_checkpointing": False,
    "dataloader_num_workers": 0,
}


def run(setting: str, seed: int, max_steps: int, logging_steps: int) -> dict:
    """Train one setting and seed; return its train logs and the guard's verdict."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from abkd_trainer import ABKDConfig, ABKDTrainer
    from abkd_trainer.core.collapse_guard import CollapseGuardCallback
    from abkd_trainer.lm.demo import (
        DEMO_TEACHER_DIR,
        build_demo_student,
        load_demo_dataset,
    )

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(DEMO_TEACHER_DIR)
    teacher = AutoModelForCausalLM.from_pretrained(DEMO_TEACHER_DIR)
    student = build_demo_student(teacher.config, seed=seed)
    with tempfile.TemporaryDirectory() as output_dir:
        args = ABKDConfig(
            output_dir=output_dir,
            max_steps=max_steps,
            logging_steps=logging_steps,
            seed=seed,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            **MEASURED_DEMO_SETTINGS,
            **SETTINGS[setting],
        )
        trainer = ABKDTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=load_demo_dataset()["train"],
            processing_class=tokenizer,
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    guard = next(
        cb for cb in trainer.callback_handler.callbacks if isinstance(cb, CollapseGuardCallback)
    )
    keys = ("step", "student_entropy", "teacher_entropy", "teacher_agreement", "ce_loss")
    logs = [
        {key: entry[key] for key in keys}
        for entry in trainer.state.log_history
        if "student_entropy" in entry
    ]
    return {
        "setting": setting,
        "seed": seed,
        "fired_at_step": guard.fired_at_step,
        "closest_ratio": closest_ratio(logs),
        "train_seconds": round(seconds, 1),
        "logs": logs,
    }


def closest_ratio(logs: list[dict]) -> float | None:
    """How near the guard came to firing: the smallest ``student_entropy / entropy_bound`` over
    the train logs after the first (below 1 counts as collapsing); None if agreement was never
    below ``max_agreement``."""
    from abkd_trainer.core.collapse_guard import collapse_diagnosis

    diagnoses = [collapse_diagnosis(log) for log in logs[1:]]
    ratios = [d.student_entropy / d.entropy_bound for d in diagnoses if d is not None]
    return round(min(ratios), 2) if ratios else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--max_steps", type=int, default=300)
    parser.add_argument("--logging_steps", type=int, default=10)
    parser.add_argument("--json", help="also write the results to this file")
    options = parser.parse_args(argv)

    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)  # the demo's models are too small for threads (see demo.py)
    results = [
        run(setting, seed, options.max_steps, options.logging_steps)
        for setting in options.settings
        for seed in options.seeds
    ]
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )
    print(f"Demo, {options.max_steps} steps, logging every {options.logging_steps}; {machine}")
    header = (
        "setting      seed  guard fired   min H/bound   last log: H_student  H_teacher  "
        "agreement  CE"
    )
    print(header)
    for result in results:
        last = result["logs"][-1]
        fired = result["fired_at_step"]
        print(
            f"{result['setting']:<12} {result['seed']:>4}  "
            f"{'step ' + str(fired) if fired is not None else 'no':<12}"
            f"{str(result['closest_ratio']):>13}"
            f"{last['student_entropy']:>22.3f}{last['teacher_entropy']:>11.3f}"
            f"{last['teacher_agreement']:>11.3f}{last['ce_loss']:>6.2f}"
        )
    if options.json:
        with open(options.json, "w", encoding="utf-8") as handle:
            json.dump({"machine": machine, "options": vars(options), "runs": results}, handle)


if __name__ == "__main__":
    main()
