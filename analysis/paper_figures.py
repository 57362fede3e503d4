"""The paper-protocol figures: the release's definitions (``analysis.paper``) in the house style.

For a run whose manifest says ``"protocol": "paper"``, `paper_figures` writes

    paper_gain_heatmap      Figure 2A: mean asinh(relative gain) over the D^L x D^I percentile grid
    paper_coefficients_by_k beta_L vs beta_I per K (winsorised relative gain, per-sample cluster CIs)
    paper_top_n             exact top-N: mean winsorised relative gain per selector and ratio, gain per keep
    paper_support_proxies   Table 6: the Q3 high-minus-low gap of D*c for each support proxy c (95% CI)

from a summary already computed by ``analysis.paper_summary.summarize_paper`` (or computes it).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.figures import (
    GAIN_CMAP,
    _grid_mean,
    _percentile,
    cmap_with_missing,
    gain_norm,
    house_style,
    plot_coefficients,
    plot_support_gaps,
    plot_top_n,
    save_figure,
)
from analysis.paper import paper_frame
from analysis.paper_summary import summarize_paper

RELATIVE_UNIT = "relative gain"


@house_style
def plot_asinh_gain_heatmap(df: pd.DataFrame, *, bins: int = 10, run_name: str = "run") -> Figure:
    """Figure 2A: mean asinh(G_rel) over the D^L percentile x D^I percentile grid of the paper's definitions
    (D = full-vocabulary forward KL, C = teacher mass on the student's top-K, both 5/95-normalised)."""
    f = paper_frame(df)
    grid = _grid_mean(_percentile(f["DI"].to_numpy()), _percentile(f["DL"].to_numpy()),
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
