"""Rank correlations with a prompt-cluster bootstrap: Spearman (exact, vectorised), partial Spearman, Kendall.

Spearman's rho is Pearson's r of average ranks. In a cluster-bootstrap resample, a cluster drawn w
times contributes each of its rows w times, so a row's average rank in the resample is
(total weight of smaller values) + (weight of its tie group + 1) / 2. We compute exactly that from
one sort per variable and a cumulative sum of the [B, n] row weights, then a weighted Pearson r:
the same number scipy.stats.spearmanr gives on the explicitly copied rows (tested), without copying.

Kendall's tau-b has no such weighted shortcut (it is a sum over pairs), so its interval copies rows
explicitly and calls scipy for each resample; it takes its own, smaller resample count.

Partial Spearman of x and y given z: ranks of x, y, z, then
r_xy.z = (r_xy - r_xz r_yz) / sqrt((1 - r_xz^2)(1 - r_yz^2)), i.e. the correlation of the rank
residuals after regressing each on rank(z).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.stats

from analysis.bootstrap import Clusters, percentile_ci, resample_indices, token_weights

# Rows x resamples processed at once by the weighted-rank bootstrap (arrays of 4 MB stay cheap to allocate).
_CHUNK_ELEMS = 500_000


@dataclass(frozen=True)
class _RankPlan:
    """One variable's sort order and tie groups, reused by every resample."""

    order: np.ndarray  # [n] argsort of the values
    group_of_sorted: np.ndarray | None  # [n] tie-group id of each sorted position; None when no ties
    group_starts: np.ndarray | None  # [G] first sorted position of each tie group; None when no ties


def _rank_plan(x: np.ndarray) -> _RankPlan:
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new_group = np.empty(xs.size, dtype=bool)
    new_group[:1] = True
    new_group[1:] = xs[1:] != xs[:-1]
    if new_group.all():
        return _RankPlan(order=order, group_of_sorted=None, group_starts=None)
    return _RankPlan(order=order, group_of_sorted=np.cumsum(new_group) - 1, group_starts=np.flatnonzero(new_group))


def weighted_ranks_sorted(plan: _RankPlan, ws: np.ndarray) -> np.ndarray:
    """[b, n] average ranks, in the variable's sorted order, given row multiplicities `ws` [b, n] in that order.

    A row's copies and its ties share the average rank: (weight of smaller values) + (group weight + 1) / 2.
    """
    if plan.group_starts is None:  # no ties between rows: each row is its own group
        return np.cumsum(ws, axis=1) - (ws - 1.0) / 2.0
    group_w = np.add.reduceat(ws, plan.group_starts, axis=1)  # [b, G] total weight per tie group
    rank_g = np.cumsum(group_w, axis=1) - (group_w - 1.0) / 2.0  # [b, G] average rank inside the group
    return rank_g[:, plan.group_of_sorted]


def weighted_ranks(plan: _RankPlan, w: np.ndarray) -> np.ndarray:
    """[b, n] average ranks in row order of resamples with row multiplicities `w` [b, n]."""
    ranks = np.empty_like(w)
    ranks[:, plan.order] = weighted_ranks_sorted(plan, w[:, plan.order])
    return ranks


def _rank_moments(w: np.ndarray) -> np.ndarray:
    """[b] S * mean^2 for average ranks under weights w [b, n]: the weighted mean rank is (S + 1) / 2, S = sum(w)."""
    s = w.sum(axis=1)
    return s * ((s + 1.0) / 2.0) ** 2


def _rank_corr(r_a: np.ndarray, r_b: np.ndarray, w: np.ndarray, var_b: np.ndarray) -> np.ndarray:
    """[b] weighted Pearson r of average ranks r_a and r_b [b, n] (aligned rows), weights w [b, n].

    `var_b` [b] is r_b's weighted sum of squares about its mean (shared by every score). Ties keep the
    rank sum, so both means are (S + 1) / 2 and only second moments need summing.
    """
    mean_sq = _rank_moments(w)
    wa = w * r_a
    cov = np.einsum("bi,bi->b", wa, r_b) - mean_sq
    var_a = np.einsum("bi,bi->b", wa, r_a) - mean_sq
    with np.errstate(invalid="ignore", divide="ignore"):
        return cov / np.sqrt(var_a * var_b)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho (average ranks); NaN when either variable is constant."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(scipy.stats.spearmanr(x, y).statistic)


