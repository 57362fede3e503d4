"""Atomic training checkpoints: student, optimizer, RNG states, data position and metrics so far.

Layout of one arm's checkpoint, `<arm dir>/ckpt-<step:06d>/`:

    student.pt          the student's state dict (exact tensors; tied weights load back as tied)
    optimizer.pt        the optimizer's state dict
    rng_rank<r>.pt      python, numpy, torch (and CUDA) RNG states of process r
    state.json          step, data position, cumulative training seconds
    metrics.parquet     the arm's metric rows up to this step

It is written into a hidden `.ckpt-<step>.tmp` directory, fsynced, then renamed: a process killed at
any moment leaves either no checkpoint for that step or a complete one. After the rename, older
checkpoints of the arm are deleted. `latest_checkpoint` ignores (and removes) stale temporaries.
With several processes, every rank writes its own RNG file and rank 0 writes the rest.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from diagnostics.core.files import disk_full_error, read_json
from opd.distributed import World

_NAME = re.compile(r"^ckpt-(\d{6})$")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for directory in (root, root.parent):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(
    arm_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    metrics: list[dict],
    world: World,
) -> Path:
    """Write `arm_dir/ckpt-<step>` atomically (a no-op if it already exists) and drop older ones."""
    final = arm_dir / f"ckpt-{step:06d}"
    tmp = arm_dir / f".ckpt-{step:06d}.tmp"
    if final.is_dir():
        return final
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    world.barrier()
    try:
        torch.save(rng_state(), tmp / f"rng_rank{world.rank}.pt")
        if world.is_main:
            torch.save(model.state_dict(), tmp / "student.pt")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({**state, "step": step, "world_size": world.size}, indent=2))
            pd.DataFrame(metrics).to_parquet(tmp / "metrics.parquet", index=False)
    except (OSError, RuntimeError) as exc:  # a full disk: one line naming the checkpoint; the older one stays
        full = disk_full_error(exc, arm_dir, final)
        shutil.rmtree(tmp, ignore_errors=True)
        if full is not None:
            raise full from None
        raise
    world.barrier()
    if world.is_main:
        _fsync_tree(tmp)
        tmp.rename(final)
        for old in arm_dir.iterdir():
            match = _NAME.match(old.name)
            if match and int(match.group(1)) < step:
                shutil.rmtree(old, ignore_errors=True)
    world.barrier()
    return final


def latest_checkpoint(arm_dir: Path) -> Path | None:
    """The newest complete checkpoint of an arm, or None."""
    if not arm_dir.is_dir():
        return None
    done = sorted(p for p in arm_dir.iterdir() if _NAME.match(p.name) and p.is_dir())
    return done[-1] if done else None


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World
) -> tuple[dict[str, Any], list[dict]]:
    """Restore model, optimizer and this rank's RNG states; returns (state.json, metric rows)."""
    state = read_json(path / "state.json", "the checkpoint's state")
    if state.get("world_size", 1) != world.size:
        raise ValueError(f"{path} was written by {state.get('world_size')} processes; "
                         f"resuming with {world.size} is not supported")
    model.load_state_dict(torch.load(path / "student.pt", map_location=world.device, weights_only=True))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=world.device, weights_only=True))
    set_rng_state(torch.load(path / f"rng_rank{world.rank}.pt", weights_only=False))
    metrics = pd.read_parquet(path / "metrics.parquet").to_dict("records")
    return state, metrics


def remove_checkpoints(arm_dir: Path) -> None:
    """Delete every checkpoint (and stale temporary) of a finished arm."""
    for path in arm_dir.iterdir() if arm_dir.is_dir() else []:
        if _NAME.match(path.name) or (path.name.startswith(".ckpt-") and path.name.endswith(".tmp")):
            shutil.rmtree(path, ignore_errors=True)
