"""ABKD for classifiers: a `transformers.Trainer` that distils a frozen teacher into a student.

Used like `Trainer`:

```python
from abkd_trainer import ABKDClassifierConfig, ABKDClassifierTrainer

trainer = ABKDClassifierTrainer(
    model=student,                      # e.g. a MobileNetV2ForImageClassification, or a name
    teacher_model="acme/vit-cifar100",  # a model or a name/path
    args=ABKDClassifierConfig("out", divergence="ab", alpha=0.8, beta=0.3),
    train_dataset=train, eval_dataset=test, processing_class=image_processor,
)
trainer.train()
```

The loss is described in `ABKDClassifierConfig`; the label spaces are checked and aligned in
`abkd_trainer.classification.labels`; teacher inputs and the collator are in
`abkd_trainer.classification.inputs`.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import EvalPrediction, TrainOutput

from abkd_trainer.classification.card import add_classifier_card_sections, distillation_settings
from abkd_trainer.classification.config import ABKDClassifierConfig
from abkd_trainer.classification.inputs import (
    ClassifierDistillationCollator,
    split_model_inputs,
    teacher_input_columns,
)
from abkd_trainer.classification.labels import LabelAlignment, align_label_spaces
from abkd_trainer.classification.models import (
    classification_task,
    forward_parameters,
    load_classifier,
    model_name,
    restore_renamed_checkpoint_weights,
    wrap_with_peft,
)
from abkd_trainer.core.checkpoints import prepare_output_dir
from abkd_trainer.core.collapse_guard import CollapseGuardCallback
from abkd_trainer.core.distributed import prepare_teacher
from abkd_trainer.core.hub import check_hub_access
from abkd_trainer.core.metric_sums import MetricSums
from abkd_trainer.core.model_card import hub_id_or_name
from abkd_trainer.core.numerics import NonFiniteError, check_finite_step, non_finite_parameters
from abkd_trainer.core.objective import (
    IGNORE_INDEX,
    METRIC_SUMS,
    DistillationObjective,
    gradient_averaging_size,
    normalise_summed_loss,
)

if TYPE_CHECKING:
    from datasets import Dataset
    from peft import PeftConfig

__all__ = ["ABKDClassifierTrainer", "CLASSIFIER_METRIC_SUMS"]

# Running sums behind the logged metrics: the objective's (the last one is the example count),
# then the teacher's own top-1 accuracy. All but the count are logged as means over the counted
# examples of the logging period.
CLASSIFIER_METRIC_SUMS = (*METRIC_SUMS, "teacher_accuracy")
_COUNT = "num_supervised"
# Logged name of a metric sum, where it differs (the objective's name is the LM trainer's).
_LOGGED_NAMES = {"mean_token_accuracy": "accuracy"}


class ABKDClassifierTrainer(Trainer):
    """Distil a frozen teacher classifier into a student with a registry divergence (ABKD).

    Args:
        model: the student: any model whose output has `.logits` `(batch, num_labels)` (an
            `AutoModelForImageClassification`, `...SequenceClassification`,
            `...AudioClassification`, a PEFT model), or a name/path loaded with
            `args.model_init_kwargs`. None with `model_init`.
        teacher_model: the teacher, a model or a name/path loaded with
            `args.teacher_model_init_kwargs` (after the training arguments exist, so that under
            ZeRO-3 it is loaded sharded); defaults to `args.teacher_model_name_or_path`. It may be
            another architecture with its own preprocessing (`teacher_processing_class`, or
            batches with `teacher_<name>` inputs, see `abkd_trainer.classification.inputs`).
        args: an `ABKDClassifierConfig` (a plain `TrainingArguments` is converted).
        data_collator: as in `Trainer`; by default a `ClassifierDistillationCollator` when a
            `teacher_processing_class` is given, else Trainer's default.
        processing_class: the student's image processor / tokenizer / feature extractor (saved
            with the student).
        teacher_processing_class: the teacher's, when it needs other preprocessing: the default
            collator then runs both on the raw `image` / `text` / `audio` column.
        peft_config: adapters for the student (e.g. LoRA); its head modules (the children
            beside the backbone, e.g. `classifier`) are added to `modules_to_save`.
        train_dataset: as in `Trainer`.
        eval_dataset: as in `Trainer`.
        model_init: as in `Trainer`; each student it builds is prepared like `model` (PEFT,
            dropout, the teacher's class names).
        compute_metrics: as in `Trainer`; a metric it returns wins over the logged one of the
            same name (e.g. `accuracy`).
        callbacks: as in `Trainer`.
        optimizers: as in `Trainer`.
        preprocess_logits_for_metrics: as in `Trainer`.

    The prepared teacher is `self.teacher_model`: frozen, in eval mode, run under
    `torch.no_grad()`, never in the optimizer or a checkpoint; `self.teacher_name` names it and
    `self.label_alignment` says how its classes map onto the student's. Logged per period, as
    means over the counted examples of every accumulation step and process: `kd_loss`,
    `ce_loss`, `teacher_agreement` (top-1), `student_entropy`, `teacher_entropy` (nats,
    temperature 1), `accuracy` and `teacher_accuracy` (top-1 against the labels), and for
    `divergence="ab"` the current `alpha` and `beta`; with the prefix `eval_` at evaluation.
    """

    _tag_names = ["abkd", "knowledge-distillation"]
    # compute_loss divides by the examples of the whole accumulated batch (get_batch_samples).
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: str | nn.Module | None = None,
        teacher_model: str | nn.Module | None = None,
        args: ABKDClassifierConfig | TrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset: Dataset | Any | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | Any | None = None,
        processing_class: Any = None,
        teacher_processing_class: Any = None,
        model_init: Callable[..., nn.Module] | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[
            torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None
        ] = (None, None),
        preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
        | None = None,
        peft_config: PeftConfig | None = None,
    ) -> None:
        args = as_classifier_config(args, model)
        teacher_model = checked_teacher_argument(teacher_model, args)
        if args.push_to_hub and args.process_index == 0:
            # Before Trainer creates the Hub repository, and long before the upload at the end.
            check_hub_access(args.hub_token)
        self.peft_config = peft_config
        if model is not None:
            model = self._prepare_student(student_from_argument(model, args), args)
        self.teacher_processing_class = teacher_processing_class
        if data_collator is None and teacher_processing_class is not None:
            data_collator = ClassifierDistillationCollator(
                processing_class, teacher_processing_class
            )
        self.label_alignment: LabelAlignment | None = None
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            model_init=model_init,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        self._set_up_teacher(teacher_model)
        self._set_up_loss()
        # Warns once if the logged entropies show a collapse (a user-configured one is kept).
        if not any(isinstance(cb, CollapseGuardCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(CollapseGuardCallback())

    # ------------------------------------------------------------------ set-up

    def _prepare_student(self, model: nn.Module, args: ABKDClassifierConfig) -> nn.Module:
        """The student as trained: with PEFT adapters when asked, dropout off when asked, and
        aligned with the teacher's classes once the teacher exists (also for `model_init`)."""
        from accelerate.utils import is_peft_model

        if self.peft_config is not None:
            if is_peft_model(model):
                raise ValueError(
                    "`peft_config` adds adapters to the student, but `model` is already a PEFT "
                    "model. Pass the base model with `peft_config`, or the PEFT model alone."
                )
            model = wrap_with_peft(model, self.peft_config)
        if args.disable_dropout:
            for module in model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
        teacher = getattr(self, "teacher_model", None)
        if teacher is not None:
            self.label_alignment = self._align_labels(model, self.accelerator.unwrap_model(teacher))
        return model

    def call_model_init(self, trial: Any = None) -> nn.Module:
        """Trainer's `model_init` call, then the student's preparation (`_prepare_student`).

        Args:
            trial: the hyper-parameter search's trial, passed to `model_init`.
        """
        return self._prepare_student(super().call_model_init(trial), self.args)

    def _set_up_teacher(self, teacher_model: str | nn.Module) -> None:
        """Load (by name), check against the student, freeze and place the teacher.

        Sets `teacher_name`, `label_alignment`, `teacher_model` and the teacher's input dtype.
        """
        teacher_source = teacher_model if isinstance(teacher_model, str) else None
        if teacher_source is not None:
            teacher_model = load_classifier(
                teacher_source, self.args.teacher_model_init_kwargs, who="teacher"
            )
        self.teacher_name = model_name(teacher_model, teacher_source)
        self.label_alignment = self._align_labels(self.model, teacher_model)
        for who, module in (("teacher", teacher_model), ("student", self.model)):
            culprits = non_finite_parameters(module)
            if culprits:
                raise NonFiniteError(
                    f"The {who} has non-finite weights ({', '.join(culprits)}), so it cannot be "
                    f"distilled {'from' if who == 'teacher' else 'into'}. Reload it from a clean "
                    "checkpoint."
                )
        # A teacher loaded in bf16 / fp16 gets its floating-point inputs in its own dtype.
        self._teacher_dtype = next(
            (p.dtype for p in teacher_model.parameters() if p.is_floating_point()), None
        )
        self._teacher_forward_parameters = forward_parameters(teacher_model)
        self.teacher_model = prepare_teacher(
            teacher_model, self.accelerator, self.is_deepspeed_enabled
        )

    def _align_labels(self, student: nn.Module, teacher: nn.Module) -> LabelAlignment:
        return align_label_spaces(
            student.config,
            teacher.config,
            student_name=model_name(student),
            teacher_name=getattr(self, "teacher_name", None) or model_name(teacher),
        )

    def _build_objective(self) -> DistillationObjective:  # (Trainer's `objective` is HP search's)
        return DistillationObjective.from_config(
            self.args,
            divergence_weight=self.args.kd_weight,
            ce_weight=self.args.ce_weight,
            logit_standardization=self.args.logit_standardization,
        )

    def _hp_search_setup(self, trial: Any) -> None:  # the objective follows the trial's args
        super()._hp_search_setup(trial)
        self.distillation_objective = self._build_objective()

    def _set_up_loss(self) -> None:
        """The objective and the metric sums (kept on the device between logs)."""
        self.distillation_objective = self._build_objective()
        self._metric_sums = MetricSums(CLASSIFIER_METRIC_SUMS, self.accelerator.device)
        # The divergence parameters of the latest loss per mode, logged next to the loss.
        self._last_divergence_params: dict[str, dict[str, float]] = {"train": {}, "eval": {}}

    def _set_signature_columns_if_needed(self) -> None:
        # Trainer keeps only the dataset columns the student's forward takes; the teacher's
        # inputs and the raw column the distillation collator processes must stay too.
        if self._signature_columns is not None:
            return
        super()._set_signature_columns_if_needed()
        extra = teacher_input_columns(self._teacher_forward_parameters)
        if isinstance(self.data_collator, ClassifierDistillationCollator):
            extra += self.data_collator.dataset_columns()
        self._signature_columns += [name for name in extra if name not in self._signature_columns]

    # ------------------------------------------------------------------ loss

    def get_batch_samples(
        self, epoch_iterator: Any, num_batches: int, device: torch.device
    ) -> tuple[list, torch.Tensor | None]:
        """Fetch the micro-batches of one optimizer step and count their examples.

        The count is `labels != -100` over all micro-batches and (with
        `average_tokens_across_devices`) all processes. Trainer counts the same only for
        models whose `forward` takes `**kwargs`; here it is counted for every student.

        Args:
            epoch_iterator: the epoch's iterator over the training dataloader.
            num_batches: micro-batches per optimizer step (gradient accumulation steps).
            device: where the count is put.

        Returns:
            The micro-batches and their labelled-example count (a 0-d tensor), or None when a
            batch has no labels.
        """
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batch_samples or any("labels" not in batch for batch in batch_samples):
            return batch_samples, None  # compute_loss names the missing labels
        num_items = sum(
            torch.as_tensor(batch["labels"]).ne(IGNORE_INDEX).sum() for batch in batch_samples
        ).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            num_items = self.accelerator.gather(num_items).sum()
        return batch_samples, num_items

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        mode = "train" if self.model.training else "eval"
        batch = split_model_inputs(inputs)
        if batch.labels is None:
            raise KeyError(
                "ABKDClassifierTrainer needs the class ids in every batch under `labels` (a "
                f"`label` or `labels` dataset column); the batch has {sorted(inputs)}."
            )
        student_outputs = model(**batch.student)
        teacher_logits = self.teacher_logits(batch.teacher)
        student_logits = student_outputs.logits
        check_logit_shapes(student_logits, teacher_logits, batch.labels)
        divergence_params = self.distillation_objective.divergence_params(
            self.state.global_step, self.state.max_steps
        )
        output = self.distillation_objective.loss_from_logits(
            student_logits, teacher_logits, batch.labels, divergence_params
        )
        loss = normalise_summed_loss(
            output.loss_sum,
            output.sums[_COUNT],
            num_items_in_batch,
            gradient_averaging_size(
                self.args.average_tokens_across_devices,
                self.accelerator.num_processes,
                self.get_tp_size(),
            ),
        )
        # Before backward and the optimizer step: a NaN must never reach the student's weights.
        check_finite_step(
            teacher_entropy_sum=output.sums["teacher_entropy"],
            student_entropy_sum=output.sums["student_entropy"],
            loss=loss,
            step=self.state.global_step + int(mode == "train"),
            training=mode == "train",
        )
        counted = batch.labels != IGNORE_INDEX
        sums = dict(output.sums)
        sums["teacher_accuracy"] = (teacher_logits.argmax(-1) == batch.labels)[counted].sum()
        self._metric_sums.add(mode, sums)
        self._last_divergence_params[mode] = divergence_params
        return (loss, student_outputs) if return_outputs else loss

    @torch.no_grad()
    def teacher_logits(self, teacher_inputs: dict[str, Any]) -> torch.Tensor:
        """The frozen teacher's `(batch, num_labels)` logits, columns in the student's order.

        Args:
            teacher_inputs: the teacher's model inputs of one batch (see
                `abkd_trainer.classification.inputs.split_model_inputs`).
        """
        self.teacher_model.eval()  # cheap, and robust to a caller that set train mode
        if self._teacher_dtype is not None:
            teacher_inputs = {
                key: value.to(self._teacher_dtype)
                if isinstance(value, torch.Tensor) and value.is_floating_point()
                else value
                for key, value in teacher_inputs.items()
            }
        logits = self.teacher_model(**teacher_inputs).logits
        return self.label_alignment.teacher_to_student(logits)

    # ------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        # Every process calls log() at the same points, so this reduction cannot deadlock.
        totals = self._metric_sums.pop(mode, self.accelerator)
        count = totals.pop(_COUNT)
        metrics: dict[str, float] = {}
        if count > 0:
            metrics = {
                _LOGGED_NAMES.get(name, name): value / count for name, value in totals.items()
            }
            if self.distillation_objective.spec.scheduled:  # the current alpha and beta
                metrics.update(self._last_divergence_params[mode])
        prefix = "eval_" if mode == "eval" else ""
        for key, value in metrics.items():
            logs.setdefault(
                f"{prefix}{key}", value
            )  # a compute_metrics value of the same name wins
        super().log(logs, start_time)

    # ------------------------------------------------------------------ training and saving

    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> TrainOutput:
        """Trainer's `train`; `resume_from_checkpoint=True` skips incomplete checkpoints,
        starting afresh in an `output_dir` holding an earlier run warns (see
        `abkd_trainer.core.checkpoints.prepare_output_dir`), and a student saved under renamed
        keys is restored (see `restore_renamed_checkpoint_weights`).

        Args:
            resume_from_checkpoint: a checkpoint folder, or True for the latest complete one in
                `output_dir`; None or False starts afresh.
            *args: passed to `Trainer.train`.
            **kwargs: passed to `Trainer.train`.
        """
        resume_from_checkpoint = prepare_output_dir(
            self.args, resume_from_checkpoint, is_main_process=self.is_world_process_zero()
        )
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        # Trainer's load misses weights saved under renamed keys (ViT in transformers 5). Here,
        # not in train(): with a model_init, Trainer rebuilds the student first, then loads.
        # DeepSpeed restores its own checkpoints and never calls this.
        if not self.is_fsdp_enabled:
            restore_renamed_checkpoint_weights(model or self.model, resume_from_checkpoint)
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """Trainer's model card (tags `abkd`, `knowledge-distillation`) plus the teacher, the
        distillation settings and the latest evaluation (`model-index` top-1 accuracy)."""
        tags = kwargs.pop("tags", None)
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        kwargs["tags"] = tags + [tag for tag in self._tag_names if tag not in tags]
        super().create_model_card(*args, **kwargs)
        if not self.is_world_process_zero():
            return
        card_path = Path(self.args.output_dir) / "README.md"
        evaluations = [log for log in self.state.log_history if "eval_accuracy" in log]
        permutation = self.label_alignment.permutation
        card = add_classifier_card_sections(
            card_path.read_text(encoding="utf-8"),
            distillation_settings(
                self.args,
                teacher=hub_id_or_name(self.teacher_name),
                label_permutation=None if permutation is None else permutation.tolist(),
            ),
            model_name=kwargs.get("model_name") or Path(self.args.output_dir).name,
            model_location=self.hub_model_id or str(self.args.output_dir),
            last_evaluation=evaluations[-1] if evaluations else None,
            task=classification_task(self.model),
            dataset=kwargs.get("dataset") if isinstance(kwargs.get("dataset"), str) else None,
        )
        card_path.write_text(card, encoding="utf-8")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the student (never the teacher) and, when called by the user, its model card.

        Args:
            output_dir: where to save (default: `args.output_dir`).
        """
        super().save_model(output_dir, _internal_call=_internal_call)
        if _internal_call or not self.args.should_save:
            return  # checkpoints and push_to_hub write the card themselves
        output_dir = output_dir or self.args.output_dir
        self.create_model_card(model_name=Path(output_dir).name)
        card_path = Path(self.args.output_dir) / "README.md"
        if Path(output_dir).resolve() != card_path.parent.resolve():
            shutil.copyfile(card_path, Path(output_dir) / "README.md")


def check_logit_shapes(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
) -> None:
    """Raise unless both logits are `(batch, num_labels)` alike and `labels` is `(batch,)`."""
    if (
        student_logits.dim() != 2
        or teacher_logits.shape != student_logits.shape
        or labels.shape != student_logits.shape[:1]
    ):
        raise ValueError(
            f"ABKDClassifierTrainer distils classifiers: it needs student and teacher logits of "
            f"shape (batch, num_labels) and labels of shape (batch,), but got student logits "
            f"{tuple(student_logits.shape)}, teacher logits {tuple(teacher_logits.shape)} and "
            f"labels {tuple(labels.shape)}. Token classification or multi-label models are not "
            "supported; check that both models see the same batch."
        )


def student_from_argument(model: str | nn.Module, args: ABKDClassifierConfig) -> nn.Module:
    """The student: `model` itself, or loaded by name with `args.model_init_kwargs`.

    Raises:
        ValueError: `model_init_kwargs` with an instantiated student.
    """
    if isinstance(model, str):
        return load_classifier(model, args.model_init_kwargs, who="student")
    if args.model_init_kwargs is not None:
        raise ValueError(
            "`model_init_kwargs` only applies to a student given by name, but `model` is "
            "already instantiated (or built by `model_init`). Drop `model_init_kwargs`."
        )
    return model


def checked_teacher_argument(
    teacher_model: str | nn.Module | None, args: ABKDClassifierConfig
) -> str | nn.Module:
    """The teacher to use (by default `args.teacher_model_name_or_path`), checked.

    Raises:
        ValueError: no teacher, or `teacher_model_init_kwargs` with an instantiated teacher.
    """
    if teacher_model is None:
        teacher_model = args.teacher_model_name_or_path
    if teacher_model is None:
        raise ValueError(
            "ABKDClassifierTrainer needs a teacher: pass `teacher_model=` (a model or a "
            "name/path) or set `teacher_model_name_or_path` in ABKDClassifierConfig."
        )
    if not isinstance(teacher_model, str) and args.teacher_model_init_kwargs is not None:
        raise ValueError(
            "`teacher_model_init_kwargs` only applies to a teacher given by name, but "
            "`teacher_model` is already instantiated. Load it with those arguments yourself, "
            "or pass its name instead."
        )
    return teacher_model


def as_classifier_config(
    args: ABKDClassifierConfig | TrainingArguments | None, model: Any
) -> ABKDClassifierConfig:
    """`args` as an `ABKDClassifierConfig` (a `TrainingArguments` keeps its values)."""
    if args is None:
        name = model if isinstance(model, str) else model_name(model) if model else "student"
        return ABKDClassifierConfig(f"{name.rstrip('/').split('/')[-1]}-ABKD")
    if isinstance(args, ABKDClassifierConfig):
        return args
    if isinstance(args, TrainingArguments):
        dict_args = args.to_dict()
        dict_args["hub_token"] = args.hub_token  # to_dict hides it
        return ABKDClassifierConfig(**dict_args)
    raise TypeError(
        f"`args` must be an ABKDClassifierConfig or TrainingArguments, got {type(args).__name__}."
    )