def kendall(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b; NaN when either variable is constant."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(scipy.stats.kendalltau(x, y).statistic)


def partial_from_corr(r: np.ndarray) -> np.ndarray:
    """Partial correlation of variables 0 and 1 given 2 from correlation matrices r [..., 3, 3]."""
    rxy, rxz, ryz = r[..., 0, 1], r[..., 0, 2], r[..., 1, 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rxy - rxz * ryz) / np.sqrt((1.0 - rxz**2) * (1.0 - ryz**2))


def partial_spearman(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> float:
    """Spearman partial correlation of x and y given z (rank, residualise on rank(z), correlate)."""
    if min(np.ptp(x), np.ptp(y), np.ptp(z)) == 0:
        return float("nan")
    r = np.corrcoef(np.vstack([scipy.stats.rankdata(v) for v in (x, y, z)]))
    return float(partial_from_corr(r))


def bootstrap_spearman(
    target: np.ndarray, scores: dict[str, np.ndarray], clusters: Clusters, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """[B] resampled Spearman rho of each score with `target`, all sharing the resamples `weights` [B, C]."""
    n = target.size
    plans = {name: _rank_plan(v) for name, v in scores.items()}
    t_plan = _rank_plan(target)
    out = {name: np.empty(len(weights)) for name in scores}
    step = max(1, _CHUNK_ELEMS // max(n, 1))
    for lo in range(0, len(weights), step):
        w = token_weights(clusters, weights[lo : lo + step])  # [b, n] row order
        t_rank = weighted_ranks(t_plan, w)  # [b, n] row order
        t_var = np.einsum("bi,bi->b", w * t_rank, t_rank) - _rank_moments(w)  # [b]
        for name, plan in plans.items():
            # Work in the score's sorted order: one gather of w and of the target ranks, no scatter.
            ws = w[:, plan.order]
            r = _rank_corr(weighted_ranks_sorted(plan, ws), t_rank[:, plan.order], ws, t_var)
            out[name][lo : lo + step] = r
    return out


def bootstrap_partial_spearman(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, clusters: Clusters, weights: np.ndarray
) -> np.ndarray:
    """[B] resampled partial Spearman of x and y given z."""
    plans = [_rank_plan(v) for v in (x, y, z)]
    out = np.empty(len(weights))
    step = max(1, _CHUNK_ELEMS // max(x.size, 1))
    for lo in range(0, len(weights), step):
        w = token_weights(clusters, weights[lo : lo + step])
        # Centre each average rank on the known weighted mean (S + 1) / 2, then weighted cross-products.
        half = (w.sum(axis=1, keepdims=True) + 1.0) / 2.0
        c = [weighted_ranks(p, w) - half for p in plans]
        wc = [w * ci for ci in c]
        cov = np.empty((w.shape[0], 3, 3))
        for i in range(3):
            for j in range(i, 3):
                cov[:, i, j] = cov[:, j, i] = np.einsum("bi,bi->b", wc[i], c[j])
        sd = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[lo : lo + step] = partial_from_corr(cov / (sd[:, :, None] * sd[:, None, :]))
    return out


def bootstrap_kendall(
    target: np.ndarray, scores: dict[str, np.ndarray], clusters: Clusters, weights: np.ndarray
) -> dict[str, np.ndarray]:
    """[B] resampled Kendall tau-b of each score with `target`, by explicit row copies (scipy per resample)."""
    out = {name: np.empty(len(weights)) for name in scores}
    for b, wrow in enumerate(weights):
        idx = resample_indices(clusters, wrow)
        for name, s in scores.items():
            out[name][b] = kendall(s[idx], target[idx])
    return out


def ci_or_nan(samples: np.ndarray | None) -> tuple[float, float]:
    """Percentile CI of bootstrap samples, or (nan, nan) when no bootstrap ran."""
    return (float("nan"), float("nan")) if samples is None else percentile_ci(samples)
