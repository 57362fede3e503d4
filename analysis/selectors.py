"""Exact top-N selector analysis on one gain table (spec section 4), plus retrieval and overlap metrics.

Each selector (a ``score_<name>`` column) keeps exactly N = round(rho * n_tokens) positions over the
whole table (not per sequence), ranked by score; ties go to the earlier row in (seq_id, pos) order.
Rows whose score is NaN or -inf are not candidates (the Q3 variants use -inf outside Q3): a selector
with fewer than N candidates keeps all of them and the shortfall is noted. ``score_full`` keeps every
position, so it has no top-N; the mean gain over all tokens is reported as its baseline.

Reported per (selector, rho): mean G of the kept tokens with a prompt-cluster bootstrap CI and the
spec's gain per keep = mean G / rho; AUROC and precision@rho of the score for finding the top-rho
gains (the exact top-N by G, same tie rule); Jaccard overlap of kept sets between selectors.

Note: the offline analysis rounds N (spec section 4); training selection uses ceil (spec section 2).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import pandas as pd

from analysis.bootstrap import DEFAULT_N_BOOT, bootstrap_mean, can_bootstrap, clusters_of, resample_weights
from analysis.io import require_columns, score_columns
from analysis.ranks import ci_or_nan
from analysis.stats import auroc, finite_outcome

DEFAULT_RATIOS: tuple[float, ...] = (0.01, 0.03, 0.05, 0.10, 0.20)  # 0.20: the 80/20 rule's budget (issue 22)
NO_TOP_N: tuple[str, ...] = ("full",)  # selectors that keep every position


@dataclass
class TopNResult:
    """Top-N table (one row per selector x ratio) and the baseline mean gain over all tokens."""

    table: pd.DataFrame
    mean_gain_all: float
    mean_gain_all_ci: tuple[float, float]
    references: list[str]  # selectors R with ``minus_<R>`` columns
    notes: list[str] = field(default_factory=list)


def n_keep(n_tokens: int, ratio: float) -> int:
    """N = round(ratio * n_tokens), halves rounded up (Python's round() would round them to even)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"retention ratio must be in (0, 1], got {ratio}")
    return int(np.floor(ratio * n_tokens + 0.5))


def top_n_mask(score: np.ndarray, n: int) -> np.ndarray:
    """[n_rows] bool: the `n` highest finite-or-+inf scores; ties toward earlier rows; NaN/-inf never kept."""
    score = np.asarray(score, dtype=np.float64)
    candidate = ~np.isnan(score) & (score > -np.inf)
    # Stable sort of -score keeps row order among equal scores; non-candidates are pushed past the end.
    key = np.where(candidate, -score, np.inf)
    order = np.argsort(key, kind="stable")
    mask = np.zeros(score.size, dtype=bool)
    mask[order[: min(n, int(candidate.sum()))]] = True
    return mask


def _row_order(df: pd.DataFrame) -> np.ndarray:
    """Positional order of rows by (seq_id, pos)."""
    return np.lexsort((df["pos"].to_numpy(), df["seq_id"].to_numpy()))


def kept_mask(df: pd.DataFrame, column: str, ratio: float) -> np.ndarray:
    """[n] bool aligned with `df`'s rows: the exact top-N of `column` at `ratio` (ties by (seq_id, pos))."""
    require_columns(df, [column, "seq_id", "pos"], "selection")
    order = _row_order(df)
    mask = np.zeros(len(df), dtype=bool)
    mask[order] = top_n_mask(df[column].to_numpy(np.float64)[order], n_keep(len(df), ratio))
    return mask


def _selectors(df: pd.DataFrame, selectors: Sequence[str] | None) -> dict[str, str]:
    cols = score_columns(df)
    if selectors is None:
        return {k: v for k, v in cols.items() if k not in NO_TOP_N}
    unknown = [s for s in selectors if s not in cols]
    if unknown:
        raise ValueError(f"unknown selector(s) {unknown}; the table has scores for {sorted(cols)}")
    return {s: cols[s] for s in selectors}


def top_n_table(
    df: pd.DataFrame,
    *,
    outcome: str = "gain",
    ratios: Sequence[float] = DEFAULT_RATIOS,
    selectors: Sequence[str] | None = None,
    references: Sequence[str] = ("kl", "random"),
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
) -> TopNResult:
    """Mean gain of each selector's exact top-N at each ratio, cluster CI, and gain per keep = mean / ratio.

    For each reference selector R present, ``minus_<R>`` is the selector's mean gain minus R's at the same
    ratio, with a paired cluster-bootstrap CI (``minus_<R>_ci_low/high``; same resamples for both).
    """
    df, notes = finite_outcome(df, outcome)
    sel = _selectors(df, selectors)
    if "full" in score_columns(df) and selectors is None:
        notes.append("top-N: 'full' keeps every position; its value is the all-token mean gain (mean_gain_all)")
    y = df[outcome].to_numpy(np.float64)
    clusters = clusters_of(df)
    ok, why = can_bootstrap(clusters, n_boot)
    W = resample_weights(clusters.n_clusters, n_boot, seed) if ok else None
    if not ok:
        notes.append(f"top-N: {why}")
    all_sel = score_columns(df)
    absent = [r for r in references if r not in all_sel]
    if absent:
        notes.append(f"top-N: reference selector(s) {absent} absent; no paired differences to them")
    refs = [r for r in references if r in all_sel]

    def stats(mask: np.ndarray) -> tuple[float, np.ndarray | None]:
        kept = bool(mask.any())
        mean = float(y[mask].mean()) if kept else float("nan")
        return mean, (bootstrap_mean(y, mask, clusters, W) if (W is not None and kept) else None)

    rows = []
    for ratio in ratios:
        n = n_keep(len(df), ratio)
        ref_stats = {r: stats(kept_mask(df, all_sel[r], ratio)) for r in refs}
        for name, col in sel.items():
            mask = kept_mask(df, col, ratio)
            kept = int(mask.sum())
            if kept < n:
                notes.append(f"top-N: {name} has {kept} candidate(s) < N={n} at ratio {ratio:g}; keeps {kept}")
            mean, boot = stats(mask)
            ci = ci_or_nan(boot)
            row = dict(selector=name, ratio=float(ratio), n_tokens=len(df), n_keep=n, n_kept=kept,
                       mean_gain=mean, ci_low=ci[0], ci_high=ci[1], gain_per_keep=mean / ratio)
            for r, (r_mean, r_boot) in ref_stats.items():
                dci = ci_or_nan(boot - r_boot if (boot is not None and r_boot is not None) else None)
                row[f"minus_{r}"], row[f"minus_{r}_ci_low"], row[f"minus_{r}_ci_high"] = mean - r_mean, *dci
            rows.append(row)
    all_ci = ci_or_nan(bootstrap_mean(y, np.ones(y.size, bool), clusters, W) if W is not None else None)
    return TopNResult(pd.DataFrame(rows), float(y.mean()), all_ci, refs, notes)


def retrieval_table(
    df: pd.DataFrame,
    *,
    outcome: str = "gain",
    ratios: Sequence[float] = DEFAULT_RATIOS,
    selectors: Sequence[str] | None = None,
) -> pd.DataFrame:
    """AUROC and precision@rho of each score for finding the top-rho gains (exact top-N of G).

    precision = |kept by score AND top-N by G| / N. NaN scores rank lowest for AUROC (as -inf).
    """
    df, _ = finite_outcome(df, outcome)
    sel = _selectors(df, selectors)
    rows = []
    for ratio in ratios:
        top_gain = kept_mask(df, outcome, ratio)
        n = int(top_gain.sum())
        for name, col in sel.items():
            s = df[col].to_numpy(np.float64)
            kept = kept_mask(df, col, ratio)
            rows.append(dict(selector=name, ratio=float(ratio), n_keep=n,
                             auroc=auroc(np.where(np.isnan(s), -np.inf, s), top_gain),
                             precision=float((kept & top_gain).sum() / n) if n else float("nan")))
    return pd.DataFrame(rows)


def kept_overlap(
    df: pd.DataFrame, *, ratios: Sequence[float] = DEFAULT_RATIOS, selectors: Sequence[str] | None = None
) -> pd.DataFrame:
    """Jaccard |A cap B| / |A cup B| of the kept sets of every selector pair at each ratio (both orders + diagonal)."""
    sel = _selectors(df, selectors)
    rows = []
    for ratio in ratios:
        masks = {name: kept_mask(df, col, ratio) for name, col in sel.items()}
        for a in masks:
            jaccard = 1.0 if masks[a].any() else float("nan")
            rows.append(dict(ratio=float(ratio), selector_a=a, selector_b=a, jaccard=jaccard))
        for a, b in combinations(masks, 2):
            union = (masks[a] | masks[b]).sum()
            j = float((masks[a] & masks[b]).sum() / union) if union else float("nan")
            rows.append(dict(ratio=float(ratio), selector_a=a, selector_b=b, jaccard=j))
            rows.append(dict(ratio=float(ratio), selector_a=b, selector_b=a, jaccard=j))
    return pd.DataFrame(rows)
