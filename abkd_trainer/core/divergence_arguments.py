"""The divergence fields shared by every ABKD configuration, and their checks.

[`ABKDConfig`][abkd_trainer.lm.config.ABKDConfig] (causal LMs) and the classifier configuration
both inherit `DivergenceArguments`, so that the divergence, its parameters, the (alpha, beta)
warm-up and schedule and the temperature have one name, one default, one help text and one
validation everywhere. The distillation objective
([`DistillationObjective.from_config`][abkd_trainer.core.objective.DistillationObjective.from_config])
reads them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from abkd_trainer.core.validation import require_finite, require_unit_interval


@dataclass
class DivergenceArguments:
    """The distillation divergence and its parameters.

    A mixin for `transformers.TrainingArguments` subclasses; list it *before* the
    `TrainingArguments` base so that its fields follow the base's in `--help`, and call
    `validate_divergence_arguments()` from `__post_init__`. A configuration that inherits it
    documents these fields in the same two groups, with the same entries (a subclass may change
    a default and say so).

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
    """

    alpha: float = field(
        default=0.2,
        metadata={
            "help": "Alpha of the alpha-beta divergence (hardness-concentration). (alpha, beta) "
            "= (1, 0) is forward KL, (0, 1) reverse KL; the paper's GPT-2 recipe is "
            "(0.2, 0.7)."
        },
    )
    beta: float = field(
        default=0.7,
        metadata={"help": "Beta of the alpha-beta divergence (confidence-concentration)."},
    )
    alpha_end: float | None = field(
        default=None,
        metadata={
            "help": "If set, alpha moves linearly from `alpha` to this value over the training "
            "steps. Only for `divergence='ab'`."
        },
    )
    beta_end: float | None = field(
        default=None,
        metadata={
            "help": "If set, beta moves linearly from `beta` to this value over the training "
            "steps. Only for `divergence='ab'`."
        },
    )
    ab_warmup_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Warm-up of the alpha-beta divergence: the fraction of the training steps over "
            "which (alpha, beta) moves in a straight line from (`ab_warmup_start_alpha`, "
            "`ab_warmup_start_beta`), forward KL by default, to (`alpha`, `beta`), then holds. It "
            "keeps mode-seeking settings such as (0.2, 0.7) from collapsing a student that does "
            "not yet overlap the teacher. None (default): 1.0, the whole run, or 0 when "
            "`alpha_end` / `beta_end` are set (they then define the path). 0 disables it. Only "
            "for `divergence='ab'`."
        },
    )
    ab_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "Number of warm-up steps of the alpha-beta divergence; overrides "
            "`ab_warmup_ratio` when > 0."
        },
    )
    ab_warmup_start_alpha: float = field(
        default=1.0,
        metadata={"help": "Alpha at step 0 of the warm-up (1 with beta 0 is forward KL)."},
    )
    ab_warmup_start_beta: float = field(
        default=0.0,
        metadata={"help": "Beta at step 0 of the warm-up."},
    )
    ab_warmup_shape: str = field(
        default="linear",
        metadata={
            "help": "Speed along the warm-up path: 'linear' (constant) or 'cosine' (half-cosine "
            "ease, slow at both ends)."
        },
    )
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Softmax temperature applied to both teacher and student logits inside the "
            "divergence. The loss is not multiplied by temperature**2."
        },
    )
    divergence: str = field(
        default="ab",
        metadata={
            "help": "Distillation divergence: 'ab' (alpha-beta, ABKD), 'fkl', 'rkl', 'jsd', "
            "'sfkl', 'srkl' or 'tvd'."
        },
    )
    jsd_beta: float = field(
        default=0.5,
        metadata={
            "help": "Beta of `divergence='jsd'`, in [0, 1]: 0 is forward KL, 1 is reverse KL "
            "(TRL convention)."
        },
    )
    skew_lambda: float = field(
        default=0.1,
        metadata={"help": "Skew coefficient of `divergence='sfkl'` and `'srkl'`, in [0, 1]."},
    )

    def validate_divergence_arguments(self) -> None:
        """Check the fields above.

        Raises:
            ValueError: naming the first field that is out of range, with what it accepts.
        """
        from abkd_trainer.divergences.registry import DIVERGENCE_NAMES, divergence_spec

        for name in ("alpha", "beta"):
            require_finite(name, getattr(self, name))
        for name in ("alpha_end", "beta_end"):
            if getattr(self, name) is not None:
                require_finite(name, getattr(self, name))
        self._validate_ab_warmup()
        temperature = require_finite("temperature", self.temperature)
        if temperature <= 0:
            raise ValueError(f"`temperature` must be > 0, got {self.temperature}.")
        for name in ("jsd_beta", "skew_lambda"):
            require_unit_interval(name, getattr(self, name))
        if self.divergence not in DIVERGENCE_NAMES:
            raise ValueError(
                f"`divergence` must be one of {', '.join(DIVERGENCE_NAMES)}, "
                f"got {self.divergence!r}."
            )
        scheduled = divergence_spec(self.divergence).scheduled
        if not scheduled and (self.alpha_end is not None or self.beta_end is not None):
            raise ValueError(
                f"`alpha_end` / `beta_end` schedule the alpha-beta divergence, but `divergence` is "
                f"{self.divergence!r}. Set `divergence='ab'` or leave them unset."
            )

    def _validate_ab_warmup(self) -> None:
        from abkd_trainer.core.schedules import WARMUP_SHAPES

        ratio = self.ab_warmup_ratio
        if ratio is not None and not 0.0 <= require_finite("ab_warmup_ratio", ratio) <= 1.0:
            raise ValueError(
                f"`ab_warmup_ratio` must be in [0, 1] (a fraction of the training steps), got "
                f"{ratio}. Use `ab_warmup_steps` for a number of steps, 0 to disable the warm-up."
            )
        steps = self.ab_warmup_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(
                f"`ab_warmup_steps` must be a non-negative integer (0: use `ab_warmup_ratio`), "
                f"got {steps!r}."
            )
        for name in ("ab_warmup_start_alpha", "ab_warmup_start_beta"):
            require_finite(name, getattr(self, name))
        if self.ab_warmup_shape not in WARMUP_SHAPES:
            raise ValueError(
                f"`ab_warmup_shape` must be one of {', '.join(map(repr, WARMUP_SHAPES))}, got "
                f"{self.ab_warmup_shape!r}."
            )
