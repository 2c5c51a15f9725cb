"""`abkd-train-classifier`: distil an image, text or audio classifier with ABKD.

Built like `abkd-train`: a `trl.TrlParser` over the script arguments below,
`ABKDClassifierConfig` (every `TrainingArguments` field and the distillation fields are flags) and
`trl.ModelConfig` (`--model_name_or_path`, `--dtype`, `--use_peft`, ...); `--config file.yaml`
supplies defaults that the command line overrides. The same command runs under
`accelerate launch`, `deepspeed` and `torchrun`.

Without `--model_name_or_path`, `--teacher_model_name_or_path` and `--dataset_name` it runs the
offline demo (see `abkd_trainer.classification.demo`):

    abkd-train-classifier                     # the demo, into ./abkd-classifier-demo-output
    abkd-train-classifier --max_steps 200 --output_dir /tmp/demo
    abkd-train-classifier --model_name_or_path google/mobilenet_v2_1.0_224 \\
        --teacher_model_name_or_path acme/vit-base-food101 --dataset_name ethz/food101 \\
        --dataset_test_split validation --ignore_mismatched_sizes --output_dir out
    abkd-train-classifier --model_name_or_path path/to/small-bert \\
        --teacher_model_name_or_path path/to/bert-sst2 --dataset_name data/train.csv \\
        --dataset_test_file data/test.csv --input_column sentence --output_dir out

After training it saves the student, its processor and a model card in `--output_dir`, and (with
a held-out split) writes `report.json`, `report.md` and `accuracy.png`: the top-1 accuracy of the
teacher and of the student before and after training.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
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
    from datasets import Dataset
    from trl import TrlParser

    from abkd_trainer.classification.config import ABKDClassifierConfig

PROG = "abkd-train-classifier"
# The arguments that name the user's own run; with none of them, the demo runs.
RUN_ARGUMENTS = ("model_name_or_path", "teacher_model_name_or_path", "dataset_name")


# The help of each script argument (shown by `--help`). The dataclass that declares them is
# built by `script_arguments_class` on first use, so that importing this module imports no TRL.
SCRIPT_ARGUMENT_HELP: dict[str, str] = {
    "dataset_name": (
        "Dataset to distil on: a Hub id, a local .csv/.json/.jsonl/.parquet file (loaded as the"
        " `train` split), a directory saved with `save_to_disk`, or a folder of images / audio "
        "files with one subfolder per class (imagefolder / audiofolder; `train`/`test` "
        "subfolders become splits). With no model, teacher and dataset, the offline demo runs."
    ),
    "dataset_test_file": (
        "Optional local file loaded as the held-out split (`dataset_test_split`) when "
        "`dataset_name` is a single file."
    ),
    "dataset_test_size": (
        "When the dataset has no `dataset_test_split` split: hold out this fraction (or, > 1, "
        "this number) of the training rows, stratified by class, for evaluation and the report."
    ),
    "input_column": (
        "The column with the model inputs (default: the first of image, img, pixel_values, "
        "text, sentence, audio, input_values)."
    ),
    "label_column": "The column with the class of each example (default: label, labels).",
    "max_length": (
        "Text only: truncate tokenised inputs to this many tokens (default: each tokenizer's "
        "limit)."
    ),
    "processor_name_or_path": (
        "Where to load the student's image processor / tokenizer / feature extractor from "
        "(default: --model_name_or_path)."
    ),
    "teacher_processor_name_or_path": (
        "The same for the teacher (default: --teacher_model_name_or_path). When it preprocesses"
        " like the student's, the teacher shares the student's inputs."
    ),
    "ignore_mismatched_sizes": (
        "Give a student loaded by name a new classification head for the dataset's classes when"
        " its checkpoint has a head of another size (e.g. an ImageNet backbone)."
    ),
}


def _argument(name: str, default: Any) -> Any:
    return field(default=default, metadata={"help": SCRIPT_ARGUMENT_HELP[name]})


def script_arguments_class() -> type:
    """The script-arguments dataclass of `abkd-train-classifier` (defined lazily: no TRL import
    at module import)."""
    from trl import ScriptArguments

    @dataclass
    class ClassifierScriptArguments(ScriptArguments):
        """Script arguments of `abkd-train-classifier`: TRL's dataset arguments plus the columns,
        the held-out split, the processors and the student's head."""

        dataset_name: str | None = _argument("dataset_name", None)
        dataset_test_file: str | None = _argument("dataset_test_file", None)
        dataset_test_size: float | None = _argument("dataset_test_size", None)
        input_column: str | None = _argument("input_column", None)
        label_column: str | None = _argument("label_column", None)
        max_length: int | None = _argument("max_length", None)
        processor_name_or_path: str | None = _argument("processor_name_or_path", None)
        teacher_processor_name_or_path: str | None = _argument(
            "teacher_processor_name_or_path", None
        )
        ignore_mismatched_sizes: bool = _argument("ignore_mismatched_sizes", False)

    return ClassifierScriptArguments


