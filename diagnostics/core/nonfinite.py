"""Numerical blow-ups stop a run with what, where and when named, and leave the last good state.

Both recipes use it. A blow-up (NaN or inf in a loss, a gradient, a weight, a logit or a measured gain)
raises `NonFiniteError`; before that the recipe writes `nonfinite.json` into its run (or arm) directory
(`write_nonfinite_record`): which quantity, at which step (training: the arm and optimizer step;
the diagnostic: the shard, sequence and response position), and which saved state is the last good one
(a training checkpoint; the diagnostic's finished shards). Nothing good is overwritten: the failing
step's state is not saved over it.

The diagnostic's guards: `check_shard_finite` (a shard's gains and KLs, before the shard is saved) and
`check_group_finite` (the group variant's gains, before group.parquet is written).

Helpers that find the first non-finite entry:
* `first_nonfinite_parameter`: the first weight tensor of a model holding NaN/inf (name, count);
* `first_nonfinite_position`: the first valid [b, T] position where any of some grids is NaN/inf.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from diagnostics.core.files import write_json

RECORD_NAME = "nonfinite.json"


class NonFiniteError(RuntimeError):
    """A quantity became NaN or infinite; the message names the quantity, where and at which step."""


def write_nonfinite_record(directory: str | Path, **fields: Any) -> Path:
    """`<directory>/nonfinite.json` with `fields` (quantity, step, last good state, ...) and the time."""
    record = {**fields, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return write_json(Path(directory) / RECORD_NAME, record)


@contextlib.contextmanager
def nonfinite_recorded(directory: str | Path, **fields: Any) -> Iterator[None]:
    """Around a stage that may raise NonFiniteError (generation's FiniteLogitsGuard): the blow-up is written to
    `<directory>/nonfinite.json` with `fields` and re-raised naming the record, as training's guard does."""
    try:
        yield
    except NonFiniteError as exc:
        quantity = "generation logits" if "generation logits" in str(exc) else "unknown"
        write_nonfinite_record(directory, quantity=quantity, message=str(exc), **fields)
        raise NonFiniteError(f"{fields.get('stage', 'run')}: {exc}; nonfinite.json in {directory}") from None


def first_nonfinite_parameter(model: torch.nn.Module) -> tuple[str, int, int] | None:
    """(parameter name, non-finite entries, entries) of the first weight holding NaN/inf, or None.

    One fused max-norm over all parameters first (no per-parameter copies, one sync; NaN and inf
    propagate through the max); names only on a hit.
    """
    norms = _max_abs(model)
    if norms is None or bool(torch.isfinite(norms).all()):
        return None
    for name, p in model.named_parameters():
        bad = ~torch.isfinite(p.detach())
        if bool(bad.any()):
            return name, int(bad.sum()), p.numel()
    return None


def largest_weight(model: torch.nn.Module) -> float:
    """max |w| over the model's weights (a finite but exploding model shows here)."""
    norms = _max_abs(model)
    return float(norms.max()) if norms is not None else math.nan


def _max_abs(model: torch.nn.Module) -> torch.Tensor | None:
    """[n_params] max |w| of each non-empty parameter, float32 (NaN/inf propagate), or None without any;
    one fused kernel, as `torch.nn.utils.clip_grad_norm_` computes its norms."""
    params = [p.detach() for p in model.parameters() if p.numel()]
    if not params:
        return None
    return torch.stack([n.float() for n in torch._foreach_norm(params, float("inf"))])


def first_nonfinite_position(grids: dict[str, torch.Tensor], valid: torch.Tensor, names: list[str]
                             ) -> tuple[str, int, int, int] | None:
    """(name, row, position, count) of the first valid position where grid `name` is NaN/inf, in the
    order of `names` (grids [b, T], valid [b, T] bool); None when all are finite there."""
    for name in names:
        if name not in grids:
            continue
        bad = valid & ~torch.isfinite(grids[name])
        if bool(bad.any()):
            row, pos = (int(i) for i in bad.nonzero()[0])
            return name, row, pos, int(bad.sum())
    return None


# the diagnostic's gains and the KLs they come from: finite at every valid position, or the step blew up
FINITE_GRIDS = ["kl_forward_before", "kl_forward_after", "gain", "kl_reverse_after", "gain_first_order"]


def check_shard_finite(table: dict[str, torch.Tensor], valid: torch.Tensor, *, shard: int, first_row: int,
                       run_dir: Path, step: str) -> None:
    """Stop the diagnostic before a shard with a NaN/inf gain is saved: nonfinite.json names the quantity,
    the shard, the bank sequence and response position; the finished shards (the last good state) stay.
    `table`: name -> [b, T] grids of the shard; `valid` [b, T]; `step`: the update, for the message."""
    hit = first_nonfinite_position(table, valid, FINITE_GRIDS)
    if hit is None:
        return
    name, row, pos, count = hit
    done = sorted(p.name for p in (run_dir / "shards").glob("shard_*.pt"))
    where = f"shard {shard}, bank sequence {first_row + row}, response position {pos}"
    write_nonfinite_record(run_dir, recipe="diagnose", quantity=name, shard=shard, seq_id=first_row + row, pos=pos,
                           n_nonfinite=count, step=step, last_good=done)
    raise NonFiniteError(f"{name} is non-finite at {where} ({count} positions in the shard; {step}): the update "
                         f"blew up, lower lr; {len(done)} finished shards kept, details in {run_dir / RECORD_NAME}")


def check_group_finite(group: pd.DataFrame, run_dir: Path, *, step: str) -> None:
    """The group variant's gains are finite, or nonfinite.json names selector, ratio, sequence and position
    (tokens.parquet, already written, is the last good state; group.parquet is not written)."""
    bad = ~np.isfinite(group["gain"].to_numpy(np.float64))
    if not bad.any():
        return
    first = group[bad].iloc[0]
    write_nonfinite_record(run_dir, recipe="diagnose", quantity="group gain", selector=first["selector"],
                           ratio=float(first["ratio"]), seq_id=int(first["seq_id"]), pos=int(first["pos"]),
                           n_nonfinite=int(bad.sum()), step=step, last_good=["tokens.parquet"])
    raise NonFiniteError(f"group gain is non-finite for selector {first['selector']} at ratio {first['ratio']:g} "
                         f"(bank sequence {int(first['seq_id'])}, response position {int(first['pos'])}; "
                         f"{int(bad.sum())} positions; {step}): the group update blew up, lower lr; tokens.parquet "
                         f"kept, details in {run_dir / RECORD_NAME}")
