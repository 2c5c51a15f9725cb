"""The README as a front page, its links, and one docstring syntax across the package.

The site itself is built with `mkdocs build --strict` by `make test` (broken links, missing API
targets and docstring warnings fail there); these tests cover what that build does not see: the
README (not part of the site), and the docstring markup that renders without a warning but as
literal text.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from testing_utils import load_script

REPO_ROOT = Path(__file__).resolve().parents[2]
README = REPO_ROOT / "README.md"
MAX_README_LINES = 300

syntax = load_script("scripts/check_docstring_syntax.py", "check_docstring_syntax")

# A Markdown link or image outside code: [text](target) or ![alt](target).
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>[^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def headings(markdown: str) -> set[str]:
    markdown = FENCE.sub("", markdown)
    return {
        github_anchor(line.lstrip("#"))
        for line in markdown.splitlines()
        if re.match(r"#{1,6} ", line)
    }


def links(markdown: str) -> list[str]:
    """Targets of the Markdown links, without those inside code blocks, code spans or indented
    (code) lines."""
    markdown = FENCE.sub("", markdown)
    text = "\n".join(line for line in markdown.splitlines() if not line.startswith("    "))
    return [match.group("target") for match in MARKDOWN_LINK.finditer(INLINE_CODE.sub("", text))]


# ----------------------------------------------------------------------------- README


def test_readme_is_a_front_page_of_at_most_300_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines"


def test_every_relative_link_in_the_readme_resolves():
    text = README.read_text(encoding="utf-8")
    targets = [t for t in links(text) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]
    assert any(t.startswith("docs/") for t in targets)  # the parser does find the docs map
    broken = []
    for target in targets:
        path_part, _, anchor = target.partition("#")
        path = (REPO_ROOT / path_part) if path_part else README
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in headings(path.read_text("utf-8")):
            broken.append(f"{target}: no heading with the anchor #{anchor}")
    assert not broken, "README.md links that do not resolve:\n" + "\n".join(broken)


def test_link_checker_sees_broken_links_and_anchors(tmp_path):
    text = "[ok](#results)\n\n## Results\n\n[bad](missing.md) `[code](missing.md)`\n"
    assert links(text) == ["#results", "missing.md"]
    assert "results" in headings(text)
    assert github_anchor("The demo's (alpha, beta) sweep") == "the-demos-alpha-beta-sweep"


# ----------------------------------------------------------------------------- docstrings


def package_files() -> list[Path]:
    return syntax.python_files([REPO_ROOT / "abkd_trainer"])


def test_docstrings_use_markdown_only():
    offences = [
        offence
        for path in package_files()
        if syntax.relative_name(path) not in syntax.PENDING_CONVERSION
        for offence in syntax.find_offences(path)
    ]
    assert not offences, (
        "Docstrings with Sphinx / doc-builder / reStructuredText markup (convert with "
        "`python scripts/check_docstring_syntax.py --fix FILE`):\n" + "\n".join(map(str, offences))
    )


def test_pending_conversion_lists_only_files_that_still_need_it():
    clean = [
        name
        for name in syntax.PENDING_CONVERSION
        if not (REPO_ROOT / name).exists() or not syntax.find_offences(REPO_ROOT / name)
    ]
    assert not clean, f"remove from PENDING_CONVERSION (converted or gone): {clean}"


def test_docs_relax_docstring_warnings_only_for_files_pending_conversion():
    relaxed = []
    for page in (REPO_ROOT / "docs").rglob("*.md"):
        for block in re.finditer(
            r"^::: (?P<ident>\S+)\n(?P<options>(?:    .*\n)*)", page.read_text(), re.M
        ):
            if re.search(r"^\s+warnings:\s*false", block.group("options"), re.M):
                relaxed.append((page.name, block.group("ident")))
    for page_name, ident in relaxed:
        parts = ident.split(".")
        candidates = [
            Path(*parts[:n]).with_suffix(".py").as_posix() for n in range(len(parts), 1, -1)
        ]
        module = next(c for c in candidates if (REPO_ROOT / c).exists())
        assert module in syntax.PENDING_CONVERSION, (
            f"{page_name}: `{ident}` turns docstring warnings off, but {module} is converted: "
            "delete the `docstring_options: warnings: false` lines there"
        )


SAMPLE = '''"""Uses :class:`~abkd_trainer.lm.config.ABKDConfig` and ``kd_ratio``.

