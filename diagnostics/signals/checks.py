"""Input validation shared by the signal modules.

Every message names the argument and the first offending position or value (row-major), so a bad
input is found without a debugger. -inf is a valid logit / log-prob everywhere (probability 0);
NaN and +inf are not.
"""

from __future__ import annotations

import torch
from torch import Tensor

NEG_INF = float("-inf")


def first_index(mask: Tensor) -> tuple[int, ...]:
    """Row-major position of the first True of a non-empty boolean mask."""
    return tuple(int(i) for i in mask.nonzero()[0])


def describe_pos(pos: tuple[int, ...]) -> str:
    """'row r, column c' for a 2-D position, 'position [i, ...]' otherwise."""
    return f"row {pos[0]}, column {pos[1]}" if len(pos) == 2 else f"position {list(pos)}"


def check_ids(ids: Tensor, name: str, shape: tuple[int, ...], vocab: int | None) -> None:
    """Integer ids of the given shape, >= 0 and (if ``vocab`` is known) < vocab."""
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"{name} must be an integer tensor, got dtype {ids.dtype}")
    if tuple(ids.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(ids.shape)}")
    out = ids < 0 if vocab is None else (ids < 0) | (ids >= vocab)
    if out.any():
        pos = first_index(out)
        bound = ">= 0" if vocab is None else f"in [0, {vocab})"
        raise ValueError(f"{name} must be {bound}: value {int(ids[pos])} at {describe_pos(pos)}")


def check_float(x: Tensor, name: str, shape: tuple[int, ...] | None = None) -> None:
    """Floating tensor (of ``shape`` if given) without NaN or +inf; -inf is allowed."""
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got dtype {x.dtype}")
    if shape is not None and tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(x.shape)}")
    bad = torch.isnan(x) | torch.isposinf(x)
    if bad.any():
        pos = first_index(bad)
        raise ValueError(f"{name} has {'NaN' if torch.isnan(x[pos]) else '+inf'} at {describe_pos(pos)}")


def check_k(k: int) -> None:
    """A top-K size: a plain integer >= 1 (bool is rejected)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")


def check_valid(valid: Tensor, x: Tensor, x_name: str) -> None:
    """A bool mask of x's shape with at least one True (normalisation and selection need one)."""
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor, got dtype {valid.dtype}")
    if valid.shape != x.shape:
        raise ValueError(f"valid shape {list(valid.shape)} differs from {x_name} shape {list(x.shape)}")
    if not valid.any():
        raise ValueError("valid has no True position: nothing to normalise or select")
