"""`abkd-train`: distil a causal LM with ABKD from the command line or a YAML file.

Built like TRL's `trl sft` script: a `trl.TrlParser` over script arguments,
`ABKDConfig`, `trl.ModelConfig` and
`trl.DatasetMixtureConfig`, so every `ABKDConfig` / `SFTConfig` /
`TrainingArguments` field is a flag, and `--config file.yaml` supplies defaults that the
command line overrides. The same command runs under `accelerate launch`, `deepspeed` and
`torchrun`.

Without `--model_name_or_path` and `--dataset_name` it runs the offline demo (see
`abkd_trainer.lm.demo`):

    abkd-train                                  # the demo, into ./abkd-demo-output
    abkd-train --output_dir /tmp/demo --max_steps 300
    abkd-train --model_name_or_path Qwen/Qwen2.5-0.5B \\
        --teacher_model_name_or_path Qwen/Qwen2.5-7B-Instruct \\
        --dataset_name data/train.jsonl --alpha 0.2 --beta 0.7 --output_dir out
    abkd-train --config examples/gpt2_dolly.yaml
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from abkd_trainer.cli.common import (
    check_before_loading,
    init_cpu_distributed,
    push_and_end,
    requested_values,
    run_command,
)

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from trl import TrlParser

    from abkd_trainer.lm.config import ABKDConfig


def script_arguments_class() -> type:
    """The script-arguments dataclass of `abkd-train` (and `abkd-cache-teacher`).

    Defined lazily so that `import abkd_trainer.cli.train` does not import TRL.
    """
    from trl import ScriptArguments

    @dataclass
    class ABKDScriptArguments(ScriptArguments):
        """Script arguments of `abkd-train`: TRL's dataset arguments plus ROUGE-L evaluation.

        `dataset_name` accepts a Hub dataset id, a local `.json`/`.jsonl`/`.parquet`/
        `.csv` file (its rows become the `train` split), or a directory written by
        `Dataset.save_to_disk` / `DatasetDict.save_to_disk`.
        """

        dataset_name: str | None = field(
            default=None,
            metadata={
                "help": "Dataset to distil on: a Hub id, a local .json/.jsonl/.parquet/.csv file "
                "(loaded as the `train` split), or a directory saved with `save_to_disk`. With no "
                "model and no dataset, abkd-train runs the offline demo."
            },
        )
        dataset_test_file: str | None = field(
            default=None,
            metadata={
                "help": "Optional local file loaded as the evaluation split "
                "(`dataset_test_split`) when `dataset_name` is a single file."
            },
        )
        rouge_l_eval: bool = field(
            default=False,
            metadata={
                "help": "Score sampled responses on the test split with ROUGE-L (T=1, top-p 1, "
                "mean over seeds): logged as `eval_rouge_l` at every evaluation, and for the "
                "teacher and the student before and after training in report.json / report.md."
            },
        )
        rouge_l_num_prompts: int | None = field(
            default=200,
            metadata={"help": "Score the first N test prompts (None: all of them)."},
        )
        rouge_l_seeds: list[int] = field(
            default_factory=lambda: [0, 1, 2],
            metadata={"help": "Sampling seeds; ROUGE-L is averaged over them (the paper uses 5)."},
        )
        rouge_l_max_new_tokens: int = field(
            default=256,
            metadata={"help": "Maximum length of a sampled response, in tokens."},
        )
        rouge_l_batch_size: int = field(
            default=32,
            metadata={"help": "Prompts per `generate` call and process."},
        )

    return ABKDScriptArguments


def make_parser(
    prog: str | None = "abkd-train",
    extra_dataclass_types: Sequence[type] = (),
    description: str | None = None,
) -> TrlParser:
    """The `abkd-train` argument parser (script arguments, ABKDConfig, ModelConfig, mixtures).

    `extra_dataclass_types` are parsed after those four (`abkd-sweep` adds its own).
    """
    from trl import DatasetMixtureConfig, ModelConfig, TrlParser

    from abkd_trainer.lm.config import ABKDConfig

    dataclass_types = (script_arguments_class(), ABKDConfig, ModelConfig, DatasetMixtureConfig)
    parser = TrlParser(
        (*dataclass_types, *extra_dataclass_types),
        prog=prog,
        description=description or __doc__.split("\n\n")[0],
        epilog="Every flag can also be set in a YAML file given with --config FILE.yaml "
        "(flags on the command line win). With no model and no dataset, the offline demo runs.",
    )
    # As in the HF example scripts, a bare `--resume_from_checkpoint` means "from the latest
    # checkpoint in output_dir" (TrainingArguments types it as a path, which needs a value).
    resume = parser._option_string_actions["--resume_from_checkpoint"]
    resume.nargs, resume.const = "?", "true"
    resume.help = (
        "Continue the run in output_dir: a checkpoint folder, or no value / `true` for the latest "
        "complete checkpoint (incomplete ones, without trainer_state.json, are skipped)."
    )
    return parser


def is_demo_run(argv: Sequence[str]) -> bool:
    """True when neither a student, a teacher nor a dataset is named: run the offline demo.

    A `--teacher_cache` stands in for the teacher (alone, it runs the demo from that cache).

    Raises:
        ValueError: when only some of them are named.
    """
    requested = requested_values(
        argv, ("model_name_or_path", "teacher_model_name_or_path", "dataset_name", "datasets")
    )
    if not requested:
        return True
    has_teacher = "teacher_model_name_or_path" in requested or bool(
        requested_values(argv, ("teacher_cache",))
    )
    has_dataset = "dataset_name" in requested or "datasets" in requested
    missing = [
        flag
        for flag, present in (
            ("--model_name_or_path", "model_name_or_path" in requested),
            ("--teacher_model_name_or_path (or --teacher_cache)", has_teacher),
            ("--dataset_name (or `datasets:` in the YAML config)", has_dataset),
        )
        if not present
    ]
    if missing:
        raise ValueError(
            f"Missing {', '.join(missing)}. Name the student, the teacher and the dataset to "
            "distil your own models, or give none of them to run the offline demo."
        )
    return False


def parse_args(
    argv: Sequence[str] | None = None,
    *,
    parser: TrlParser | None = None,
    defaults: dict[str, Any] | None = None,
    demo_defaults: dict[str, Any] | None = None,
) -> tuple[Any, ...]:
    """Parse `argv` (default `sys.argv[1:]`) into (script, training, model, mixture, is_demo).

    Precedence, lowest first: dataclass defaults, `defaults`, demo defaults (demo mode only;
    `demo_defaults` replaces `DEMO_DEFAULTS`), the `--config` YAML
    file, the command line. A `parser` from `make_parser(extra_dataclass_types=...)` adds
    its extra dataclasses to the tuple, before `is_demo`.
    """
    from abkd_trainer.lm.demo import DEMO_DEFAULTS

    argv = list(sys.argv[1:] if argv is None else argv)
    demo = is_demo_run(argv)
    parser = parser or make_parser()
    # `--help` shows the real defaults, not the demo's.
    wants_help = any(token in ("-h", "--help") for token in argv)
    overrides: dict[str, Any] = dict(defaults or {}) if not wants_help else {}
    if demo and not wants_help:
        overrides.update(DEMO_DEFAULTS if demo_defaults is None else demo_defaults)
    if demo and requested_values(argv, ("teacher_cache",)):
        overrides.pop("teacher_model_name_or_path", None)  # the cache replaces the teacher
    deepspeed = requested_values(argv, ("deepspeed",)).get("deepspeed")
    if init_cpu_distributed(deepspeed is not None):
        from abkd_trainer.core.distributed import CONFIGURED_STATE_ACCELERATOR_CONFIG

        overrides["accelerator_config"] = CONFIGURED_STATE_ACCELERATOR_CONFIG
    if overrides:
        parser.set_defaults_with_config(**overrides)
    try:
        parsed = parser.parse_args_and_config(argv)
    except ValueError as error:
        raise _explain_precision_error(error) from error
    return (*parsed, demo)


CPU_PRECISION_HINT = (
    "To run on a CPU, add `--use_cpu true --bf16 false` (fp32 training; SFTConfig and the "
    "example recipes ask for bf16), and load bfloat16 checkpoints in fp32 with `--dtype float32` "
    '(student) and `--teacher_model_init_kwargs \'{"dtype": "float32"}\'` (teacher). See '
    '"On a CPU" in the README.'
)


def _explain_precision_error(error: ValueError) -> ValueError:
    """TrainingArguments' "doesn't support bf16/gpu", with what to change on a CPU machine."""
    from transformers.utils import is_torch_bf16_gpu_available

    if "bf16" not in str(error) or is_torch_bf16_gpu_available():
        return error
    return ValueError(f"{error}\nabkd-train: no GPU with bf16 support here. {CPU_PRECISION_HINT}")


