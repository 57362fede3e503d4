"""Statistics of training runs: the comparison table, final metrics and selector checks.

`taopd train` writes raw tables (``metrics.parquet``: every arm's rows; ``live_gain.parquet``: every
arm's live gain per bank sequence); here they become the comparison table (``comparison_table``,
``to_markdown``; the command writes ``comparison.parquet/.md``), and the comparison becomes checks.

Training runs have few seeds, so intervals here are over seeds, not prompts: a selector's live gain
gets a t interval over its seeds (a cluster bootstrap over bank sequences with one seed), and the
difference of its mean final accuracy to a reference selector's a Welch t interval from the
per-selector mean, std and seed count (no interval with fewer than 2 seeds on either side; said in
``note``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats

from analysis.io import COMPARISON_REQUIRED, require_columns
from analysis.pass_at_1 import add_evaluation
from diagnostics.core.files import read_json

COMPARISON_COLUMNS = (
    "selector", "ratio", "n_seeds", "acc_before_mean", "acc_before_std", "acc_after_mean", "acc_after_std",
    "supervised_tokens", "effective_ratio", "kl_after_mean", "time_s", "peak_mem_mb",
    "live_gain_mean", "live_gain_ci_low", "live_gain_ci_high",
)
LIVE_GAIN_REQUIRED = ("selector", "ratio", "seed", "gain_sum", "n_tokens")


def summarize_gains(per_seed: list[pd.DataFrame], *, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, ci_low, ci_high) of the token-mean live gain over a selector's seeds (95%).

    per_seed: one table per seed with a row per bank sequence (gain_sum, n_tokens). Two or more
    seeds: a t interval over the seeds' token means (the training randomness); one seed: a cluster
    bootstrap over bank sequences.
    """
    means = np.array([g["gain_sum"].sum() / g["n_tokens"].sum() for g in per_seed])
    mean = float(means.mean())
    if len(means) >= 2:
        half = scipy.stats.t.ppf(0.975, len(means) - 1) * means.std(ddof=1) / np.sqrt(len(means))
        return mean, float(mean - half), float(mean + half)
    g = per_seed[0]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(g), size=(n_boot, len(g)))  # resample whole sequences
    boot = g["gain_sum"].to_numpy()[idx].sum(1) / np.maximum(g["n_tokens"].to_numpy()[idx].sum(1), 1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return mean, float(lo), float(hi)


def _std(values: pd.Series) -> float:
    return float(values.std(ddof=1)) if len(values) > 1 else math.nan


def comparison_table(metrics: pd.DataFrame, live_gains: pd.DataFrame) -> pd.DataFrame:
    """One row per (selector, ratio) in the metrics' order; means and stds over seeds.

    Columns: n_seeds; acc_before_mean/std (greedy held-out exact match at step 0) and
    acc_after_mean/std (at the last step); supervised_tokens (kept positions over the run, mean over
    seeds); effective_ratio (kept / valid positions, above `ratio` when min_per_sequence binds);
    kl_after_mean (KL(pT||pS) per bank token at the last step); time_s (training seconds, mean over
    seeds); peak_mem_mb (the highest per-step peak over seeds); live_gain_mean/ci_low/ci_high
    (`summarize_gains`).
    """
    require_columns(metrics, ["step", "selector", "ratio", "seed", "accuracy", "kl_to_teacher", "kept_tokens",
                              "valid_tokens", "wall_time_s", "peak_mem_mb"], "metrics")
    require_columns(live_gains, LIVE_GAIN_REQUIRED, "live gains")
    rows = []
    for (selector, ratio), arm_rows in metrics.groupby(["selector", "ratio"], sort=False):
        first = arm_rows[arm_rows["step"] == 0].sort_values("seed")
        last = arm_rows[arm_rows["step"] == arm_rows["step"].max()].sort_values("seed")
        per_seed = arm_rows.groupby("seed")
        kept = per_seed["kept_tokens"].sum()
        seeds = sorted(arm_rows["seed"].unique())
        valid = np.array([arm_rows.loc[arm_rows["seed"] == s, "valid_tokens"].sum() for s in seeds], dtype=float)
        mine = live_gains[(live_gains["selector"] == selector) & (live_gains["ratio"] == float(ratio))]
        mean, lo, hi = summarize_gains([mine[mine["seed"] == s].reset_index(drop=True) for s in seeds])
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


def run_comparison(run_dir: str | Path) -> tuple[pd.DataFrame, str]:
    """(comparison table, its markdown) of a training run folder, from its raw tables and manifest; with
    `taopd evaluate`'s columns (eval_pass1_*, lm_*: `analysis.pass_at_1.add_evaluation`) once it ran."""
    folder = Path(run_dir)
    metrics = pd.read_parquet(folder / "metrics.parquet")
    live_gains = pd.read_parquet(folder / "live_gain.parquet")
    manifest = read_json(folder / "manifest.json", "the run's manifest")
    table = comparison_table(metrics, live_gains)
    evaluated = folder / "evaluation" / "evaluation.parquet"  # `taopd evaluate run=<run>` adds its columns
    if evaluated.is_file():

        lm_path = evaluated.with_name("lm_eval.parquet")
        lm_eval = pd.read_parquet(lm_path) if lm_path.is_file() else None
        table = add_evaluation(table, pd.read_parquet(evaluated), lm_eval)
    title = f"{manifest['run_name']}: selector comparison ({manifest['loss']}, {manifest['normalization']})"
    return table, to_markdown(table, title=title)


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


def welch_interval(
    m1: float, s1: float, n1: int, m2: float, s2: float, n2: int, level: float = 0.95
) -> tuple[float, float]:
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
