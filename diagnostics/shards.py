"""The diagnostic's resumable shards, split over the processes of a launch, then merged by the first.

A bank of B sequences is cut into shards of `shard_sequences`; each shard's [b, T] tables are written
atomically as `shards/shard_XXXX.pt` with the bank rows they hold and the run's config hash
(`diagnostics.core.shards`: a damaged, swapped or foreign shard is named on resume), so a rerun after a kill
computes only the missing ones. Under a
multi-process launch (`torchrun --nproc_per_node N -m taopd.cli diagnose ...`) process r computes the
shards r, r + N, r + 2N, ... (round robin: neighbouring shards cost alike, so every process gets a fair
share of a ragged bank) and writes them under the same names as one process would; the first process then
waits for every shard file and merges them in shard order. What is merged is the same files one process
writes, so the merged tables, and every table computed from them, do not depend on the number of processes.

The wait is on files, not on a collective: a process may finish its shards long before another (a
collective's timeout, 30 minutes under gloo, would end a long run), and a process that dies ends the launch
(torchrun stops the others), after which a rerun resumes shard by shard as with one process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import torch

from diagnostics.core.progress import progress_bar
from diagnostics.core.shards import read_shard, write_shard

WAIT_POLL_S = 0.5  # how often a waiting process looks for the files it needs


class Processes(Protocol):
    """What the diagnostic needs to know of a launch: `opd.distributed.World` provides it."""

    @property
    def rank(self) -> int: ...

    @property
    def size(self) -> int: ...

    @property
    def is_main(self) -> bool: ...

    @property
    def device(self) -> torch.device: ...


def shard_path(shard_dir: Path, shard: int) -> Path:
    return shard_dir / f"shard_{shard:04d}.pt"


def shards_of(n_shards: int, rank: int, size: int) -> list[int]:
    """The shards process `rank` of `size` computes: rank, rank + size, ..."""
    return list(range(rank, n_shards, size))


def wait_for(paths: Iterable[Path]) -> None:
    """Block until every path exists (each written atomically by another process of the launch)."""
    missing = list(paths)
    while missing := [p for p in missing if not p.is_file()]:
        time.sleep(WAIT_POLL_S)


def shard_rows(shard: int, n_rows: int, shard_sequences: int) -> list[int]:
    """The bank rows shard `shard` holds."""
    return list(range(shard * shard_sequences, min((shard + 1) * shard_sequences, n_rows)))


def run_shards(
    n_rows: int,
    shard_sequences: int,
    shard_dir: Path,
    compute: Callable[[int], dict[str, torch.Tensor]],
    *,
    processes: Processes | None = None,
    progress: bool = True,
    desc: str = "shards",
) -> dict[str, torch.Tensor] | None:
    """Compute this process's missing shards of a bank of `n_rows` (`compute(shard)` -> name: [b, T]), write each
    atomically with its rows; on the first process, wait for all shards, check each holds its rows of this run,
    and return them concatenated in shard order (name: [B, T]); on the others, None once their own are written."""
    n_shards = -(-n_rows // shard_sequences)
    rank, size = (0, 1) if processes is None else (processes.rank, processes.size)
    for shard in progress_bar(shards_of(n_shards, rank, size), desc=desc, enabled=progress and rank == 0):
        path = shard_path(shard_dir, shard)
        if not path.is_file():
            write_shard(path, compute(shard), shard_rows(shard, n_rows, shard_sequences))
    if rank != 0:
        return None
    paths = [shard_path(shard_dir, shard) for shard in range(n_shards)]
    wait_for(paths)  # the other processes' shards
    parts: dict[str, list[torch.Tensor]] = {}
    for shard, path in enumerate(paths):
        for name, grid in read_shard(path, shard_rows(shard, n_rows, shard_sequences)).items():
            parts.setdefault(name, []).append(grid)
    return {name: torch.cat(grids) for name, grids in parts.items()}
