"""ABKD as a TRL trainer: SFT data handling, a frozen teacher, and a divergence loss per token."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from accelerate.logging import get_logger
from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict
from transformers import (
    DataCollator,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    TrainerCallback,
    TrainingArguments,
)
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, EvalPrediction, TrainOutput
from trl import SFTTrainer
from trl.models.utils import _ForwardRedirection
from trl.trainer.utils import (
    disable_dropout_in_model,
)

from abkd_trainer.core.checkpoints import prepare_output_dir
from abkd_trainer.core.collapse_guard import CollapseGuardCallback
from abkd_trainer.core.distributed import prepare_teacher
from abkd_trainer.core.hub import check_hub_access
from abkd_trainer.core.metric_sums import MetricSums
from abkd_trainer.core.numerics import check_finite_step
from abkd_trainer.core.objective import (
    METRIC_SUMS,
    DistillationObjective,
    gradient_averaging_size,
    normalise_summed_loss,
)
from abkd_trainer.core.schedules import scheduled_alpha_beta
from abkd_trainer.divergences.coarsened import CachedTeacher
from abkd_trainer.lm.batches import IGNORE_INDEX, input_token_count, next_token_targets
from abkd_trainer.lm.config import ABKDConfig
from abkd_trainer.lm.data import check_sft_datasets, check_supervised_tokens
from abkd_trainer.lm.fused_forward import FusedForward
from abkd_trainer.lm.model_card_settings import (
    ABKD_PAPER,
    add_distillation_card_sections,
    distillation_card_settings,
)
from abkd_trainer.lm.models import (
    check_startup_outputs,
    fused_logit_transforms,
)
from abkd_trainer.lm.on_policy import (
    OnPolicyBatches,
    OnPolicySchedule,
    build_on_policy_batches,
    build_on_policy_schedule,
)
from abkd_trainer.lm.teacher_cache import (
    ROW_COLUMN,
    TeacherCache,
    pop_cached_teacher,
    preprocessing_settings,
    train_from_cache,
)
from abkd_trainer.lm.teacher_setup import load_checked_teacher
from abkd_trainer.lm.trainer_arguments import resolve_trainer_arguments

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel
    from transformers import BitsAndBytesConfig

logger = get_logger(__name__)

# Per-mode running sums behind the logged metrics, in this order: the objective's per-supervised-
# token sums (logged as their mean over the supervised tokens of the logging period), then the two
# token counts.
_METRIC_SUMS = (*METRIC_SUMS, "num_input_tokens")
_TOKEN_AVERAGED_METRICS = _METRIC_SUMS[:-2]


class ABKDTrainer(SFTTrainer):
    """Knowledge distillation with the alpha-beta divergence (ABKD), on top of TRL's `SFTTrainer`.

    The student is trained on SFT data (any format SFTTrainer accepts: `text`, `prompt` /
    `completion`, `messages`, packing) to match a frozen teacher's next-token distribution on the
    supervised tokens, with the loss described in [`ABKDConfig`][abkd_trainer.lm.config.ABKDConfig].

    Args:
        model: the student, an instance or a name/path loaded with `args.model_init_kwargs`.
        teacher_model: the teacher, an instance or a name/path (loaded with
            `args.teacher_model_init_kwargs`); default `args.teacher_model_name_or_path`. It must
            use the student's tokenizer; only its first `len(tokenizer)` logits are compared. None
            with `args.teacher_cache`: no teacher is loaded, the top-k log-probabilities cached by
            `abkd-cache-teacher` are read instead (see `abkd_trainer.lm.teacher_cache`).
        args: the [`ABKDConfig`][abkd_trainer.lm.config.ABKDConfig] (`TrainingArguments` converted).
        data_collator: batches the examples; by default SFTTrainer's, plus the teacher cache's.
        train_dataset: the SFT training data, in one of the formats above.
        eval_dataset: evaluation data: one dataset, or a dict of named ones.
        processing_class: the tokenizer both models read; by default the student's.
        compute_loss_func: must be None (it is in `SFTTrainer`'s signature); `args` set the loss.
        compute_metrics: as in `Trainer`, metrics from the evaluation predictions.
        callbacks: added to the defaults (a `CollapseGuardCallback` is added unless given).
        optimizers: `(optimizer, lr_scheduler)` to use instead of the defaults.
        optimizer_cls_and_kwargs: an optimizer class and its keyword arguments, instead.
        preprocess_logits_for_metrics: applied to the logits before `compute_metrics` sees them.
        quantization_config: for a student given by name, e.g. QLoRA with a `peft_config`.
        peft_config: train a PEFT adapter (e.g. LoRA) on the student instead of its weights.
        formatting_func: turns an example into the text to train on, as in `SFTTrainer`.

    The prepared teacher, `self.teacher_model`, is frozen, in eval mode, on the student's device and
    never checkpointed; `self.teacher_name` names it. Besides SFTTrainer's metrics, `kd_loss`,
    `ce_loss`, `teacher_agreement`, both entropies and, for `divergence="ab"`, `alpha` and `beta`
    are logged (see [Logged metrics and safety checks][logged-metrics-and-safety-checks]).
    """

    _tag_names = ["trl", "abkd", "knowledge-distillation"]
    _name = "ABKD"
    _paper = ABKD_PAPER  # cited in the model card TRL writes
    # compute_loss divides by the token count of the whole accumulated batch (get_batch_samples).
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: str | PreTrainedModel | PeftModel,
        teacher_model: str | PreTrainedModel | nn.Module | None = None,
        args: ABKDConfig | TrainingArguments | None = None,
        data_collator: DataCollator | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset
        | IterableDataset
        | DatasetDict
        | IterableDatasetDict
        | dict[str, Dataset | IterableDataset]
        | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[
            torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None
        ] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
        | None = None,
        quantization_config: BitsAndBytesConfig | None = None,
        peft_config: PeftConfig | None = None,
        formatting_func: Callable[[dict], str] | None = None,
    ) -> None:
        args, teacher_model = resolve_trainer_arguments(
            args, model, teacher_model, compute_loss_func
        )

        if args.push_to_hub and args.process_index == 0:
            # Before Trainer creates the Hub repository, and long before the upload at the end:
            # a Hub that cannot be written to fails here, with a message that names it.
            check_hub_access(args.hub_token)
        check_sft_datasets(train_dataset, eval_dataset, args, formatting_func)
        super().__init__(
            model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            quantization_config=quantization_config,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )

        check_supervised_tokens(self.train_dataset, self.eval_dataset, args)

        # Offline teacher: every batch carries the cached teacher rows; no teacher is loaded.
        self.teacher_cache = (
            None if args.teacher_cache is None else self._train_from_cache(args.teacher_cache)
        )
        models = self._set_up_teacher(teacher_model)
        self._set_up_loss(models)
        # Warns once if the logged entropies show a collapse (a user-configured one is kept).
        if not any(isinstance(cb, CollapseGuardCallback) for cb in self.callback_handler.callbacks):
            self.add_callback(CollapseGuardCallback())
        # On-policy distillation: sampled completions replace the dataset's (see lm/on_policy/).
        self.on_policy = self._set_up_on_policy() if args.uses_sampled_completions else None

    # ------------------------------------------------------------------ set-up helpers

    def _train_from_cache(self, path: str | os.PathLike) -> TeacherCache:
        """Train from the teacher cache at `path`: checked against this run, its row ids ride
        with the prepared datasets and the collator adds each batch's cached teacher rows."""
        cached = train_from_cache(
            path,
            tokenizer=self._tokenizer,
            preprocessing=preprocessing_settings(
                self.args, self.padding_free, self.completion_only_loss
            ),
            train_dataset=self.train_dataset,
            eval_dataset=self.eval_dataset,
            data_collator=self.data_collator,
        )
        self.train_dataset, self.eval_dataset = cached.train_dataset, cached.eval_dataset
        self.data_collator = cached.data_collator
        # Trainer drops dataset columns the model's forward does not take; keep the row ids.
        self._set_signature_columns_if_needed()
        if ROW_COLUMN not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, ROW_COLUMN]
        return cached.cache

    def _set_up_teacher(
        self, teacher_model: str | PreTrainedModel | nn.Module | None
    ) -> dict[str, nn.Module]:
        """Load the teacher (given by name), check it against the student and prepare it.

        Sets `teacher_name`, `vocab_size` and `teacher_model`. Returns role -> model as given
        (`"student"`, and `"teacher"` unless training from a cache).
        """
        cache = self.teacher_cache
        teacher = load_checked_teacher(
            teacher_model,
            student=self.model,
            tokenizer=self._tokenizer,
            args=self.args,
            cached_teacher_name=None if cache is None else cache.manifest.teacher,
        )
        self.teacher_name = teacher.name
        # Both logit tensors are compared over the tokenizer's real vocabulary; rows beyond it are
        # embedding padding (e.g. Qwen2.5: 151665 tokens, 151936 or 152064 rows) and never targets.
        self.vocab_size = len(self._tokenizer)
        if self.args.disable_dropout:
            disable_dropout_in_model(self.model)
        self.teacher_model = (
            None
            if teacher.model is None
            else prepare_teacher(teacher.model, self.accelerator, self.is_deepspeed_enabled)
        )
        return teacher.models

    def _build_objective(self) -> DistillationObjective:  # (Trainer's `objective` is HP search's)
        args = self.args
        return DistillationObjective.from_config(
            args, divergence_weight=args.kd_ratio, ce_weight=1.0 - args.kd_ratio,
            vocab_size=self.vocab_size, chunk_size=args.loss_chunk_size)  # fmt: skip

    def _hp_search_setup(self, trial: Any) -> None:  # the objective follows the trial's args
        super()._hp_search_setup(trial)
        self.distillation_objective = self._build_objective()

    def _set_up_loss(self, models: dict[str, nn.Module]) -> None:
        """The objective, the fused loss's logit transforms (checked at start-up) and the metric
        sums; `models` maps roles to the models as given."""
        args, self.distillation_objective = self.args, self._build_objective()
        # Each model's logit scale and soft-cap, which the fused loss applies to its projections.
        logit_transforms = fused_logit_transforms(models) if args.use_fused_loss else None
        # Partitioned ZeRO-3 parameters cannot run a forward before the engines exist; there the
        # per-step checks in compute_loss are the only ones (and the config-based logit transform
        # is trusted, as TRL's fused heads do).
        if not is_deepspeed_zero3_enabled():
            check_startup_outputs(models, self.accelerator, logit_transforms)
        # The fused loss calls both backbones directly; routing those calls through the wrappers'
        # forward (DDP, DeepSpeed) keeps their hooks, e.g. ZeRO-3's gathering and gradient
        # reduction, working. TRL's DistillationTrainer does the same.
        self._forward_redirection = _ForwardRedirection()
        self._fused_forward = FusedForward(
            logit_transforms or {}, self.accelerator.unwrap_model, self._forward_redirection
        )
        # Kept on the device between logs: adding to them never waits for the accelerator.
        self._metric_sums = MetricSums(_METRIC_SUMS, self.accelerator.device)
        # The divergence parameters of the latest loss per mode, logged next to the loss.
        self._last_divergence_params: dict[str, dict[str, float]] = {"train": {}, "eval": {}}

    def _set_up_on_policy(self) -> OnPolicyBatches:
        """Register the on-policy schedule and build the source of sampled micro-batches."""
        self.add_callback(
            build_on_policy_schedule(self.args, self.train_dataset, self.eval_dataset)
        )
        return build_on_policy_batches(
            self.args,
            schedule=self._on_policy_schedule,
            tokenizer=self._tokenizer,
            data_collator=self.data_collator,
            student=self.model,
            teacher=self.teacher_model,
            # Looked up at each sampling call: Trainer wraps the student when training starts.
            current_student=lambda: self.model_wrapped,
            accelerator=self.accelerator,
        )

    def _on_policy_schedule(self) -> OnPolicySchedule:
        """The live schedule callback (Trainer may replace callbacks when it restores them)."""
        return next(
            callback
            for callback in self.callback_handler.callbacks
            if isinstance(callback, OnPolicySchedule)
        )

    # ------------------------------------------------------------------ loss

    def current_alpha_beta(self) -> tuple[float, float]:
        """`(alpha, beta)` at the current global step, with the warm-up and schedule applied
        (see `abkd_trainer.core.schedules`). Another divergence than `"ab"` does not use them;
        for it this is what the configuration's (alpha, beta) fields would give."""
        if not self.distillation_objective.spec.scheduled:
            return scheduled_alpha_beta(self.args, self.state.global_step, self.state.max_steps)
        params = self._divergence_params()
        return params["alpha"], params["beta"]

    def _divergence_params(self) -> dict[str, float]:
        """The divergence's keyword parameters at the current global step (from the objective)."""
        state = self.state
        return self.distillation_objective.divergence_params(state.global_step, state.max_steps)

    def get_batch_samples(
        self, epoch_iterator: Any, num_batches: int, device: torch.device
    ) -> tuple[list, torch.Tensor | None]:
        """Fetch the micro-batches of one optimizer step and count their supervised tokens.

        The count is `labels[..., 1:] != -100` over all micro-batches and (with
        `average_tokens_across_devices`) all processes, the same shifted count `compute_loss`
        uses locally. Trainer's own count depends on the model class (GPT-2 counts unshifted
        labels) and is replaced here. With on-policy distillation the completions are sampled
        first, so the count is of the sampled tokens.

        Args:
            epoch_iterator: the epoch's iterator over the training dataloader.
            num_batches: micro-batches per optimizer step (gradient accumulation steps).
            device: where the count is put.

        Returns:
            The micro-batches and their supervised-token count (a 0-d tensor), or None for an
            empty step.
        """
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batch_samples:
            return batch_samples, None
        if self.on_policy is not None:  # before the count, so that it counts sampled tokens
            batch_samples = self.on_policy.replace_completions(
                batch_samples, self.state.global_step, self.state.max_steps
            )
        num_items = sum(
            next_token_targets(batch).ne(IGNORE_INDEX).sum() for batch in batch_samples
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
        """The distillation loss of one micro-batch: both models' forwards, the objective
        (`self.distillation_objective`), normalised by the supervised tokens of the accumulated
        batch, and the logged sums recorded.

        Args:
            model: the student (as wrapped for training).
            inputs: the collated micro-batch (`input_ids`, `attention_mask`, `labels`, ...).
            return_outputs: also return the student's outputs (evaluation with metrics).
            num_items_in_batch: supervised tokens of the whole accumulated (and, with
                `average_tokens_across_devices`, all-process) batch; None normalises by this
                micro-batch's.

        Returns:
            The scalar loss, or `(loss, student_outputs)`.
        """
        mode = "train" if self.model.training else "eval"
        cached_teacher = pop_cached_teacher(inputs)  # this batch's teacher rows, from the cache
        targets = next_token_targets(inputs)
        # Same keyword inputs for both models: with packing these carry the position_ids that keep
        # packed documents from attending to each other.
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
        model_inputs["use_cache"] = False

        divergence_params = self._divergence_params()
        if self.teacher_model is not None:
            self.teacher_model.eval()  # cheap, and robust to a caller that set train mode
        # Evaluation with `compute_metrics` wants the student's logits; everything else (training,
        # loss-only evaluation) can do without them.
        wants_logits = (
            return_outputs
            and self.compute_metrics is not None
            and not self.args.prediction_loss_only
        )
        student_outputs = None
        if self.args.use_fused_loss and not wants_logits:
            loss_sum, sums = self._fused_objective(
                model, model_inputs, targets, divergence_params, cached_teacher
            )
        else:
            student_outputs, teacher = self._logits_forwards(model, model_inputs, cached_teacher)
            output = self.distillation_objective.loss_from_logits(
                student_outputs.logits, teacher, targets, divergence_params
            )
            loss_sum, sums = output.loss_sum, output.sums
        loss = normalise_summed_loss(
            loss_sum,
            sums["num_supervised"],
            num_items_in_batch,
            gradient_averaging_size(
                self.args.average_tokens_across_devices,
                self.accelerator.num_processes,
                self.get_tp_size(),
            ),
        )
        self._record(mode, loss, sums, inputs, divergence_params)
        if student_outputs is None:
            student_outputs = {"loss": loss}  # no logits exist; Trainer reads none from this
        return (loss, student_outputs) if return_outputs else loss

    def _record(
        self,
        mode: str,
        loss: torch.Tensor,
        sums: dict[str, torch.Tensor],
        inputs: dict[str, Any],
        divergence_params: dict[str, float],
    ) -> None:
        """Check that the step is finite and add its sums to the logged ones."""
        # Before backward and the optimizer step: a NaN must never reach the student's weights.
        check_finite_step(
            teacher_entropy_sum=sums["teacher_entropy"],
            student_entropy_sum=sums["student_entropy"],
            loss=loss,
            step=self.state.global_step + int(mode == "train"),
            training=mode == "train",
        )
        if mode == "train":
            sums["num_input_tokens"] = input_token_count(inputs)
        self._metric_sums.add(mode, sums)
        self._last_divergence_params[mode] = divergence_params

    def _logits_forwards(
        self,
        model: nn.Module,
        model_inputs: dict[str, Any],
        cached_teacher: CachedTeacher | None,
    ) -> tuple[Any, torch.Tensor | CachedTeacher]:
        """The student's outputs (with `(batch, seq, V_student)` logits) and the teacher: its
        `(batch, seq, V_teacher)` logits, or the cached teacher of the supervised positions."""
        student_outputs = model(**model_inputs)
        if cached_teacher is not None:
            return student_outputs, cached_teacher
        with torch.no_grad():
            return student_outputs, self.teacher_model(**model_inputs).logits

    def _fused_objective(
        self,
        model: nn.Module,
        model_inputs: dict[str, Any],
        targets: torch.Tensor,
        divergence_params: dict[str, float],
        cached_teacher: CachedTeacher | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The objective's `(loss_sum, sums)` from final hidden states and LM heads, computed
        inside the student wrapper's forward (so that DDP's and ZeRO-3's hooks see it)."""
        student = self.accelerator.unwrap_model(model)
        # The redirection swaps out the student's forward, and with it the autocast that
        # accelerate wrapped around it (bf16 / fp16): restore it for both decoders and the
        # heads, so that both loss paths compute in the same precision.
        with self.accelerator.autocast():
            return self._forward_redirection(
                model,
                student,
                self._fused_forward.objective_sums,
                self.distillation_objective,
                student,
                self.teacher_model,
                model_inputs,
                targets,
                divergence_params,
                cached_teacher,
            )

    # ------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        # Every process calls log() at the same points, so this reduction cannot deadlock.
        totals = self._metric_sums.pop(mode, self.accelerator)
        # SFTTrainer's running count of input tokens (padding excluded) over training.
        self._total_train_tokens += int(totals["num_input_tokens"]) // self._tp_size
        metrics: dict[str, float] = {}
        num_supervised = totals["num_supervised"]
        if num_supervised > 0:
            metrics = {name: totals[name] / num_supervised for name in _TOKEN_AVERAGED_METRICS}
            # SFTTrainer's name for the student's entropy (same tokens, temperature 1).
            metrics["entropy"] = metrics["student_entropy"]
            metrics["num_tokens"] = self._total_train_tokens
            if self.distillation_objective.spec.scheduled:  # the current alpha and beta
                metrics.update(self._last_divergence_params[mode])
        prefix = "eval_" if mode == "eval" else ""
        logs.update({f"{prefix}{key}": value for key, value in metrics.items()})
        if mode == "train" and self.on_policy is not None:
            logs.update(self.on_policy.pop_metrics())
        super().log(logs, start_time)

    # ------------------------------------------------------------------ training

    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> TrainOutput:
        """Trainer's `train`; `resume_from_checkpoint=True` skips incomplete checkpoints, and
        starting afresh in an `output_dir` that holds an earlier run warns (see
        `abkd_trainer.core.checkpoints.prepare_output_dir`). Resuming restores the on-policy
        state too (the adaptive schedule's replay buffer, see `_save_checkpoint`).

        Args:
            resume_from_checkpoint: a checkpoint folder, or True for the latest complete one in
                `output_dir`; None or False starts afresh.
            *args: passed to `Trainer.train`.
            **kwargs: passed to `Trainer.train`.
        """
        resume_from_checkpoint = prepare_output_dir(
            self.args, resume_from_checkpoint, is_main_process=self.is_world_process_zero()
        )
        if resume_from_checkpoint is not None and self.on_policy is not None:
            self.on_policy.load_state(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Trainer's checkpoint, with the on-policy state written first: Trainer writes
        `trainer_state.json`, which marks a checkpoint complete, last, so a complete checkpoint
        holds that state too."""
        if self.on_policy is not None:
            checkpoint_folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            run_dir = self._get_output_dir(trial=trial)
            self.on_policy.save_state(os.path.join(run_dir, checkpoint_folder))
        super()._save_checkpoint(model, trial)

    # ------------------------------------------------------------------ saving and the Hub

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
    ) -> None:
        """TRL's model card (tags, ABKD citation) plus a section on the distillation set-up.

        Args:
            model_name: the card's model name (default: the output folder's name).
            dataset_name: the training dataset's name or Hub id.
            tags: extra Hub tags.
        """
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        add_distillation_card_sections(
            Path(self.args.output_dir) / "README.md",
            distillation_card_settings(
                self.args,
                self.teacher_name,
                cache_top_k=None if self.teacher_cache is None else self.teacher_cache.top_k,
            ),
            model_location=self.hub_model_id or str(self.args.output_dir),
            callbacks=self.callback_handler.callbacks,
            model_name=model_name or Path(self.args.output_dir).name,
            global_step=self.state.global_step,
        )

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
        if Path(output_dir).resolve() != Path(self.args.output_dir).resolve():
            shutil.copyfile(card_path, Path(output_dir) / "README.md")
