"""Check that the API reference documents every parameter of what it renders.

The documentation site renders the package's docstrings with mkdocstrings: each `::: identifier`
block of a page under `docs/` renders that object and, for a module or a class, its public
members that have a docstring (the site's `filters: ["!^_"]`, `show_if_no_docstring: false` by
default). `mkdocs build --strict` fails on a docstring that documents a parameter the signature
lacks, but not on one that leaves a parameter out: the parameter then shows in the signature and
nowhere in the Parameters table. This script finds those.

For every function and method rendered, every parameter of its signature must have an entry in
its docstring's `Args:` (or `Arguments:`, `Parameters:`, `Keyword Args:`, `Other Parameters:`)
section. A class is checked against its `__init__` (the site merges `__init__` into the class:
the class's and `__init__`'s docstrings both count); for a dataclass that is the fields of the
generated `__init__`, which configs may document in titled groups (`Parameters: Teacher`), as
TRL's configs do. A dataclass's fields are its instances' attributes too, so for a dataclass an
`Attributes:` entry also documents a field (result types such as `SweepResult` are read, not
built, by users). Not required:

- `self` and `cls`;
- private parameters, named with a leading underscore (e.g. transformers' `_internal_call`);
- variadic parameters, `*args` and `**kwargs`: they usually forward to a parent or a wrapped
  callable that documents them (when a docstring does list `*args` / `**kwargs`, the docs build
  checks the name);
- parameters of an `__init__` inherited from a class outside the package (not visible here).

The objects are read statically with griffe (the library mkdocstrings uses), so nothing is
imported and the check is fast.

Usage:

    python scripts/check_api_docstrings.py              # check docs/*.md, docs/reference/*.md
    python scripts/check_api_docstrings.py PAGE ...     # check these Markdown pages
    python scripts/check_api_docstrings.py --search-path src PAGE  # packages found in src/

Objects listed in `PENDING` are reported but do not fail the check; remove an object from the
list once its docstring is complete (the test of this script fails while a listed object passes,
so the list only shrinks).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import griffe
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PAGES = ("docs/*.md", "docs/reference/*.md")

# Rendered objects whose docstrings still miss parameters, in files that other work owns while
# the API reference was completed. Complete the docstring and remove the object from this list.
PENDING: tuple[str, ...] = ()

# `::: identifier`, then its indented YAML options (if any).
BLOCK = re.compile(r"^::: (?P<identifier>\S+)[ \t]*\n(?P<options>(?:(?:[ \t]+.*)?\n)*)", re.M)
PARAMETER_SECTIONS = frozenset(
    {griffe.DocstringSectionKind.parameters, griffe.DocstringSectionKind.other_parameters}
)
ATTRIBUTE_SECTIONS = frozenset({griffe.DocstringSectionKind.attributes})
NOT_REQUIRED = {"self", "cls"}
VARIADIC = {griffe.ParameterKind.var_positional, griffe.ParameterKind.var_keyword}


@dataclass(frozen=True)
class Block:
    """One `::: identifier` block of a documentation page, with its options."""

    page: str
    identifier: str
    options: dict = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class Missing:
    """A rendered object whose docstring leaves parameters out."""

    page: str
    path: str
    parameters: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.page}: {self.path}: undocumented parameter(s): {', '.join(self.parameters)}"


def page_blocks(page: Path) -> list[Block]:
    """The `:::` blocks of the Markdown page `page`, in page order.

    Args:
        page: A Markdown file of the site.

    Returns:
        One `Block` per `::: identifier` line, with the YAML options indented under it (only
        their `options:` mapping is kept; `{}` when there are none).
    """
    blocks = []
    for match in BLOCK.finditer(page.read_text(encoding="utf-8")):
        options = yaml.safe_load(match.group("options")) if match.group("options").strip() else {}
        blocks.append(
            Block(
                relative_name(page), match.group("identifier"), (options or {}).get("options", {})
            )
        )
    return blocks


def relative_name(path: Path) -> str:
    """`path` relative to the repository, else as given."""
    try:
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return path.as_posix()


def documented_names(
    docstring: griffe.Docstring | None,
    kinds: frozenset[griffe.DocstringSectionKind] = PARAMETER_SECTIONS,
) -> set[str]:
    """Names with an entry in the parameter sections of a Google-style docstring.

    Args:
        docstring: The object's docstring, parsed by griffe (None: no docstring).
        kinds: The sections read (default: the parameter sections).

    Returns:
        The entries' names, leading `*` / `**` removed.
    """
    if docstring is None:
        return set()
    names = set()
    for section in docstring.parse(griffe.Parser.google, warnings=False):
        if section.kind in kinds:
            names.update(item.name.lstrip("*") for item in section.value)
    return names


def required_parameters(function: griffe.Function) -> list[str]:
    """The parameters of `function` that its docstring must document, in signature order."""
    return [
        parameter.name
        for parameter in function.parameters
        if parameter.name not in NOT_REQUIRED
        and not parameter.name.startswith("_")
        and parameter.kind not in VARIADIC
    ]


def undocumented(obj: griffe.Object) -> list[str]:
    """The parameters of the function or class `obj` missing from its docstring.

    Args:
        obj: A griffe function, or a class (checked against its `__init__`, whose docstring also
            counts, as the site merges it into the class; a dataclass's `Attributes:` count
            too). Other kinds have no parameters.

    Returns:
        The missing names in signature order; empty when all are documented.
    """
    if obj.is_function:
        wanted, documented = required_parameters(obj), documented_names(obj.docstring)
    elif obj.is_class:
        init = obj.all_members.get("__init__")
        if init is None or init.is_alias and not _resolves(init):
            return []
        init = init.final_target if init.is_alias else init
        wanted = required_parameters(init)
        documented = documented_names(obj.docstring) | documented_names(init.docstring)
        if "dataclass" in obj.labels:
            documented |= documented_names(obj.docstring, ATTRIBUTE_SECTIONS)
    else:
        return []
    return [name for name in wanted if name not in documented]


def _resolves(alias: griffe.Alias) -> bool:
    try:
        alias.final_target  # noqa: B018 - resolving is the test
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return False
    return True


def _is_rendered_member(member: griffe.Object | griffe.Alias, options: dict) -> bool:
    """Whether mkdocstrings renders `member` under its parent, with the site's default filters."""
    if member.name.startswith("_"):
        return False
    if member.is_alias:
        # Imported names render only when the module exports them in `__all__`.
        exports = member.parent.exports if member.parent is not None else None
        if not exports or member.name not in exports or not _resolves(member):
            return False
    if member.is_module:
        return bool(options.get("show_submodules", False))
    return bool(member.docstring) or bool(options.get("show_if_no_docstring", False))


