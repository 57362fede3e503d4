"""analysis.figures: every figure is produced, titled with the run, labelled; files are written; the folder walk."""

from __future__ import annotations

import json
import shutil

import pytest
from matplotlib.figure import Figure

from analysis.figures import make_all_figures
from analysis.io import load_run, load_train_run
from analysis.plots import (
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
from analysis.selectors import kept_overlap, top_n_table
from analysis.stats import bucket_curves, residual_curves


def _labels(fig: Figure) -> list[tuple[str, str]]:
    return [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes
            if ax.get_visible() and ax.get_label() != "<colorbar>"]


def _title(fig: Figure) -> str:
    return fig._suptitle.get_text() if fig._suptitle is not None else ""


@pytest.fixture(scope="module")
def train(fixture_results):
    return load_train_run(fixture_results / "train" / "fixture")


def test_diagnostic_figures(small_tokens, tmp_path):
    name = "synthetic-test"
    fig = plot_gain_heatmap(small_tokens)
    assert name in _title(fig)
    assert _labels(fig)[0] == ("incompatible disagreement D^I percentile (%)",
                               "learnable disagreement D^L percentile (%)")
    assert any(ax.get_ylabel() == "mean gain G (nats)" for ax in fig.axes)  # the colorbar
    # diverging map centred at 0
    im = fig.axes[0].images[0]
    assert im.get_cmap().name.startswith("RdBu") and im.norm.vmin == -im.norm.vmax

    fig = plot_quadrant_scores(small_tokens)
    assert [lab[0] for lab in _labels(fig)[:2]] == ["student entropy H~ percentile (%)"] * 2
    assert _labels(fig)[0][1] == "disagreement (raw KL) D~ percentile (%)"

    ols_by_k, gaps = per_k_stats(small_tokens, n_boot=50)
    fig = plot_coefficients(ols_by_k, run_name=name)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "standardised coefficient (sd of G per sd)"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["K=8", "K=16", "K=32"]
    assert len(ax.patches) == 6  # beta_L and beta_I per K

    fig = plot_support_gaps({f"{name} K={k}": g for k, g in gaps.items()})
    assert fig.axes[0].get_ylabel() == "support gap: mean G high-C minus low-C (nats)" and len(fig.axes[0].patches) == 3

    top = top_n_table(small_tokens, n_boot=50)
    fig = plot_top_n(top.table, mean_gain_all=top.mean_gain_all, run_name=name)
    assert _labels(fig) == [("selector (exact top-N by score)", "mean gain of kept tokens G (nats)"),
                            ("retention ratio (%)", "gain per keep: mean G / ratio (nats)")]
    assert name in _title(fig)
    fig = plot_gain_vs_budget(top.table, mean_gain_all=top.mean_gain_all, run_name=name)  # one line per rule
    assert _labels(fig) == [("budget: kept share of the bank's tokens (%, log scale)",
                             "mean gain of kept tokens G (nats)")]
    assert len(fig.axes[0].get_lines()) == top.table["selector"].nunique() + 2  # + all tokens + zero
    assert name in _title(fig)

    buckets, residuals = bucket_curves(small_tokens, n_boot=20), residual_curves(small_tokens, n_boot=20)
    fig = plot_bucket_curves(buckets, residuals, run_name=name)
    assert [lab[1] for lab in _labels(fig)] == ["mean gain G (nats)", "mean residual gain (nats)"]
    assert "quartile" in fig.axes[0].get_xlabel() and "decile" in fig.axes[1].get_xlabel()

    fig = plot_score_hexbins(small_tokens)
    visible = _labels(fig)
    assert len(visible) == 7 and all(y == "gain G (nats)" for _, y in visible)
    assert visible[0][0] == "teachability score (unitless)"

    fig = plot_kept_overlap(kept_overlap(small_tokens, ratios=(0.03,)), ratio=0.03, run_name=name)
    assert "3% retention" in _title(fig)

    paths = save_figure(fig, tmp_path, "overlap")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 1000 for p in paths)


