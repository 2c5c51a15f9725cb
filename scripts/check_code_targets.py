"""Check the package's size and interface targets: short functions and modules, no private imports.

The targets (from the developer guide):

- no function or method with more than 60 lines of code: the lines from its `def` to its last
  line that hold code, so docstrings, comment-only lines and blank lines do not count (a nested
  function counts towards its enclosing one too, and is checked on its own);
- no module over 600 lines (every line counts);
- no module imports another package module's private name (`from abkd_trainer.x import _name`,
  or a relative import of one); dunder names such as `__version__` are public.

Usage:

    python scripts/check_code_targets.py               # check abkd_trainer/; exit 1 on offences
    python scripts/check_code_targets.py PATH ...      # check these files or folders
    python scripts/check_code_targets.py --max-function-lines 50 --max-module-lines 500

Files listed in `PENDING` are reported but do not fail the check; remove a file from the list once
it meets the targets (the test of this script fails while a listed file is clean, so the list only
shrinks).
"""

from __future__ import annotations

import argparse
import ast
import io
import sys
import tokenize
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "abkd_trainer"
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 600

# Modules (paths relative to the repository) that other work is still splitting or shortening.
PENDING: tuple[str, ...] = ()

# Tokens that are not code: a line holding only these is blank or a comment.
_NON_CODE_TOKENS = {
    tokenize.COMMENT,
    tokenize.NL,
    tokenize.NEWLINE,
    tokenize.INDENT,
    tokenize.DEDENT,
    tokenize.ENCODING,
    tokenize.ENDMARKER,
}


@dataclass(frozen=True)
class Offence:
    """One target a file misses."""

    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def code_lines(source: str, tree: ast.AST) -> set[int]:
    """The line numbers (1-based) that hold code: not blank, not only a comment, not a docstring."""
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in _NON_CODE_TOKENS:
            lines.update(range(token.start[0], token.end[0] + 1))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                lines.difference_update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def _qualified_functions(
    tree: ast.AST, prefix: str = ""
) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            name = f"{prefix}{node.name}"
            yield name, node
            yield from _qualified_functions(node, f"{name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _qualified_functions(node, f"{prefix}{node.name}.")
        else:
            yield from _qualified_functions(node, prefix)


def _module_name(path: Path) -> str | None:
    """`abkd_trainer.lm.trainer` for `.../abkd_trainer/lm/trainer.py`; None outside the package."""
    parts = path.resolve().with_suffix("").parts
    if PACKAGE not in parts:
        return None
    names = list(parts[len(parts) - 1 - parts[::-1].index(PACKAGE) :])
    return ".".join(names[:-1] if names[-1] == "__init__" else names)


def _imported_module(node: ast.ImportFrom, module: str | None, is_package: bool) -> str | None:
    """The absolute module an import reads from (None for a relative import it cannot place)."""
    if node.level == 0:
        return node.module
    if module is None:
        return None
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join(base + ([node.module] if node.module else []))


def check_source(
    source: str,
    path: str,
    *,
    module: str | None = None,
    is_package: bool = False,
    max_function_lines: int = MAX_FUNCTION_LINES,
    max_module_lines: int = MAX_MODULE_LINES,
) -> list[Offence]:
    """The offences of one module's `source` (shown as `path`; `module` its dotted name)."""
    tree = ast.parse(source, filename=path)
    offences = []
    num_lines = len(source.splitlines())
    if num_lines > max_module_lines:
        offences.append(Offence(path, 1, f"{num_lines} lines (max {max_module_lines})"))
    lines = code_lines(source, tree)
    for name, node in _qualified_functions(tree):
        count = len(lines.intersection(range(node.lineno, node.end_lineno + 1)))
        if count > max_function_lines:
            message = f"function `{name}` has {count} lines of code (max {max_function_lines})"
            offences.append(Offence(path, node.lineno, message))
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        source_module = _imported_module(node, module, is_package)
        if source_module is None or source_module.split(".")[0] != PACKAGE:
            continue
        for alias in node.names:
            if alias.name.startswith("_") and not alias.name.startswith("__"):
                message = f"imports the private name `{alias.name}` from `{source_module}`"
                offences.append(Offence(path, node.lineno, message))
    return offences


def python_files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(path.rglob("*.py"))
        elif path.suffix == ".py":
            yield path


def _display(path: Path) -> str:
    try:
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return path.as_posix()


def check_files(paths: Iterable[Path], **limits: int) -> list[Offence]:
    """The offences of every Python file under `paths` (files or folders)."""
    offences = []
    for path in python_files(paths):
        source = path.read_text(encoding="utf-8")
        module = _module_name(path)
        is_package = path.name == "__init__.py"
        offences += check_source(
            source, _display(path), module=module, is_package=is_package, **limits
        )
    return offences


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, default=[REPO_ROOT / PACKAGE])
    parser.add_argument("--max-function-lines", type=int, default=MAX_FUNCTION_LINES)
    parser.add_argument("--max-module-lines", type=int, default=MAX_MODULE_LINES)
    args = parser.parse_args(argv)
    offences = check_files(
        args.paths,
        max_function_lines=args.max_function_lines,
        max_module_lines=args.max_module_lines,
    )
    failing = [offence for offence in offences if offence.path not in PENDING]
    for offence in offences:
        print(f"{offence}{'  (pending)' if offence.path in PENDING else ''}")
    pending = sorted({offence.path for offence in offences} - {o.path for o in failing})
    print(
        f"{len(failing)} offence(s) outside the pending files; "
        f"{len(offences) - len(failing)} in {len(pending)} pending file(s)."
    )
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
