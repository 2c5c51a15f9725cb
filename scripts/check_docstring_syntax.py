"""Keep the package's docstrings in one syntax: Google style with Markdown, as the docs render it.

The documentation site renders docstrings with mkdocstrings (Google style, Markdown). Markup of
other tools shows up there as literal text, so this script finds it in the docstrings (module,
class and function docstrings; comments and other strings are not read):

- Sphinx roles such as `` :class:`x` ``, `` :func:`x` ``, `` :mod:`x` ``;
- Hugging Face doc-builder links such as `` [`SFTTrainer`] ``;
- reStructuredText literals (` ``x`` `), `text::` literal-block markers and `.. directive::`;
- Args / Attributes entries that name several parameters at once (`alpha_end, beta_end: ...`),
  which the docs build cannot match to the signature (reported only: split them by hand).

`--fix` rewrites them into Markdown, mechanically, in the docstrings only, and is idempotent:

- a role becomes code: `` :class:`~pkg.mod.Name` `` gives `` `Name` ``, `` :func:`pkg.f` `` gives
  `` `pkg.f` ``, `` :meth:`title <target>` `` gives `` `title` ``;
- a bracket link becomes a link to the API reference for the package's own trainer and config
  (`` [`ABKDConfig`][abkd_trainer.lm.config.ABKDConfig] ``), and code for any other name;
- ` ``x`` ` becomes `` `x` `` (left alone when `x` itself holds a backtick);
- a line ending in `::` ends in `:` (the indented block after it stays a code block);
- lines that a link made longer than the line-length limit are printed, to be rewrapped.

Usage:

    python scripts/check_docstring_syntax.py             # check abkd_trainer/; exit 1 on offences
    python scripts/check_docstring_syntax.py PATH ...    # check these files or folders
    python scripts/check_docstring_syntax.py --fix PATH  # rewrite them in place

Files listed in `PENDING_CONVERSION` are reported but do not fail the check; remove a file from
the list once it is converted (the test of this script fails while a listed file is clean, so the
list only shrinks).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Files other work is changing while the docstrings were converted: they still carry the old
# syntax. Convert each with `--fix`, check the diff, and remove it from this list.
PENDING_CONVERSION: tuple[str, ...] = ()

ROLE = re.compile(
    r":(?:py:)?(?:mod|module|class|func|function|meth|method|attr|attribute|data|obj|exc|const|"
    r"ref|term|doc|paramref|any):`(?P<body>[^`]+)`"
)
# `[`Name`]` not followed by `(url)` or `[identifier]`: a doc-builder link, not Markdown.
BRACKET_LINK = re.compile(r"\[`(?P<name>[^`\]]+)`\](?![(\[])")
# An RST inline literal: two backticks, text without a backtick (it may wrap to the next line, not
# across a blank one), two backticks. Triple backticks (Markdown code fences) are not matched.
DOUBLE_BACKTICKS = re.compile(r"(?<!`)``(?P<text>(?:[^`\n]|\n(?![ \t]*\n))+?)``(?!`)")
LITERAL_BLOCK_MARKER = re.compile(r"(?<=\S)( ?)::[ \t]*$", re.MULTILINE)
RST_DIRECTIVE = re.compile(r"^[ \t]*\.\. [\w-]+::", re.MULTILINE)

# Names a bracket link may point at: the package's own trainer and config, which the API reference
# renders; the site build (mkdocs-autorefs) resolves `[title][identifier]` links against it. Other
# names become code (a URL would not fit the line length).
KNOWN_LINKS: dict[str, str] = {
    "ABKDTrainer": "[abkd_trainer.lm.trainer.ABKDTrainer]",
    "ABKDConfig": "[abkd_trainer.lm.config.ABKDConfig]",
}
MAX_LINE_LENGTH = 100  # ruff's, in ruff.toml


@dataclass(frozen=True)
class Offence:
    """One piece of foreign markup in a docstring."""

    path: Path
    line: int
    kind: str
    text: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.kind}: {' '.join(self.text.split())}"


@dataclass(frozen=True)
class DocstringSpan:
    """Where a docstring literal sits in its file (1-based lines, 0-based columns)."""

    start_line: int
    start_col: int
    end_line: int
    end_col: int


def docstring_spans(source: str) -> list[DocstringSpan]:
    """The source spans of the module, class and function docstrings in `source`."""
    spans = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        if not body or not isinstance(body[0], ast.Expr):
            continue
        value = body[0].value
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            spans.append(
                DocstringSpan(
                    value.lineno, value.col_offset, value.end_lineno, value.end_col_offset
                )
            )
    return spans


def _offsets(source: str) -> list[int]:
    """Character offset of the start of every line (index 0 is line 1)."""
    offsets, position = [], 0
    for line in source.splitlines(keepends=True):
        offsets.append(position)
        position += len(line)
    offsets.append(position)
    return offsets


def _utf8_column(line: str, byte_col: int) -> int:
    """ast columns count UTF-8 bytes; convert one to a character index."""
    return len(line.encode("utf-8")[:byte_col].decode("utf-8"))


def _docstring_segments(source: str) -> Iterator[tuple[int, int, int]]:
    """`(start, end, first_line)` character ranges of every docstring literal in `source`."""
    lines = source.splitlines(keepends=True)
    offsets = _offsets(source)
    for span in docstring_spans(source):
        start = offsets[span.start_line - 1] + _utf8_column(
            lines[span.start_line - 1], span.start_col
        )
        end = offsets[span.end_line - 1] + _utf8_column(lines[span.end_line - 1], span.end_col)
        yield start, end, span.start_line


def _role_replacement(match: re.Match[str]) -> str:
    body = match.group("body").strip()
    titled = re.fullmatch(r"(?P<title>.+?)\s*<(?P<target>[^>]+)>", body)
    if titled:
        return f"`{titled.group('title')}`"
    if body.startswith("~"):
        return f"`{body[1:].rsplit('.', 1)[-1]}`"
    return f"`{body.lstrip('!')}`"


def _bracket_replacement(match: re.Match[str]) -> str:
    name = match.group("name")
    short = name[1:].rsplit(".", 1)[-1] if name.startswith("~") else name
    target = KNOWN_LINKS.get(short)
    return f"[`{short}`]{target}" if target else f"`{short}`"


def convert_markup(text: str) -> str:
    """`text` with roles, bracket links, RST literals and literal-block markers in Markdown."""
    text = ROLE.sub(_role_replacement, text)
    text = BRACKET_LINK.sub(_bracket_replacement, text)
    text = DOUBLE_BACKTICKS.sub(lambda match: f"`{match.group('text')}`", text)
    return LITERAL_BLOCK_MARKER.sub(":", text)


def convert_source(source: str) -> str:
    """`source` with every docstring converted by `convert_markup`; code is left untouched."""
    pieces, previous_end = [], 0
    for start, end, _ in sorted(_docstring_segments(source)):
        pieces.append(source[previous_end:start])
        pieces.append(convert_markup(source[start:end]))
        previous_end = end
    pieces.append(source[previous_end:])
    return "".join(pieces)


# A Google-style section that lists names: its title line, then entries indented one level more.
NAMED_SECTION = re.compile(
    r"^(?P<indent>[ \t]*)(?:Args|Arguments|Params|Parameters|Attributes|Keyword Args|"
    r"Keyword Arguments|Other Parameters)(?::[ \t]+\S.*)?:?[ \t]*$",
    re.MULTILINE,
)
PARENTHESISED = re.compile(r"\([^()]*\)")
GROUPED_NAMES = "several names in one entry (document each name in an entry of its own)"


def grouped_name_entries(docstring: str) -> Iterator[tuple[int, str]]:
    """`(offset, line)` of each Args/Attributes entry that names several parameters at once.

    Google style gives every parameter its own `name (type): description` entry; an entry
    such as `alpha_end, beta_end: ...` cannot be matched to the signature by the docs build.
    """
    lines = docstring.splitlines(keepends=True)
    offsets = _offsets(docstring)
    for match in NAMED_SECTION.finditer(docstring):
        if not match.group(0).rstrip().endswith(":") and ": " not in match.group(0):
            continue
        section_indent = len(match.group("indent").expandtabs())
        first = docstring.count("\n", 0, match.start()) + 1
        entry_indent = None
        for index in range(first, len(lines)):
            line = lines[index]
            if not line.strip():
                continue
            indent = len(line) - len(line.lstrip(" "))
            if indent <= section_indent:
                break
            entry_indent = indent if entry_indent is None else entry_indent
            if indent != entry_indent:
                continue  # a description's continuation line
            head = PARENTHESISED.sub("", line.strip()).split(":", 1)[0]
            if "," in head:
                yield offsets[index], line.strip()


CHECKS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("Sphinx role (use `code` or a Markdown link)", ROLE),
    ("doc-builder link (use a Markdown link or `code`)", BRACKET_LINK),
    ("reStructuredText ``literal`` (use `literal`)", DOUBLE_BACKTICKS),
    ("reStructuredText '::' literal-block marker (end the line with ':')", LITERAL_BLOCK_MARKER),
    ("reStructuredText directive (use a Markdown admonition)", RST_DIRECTIVE),
)


def long_lines(before: str, after: str) -> list[int]:
    """Line numbers (1-based) over `MAX_LINE_LENGTH` in `after` that were not over it in `before`.

    A link can make a converted line longer than the line-length limit; conversion keeps line
    numbers, so the lines compare one to one.
    """
    old_lines = before.splitlines()
    return [
        number
        for number, line in enumerate(after.splitlines(), start=1)
        if len(line) > MAX_LINE_LENGTH
        and (number > len(old_lines) or len(old_lines[number - 1]) <= MAX_LINE_LENGTH)
    ]


def find_offences(path: Path, source: str | None = None) -> list[Offence]:
    """Every piece of foreign markup in the docstrings of the Python file `path`."""
    source = path.read_text(encoding="utf-8") if source is None else source
    offences = []
    for start, end, first_line in _docstring_segments(source):
        docstring = source[start:end]
        for kind, pattern in CHECKS:
            for match in pattern.finditer(docstring):
                line = first_line + docstring.count("\n", 0, match.start())
                offences.append(Offence(path, line, kind, match.group(0).strip()))
        for offset, text in grouped_name_entries(docstring):
            line = first_line + docstring.count("\n", 0, offset)
            offences.append(Offence(path, line, GROUPED_NAMES, text))
    return sorted(offences, key=lambda offence: offence.line)


def python_files(paths: Iterable[Path]) -> list[Path]:
    """The `.py` files among `paths`, folders searched recursively, in a stable order."""
    files: list[Path] = []
    for path in paths:
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return files


def relative_name(path: Path) -> str:
    """`path` relative to the repository (as `PENDING_CONVERSION` names files), else as given."""
    try:
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return path.as_posix()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "paths", nargs="*", type=Path, help="files or folders (default: abkd_trainer/)"
    )
    parser.add_argument("--fix", action="store_true", help="rewrite the docstrings in place")
    args = parser.parse_args(argv)
    files = python_files(args.paths or [REPO_ROOT / "abkd_trainer"])
    if args.fix:
        for path in files:
            source = path.read_text(encoding="utf-8")
            converted = convert_source(source)
            if converted != source:
                path.write_text(converted, encoding="utf-8")
                print(f"converted {relative_name(path)}")
                for number in long_lines(source, converted):
                    print(
                        f"{relative_name(path)}:{number}: longer than {MAX_LINE_LENGTH}: rewrap it"
                    )
    failing, pending = [], []
    for path in files:
        offences = find_offences(path)
        (pending if relative_name(path) in PENDING_CONVERSION else failing).extend(offences)
    for offence in pending:
        print(f"pending conversion: {offence}")
    for offence in failing:
        print(offence)
    if failing:
        print(
            f"{len(failing)} docstring(s) markup offences; "
            f"`python {relative_name(Path(__file__))} --fix FILE` converts them."
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
