"""Token-level gain statistics of spec section 4 (besides the OLS): support gaps, bucket curves, correlations.

- `support_gap`: inside Q3 (H~ below its median, D~ at or above its median), mean G of tokens with
  C~ >= its Q3 2/3-quantile minus mean G of tokens with C~ <= its Q3 1/3-quantile.
- `matched_gap`: within each cluster, each token with C above the cluster's median is matched
  (nearest neighbour, Euclidean on (H~, D~, rel_pos), with replacement) to a token at or below it;
  the gap is the mean over matched pairs of G(high) - G(match).
- `bucket_curves`: mean G by quartile of D^L, D^I and C~ inside Q3; `residual_curves`: mean residual G
  (after the base OLS model) by decile of the same variables over all tokens.
- `correlation_table`: Spearman and Kendall of each score with G, the paired Spearman difference to a
  reference score (raw KL by default), and `partial_correlation` (partial Spearman of G and C given D).
- `auroc`: rank formula with average ranks for ties.

Intervals are prompt-cluster bootstrap percentile intervals (see `analysis.bootstrap`). Quantile
thresholds and matches are computed once on the full table and held fixed across resamples (the
resampling then measures between-prompt variation of the gap, not of the thresholds).
Every function drops rows with a non-finite outcome and says so in its ``notes``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.stats

from analysis.bootstrap import (
    DEFAULT_N_BOOT,
    Clusters,
    bootstrap_mean,
    bootstrap_mean_diff,
    clusters_of,
    noted_resample_weights,
)
from analysis.io import require_columns, score_columns
from analysis.ranks import (
    bootstrap_kendall,
    bootstrap_partial_spearman,
    bootstrap_spearman,
    ci_or_nan,
    kendall,
    partial_spearman,
    spearman,
)
from analysis.regression import base_residuals

DEFAULT_KENDALL_N_BOOT = 200
MATCH_FEATURES: tuple[str, ...] = ("norm_entropy", "norm_disagreement", "rel_pos")


@dataclass
class GapResult:
    """A difference of mean gains between two token groups, with a cluster-bootstrap CI."""

    name: str
    gap: float
    ci_low: float
    ci_high: float
    mean_high: float
    mean_low: float
    n_high: int
    n_low: int
    n_clusters: int
    notes: list[str] = field(default_factory=list)


@dataclass
class CorrelationResult:
    """One row per score: Spearman/Kendall with G and CIs, and the paired Spearman difference to `reference`."""

    table: pd.DataFrame
    reference: str | None
    notes: list[str] = field(default_factory=list)


@dataclass
class PartialResult:
    """Partial Spearman correlation of the outcome with C given D."""

    value: float
    ci_low: float
    ci_high: float
    x: str
    given: str
    notes: list[str] = field(default_factory=list)


def is_constant(x: np.ndarray) -> bool:
    """True when all values are equal (also for +-inf), or there are fewer than 2 values."""
    return x.size < 2 or bool(np.all(x == x[0]))


def finite_outcome(df: pd.DataFrame, outcome: str) -> tuple[pd.DataFrame, list[str]]:
    """Rows with a finite `outcome` and a note counting the others; ValueError when none is left."""
    require_columns(df, [outcome], "gain analysis")
    ok = np.isfinite(df[outcome].to_numpy(np.float64))
    notes = [] if ok.all() else [f"dropped {int((~ok).sum())} of {len(df)} rows with non-finite {outcome}"]
    if not ok.any():
        raise ValueError(f"no rows with a finite {outcome!r} ({len(df)} rows in): nothing to analyse")
    return (df if ok.all() else df.loc[ok]), notes


def q3_mask(df: pd.DataFrame) -> np.ndarray:
    """[n] Q3 membership: the ``q3`` column when present, else H~ < median(H~) and D~ >= median(D~)."""
    if "q3" in df.columns:
        return df["q3"].to_numpy(bool)
    require_columns(df, ["norm_entropy", "norm_disagreement"], "Q3 quadrant")
    h = df["norm_entropy"].to_numpy(np.float64)
    d = df["norm_disagreement"].to_numpy(np.float64)
    return (h < np.median(h)) & (d >= np.median(d))


def support_gap(
    df: pd.DataFrame, *, outcome: str = "gain", n_boot: int = DEFAULT_N_BOOT, seed: int = 0
) -> GapResult:
    """Q3 support gap: mean G (C~ >= 2/3-quantile) - mean G (C~ <= 1/3-quantile), inside Q3."""
    df, notes = finite_outcome(df, outcome)
    require_columns(df, ["norm_compat"], "support gap")
    q3 = q3_mask(df)
    y = df[outcome].to_numpy(np.float64)
    c = df["norm_compat"].to_numpy(np.float64)
    clusters = clusters_of(df)
    if q3.sum() < 2:
        notes.append(f"support gap: {int(q3.sum())} token(s) in Q3; gap undefined")
        nan = float("nan")
        return GapResult("support_gap", nan, nan, nan, nan, nan, 0, 0, clusters.n_clusters, notes)
    lo_thr, hi_thr = np.quantile(c[q3], [1 / 3, 2 / 3])
    high, low = q3 & (c >= hi_thr), q3 & (c <= lo_thr)
    if lo_thr == hi_thr:
        notes.append(f"support gap: C~ tertile thresholds coincide ({lo_thr:.3g}); high and low groups share tokens")
    gap = float(y[high].mean() - y[low].mean())
    W = noted_resample_weights(clusters, n_boot, seed, notes, "support gap")
    ci = ci_or_nan(None if W is None else bootstrap_mean_diff(y, high, low, clusters, W))
    return GapResult(
        "support_gap", gap, *ci, float(y[high].mean()), float(y[low].mean()),
        int(high.sum()), int(low.sum()), clusters.n_clusters, notes,
    )


def _compat_column(df: pd.DataFrame) -> str:
    return "compat_mass" if "compat_mass" in df.columns else "norm_compat"


def matched_pairs(df: pd.DataFrame, *, outcome: str = "gain") -> pd.DataFrame:
    """Matched (high-C, low-C) pairs within clusters: columns cluster, row_high, row_low, diff.

    ``row_*`` are positional row indices into `df`; diff = G(high) - G(low match).
    """
    require_columns(df, [*MATCH_FEATURES, outcome], "matched gap")
    c = df[_compat_column(df)].to_numpy(np.float64)
    y = df[outcome].to_numpy(np.float64)
    F = df[list(MATCH_FEATURES)].to_numpy(np.float64)  # [n, 3]
    clusters = clusters_of(df)
    order = np.argsort(clusters.codes, kind="stable")
    bounds = np.searchsorted(clusters.codes[order], np.arange(clusters.n_clusters + 1))
    parts = []
    for k in range(clusters.n_clusters):
        rows = order[bounds[k] : bounds[k + 1]]
        above = c[rows] > np.median(c[rows])
        hi, lo = rows[above], rows[~above]
        if hi.size == 0 or lo.size == 0:
            continue
        dist = ((F[hi, None, :] - F[None, lo, :]) ** 2).sum(axis=2)  # [n_hi, n_lo]
        match = lo[np.argmin(dist, axis=1)]  # ties -> the earliest low-C row
        parts.append(np.column_stack([np.full(hi.size, k), hi, match]))
    pairs = np.concatenate(parts) if parts else np.empty((0, 3), dtype=np.int64)
    return pd.DataFrame(
        {"cluster": pairs[:, 0], "row_high": pairs[:, 1], "row_low": pairs[:, 2],
         "diff": y[pairs[:, 1]] - y[pairs[:, 2]] if len(pairs) else np.empty(0)}
    )


def matched_gap(
    df: pd.DataFrame, *, outcome: str = "gain", n_boot: int = DEFAULT_N_BOOT, seed: int = 0
) -> GapResult:
    """Within-cluster nearest-neighbour matched gap of G between high- and low-C tokens."""
    df, notes = finite_outcome(df, outcome)
    clusters = clusters_of(df)
    pairs = matched_pairs(df, outcome=outcome)
    nan = float("nan")
    if pairs.empty:
        notes.append("matched gap: no cluster has tokens on both sides of its C median; gap undefined")
        return GapResult("matched_gap", nan, nan, nan, nan, nan, 0, 0, clusters.n_clusters, notes)
    y = df[outcome].to_numpy(np.float64)
    pair_clusters = Clusters(pairs["cluster"].to_numpy(np.int64), clusters.n_clusters, clusters.column)
    W = noted_resample_weights(clusters, n_boot, seed, notes, "matched gap")
    diff = pairs["diff"].to_numpy()
    ci = ci_or_nan(None if W is None else bootstrap_mean(diff, np.ones(diff.size, bool), pair_clusters, W))
    n_used = pairs["cluster"].nunique()
    if n_used < clusters.n_clusters:
        notes.append(f"matched gap: {clusters.n_clusters - n_used} cluster(s) without both C groups skipped")
    return GapResult(
        "matched_gap", float(diff.mean()), *ci, float(y[pairs["row_high"]].mean()),
        float(y[pairs["row_low"]].mean()), int(pairs["row_high"].nunique()),
        int(pairs["row_low"].nunique()), clusters.n_clusters, notes,
    )


def bucket_variables(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """D^L, D^I and C~ per row, from the normalised columns."""
    require_columns(df, ["norm_disagreement", "norm_compat"], "bucket curves")
    d = df["norm_disagreement"].to_numpy(np.float64)
    c = df["norm_compat"].to_numpy(np.float64)
    return {"D^L": d * c, "D^I": d * (1.0 - c), "C~": c}


def _bucket_table(
    xs: dict[str, np.ndarray], y: np.ndarray, mask: np.ndarray, n_buckets: int,
    clusters: Clusters, W: np.ndarray | None,
) -> pd.DataFrame:
    """Mean y per equal-count bucket of each x (restricted to `mask`), with cluster CIs."""
    rows = []
    idx = np.flatnonzero(mask)
    for name, x in xs.items():
        # Equal-count buckets by rank (ties broken by row order) so saturated values cannot empty a bucket.
        ranks = scipy.stats.rankdata(x[idx], method="ordinal") - 1
        bucket = np.full(x.size, -1)
        bucket[idx] = ranks * n_buckets // max(idx.size, 1)
        for b in range(n_buckets):
            m = bucket == b
            if not m.any():
                continue
            ci = ci_or_nan(None if W is None else bootstrap_mean(y, m, clusters, W))
            rows.append(dict(variable=name, bucket=b + 1, x_low=float(x[m].min()), x_high=float(x[m].max()),
                             x_mean=float(x[m].mean()), n=int(m.sum()), mean_gain=float(y[m].mean()),
                             ci_low=ci[0], ci_high=ci[1]))
    return pd.DataFrame(rows, columns=["variable", "bucket", "x_low", "x_high", "x_mean", "n",
                                       "mean_gain", "ci_low", "ci_high"])


def _curves(
    df: pd.DataFrame, outcome: str, what: str, values: Callable[[pd.DataFrame], tuple[np.ndarray, np.ndarray]],
    n_buckets: int, n_boot: int, seed: int,
) -> pd.DataFrame:
    """The bucket table of ``values(df) -> (y, mask)`` over the finite-outcome rows, notes in ``attrs``."""
    df, notes = finite_outcome(df, outcome)
    clusters = clusters_of(df)
    W = noted_resample_weights(clusters, n_boot, seed, notes, what)
    y, mask = values(df)
    out = _bucket_table(bucket_variables(df), y, mask, n_buckets, clusters, W)
    out.attrs["notes"] = notes
    return out


def bucket_curves(
    df: pd.DataFrame, *, outcome: str = "gain", n_buckets: int = 4, n_boot: int = DEFAULT_N_BOOT, seed: int = 0
) -> pd.DataFrame:
    """Mean G by quartile (default) of D^L, D^I and C~ among Q3 tokens; tidy frame, notes in ``attrs``."""

    def gain_in_q3(d: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        return d[outcome].to_numpy(np.float64), q3_mask(d)

    return _curves(df, outcome, "bucket curves", gain_in_q3, n_buckets, n_boot, seed)


def residual_curves(
    df: pd.DataFrame, *, outcome: str = "gain", n_buckets: int = 10, n_boot: int = DEFAULT_N_BOOT, seed: int = 0
) -> pd.DataFrame:
    """Mean residual G after the base OLS model [H, D, H*D, pos, H^T] by decile of D^L, D^I, C~ (all tokens)."""

    def finite_residuals(d: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        resid = base_residuals(d, outcome=outcome)
        return resid, np.isfinite(resid)

    return _curves(df, outcome, "residual curves", finite_residuals, n_buckets, n_boot, seed)


def correlation_table(
    df: pd.DataFrame,
    *,
    outcome: str = "gain",
    scores: dict[str, str] | None = None,
    reference: str | None = "kl",
    n_boot: int = DEFAULT_N_BOOT,
    kendall_n_boot: int = DEFAULT_KENDALL_N_BOOT,
    kendall_scores: Sequence[str] | None = None,
    seed: int = 0,
) -> CorrelationResult:
    """Spearman and Kendall of each score with `outcome`, cluster-bootstrap CIs, paired difference to `reference`.

    `scores` maps selector name -> column (default: every ``score_*`` column). A constant score gets NaN
    correlations and a note; rows where a score is NaN are left out of that score's correlations (noted).
    Spearman CIs use `n_boot` resamples, Kendall CIs `kendall_n_boot` (each resample is a scipy call, so
    they are limited to `kendall_scores` when given; the others get a Kendall point estimate only).
    """
    df, notes = finite_outcome(df, outcome)
    scores = score_columns(df) if scores is None else scores
    require_columns(df, scores.values(), "correlation scores")
    y = df[outcome].to_numpy(np.float64)
    clusters = clusters_of(df)
    W = noted_resample_weights(clusters, n_boot, seed, notes, "correlations")
    Wk = noted_resample_weights(clusters, kendall_n_boot, seed, notes, "Kendall") if W is not None else None
    vals = {name: df[col].to_numpy(np.float64) for name, col in scores.items()}

    usable: dict[str, np.ndarray] = {}
    for name, v in vals.items():
        keep = ~np.isnan(v)
        if not keep.all():
            notes.append(f"correlations: score {name!r} is NaN on {int((~keep).sum())} rows, left out")
        if is_constant(v[keep]):
            notes.append(f"correlations: score {name!r} is constant; its correlations are undefined (NaN)")
        else:
            usable[name] = keep
    # Bootstrap the scores sharing one row mask together (usually all of them): shared resamples.
    sp_boot: dict[str, np.ndarray] = {}
    kd_boot: dict[str, np.ndarray] = {}
    if W is not None:
        for key in {m.tobytes() for m in usable.values()}:
            names = [n for n, m in usable.items() if m.tobytes() == key]
            keep = usable[names[0]]
            sub = Clusters(clusters.codes[keep], clusters.n_clusters, clusters.column)
            group = {n: vals[n][keep] for n in names}
            sp_boot.update(bootstrap_spearman(y[keep], group, sub, W))
            k_group = {n: v for n, v in group.items() if kendall_scores is None or n in kendall_scores}
            if Wk is not None and k_group:
                kd_boot.update(bootstrap_kendall(y[keep], k_group, sub, Wk))

    if Wk is not None and kendall_scores is not None:
        notes.append(f"correlations: Kendall CIs ({kendall_n_boot} resamples) for {sorted(kd_boot)} only")
    rows = []
    ref_ok = reference is not None and reference in usable
    if reference is not None and reference not in usable:
        notes.append(f"correlations: reference score {reference!r} absent or unusable; no paired differences")
    for name in scores:
        row: dict[str, object] = {"score": name}
        if name in usable:
            keep = usable[name]
            row["spearman"] = spearman(vals[name][keep], y[keep])
            row["spearman_ci_low"], row["spearman_ci_high"] = ci_or_nan(sp_boot.get(name))
            row["kendall"] = kendall(vals[name][keep], y[keep])
            row["kendall_ci_low"], row["kendall_ci_high"] = ci_or_nan(kd_boot.get(name))
        else:
            row.update(dict.fromkeys(("spearman", "spearman_ci_low", "spearman_ci_high",
                                      "kendall", "kendall_ci_low", "kendall_ci_high"), float("nan")))
        paired = (ref_ok and name in sp_boot and reference in sp_boot
                  and usable[name].tobytes() == usable[reference].tobytes())
        if ref_ok and name in usable:
            ref = usable[reference]
            row["spearman_minus_ref"] = row["spearman"] - spearman(vals[reference][ref], y[ref])
        else:
            row["spearman_minus_ref"] = float("nan")
        row["diff_ci_low"], row["diff_ci_high"] = ci_or_nan(sp_boot[name] - sp_boot[reference] if paired else None)
        rows.append(row)
    return CorrelationResult(table=pd.DataFrame(rows), reference=reference if ref_ok else None, notes=notes)


def partial_correlation(
    df: pd.DataFrame, *, outcome: str = "gain", x: str = "norm_compat", given: str = "norm_disagreement",
    n_boot: int = DEFAULT_N_BOOT, seed: int = 0,
) -> PartialResult:
    """Partial Spearman of `outcome` with `x` given `given` (default: G with C~ given D~), cluster CI."""
    df, notes = finite_outcome(df, outcome)
    require_columns(df, [x, given], "partial correlation")
    y, xv, zv = (df[c].to_numpy(np.float64) for c in (outcome, x, given))
    if any(is_constant(v) for v in (y, xv, zv)):
        notes.append(f"partial correlation: {outcome}, {x} or {given} is constant; undefined (NaN)")
        return PartialResult(float("nan"), float("nan"), float("nan"), x, given, notes)
    clusters = clusters_of(df)
    W = noted_resample_weights(clusters, n_boot, seed, notes, "partial correlation")
    ci = ci_or_nan(None if W is None else bootstrap_partial_spearman(y, xv, zv, clusters, W))
    return PartialResult(partial_spearman(y, xv, zv), *ci, x=x, given=given, notes=notes)


def auroc(score: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of `score` for boolean `labels` (average ranks for ties; NaN if one class is empty)."""
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = scipy.stats.rankdata(score)  # average ranks; -inf ranks lowest
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


__all__ = [
    "GapResult", "CorrelationResult", "PartialResult", "support_gap", "matched_gap", "matched_pairs",
    "bucket_curves", "residual_curves", "correlation_table", "partial_correlation", "auroc", "q3_mask",
    "finite_outcome", "is_constant",
]
