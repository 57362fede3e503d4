"""Budgeted selection (spec section 2, "Selection"): the top ceil(rho * |I|) mask over a whole batch.

``select`` keeps the highest-scoring valid positions of one rollout batch under a global budget.
Its named choices (``TIE_ORDERS``; the release's values are what ``selectors.SelectionOptions``
calls the ``paper`` preset):

* ties: ``row_major`` (the project's: earlier sequence, then earlier position), ``earliest_position``
  (the release's (score, -position) key: earlier position, then earlier sequence), ``latest_position``
  (the same key under the release's ascending sort of its "low" selectors), or a seeded permutation;
* fill: when fewer candidates than the budget exist (a Q3 selector), optionally the best remaining
  valid positions by a second score (the release's offline top-N, ``is_q3 * 2 + score``);
* top-up: every sequence with fewer than ``min_per_sequence`` kept positions gets its best
  remaining positions, by the selection score among its candidates (the project's) or by a separate
  score over all its valid positions (the release's, TA-OPD + entropy).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diagnostics.signals.checks import NEG_INF, check_valid, first_index

TIE_ORDERS = ("row_major", "earliest_position", "latest_position")


BUDGET_RULES = ("exact", "release")


def _budget(ratio: float, n_valid: int, rule: str = "exact") -> int:
    """The kept count, at least 1. "exact": ceil(ratio * n) robust to float error (ceil(0.07 * 100) = 7);
    "release": the release's plain float ceil(n * ratio) (tip_compat.py L450: 0.07 * 100 = 7.000000000000001 -> 8)."""
    if rule not in BUDGET_RULES:
        raise ValueError(f"budget_rule must be one of {list(BUDGET_RULES)}, got {rule!r}")
    raw = math.ceil(n_valid * ratio) if rule == "release" else math.ceil(ratio * n_valid - 1e-9)
    return max(1, min(n_valid, raw))


def _tie_permutation(b: int, t: int, tie_order: str, seed: int | None, device: torch.device) -> Tensor:
    """[B*T] flat positions (b * T + t) in tie order: the order equal scores are kept in."""
    flat = torch.arange(b * t, device=device)
    if seed is not None:  # drawn on the CPU: the same permutation on every device
        return torch.randperm(b * t, generator=torch.Generator().manual_seed(seed)).to(device)
    if tie_order == "row_major":
        return flat
    grid = flat.view(b, t)
    if tie_order == "latest_position":
        grid = grid.flip(1)
    return grid.t().flatten()  # position-major: every sequence's position 0 (or T-1) first, sequences in order


def _order(score: Tensor, perm: Tensor) -> Tensor:
    """Flat positions by score descending, ties in the order of ``perm`` (a stable sort over perm)."""
    return perm[score[perm].sort(descending=True, stable=True).indices]


def _check_score(score: Tensor, valid: Tensor, name: str, allow_neg_inf: bool) -> Tensor:
    if score.shape != valid.shape:
        raise ValueError(f"{name} must have valid's shape {list(valid.shape)}, got {list(score.shape)}")
    bad = valid & (torch.isnan(score) if allow_neg_inf else ~torch.isfinite(score))
    if bad.any():
        what = "NaN" if allow_neg_inf else "a non-finite value"
        raise ValueError(f"{name} has {what} at valid position {list(first_index(bad))}")
    return score if score.is_floating_point() else score.double()  # no float32 rounding: no new ties