def set_model_init_kwargs(model_args: Any, training_args: Any) -> None:
    """Turn TRL's model flags (`--dtype`, `--attn_implementation`, `--model_revision`) into
    `training_args.model_init_kwargs`, with which SFTTrainer loads a student given by name;
    kwargs the user set there themselves win."""
    model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs


def load_datasets(script_args: Any, mixture_args: Any) -> DatasetDict:
    """The splits named by `--dataset_name` (with `--dataset_test_file`) or the mixture
    `--datasets`, as `abkd-train` loads them (also used by `abkd-cache-teacher` and
    `abkd-sweep`)."""
    from trl import get_dataset

    from abkd_trainer.lm.data import load_dataset_from_name

    if mixture_args.datasets:
        return get_dataset(mixture_args)
    return load_dataset_from_name(
        script_args.dataset_name,
        config_name=script_args.dataset_config,
        streaming=script_args.dataset_streaming,
        test_file=script_args.dataset_test_file,
        test_split=script_args.dataset_test_split,
    )


def select_split(datasets: DatasetDict, name: str, role: str) -> Dataset:
    """The split `name` of `datasets`, used for `role` (`"training"` or `"evaluation"`).

    Raises:
        ValueError: naming the splits there are and the flag that chooses one.
    """
    if name not in datasets:
        raise ValueError(
            f"The dataset has no {name!r} split for {role} (splits: {sorted(datasets)}). Choose "
            f"one with --dataset_{'train' if role == 'training' else 'test'}_split."
        )
    return datasets[name]


