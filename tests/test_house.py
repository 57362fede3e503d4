"""The house holds: packages import one way, diagnostics' rooms in their order, no import loop, no deferred import.

Read from the code's own import statements (ast), every subpackage included: `diagnostics` is the base, `opd` and
`analysis` build on it, `taopd` wires them; inside `diagnostics` each room may import only the rooms below it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("diagnostics", "opd", "analysis", "taopd")

# package -> the project packages it may import
PACKAGE_IMPORTS = {
    "diagnostics": {"diagnostics"},
    "opd": {"diagnostics", "opd"},
    "analysis": {"diagnostics", "analysis"},
    "taopd": set(PACKAGES),
}
# diagnostics' rooms, each with the rooms it may import (bottom first); the diagnostic's own modules on top
ROOMS = {
    "core": set(),
    "lm": {"core"},
    "data": {"core"},
    "signals": {"core"},
    "losses": {"core"},
    "generation": {"core", "lm", "data", "signals"},
    "accuracy": {"core", "lm", "data", "generation"},
    "testbed": {"core", "lm", "data", "signals", "generation", "accuracy"},
    "bank": {"core", "lm"},
    "engine": {"core", "lm", "losses"},
    "shards": {"core"},
    "pair": {"core", "lm", "data", "generation", "testbed"},
    "diagnose_config": {"core", "lm", "signals", "losses", "generation"},
    "diagnose": {"core", "lm", "data", "signals", "losses", "generation", "bank", "engine", "shards", "pair",
                 "diagnose_config", "testbed"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(project module imported, at top level?) for every import statement of the file; `from pkg import mod`
    counts as importing `pkg.mod` where that is a module."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target in MODULES:
                out.append((target, id(node) in top))
    return out


def room(module: str) -> str:
    """diagnostics.<room>[.x] -> <room>; the package's own __init__ is 'diagnostics'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "diagnostics"


def test_every_room_is_listed():
    rooms = {room(m) for m in MODULES if m.startswith("diagnostics.")}
    assert rooms == set(ROOMS), f"rooms not in ROOMS: {rooms - set(ROOMS)}; listed but absent: {set(ROOMS) - rooms}"


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_import_one_way(package):
    bad = [f"{m} imports {t}" for m, p in MODULES.items() if m.split(".")[0] == package
           for t, _ in imports_of(p) if t.split(".")[0] not in PACKAGE_IMPORTS[package]]
    assert not bad, "; ".join(bad)


def test_diagnostics_rooms_import_only_rooms_below():
    bad = []
    for m, p in MODULES.items():
        if not m.startswith("diagnostics."):
            continue
        for t, _ in imports_of(p):
            if t.startswith("diagnostics.") and room(t) != room(m) and room(t) not in ROOMS[room(m)]:
                bad.append(f"{m} imports {t}")
    assert not bad, "; ".join(bad)


OPTIONAL_PACKAGES = {"vllm", "trl", "lm_eval", "deepspeed"}  # heavy, and needed only by the paths that use them


def top_level_packages(path: Path) -> set[str]:
    """The third-party top-level packages a file imports when it is imported (module level, blocks included)."""
    names = set()
    stack = list(ast.parse(path.read_text()).body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
            continue
        stack.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def optional_wrappers() -> set[str]:
    """The project's modules that import an optional heavy package at their top, directly or through another."""
    wrappers = {m for m, p in MODULES.items() if top_level_packages(p) & OPTIONAL_PACKAGES}
    while grown := {m for m, p in MODULES.items() if m not in wrappers
                    and any(t in wrappers for t, at_top in imports_of(p) if at_top)}:
        wrappers |= grown
    return wrappers


def test_no_deferred_imports_of_the_project():
    """Imports of the project's own modules sit at the top of the file; only a module that wraps an optional heavy
    package (it imports trl, vllm, lm_eval or deepspeed at its top) may be imported where it is used."""
    wrappers = optional_wrappers()
    bad = [f"{m} imports {t} inside a function or block" for m, p in MODULES.items()
           for t, at_top in imports_of(p) if not at_top and t not in wrappers]
    assert not bad, "; ".join(bad)


def test_the_optional_wrappers_are_the_trl_engine():
    assert optional_wrappers() == {"opd.integrations.trl", "opd.trl_recipe"}


def import_loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    loops = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                loops.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return loops


def test_import_loops_are_found():
    assert import_loops({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_loops({"a": {"b"}, "b": set()}) == []


def test_no_import_loop_in_the_project():
    graph = {m: {t for t, _ in imports_of(p) if t != m} for m, p in MODULES.items()}
    assert import_loops(graph) == []
