"""Plot primitives in one house style: the style, colours and norms, and one function per figure kind.

Every plotting function takes tables or small dicts (the outputs of `analysis.stats`, `analysis.selectors`,
`analysis.report`), draws on a fresh `matplotlib.figure.Figure` (no pyplot state, so it works headless and
inside notebooks alike), names the run in the suptitle, labels every axis with its unit, and returns the
Figure. Signed gains use one diverging colormap centred at 0 (`GAIN_CMAP`, blue = the student moved toward
the teacher); non-negative scores a sequential one. `save_figure` writes PNG and PDF. Which figures a run
gets is `analysis.figures`' business.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import matplotlib as mpl
import numpy as np
import pandas as pd
import scipy.stats
import seaborn as sns
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from analysis.io import require_columns, score_columns
from analysis.report import REPORT_SCORES
from analysis.stats import bucket_variables, finite_outcome

HOUSE_RC: dict[str, Any] = {
    **sns.axes_style("whitegrid"),
    "figure.dpi": 110,
    "savefig.dpi": 150,
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "figure.constrained_layout.use": True,
    "pdf.fonttype": 42,  # embed TrueType so PDF text stays editable
}


GAIN_CMAP = "RdBu"  # diverging, centred at 0: red = gain < 0, blue = gain > 0


SCORE_CMAP = "viridis"  # sequential, for non-negative scores


GAIN_LABEL = "gain G (nats)"


MISSING_COLOR = "#bdbdbd"  # grid cells without tokens


FIGURE_FORMATS: tuple[str, ...] = ("png", "pdf")


F = TypeVar("F", bound=Callable[..., Figure])


def house_style(fn: F) -> F:
    """Draw inside the house rc settings (the only place the style is defined)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Figure:
        with mpl.rc_context(HOUSE_RC):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


SELECTOR_COLORS: dict[str, str] = {
    "teachability": "#1f4e9c", "kl": "#e08214", "entropy": "#33a02c", "tip": "#6a3d9a", "compat": "#8c510a",
    "incompatible": "#c51b1b", "random": "#7f7f7f", "full": "#000000", "teachability_entropy": "#1b9e9e",
    "q3_compat": "#d8b365", "q3_teachability": "#74a9cf", "q3_incompatible": "#f4a582", "q3_only": "#c2a5cf",
}


def selector_colors(names: Sequence[str]) -> dict[str, Any]:
    """A stable colour per selector name (same selector, same colour, in every figure)."""
    extra = sorted(n for n in names if n not in SELECTOR_COLORS)
    palette = sns.color_palette("Set2", max(len(extra), 1))
    return {n: SELECTOR_COLORS.get(n, palette[extra.index(n)] if n in extra else "grey") for n in names}


def cmap_with_missing(name: str) -> mpl.colors.Colormap:
    """The named colormap with empty cells (NaN) drawn grey, so "no tokens" never reads as "gain 0"."""
    return mpl.colormaps[name].with_extremes(bad=MISSING_COLOR)


def gain_norm(values: np.ndarray) -> Normalize:
    """Symmetric diverging normalisation centred at 0 for signed gains."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    m = float(np.max(np.abs(finite))) if finite.size else 1.0
    m = m if m > 0 else 1.0
    return TwoSlopeNorm(vcenter=0.0, vmin=-m, vmax=m)


def _run_name(df: pd.DataFrame | None, run_name: str | None) -> str:
    if run_name:
        return run_name
    return str(df.attrs.get("run_name", "run")) if df is not None else "run"


def save_figure(fig: Figure, out_dir: str | Path, stem: str) -> list[Path]:
    """Write `fig` as <out_dir>/<stem>.png and .pdf; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with mpl.rc_context(HOUSE_RC):
        for ext in FIGURE_FORMATS:
            path = out_dir / f"{stem}.{ext}"
            fig.savefig(path)
            paths.append(path)
    return paths


def percentile_ranks(x: np.ndarray) -> np.ndarray:
    """Percentile rank in [0, 100) of each value (average ranks for ties)."""
    return (scipy.stats.rankdata(x) - 0.5) / x.size * 100.0


