"""Batch-robust normalisation (spec section 2) and the linear-interpolation quantiles it uses.

Two named normalisations (``SIGNAL_NORMALIZATIONS``), both Q05/Q95 with linear interpolation:

* ``valid_rows`` (the paper's text, the project's default): ``normalize_batch``, quantiles over the
  valid (selectable) positions, clip((z - Q05) / (Q95 - Q05 + eps), 0, 1), eps = 1e-6, all 0 when
  Q95 - Q05 <= eps; a non-finite value at a valid position raises.
* ``all_response_rows`` (the released training code): ``normalize_release``, quantiles over every
  response row with a finite value (the rows the selection cannot keep included), no eps,
  clip((z - Q05) / (Q95 - Q05), 0, 1), all 0 when |Q95 - Q05| < 1e-12, an infinite value -> 0.

``quantile_linear`` is torch.quantile's default (linear interpolation) without its input-size cap,
in float64; ``quantile_release`` is the release's own interpolation formula.
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


SIGNAL_NORMALIZATIONS = ("valid_rows", "all_response_rows")


def quantile_release(values: list[float], q: float) -> float:
    """The release's quantile (TA-OPD/slime_ta_opd/slime/rollout/tip_compat.py L422-432, ``_quantile``):
    sorted values, pos = q (n - 1), x[lo] (1 - frac) + x[hi] frac. Same as linear interpolation up
    to the last bit; kept so the ``all_response_rows`` normalisation is the release's to the bit."""
    xs = sorted(values)
    pos = min(max(q, 0.0), 1.0) * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    if lo == hi:
        return xs[lo]
    frac = pos - lo
    return xs[lo] * (1.0 - frac) + xs[hi] * frac


def normalize_release(x: Tensor, rows: Tensor, q_low: float = 0.05, q_high: float = 0.95) -> Tensor:
    """The released training code's normalisation over every response row (``all_response_rows``).

    Reimplements ``_normalize`` (TA-OPD/slime_ta_opd/slime/rollout/tip_compat.py L404-419, mode
    batch_quantile): quantiles over the finite values of ``x[rows]``; z -> clip((z - lo) / (hi - lo),
    0, 1) with no eps; all 0 when |hi - lo| < 1e-12 or no row is finite; an infinite value -> 0
    (the release's rule; here only +-inf, a NaN raises, since it is a bug upstream).

    Args:
        x: any shape (e.g. [B, T]). rows: bool, same shape: the response rows (at least one True);
            in the release every response token, selectable or not.
    Returns:
        float32 tensor of x's shape in [0, 1], 0 outside ``rows``.
    """
    check_valid(rows, x, "x")
    if not (0.0 <= q_low < q_high <= 1.0):
        raise ValueError(f"need 0 <= q_low < q_high <= 1, got q_low={q_low}, q_high={q_high}")
    nan = rows & torch.isnan(x)
    if nan.any():
        raise ValueError(f"x has NaN at response row {list(first_index(nan))}")
    finite = rows & torch.isfinite(x)
    if not finite.any():
        return torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    values = x[finite].double().tolist()
    lo, hi = quantile_release(values, q_low), quantile_release(values, q_high)
    if abs(hi - lo) < 1e-12:
        return torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    z = ((x.double() - lo) / (hi - lo)).clamp(0.0, 1.0)  # float64 as the release; float32 on return
    return z.masked_fill(~finite, 0.0).float()
