"""Regenerate the three analysis notebooks (outputs stripped): python notebooks/make_notebooks.py

The notebooks only load results and call `analysis` functions; every statistic lives in `analysis`.
They read the results folder from $TAOPD_RESULTS (default ../results, relative to notebooks/), pick
the newest run, and take the bootstrap size from $TAOPD_N_BOOT (default 1000).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """\
%matplotlib inline
import os
import sys
from pathlib import Path

import pandas as pd
from IPython.display import HTML, Markdown, display

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
if str(ROOT) not in sys.path:  # import `analysis` from the checkout even when not installed
    sys.path.insert(0, str(ROOT))
RESULTS = Path(os.environ.get("TAOPD_RESULTS", "../results"))
N_BOOT = int(os.environ.get("TAOPD_N_BOOT", "1000"))
pd.set_option("display.width", 160, "display.max_columns", 30, "display.precision", 4)
print("results folder:", RESULTS.resolve(), "| bootstrap resamples:", N_BOOT)"""

LOAD_DIAGNOSE = """\
from analysis.io import load_run, newest_run

run_dir = newest_run(RESULTS, "diagnose")
df, manifest = load_run(run_dir)
run_name = manifest["run_name"]
display(Markdown(f"**run** `{run_name}` from `{run_dir}`: {len(df)} token rows, "
                 f"{df['seq_id'].nunique()} responses, K={manifest.get('k')}, extra K={manifest.get('extra_k')}, "
                 f"mode={manifest.get('mode')}"))
if manifest.get("synthetic"):
    display(Markdown("**SYNTHETIC data**: the numbers below test the pipeline, not the method."))"""

SUMMARIZE = """\
from analysis.report import format_report, summarize, summary_tables

