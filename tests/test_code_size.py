"""Size limits of the packages, held by parsing the code: a file at most 500 lines, a function at most 80.

A function's length counts from its first decorator to its last line (docstring and comments included); methods and
nested functions count on their own, and a nested function's lines count towards its parent as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("diagnostics", "opd", "analysis", "taopd")
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80


def package_files() -> list[Path]:
    """Every .py file of the packages, sorted."""
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def function_lengths(path: Path) -> list[tuple[str, int, int]]:
    """(qualified name, first line, length in lines) of every def / async def in the file, methods included."""
    out: list[tuple[str, int, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                out.append((prefix + child.name, first, child.end_lineno - first + 1))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(), filename=str(path)), "")
    return out


def test_the_packages_have_python_files():
    names = {p.relative_to(ROOT).as_posix() for p in package_files()}
    assert {"diagnostics/engine.py", "opd/trainer.py", "analysis/stats.py", "taopd/cli.py"} <= names


def test_no_file_over_the_line_limit():
    over = [f"{p.relative_to(ROOT)}: {n} lines" for p in package_files()
            if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES]
    assert not over, f"files over {MAX_FILE_LINES} lines: " + "; ".join(over)


def test_no_function_over_the_line_limit():
    over = [f"{p.relative_to(ROOT)}:{line} {name}: {n} lines"
            for p in package_files() for name, line, n in function_lengths(p) if n > MAX_FUNCTION_LINES]
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines: " + "; ".join(over)


@pytest.mark.parametrize("source, expected", [
    ("def f():\n    return 1\n", [("f", 1, 2)]),
    ("class A:\n    @staticmethod\n    async def g():\n        pass\n", [("A.g", 2, 3)]),
    ("def outer():\n    def inner():\n        pass\n    return inner\n", [("outer", 1, 4), ("outer.inner", 2, 2)]),
])
def test_function_lengths_counts_methods_decorators_and_nesting(tmp_path, source, expected):
    path = tmp_path / "m.py"
    path.write_text(source)
    assert function_lengths(path) == expected
