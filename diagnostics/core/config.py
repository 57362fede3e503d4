"""Typed configs loaded from YAML with `key=value` overrides.

Each command has one dataclass config (see `TestbedConfig` below, and the diagnose/train configs
next to their code). `load_config(cls, path, overrides)` reads a YAML file that mirrors the dataclass
key for key, applies `key=value` overrides from the command line, checks types, and runs the
dataclass's `__post_init__` range checks. Every error names the key and the file it came from and is
raised before any model is loaded.

Nested dataclasses are addressed with dots: `teacher.num_layers=4`.

What the user wrote is honoured or refused, never dropped: a YAML file that sets one key twice is an error
naming the key (PyYAML keeps the last silently), and `explicit_keys()` tells a `__post_init__` which keys the
user wrote (every command-line override; a YAML key whose value differs from the default, or any key of a
file that also sets `preset`), so a preset can refuse to overwrite them (`opd.config`).
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from diagnostics.core.paths import check_user_path

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config value; the message names the key and where it came from."""


# Keys the user wrote, while `load_config` builds a config: key -> where ("the command line" or the file).
# None outside load_config (a config built in Python): callers then treat non-default values as written.
_EXPLICIT: contextvars.ContextVar[tuple[type, dict[str, str]] | None] = contextvars.ContextVar("explicit_keys",
                                                                                              default=None)
MIN_TEMPERATURE = 1e-3  # below it logits / T overflow float16 (|logit| ~ 65: 65 / 1e-3 = 6.5e4) and sampling is greedy


def explicit_keys(config: Any) -> dict[str, str] | None:
    """The top-level keys the user wrote for `config` while `load_config` builds it (key -> where), or None when
    it is built directly in Python (not by `load_config`, or nested inside another config's checks)."""
    loading = _EXPLICIT.get()
    return loading[1] if loading is not None and type(config) is loading[0] else None


def field_default(config: Any, key: str) -> Any:
    """The dataclass default of `key` on `config` (its default_factory's value for lists and dicts)."""
    spec = next(f for f in dataclasses.fields(config) if f.name == key)
    return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default


def user_set(config: Any, key: str) -> bool:
    """Whether the user wrote `key` (`explicit_keys`); for a config built in Python, whether it is off its default."""
    written = explicit_keys(config)
    return key in written if written is not None else getattr(config, key) != field_default(config, key)


def check_applies(config: Any, key: str, applies: bool, why: str) -> None:
    """A key the run would ignore is refused, naming `why`, when the user wrote it (a silent no-op is a wrong run)."""
    check(applies or not user_set(config, key), key, f"does not apply here: {why}")


def check_unique(values: list, key: str) -> None:
    """No value twice in a list key: a duplicate would run (or report) the same thing twice."""
    seen = set()
    for value in values:
        if value in seen:
            raise ConfigError(f"{key}: {value!r} is given twice in {list(values)}; give each once")
        seen.add(value)


def check_temperature(value: float, key: str = "temperature") -> None:
    """A sampling temperature: finite (the loader checks) and >= MIN_TEMPERATURE."""
    check(value >= MIN_TEMPERATURE, key, f"must be >= {MIN_TEMPERATURE:g} (logits / T overflows below it; for the "
          f"most likely token use greedy decoding), got {value!r}")


def check_run_name(name: str, key: str = "run_name") -> None:
    """A run name is one path component: the run's directory right under out_dir, never above or inside it."""
    bad = (name in (".", "..") or "/" in name or "\\" in name or name != name.strip() or len(name.encode()) > 200
           or any(ord(c) < 32 or ord(c) == 127 for c in name))  # a newline or tab breaks every one-line message
    check(not bad, key, f"must be one directory name (no '/', not '.' or '..', no control characters or surrounding "
          f"spaces, at most 200 bytes), got {name!r}")


def check_run_keys(config: Any, *, unique: tuple[str, ...] = (), seeds: tuple[str, ...] = (),
                   named_out_dir: bool = True) -> None:
    """What every command's config shares: no list key holding a value twice (`unique`), seeds (a key or a list
    key) in [0, 2**31), a run name of one directory, and (`named_out_dir`) an out_dir that is not ''."""
    for key in unique:
        check_unique(getattr(config, key), key)
    for key in seeds:
        value = getattr(config, key)
        check(all(0 <= s < 2**31 for s in (value if isinstance(value, list) else [value])), key,
              f"each seed must be in [0, 2**31), got {value}")
    if getattr(config, "run_name", ""):
        check_run_name(config.run_name)
    if named_out_dir:
        check_out_dir(config.out_dir)


def check_cpu_threads(value: int, key: str = "cpu_threads") -> None:
    """torch threads: 0 (torch's default) up to the machine's CPUs (more only oversubscribes the cores)."""
    cpus = os.cpu_count() or 1
    check(0 <= value <= cpus, key, f"{value} threads on a machine with {cpus} CPUs: must be in [0, {cpus}] "
          f"(0 = torch's default)")


def check_out_dir(value: str, key: str = "out_dir") -> None:
    """An output directory is named: '' would write runs into whatever the current directory is."""
    check(bool(value.strip()), key, "must name a directory ('' would write into the current directory)")


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


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping setting one key twice (PyYAML keeps the last silently)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(f"{key}: set twice (lines {seen[key]} and {line}); keep one")
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


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
        try:  # a directory, a symlink loop, an unreadable file: said as such
            check_user_path(path, "config file", "file")
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        try:
            loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except ConfigError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: invalid YAML: {' '.join(str(exc).split())}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path}: cannot read it: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
        data = loaded or {}
    explicit = _written_keys(cls, data, source)
    given: dict[str, str] = {}
    for text in overrides or []:
        key_path, value = parse_override(text)
        key = ".".join(key_path)
        if key in given:  # the last would win silently
            raise ConfigError(f"{key}: given twice on the command line ({given[key]!r} and {text!r}); keep one")
        given[key] = text
        _set_nested(data, key_path, value)
        explicit[key_path[0]] = "the command line"
    if overrides:
        source += " + command-line overrides"
    token = _EXPLICIT.set((cls, explicit))
    try:
        return _build(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in {source})") from None
    finally:
        _EXPLICIT.reset(token)


def _written_keys(cls: type, data: dict[str, Any], source: str) -> dict[str, str]:
    """The YAML keys that count as written by the user: a value other than the default, or any key of a file
    that sets `preset` itself (a file mirroring the defaults key for key writes them as documentation)."""
    defaults = {f.name: (f.default_factory() if f.default is dataclasses.MISSING else f.default)
                for f in dataclasses.fields(cls) if f.init and (f.default is not dataclasses.MISSING
                                                                or f.default_factory is not dataclasses.MISSING)}
    sets_preset = bool(data.get("preset"))
    return {key: source for key, value in data.items()
            if sets_preset or key not in defaults or value != defaults[key]}


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain dict (JSON/YAML-serialisable) of a config dataclass, for manifests."""
    return dataclasses.asdict(config)
