"""Layering: analysis imports diagnostics at most, never opd or taopd; the public names resolve."""

from __future__ import annotations

import ast
from pathlib import Path

import analysis

PKG = Path(analysis.__file__).resolve().parent


def test_no_upward_imports():
    for path in PKG.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in {"opd", "taopd"}, f"{path.name} imports {n}"


def test_public_api():
    for name in ("summarize", "format_report", "make_all_figures", "write_token_view", "load_run", "with_k"):
        assert callable(getattr(analysis, name))
