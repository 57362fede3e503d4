"""Test helpers: start a command and kill -9 it (or one process of a torchrun launch) mid-run (the resume tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil


def kill_after_first_checkpoint(cmd: list[str], cwd: Path, checkpoint_dir: Path, timeout_s: float) -> subprocess.Popen:
    """Run `cmd` in `cwd`, wait until `checkpoint_dir` holds a `ckpt-*`, SIGKILL it; returns the reaped process.
    Fails if the command ends first or no checkpoint appears within `timeout_s`."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while not list(checkpoint_dir.glob("ckpt-*")):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, f"no checkpoint within {timeout_s:.0f} s"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return proc


def kill_rank_when(cmd: list[str], cwd: Path, env: dict[str, str], *, rank: int, ready: Callable[[], bool],
                   timeout_s: float) -> int:
    """Run a torchrun `cmd`, wait until `ready()`, SIGKILL the worker of `rank` (found by its RANK environment
    variable) and return the launcher's exit status once it has stopped the others. Fails if the command ends
    first or `ready()` does not hold within `timeout_s`."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert proc.poll() is None, "the run ended before it was ready to be killed"
        assert time.monotonic() < deadline, f"not ready within {timeout_s:.0f} s"
        time.sleep(0.01)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if p.environ().get("RANK") == str(rank)]
    assert workers, f"no worker of rank {rank} under {proc.pid}"
    os.kill(workers[0].pid, signal.SIGKILL)
    return proc.wait(timeout=120)
