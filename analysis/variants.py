"""Statistics of the diagnostic's two variants beside the single-step gain.

* `first_order_agreement`: in ``mode=first-order`` runs, tokens.parquet holds both the measured
  single-step gain and Proposition 1's first-order estimate (``gain_first_order``); their Spearman
  correlation says how well the estimate ranks positions.
* `group_summary`: ``group.parquet`` holds, per selector and ratio, one update on the selector's
  kept set and the gain at every bank position; its summary is the number kept and the mean gain
  over all positions and over the kept ones, and gain per kept token (the whole bank's gain / the number kept).
"""

from __future__ import annotations

import pandas as pd

from analysis.io import require_columns
from analysis.ranks import spearman


def first_order_agreement(tokens: pd.DataFrame) -> dict[str, float | int] | None:
    """{"spearman": rho(first-order estimate, gain), "n": positions with both finite}, or None
    when the run has no first-order column."""
    if "gain_first_order" not in tokens.columns:
        return None
    finite = tokens[["gain", "gain_first_order"]].dropna()
    return {"spearman": spearman(finite["gain_first_order"].to_numpy(), finite["gain"].to_numpy()), "n": len(finite)}


def group_summary(group: pd.DataFrame) -> list[dict[str, object]]:
    """One record per (selector, ratio), in the table's order: n_kept, mean_gain_all (over every
    position), mean_gain_kept (over the kept positions; NaN when none is kept), gain_per_kept (the sum of the
    gains over every position / n_kept; NaN when none is kept)."""
    require_columns(group, ["selector", "ratio", "kept", "gain"], "group.parquet")
    rows = []
    for (selector, ratio), part in group.groupby(["selector", "ratio"], sort=False):
        rows.append({
            "selector": selector, "ratio": float(ratio), "n_kept": int(part["kept"].sum()),
            "mean_gain_all": float(part["gain"].mean()), "mean_gain_kept": float(part.loc[part["kept"], "gain"].mean()),
            # the update's whole-bank gain per token it trained on (matched-budget efficiency, issue 22)
            "gain_per_kept": float(part["gain"].sum() / part["kept"].sum()) if part["kept"].any() else float("nan"),
        })
    return rows
