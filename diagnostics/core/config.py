"""Typed configs loaded from YAML with `key=value` overrides.

Each command has one dataclass config (see `TestbedConfig` below, and the diagnose/train configs
next to their code). `load_config(cls, path, overrides)` reads a YAML file that mirrors the dataclass
key for key, applies `key=value` overrides from the command line, checks types, and runs the
dataclass's `__post_init__` range checks. Every error names the key and the file it came from and is
raised before any model is loaded.

Nested dataclasses are addressed with dots: `teacher.num_layers=4`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config value; the message names the key and where it came from."""


def check(condition: bool, key: str, message: str) -> None:
    """Range/cross-field check for `__post_init__`: raise ConfigError naming `key` when false."""
    if not condition:
        raise ConfigError(f"{key}: {message}")


def check_at_least(config: Any, minimum: int, *keys: str) -> None:
    """`check` that each named field of `config` is >= `minimum`, in order ("must be >= minimum, got value")."""
    for key in keys:
        value = getattr(config, key)
        check(value >= minimum, key, f"must be >= {minimum}, got {value}")


def check_device(device: str, key: str = "device", *, allowed: tuple[str, ...] = ("auto", "cpu", "cuda", "mps"),
                 indexed: bool = True) -> None:
    """`device` names a device type in `allowed` (with `:N` when `indexed`) that exists on this machine.

    "auto" always passes (it picks CUDA when present, else CPU). A device that torch does not know or that
    this machine lacks is an error naming `key` now, not a silent CPU run whose manifest says otherwise.
    """
    if device == "auto":
        return
    kind, _, index = device.partition(":")
    forms = ", ".join(allowed) + (" (cuda:N for one GPU)" if indexed and "cuda" in allowed else "")
    check(kind in allowed and (not index or (indexed and index.isdigit())), key,
          f"must be one of {forms}, got {device!r}")
    if kind == "cpu":
        check(not index, key, f"cpu takes no index, got {device!r}")
        return
    import torch  # only for a GPU device: plain config loading stays light

    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        check(count > 0, key, f"{device!r} requested but this machine has no CUDA GPU visible to torch "
              f"(use {key}=cpu, or {key}=auto to take a GPU when there is one)")
        check(not index or int(index) < count, key, f"{device!r} requested but only {count} GPU(s) are visible")
    elif kind == "mps":
        check(torch.backends.mps.is_available(), key, f"{device!r} requested but MPS is not available here")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against the type `annotation`; allow int -> float. Raise naming the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: cannot be null")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {annotation.__name__} fields, got {value!r}")
        return _build(annotation, value, prefix=f"{key}.")
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads `1e-3` as a string
            try:
                value = float(value)  # then the finiteness check below ("1e999", "nan" are strings too)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):  # no config number means inf or NaN; YAML reads `.inf` / `.nan` as floats
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {annotation!r}")


def _build(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key for {cls.__name__} (known: {', '.join(sorted(names))})"
        )
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=3` -> (['a', 'b'], 3); the value is parsed as YAML (so `true`, `1e-3`, `[8, 16]` work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        column = f" at column {where.column + 1} of the value" if where is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(f"override {text!r}: {key}: cannot parse {raw!r}{column}: {problem} "
                          f"(lists are written [1, 2], strings with spaces quoted)") from None
    return key.split("."), value


def _set_nested(data: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        node = data.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(path)}: {part} is not a mapping")
        data = node
    data[path[-1]] = value


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build `cls` from the YAML file at `path` (or defaults), then apply `key=value` overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: invalid YAML: {' '.join(str(exc).split())}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path}: cannot read it: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
        data = loaded or {}
    for text in overrides or []:
        key_path, value = parse_override(text)
        _set_nested(data, key_path, value)
    if overrides:
        source += " + command-line overrides"
    try:
        return _build(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in {source})") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain dict (JSON/YAML-serialisable) of a config dataclass, for manifests."""
    return dataclasses.asdict(config)
