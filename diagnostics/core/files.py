"""Atomic file writes: a killed process leaves either the old file or the complete new one.

Results are meant to be shared: a written file gets the mode a plain `open(path, "w")` would give it
(0666 less the process umask), not the 0600 of the temporary file it is renamed from.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_full(directory: Path) -> bool:
    """Less than 1 MiB left on the file system of `directory` (a failed write is then a full disk)."""
    try:
        return shutil.disk_usage(directory).free < 1 << 20
    except OSError:
        return False


def file_mode() -> int:
    """0o666 less the current umask (what `open(path, "w")` creates)."""
    mask = os.umask(0o022)  # reading the umask means setting it; restored at once
    os.umask(mask)
    return 0o666 & ~mask


def share_tree(directory: str | Path) -> None:
    """Give every file under `directory` the umask's mode (libraries such as transformers' save_pretrained
    write model.safetensors 0600); directories are left as they are."""
    mode = file_mode()
    for path in Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call write(tmp_path) on a temporary file beside `path`, fsync it, then os.replace it into place.

    A process killed at any moment leaves either the old file or the complete new one at `path`
    (plus, at worst, a hidden `.name.*.tmp` file beside it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())  # mkstemp made it 0600
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        disk_full = isinstance(exc, OSError | RuntimeError) and _disk_full(path.parent)  # before freeing tmp
        Path(tmp).unlink(missing_ok=True)
        if disk_full:  # torch.save says "unexpected pos", pyarrow names no file: say what happened, and where
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
        if isinstance(exc, OSError) and exc.filename is None:
            raise OSError(exc.errno or errno.EIO, exc.strerror or str(exc), str(path)) from exc
        raise
    _fsync_dir(path.parent)
    return path


def write_json(path: str | Path, data: Any) -> Path:
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_parquet(path: str | Path, df: pd.DataFrame) -> Path:
    return atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))