def grid_mean(px: np.ndarray, py: np.ndarray, v: np.ndarray, bins: int) -> np.ndarray:
    """[bins, bins] mean of v over a (py row, px column) percentile grid; NaN for empty cells."""
    ix = np.minimum((px / 100.0 * bins).astype(int), bins - 1)
    iy = np.minimum((py / 100.0 * bins).astype(int), bins - 1)
    flat = iy * bins + ix
    s = np.bincount(flat, weights=v, minlength=bins * bins)
    n = np.bincount(flat, minlength=bins * bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (s / n).reshape(bins, bins)


@house_style
def plot_gain_heatmap(
    df: pd.DataFrame, *, outcome: str = "gain", bins: int = 10, run_name: str | None = None
) -> Figure:
    """Mean gain over the D^L percentile x D^I percentile grid (diverging colours centred at 0)."""
    df, _ = finite_outcome(df, outcome)
    v = bucket_variables(df)
    grid = grid_mean(percentile_ranks(v["D^I"]), percentile_ranks(v["D^L"]), df[outcome].to_numpy(np.float64), bins)
    fig = Figure(figsize=(5.2, 4.4))
    ax = fig.add_subplot()
    im = ax.imshow(grid, origin="lower", extent=(0, 100, 0, 100), cmap=cmap_with_missing(GAIN_CMAP),
                   norm=gain_norm(grid), aspect="auto")
    fig.colorbar(im, ax=ax, label=f"mean {GAIN_LABEL}")
    ax.set_xlabel("incompatible disagreement D^I percentile (%)")
    ax.set_ylabel("learnable disagreement D^L percentile (%)")
    ax.grid(False)
    fig.suptitle(f"{_run_name(df, run_name)}: gain over D^L x D^I (grey: no tokens)")
    return fig


@house_style
def plot_quadrant_scores(df: pd.DataFrame, *, bins: int = 10, run_name: str | None = None) -> Figure:
    """Mean D^L and D^I over TIP's plane: student-entropy percentile x disagreement (KL) percentile; Q3 outlined."""
    require_columns(df, ["norm_entropy", "norm_disagreement"], "quadrant figure")
    v = bucket_variables(df)
    ph = percentile_ranks(df["norm_entropy"].to_numpy(np.float64))
    pd_ = percentile_ranks(df["norm_disagreement"].to_numpy(np.float64))
    grids = {name: grid_mean(ph, pd_, v[name], bins) for name in ("D^L", "D^I")}
    vmax = max(float(np.nanmax(g)) if np.isfinite(g).any() else 0.0 for g in grids.values()) or 1.0
    fig = Figure(figsize=(9.5, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (name, grid) in zip(axes, grids.items()):
        im = ax.imshow(grid, origin="lower", extent=(0, 100, 0, 100), cmap=cmap_with_missing(SCORE_CMAP), vmin=0.0,
                       vmax=vmax, aspect="auto")
        ax.add_patch(Rectangle((0, 50), 50, 50, fill=False, edgecolor="white", linewidth=2.0, linestyle="--"))
        ax.text(25, 96, "Q3", color="white", ha="center", va="top", fontsize=9, fontweight="bold")
        ax.set_title(f"mean {name}")
        ax.set_xlabel("student entropy H~ percentile (%)")
        ax.grid(False)
    axes[0].set_ylabel("disagreement (raw KL) D~ percentile (%)")
    fig.colorbar(im, ax=list(axes), label="mean score (normalised, unitless)")
    fig.suptitle(f"{_run_name(df, run_name)}: D^L and D^I over the entropy x KL plane")
    return fig


@house_style
def plot_coefficients(ols_by_k: Mapping[str, Mapping[str, Any]], *, run_name: str = "run") -> Figure:
    """Bars of beta_L vs beta_I (standardised, with 95% cluster-bootstrap CIs), one group per K."""
    ks = sorted(ols_by_k, key=lambda k: int(k))
    fig = Figure(figsize=(max(4.0, 1.6 * len(ks) + 2.0), 3.8))
    ax = fig.add_subplot()
    x = np.arange(len(ks))
    width = 0.38
    for j, (key, label, color) in enumerate((("beta_L", "beta_L (D^L = D~ C~)", "#2166ac"),
                                             ("beta_I", "beta_I (D^I = D~ (1 - C~))", "#b2182b"))):
        vals = np.array([_f(ols_by_k[k].get(key)) for k in ks])
        ci = np.array([[_f((ols_by_k[k].get(f"{key}_ci") or (None, None))[i]) for k in ks] for i in (0, 1)])
        err = np.abs(ci - vals[None, :])
        ax.bar(x + (j - 0.5) * width, vals, width, label=label, color=color,
               yerr=np.where(np.isfinite(err), err, 0.0), capsize=3)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, [f"K={k}" for k in ks])
    ax.set_xlabel("top-K used for D and C")
    ax.set_ylabel("standardised coefficient (sd of G per sd)")
    ax.legend()
    fig.suptitle(f"{run_name}: learnable vs incompatible disagreement")
    return fig


@house_style
def plot_support_gaps(gaps: Mapping[str, Mapping[str, Any]], *, title: str = "Q3 support gap by run",
                      unit: str = "nats", xlabel: str = "setting (run, top-K)") -> Figure:
    """One bar per setting (run, or run/K): the Q3 support gap in nats with its 95% CI."""
    labels = list(gaps)
    vals = np.array([_f(gaps[k].get("gap")) for k in labels])
    ci = np.array([[_f((gaps[k].get("ci") or (None, None))[i]) for k in labels] for i in (0, 1)])
    err = np.abs(ci - vals[None, :])
    fig = Figure(figsize=(max(4.0, 0.9 * len(labels) + 2.0), 3.8))
    ax = fig.add_subplot()
    colors = [mpl.colormaps[GAIN_CMAP](gain_norm(vals)(v)) if np.isfinite(v) else "grey" for v in vals]
    ax.bar(np.arange(len(labels)), vals, color=colors, edgecolor="black", linewidth=0.5,
           yerr=np.where(np.isfinite(err), err, 0.0), capsize=3)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(labels)), labels, rotation=30, ha="right")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"support gap: mean G high-C minus low-C ({unit})")
    fig.suptitle(title)
    return fig


