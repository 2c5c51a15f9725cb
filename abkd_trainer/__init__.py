"""Knowledge distillation with the alpha-beta divergence (ABKD, Wang et al., ICML 2025).

Public names are imported lazily so that `import abkd_trainer` (and the CLI's `--help`)
does not pay for importing `trl` and `transformers` until a trainer is actually used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> submodule that defines it
_LAZY_EXPORTS: dict[str, str] = {
    "ab_divergence": "abkd_trainer.divergences",
    "forward_kl": "abkd_trainer.divergences",
    "reverse_kl": "abkd_trainer.divergences",
    "generalized_jsd": "abkd_trainer.divergences",
    "skew_forward_kl": "abkd_trainer.divergences",
    "skew_reverse_kl": "abkd_trainer.divergences",
    "total_variation": "abkd_trainer.divergences",
    "get_divergence": "abkd_trainer.divergences",
    "DIVERGENCE_NAMES": "abkd_trainer.divergences",
    "fused_linear_ab_divergence": "abkd_trainer.divergences.fused_linear",
    "fused_linear_divergence": "abkd_trainer.divergences.fused_linear",
    "coarsened_divergence": "abkd_trainer.divergences.coarsened",
    "fused_linear_coarsened_divergence": "abkd_trainer.divergences.coarsened",
    "cache_teacher": "abkd_trainer.lm.teacher_cache",
    "ABKDConfig": "abkd_trainer.lm.config",
    "ABKDTrainer": "abkd_trainer.lm.trainer",
    "ABKDClassifierConfig": "abkd_trainer.classification.config",
    "ABKDClassifierTrainer": "abkd_trainer.classification.trainer",
    "rouge_l_evaluate": "abkd_trainer.lm.evaluation",
    "RougeLCallback": "abkd_trainer.lm.evaluation",
    "mass_allocation": "abkd_trainer.tools.mass_allocation",
    "plot_mass_allocation": "abkd_trainer.tools.mass_allocation",
    "run_sweep": "abkd_trainer.tools.sweep",
    "SweepArguments": "abkd_trainer.tools.sweep",
    "CollapseGuardCallback": "abkd_trainer.core.collapse_guard",
}

__all__ = sorted(_LAZY_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover - for static analysers only
    from abkd_trainer.classification.config import ABKDClassifierConfig
    from abkd_trainer.classification.trainer import ABKDClassifierTrainer
    from abkd_trainer.core.collapse_guard import CollapseGuardCallback
    from abkd_trainer.divergences import (
        DIVERGENCE_NAMES,
        ab_divergence,
        forward_kl,
        generalized_jsd,
        get_divergence,
        reverse_kl,
        skew_forward_kl,
        skew_reverse_kl,
        total_variation,
    )
    from abkd_trainer.divergences.coarsened import (
        coarsened_divergence,
        fused_linear_coarsened_divergence,
    )
    from abkd_trainer.divergences.fused_linear import (
        fused_linear_ab_divergence,
        fused_linear_divergence,
    )
    from abkd_trainer.lm.config import ABKDConfig
    from abkd_trainer.lm.evaluation import RougeLCallback, rouge_l_evaluate
    from abkd_trainer.lm.teacher_cache import cache_teacher
    from abkd_trainer.lm.trainer import ABKDTrainer
    from abkd_trainer.tools.mass_allocation import mass_allocation, plot_mass_allocation
    from abkd_trainer.tools.sweep import SweepArguments, run_sweep


def __getattr__(name: str) -> Any:
    module_name = _LAZY_EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'abkd_trainer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # cache: later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__
