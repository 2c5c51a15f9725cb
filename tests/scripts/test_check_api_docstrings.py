"""scripts/check_api_docstrings.py: what counts as rendered and documented; the site against it."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from testing_utils import load_script

api = load_script("scripts/check_api_docstrings.py", "check_api_docstrings")

PACKAGE = "apidoc_sample_pkg"  # a name no installed package has: griffe loads it from tmp_path

SAMPLE_MODULE = '''
"""A module the sample page renders whole."""

from dataclasses import dataclass
from os.path import join  # imported, not in __all__: not rendered

__all__ = ["complete", "misses_one", "Widget", "Config", "Result", "exported"]

from apidoc_sample_pkg.helpers import exported


def complete(logits, mask=None, *args, _internal=False, **kwargs):
    """Every parameter documented (variadic and private ones need not be).

    Args:
        logits: `(batch, seq, vocab)` logits.
        mask: `(batch, seq)` bool.
    """


def misses_one(student_logits, teacher_logits, *, temperature=1.0):
    """The docstring forgets `temperature`.

    Args:
        student_logits: `(..., vocab)`.
        teacher_logits: `(..., vocab)`.
    """


def no_docstring(value):
    return value


def _private(value):
    """Not rendered: filtered out by its name."""


class Widget:
    """A class whose `__init__` parameters the class docstring documents, all but `size`.

    Args:
        name: its name.
    """

    def __init__(self, name, size):
        self.name, self.size = name, size

    def resize(self, size, *, keep_ratio=True):
        """A public method missing `keep_ratio`.

        Args:
            size: the new size.
        """

    def undocumented_method(self, size):
        return size


@dataclass
class Config:
    """A config documenting its fields in titled groups, as TRL's configs do.

    Parameters: The objective
        alpha: alpha.
        beta: beta.

    Parameters: The teacher
        teacher: its name.
    """

    alpha: float = 0.2
    beta: float = 0.7
    teacher: str = "t"


@dataclass
class Result:
    """A result dataclass: `Attributes:` document its fields; `extra` is missing.

    Attributes:
        value: the value.
    """

    value: float
    extra: int = 0
'''

HELPERS = '''
"""Helpers, re-exported by the sample module."""


def exported(path, strict):
    """Re-exported through the sample module's `__all__`, so rendered there; misses `strict`.

    Args:
        path: a path.
    """
'''

PAGE = """# Sample

::: apidoc_sample_pkg.sample

::: apidoc_sample_pkg.sample.Widget
    options:
      members: false
"""


@pytest.fixture
def sample(tmp_path: Path) -> tuple[Path, Path]:
    """A package in `tmp_path` and a page rendering it; returns (page, search path)."""
    package = tmp_path / "src" / PACKAGE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""Sample package."""\n')
    (package / "sample.py").write_text(textwrap.dedent(SAMPLE_MODULE))
    (package / "helpers.py").write_text(textwrap.dedent(HELPERS))
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    return page, tmp_path / "src"


def test_finds_each_rendered_object_that_misses_a_parameter(sample):
    page, search_path = sample
    found = {
        item.path.removeprefix(f"{PACKAGE}."): item.parameters
        for item in api.find_missing([page], [search_path])
    }
    assert found == {
        "sample.misses_one": ("temperature",),
        "sample.Widget": ("size",),
        "sample.Widget.resize": ("keep_ratio",),
        "sample.Result": ("extra",),
        "helpers.exported": ("strict",),  # named where it is defined, where the fix goes
    }


def test_a_completed_docstring_passes(sample):
    page, search_path = sample
    module = search_path / PACKAGE / "sample.py"
    source = module.read_text()
    module.write_text(
        source.replace(
            "        teacher_logits: `(..., vocab)`.\n",
            "        teacher_logits: `(..., vocab)`.\n        temperature: divides the logits.\n",
        )
    )
    paths = {item.path for item in api.find_missing([page], [search_path])}
    assert f"{PACKAGE}.sample.misses_one" not in paths
    assert f"{PACKAGE}.sample.Widget.resize" in paths


def test_block_options_decide_the_members(sample, tmp_path):
    _, search_path = sample
    page = tmp_path / "members.md"
    page.write_text(
        "::: apidoc_sample_pkg.sample\n    options:\n      members: [complete, Config]\n\n"
        "::: apidoc_sample_pkg.sample.no_docstring\n"
    )
    blocks = api.page_blocks(page)
    assert [block.identifier for block in blocks] == [
        f"{PACKAGE}.sample",
        f"{PACKAGE}.sample.no_docstring",
    ]
    assert blocks[0].options == {"members": ["complete", "Config"]}
    # An object a block names is rendered even without a docstring; `value` is then undocumented.
    found = {item.path: item.parameters for item in api.find_missing([page], [search_path])}
    assert found == {f"{PACKAGE}.sample.no_docstring": ("value",)}


def test_command_line_fails_on_a_missing_parameter_unless_it_is_pending(
    sample, capsys, monkeypatch
):
    page, search_path = sample
    argv = ["--search-path", str(search_path), str(page)]
    assert api.main(argv) == 1
    out = capsys.readouterr().out
    assert "sample.misses_one: undocumented parameter(s): temperature" in out
    assert "5 rendered object(s)" in out
    pending = tuple(item.path for item in api.find_missing([page], [search_path]))
    monkeypatch.setattr(api, "PENDING", pending)
    assert api.main(argv) == 0
    assert capsys.readouterr().out.count("pending: ") == len(pending)


def test_every_object_the_site_renders_documents_its_parameters():
    failing = [
        item for item in api.find_missing(api.default_pages()) if item.path not in api.PENDING
    ]
    assert not failing, (
        "Rendered objects with undocumented parameters (give each an `Args:` entry; see "
        "scripts/check_api_docstrings.py):\n" + "\n".join(map(str, failing))
    )


def test_pending_lists_only_objects_that_still_miss_parameters():
    still_missing = {item.path for item in api.find_missing(api.default_pages())}
    done = [path for path in api.PENDING if path not in still_missing]
    assert not done, f"remove from PENDING in scripts/check_api_docstrings.py (complete): {done}"


def test_the_site_pages_hold_blocks():
    # Guards the page glob and the block parser: the reference pages render the package.
    identifiers = {
        block.identifier for page in api.default_pages() for block in api.page_blocks(page)
    }
    assert "abkd_trainer.divergences.functional" in identifiers
    assert "abkd_trainer.lm.config.ABKDConfig" in identifiers
