"""The configuration reference follows the field groups of the config docstrings, and the groups
cover every field ABKD adds, with the shared divergence fields documented alike."""

from __future__ import annotations

import dataclasses

from testing_utils import docstring_field_entries, load_script
from trl import SFTConfig

from abkd_trainer.core.divergence_arguments import DivergenceArguments
from abkd_trainer.lm.config import ABKDConfig

reference = load_script("scripts/generate_config_reference.py", "generate_config_reference")


def test_every_field_abkd_adds_is_in_exactly_one_docstring_group():
    groups = reference.field_groups(ABKDConfig)
    grouped = [name for _, names in groups for name in names]
    added = [f.name for f in reference.own_fields(ABKDConfig, SFTConfig)]
    assert sorted(grouped) == sorted(added)
    assert len(grouped) == len(set(grouped))
    titles = [title for title, _ in groups]
    assert titles[:2] == ["Distillation objective", "Schedule of alpha and beta"]


def test_the_mixins_groups_are_the_configs_first_two_with_the_same_entries():
    mixin_groups = reference.field_groups(DivergenceArguments)
    config_groups = dict(reference.field_groups(ABKDConfig))
    mixin_fields = {f.name for f in dataclasses.fields(DivergenceArguments)}
    assert {name for _, names in mixin_groups for name in names} == mixin_fields
    for title, names in mixin_groups:
        assert set(names) <= set(config_groups[title]), title
    config_entries, mixin_entries = (
        docstring_field_entries(ABKDConfig),
        docstring_field_entries(DivergenceArguments),
    )
    differing = [name for name in mixin_fields if config_entries[name] != mixin_entries[name]]
    assert not differing, f"ABKDConfig documents these shared fields differently: {differing}"


def test_the_generated_page_has_one_titled_table_per_group():
    section = reference.render_config_reference()
    headings = [line[4:] for line in section.splitlines() if line.startswith("### ")]
    assert headings == [title for title, _ in reference.field_groups(ABKDConfig)]
    assert "### Other fields" not in section
