"""Layers point one way: opd builds on diagnostics; opd never imports analysis or taopd; diagnostics never imports
opd."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package, forbidden", [
    ("opd", {"analysis", "taopd"}), ("diagnostics", {"opd", "analysis", "taopd"}),
])
def test_imports_point_one_way(package, forbidden):
    for path in sorted((ROOT / package).glob("*.py")):
        assert not imported_packages(path) & forbidden, f"{path.name} imports {imported_packages(path) & forbidden}"