summary = summarize(df, manifest=manifest, n_boot=N_BOOT, kendall_n_boot=min(N_BOOT, 200))
tables = summary_tables(summary)
for note in summary["notes"]:
    print("note:", note)"""


def _nb(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells]
    for c in nb.cells:  # stable ids so regenerating yields identical files
        c.id = f"cell-{nb.cells.index(c):02d}"
    return nb


CORRELATION = [
    ("md", "# Which teacher signals predict gain? (spec sections 3-4)\n\n"
           "Loads the newest diagnostic run and shows the paper's token-level statistics: rank correlations of each "
           "score with the gain G (forward-KL reduction on a fixed context, nats), the standardised OLS with "
           "beta_L (learnable disagreement D~C~) vs beta_I (incompatible D~(1-C~)), the Q3 support gap and the matched "
           "gap. Every number comes from `analysis.report.summarize`; intervals are 95% prompt-cluster bootstrap "
           "percentile intervals. Each check states the claim, the number and whether its interval lies above zero."),
    ("code", SETUP),
    ("code", LOAD_DIAGNOSE),
    ("code", SUMMARIZE),
    ("md", "## Checks: each number next to the check it passed or failed"),
    ("code", "display(tables['checks'][['name', 'passed', 'value', 'ci_low', 'ci_high', 'claim']])\n"
             "display(Markdown('**Verdict.** ' + summary['verdict']))"),
    ("md", "## Rank correlation of each score with G\n`spearman_minus_ref`: paired difference to raw KL "
           "(same bootstrap resamples), with its interval `diff_ci_low/high`."),
    ("code", "display(tables['correlations'])\n"
             "p = summary['partial_compat_given_disagreement']\n"
             "if p:\n"
             "    val, lo, hi = (f'{v:.3f}' if v is not None else 'n/a' for v in (p['value'], *p['ci']))\n"
             "    display(Markdown(f'partial Spearman of G with C~ given D~: **{val}** [{lo}, {hi}]'))"),
    ("md", "## Standardised OLS\nFeatures are robust-normalised then z-scored; the outcome G is z-scored too, "
           "so a coefficient is sd(G) per sd(feature)."),
    ("code", "display(tables['ols'])\ndisplay(tables['per_k'])"),
    ("code", "from analysis.plots import plot_coefficients, plot_support_gaps\n\n"
             "display(plot_coefficients(summary['ols_by_k'], run_name=run_name))\n"
             "display(plot_support_gaps({f'{run_name} K={k}': g for k, g in summary['support_gap_by_k'].items()},\n"
             "                          title=f'{run_name}: Q3 support gap per K'))"),
    ("md", "## Gaps and buckets"),
    ("code", "display(tables['gaps'])"),
    ("code", "from analysis.plots import (\n"
             "    plot_bucket_curves,\n"
             "    plot_gain_heatmap,\n"
             "    plot_quadrant_scores,\n"
             "    plot_score_hexbins,\n"
             ")\n"
             "from analysis.stats import bucket_curves, residual_curves\n\n"
             "display(plot_gain_heatmap(df, run_name=run_name))\n"
             "display(plot_quadrant_scores(df, run_name=run_name))\n"
             "buckets, residuals = bucket_curves(df, n_boot=N_BOOT), residual_curves(df, n_boot=N_BOOT)\n"
             "display(plot_bucket_curves(buckets, residuals, run_name=run_name))\n"
             "display(plot_score_hexbins(df, run_name=run_name))"),
    ("md", "## The paper's definitions beside ours\n"
           "`summary['paper']` recomputes the statistics with the public release's definitions "
           "(`analysis.paper`: relative gain winsorised 1%/99%, full-vocabulary D, Q3 with <=, gaps inside Q3 on C "
           "normalised within Q3, Delta R^2 = decomposed - base); `side_by_side` pairs each number with ours."),
    ("code", "if summary['paper']:\n"
             "    for name, text in summary['paper']['definitions'].items():\n"
             "        display(Markdown(f'**{name}**: {text}'))\n"
             "    display(tables['side_by_side'])\n"
             "    display(tables['paper_support_proxies'])\n"
             "    from analysis.figures import plot_asinh_gain_heatmap\n\n"
             "    display(plot_asinh_gain_heatmap(df, run_name=run_name))\n"
             "else:\n"
             "    print('this table lacks the columns of the paper definitions')"),
    ("md", "## Full text report (what `taopd analyze` prints)"),
    ("code", "print(format_report(summary))"),
]

SELECTORS = [
    ("md", "# Selector comparison on one gain table (spec section 4, exact top-N)\n\n"
           "Each selector keeps exactly N = round(rho x tokens) positions over the whole table (ties toward earlier "
           "positions); the table shows the mean gain G of the kept tokens (nats) with a prompt-cluster bootstrap 95% "
           "interval, gain per keep = mean G / rho, and the paired difference to raw KL and to random. Then the "
           "retrieval view (AUROC and precision of each score for the top-rho gains), the overlap of kept sets and a "
           "token-level view of what teachability keeps."),
    ("code", SETUP),
    ("code", LOAD_DIAGNOSE),
    ("code", SUMMARIZE),
    ("md", "## Top-N checks: teachability against raw KL and random at the headline budget"),
    ("code", "checks = tables['checks']\n"
             "top_n_checks = checks[checks['name'].str.startswith('top_n')]\n"
             "display(top_n_checks[['name', 'passed', 'value', 'ci_low', 'ci_high', 'detail']])"),
    ("md", "## Mean gain of the kept tokens"),
    ("code", "top = tables['top_n']\n"
             "cols = ['selector', 'ratio', 'n_kept', 'mean_gain', 'ci_low', 'ci_high', 'gain_per_keep']\n"
             "cols += [c for c in top.columns if c.startswith('minus_')]\n"
             "display(top.sort_values(['ratio', 'mean_gain'], ascending=[True, False])[cols])\n"
             "display(Markdown(f\"all tokens: mean G = {summary['mean_gain_all']['value']} nats\"))"),
    ("code", "from analysis.plots import plot_kept_overlap, plot_top_n\n\n"
             "display(plot_top_n(top, mean_gain_all=summary['mean_gain_all']['value'], run_name=run_name))"),
    ("md", "## The paper's exact top-N (release definitions)\n"
           "Winsorised relative gain, D = full-vocabulary KL, ties to earlier positions, per K "
           "(`analysis.paper.paper_top_n`)."),
    ("code", "paper_top = tables['paper_top_n']\n"
             "if len(paper_top):\n"
             "    display(paper_top.sort_values(['K', 'ratio', 'mean_gain'], ascending=[True, True, False]))"),
    ("md", "## Retrieval: does the score find the top-rho gains?"),
    ("code", "display(tables['retrieval'].pivot(index='selector', columns='ratio', values=['auroc', 'precision']))"),
    ("md", "## Overlap of kept sets (Jaccard)"),
    ("code", "from analysis.selectors import kept_overlap\n\n"
             "overlap = kept_overlap(df, ratios=summary['run']['ratios'])\n"
             "headline = min(summary['run']['ratios'], key=lambda r: abs(r - 0.03))\n"
             "display(plot_kept_overlap(overlap, ratio=headline, run_name=run_name))"),
    ("md", "## Token view: shading = teachability score, boxed = kept by teachability at 5%"),
    ("code", "import tempfile\n\nfrom analysis.tokenview import write_token_view\n\n"
             "view = write_token_view(df, Path(tempfile.mkdtemp()) / 'token_view.html', score='score_teachability',\n"
             "                        selector='teachability', ratio=0.05, n_seqs=5, run_name=run_name)\n"
             "print('written to', view)\n"
             "display(HTML(view.read_text()))"),
]

TRAINING = [
    ("md", "# Training runs: learning curves and selector comparison\n\n"
           "Loads the newest training run (`metrics.parquet`, `comparison.parquet`). Intervals here are over seeds "
           "(few), so each selector's final accuracy is compared with full OPD by a Welch t interval; a check passes "
           "only if that interval lies above zero."),
    ("code", SETUP),
    ("code", "from analysis.io import load_train_run, newest_run\n\n"
             "run_dir = newest_run(RESULTS, 'train')\n"
             "metrics, comparison, manifest = load_train_run(run_dir)\n"
             "run_name = manifest['run_name']\n"
             "seeds = sorted(int(s) for s in metrics['seed'].unique())\n"
             "display(Markdown(f\"**run** `{run_name}` from `{run_dir}`: {len(metrics)} metric rows, \"\n"
             "                 f\"selectors {sorted(metrics['selector'].unique())}, seeds {seeds}\"))\n"
             "if manifest.get('synthetic'):\n"
             "    display(Markdown('**SYNTHETIC data**: the numbers below test the pipeline, not the method.'))"),
    ("md", "## Final evaluation per selector (mean and std over seeds)"),
    ("code", "from analysis.training import final_metrics, selector_checks\n\n"
             "display(final_metrics(metrics))"),
    ("md", "## Checks: final accuracy against full OPD"),
    ("code", "if comparison is not None:\n"
             "    display(selector_checks(comparison, reference='full'))\n"
             "else:\n"
             "    print('no comparison.parquet in this run')"),
    ("code", "from analysis.plots import plot_learning_curves, plot_selector_comparison\n\n"
             "display(plot_learning_curves(metrics, run_name=run_name))\n"
             "if comparison is not None:\n"
             "    display(plot_selector_comparison(comparison, run_name=run_name))"),
]


def main() -> None:
    for name, cells in (("correlation_analysis", CORRELATION), ("selector_comparison", SELECTORS),
                        ("training_results", TRAINING)):
        path = HERE / f"{name}.ipynb"
        nbformat.write(_nb(cells), path)
        print("wrote", path)


if __name__ == "__main__":
    main()
