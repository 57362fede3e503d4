"""analysis.training: final metrics per selector, the Welch interval, selector checks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from analysis.io import load_train_run
from analysis.training import final_metrics, selector_checks, welch_interval


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
