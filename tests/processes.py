"""Test helper: start a command and kill -9 it once it has written its first checkpoint (the resume tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


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
