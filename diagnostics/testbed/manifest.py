"""The testbeds shipped inside the package (`diagnostics/testbed/shipped/`): found by their config's hash, every
file checked against the manifest's sha256 before use, and the manifest written when a build is shipped.

`shipped/manifest.json` lists, per shipped testbed, the config file and the config hash (`TestbedConfig.cache_key`)
it was built from, the machine it was built on (`cpu_identity`: bit identity of a rebuild is expected only there)
and the sha256 of each of its files. A shipped file that is missing, altered or not in the manifest is an error
naming it: the testbed is neither used nor silently rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import torch

from diagnostics.core.files import write_json
from diagnostics.testbed.config import TestbedConfig

SHIPPED_DIR = Path(__file__).resolve().with_name("shipped")
MANIFEST = "manifest.json"
# another directory of shipped testbeds (tests point it at a tampered copy; unset: the package's own)
SHIPPED_ENV = "TAOPD_SHIPPED_TESTBEDS"


class ShippedTestbedError(ValueError):
    """A shipped testbed's file is missing, altered or unlisted (a ValueError: the CLI prints one line)."""


def shipped_dir() -> Path:
    """Where the shipped testbeds and their manifest live: $TAOPD_SHIPPED_TESTBEDS, else the package's."""
    return Path(os.environ.get(SHIPPED_ENV) or SHIPPED_DIR)


def read_manifest(directory: Path | None = None) -> dict[str, dict]:
    """Shipped testbeds by name (`{}` where the directory ships none)."""
    path = (directory or shipped_dir()) / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())["testbeds"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ShippedTestbedError(f"{path}: not a shipped-testbed manifest ({exc})") from exc


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cpu_identity() -> dict[str, str]:
    """What a bit-identical rebuild depends on: the CPU model, the kernels torch picks for it, and torch."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return {"cpu": model, "capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}


def find_shipped(config: TestbedConfig, directory: Path | None = None) -> tuple[str, Path] | None:
    """(name, root) of the shipped testbed built from `config`'s hash, every file verified; None if none is."""
    directory = directory or shipped_dir()
    key = config.cache_key()
    for name, entry in read_manifest(directory).items():
        if entry["cache_key"] == key:
            return name, verify_shipped(name, entry, directory)
    return None


def shipped_entry(config: TestbedConfig, directory: Path | None = None) -> tuple[str, dict] | None:
    """(name, manifest entry) of the shipped testbed with `config`'s hash, unverified; None if none."""
    key = config.cache_key()
    return next(((n, e) for n, e in read_manifest(directory).items() if e["cache_key"] == key), None)


def verify_shipped(name: str, entry: dict, directory: Path) -> Path:
    """The testbed's root, once each file's sha256 matches the manifest and no unlisted file is there."""
    root = directory / name
    manifest = directory / MANIFEST
    listed = entry["files"]
    for relative, expected in listed.items():
        path = root / relative
        if not path.is_file():
            raise ShippedTestbedError(f"shipped testbed '{name}': {path} is missing (listed in {manifest}); "
                                      "reinstall taopd or restore it (git checkout)")
        found = sha256_file(path)
        if found != expected:
            raise ShippedTestbedError(
                f"shipped testbed '{name}': {path} does not match its sha256 in {manifest} (expected "
                f"{expected[:12]}..., found {found[:12]}...); reinstall taopd or restore it (git checkout)")
    unlisted = sorted(str(p) for p in root.rglob("*") if p.is_file() and str(p.relative_to(root)) not in listed)
    if unlisted:
        raise ShippedTestbedError(f"shipped testbed '{name}': {unlisted[0]} is not in {manifest}; remove it")
    return root


def write_manifest_entry(name: str, root: Path, config: TestbedConfig, config_file: str,
                         directory: Path | None = None) -> dict:
    """Record the testbed copied to `root` (= `directory/name`): its config hash, build machine, files' sha256."""
    directory = directory or shipped_dir()
    entries = read_manifest(directory)
    entries[name] = {
        "config_file": config_file,
        "cache_key": config.cache_key(),
        "built_on": cpu_identity(),
        "files": {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()},
    }
    write_json(directory / MANIFEST, {"testbeds": dict(sorted(entries.items()))})
    return entries[name]
