"""ABKD as a TRL trainer: SFT data handling, a frozen teacher, and a divergence loss per token."""

from __future__ import annotations

import os
import shutil
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate.logging import get_logger
from datasets import Dataset, IterableDataset
from transformers import (
    AutoTokenizer,
    DataCollator,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import EvalPrediction
from trl import SFTTrainer
from trl.trainer.utils import create_model_from_path, disable_dropout_in_model, get_config_model_id

from abkd_trainer.config import ABKDConfig
from abkd_trainer.divergences import get_divergence
from abkd_trainer.model_card import add_distillation_section

if TYPE_CHECKING:
    from peft import PeftConfig, PeftModel

logger = get_logger(__name__)

IGNORE_INDEX = -100
# Per-mode running sums behind the logged averages, in this order.
_METRIC_SUMS = ("kd_loss", "ce_loss", "teacher_agreement", "num_supervised")


def linear_schedule(start: float, end: float | None, step: int, total_steps: int) -> float:
    """A hyper-parameter moving linearly from ``start`` (step 0) to ``end`` (step ``total_steps``).

    ``end=None`` means constant. Steps outside ``[0, total_steps]`` are clamped;
    ``total_steps <= 0`` (before training starts) gives ``start``.
    """
    if end is None or total_steps <= 0:
        return start
    progress = min(max(step / total_steps, 0.0), 1.0)
    return start + (end - start) * progress


class ABKDTrainer(SFTTrainer):
    """Knowledge distillation with the alpha-beta divergence (ABKD), on top of TRL's [`SFTTrainer`].

    The student is trained on SFT data (any format SFTTrainer accepts: ``text``,
    ``prompt``/``completion``, conversational ``messages``, packing) to match a frozen teacher's
    next-token distribution on the supervised tokens, with the loss described in [`ABKDConfig`].

    Args:
        model: the student, an instance or a name/path loaded with ``args.model_init_kwargs``.
        teacher_model: the teacher, an instance or a name/path loaded with
            ``args.teacher_model_init_kwargs``; defaults to ``args.teacher_model_name_or_path``.
            It must use the student's tokenizer. Its logits may be wider than the student's
            (padded embedding rows): only the first ``len(tokenizer)`` entries are compared.
        args: an [`ABKDConfig`] (a plain ``TrainingArguments`` is converted).
        data_collator, train_dataset, eval_dataset, processing_class, compute_metrics, callbacks,
        optimizers, preprocess_logits_for_metrics, peft_config, formatting_func: as in
            [`SFTTrainer`] / TRL's ``GKDTrainer``.

    The prepared teacher is ``self.teacher_model``: frozen, in eval mode, on the student's device,
    never in the optimizer or a checkpoint. Logged per train/eval period, as token-weighted averages
    over accumulation steps and processes: ``kd_loss``, ``ce_loss``, ``teacher_agreement`` (top-1
    agreement) and, for ``divergence="ab"``, the current ``alpha`` and ``beta``.
    """

    _tag_names = ["trl", "abkd", "knowledge-distillation"]
    _name = "ABKD"
    _paper = {
        "title": "ABKD: Pursuing a Proper Allocation of the Probability Mass in Knowledge "
        "Distillation via α-β-Divergence",
        "id": "2505.04560",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{wang2025abkd,
                title        = {{ABKD: Pursuing a Proper Allocation of the Probability Mass in
                                 Knowledge Distillation via $\\alpha$-$\\beta$-Divergence}},
                author       = {Guanghui Wang and Zhiyong Yang and Zitai Wang and Shi Wang and
                                Qianqian Xu and Qingming Huang},
                year         = 2025,
                booktitle    = {Proceedings of the 42nd International Conference on Machine
                                Learning, {ICML} 2025},
                eprint       = {2505.04560},
                archivePrefix = {arXiv},
            }"""),
    }
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
        | dict[str, Dataset | IterableDataset]
        | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[
            torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None
        ] = (None, None),
        preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
        | None = None,
        peft_config: PeftConfig | None = None,
        formatting_func: Callable[[dict], str] | None = None,
    ) -> None:
        args = _as_abkd_config(args, model)
        if teacher_model is None:
            teacher_model = args.teacher_model_name_or_path
        if teacher_model is None:
            raise ValueError(
                "ABKDTrainer needs a teacher: pass `teacher_model=` (a model or a name/path) "
                "or set `teacher_model_name_or_path` in ABKDConfig."
            )
        if not isinstance(teacher_model, str) and args.teacher_model_init_kwargs is not None:
            raise ValueError(
                "`teacher_model_init_kwargs` only applies to a teacher given by name, but "
                "`teacher_model` is already instantiated. Load it with those arguments yourself, "
                "or pass its name instead."
            )

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
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            peft_config=peft_config,
            formatting_func=formatting_func,
        )

        # Loaded after the training arguments and the accelerator exist, so that under ZeRO-3 the
        # teacher is created sharded (zero.Init) like the student.
        teacher_source = teacher_model if isinstance(teacher_model, str) else None
        if isinstance(teacher_model, str):
            teacher_model = self._load_teacher(teacher_model)
        self._teacher_name = (
            teacher_source
            or get_config_model_id(teacher_model.config)
            or type(teacher_model).__name__
        )

        # Both logit tensors are compared over the tokenizer's real vocabulary; rows beyond it are
        # embedding padding (e.g. Qwen2.5: 151665 tokens, 151936 or 152064 rows) and never targets.
        self.vocab_size = len(self._tokenizer)
        self._check_vocabularies(teacher_model, teacher_source)

        if args.disable_dropout:
            disable_dropout_in_model(self.model)

        teacher_model.requires_grad_(False)
        teacher_model.eval()
        if self.is_deepspeed_enabled:
            from abkd_trainer.distributed import prepare_deepspeed_teacher

            self.teacher_model = prepare_deepspeed_teacher(teacher_model, self.accelerator)
        else:
            self.teacher_model = self.accelerator.prepare_model(teacher_model, evaluation_mode=True)
        self.teacher_model.eval()

        self.divergence_fn = get_divergence(args.divergence)
        # Kept on the device between logs: adding to them never waits for the accelerator.
        self._metric_sums = {
            mode: torch.zeros(
                len(_METRIC_SUMS), dtype=torch.float64, device=self.accelerator.device
            )
            for mode in ("train", "eval")
        }
        # The divergence parameters of the latest loss per mode, logged next to the loss.
        self._last_divergence_params: dict[str, dict[str, float]] = {"train": {}, "eval": {}}

    # ------------------------------------------------------------------ set-up helpers

    def _load_teacher(self, name_or_path: str) -> PreTrainedModel:
        init_kwargs = dict(self.args.teacher_model_init_kwargs or {})
        # The teacher goes whole onto the student's device; "auto" would spread it over every GPU.
        init_kwargs.setdefault("device_map", None)
        init_kwargs.setdefault("trust_remote_code", self.args.trust_remote_code)
        return create_model_from_path(name_or_path, **init_kwargs)

    def _check_vocabularies(self, teacher_model: nn.Module, teacher_source: str | None) -> None:
        """Raise early if teacher and student cannot share the tokenizer ``self._tokenizer``."""
        student_name = get_config_model_id(self.model.config) or type(self.model).__name__
        widths = {
            f"student ({student_name})": self.model.config.get_text_config().vocab_size,
            f"teacher ({self._teacher_name})": teacher_model.config.get_text_config().vocab_size,
        }
        for who, width in widths.items():
            if width < self.vocab_size:
                raise ValueError(
                    f"The {who} has {width} output logits but the tokenizer has "
                    f"{self.vocab_size} tokens, so they cannot share it. Teacher and student must "
                    "use the same tokenizer: pick a teacher from the student's model family "
                    "(padded embedding rows are fine)."
                )
        teacher_tokenizer = self._teacher_tokenizer(teacher_model, teacher_source)
        if teacher_tokenizer is None:
            return
        student_vocab = self._tokenizer.get_vocab()
        teacher_vocab = teacher_tokenizer.get_vocab()
        if student_vocab != teacher_vocab:
            differing = sorted(
                set(student_vocab.items()) ^ set(teacher_vocab.items()), key=lambda item: item[1]
            )
            raise ValueError(
                f"The teacher's tokenizer ({teacher_tokenizer.name_or_path or self._teacher_name}, "
                f"{len(teacher_vocab)} tokens) differs from the student's processing_class "
                f"({self._tokenizer.name_or_path or 'given tokenizer'}, {len(student_vocab)} "
                f"tokens); first differing entry (token, id): {differing[0]}. ABKD compares "
                "next-token distributions id by id, so both models must share one vocabulary. Use "
                "a teacher from the student's model family."
            )

    def _teacher_tokenizer(
        self, teacher_model: nn.Module, teacher_source: str | None
    ) -> PreTrainedTokenizerBase | None:
        """The tokenizer saved with the teacher, when there is one to compare against."""
        source = teacher_source or get_config_model_id(teacher_model.config)
        # An instantiated teacher is only checked against a local tokenizer: looking a bare model id
        # up on the Hub at construction would surprise users who built the teacher offline.
        if not source or (teacher_source is None and not os.path.isdir(source)):
            return None
        try:
            return AutoTokenizer.from_pretrained(
                source, trust_remote_code=self.args.trust_remote_code
            )
        except (OSError, ValueError) as error:
            logger.info(
                f"No tokenizer found for the teacher at {source!r} ({error}); "
                "skipping the vocabulary check."
            )
            return None

    # ------------------------------------------------------------------ loss

    def current_alpha_beta(self) -> tuple[float, float]:
        """``(alpha, beta)`` at the current global step, following ``alpha_end`` / ``beta_end``."""
        step, total = self.state.global_step, self.state.max_steps
        return (
            linear_schedule(self.args.alpha, self.args.alpha_end, step, total),
            linear_schedule(self.args.beta, self.args.beta_end, step, total),
        )

    def _divergence_params(self) -> dict[str, float]:
        if self.args.divergence == "ab":
            alpha, beta = self.current_alpha_beta()
            return {"alpha": alpha, "beta": beta}
        if self.args.divergence == "jsd":
            return {"beta": self.args.jsd_beta}
        if self.args.divergence in ("sfkl", "srkl"):
            return {"skew_lambda": self.args.skew_lambda}
        return {}

    def get_batch_samples(
        self, epoch_iterator: Any, num_batches: int, device: torch.device
    ) -> tuple[list, torch.Tensor | None]:
        """Fetch the micro-batches of one optimizer step and count their supervised tokens.

        The count is ``labels[..., 1:] != -100`` over all micro-batches and (with
        ``average_tokens_across_devices``) all processes, the same shifted count ``compute_loss``
        uses locally. Trainer's own count depends on the model class (GPT-2 counts unshifted
        labels) and is replaced here.
        """
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batch_samples:
            return batch_samples, None
        num_items = sum(
            _next_token_targets(batch).ne(IGNORE_INDEX).sum() for batch in batch_samples
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
        targets = _next_token_targets(inputs)
        # Same keyword inputs for both models: with packing these carry the position_ids that keep
        # packed documents from attending to each other.
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
        model_inputs["use_cache"] = False

        student_outputs = model(**model_inputs)
        self.teacher_model.eval()  # cheap, and robust to a caller that put it back in train mode
        with torch.no_grad():
            teacher_logits = self.teacher_model(**model_inputs).logits

        divergence_params = self._divergence_params()
        loss, sums = self._distillation_loss(
            student_outputs.logits, teacher_logits, targets, num_items_in_batch, divergence_params
        )
        self._metric_sums[mode] += sums.to(self._metric_sums[mode].device)
        self._last_divergence_params[mode] = divergence_params
        return (loss, student_outputs) if return_outputs else loss

    def _distillation_loss(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        targets: torch.Tensor,
        num_items_in_batch: torch.Tensor | int | None,
        divergence_params: dict[str, float],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training objective from full logits.

        Args:
            student_logits: ``(batch, seq, V_student)``.
            teacher_logits: ``(batch, seq, V_teacher)``; ``V_*`` may exceed ``len(tokenizer)``.
            targets: ``(batch, seq)``, the next token each position predicts (the labels shifted
                left), ``-100`` where not supervised, always at the last position.
            num_items_in_batch: supervised tokens of the whole accumulated batch (all processes);
                None (evaluation) normalises by this micro-batch's count.
            divergence_params: keyword parameters of the divergence, e.g. ``alpha`` and ``beta``.

        Returns:
            ``(loss, sums)``: the scalar loss, and detached fp64 sums over this micro-batch's
            supervised tokens in ``_METRIC_SUMS`` order (divergence, cross-entropy, top-1
            agreements, token count).
        """
        # Real vocabulary only: padded rows never appear as targets and must not move the loss.
        # (A no-op view when the widths already match, so the logits stay contiguous and the
        # divergence kernel reads them without a copy.)
        student_logits = student_logits[..., : self.vocab_size]
        teacher_logits = teacher_logits[..., : self.vocab_size]
        supervised = targets != IGNORE_INDEX

        kd_sum = self.divergence_fn(
            student_logits,
            teacher_logits,
            **divergence_params,
            temperature=self.args.temperature,
            mask=supervised,
            reduction="sum",
            chunk_size=self.args.loss_chunk_size,
        )
        # Logged even when kd_ratio == 1; only part of the graph when it is trained on.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.args.kd_ratio < 1.0):
            # Supervised rows only (prompt tokens would just be masked out), upcast like
            # transformers' causal-LM loss: half-precision log-softmax loses digits.
            supervised_rows = supervised.nonzero(as_tuple=True)
            ce_sum = F.cross_entropy(
                student_logits[supervised_rows].float(),
                targets[supervised_rows],
                reduction="sum",
            )

        num_local = supervised.sum()
        normaliser = num_local if num_items_in_batch is None else num_items_in_batch
        # A batch with no supervised token gives 0 / 1 = 0 with the graph intact, never 0 / 0.
        normaliser = torch.as_tensor(normaliser, device=kd_sum.device, dtype=kd_sum.dtype).clamp(
            min=1
        )
        objective = self.args.kd_ratio * kd_sum
        if self.args.kd_ratio < 1.0:
            objective = objective + (1.0 - self.args.kd_ratio) * ce_sum
        loss = objective / normaliser
        # DDP averages gradients over processes while the normaliser already counts every
        # process's tokens, so scale back up (as Trainer and SFTTrainer do).
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())

        with torch.no_grad():
            agreements = (student_logits.argmax(-1) == teacher_logits.argmax(-1)) & supervised
            sums = torch.stack(
                [kd_sum.detach(), ce_sum.detach(), agreements.sum(), num_local]
            ).double()
        return loss, sums

    # ------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        # Every process calls log() at the same points, so this reduction cannot deadlock.
        sums = self.accelerator.reduce(self._metric_sums[mode], reduction="sum")
        kd_sum, ce_sum, agreements, num_tokens = sums.tolist()  # read before the reset below
        self._metric_sums[mode].zero_()
        if num_tokens > 0:
            metrics = {
                "kd_loss": kd_sum / num_tokens,
                "ce_loss": ce_sum / num_tokens,
                "teacher_agreement": agreements / num_tokens,
            }
            if self.args.divergence == "ab":
                metrics.update(self._last_divergence_params[mode])
            prefix = "eval_" if mode == "eval" else ""
            logs.update({f"{prefix}{key}": value for key, value in metrics.items()})
        super().log(logs, start_time)

    # ------------------------------------------------------------------ saving and the Hub

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
    ) -> None:
        """TRL's model card (tags, ABKD citation) plus a section on the distillation set-up."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        if not self.is_world_process_zero():
            return
        card_path = Path(self.args.output_dir) / "README.md"
        settings = {"Teacher": self._teacher_name, "Divergence": self.args.divergence}
        if self.args.divergence == "ab":
            settings.update(alpha=self.args.alpha, beta=self.args.beta)
            if self.args.alpha_end is not None:
                settings["alpha_end"] = self.args.alpha_end
            if self.args.beta_end is not None:
                settings["beta_end"] = self.args.beta_end
        elif self.args.divergence == "jsd":
            settings["jsd_beta"] = self.args.jsd_beta
        elif self.args.divergence in ("sfkl", "srkl"):
            settings["skew_lambda"] = self.args.skew_lambda
        settings.update(temperature=self.args.temperature, kd_ratio=self.args.kd_ratio)
        card_path.write_text(
            add_distillation_section(card_path.read_text(encoding="utf-8"), settings), "utf-8"
        )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the student (never the teacher) and, when called by the user, its model card."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if _internal_call or not self.args.should_save:
            return  # checkpoints and push_to_hub write the card themselves
        output_dir = output_dir or self.args.output_dir
        self.create_model_card(model_name=Path(output_dir).name)
        card_path = Path(self.args.output_dir) / "README.md"
        if Path(output_dir).resolve() != Path(self.args.output_dir).resolve():
            shutil.copyfile(card_path, Path(output_dir) / "README.md")


def _next_token_targets(batch: dict[str, Any]) -> torch.Tensor:
    """``(batch, seq)``: the token each position predicts, ``-100`` where none is supervised.

    ``labels`` shifted left by one with ``-100`` appended (a collator's ready-made
    ``shift_labels`` are used as they are). Aligned with the logits, so these need no slicing.
    """
    if "shift_labels" in batch:
        return batch["shift_labels"]
    if "labels" not in batch:
        raise ValueError(
            "ABKDTrainer needs `labels` in every batch (-100 where a token is not supervised); "
            f"the batch has {sorted(batch)}. Use SFTTrainer's dataset preparation or a collator "
            "that builds labels."
        )
    return F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)


def _as_abkd_config(args: ABKDConfig | TrainingArguments | None, model: Any) -> ABKDConfig:
    """Return ``args`` as an ABKDConfig (SFTTrainer does the same for SFTConfig)."""
    if args is None:
        model_name = model if isinstance(model, str) else get_config_model_id(model.config)
        return ABKDConfig(f"{str(model_name).split('/')[-1]}-ABKD")
    if isinstance(args, ABKDConfig):
        return args
    if isinstance(args, TrainingArguments):
        dict_args = args.to_dict()
        dict_args["hub_token"] = args.hub_token  # to_dict hides it
        return ABKDConfig(**dict_args)
    raise TypeError(
        f"`args` must be an ABKDConfig or TrainingArguments, got {type(args).__name__}."
    )
