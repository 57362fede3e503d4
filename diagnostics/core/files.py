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

from diagnostics.core.paths import check_user_path


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


def disk_full_error(exc: BaseException, directory: str | Path, path: str | Path) -> OSError | None:
    """The one-line ENOSPC error naming `path` when `exc` (from a writer: torch.save says "unexpected pos",
    pyarrow names no file) came from a full disk under `directory`; None otherwise."""
    if not isinstance(exc, OSError | RuntimeError):
        return None
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or _disk_full(Path(directory)):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return None


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


def read_user_parquet(path: str | Path, key: str) -> pd.DataFrame:
    """A parquet file the user named by `key`: a missing or non-parquet file is an error naming key and path."""
    try:
        check_user_path(path, key, "file")
    except FileNotFoundError:
        raise FileNotFoundError(f"{key}: {path} does not exist") from None
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... naming no key
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{key}: {path} cannot be read as parquet ({first})") from None


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """The JSON value of `path`; a damaged file is a ValueError naming the file and what it is (never a bare
    JSONDecodeError, whose message names no file)."""
    path = Path(path)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: {what} is not valid JSON ({exc}); the file is damaged: restore it, or delete "
                         f"the run and rerun") from None