def select(
    score: Tensor,
    valid: Tensor,
    ratio: float,
    *,
    min_per_sequence: int = 1,
    seed: int | None = None,
    tie_order: str = "row_major",
    fill_score: Tensor | None = None,
    top_up_score: Tensor | None = None, budget_rule: str = "exact",
) -> Tensor:
    """Budgeted selection mask over a whole rollout batch (spec 2, "Selection").

    Keeps the top ceil(ratio * |valid|) candidates by score over the WHOLE batch. Candidates are
    the valid positions with score > -inf (a -inf score, e.g. a q3 score outside Q3, is never
    selected, so fewer may be kept when candidates run out, unless ``fill_score`` is given).

    Ties (``tie_order``): "row_major", earlier position in flattened order b * T + t (earliest
    sequence first); "earliest_position", earlier t first, then earlier b (the release's sort key
    (score, -tok_pos), reverse=True, stable over its row order: TA-OPD/slime_ta_opd/slime/rollout/
    tip_compat.py L517-523); "latest_position", later t first, then earlier b (the same key under
    reverse=False, the release's "low" Q3 selectors, L501-503). With ``seed`` ties go instead by a
    seeded random permutation of the positions (reproducible for a given seed).

    fill_score: [B, T], finite at valid positions. When the candidates are fewer than the budget,
    the remaining valid positions fill it, best ``fill_score`` first (same tie order).

    Then every sequence with fewer than ``min_per_sequence`` kept positions is topped up to that
    many (or as many as it has): without ``top_up_score``, by its best remaining candidates in the
    global order (the project's); with ``top_up_score`` ([B, T], finite at valid positions), by that
    score over ALL its valid positions, ties toward earlier positions (the release's
    ``_ensure_min_keep_per_sample``, L526-538, which ranks by the TA-OPD + entropy score). The
    total can exceed the budget by up to B * min_per_sequence. ratio = 1.0 keeps exactly the
    candidates (all valid positions for a finite score).

    Args:
        score: [B, T] float, no NaN at valid positions. valid: [B, T] bool, at least one True.
        ratio: retention ratio in (0, 1]. min_per_sequence: >= 0. tie_order: one of TIE_ORDERS.
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
    if tie_order not in TIE_ORDERS:
        raise ValueError(f"tie_order must be one of {list(TIE_ORDERS)}, got {tie_order!r}")
    if seed is not None and tie_order != "row_major":
        raise ValueError(f"pass seed (random ties) or tie_order={tie_order!r}, not both")
    score = _check_score(score, valid, "score", allow_neg_inf=True)
    b, t = score.shape
    flat = score.masked_fill(~valid, NEG_INF).flatten()  # [B*T]
    cand = (flat > NEG_INF).view(b, t)
    perm = _tie_permutation(b, t, tie_order, seed, score.device)
    order = _order(flat, perm)  # positions, best first; non-candidates (-inf) last
    budget = _budget(ratio, int(valid.sum()), budget_rule)
    eligible = cand
    if fill_score is not None:  # candidates first, then the other valid positions by fill_score
        fill = _check_score(fill_score, valid, "fill_score", allow_neg_inf=False)
        rest = valid & ~cand
        fill_order = _order(fill.masked_fill(~rest, NEG_INF).flatten(), perm)[: int(rest.sum())]
        order = torch.cat([order[: int(cand.sum())], fill_order])
        eligible = valid
    rank = torch.full((b * t,), b * t, dtype=torch.long, device=score.device)  # b * t: not in the order
    rank[order] = torch.arange(len(order), device=score.device)  # rank[pos] = place of pos in the global order
    rank = rank.view(b, t)
    keep = eligible & (rank < budget)
    if min_per_sequence == 0:
        return keep
    if top_up_score is not None:
        top = _check_score(top_up_score, valid, "top_up_score", allow_neg_inf=False)
        return _top_up(keep, valid, top, min_per_sequence)
    # Within-row place in the global order; a row's kept set is always its best-ranked prefix.
    row_place = _row_places(rank.argsort(dim=1, stable=True))
    return keep | (cand & (row_place < min_per_sequence))


def _row_places(order: Tensor) -> Tensor:
    """[B, T] place of each position in its row's ``order`` ([B, T] column indices, best first)."""
    b, t = order.shape
    place = torch.empty_like(order)
    place.scatter_(1, order, torch.arange(t, device=order.device).expand(b, t).contiguous())
    return place


def _top_up(keep: Tensor, valid: Tensor, top: Tensor, min_per_sequence: int) -> Tensor:
    """``keep`` plus, in every row with fewer than ``min_per_sequence`` kept, its best free valid positions
    by ``top`` (descending, ties toward earlier positions: a stable sort), up to that many in all."""
    need = (min_per_sequence - keep.sum(dim=1, keepdim=True)).clamp_min(0)  # [B, 1]
    free = valid & ~keep
    place = _row_places(top.masked_fill(~free, NEG_INF).sort(dim=1, descending=True, stable=True).indices)
    return keep | (free & (place < need))