def make_parser(
    prog: str | None = PROG,
    extra_dataclass_types: Sequence[type] = (),
    description: str | None = None,
) -> TrlParser:
    """The `abkd-train-classifier` parser: script arguments, ABKDClassifierConfig, ModelConfig.

    Args:
        prog: the program name shown by `--help`.
        extra_dataclass_types: parsed after those three (`abkd-sweep --task classification`
            adds its own).
        description: the `--help` description (default: this command's).
    """
    from trl import ModelConfig, TrlParser

    from abkd_trainer.classification.config import ABKDClassifierConfig

    parser = TrlParser(
        (script_arguments_class(), ABKDClassifierConfig, ModelConfig, *extra_dataclass_types),
        prog=prog,
        description=description or __doc__.split("\n\n")[0],
        epilog="Every flag can also be set in a YAML file given with --config FILE.yaml (flags on "
        "the command line win). With no model, teacher and dataset, the offline demo runs.",
    )
    # TRL's default adapter task is CAUSAL_LM, which wraps a classifier in the wrong PeftModel
    # class; with no task type, PEFT keeps the model's own forward (its head is trained fully).
    parser.set_defaults_with_config(lora_task_type=None)
    return parser


def is_demo_run(argv: Sequence[str]) -> bool:
    """True when neither a student, a teacher nor a dataset is named: run the offline demo.

    Raises:
        ValueError: when only some of them are named.
    """
    requested = requested_values(argv, RUN_ARGUMENTS)
    if not requested:
        return True
    missing = [f"--{name}" for name in RUN_ARGUMENTS if name not in requested]
    if missing:
        raise ValueError(
            f"Missing {', '.join(missing)}. Name the student, the teacher and the dataset to "
            "distil your own classifier, or give none of them to run the offline demo."
        )
    return False


def parse_args(
    argv: Sequence[str] | None = None, *, parser: TrlParser | None = None
) -> tuple[Any, ABKDClassifierConfig, Any, bool]:
    """Parse `argv` (default `sys.argv[1:]`) into (script, training, model arguments, is_demo).

    Precedence, lowest first: dataclass defaults, the demo's defaults (demo mode only), the
    `--config` YAML file, the command line.
    """
    from abkd_trainer.classification.config import ABKDClassifierConfig
    from abkd_trainer.classification.demo import DEMO_DEFAULTS

    argv = list(sys.argv[1:] if argv is None else argv)
    demo = is_demo_run(argv)
    parser = parser or make_parser()
    overrides: dict[str, Any] = {}
    if demo and not any(token in ("-h", "--help") for token in argv):
        # `--help` shows the real defaults, not the demo's.
        config_fields = {f.name for f in fields(ABKDClassifierConfig)}
        overrides.update({k: v for k, v in DEMO_DEFAULTS.items() if k in config_fields})
        overrides["overwrite_output_dir"] = True  # each demo run replaces the previous one
    if init_cpu_distributed(requested_values(argv, ("deepspeed",)).get("deepspeed") is not None):
        from abkd_trainer.core.distributed import CONFIGURED_STATE_ACCELERATOR_CONFIG

        overrides["accelerator_config"] = CONFIGURED_STATE_ACCELERATOR_CONFIG
    if overrides:
        parser.set_defaults_with_config(**overrides)
    script_args, training_args, model_args = parser.parse_args_and_config(argv)
    return script_args, training_args, model_args, demo


