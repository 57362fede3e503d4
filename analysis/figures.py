"""The figure sets of the diagnostic and training results (drawn by `analysis.plots`), saved as PNG and PDF.

`make_all_figures(results_dir, out_dir)` walks ``results/diagnose/*/tokens.parquet`` and
``results/train/*/metrics.parquet`` and writes every figure that applies:

    <out>/diagnose/<run>/{gain_heatmap, quadrant_scores, coefficients_by_k, top_n, bucket_curves,
                          score_hexbins, kept_overlap, top_n_budget}.{png,pdf}
    <out>/diagnose/<run>/paper_*.{png,pdf}     (a "protocol": "paper" run: `paper_figures`)
    <out>/support_gap_by_run.{png,pdf}          (one bar per diagnostic run and K)
    <out>/train/<run>/{learning_curves, selector_comparison}.{png,pdf}

The paper-protocol set (`paper_figures`): the asinh relative-gain heat map (Figure 2A), coefficient bars per
K, top-N with gain per keep, and the support-proxy gaps (Table 6), all under the release's definitions.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.io import find_runs, load_run, load_train_run
from analysis.paper import paper_frame
from analysis.paper_summary import summarize_paper
from analysis.plots import (
    GAIN_CMAP,
    cmap_with_missing,
    gain_norm,
    grid_mean,
    house_style,
    percentile_ranks,
    plot_bucket_curves,
    plot_coefficients,
    plot_gain_heatmap,
    plot_gain_vs_budget,
    plot_kept_overlap,
    plot_learning_curves,
    plot_quadrant_scores,
    plot_score_hexbins,
    plot_selector_comparison,
    plot_support_gaps,
    plot_top_n,
    save_figure,
)
from analysis.report import per_k_stats
from analysis.selectors import DEFAULT_RATIOS, kept_overlap, top_n_table
from analysis.stats import bucket_curves, residual_curves

# ----------------------------------------------------------------------------- house style (set once)


# ----------------------------------------------------------------------------- diagnostic figures


# ----------------------------------------------------------------------------- training figures


# ----------------------------------------------------------------------------- everything for a results folder


def diagnose_figures(
    df: pd.DataFrame, out_dir: str | Path, *, run_name: str, base_k: int | None = None,
    n_boot: int = 1000, seed: int = 0, ratios: Sequence[float] = DEFAULT_RATIOS,
) -> tuple[list[Path], dict[str, Any]]:
    """Write every per-run diagnostic figure; returns (paths, support_gap_by_k) for the cross-run figure."""
    out_dir = Path(out_dir)
    paths: list[Path] = []
    kw = dict(n_boot=n_boot, seed=seed)

    def emit(fig: Figure, stem: str) -> None:
        paths.extend(save_figure(fig, out_dir, stem))

    emit(plot_gain_heatmap(df, run_name=run_name), "gain_heatmap")
    emit(plot_quadrant_scores(df, run_name=run_name), "quadrant_scores")
    ols_by_k, gap_by_k = per_k_stats(df, base_k=base_k, **kw)
    if ols_by_k:
        emit(plot_coefficients(ols_by_k, run_name=run_name), "coefficients_by_k")
    top = top_n_table(df, ratios=ratios, **kw)
    if len(top.table):
        emit(plot_top_n(top.table, mean_gain_all=top.mean_gain_all, run_name=run_name), "top_n")
        emit(plot_gain_vs_budget(top.table, mean_gain_all=top.mean_gain_all, run_name=run_name), "top_n_budget")
    emit(plot_bucket_curves(bucket_curves(df, **kw), residual_curves(df, **kw), run_name=run_name), "bucket_curves")
    emit(plot_score_hexbins(df, run_name=run_name), "score_hexbins")
    overlap = kept_overlap(df, ratios=ratios)
    if len(overlap):
        headline = min(ratios, key=lambda r: abs(r - 0.03))
        emit(plot_kept_overlap(overlap, ratio=headline, run_name=run_name), "kept_overlap")
    return paths, gap_by_k


def make_all_figures(results_dir: str | Path, out_dir: str | Path, *, n_boot: int = 1000, seed: int = 0) -> list[Path]:
    """Walk `results_dir` (diagnose/*/tokens.parquet, train/*/metrics.parquet) and write every applicable figure.

    A run whose table fails to load or plot is skipped with a warning naming it; the others still render.
    Returns the written paths (PNG and PDF).
    """
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    paths: list[Path] = []
    gaps: dict[str, Any] = {}
    for run in find_runs(results_dir, "diagnose"):
        try:
            df, manifest = load_run(run)
            name = str(manifest.get("run_name", run.name))
            p, gap_by_k = diagnose_figures(df, out_dir / "diagnose" / run.name, run_name=name,
                                           base_k=manifest.get("k"), n_boot=n_boot, seed=seed)
            if manifest.get("protocol") == "paper":  # the release's definitions (analysis.figures)

                p += paper_figures(df, out_dir / "diagnose" / run.name, run_name=name, manifest=manifest,
                                   n_boot=n_boot, seed=seed)
        except (ValueError, OSError, KeyError) as err:
            warnings.warn(f"figures: skipped diagnostic run {run}: {err}", stacklevel=2)
            continue
        paths += p
        gaps.update({f"{name} K={k}": g for k, g in gap_by_k.items()})
    if gaps:
        runs = sorted({label.rsplit(" K=", 1)[0] for label in gaps})
        paths += save_figure(plot_support_gaps(gaps, title=f"Q3 support gap by run: {', '.join(runs)}"),
                             out_dir, "support_gap_by_run")
    for run in find_runs(results_dir, "train"):
        try:
            metrics, comparison, manifest = load_train_run(run)
            name = str(manifest.get("run_name", run.name))
            train_dir = out_dir / "train" / run.name
            paths += save_figure(plot_learning_curves(metrics, run_name=name), train_dir, "learning_curves")
            if comparison is not None and len(comparison):
                paths += save_figure(plot_selector_comparison(comparison, run_name=name), train_dir,
                                     "selector_comparison")
        except (ValueError, OSError, KeyError) as err:
            warnings.warn(f"figures: skipped training run {run}: {err}", stacklevel=2)
    if not paths:
        warnings.warn(f"figures: no diagnostic or training runs under {results_dir}", stacklevel=2)
    return paths


RELATIVE_UNIT = "relative gain"


@house_style
def plot_asinh_gain_heatmap(df: pd.DataFrame, *, bins: int = 10, run_name: str = "run") -> Figure:
    """Figure 2A: mean asinh(G_rel) over the D^L percentile x D^I percentile grid of the paper's definitions
    (D = full-vocabulary forward KL, C = teacher mass on the student's top-K, both 5/95-normalised)."""
    f = paper_frame(df)
    grid = grid_mean(percentile_ranks(f["DI"].to_numpy()), percentile_ranks(f["DL"].to_numpy()),
                      np.arcsinh(f["gain_rel"].to_numpy()), bins)
    fig = Figure(figsize=(5.2, 4.4))
    ax = fig.add_subplot()
    im = ax.imshow(grid, origin="lower", extent=(0, 100, 0, 100), cmap=cmap_with_missing(GAIN_CMAP),
                   norm=gain_norm(grid), aspect="auto")
    fig.colorbar(im, ax=ax, label="mean asinh(relative gain) (unitless)")
    ax.set_xlabel("incompatible disagreement D^I percentile (%)")
    ax.set_ylabel("learnable disagreement D^L percentile (%)")
    ax.grid(False)
    fig.suptitle(f"{run_name}: asinh gain over D^L x D^I\n(paper definitions; grey: no tokens)")
    return fig


def _audit_gaps(audit: list[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Table 6 rows -> {proxy (release name): {gap, ci}} for the bar figure."""
    return {f"{r['proxy']}\n({r['release_name']})": {"gap": r["gap_dl"], "ci": (r["gap_dl_ci_low"],
                                                                                r["gap_dl_ci_high"])} for r in audit}


def paper_figures(df: pd.DataFrame, out_dir: str | Path, *, run_name: str, summary: Mapping[str, Any] | None = None,
                  manifest: Mapping[str, Any] | None = None, n_boot: int = 1000, seed: int = 0) -> list[Path]:
    """Write the four paper-protocol figures of one run into `out_dir`; returns the PNG and PDF paths."""
    summary = summary or summarize_paper(df, manifest=manifest, n_boot=n_boot, seed=seed)
    paths = save_figure(plot_asinh_gain_heatmap(df, run_name=run_name), out_dir, "paper_gain_heatmap")
    if summary.get("ols_by_k"):
        fig = plot_coefficients(summary["ols_by_k"], run_name=f"{run_name} (paper definitions)")
        paths += save_figure(fig, out_dir, "paper_coefficients_by_k")
    top = pd.DataFrame(summary.get("top_n") or [])
    if len(top):
        k = summary.get("k")
        base = top[top["K"] == (top["K"].iloc[0] if k is None else k)]
        fig = plot_top_n(base, run_name=f"{run_name} (paper definitions, winsorised 1/99)", unit=RELATIVE_UNIT)
        paths += save_figure(fig, out_dir, "paper_top_n")
    if summary.get("support_proxies"):
        fig = plot_support_gaps(_audit_gaps(summary["support_proxies"]), unit="relative",
                                title=f"{run_name}: Q3 gap of D*c by support proxy c (paper Table 6)",
                                xlabel="support proxy c (release name)")
        paths += save_figure(fig, out_dir, "paper_support_proxies")
    return paths
