"""Summaries of training runs (``metrics.parquet`` / ``comparison.parquet``): final metrics and selector checks.

Training runs have few seeds, so intervals here are over seeds, not prompts: the difference of a
selector's mean final accuracy to a reference selector's gets a Welch t interval from the per-selector
mean, std and seed count (no interval with fewer than 2 seeds on either side; said in ``note``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.stats

from analysis.io import COMPARISON_REQUIRED, require_columns


def final_metrics(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per (selector, ratio): the last evaluated step's accuracy and KL to teacher, mean and std over seeds."""
    require_columns(metrics, ["step", "selector", "ratio", "seed"], "metrics")
    rows = []
    for (sel, ratio), g in metrics.groupby(["selector", "ratio"], sort=False):
        row: dict[str, object] = {"selector": sel, "ratio": float(ratio), "n_seeds": int(g["seed"].nunique())}
        for col in ("accuracy", "kl_to_teacher"):
            ev = g.dropna(subset=[col]) if col in g.columns else g.iloc[0:0]
            if ev.empty:
                row.update({f"{col}_step": np.nan, f"{col}_mean": np.nan, f"{col}_std": np.nan})
                continue
            last = ev[ev["step"] == ev["step"].max()][col]
            row.update({f"{col}_step": int(ev["step"].max()), f"{col}_mean": float(last.mean()),
                        f"{col}_std": float(last.std(ddof=1)) if len(last) > 1 else np.nan})
        rows.append(row)
    return pd.DataFrame(rows)


def welch_interval(m1: float, s1: float, n1: int, m2: float, s2: float, n2: int, level: float = 0.95) -> tuple[float, float]:
    """Welch t interval for mean1 - mean2 from summary statistics; (nan, nan) with < 2 samples on a side."""
    if n1 < 2 or n2 < 2 or not np.isfinite([m1, s1, m2, s2]).all():
        return float("nan"), float("nan")
    v1, v2 = s1**2 / n1, s2**2 / n2
    se = np.sqrt(v1 + v2)
    if se == 0:
        return float(m1 - m2), float(m1 - m2)
    df = (v1 + v2) ** 2 / (v1**2 / (n1 - 1) + v2**2 / (n2 - 1))
    t = scipy.stats.t.ppf(0.5 + level / 2, df)
    return float(m1 - m2 - t * se), float(m1 - m2 + t * se)


def selector_checks(comparison: pd.DataFrame, *, reference: str = "full") -> pd.DataFrame:
    """Per selector: accuracy change (after - before) and final accuracy minus `reference`'s with a Welch 95% CI.

    ``passed`` is True when the CI lies above 0, False when it does not, None when no CI exists.
    """
    require_columns(comparison, COMPARISON_REQUIRED, "comparison")
    ref = comparison[comparison["selector"] == reference]
    rows = []
    for r in comparison.itertuples(index=False):
        row = {"selector": r.selector, "ratio": float(r.ratio), "n_seeds": int(r.n_seeds),
               "acc_before": float(r.acc_before_mean), "acc_after": float(r.acc_after_mean),
               "acc_change": float(r.acc_after_mean - r.acc_before_mean)}
        if ref.empty or r.selector == reference:
            row.update(minus_ref=np.nan, ci_low=np.nan, ci_high=np.nan, passed=None,
                       note="is the reference" if r.selector == reference else f"no {reference!r} row")
        else:
            q = ref.iloc[0]
            lo, hi = welch_interval(r.acc_after_mean, r.acc_after_std, int(r.n_seeds),
                                    q.acc_after_mean, q.acc_after_std, int(q.n_seeds))
            row.update(minus_ref=float(r.acc_after_mean - q.acc_after_mean), ci_low=lo, ci_high=hi,
                       passed=None if np.isnan(lo) else bool(lo > 0),
                       note="" if np.isfinite(lo) else "fewer than 2 seeds: no interval")
        rows.append(row)
    out = pd.DataFrame(rows)
    out.attrs["reference"] = reference
    return out