@dataclass
class RunInputs:
    """What one run trains: the student (a model, or a name the trainer loads), the processors,
    the prepared splits and names for the report."""

    model: Any
    processing_class: Any
    teacher_processing_class: Any
    train_dataset: Dataset
    test_dataset: Dataset | None
    student_label: str
    dataset_label: str
    card_dataset: str | None


def load_demo_inputs(training_args: ABKDClassifierConfig) -> RunInputs:
    """The demo's data, its image processor (shared by teacher and student) and a fresh student
    seeded with `training_args.seed`."""
    from transformers import AutoConfig

    from abkd_trainer.classification import demo
    from abkd_trainer.classification.data import prepare_classification_splits
    from abkd_trainer.lm.demo import limit_cpu_threads_for_demo

    limit_cpu_threads_for_demo()
    splits = prepare_classification_splits(demo.load_demo_dataset(), source=demo.DEMO_DATASET_NAME)
    teacher_config = AutoConfig.from_pretrained(training_args.teacher_model_name_or_path)
    model = demo.build_demo_student(teacher_config, seed=training_args.seed)
    return RunInputs(
        model=model,
        processing_class=demo.load_demo_image_processor(),
        teacher_processing_class=None,
        train_dataset=splits.train,
        test_dataset=splits.test,
        student_label=demo.describe_student(model),
        dataset_label=demo.DEMO_DATASET_NAME,
        card_dataset=demo.DEMO_DATASET_CARD_NAME,
    )


def load_user_inputs(
    script_args: Any, training_args: ABKDClassifierConfig, model_args: Any
) -> RunInputs:
    """The named dataset (prepared), the processors, and the student's loading arguments.

    The student is loaded later by the trainer (sharded under ZeRO-3) with the
    `model_init_kwargs` this function writes into `training_args`: TRL's model flags, and the
    dataset's classes when the student's checkpoint has none or another number of them.
    """
    from transformers import AutoConfig

    from abkd_trainer.classification.data import load_processing_class, same_preprocessing
    from abkd_trainer.classification.labels import class_names

    teacher, student = training_args.teacher_model_name_or_path, model_args.model_name_or_path
    teacher_config = AutoConfig.from_pretrained(
        teacher, trust_remote_code=_trusts_remote_code(training_args.teacher_model_init_kwargs)
    )
    splits = load_user_splits(script_args, training_args, class_names(teacher_config))
    student_config = AutoConfig.from_pretrained(
        student,
        revision=model_args.model_revision,
        trust_remote_code=_trusts_remote_code(training_args.model_init_kwargs),
    )
    new_head_names, model_names = student_classes(
        student_config, teacher_config, splits.class_names or class_names(teacher_config)
    )
    set_student_init_kwargs(
        training_args,
        model_args,
        class_names=new_head_names,
        num_labels=teacher_config.num_labels,
        ignore_mismatched_sizes=script_args.ignore_mismatched_sizes,
    )
    train_dataset, test_dataset = (
        checked_split(dataset, model_names, teacher_config.num_labels, f"The {role} split")
        for role, dataset in (("training", splits.train), ("held-out", splits.test))
    )
    modality = splits.columns.modality
    processing_class = load_processing_class(
        script_args.processor_name_or_path or student, modality, who="student"
    )
    teacher_processing_class = load_processing_class(
        script_args.teacher_processor_name_or_path or teacher, modality, who="teacher"
    )
    if same_preprocessing(processing_class, teacher_processing_class):
        teacher_processing_class = None  # the teacher shares the student's inputs
    return RunInputs(
        model=student,
        processing_class=processing_class,
        teacher_processing_class=teacher_processing_class,
        train_dataset=train_dataset,
        test_dataset=test_dataset,
        student_label=student,
        dataset_label=script_args.dataset_name,
        card_dataset=script_args.dataset_name,
    )


