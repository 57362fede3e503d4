"""The two lookups every name registry of the toolkit shares (losses, selection scores).

A registry is a plain dict from name to a record with the registered function as ``fn``. Adding a name
twice raises ValueError naming the first owner; looking up an unknown name raises KeyError listing the
registered names.
"""

from __future__ import annotations

from typing import Any, TypeVar

R = TypeVar("R")


def add_once(registry: dict[str, Any], kind: str, name: str, record: Any) -> None:
    """registry[name] = record; ValueError when ``name`` is already registered."""
    if name in registry:
        raise ValueError(f"{kind} {name!r} is already registered (by {registry[name].fn.__qualname__})")
    registry[name] = record


def lookup(registry: dict[str, R], kind: str, plural: str, name: str) -> R:
    """registry[name]; KeyError listing the registered names (in registration order) when unknown."""
    try:
        return registry[name]
    except KeyError:
        raise KeyError(f"unknown {kind} {name!r}; registered {plural}: {list(registry)}") from None