Run it like this::

    python -m x
"""

CODE = "``kept`` in code :class:`kept`"


def f():
    """As in [`SFTTrainer`], or [`ABKDTrainer`]; see :func:`pkg.mod.g` and :meth:`the method <C.m>`.

    Args:
        a, b: grouped names.
    """
'''


def test_fix_rewrites_every_kind_of_markup_in_docstrings_only():
    converted = syntax.convert_source(SAMPLE)
    assert "Uses `ABKDConfig` and `kd_ratio`." in converted
    assert "Run it like this:\n" in converted
    assert (
        "As in `SFTTrainer`, or [`ABKDTrainer`][abkd_trainer.lm.trainer.ABKDTrainer]" in converted
    )
    assert "see `pkg.mod.g` and `the method`." in converted
    assert 'CODE = "``kept`` in code :class:`kept`"' in converted  # not a docstring
    assert syntax.convert_source(converted) == converted  # idempotent


def test_check_reports_each_kind_with_its_line(tmp_path):
    path = tmp_path / "sample.py"
    path.write_text(SAMPLE)
    found = {(offence.line, offence.kind.split(" (")[0]) for offence in syntax.find_offences(path)}
    assert found == {
        (1, "Sphinx role"),
        (1, "reStructuredText ``literal``"),
        (3, "reStructuredText '::' literal-block marker"),
        (12, "doc-builder link"),
        (12, "Sphinx role"),
        (15, "several names in one entry"),
    }
    path.write_text(syntax.convert_source(SAMPLE))
    assert [o.kind for o in syntax.find_offences(path)] == [syntax.GROUPED_NAMES]


@pytest.mark.parametrize("markup", ["``x``", ":mod:`x`", "[`X`]", "text::"])
def test_command_line_check_fails_on_old_markup(tmp_path, markup, capsys):
    path = tmp_path / "module.py"
    path.write_text(f'"""A docstring with {markup}\n\n    code\n"""\n')
    assert syntax.main([str(path)]) == 1
    assert "module.py:1:" in capsys.readouterr().out
    assert syntax.main(["--fix", str(path)]) == 0
    assert syntax.main([str(path)]) == 0


# ----------------------------------------------------------------------------- config reference


def test_config_reference_splits_fields_into_the_docstrings_titled_groups():
    import dataclasses

    reference = load_script("scripts/generate_config_reference.py", "generate_config_reference")

    @dataclasses.dataclass
    class Grouped:
        """A config.

        Parameters: The objective
            beta: its beta.
            alpha: its alpha.

        Parameters: The teacher
            teacher: its name.

        Plain text after the groups.
        """

        alpha: float = dataclasses.field(default=0.2, metadata={"help": "Alpha."})
        beta: float = dataclasses.field(default=0.7, metadata={"help": "Beta."})
        teacher: str = dataclasses.field(default="t", metadata={"help": "Teacher."})
        seed: int = dataclasses.field(default=0, metadata={"help": "Seed."})

    assert reference.field_groups(Grouped) == [
        ("The objective", ["beta", "alpha"]),
        ("The teacher", ["teacher"]),
    ]
    lines = reference.grouped_tables(Grouped, dataclasses.fields(Grouped))
    headings = [line for line in lines if line.startswith("### ")]
    assert headings == ["### The objective", "### The teacher", "### Other fields"]
    flags = [line.split(" | ")[0] for line in lines if line.startswith("| `--")]
    assert flags == ["| `--beta`", "| `--alpha`", "| `--teacher`", "| `--seed`"]


def test_make_test_builds_the_site_strictly_with_warnings_shown():
    # `mkdocs build --strict --quiet` exits 0 with warnings: --quiet drops them before strict
    # mode counts them, so the check would never fail.
    makefile = (REPO_ROOT / "Makefile").read_text()
    recipe = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    build = next(line for line in recipe.splitlines() if "build" in line and "MKDOCS" in line)
    assert "--strict" in build
    assert "--quiet" not in build and " -q" not in build