def _trusts_remote_code(init_kwargs: dict[str, Any] | None) -> bool:
    return bool((init_kwargs or {}).get("trust_remote_code", False))


def load_user_splits(
    script_args: Any, training_args: ABKDClassifierConfig, teacher_names: Sequence[str] | None
) -> Any:
    """`--dataset_name` loaded and prepared (`ClassificationSplits`): columns found and renamed,
    string labels numbered in the teacher's order, a held-out split (`--dataset_test_size`)."""
    from abkd_trainer.classification.data import prepare_classification_splits
    from abkd_trainer.lm.data import load_dataset_from_name

    if script_args.dataset_streaming:
        raise ValueError(
            f"{PROG} needs the dataset's rows up front (class names, label checks, the held-out "
            "split): drop --dataset_streaming."
        )
    datasets = load_dataset_from_name(
        script_args.dataset_name,
        config_name=script_args.dataset_config,
        test_file=script_args.dataset_test_file,
        test_split=script_args.dataset_test_split,
    )
    return prepare_classification_splits(
        datasets,
        train_split=script_args.dataset_train_split,
        test_split=script_args.dataset_test_split,
        test_size=script_args.dataset_test_size,
        input_column=script_args.input_column,
        label_column=script_args.label_column,
        preferred_class_names=teacher_names,
        seed=training_args.seed,
        source=script_args.dataset_name,
    )


def student_classes(
    student_config: Any, teacher_config: Any, dataset_names: Sequence[str] | None
) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    """The classes to give a student loaded by name, and the class order the data must follow.

    A student whose checkpoint names as many classes as the teacher keeps its head (the trainer
    aligns the teacher to it); otherwise it gets the dataset's (else the teacher's) classes.

    Returns:
        `(new_head_names, model_names)`: the names to write into the student's config (None:
        keep its own) and the student's class names in id order (None: bare ids).
    """
    from abkd_trainer.classification.labels import class_names

    student_names = class_names(student_config)
    if student_names is not None and student_config.num_labels == teacher_config.num_labels:
        return None, student_names
    names = tuple(dataset_names) if dataset_names is not None else None
    return names, names


def checked_split(
    dataset: Dataset | None, model_names: Sequence[str] | None, num_labels: int, where: str
) -> Dataset | None:
    """A split with its class ids in the student's order (by name) and in range."""
    from abkd_trainer.classification.data import align_dataset_labels, check_label_range

    if dataset is None:
        return None
    if model_names is not None:
        dataset = align_dataset_labels(dataset, model_names, where=where)
    check_label_range(dataset, num_labels, where=where)
    return dataset


def set_student_init_kwargs(
    training_args: ABKDClassifierConfig,
    model_args: Any,
    *,
    class_names: Sequence[str] | None,
    num_labels: int,
    ignore_mismatched_sizes: bool,
) -> None:
    """Write the student's `from_pretrained` arguments into `training_args.model_init_kwargs`.

    TRL's model flags (`--model_revision`, `--dtype`, `--attn_implementation`), the head's classes
    (`num_labels`, `id2label`, `label2id`) when `class_names` is given, and
    `ignore_mismatched_sizes`; values the user set in `--model_init_kwargs` win.
    """
    kwargs: dict[str, Any] = {"revision": model_args.model_revision, "dtype": model_args.dtype}
    if model_args.attn_implementation is not None:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if class_names is not None:
        kwargs["num_labels"] = len(class_names)
        kwargs["id2label"] = dict(enumerate(class_names))
        kwargs["label2id"] = {name: index for index, name in enumerate(class_names)}
    elif ignore_mismatched_sizes:
        kwargs["num_labels"] = num_labels
    if ignore_mismatched_sizes:
        kwargs["ignore_mismatched_sizes"] = True
    kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = kwargs