def rendered_objects(obj: griffe.Object, options: dict) -> Iterator[griffe.Object]:
    """`obj` and the members a `:::` block renders under it, depth first.

    Args:
        obj: The block's object.
        options: The block's mkdocstrings options (`members`, `show_if_no_docstring`,
            `show_submodules` are honoured).

    Yields:
        The griffe objects that the page renders (aliases resolved).
    """
    obj = obj.final_target if obj.is_alias else obj
    yield obj
    if not (obj.is_module or obj.is_class):
        return
    selection = options.get("members")
    if selection is False:
        return
    for name, member in obj.members.items():
        if isinstance(selection, list) and name not in selection:
            continue
        if _is_rendered_member(member, options):
            yield from rendered_objects(member, {**options, "members": None})


def load_object(identifier: str, loader: griffe.GriffeLoader) -> griffe.Object:
    """The griffe object for a dotted `identifier`, loading its top-level package if needed."""
    package = identifier.split(".", 1)[0]
    if package not in loader.modules_collection:
        loader.load(package)
        loader.resolve_aliases(implicit=False, external=False)
    return loader.modules_collection[identifier]


def find_missing(
    pages: Iterable[Path], search_paths: Iterable[Path] = (REPO_ROOT,)
) -> list[Missing]:
    """Every rendered object, on the given pages, whose docstring leaves parameters out.

    Args:
        pages: Markdown pages holding `:::` blocks.
        search_paths: Folders the documented packages are loaded from (the site's `paths`).

    Returns:
        One `Missing` per incomplete object, in page and block order, each object once.

    Raises:
        KeyError: A block names an object that does not exist.
    """
    logging.getLogger("griffe").setLevel(logging.ERROR)  # the docs build reports its warnings
    loader = griffe.GriffeLoader(
        search_paths=[str(path) for path in search_paths],
        docstring_parser=griffe.Parser.google,
        extensions=griffe.load_extensions(),
    )
    found, seen = [], set()
    for page in pages:
        for block in page_blocks(page):
            for obj in rendered_objects(load_object(block.identifier, loader), block.options):
                if obj.path in seen:
                    continue
                seen.add(obj.path)
                missing = undocumented(obj)
                if missing:
                    found.append(Missing(block.page, obj.path, tuple(missing)))
    return found


def default_pages() -> list[Path]:
    """The site's pages that may hold `:::` blocks: `docs/*.md` and `docs/reference/*.md`."""
    return [page for pattern in DEFAULT_PAGES for page in sorted(REPO_ROOT.glob(pattern))]


def main(argv: list[str] | None = None) -> int:
    """Check the pages; print what is missing; return 1 when an object outside `PENDING` is."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pages", nargs="*", type=Path, help="Markdown pages (default: the site's)")
    parser.add_argument(
        "--search-path",
        action="append",
        type=Path,
        help="folder the documented packages are loaded from (repeatable; default: the repository)",
    )
    args = parser.parse_args(argv)
    missing = find_missing(args.pages or default_pages(), args.search_path or [REPO_ROOT])
    failing = [item for item in missing if item.path not in PENDING]
    for item in missing:
        if item.path in PENDING:
            print(f"pending: {item}")
    for item in failing:
        print(item)
    if failing:
        print(
            f"{len(failing)} rendered object(s) with undocumented parameters: give each an "
            "`Args:` entry (Google style)."
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
