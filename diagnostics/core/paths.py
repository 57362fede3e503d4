"""Paths the user gives, checked for what they must be before anything runs.

`check_user_path(path, key, kind)`: a file, a directory, or a writable directory (which may not exist yet);
the error names the config key or flag, the path, and what the path is instead (missing, a directory where a
file is expected, a file where a directory is, a symlink loop, no permission).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

PATH_KINDS = ("file", "directory", "writable directory")


def check_user_path(path: str | Path, key: str, kind: str) -> Path:
    """A path the user gave, checked for what it must be (`kind`: file | directory | writable directory, the
    last may not exist yet: its nearest existing parent must then be a writable directory); an error names
    `key`, the path and what it is instead (a symlink loop, a directory where a file is expected, ...)."""
    if kind not in PATH_KINDS:
        raise ValueError(f"kind must be one of {PATH_KINDS}, got {kind!r}")
    path = Path(path).expanduser()
    try:
        info = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError(f"{key}: {path} is a symlink loop (it points back to itself)") from None
        if exc.errno == errno.ENOTDIR:
            raise ValueError(f"{key}: {path}: a part of the path is a file, not a directory") from None
        if exc.errno != errno.ENOENT:
            raise OSError(exc.errno, f"{key}: {exc.strerror}", str(path)) from None
        if kind != "writable directory":
            raise FileNotFoundError(f"{key}: {kind} {path} does not exist") from None
        parent = next(p for p in path.parents if os.path.lexists(p) or p == p.parent)
        check_user_path(parent, key, "writable directory")
        return path
    is_dir = stat.S_ISDIR(info.st_mode)
    if kind == "file" and is_dir:
        raise ValueError(f"{key}: {path} is a directory; a file is expected here")
    if kind == "file" and not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{key}: {path} is not a regular file")
    if kind != "file" and not is_dir:
        raise ValueError(f"{key}: {path} is a file, not a directory")
    if kind == "writable directory" and not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"Permission denied ({key}: cannot write there)", str(path))
    if kind == "file" and not os.access(path, os.R_OK):
        raise PermissionError(errno.EACCES, f"Permission denied ({key}: cannot read it)", str(path))
    return path
