"""Budgeted selection (spec section 2, "Selection"): the top ceil(rho * |I|) mask over a whole batch.

``select`` keeps the highest-scoring valid positions of one rollout batch under a global budget,
ties toward earlier positions (or a seeded permutation), with an optional per-sequence minimum.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diagnostics.signals.checks import NEG_INF, check_valid, first_index


def _budget(ratio: float, n_valid: int) -> int:
    """ceil(ratio * n) robust to float error (ceil(0.07 * 100) = 7, not 8), at least 1."""
    return max(1, min(n_valid, math.ceil(ratio * n_valid - 1e-9)))


def select(
    score: Tensor, valid: Tensor, ratio: float, *, min_per_sequence: int = 1, seed: int | None = None
) -> Tensor:
    """Budgeted selection mask over a whole rollout batch (spec 2, "Selection").

    Keeps the top ceil(ratio * |valid|) candidates by score over the WHOLE batch. Candidates are
    the valid positions with score > -inf (a -inf score, e.g. a q3 score outside Q3, is never
    selected, so fewer may be kept when candidates run out). Ties go to the earlier position in
    flattened row-major order (b * T + t); with ``seed`` they go instead by a seeded random
    permutation of the positions (reproducible for a given seed). Then every sequence with fewer
    than ``min_per_sequence`` kept positions gets its best remaining candidates (same order) until
    it has that many or runs out: the total can exceed the budget by up to B * min_per_sequence.
    ratio = 1.0 keeps exactly the candidates (all valid positions for a finite score).

    Args:
        score: [B, T] float, no NaN at valid positions. valid: [B, T] bool, at least one True.
        ratio: retention ratio in (0, 1]. min_per_sequence: >= 0.
    Returns:
        [B, T] bool mask, a subset of ``valid``.
    """
    if score.dim() != 2:
        raise ValueError(f"score must be [B, T], got shape {list(score.shape)}")
    check_valid(valid, score, "score")
    if not (isinstance(ratio, (int, float)) and 0.0 < ratio <= 1.0):
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    if isinstance(min_per_sequence, bool) or not isinstance(min_per_sequence, int) or min_per_sequence < 0:
        raise ValueError(f"min_per_sequence must be an integer >= 0, got {min_per_sequence!r}")
    nan = valid & torch.isnan(score)
    if nan.any():
        raise ValueError(f"score has NaN at valid position {list(first_index(nan))}")
    b, t = score.shape
    score = score if score.is_floating_point() else score.double()  # no float32 rounding: no new ties
    flat = score.masked_fill(~valid, NEG_INF).flatten()  # [B*T]
    cand = (flat > NEG_INF).view(b, t)
    # Global order: score descending, ties by position (stable sort) or by a seeded permutation.
    if seed is None:
        perm = torch.arange(b * t, device=score.device)
    else:  # drawn on the CPU: the same permutation on every device
        perm = torch.randperm(b * t, generator=torch.Generator().manual_seed(seed)).to(score.device)
    order = perm[flat[perm].sort(descending=True, stable=True).indices]  # positions, best first
    rank = torch.empty(b * t, dtype=torch.long, device=score.device)
    rank[order] = torch.arange(b * t, device=score.device)  # rank[pos] = place of pos in the global order
    rank = rank.view(b, t)
    keep = cand & (rank < _budget(ratio, int(valid.sum())))
    if min_per_sequence > 0:
        # Within-row place in the global order; a row's kept set is always its best-ranked prefix.
        row_place = torch.empty_like(rank)
        places = torch.arange(t, device=score.device).expand(b, t).contiguous()
        row_place.scatter_(1, rank.argsort(dim=1), places)
        keep |= cand & (row_place < min_per_sequence)
    return keep