def build_trainer(
    inputs: RunInputs, training_args: ABKDClassifierConfig, model_args: Any, script_args: Any
):
    """The `ABKDClassifierTrainer` of a run (collator, evaluation split, PEFT adapters)."""
    from trl import get_peft_config

    from abkd_trainer.classification.inputs import ClassifierDistillationCollator
    from abkd_trainer.classification.trainer import ABKDClassifierTrainer

    collator = ClassifierDistillationCollator(
        inputs.processing_class,
        inputs.teacher_processing_class,
        max_length=script_args.max_length,
    )
    return ABKDClassifierTrainer(
        model=inputs.model,
        args=training_args,
        data_collator=collator,
        train_dataset=inputs.train_dataset,
        eval_dataset=inputs.test_dataset if training_args.eval_strategy != "no" else None,
        processing_class=inputs.processing_class,
        teacher_processing_class=inputs.teacher_processing_class,
        peft_config=get_peft_config(model_args),
    )


def run(
    script_args: Any, training_args: ABKDClassifierConfig, model_args: Any, demo: bool
) -> dict | None:
    """Train, save the student with its processor and model card, write the report.

    Returns:
        The report (main process, with a held-out split), else None.
    """
    checkpoint = check_before_loading(training_args)
    if demo:
        inputs = load_demo_inputs(training_args)
    else:
        inputs = load_user_inputs(script_args, training_args, model_args)
    trainer = build_trainer(inputs, training_args, model_args, script_args)
    test = inputs.test_dataset
    before = trainer.evaluate(eval_dataset=test) if test is not None and checkpoint is None else {}
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    elapsed = time.perf_counter() - start
    after = trainer.evaluate(eval_dataset=test) if test is not None else {}
    trainer.save_model(training_args.output_dir, _internal_call=True)
    trainer.create_model_card(
        model_name=Path(training_args.output_dir).name, dataset=inputs.card_dataset
    )
    report = None
    if after and trainer.is_world_process_zero():
        report = write_run_report(trainer, inputs, before, after, script_args, elapsed)
    elif trainer.is_world_process_zero():
        print(f"Student, processor and model card saved in {training_args.output_dir}.")
    push_and_end(trainer)
    return report


def write_run_report(
    trainer: Any,
    inputs: RunInputs,
    before: dict,
    after: dict,
    script_args: Any,
    wall_time_s: float,
) -> dict:
    """Write report.json / report.md / accuracy.png into the output directory; print the table."""
    from abkd_trainer.classification.report import (
        format_accuracy_table,
        make_classifier_report,
        write_report,
    )
    from abkd_trainer.core.reports import environment_info

    args = trainer.args
    report = make_classifier_report(
        before=before,
        after=after,
        training_args=args,
        teacher=trainer.teacher_name,
        student=inputs.student_label,
        dataset=inputs.dataset_label,
        test_split=script_args.dataset_test_split,
        num_test_examples=len(inputs.test_dataset),
        log_history=trainer.state.log_history,
        wall_time_s=wall_time_s,
        environment=environment_info(args.device, num_processes=args.world_size),
    )
    paths = write_report(report, trainer.state.log_history, args.output_dir)
    print("\n" + format_accuracy_table(report))
    print(
        f"\nStudent, processor, model card and report saved in {args.output_dir}: "
        + ", ".join(path.name for path in paths)
    )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point of `abkd-train-classifier`."""
    script_args, training_args, model_args, demo = parse_args(argv)
    cpu_deepspeed = training_args.accelerator_config.use_configured_state
    if demo:
        from abkd_trainer.classification.demo import require_demo_assets

        require_demo_assets()
        print(
            f"{PROG}: no model, teacher or dataset given, running the offline demo "
            f"(output in {os.path.abspath(training_args.output_dir)})."
        )
    return run_command(
        PROG,
        functools.partial(run, script_args, training_args, model_args, demo),
        cpu_deepspeed=cpu_deepspeed,
    )


if __name__ == "__main__":
    sys.exit(main())
