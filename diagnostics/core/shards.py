"""Diagnostic shard files that know what they hold: their bank rows and the run's config hash.

A shard (`shards/shard_XXXX.pt`) holds [b, T] grids of one slice of the bank. On resume a finished shard
is read back instead of recomputed, so a shard that belongs elsewhere (a copy of another shard, a shard
of another run) or a damaged one would be merged silently. Each shard therefore records the bank rows
it holds and the hash of the run's `config.json` (less the keys a rerun may change, `RERUN_IGNORED`);
`read_shard` checks both and names the shard when they differ or when the file cannot be read (delete
the shard to have it recomputed).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from diagnostics.core.files import atomic_write, read_json

FORMAT = 1  # shard files written before this record carry no "format" key
RERUN_IGNORED = ("n_boot",)  # config.json keys a rerun of the same run may change (the summary's, not the shards')


def run_config_hash(run_dir: Path) -> str:
    """sha256 (16 hex) of the run's config.json without RERUN_IGNORED: the run a shard belongs to."""
    saved = read_json(Path(run_dir) / "config.json", "the run's saved config")
    payload = {k: v for k, v in saved.items() if k not in RERUN_IGNORED} if isinstance(saved, dict) else saved
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def write_shard(path: Path, grids: dict[str, torch.Tensor], seq_ids: list[int]) -> Path:
    """Write the shard's grids with the bank rows it holds and the run's config hash, atomically."""
    record = {"format": FORMAT, "seq_ids": [int(s) for s in seq_ids],
              "config_hash": run_config_hash(Path(path).parent.parent), "grids": grids}
    return atomic_write(path, lambda tmp: torch.save(record, tmp))


def read_shard(path: Path, seq_ids: list[int]) -> dict[str, torch.Tensor]:
    """The grids of a finished shard, checked to hold exactly `seq_ids` of this run; else a ValueError naming
    the shard (what is wrong, and that deleting it recomputes it)."""
    path = Path(path)
    fix = f"delete {path} to recompute it"
    try:
        record = torch.load(path, weights_only=True)
    except Exception as exc:  # torch reports a truncated zip as "Invalid argument", a pickle error, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"shard {path} is damaged and cannot be read ({first}); {fix}") from None
    if not isinstance(record, dict) or "format" not in record:  # a shard written before the record: rows only
        grids = record if isinstance(record, dict) else {}
        rows = {int(g.shape[0]) for g in grids.values() if isinstance(g, torch.Tensor)}
        if rows != {len(seq_ids)}:
            raise ValueError(f"shard {path} holds {sorted(rows)} rows, not the {len(seq_ids)} sequences it should; "
                             f"{fix}")
        return grids
    expected = [int(s) for s in seq_ids]
    if record.get("config_hash") != run_config_hash(path.parent.parent):
        raise ValueError(f"shard {path} belongs to another run (its config hash {record.get('config_hash')} is not "
                         f"this run's); {fix}")
    if record.get("seq_ids") != expected:
        held = record.get("seq_ids")
        raise ValueError(f"shard {path} holds bank sequences {_span(held)}, not {_span(expected)}; {fix}")
    return record["grids"]


def _span(ids) -> str:
    ids = list(ids or [])
    return f"{ids[0]}..{ids[-1]} ({len(ids)})" if len(ids) > 2 else str(ids)
