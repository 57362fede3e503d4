"""analysis: statistics, figures and views over the result tables of `taopd diagnose` and `taopd train`.

Layering: reads result tables only; may import `diagnostics`, never `opd` or `taopd`.

Modules, each one concept:
    io          load_run / load_train_run / with_k / require_columns: tables in, validated
    bootstrap   prompt-cluster bootstrap (resample weights, percentile CIs)
    regression  standardised OLS: beta_L, beta_I, their gap, incremental R^2
    ranks       Spearman / partial Spearman / Kendall with cluster-bootstrap CIs
    stats       support gap, matched gap, bucket curves, correlation table, AUROC
    selectors   exact top-N selection, gain per keep, precision / AUROC, kept-set overlap
    checks      the paper's claims tested on a summary: checks, verdict; how numbers are written
    report      summarize(df) -> dict, format_report(dict) -> str, summary_tables(dict) -> DataFrames
    paper       the release's definitions (the `paper` preset): relative gain, winsorising, full-vocabulary D,
                OLS base/+C/decomposed, Q3 support and matched gaps, exact top-N
    paper_summary  summarize_paper, the Table 6 support-proxy audit, side_by_side (paper vs project)
    training    the comparison table of a training run (over seeds), its checks and markdown
    variants    first-order vs exact gain, and the group (multi-token) gains per selector
    plots       the house style and one plot primitive per figure kind
    figures     the figure sets (diagnose, train, paper protocol); make_all_figures(results_dir, out_dir)
    pass_at_1   pass@1 per student (bootstrap over problems) and per arm (t over training seeds)
    tokenview   write_token_view(df, out_html): the HTML token view
    synthetic   schema-faithful synthetic tables with planted effects (tests, fixture)

The names below are imported lazily so `import analysis` does not pull in matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "load_run": "analysis.io",
    "load_train_run": "analysis.io",
    "with_k": "analysis.io",
    "require_columns": "analysis.io",
    "newest_run": "analysis.io",
    "summarize": "analysis.report",
    "format_report": "analysis.report",
    "make_all_figures": "analysis.figures",
    "write_token_view": "analysis.tokenview",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
