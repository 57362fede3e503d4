"""The comparison table of a training run: one row per (selector, ratio), from the metrics and live gains.

Columns (means and stds are over seeds):
  selector, ratio, n_seeds,
  acc_before_mean/std   greedy held-out exact match at step 0 (the base student),
  acc_after_mean/std    the same at the last step,
  supervised_tokens     kept (loss-bearing) positions over the whole run, mean over seeds,
  effective_ratio       kept / valid response positions (above `ratio` when min_per_sequence binds),
  kl_after_mean         KL(pT||pS) per token on the common bank at the last step,
  time_s                training seconds (rollout, scoring, update; no evaluation), mean over seeds,
  peak_mem_mb           the highest per-step peak memory (RSS on CPU, allocated on CUDA) over seeds,
  live_gain_mean, live_gain_ci_low, live_gain_ci_high
                        the live selector check (`opd.evaluation.summarize_gains`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from opd.evaluation import summarize_gains

COMPARISON_COLUMNS = (
    "selector", "ratio", "n_seeds", "acc_before_mean", "acc_before_std", "acc_after_mean", "acc_after_std",
    "supervised_tokens", "effective_ratio", "kl_after_mean", "time_s", "peak_mem_mb",
    "live_gain_mean", "live_gain_ci_low", "live_gain_ci_high",
)


def _std(values: pd.Series) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else math.nan


def comparison_table(metrics: pd.DataFrame, gains: dict[tuple[str, float, int], pd.DataFrame], valid_tokens: dict[tuple[str, float, int], int]) -> pd.DataFrame:
    """metrics: every arm's rows; gains: (selector, ratio, seed) -> `live_gains` table;
    valid_tokens: (selector, ratio, seed) -> valid response positions over the run."""
    rows = []
    for (selector, ratio), arm_rows in metrics.groupby(["selector", "ratio"], sort=False):
        first = arm_rows[arm_rows["step"] == 0].sort_values("seed")
        last_step = arm_rows["step"].max()
        last = arm_rows[arm_rows["step"] == last_step].sort_values("seed")
        per_seed = arm_rows.groupby("seed")
        kept = per_seed["kept_tokens"].sum()
        seeds = sorted(arm_rows["seed"].unique())
        valid = np.array([valid_tokens.get((selector, float(ratio), int(s)), 0) for s in seeds], dtype=float)
        mean, lo, hi = summarize_gains([gains[(selector, float(ratio), int(s))] for s in seeds])
        rows.append({
            "selector": selector,
            "ratio": float(ratio),
            "n_seeds": len(seeds),
            "acc_before_mean": float(first["accuracy"].mean()),
            "acc_before_std": _std(first["accuracy"]),
            "acc_after_mean": float(last["accuracy"].mean()),
            "acc_after_std": _std(last["accuracy"]),
            "supervised_tokens": int(round(kept.mean())),
            "effective_ratio": float(kept.sum() / valid.sum()) if valid.sum() else math.nan,
            "kl_after_mean": float(last["kl_to_teacher"].mean()),
            "time_s": float(per_seed["wall_time_s"].max().mean()),
            "peak_mem_mb": float(arm_rows["peak_mem_mb"].max()),
            "live_gain_mean": mean,
            "live_gain_ci_low": lo,
            "live_gain_ci_high": hi,
        })
    return pd.DataFrame(rows, columns=list(COMPARISON_COLUMNS))


def to_markdown(table: pd.DataFrame, *, title: str = "") -> str:
    """A GitHub markdown table (no extra dependency); floats to 4 significant digits."""

    def cell(value) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    lines = [f"## {title}", ""] if title else []
    lines.append("| " + " | ".join(table.columns) + " |")
    lines.append("|" + "|".join("---" for _ in table.columns) + "|")
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"
