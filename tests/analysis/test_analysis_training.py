"""analysis.training: the comparison table from raw tables, live-gain intervals, final metrics per
selector, the Welch interval, selector checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from analysis.io import load_train_run
from analysis.training import (
    COMPARISON_COLUMNS,
    comparison_table,
    final_metrics,
    run_comparison,
    selector_checks,
    summarize_gains,
    to_markdown,
    welch_interval,
)


def raw_tables(seeds=(0, 1, 2), n_bank=5):
    """metrics and live gains of two arms (full at 1.0, teachability at 0.1), 2 steps, eval at 0 and 2."""
    rng = np.random.default_rng(0)
    metrics, gains = [], []
    for selector, ratio in (("full", 1.0), ("teachability", 0.1)):
        for seed in seeds:
            for step in (0, 1, 2):
                evaluated = step != 1
                metrics.append({
                    "step": step, "selector": selector, "ratio": ratio, "seed": seed, "loss": rng.normal(),
                    "kept_tokens": 0 if step == 0 else int(rng.integers(5, 20)),
                    "accuracy": rng.uniform() if evaluated else math.nan,
                    "kl_to_teacher": rng.uniform() if evaluated else math.nan,
                    "wall_time_s": float(step), "peak_mem_mb": rng.uniform(100, 200),
                    "valid_tokens": 0 if step == 0 else 40,
                })
            gains.append(pd.DataFrame({"selector": selector, "ratio": ratio, "seed": seed, "seq": np.arange(n_bank),
                                       "gain_sum": rng.normal(size=n_bank), "n_tokens": rng.integers(1, 9, n_bank)}))
    return pd.DataFrame(metrics), pd.concat(gains, ignore_index=True)


def test_comparison_table_from_raw_tables():
    metrics, gains = raw_tables()
    table = comparison_table(metrics, gains)
    assert list(table.columns) == list(COMPARISON_COLUMNS)
    assert list(table["selector"]) == ["full", "teachability"] and list(table["n_seeds"]) == [3, 3]
    row = table.set_index("selector").loc["teachability"]
    arm = metrics[metrics["selector"] == "teachability"]
    assert row["acc_before_mean"] == pytest.approx(arm.loc[arm["step"] == 0, "accuracy"].mean())
    assert row["acc_after_std"] == pytest.approx(arm.loc[arm["step"] == 2, "accuracy"].std(ddof=1))
    assert row["effective_ratio"] == pytest.approx(arm["kept_tokens"].sum() / arm["valid_tokens"].sum())
    assert row["supervised_tokens"] == round(arm.groupby("seed")["kept_tokens"].sum().mean())
    mine = gains[gains["selector"] == "teachability"]
    per_seed = [g["gain_sum"].sum() / g["n_tokens"].sum() for _, g in mine.groupby("seed")]
    assert row["live_gain_mean"] == pytest.approx(np.mean(per_seed))
    assert row["live_gain_ci_low"] <= row["live_gain_mean"] <= row["live_gain_ci_high"]
    with pytest.raises(ValueError, match="live gains: missing column"):
        comparison_table(metrics, gains.drop(columns="n_tokens"))


def test_summarize_gains_t_interval_and_bootstrap():
    _, gains = raw_tables()
    per_seed = [g for _, g in gains[gains["selector"] == "full"].groupby("seed")]
    means = np.array([g["gain_sum"].sum() / g["n_tokens"].sum() for g in per_seed])
    ci = scipy.stats.t.interval(0.95, len(means) - 1, loc=means.mean(), scale=scipy.stats.sem(means))
    assert summarize_gains(per_seed) == pytest.approx((means.mean(), *ci))
    mean, lo, hi = summarize_gains(per_seed[:1], n_boot=200)  # one seed: bootstrap over sequences
    assert mean == pytest.approx(means[0]) and lo <= hi


def test_markdown_and_run_comparison(tmp_path):
    metrics, gains = raw_tables(seeds=(0,))
    metrics.to_parquet(tmp_path / "metrics.parquet")
    gains.to_parquet(tmp_path / "live_gain.parquet")
    manifest = {"run_name": "r", "loss": "sampled_pg", "normalization": "kept_global"}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    table, markdown = run_comparison(tmp_path)
    pd.testing.assert_frame_equal(table, comparison_table(metrics, gains))
    assert markdown.startswith("## r: selector comparison (sampled_pg, kept_global)")
    assert markdown.count("\n| ") == 3 and "| nan |" in markdown  # one seed: no std
    assert to_markdown(table) == markdown.split("\n", 2)[2]


def test_final_metrics(fixture_results):
    metrics, _, _ = load_train_run(fixture_results / "train" / "fixture")
    f = final_metrics(metrics).set_index("selector")
    last = metrics.dropna(subset=["accuracy"])
    last = last[last["step"] == last["step"].max()]
    for sel, g in last.groupby("selector"):
        assert f.loc[sel, "accuracy_mean"] == pytest.approx(g["accuracy"].mean())
        assert f.loc[sel, "accuracy_std"] == pytest.approx(g["accuracy"].std(ddof=1))
        assert f.loc[sel, "n_seeds"] == g["seed"].nunique()


def test_welch_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 1.0, 7), rng.normal(0.0, 2.0, 5)
    lo, hi = welch_interval(a.mean(), a.std(ddof=1), 7, b.mean(), b.std(ddof=1), 5)
    ci = scipy.stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (lo, hi) == pytest.approx((ci.low, ci.high))
    assert np.isnan(welch_interval(1.0, 0.1, 1, 0.0, 0.1, 5)).all()


def test_selector_checks(fixture_results):
    _, comparison, _ = load_train_run(fixture_results / "train" / "fixture")
    c = selector_checks(comparison, reference="full").set_index("selector")
    assert c.loc["full", "note"] == "is the reference" and c.loc["full", "passed"] is None
    row = c.loc["teachability"]
    ref = comparison.set_index("selector").loc["full"]
    assert row["minus_ref"] == pytest.approx(row["acc_after"] - ref["acc_after_mean"])
    assert row["passed"] == (row["ci_low"] > 0)
    one_seed = comparison.assign(n_seeds=1)
    assert selector_checks(one_seed)["passed"].isna().all()
    missing = selector_checks(comparison, reference="nope")
    assert (missing["note"] == "no 'nope' row").all()
    with pytest.raises(ValueError, match="acc_after_mean"):
        selector_checks(pd.DataFrame({"selector": ["a"]}))
