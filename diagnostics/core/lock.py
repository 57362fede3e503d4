"""One process at a time per run directory: an advisory lock on `<run_dir>/.lock`.

Two commands on one run (two `taopd train --resume`, a `diagnose` rerun while the first is still
going) would interleave checkpoint renames and overwrite each other's shards; the second one
refuses instead, naming the run directory and the process that holds it.

The lock is `fcntl.flock` on an open file: the kernel drops it when the holding process exits,
however it exits (killed included), so a stale lock never blocks a resume. The holder's pid is
written into the file for the message only. A lock is held until `release_run_lock` (both recipes
call it when they finish; `taopd` releases every lock on exit, `release_all_run_locks`); taking it
again for a directory this process already holds is a no-op.

Simplifications: flock is per host; two hosts sharing a run directory over NFS are not excluded.
Under several processes of one run (torchrun) only rank 0 takes the lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = ".lock"

_held: dict[Path, int] = {}  # resolved run directory -> open file descriptor holding its flock


class RunLockedError(RuntimeError):
    """Another process is working on the same run directory."""


def acquire_run_lock(run_dir: str | Path) -> Path:
    """Lock `run_dir` (created if missing) for this process, or raise RunLockedError naming the holder."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise RunLockedError(
            f"{run_dir} is in use by another taopd process{holder}: wait for it to finish (or stop it), "
            f"or pass run_name=<new name> for a separate run"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[run_dir] = fd
    return run_dir


def release_run_lock(run_dir: str | Path) -> None:
    """Give the lock of `run_dir` back (no-op if this process does not hold it)."""
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def release_all_run_locks() -> None:
    """Give back every lock this process holds (the `taopd` command does, whatever way it ends)."""
    for run_dir in list(_held):
        release_run_lock(run_dir)


def _read_holder(fd: int) -> str:
    """" (pid N)" from the lock file, or "" when it holds none."""
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""
