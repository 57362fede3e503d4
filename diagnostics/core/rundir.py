"""Run directories: named by a hash of what the run computes, holding one config, claimed by one process.

* `config_hash`: 8 hex digits of the sorted-JSON payload, the `<run>` in `results/<command>/<run>`.
* `check_run_dir`: may this directory hold this run (a differing saved config is an error naming each key).
* `claim_run_dir`: create it and take its lock (`diagnostics.core.lock`) before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

from diagnostics.core.config import ConfigError
from diagnostics.core.lock import acquire_run_lock
from diagnostics.core.paths import check_user_path


def config_hash(payload: dict[str, Any]) -> str:
    """8 hex digits naming a run: sha256 of the payload as sorted JSON."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:8]


def check_run_dir(
    run_dir: Path, record: dict[str, Any], *, resume: bool | None = None, ignore: Collection[str] = ()
) -> None:
    """Check that `run_dir` may hold the run whose `config.json` is `record` (the caller writes it).

    resume None: continue the run when there is one (the diagnostic skips finished shards);
    True: there must be one to continue; False: there must be none. A saved config that differs
    from `record` outside the keys in `ignore` is an error naming each key and both values.
    """
    check_user_path(Path(run_dir).parent, "out_dir", "writable directory")  # a file, a symlink loop, read-only
    if os.path.lexists(run_dir):
        check_user_path(run_dir, "run directory", "writable directory")
    saved_path = Path(run_dir) / "config.json"
    if saved_path.exists() and not saved_path.is_file():
        raise ValueError(f"{saved_path} is not a file; the run directory is damaged: use another run_name")
    if not saved_path.is_file():
        if resume:
            raise FileNotFoundError(f"--resume: {run_dir} holds no run to resume")
        return
    if resume is False:
        raise FileExistsError(
            f"{run_dir} already holds a run: pass --resume to continue it, or run_name=<new name> for a new one"
        )
    try:
        saved = json.loads(saved_path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{saved_path}: the run's saved config is not valid JSON ({exc}); the run directory is "
                          f"damaged: restore the file or use another run_name") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{saved_path}: the run's saved config is not a JSON object; use another run_name")
    differing = sorted(k for k in set(saved) | set(record) if k not in ignore and saved.get(k) != record.get(k))
    if differing:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {record.get(k)!r}" for k in differing)
        raise ConfigError(
            f"{run_dir} holds a run with a different config (differing keys: {detail}); use another run_name"
        )


def claim_run_dir(
    run_dir: Path, record: dict[str, Any], *, resume: bool | None = None, ignore: Collection[str] = (),
    lock: bool = True,
) -> None:
    """`check_run_dir`, then this process's lock on `run_dir` (`diagnostics.core.lock`), then the check again.

    The first check fails before the directory is created; the second, under the lock, sees what a
    process that held the lock before us left. `lock` False: another rank of this run holds it.
    """
    check_run_dir(run_dir, record, resume=resume, ignore=ignore)
    if lock:
        acquire_run_lock(run_dir)
        check_run_dir(run_dir, record, resume=resume, ignore=ignore)


# Files that make a directory some run's: an output written there would replace them.
RUN_FILES = ("tokens.parquet", "config.json", "manifest.json", "metrics.parquet", "bank.parquet", "rollouts.parquet",
             "group.parquet", "evaluation.parquet")


def check_not_a_run(directory: str | Path, key: str, *, allowed_kind: str = "") -> None:
    """`directory`, given as an output directory, is not another run's directory (holding RUN_FILES) unless its
    manifest says it is a run of `allowed_kind` (a rerun of the same command): its files would be replaced."""
    directory = Path(directory)
    held = [name for name in RUN_FILES if (directory / name).is_file()]
    if not held:
        return
    if allowed_kind and (directory / "manifest.json").is_file():
        try:
            kind = json.loads((directory / "manifest.json").read_bytes().decode("utf-8")).get("kind")
        except (ValueError, AttributeError):
            kind = None
        if kind == allowed_kind:
            return
    raise ValueError(f"{key}: {directory} is another run's directory (it holds {', '.join(held[:3])}); writing there "
                     f"would replace its files: choose another directory")