@house_style
def plot_top_n(table: pd.DataFrame, *, mean_gain_all: float | None = None, run_name: str = "run",
               unit: str = "nats") -> Figure:
    """Left: mean G of each selector's kept tokens per ratio (95% CI); right: gain per keep vs ratio."""
    require_columns(table, ["selector", "ratio", "mean_gain", "ci_low", "ci_high", "gain_per_keep"], "top-N figure")
    ratios = sorted(table["ratio"].unique())
    middle = table[table["ratio"] == ratios[len(ratios) // 2]]
    order = middle.sort_values("mean_gain", ascending=False)["selector"].tolist()
    colors = selector_colors(order)
    fig = Figure(figsize=(11.0, 4.2))
    ax, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / max(len(ratios), 1)
    shades = sns.color_palette("Blues", len(ratios) + 1)[1:]
    for j, r in enumerate(ratios):
        t = table[table["ratio"] == r].set_index("selector").reindex(order)
        err = np.abs(t[["ci_low", "ci_high"]].to_numpy().T - t["mean_gain"].to_numpy()[None, :])
        ax.bar(np.arange(len(order)) + (j - (len(ratios) - 1) / 2) * width, t["mean_gain"], width,
               yerr=np.where(np.isfinite(err), err, 0.0), capsize=2, color=shades[j], label=f"{r:.0%}",
               error_kw={"ecolor": "#444444", "elinewidth": 0.8})
    if mean_gain_all is not None and np.isfinite(mean_gain_all):
        ax.axhline(mean_gain_all, color="grey", linestyle="--", linewidth=1, label="all tokens")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(order)), order, rotation=35, ha="right")
    ax.set_xlabel("selector (exact top-N by score)")
    ax.set_ylabel(f"mean gain of kept tokens G ({unit})")
    ax.legend(title="retention", ncols=2)
    for name in order:
        t = table[table["selector"] == name].sort_values("ratio")
        ax2.plot(t["ratio"] * 100, t["gain_per_keep"], marker="o", color=colors[name], label=name)
    ax2.set_xlabel("retention ratio (%)")
    ax2.set_ylabel(f"gain per keep: mean G / ratio ({unit})")
    ax2.legend(fontsize=6, ncols=2)
    fig.suptitle(f"{run_name}: exact top-N selector analysis")
    return fig


@house_style
def plot_gain_vs_budget(table: pd.DataFrame, *, mean_gain_all: float | None = None, run_name: str = "run",
                        unit: str = "nats") -> Figure:
    """Mean gain of the kept tokens against the budget, one line per rule (95% cluster-bootstrap band)."""
    require_columns(table, ["selector", "ratio", "mean_gain", "ci_low", "ci_high"], "gain-vs-budget figure")
    last = table[table["ratio"] == table["ratio"].max()].sort_values("mean_gain", ascending=False)
    order = last["selector"].tolist() + [s for s in table["selector"].unique() if s not in set(last["selector"])]
    colors = selector_colors(order)
    fig = Figure(figsize=(7.5, 4.6))
    ax = fig.subplots()
    for name in order:
        t = table[table["selector"] == name].sort_values("ratio")
        x = t["ratio"].to_numpy() * 100
        ax.plot(x, t["mean_gain"], marker="o", markersize=3, color=colors[name], label=name)
        ax.fill_between(x, t["ci_low"], t["ci_high"], color=colors[name], alpha=0.12, linewidth=0)
    if mean_gain_all is not None and np.isfinite(mean_gain_all):
        ax.axhline(mean_gain_all, color="grey", linestyle="--", linewidth=1, label="all tokens (full)")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ticks = sorted(table["ratio"].unique() * 100)
    ax.set_xticks(ticks, [f"{v:g}" for v in ticks])
    ax.set_xlabel("budget: kept share of the bank's tokens (%, log scale)")
    ax.set_ylabel(f"mean gain of kept tokens G ({unit})")
    ax.legend(fontsize=6, ncols=2, loc="best")
    fig.suptitle(f"{run_name}: mean gain kept vs budget, one line per rule (exact top-N)")
    return fig


