"""The offline classifier demo: 8x8 digits, a shipped ResNet teacher, a tiny ViT student.

`abkd-train-classifier` with no model, teacher or dataset arguments distils the teacher shipped in
`abkd_trainer/demo_assets/digits/teacher/` (a 97k-parameter ResNet trained with cross-entropy by
`scripts/train_digits_teacher.py`, 97.5% held-out accuracy) into a freshly initialised ViT of
18k parameters (another architecture, about 5x smaller) on the training split of scikit-learn's
digits (converted by `scripts/build_digits_assets.py`; CC BY 4.0), then compares teacher, student
before and student after by top-1 accuracy on the held-out split. Nothing is downloaded and
scikit-learn is not needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import DatasetDict
    from transformers import PretrainedConfig, PreTrainedModel

DEMO_DIGITS_DIR = Path(__file__).resolve().parents[1] / "demo_assets" / "digits"
DEMO_TEACHER_DIR = DEMO_DIGITS_DIR / "teacher"
DEMO_DATA_FILES = {"train": "train.parquet", "test": "test.parquet"}
DEMO_DATASET_NAME = (
    "8x8 handwritten digits (scikit-learn / UCI, CC BY 4.0; shipped in "
    "abkd_trainer/demo_assets/digits)"
)
# How the model card names the data (a name, not a path: the card shows its last component).
DEMO_DATASET_CARD_NAME = "sklearn-digits-8x8"

# The student: a ViT on 2x2 patches (16 tokens), 2 layers of width 32: 18k parameters against the
# teacher's 97k, and a different architecture (attention instead of convolutions).
DEMO_STUDENT_CONFIG: dict[str, Any] = {
    "image_size": 8,
    "patch_size": 2,
    "num_channels": 1,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
}
DEMO_STUDENT_SEED = 0

# Defaults of the CLI arguments in demo mode; a YAML config or the command line overrides them.
# 1000 steps of 64 images (about 45 epochs of the 1438 training images): about 30 s of training on
# one core, within 0.5 points of the 1500-step accuracy.
DEMO_DEFAULTS: dict[str, Any] = {
    "output_dir": "abkd-classifier-demo-output",
    "overwrite_output_dir": True,  # each demo run replaces the previous one's output
    "teacher_model_name_or_path": str(DEMO_TEACHER_DIR),
    "max_steps": 1000,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 128,
    "learning_rate": 3e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 50,
    "weight_decay": 0.01,
    "logging_steps": 50,
    "eval_strategy": "steps",
    "eval_steps": 100,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 0,
    "dataloader_num_workers": 0,
}


def demo_assets_present() -> bool:
    """Whether the shipped teacher, its image processor and the data files are all there."""
    required = [
        DEMO_TEACHER_DIR / name
        for name in ("model.safetensors", "config.json", "preprocessor_config.json")
    ]
    required += [DEMO_DIGITS_DIR / name for name in DEMO_DATA_FILES.values()]
    return all(path.is_file() for path in required)


def require_demo_assets() -> None:
    """Raise unless the demo's files are there.

    Raises:
        FileNotFoundError: naming the folder and the scripts that rebuild it.
    """
    if not demo_assets_present():
        raise FileNotFoundError(
            f"The classifier demo assets are missing from {DEMO_DIGITS_DIR}. Rebuild them from a "
            "source checkout with `scripts/build_digits_assets.py` (data) and "
            "`scripts/train_digits_teacher.py` (teacher), or reinstall the package."
        )


def load_demo_dataset() -> DatasetDict:
    """The digits with `train` (1438) and `test` (359) splits: `image` (8x8 grayscale PIL) and
    `label` (`ClassLabel` "0".."9")."""
    from datasets import load_dataset

    require_demo_assets()
    data_files = {split: str(DEMO_DIGITS_DIR / name) for split, name in DEMO_DATA_FILES.items()}
    return load_dataset("parquet", data_files=data_files)


def load_demo_image_processor() -> Any:
    """The teacher's (and student's) image processor: 8x8, [0, 255] -> [-1, 1], PIL backend."""
    from transformers import AutoImageProcessor

    require_demo_assets()
    return AutoImageProcessor.from_pretrained(str(DEMO_TEACHER_DIR), backend="pil")


def build_demo_student_config(teacher_config: PretrainedConfig) -> PretrainedConfig:
    """The student's ViT config, with the teacher's classes (`id2label` / `label2id`)."""
    from transformers import ViTConfig

    return ViTConfig(
        **DEMO_STUDENT_CONFIG,
        num_labels=teacher_config.num_labels,
        id2label=dict(teacher_config.id2label),
        label2id=dict(teacher_config.label2id),
    )


def build_demo_student(
    teacher_config: PretrainedConfig, seed: int = DEMO_STUDENT_SEED
) -> PreTrainedModel:
    """A freshly initialised (seeded) ViT student for the demo teacher's classes."""
    import torch
    from transformers import ViTForImageClassification

    config = build_demo_student_config(teacher_config)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ViTForImageClassification(config)


def describe_student(model: PreTrainedModel) -> str:
    """A one-line description for the report: architecture, sizes and parameter count."""
    config = model.config
    sizes = ", ".join(
        f"{key}={getattr(config, key)}"
        for key in ("hidden_size", "num_hidden_layers", "patch_size")
        if hasattr(config, key)
    )
    parameters = sum(parameter.numel() for parameter in model.parameters())
    return f"{type(model).__name__}, random init ({sizes}, {parameters / 1e3:.1f}k params)"
