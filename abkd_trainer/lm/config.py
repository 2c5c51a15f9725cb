"""Training arguments for [`ABKDTrainer`][abkd_trainer.lm.trainer.ABKDTrainer]."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trl import SFTConfig

from abkd_trainer.core.divergence_arguments import DivergenceArguments
from abkd_trainer.core.validation import (
    require_finite,
    require_positive_int,
    require_unit_interval,
)

ON_POLICY_SCHEDULES = ("constant", "adaptive")


@dataclass
class ABKDConfig(DivergenceArguments, SFTConfig):
    r"""Configuration for [`ABKDTrainer`][abkd_trainer.lm.trainer.ABKDTrainer]: SFT arguments plus
    the distillation objective.

    The loss on the supervised tokens (`labels != -100`, next-token shifted) is

        kd_ratio * D(teacher || student) + (1 - kd_ratio) * cross_entropy(student, labels)

    where `D` is the divergence named by `divergence` (the alpha-beta divergence of ABKD,
    Wang et al., ICML 2025, by default), summed over tokens and divided by the number of
    supervised tokens in the whole accumulated, all-rank batch. `temperature` divides both logit
    sets inside `D` only; the loss is not multiplied by `temperature**2`. Every SFT and Trainer
    argument of TRL's `SFTConfig` applies too; the fields below are the ones ABKD adds, in groups.

    Parameters: Distillation objective
        divergence: the divergence `D`, one of `abkd_trainer.DIVERGENCE_NAMES`: `"ab"` (the
            alpha-beta divergence of ABKD), `"fkl"`, `"rkl"`, `"jsd"`, `"sfkl"`, `"srkl"` or
            `"tvd"`.
        alpha: alpha of the alpha-beta divergence (hardness-concentration). `(alpha, beta)` =
            `(1, 0)` is forward KL, `(0, 1)` reverse KL; `(0.2, 0.7)` is the paper's GPT-2 recipe.
        beta: beta of the alpha-beta divergence (confidence-concentration).
        jsd_beta: beta of `divergence="jsd"`, in [0, 1] (TRL convention: 0 is forward KL, 1 is
            reverse KL).
        skew_lambda: skew coefficient of `divergence="sfkl"` and `"srkl"`, in [0, 1].
        temperature: softmax temperature of both logit sets inside `D` (no `temperature**2`
            factor).
        kd_ratio: weight of the divergence, in [0, 1]; `1 - kd_ratio` weights the student's
            cross-entropy on the same tokens. 1.0 is pure distillation.

    Parameters: Schedule of alpha and beta
        alpha_end: when set, alpha moves linearly from `alpha` (reached at the end of the
            warm-up) to this value over the remaining training steps; None keeps it constant.
            Like every field of this group, only for `divergence="ab"`.
        beta_end: when set, beta moves linearly from `beta` to this value in the same way.
        ab_warmup_ratio: length of the warm-up, as a fraction of the training steps: `(alpha,
            beta)` starts at `(ab_warmup_start_alpha, ab_warmup_start_beta)` and reaches the
            configured values in a straight line, then holds (or follows `alpha_end` /
            `beta_end`). It keeps mode-seeking settings such as `(0.2, 0.7)` from collapsing a
            student that does not yet overlap the teacher. None means 1.0, the whole run
            (measured best on the demo, see [Collapse and the warm-up][collapse-and-the-warm-up]),
            or 0 when `alpha_end` / `beta_end` are set; 0 disables it. The schedules are in
            `abkd_trainer.core.schedules`.
        ab_warmup_steps: the warm-up's length in steps; when > 0 it overrides `ab_warmup_ratio`.
        ab_warmup_start_alpha: alpha at the warm-up's start (1 with beta 0 is forward KL).
        ab_warmup_start_beta: beta at the warm-up's start.
        ab_warmup_shape: speed along the warm-up path: `"linear"` (constant) or `"cosine"`
            (half-cosine ease, slow at both ends).

    Parameters: Teacher
        teacher_model_name_or_path: name or path of the teacher to load when the trainer is not
            given one.
        teacher_model_init_kwargs: keyword arguments of `AutoModelForCausalLM.from_pretrained`
            for a teacher given by name, e.g. `{"dtype": "bfloat16"}` (a JSON string on the
            command line).
        teacher_cache: directory of a teacher cache written by `abkd-cache-teacher` (or
            [`cache_teacher`][abkd_trainer.lm.teacher_cache.writer.cache_teacher]) for this
            dataset and preprocessing. No teacher is loaded; the divergence is that of the
            coarsened distributions (the teacher's k cached tokens plus a tail bucket, the student
            coarsened onto the same buckets), equal to the full one when k covers the vocabulary.
            Not with `teacher_model_name_or_path`, nor with sampled completions.

    Parameters: Loss computation
        loss_chunk_size: tokens per chunk of the divergence kernel (bounds its fp32
            temporaries); None picks one from the vocabulary size.
        use_fused_loss: compute the loss from both models' final hidden states and LM heads, a
            chunk of tokens at a time, so that neither model's `(batch, seq, vocab)` logits exist
            ([`fused_linear_divergence`][abkd_trainer.divergences.fused_linear.fused_linear_divergence]).
            Same values, less memory and time (measured on CPU, vocab 32000, 2048 tokens per
            step: 4.5x less peak memory, 15% faster steps). Set it to False for a model whose
            logits are not a scaled or soft-capped linear head (checked at start-up, except under
            ZeRO-3), or to get the logits back in `compute_loss` outputs.
        disable_dropout: disable dropout in the student. The teacher always runs in eval mode.

    On-policy distillation (GKD, Agarwal et al. 2024; DistiLLM's adaptive schedule, Ko et al.
    2024; `abkd_trainer.lm.on_policy`) replaces the completions of a training micro-batch by ones
    the current student samples for the same prompts; the loss above is then computed on exactly
    the sampled tokens. It needs prompts (`prompt`/`completion` data, or conversational data with
    `assistant_only_loss=True`), and neither packing nor padding-free batches.

    Parameters: On-policy distillation
        lmbda: probability, in [0, 1], that a micro-batch's completions are sampled from the
            current student (TRL's GKD name). 0 with the constant schedule and no `seq_kd` is
            off-policy distillation on the dataset's completions.
        seq_kd: micro-batches that are not student-sampled use completions sampled from the
            teacher instead of the dataset's (sequence-level KD).
        on_policy_schedule: `"constant"` (probability `lmbda`) or `"adaptive"` (DistiLLM / the
            ABKD authors' code: the probability starts at `lmbda` and rises by `adaptive_step`
            whenever the evaluation loss exceeds its reference by `adaptive_loss_eps`; sampled
            sequences fill a replay buffer that later micro-batches reuse). `"adaptive"` needs an
            `eval_dataset` and an `eval_strategy`.
        adaptive_step: adaptive schedule: how much the sampling probability rises each time the
            evaluation loss worsens, in (0, 1] (the probability is capped at 1).
        adaptive_loss_eps: adaptive schedule: how far the evaluation loss must exceed its
            reference (the first evaluation's loss, or the loss at the latest rise) to raise the
            sampling probability.
        replay_buffer_size: adaptive schedule: student-sampled sequences kept per process for
            replay; micro-batches replay from it once it is full, and it restarts empty on resume.
        max_new_tokens: longest sampled completion, in tokens.
        generation_temperature: sampling temperature of the completions (`temperature` stays the
            loss temperature).
        generation_top_p: nucleus (top-p) sampling of the completions, in (0, 1].
        generation_top_k: top-k sampling of the completions; 0 disables it.
        generation_kwargs: further `transformers.GenerationConfig` arguments, e.g.
            `{"repetition_penalty": 1.1}`; they override the generation fields above.
        ds3_gather_for_generation: under DeepSpeed ZeRO-3, gather the sampling model's weights
            for generation (fast). False samples from the partitioned model, layer by layer
            (slow, for models too large to gather on one device).

    Parameters: Output directory
        overwrite_output_dir: start afresh in an `output_dir` that holds an earlier run:
            `train()` without `resume_from_checkpoint` deletes its `checkpoint-*` folders instead
            of warning, and `abkd-train` accepts the folder (the HF example-script flag, no
            longer part of `TrainingArguments`).
    """

    _VALID_DICT_FIELDS = SFTConfig._VALID_DICT_FIELDS + [
        "teacher_model_init_kwargs",
        "generation_kwargs",
    ]

    kd_ratio: float = field(
        default=1.0,
        metadata={
            "help": "Loss = kd_ratio * divergence + (1 - kd_ratio) * cross-entropy, on the same "
            "supervised tokens. 1.0 is pure distillation."
        },
    )
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Name or path of the teacher model, used when the trainer is not given a "
            "teacher."
        },
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `AutoModelForCausalLM.from_pretrained` when the "
            'teacher is given by name, e.g. \'{"dtype": "bfloat16"}\'.'
        },
    )
    teacher_cache: str | None = field(
        default=None,
        metadata={
            "help": "Directory of a teacher cache written by `abkd-cache-teacher` (the teacher's "
            "top-k log-probabilities on this dataset, with the same preprocessing). Training then "
            "loads no teacher: the divergence is computed between the teacher's k cached tokens "
            "plus one tail bucket and the student coarsened the same way (the full divergence "
            "when k covers the vocabulary)."
        },
    )
    loss_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per chunk when computing the divergence (bounds its fp32 "
            "temporaries). None picks a size from the vocabulary."
        },
    )
    use_fused_loss: bool = field(
        default=True,
        metadata={
            "help": "Compute the divergence, the cross-entropy and the logged metrics from both "
            "models' final hidden states and LM heads, a chunk of tokens at a time, without "
            "building either model's (batch, seq, vocab) logits. Same values, far less memory "
            "at large vocabularies. Needs linear LM heads (logit scaling and Gemma-style "
            "soft-capping are supported)."
        },
    )
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Whether to disable dropout in the student. The teacher always runs in eval "
            "mode."
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start afresh in an output_dir that holds checkpoints or a saved model of an "
            "earlier run: its checkpoint-* folders are deleted when training starts without "
            "`resume_from_checkpoint`. Without it, abkd-train refuses such a folder and "
            "`ABKDTrainer.train()` warns."
        },
    )
    lmbda: float = field(
        default=0.0,
        metadata={
            "help": "On-policy distillation: probability, in [0, 1], that a micro-batch's "
            "completions are sampled from the current student instead of taken from the dataset "
            "(TRL's GKD `lmbda`). 0 (with the constant schedule and no `seq_kd`) distils on the "
            "dataset's completions only. Needs prompts: prompt/completion data, or conversational "
            "data with `assistant_only_loss=True`."
        },
    )
    seq_kd: bool = field(
        default=False,
        metadata={
            "help": "Sequence-level KD: micro-batches that are not student-sampled use completions "
            "sampled from the teacher instead of the dataset's (TRL's GKD `seq_kd`)."
        },
    )
    on_policy_schedule: str = field(
        default="constant",
        metadata={
            "help": "How often micro-batches are student-sampled: 'constant' (probability "
            "`lmbda`) or 'adaptive' (DistiLLM's schedule, as in the ABKD authors' code: starts at "
            "`lmbda`, rises by `adaptive_step` whenever the evaluation loss worsens by more than "
            "`adaptive_loss_eps`, and replays student samples from a buffer). 'adaptive' needs "
            "an eval_dataset and an eval_strategy."
        },
    )
    adaptive_step: float = field(
        default=0.1,
        metadata={
            "help": "Adaptive schedule: how much the sampling probability rises each time the "
            "evaluation loss worsens (capped at 1)."
        },
    )
    adaptive_loss_eps: float = field(
        default=0.1,
        metadata={
            "help": "Adaptive schedule: the evaluation loss must exceed its reference (the first "
            "evaluation's loss, or the loss at the latest rise) by at least this much to raise "
            "the sampling probability."
        },
    )
    replay_buffer_size: int = field(
        default=1000,
        metadata={
            "help": "Adaptive schedule: student-sampled sequences kept (per process) for replay. "
            "Micro-batches replay from it only once it is full; it restarts empty on resume."
        },
    )
    max_new_tokens: int = field(
        default=128,
        metadata={"help": "Longest completion sampled for on-policy distillation, in tokens."},
    )
    generation_temperature: float = field(
        default=1.0,
        metadata={
            "help": "Sampling temperature of on-policy completions (separate from `temperature`, "
            "the loss temperature)."
        },
    )
    generation_top_p: float = field(
        default=1.0,
        metadata={"help": "Nucleus (top-p) sampling of on-policy completions, in (0, 1]."},
    )
    generation_top_k: int = field(
        default=0,
        metadata={"help": "Top-k sampling of on-policy completions; 0 disables it."},
    )
    generation_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Further `transformers.GenerationConfig` arguments for on-policy sampling, "
            "e.g. '{\"repetition_penalty\": 1.1}'. They override the generation fields above."
        },
    )
    ds3_gather_for_generation: bool = field(
        default=True,
        metadata={
            "help": "Under DeepSpeed ZeRO-3, gather the sampling model's weights for generation. "
            "False samples from the partitioned model (slow; for models too large to gather on "
            "one device)."
        },
    )

    def __post_init__(self) -> None:
        # Validate the distillation fields before the (slower) TrainingArguments set-up runs.
        self._validate_distillation_fields()
        super().__post_init__()
        for name in ("teacher_model_init_kwargs", "generation_kwargs"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise ValueError(
                    f"`{name}` must be a dict or a JSON object string, got "
                    f"{type(value).__name__}: {value!r}."
                )
        self._validate_on_policy_fields()

    @property
    def uses_sampled_completions(self) -> bool:
        """Whether training replaces dataset completions by sampled ones (on-policy or seq-KD)."""
        return self.lmbda > 0 or self.seq_kd or self.on_policy_schedule == "adaptive"

    def _validate_on_policy_fields(self) -> None:
        lmbda = require_finite("lmbda", self.lmbda)
        if not 0.0 <= lmbda <= 1.0:
            raise ValueError(f"`lmbda` must be in [0, 1], got {self.lmbda}.")
        if self.on_policy_schedule not in ON_POLICY_SCHEDULES:
            raise ValueError(
                f"`on_policy_schedule` must be one of {', '.join(ON_POLICY_SCHEDULES)}, got "
                f"{self.on_policy_schedule!r}."
            )
        step = require_finite("adaptive_step", self.adaptive_step)
        if not 0.0 < step <= 1.0:
            raise ValueError(f"`adaptive_step` must be in (0, 1], got {self.adaptive_step}.")
        if require_finite("adaptive_loss_eps", self.adaptive_loss_eps) < 0:
            raise ValueError(f"`adaptive_loss_eps` must be >= 0, got {self.adaptive_loss_eps}.")
        for name in ("replay_buffer_size", "max_new_tokens"):
            require_positive_int(name, getattr(self, name))
        if require_finite("generation_temperature", self.generation_temperature) <= 0:
            raise ValueError(
                f"`generation_temperature` must be > 0, got {self.generation_temperature}. "
                "(Greedy decoding: pass generation_kwargs='{\"do_sample\": false}'.)"
            )
        top_p = require_finite("generation_top_p", self.generation_top_p)
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"`generation_top_p` must be in (0, 1], got {self.generation_top_p}.")
        if (
            isinstance(self.generation_top_k, bool)
            or not isinstance(self.generation_top_k, int)
            or self.generation_top_k < 0
        ):
            raise ValueError(
                f"`generation_top_k` must be an integer >= 0 (0 disables it), got "
                f"{self.generation_top_k!r}."
            )
        for key in ("num_return_sequences", "return_dict_in_generate"):
            if key in (self.generation_kwargs or {}):
                raise ValueError(
                    f"`generation_kwargs` may not set {key!r}: on-policy distillation samples "
                    "one completion per prompt and reads the generated token ids."
                )
        if not self.uses_sampled_completions:
            return
        if self.packing or self.padding_free:
            raise ValueError(
                "On-policy distillation (`lmbda > 0`, `seq_kd` or the adaptive schedule) samples "
                "a completion for each prompt, which packed or padding-free batches do not keep "
                "apart. Set `packing=False` and `padding_free=False`."
            )
        if self.on_policy_schedule == "adaptive" and self.eval_strategy == "no":
            raise ValueError(
                "`on_policy_schedule='adaptive'` raises the sampling probability when the "
                "evaluation loss worsens, so it needs evaluations: set `eval_strategy` to "
                "'steps' or 'epoch' (and pass an eval_dataset), or use the constant schedule."
            )

    def _validate_distillation_fields(self) -> None:
        self.validate_divergence_arguments()
        require_unit_interval("kd_ratio", self.kd_ratio)
        if self.teacher_cache is not None and self.teacher_model_name_or_path is not None:
            raise ValueError(
                "Set either `teacher_cache` (train from a cache written by abkd-cache-teacher) or "
                "`teacher_model_name_or_path` (run the teacher live), not both."
            )
        # On-policy and sequence-level distillation need the teacher on text that does not exist
        # when the cache is written.
        if self.teacher_cache is not None and self.uses_sampled_completions:
            on_policy = {
                "lmbda": self.lmbda,
                "seq_kd": self.seq_kd,
                "on_policy_schedule": self.on_policy_schedule,
            }
            raise ValueError(
                f"A teacher cache holds the teacher on the dataset's fixed completions only, but "
                f"{on_policy} asks for on-policy / sequence-level distillation, which needs the "
                "teacher on newly generated text. Train with a live teacher "
                "(`teacher_model_name_or_path`), or set lmbda=0, seq_kd=False and "
                "on_policy_schedule='constant'."
            )
        if self.loss_chunk_size is not None and (
            isinstance(self.loss_chunk_size, bool)
            or not isinstance(self.loss_chunk_size, int)
            or self.loss_chunk_size < 1
        ):
            raise ValueError(
                "`loss_chunk_size` must be a positive integer or None, "
                f"got {self.loss_chunk_size!r}."
            )
