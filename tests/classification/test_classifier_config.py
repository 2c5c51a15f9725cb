"""ABKDClassifierConfig: defaults, checks at construction, and the public import."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from classifier_factories import build_image_trainer, classifier_training_kwargs
from testing_utils import docstring_field_entries, load_script
from transformers import HfArgumentParser, TrainingArguments

import abkd_trainer
from abkd_trainer import ABKDClassifierConfig, ABKDClassifierTrainer
from abkd_trainer.core.divergence_arguments import DivergenceArguments

reference = load_script("scripts/generate_config_reference.py", "generate_config_reference")


def test_public_names_are_exported_lazily():
    assert "ABKDClassifierTrainer" in dir(abkd_trainer)
    assert abkd_trainer.ABKDClassifierConfig.__module__ == "abkd_trainer.classification.config"
    assert abkd_trainer.ABKDClassifierTrainer.__module__ == "abkd_trainer.classification.trainer"


def test_defaults_are_the_authors_ablsd_recipe(tmp_path):
    # Chosen from benchmarks/compare_classifier_divergences.py (see the config's docstring).
    config = ABKDClassifierConfig(str(tmp_path))
    assert (config.divergence, config.alpha, config.beta) == ("ab", 0.9, 0.3)
    assert (config.temperature, config.kd_weight, config.ce_weight) == (2.0, 9.0, 0.1)
    assert config.ab_warmup_ratio == 0.0
    assert config.logit_standardization is True
    assert config.label_names == ["labels"]
    # TrainingArguments' own defaults are kept (fp32 training).
    assert config.bf16 is False and config.fp16 is False


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kd_weight": -1.0}, r"`kd_weight` must be >= 0"),
        ({"ce_weight": float("nan")}, r"`ce_weight` must be finite"),
        ({"kd_weight": 0.0, "ce_weight": 0.0}, r"both 0"),
        ({"temperature": 0.0}, r"`temperature` must be > 0"),
        ({"divergence": "kl"}, r"`divergence` must be one of"),
        ({"ab_warmup_ratio": 2.0}, r"`ab_warmup_ratio` must be in \[0, 1\]"),
        ({"teacher_model_init_kwargs": "bf16"}, r"`teacher_model_init_kwargs` must be a dict"),
    ],
)
def test_bad_values_are_refused_naming_the_field(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        ABKDClassifierConfig(str(tmp_path), **overrides)


def test_init_kwargs_parse_from_json_strings(tmp_path):
    config = ABKDClassifierConfig(
        str(tmp_path),
        teacher_model_init_kwargs='{"dtype": "bfloat16"}',
        model_init_kwargs='{"num_labels": 10}',
    )
    assert config.teacher_model_init_kwargs == {"dtype": "bfloat16"}
    assert config.model_init_kwargs == {"num_labels": 10}


def test_command_line_flags_are_the_fields(tmp_path):
    (config,) = HfArgumentParser(ABKDClassifierConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--kd_weight",
            "12.5",
            "--ce_weight",
            "0.5",
            "--logit_standardization",
            "false",
            "--divergence",
            "fkl",
        ]
    )
    assert (config.kd_weight, config.ce_weight, config.divergence) == (12.5, 0.5, "fkl")
    assert config.logit_standardization is False  # Hinton's KD: raw logits
    help_text = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(config)}
    assert "lambda * T**2" in help_text["kd_weight"]


def test_training_arguments_are_converted(tmp_path):
    args = TrainingArguments(**classifier_training_kwargs(tmp_path, learning_rate=0.125))
    trainer = build_image_trainer(tmp_path)
    converted = ABKDClassifierTrainer(
        model=trainer.model,
        teacher_model=trainer.teacher_model,
        args=args,
        train_dataset=trainer.train_dataset,
    ).args
    assert isinstance(converted, ABKDClassifierConfig)
    assert converted.learning_rate == 0.125
    assert converted.alpha == ABKDClassifierConfig("unused").alpha  # the classifier's defaults


def test_config_docstring_maps_hintons_kd():
    assert "kd_weight = lambda * T**2" in ABKDClassifierConfig.__doc__
    assert "ce_weight = 1 - lambda" in ABKDClassifierConfig.__doc__


def test_the_classifier_package_imports_neither_the_lm_package_nor_trl():
    code = (
        "import sys, abkd_trainer.classification.trainer; "
        "print([m for m in sys.modules if m.startswith(('abkd_trainer.lm', 'abkd_trainer.tools', "
        "'trl'))])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_every_field_the_config_adds_is_in_exactly_one_docstring_group():
    groups = reference.field_groups(ABKDClassifierConfig)
    grouped = [name for _, names in groups for name in names]
    added = [f.name for f in reference.own_fields(ABKDClassifierConfig, TrainingArguments)]
    assert sorted(grouped) == sorted(added)
    assert len(grouped) == len(set(grouped))
    assert [title for title, _ in groups][:2] == [
        "Distillation objective",
        "Schedule of alpha and beta",
    ]


def test_shared_divergence_fields_are_documented_as_in_the_mixin_unless_their_default_changed():
    changed = {"alpha", "beta", "temperature", "ab_warmup_ratio"}  # the classifier's own defaults
    ours, mixin = (
        docstring_field_entries(ABKDClassifierConfig),
        docstring_field_entries(DivergenceArguments),
    )
    shared = {f.name for f in dataclasses.fields(DivergenceArguments)}
    assert [name for name in shared - changed if ours[name] != mixin[name]] == []
    for name in changed:
        assert ours[name] != mixin[name] and "default" in ours[name], name