@house_style
def plot_bucket_curves(
    buckets: pd.DataFrame, residuals: pd.DataFrame | None = None, *, run_name: str = "run"
) -> Figure:
    """Mean G by quartile of D^L, D^I, C~ inside Q3 (left) and mean residual G by decile (right), 95% CI bands."""
    panels = [("mean G inside Q3", buckets, "mean gain G (nats)")]
    if residuals is not None and len(residuals):
        panels.append(("residual G after base OLS", residuals, "mean residual gain (nats)"))
    fig = Figure(figsize=(5.0 * len(panels), 3.9))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    colors = {"D^L": "#2166ac", "D^I": "#b2182b", "C~": "#1b7837"}
    for ax, (title, t, ylabel) in zip(axes, panels):
        require_columns(t, ["variable", "bucket", "mean_gain", "ci_low", "ci_high"], "bucket figure")
        for name, g in t.groupby("variable", sort=False):
            g = g.sort_values("bucket")
            ax.plot(g["bucket"], g["mean_gain"], marker="o", color=colors.get(name), label=name)
            ax.fill_between(g["bucket"], g["ci_low"], g["ci_high"], color=colors.get(name), alpha=0.15)
        ax.axhline(0, color="black", linewidth=0.8)
        n_b = int(t["bucket"].max()) if len(t) else 0
        kind = {4: "quartile", 10: "decile"}.get(n_b, f"{n_b}-tile")
        ax.set_xlabel(f"bucket of the variable ({kind}, 1 = lowest)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"{run_name}: gain by bucket")
    return fig


@house_style
def plot_score_hexbins(
    df: pd.DataFrame, *, scores: Sequence[str] | None = None, outcome: str = "gain", run_name: str | None = None,
    gridsize: int = 30,
) -> Figure:
    """One hexbin per score: score (x) vs gain G (y), log-scaled counts."""
    df, _ = finite_outcome(df, outcome)
    cols = score_columns(df)
    scores = [s for s in (scores or REPORT_SCORES) if s in cols]
    n = len(scores)
    ncols = min(4, max(n, 1))
    nrows = int(np.ceil(n / ncols)) if n else 1
    fig = Figure(figsize=(3.2 * ncols, 2.8 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    y = df[outcome].to_numpy(np.float64)
    for ax, name in zip(axes, scores):
        x = df[cols[name]].to_numpy(np.float64)
        ok = np.isfinite(x)  # Q3 variants are -inf outside Q3
        if ok.sum() > 0:
            ax.hexbin(x[ok], y[ok], gridsize=gridsize, bins="log", cmap="Greys", mincnt=1)
        ax.axhline(0, color="#b2182b", linewidth=0.6)
        ax.set_xlabel(f"{name} score (unitless)")
        ax.set_ylabel(GAIN_LABEL)
        ax.grid(False)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(f"{_run_name(df, run_name)}: score vs gain (hexbin, log counts)")
    return fig


@house_style
def plot_kept_overlap(overlap: pd.DataFrame, *, ratio: float, run_name: str = "run") -> Figure:
    """Jaccard overlap of the kept sets of every selector pair at one retention ratio."""
    require_columns(overlap, ["ratio", "selector_a", "selector_b", "jaccard"], "overlap figure")
    t = overlap[np.isclose(overlap["ratio"], ratio)]
    m = t.pivot(index="selector_a", columns="selector_b", values="jaccard")
    fig = Figure(figsize=(0.45 * len(m) + 3.0, 0.4 * len(m) + 2.4))
    ax = fig.add_subplot()
    sns.heatmap(m, ax=ax, vmin=0, vmax=1, cmap=SCORE_CMAP, annot=len(m) <= 8, fmt=".2f",
                cbar_kws={"label": "Jaccard overlap of kept sets (fraction)"})
    ax.set_xlabel("selector")
    ax.set_ylabel("selector")
    fig.suptitle(f"{run_name}: kept-set overlap at {ratio:.0%} retention")
    return fig


@house_style
def plot_learning_curves(metrics: pd.DataFrame, *, run_name: str | None = None) -> Figure:
    """Accuracy and KL to teacher vs step, mean +- std over seeds, one line per (selector, ratio)."""
    require_columns(metrics, ["step", "selector", "ratio", "seed"], "learning curves")
    panels = [(c, lab) for c, lab in (("accuracy", "accuracy (fraction correct)"),
                                      ("kl_to_teacher", "KL to teacher (nats / token)"),
                                      ("loss", "training loss (nats / token)")) if c in metrics.columns]
    panels = [p for p in panels if metrics[p[0]].notna().any()][:2] or panels[-1:]
    fig = Figure(figsize=(5.0 * len(panels), 3.8))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    colors = selector_colors(metrics["selector"].unique().tolist())
    for ax, (col, ylabel) in zip(axes, panels):
        ev = metrics.dropna(subset=[col])
        for (sel, ratio), g in ev.groupby(["selector", "ratio"], sort=False):
            agg = g.groupby("step")[col].agg(["mean", "std"]).reset_index()
            sd = agg["std"].fillna(0.0)
            ax.plot(agg["step"], agg["mean"], marker="o", markersize=3, color=colors[sel], label=f"{sel} @ {ratio:.0%}")
            ax.fill_between(agg["step"], agg["mean"] - sd, agg["mean"] + sd, color=colors[sel], alpha=0.15)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    fig.suptitle(f"{_run_name(metrics, run_name)}: learning curves (mean +- std over seeds)")
    return fig


@house_style
def plot_selector_comparison(comparison: pd.DataFrame, *, run_name: str = "run") -> Figure:
    """Accuracy before/after per selector (mean +- std over seeds) and, when present, live gain with CI."""
    require_columns(comparison, ["selector", "ratio", "acc_before_mean", "acc_before_std",
                                 "acc_after_mean", "acc_after_std"], "selector comparison")
    has_live = "live_gain_mean" in comparison.columns and comparison["live_gain_mean"].notna().any()
    many = len(comparison) > 6  # a zoo's arms: one slanted line per label, the panels as wide as the arms need
    width = max(4.75, 0.45 * len(comparison)) if many else 4.75
    fig = Figure(figsize=(width * (2 if has_live else 1) + (0 if has_live else 0.75), 4.6 if many else 3.9))
    axes = np.atleast_1d(fig.subplots(1, 2 if has_live else 1))
    labels = [f"{s}{' ' if many else chr(10)}@{r:.0%}" for s, r in zip(comparison["selector"], comparison["ratio"])]
    x = np.arange(len(comparison))
    ticks = {"rotation": 40, "ha": "right", "rotation_mode": "anchor"} if many else {}
    ax = axes[0]
    for j, (stage, color) in enumerate((("before", "#bababa"), ("after", "#2166ac"))):
        ax.bar(x + (j - 0.5) * 0.38, comparison[f"acc_{stage}_mean"], 0.38,
               yerr=comparison[f"acc_{stage}_std"].fillna(0), capsize=3, color=color, label=stage)
    ax.set_xticks(x, labels, **ticks)
    ax.set_xlabel("selector @ retention ratio")
    ax.set_ylabel("accuracy (fraction correct)")
    ax.legend()
    if has_live:
        ax = axes[1]
        mean = comparison["live_gain_mean"].to_numpy(np.float64)
        lo = comparison.get("live_gain_ci_low", pd.Series(mean)).to_numpy(np.float64)
        hi = comparison.get("live_gain_ci_high", pd.Series(mean)).to_numpy(np.float64)
        err = np.abs(np.vstack([lo, hi]) - mean[None, :])
        colors = [mpl.colormaps[GAIN_CMAP](gain_norm(mean)(v)) for v in mean]
        ax.bar(x, mean, 0.6, yerr=np.where(np.isfinite(err), err, 0.0), capsize=3, color=colors, edgecolor="black",
               linewidth=0.5)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(x, labels, **ticks)
        ax.set_xlabel("selector @ retention ratio")
        ax.set_ylabel("live gain on the common bank G (nats)")
    fig.suptitle(f"{run_name}: selector comparison")
    return fig


def _f(x: Any) -> float:
    return float("nan") if x is None else float(x)