def test_training_figures(train):
    metrics, comparison, manifest = train
    fig = plot_learning_curves(metrics)
    assert _labels(fig) == [("training step", "accuracy (fraction correct)"),
                            ("training step", "KL to teacher (nats / token)")]
    assert "fixture" in _title(fig) and "seeds" in _title(fig)
    n_lines = metrics.groupby(["selector", "ratio"]).ngroups
    assert len(fig.axes[0].lines) == n_lines
    fig = plot_selector_comparison(comparison, run_name="fixture")
    assert [lab[1] for lab in _labels(fig)] == ["accuracy (fraction correct)", "live gain on the common bank G (nats)"]
    no_live = comparison.drop(columns=[c for c in comparison.columns if c.startswith("live_gain")])
    assert len(plot_selector_comparison(no_live).axes) == 1


def test_make_all_figures(fixture_results, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(fixture_results, results)
    broken = results / "diagnose" / "broken"
    broken.mkdir()
    (broken / "tokens.parquet").write_bytes(b"not parquet")
    (broken / "manifest.json").write_text('{"run_name": "broken"}')
    with pytest.warns(UserWarning, match="skipped diagnostic run"):
        paths = make_all_figures(results, tmp_path / "figures", n_boot=30)
    rel = {p.relative_to(tmp_path / "figures").as_posix() for p in paths}
    for stem in ("gain_heatmap", "quadrant_scores", "coefficients_by_k", "top_n", "bucket_curves", "score_hexbins",
                 "kept_overlap", "top_n_budget"):
        assert f"diagnose/fixture/{stem}.png" in rel and f"diagnose/fixture/{stem}.pdf" in rel
    assert not any(r.startswith("diagnose/broken") for r in rel)
    assert not any("/paper_" in r for r in rel)  # the paper figures are for "protocol": "paper" runs only
    expected = {"support_gap_by_run.png", "train/fixture/learning_curves.png", "train/fixture/selector_comparison.pdf"}
    assert expected <= rel
    assert all(p.stat().st_size > 1000 for p in paths)


def test_make_all_figures_empty(tmp_path):
    with pytest.warns(UserWarning, match="no diagnostic or training runs"):
        assert make_all_figures(tmp_path, tmp_path / "out") == []


def test_paper_protocol_run_gets_the_paper_figures(fixture_results, tmp_path, monkeypatch):
    """A run whose manifest says "protocol": "paper" also gets Figure 2A (asinh), coefficient bars per K,
    top-N with gain per keep and the support-proxy gaps, in the release's definitions (others do not:
    test_make_all_figures)."""
    results = tmp_path / "results"
    run = fixture_results / "diagnose" / "fixture"
    manifest = json.loads((run / "manifest.json").read_text())
    shutil.copytree(run, results / "diagnose" / "paper_run")
    (results / "diagnose" / "paper_run" / "manifest.json").write_text(
        json.dumps({**manifest, "run_name": "paper_run", "protocol": "paper"}))
    # the project's own figures are covered by test_make_all_figures; stubbed here to keep this test fast
    monkeypatch.setattr("analysis.figures.diagnose_figures", lambda *a, **k: ([], {}))
    paths = make_all_figures(results, tmp_path / "figures", n_boot=20)
    rel = {p.relative_to(tmp_path / "figures").as_posix() for p in paths}
    for stem in ("paper_gain_heatmap", "paper_coefficients_by_k", "paper_top_n", "paper_support_proxies"):
        assert f"diagnose/paper_run/{stem}.png" in rel and f"diagnose/paper_run/{stem}.pdf" in rel


def test_asinh_heatmap_labels(fixture_results):
    from analysis.figures import plot_asinh_gain_heatmap

    df, _ = load_run(fixture_results / "diagnose" / "fixture")
    fig = plot_asinh_gain_heatmap(df, run_name="fixture")
    assert _labels(fig)[0] == ("incompatible disagreement D^I percentile (%)",
                               "learnable disagreement D^L percentile (%)")
    assert "asinh" in _title(fig)
