"""Offline factories for the classifier tests: tiny image, text and audio classifiers and data.

Every model is a random initialisation of a real transformers architecture built from its config
(no network, no weights on disk); the same seed gives the same weights. Teachers are built with a
larger `initializer_range` so that their class distributions are peaked and their top-1 choice
means something. Importable from any test in `tests/classification/`
(`from classifier_factories import ...`); keep the names stable, other test files use them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from datasets import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    PreTrainedModel,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    Wav2Vec2Config,
    Wav2Vec2ForSequenceClassification,
)

NUM_LABELS = 4
IMAGE_SIZE = 8
NUM_CHANNELS = 1
CLASS_NAMES = ("zero", "one", "two", "three")
TEACHER_INIT_RANGE = 0.5


def label_maps(names: Sequence[str] | None) -> dict[str, Any]:
    """`id2label` / `label2id` config keyword arguments for class `names` (None: none)."""
    if names is None:
        return {}
    return {
        "id2label": dict(enumerate(names)),
        "label2id": {name: index for index, name in enumerate(names)},
    }


def _seeded(build, seed: int) -> PreTrainedModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.float()


def build_vit_classifier(
    *,
    num_labels: int = NUM_LABELS,
    class_names: Sequence[str] | None = CLASS_NAMES,
    hidden_size: int = 32,
    num_layers: int = 2,
    seed: int = 1,
    initializer_range: float = TEACHER_INIT_RANGE,
    image_size: int = IMAGE_SIZE,
    **config_overrides: Any,
) -> ViTForImageClassification:
    """A ViT image classifier on `(B, 1, 8, 8)` images (patch 4: 4 patches), the usual teacher
    (`config_overrides` go to `ViTConfig`, e.g. `qkv_bias=False`)."""
    config = ViTConfig(
        image_size=image_size,
        patch_size=4,
        num_channels=NUM_CHANNELS,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden_size,
        num_labels=num_labels,
        initializer_range=initializer_range,
        **label_maps(class_names),
        **config_overrides,
    )
    return _seeded(lambda: ViTForImageClassification(config), seed)


def build_resnet_classifier(
    *,
    num_labels: int = NUM_LABELS,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
) -> ResNetForImageClassification:
    """A two-stage ResNet on `(B, 1, 8, 8)` images (no class names by default: a new student)."""
    config = ResNetConfig(
        num_channels=NUM_CHANNELS,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        downsample_in_first_stage=False,
        num_labels=num_labels,
        **label_maps(class_names),
    )
    return _seeded(lambda: ResNetForImageClassification(config), seed)


def build_mobilenet_classifier(
    *, num_labels: int = NUM_LABELS, class_names: Sequence[str] | None = None, seed: int = 0
) -> MobileNetV2ForImageClassification:
    """A narrow MobileNetV2 on `(B, 1, 8, 8)` images."""
    config = MobileNetV2Config(
        num_channels=NUM_CHANNELS,
        image_size=IMAGE_SIZE,
        depth_multiplier=0.25,
        min_depth=4,
        num_labels=num_labels,
        **label_maps(class_names),
    )
    return _seeded(lambda: MobileNetV2ForImageClassification(config), seed)


def build_bert_classifier(
    *,
    vocab_size: int,
    num_labels: int = NUM_LABELS,
    class_names: Sequence[str] | None = CLASS_NAMES,
    hidden_size: int = 32,
    num_layers: int = 2,
    seed: int = 0,
    initializer_range: float = 0.02,
    pad_token_id: int = 0,
    **config_overrides: Any,
) -> BertForSequenceClassification:
    """A tiny BERT sequence classifier for the vocabulary of `vocab_size` tokens
    (`config_overrides` go to `BertConfig`, e.g. `hidden_dropout_prob=0.0`)."""
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=128,
        num_labels=num_labels,
        initializer_range=initializer_range,
        pad_token_id=pad_token_id,
        **label_maps(class_names),
        **config_overrides,
    )
    return _seeded(lambda: BertForSequenceClassification(config), seed)


def build_wav2vec2_classifier(
    *, num_labels: int = NUM_LABELS, class_names: Sequence[str] | None = CLASS_NAMES, seed: int = 0
) -> Wav2Vec2ForSequenceClassification:
    """A tiny Wav2Vec2 audio classifier on raw `(B, T)` waveforms (T >= 400 samples)."""
    config = Wav2Vec2Config(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8, 8),
        conv_stride=(5, 4),
        conv_kernel=(10, 8),
        num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2,
        classifier_proj_size=8,
        num_labels=num_labels,
        do_stable_layer_norm=False,
        feat_extract_norm="group",
        **label_maps(class_names),
    )
    return _seeded(lambda: Wav2Vec2ForSequenceClassification(config), seed)


def build_image_dataset(
    num_examples: int = 16,
    *,
    num_labels: int = NUM_LABELS,
    seed: int = 0,
    with_labels: bool = True,
) -> Dataset:
    """Random `(1, 8, 8)` `pixel_values` with a `label` column (labels cycle through classes)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(num_examples, NUM_CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    columns: dict[str, Any] = {"pixel_values": pixels.tolist()}
    if with_labels:
        columns["label"] = [index % num_labels for index in range(num_examples)]
    return Dataset.from_dict(columns)


TEXTS = (
    "a cat sat",
    "dogs bark at night",
    "the sun is hot",
    "rain again today",
    "blue sky",
    "four small birds sing",
    "one more time",
    "green grass grows fast",
)


def build_text_classification_dataset(
    tokenizer: Any, num_examples: int = 8, *, num_labels: int = NUM_LABELS, prefix: str = ""
) -> Dataset:
    """Tokenised sentences of different lengths (`input_ids`, `attention_mask`) and a `label`.

    `prefix="teacher_"` names the token columns for a teacher with its own tokenizer.
    """
    texts = [TEXTS[index % len(TEXTS)] for index in range(num_examples)]
    encoded = tokenizer(texts)
    return Dataset.from_dict(
        {
            f"{prefix}input_ids": encoded["input_ids"],
            f"{prefix}attention_mask": encoded["attention_mask"],
            "label": [index % num_labels for index in range(num_examples)],
        }
    )


def classifier_training_kwargs(output_dir: Any, **overrides: Any) -> dict[str, Any]:
    """CPU-safe `ABKDClassifierConfig` arguments for short test runs (fp32, no reporting)."""
    return {
        "output_dir": str(output_dir),
        "use_cpu": True,
        "report_to": "none",
        "disable_tqdm": True,
        "save_strategy": "no",
        "dataloader_num_workers": 0,
        "seed": 0,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "max_steps": 2,
        "logging_steps": 1,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        **overrides,
    }


def build_image_trainer(
    output_dir: Any,
    *,
    student: Any = None,
    teacher: Any = None,
    train_dataset: Dataset | None = None,
    eval_dataset: Dataset | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    **config_overrides: Any,
) -> Any:
    """An `ABKDClassifierTrainer` distilling a ViT teacher into a ResNet student on random
    images; every piece can be overridden."""
    from abkd_trainer import ABKDClassifierConfig, ABKDClassifierTrainer

    return ABKDClassifierTrainer(
        model=None
        if "model_init" in (trainer_kwargs or {})
        else build_resnet_classifier()
        if student is None
        else student,
        teacher_model=build_vit_classifier() if teacher is None else teacher,
        args=ABKDClassifierConfig(**classifier_training_kwargs(output_dir, **config_overrides)),
        train_dataset=build_image_dataset() if train_dataset is None else train_dataset,
        eval_dataset=eval_dataset,
        **(trainer_kwargs or {}),
    )


def build_reversed_byte_tokenizer() -> Any:
    """A byte-level tokenizer like `testing_utils.build_tiny_tokenizer` whose byte ids run
    backwards (byte symbol `i` has id `255 - i`): the same text gets other ids, as with a
    teacher that has its own vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: len(byte_symbols) - 1 - index for index, symbol in enumerate(byte_symbols)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>")
    tokenizer.model_max_length = 128
    return tokenizer