def configured_divergences(training_args: ABKDConfig) -> dict[str, Any]:
    """The training divergence (with its parameters and temperature) and forward KL, by name.

    For report-time measurement: schedules (`alpha_end` / `beta_end`) are ignored and the
    start values used, so that before/after numbers measure one fixed divergence.
    """
    from abkd_trainer.divergences import divergence_spec, get_divergence

    spec = divergence_spec(training_args.divergence)
    divergences = {
        spec.name: functools.partial(
            spec.function,
            **spec.parameters_from(training_args),
            temperature=training_args.temperature,
        )
    }
    divergences.setdefault("fkl", get_divergence("fkl"))
    return divergences


@dataclass
class RunInputs:
    """What a run of `abkd-train` trains: the student (a model, or a name the trainer loads),
    its tokenizer, the splits, and labels for the report."""

    model: Any
    tokenizer: Any
    train_dataset: Dataset
    test_dataset: Dataset | None
    student_label: str
    dataset_label: str


def load_run_inputs(
    script_args: Any, training_args: ABKDConfig, model_args: Any, mixture_args: Any, demo: bool
) -> RunInputs:
    """The student, tokenizer and datasets named by parsed `abkd-train` arguments, checked.

    In demo mode the student is freshly initialised from `training_args.seed`; otherwise it is
    `model_args.model_name_or_path`, loaded later by the trainer (sharded under ZeRO-3) with
    the `model_init_kwargs` this function writes into `training_args`.
    """
    from transformers import AutoConfig, AutoTokenizer

    from abkd_trainer.lm.data import check_sft_columns

    if demo:
        from abkd_trainer.lm.demo import (
            DEMO_DATASET_NAME,
            DEMO_TEACHER_DIR,
            build_demo_student,
            limit_cpu_threads_for_demo,
            load_demo_dataset,
        )

        limit_cpu_threads_for_demo()

        datasets = load_demo_dataset()
        dataset_label = DEMO_DATASET_NAME
        # With a teacher cache, only the teacher's tokenizer and config are read (for the student).
        teacher_path = training_args.teacher_model_name_or_path or str(DEMO_TEACHER_DIR)
        tokenizer = AutoTokenizer.from_pretrained(teacher_path)
        model = build_demo_student(
            AutoConfig.from_pretrained(teacher_path), seed=training_args.seed
        )
        student_label = (
            "random init ("
            + ", ".join(
                f"{key}={getattr(model.config, key)}"
                for key in ("hidden_size", "num_hidden_layers")
            )
            + f", {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params)"
        )
    else:
        datasets = load_datasets(script_args, mixture_args)
        dataset_label = script_args.dataset_name or "dataset mixture"
        set_model_init_kwargs(model_args, training_args)
        model = model_args.model_name_or_path  # loaded by the trainer, sharded under ZeRO-3
        student_label = model
        tokenizer = AutoTokenizer.from_pretrained(
            model_args.model_name_or_path,
            revision=model_args.model_revision,
            trust_remote_code=training_args.trust_remote_code,
        )

    train_dataset = select_split(datasets, script_args.dataset_train_split, "training")
    needs_test = training_args.eval_strategy != "no" or script_args.rouge_l_eval
    test_dataset = (
        select_split(datasets, script_args.dataset_test_split, "evaluation") if needs_test else None
    )
    # Name the file in errors about its columns (the trainer checks again, without the name).
    sources = {script_args.dataset_test_split: script_args.dataset_test_file}
    for split, dataset in (
        (script_args.dataset_train_split, train_dataset),
        (script_args.dataset_test_split, test_dataset),
    ):
        check_sft_columns(
            dataset,
            name=f"The {split!r} split",
            source=sources.get(split) or dataset_label,
            dataset_text_field=training_args.dataset_text_field,
        )

    return RunInputs(model, tokenizer, train_dataset, test_dataset, student_label, dataset_label)


