"""The offline demo: the teacher, tokenizer and dataset shipped in `demo_assets/`.

`abkd-train` with no model or dataset arguments distils the shipped teacher (a 0.9M-parameter
Llama trained on a synthetic instruction task by `scripts/build_demo_assets.py`) into a
freshly initialised 8x smaller student on CPU, then compares teacher, student before and
student after by ROUGE-L on held-out prompts. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from datasets import DatasetDict
    from transformers import PretrainedConfig, PreTrainedModel

DEMO_ASSETS_DIR = Path(__file__).resolve().parents[1] / "demo_assets"
DEMO_TEACHER_DIR = DEMO_ASSETS_DIR / "teacher"
DEMO_DATA_FILES = {"train": "train.jsonl", "test": "test.jsonl"}
DEMO_DATASET_NAME = "abkd-demo (synthetic, shipped in abkd_trainer/demo_assets)"

# The student: same vocabulary and architecture family as the teacher, 2 layers of width 64
# instead of 4 of width 128 (about 8x fewer parameters), randomly initialised.
DEMO_STUDENT_SIZES: dict[str, int] = {
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
DEMO_STUDENT_SEED = 0

# Defaults of the CLI arguments in demo mode; a YAML config or the command line overrides them.
# The budget is sized so that every run converges: with 64 sequences per step the student's
# held-out ROUGE-L is within 1.5 points of its final score by step 600 of 1000 for every training
# seed and loss path (README, "Demo results"); 32 per step left some seeds still climbing at step
# 1000, 3.95 points apart. The whole demo takes 4-5 minutes on one CPU core of a busy machine.
DEMO_DEFAULTS: dict[str, Any] = {
    "output_dir": "abkd-demo-output",
    "overwrite_output_dir": True,  # each demo run replaces the previous one's output
    "teacher_model_name_or_path": str(DEMO_TEACHER_DIR),
    # The paper's LLM setting. From this random initialisation it collapses onto wrong tokens
    # without the warm-up from forward KL (ab_warmup_ratio, on by default; see
    # docs/collapse-and-warmup.md).
    "alpha": 0.2,
    "beta": 0.7,
    "max_steps": 1000,
    "per_device_train_batch_size": 64,
    "learning_rate": 3e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 30,
    "weight_decay": 0.01,
    "logging_steps": 25,
    "max_length": 64,
    "save_strategy": "no",
    # Evaluate (loss and ROUGE-L, about a second each here) ten times for the learning curve.
    "eval_strategy": "steps",
    "eval_steps": 100,
    "per_device_eval_batch_size": 64,
    "report_to": "none",
    "bf16": False,  # SFTConfig defaults to bf16; the demo runs in fp32 on any device
    "gradient_checkpointing": False,  # SFTConfig's default; only slows a model this small
    "seed": 0,
    "rouge_l_eval": True,
    "rouge_l_num_prompts": 100,
    "rouge_l_max_new_tokens": 24,
    "dataloader_num_workers": 0,
}


def demo_assets_present() -> bool:
    """Whether the shipped teacher, tokenizer and dataset files are all there."""
    required = [DEMO_TEACHER_DIR / "model.safetensors", DEMO_TEACHER_DIR / "tokenizer.json"]
    required += [DEMO_ASSETS_DIR / name for name in DEMO_DATA_FILES.values()]
    return all(path.is_file() for path in required)


def require_demo_assets() -> None:
    if not demo_assets_present():
        raise FileNotFoundError(
            f"The demo assets are missing from {DEMO_ASSETS_DIR}. Rebuild them with "
            "`python scripts/build_demo_assets.py` from a source checkout, or reinstall the "
            "package."
        )


def load_demo_dataset() -> DatasetDict:
    """The demo's `prompt`/`completion` dataset with `train` and `test` splits."""
    from datasets import load_dataset

    require_demo_assets()
    data_files = {split: str(DEMO_ASSETS_DIR / name) for split, name in DEMO_DATA_FILES.items()}
    return load_dataset("json", data_files=data_files)


def limit_cpu_threads_for_demo() -> None:
    """Use one intra-op CPU thread unless the user chose a number (`OMP_NUM_THREADS`).

    The demo's matrices are 64-128 wide: splitting them over threads costs more in
    synchronisation than it saves, and on shared cores it is several times slower (measured
    on 2 busy cores: 60 ms per training step with one thread, 370 ms with two).
    """
    import os

    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def build_demo_student_config(teacher_config: PretrainedConfig) -> PretrainedConfig:
    """The teacher's config with the student's (smaller) sizes: same vocabulary and tokens."""
    config = teacher_config.__class__.from_dict(teacher_config.to_dict())
    for name, value in DEMO_STUDENT_SIZES.items():
        setattr(config, name, value)
    config.name_or_path = ""
    return config


def build_demo_student(
    teacher_config: PretrainedConfig, seed: int = DEMO_STUDENT_SEED
) -> PreTrainedModel:
    """A freshly initialised (seeded) student for the demo teacher."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = build_demo_student_config(teacher_config)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        student = AutoModelForCausalLM.from_config(config)
    student.generation_config = GenerationConfig.from_model_config(config)
    return student
