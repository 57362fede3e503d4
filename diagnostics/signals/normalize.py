"""Batch-robust normalisation (spec section 2) and the linear-interpolation quantiles it uses.

``normalize_batch`` maps a signal over the valid positions of one rollout batch to
clip((z - Q05) / (Q95 - Q05 + eps), 0, 1); ``quantile_linear`` is torch.quantile's default
(linear interpolation) without its input-size cap, in float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from diagnostics.signals.checks import check_valid, first_index


def quantile_linear(v: Tensor, qs: Iterable[float]) -> list[float]:
    """Quantiles of a 1-D tensor with linear interpolation (= torch.quantile, without its size cap)."""
    v = v.double().sort().values
    n = v.numel()
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, n - 1)
        out.append(float(v[lo] + (pos - lo) * (v[hi] - v[lo])))
    return out


def normalize_batch(
    x: Tensor, valid: Tensor, q_low: float = 0.05, q_high: float = 0.95, eps: float = 1e-6
) -> Tensor:
    """Spec 2 robust normalisation over the valid positions of one rollout batch.

    Norm(z) = clip((z - Q_low) / (Q_high - Q_low + eps), 0, 1); if Q_high - Q_low <= eps every
    score is 0. Quantiles: linear interpolation over the valid entries (torch.quantile's default).

    Args:
        x: any shape (e.g. [B, T]); must be finite at valid positions (an infinite KL from a
            masked vocabulary must be handled upstream: nothing is silently clamped).
        valid: bool, same shape as x, at least one True.
    Returns:
        float32 tensor of x's shape in [0, 1], 0 at invalid positions.
    """
    check_valid(valid, x, "x")
    if not (0.0 <= q_low < q_high <= 1.0):
        raise ValueError(f"need 0 <= q_low < q_high <= 1, got q_low={q_low}, q_high={q_high}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    x = x.float()
    bad = valid & ~torch.isfinite(x)
    if bad.any():
        pos = first_index(bad)
        raise ValueError(f"x has non-finite value {float(x[pos])} at valid position {list(pos)}")
    lo, hi = quantile_linear(x[valid], (q_low, q_high))
    if hi - lo <= eps:  # a flat batch carries no ranking information
        return torch.zeros_like(x)
    z = ((x - lo) / (hi - lo + eps)).clamp(0.0, 1.0)
    return z.masked_fill(~valid, 0.0)