def run(
    script_args: Any, training_args: ABKDConfig, model_args: Any, mixture_args: Any, demo: bool
) -> dict | None:
    """Train, save the student with its tokenizer and model card, write the report.

    Returns:
        The report (main process, ROUGE-L evaluation on), else None.
    """
    from trl import get_peft_config

    from abkd_trainer.core.model_card import hub_id
    from abkd_trainer.lm.trainer import ABKDTrainer

    checkpoint = check_before_loading(training_args)
    inputs = load_run_inputs(script_args, training_args, model_args, mixture_args, demo)
    trainer = ABKDTrainer(
        model=inputs.model,
        args=training_args,
        train_dataset=inputs.train_dataset,
        eval_dataset=inputs.test_dataset if training_args.eval_strategy != "no" else None,
        processing_class=inputs.tokenizer,
        peft_config=get_peft_config(model_args),
    )
    rouge_callback = None
    if script_args.rouge_l_eval:
        rouge_callback = _rouge_l_callback(trainer, script_args, inputs.test_dataset, demo)
        trainer.add_callback(rouge_callback)

    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    # Student, tokenizer and model card, locally: the upload (if any) comes after the report.
    trainer.save_model(training_args.output_dir, _internal_call=True)
    hub_dataset = None if demo else hub_id(script_args.dataset_name)
    trainer.create_model_card(
        model_name=Path(training_args.output_dir).name, dataset_name=hub_dataset
    )
    elapsed = time.perf_counter() - start

    report = None
    if rouge_callback is not None and trainer.is_world_process_zero():
        report = _write_run_report(trainer, rouge_callback, script_args, inputs, elapsed)
    elif trainer.is_world_process_zero():
        print(f"Student, tokenizer and model card saved in {training_args.output_dir}.")

    push_and_end(trainer, dataset_name=hub_dataset)
    return report


def _rouge_l_callback(trainer: Any, script_args: Any, test_dataset: Dataset, demo: bool) -> Any:
    """The ROUGE-L evaluation of `--rouge_l_eval`, on the first test prompts."""
    from abkd_trainer.lm.evaluation import RougeLCallback, prompts_and_references

    training_args = trainer.args
    rows = test_dataset
    if script_args.rouge_l_num_prompts is not None:
        rows = rows.select(range(min(script_args.rouge_l_num_prompts, len(rows))))
    prompts, references = prompts_and_references(rows)
    live_teacher = training_args.teacher_cache is None
    return RougeLCallback(
        trainer,
        prompts,
        references,
        seeds=script_args.rouge_l_seeds,
        max_new_tokens=script_args.rouge_l_max_new_tokens,
        batch_size=script_args.rouge_l_batch_size,
        evaluate_at_train_boundaries=True,
        # From a teacher cache there is no teacher to sample from or compare logits with.
        evaluate_teacher=live_teacher,
        divergences=configured_divergences(training_args) if live_teacher else None,
        dataset_name=(script_args.dataset_test_file or script_args.dataset_name)
        if not demo
        else None,
        dataset_split=script_args.dataset_test_split,
    )


def _write_run_report(
    trainer: Any, rouge_callback: Any, script_args: Any, inputs: RunInputs, elapsed: float
) -> dict:
    """Write report.json / report.md and the curves into `output_dir`, print the comparison table,
    and return the report."""
    from abkd_trainer.tools.report import format_comparison_table, make_report, write_report

    training_args = trainer.args
    report = make_report(
        rouge_results=rouge_callback.results,
        divergences=rouge_callback.divergence_results,
        training_args=training_args,
        teacher=training_args.teacher_model_name_or_path
        or f"teacher cache {training_args.teacher_cache} ({trainer.teacher_name})",
        student=inputs.student_label,
        dataset=inputs.dataset_label,
        test_split=script_args.dataset_test_split,
        max_new_tokens=script_args.rouge_l_max_new_tokens,
        log_history=trainer.state.log_history,
        wall_time_s=elapsed,
    )
    paths = write_report(
        report,
        trainer.state.log_history,
        training_args.output_dir,
        rouge_history=rouge_callback.history,
    )
    print("\n" + format_comparison_table(report))
    print(
        f"\nStudent, tokenizer, model card and report saved in {training_args.output_dir}: "
        + ", ".join(path.name for path in paths)
    )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of `abkd-train` and `python -m abkd_trainer`."""
    script_args, training_args, model_args, mixture_args, demo = parse_args(argv)
    cpu_deepspeed = training_args.accelerator_config.use_configured_state
    if demo:
        from abkd_trainer.lm.demo import require_demo_assets

        require_demo_assets()
        print(
            "abkd-train: no model or dataset given, running the offline demo "
            f"(output in {os.path.abspath(training_args.output_dir)})."
        )
    return run_command(
        "abkd-train",
        functools.partial(run, script_args, training_args, model_args, mixture_args, demo),
        cpu_deepspeed=cpu_deepspeed,
    )


if __name__ == "__main__":
    sys.exit(main())
