"""analysis.stats: support gap, matched gap, bucket curves, correlation table, AUROC; bad input."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.io import validate_tokens
from analysis.stats import (
    auroc,
    bucket_curves,
    correlation_table,
    matched_gap,
    matched_pairs,
    partial_correlation,
    q3_mask,
    residual_curves,
    support_gap,
)
from analysis.synthetic import synthetic_tokens


def test_support_gap_known_answer(small_tokens):
    """G = 1 on Q3 tokens with C~ at or above the Q3 2/3-quantile, else 0: gap exactly 1, CI [1, 1]."""
    q3 = q3_mask(small_tokens)
    c = small_tokens["norm_compat"].to_numpy()
    hi = np.quantile(c[q3], 2 / 3)
    df = small_tokens.assign(gain=np.where(q3 & (c >= hi), 1.0, 0.0))
    g = support_gap(df, n_boot=200)
    assert g.gap == pytest.approx(1.0) and g.mean_low == 0.0
    assert g.ci_low == pytest.approx(1.0) and g.ci_high == pytest.approx(1.0)
    assert g.n_high == g.n_low == pytest.approx(q3.sum() / 3, abs=2)


def test_q3_fallback_matches_column(small_tokens):
    np.testing.assert_array_equal(q3_mask(small_tokens.drop(columns=["q3"])), small_tokens["q3"].to_numpy())


def test_matched_gap_zero_when_gain_ignores_compat():
    """b_L == b_I: G depends on D, H, not on C; the matched gap's CI covers 0 in most seeds."""
    covered = 0
    for seed in range(10):
        df = validate_tokens(synthetic_tokens(n_prompts=40, b_l=1.0, b_i=1.0, extra_k=(), seed=100 + seed))
        g = matched_gap(df, n_boot=200, seed=seed)
        covered += g.ci_low <= 0.0 <= g.ci_high
        assert abs(g.gap) < 0.02  # scale of G is ~0.05
    assert covered >= 8, covered


def test_matched_gap_detects_planted_compat():
    df = validate_tokens(synthetic_tokens(n_prompts=60, b_l=1.0, b_i=1.0, noise_sd=0.2, prompt_sd=0.0, slope_sd=0.0,
                                          extra_k=(), seed=1))
    df["gain"] = df["gain"] + 0.05 * (df["compat_mass"] > df.groupby("prompt_id")["compat_mass"].transform("median"))
    g = matched_gap(df, n_boot=200)
    assert g.ci_low > 0.03 and g.gap == pytest.approx(0.05, abs=0.015)


def test_matched_pairs_stay_in_cluster(small_tokens):
    pairs = matched_pairs(small_tokens)
    pid = small_tokens["prompt_id"].to_numpy()
    assert (pid[pairs["row_high"]] == pid[pairs["row_low"]]).all()
    c = small_tokens["compat_mass"].to_numpy()
    assert (c[pairs["row_high"]] > c[pairs["row_low"]]).mean() > 0.95


def test_bucket_curves_shape(small_tokens):
    b = bucket_curves(small_tokens, n_boot=50)
    assert list(b["variable"].unique()) == ["D^L", "D^I", "C~"]
    buckets = b.groupby("variable", sort=False)["bucket"].apply(list).to_dict()
    assert buckets == {v: [1, 2, 3, 4] for v in ["D^L", "D^I", "C~"]}
    assert b.groupby("variable")["n"].sum().eq(int(small_tokens["q3"].sum())).all()
    assert ((b["ci_low"] <= b["mean_gain"]) & (b["mean_gain"] <= b["ci_high"])).all()
    r = residual_curves(small_tokens, n_boot=50)
    assert r.groupby("variable")["bucket"].max().eq(10).all()
    assert abs(np.average(r["mean_gain"], weights=r["n"]) / 3) < 1e-10  # residuals average to 0 per variable


def test_auroc():
    labels = np.array([0, 0, 1, 1, 0, 1], dtype=bool)
    assert auroc(labels.astype(float), labels) == 1.0
    assert auroc(-labels.astype(float), labels) == 0.0
    assert auroc(np.ones(6), labels) == 0.5  # all tied
    rng = np.random.default_rng(0)
    lab = rng.uniform(size=20_000) < 0.1
    assert auroc(rng.normal(size=20_000), lab) == pytest.approx(0.5, abs=0.02)
    # one tie between a positive and a negative counts one half
    assert auroc(np.array([1.0, 2.0, 2.0, 3.0]), np.array([0, 0, 1, 1], bool)) == pytest.approx(3.5 / 4)
    assert np.isnan(auroc(np.arange(3.0), np.zeros(3, bool)))


def test_correlation_table(small_tokens):
    res = correlation_table(small_tokens, n_boot=100, kendall_n_boot=10)
    t = res.table.set_index("score")
    assert np.isnan(t.loc["full", "spearman"]) and any("'full' is constant" in n for n in res.notes)
    assert t.loc["kl", "spearman_minus_ref"] == 0.0 and t.loc["kl", "diff_ci_low"] == 0.0
    ok = t.drop(index="full")
    assert (ok["spearman_ci_low"] <= ok["spearman"]).all() and (ok["spearman"] <= ok["spearman_ci_high"]).all()
    assert ok["kendall"].abs().le(ok["spearman"].abs() + 1e-12).all()  # |tau| <= |rho| here
    assert res.reference == "kl"


def test_correlation_known_answer(tiny_table):
    """A score equal to the gain has Spearman 1 with CI [1, 1]; noise is near 0."""
    df = tiny_table(n_clusters=10, per=20)
    df["score_teachability"] = df["gain"]
    res = correlation_table(df, scores={"teachability": "score_teachability", "random": "score_random"},
                            reference=None, n_boot=50, kendall_n_boot=5)
    t = res.table.set_index("score")
    teachability = t.loc["teachability", ["spearman", "spearman_ci_low", "spearman_ci_high", "kendall"]]
    assert teachability.tolist() == pytest.approx([1, 1, 1, 1])
    assert abs(t.loc["random", "spearman"]) < 0.2


def test_bad_input_notes(small_tokens):
    nan = small_tokens.copy()
    nan.loc[[0, 5, 9], "gain"] = np.nan
    g = support_gap(nan, n_boot=20)
    assert any("dropped 3 of" in n for n in g.notes) and np.isfinite(g.gap)
    one = small_tokens[small_tokens["prompt_id"] == 3]
    g = matched_gap(one, n_boot=100)
    assert np.isfinite(g.gap) and np.isnan(g.ci_low) and any("only 1 cluster" in n for n in g.notes)
    with pytest.raises(ValueError, match="no rows with a finite 'gain'"):
        support_gap(small_tokens.assign(gain=np.nan))
    with pytest.raises(ValueError, match="no rows"):
        correlation_table(small_tokens.iloc[:0])
    p = partial_correlation(small_tokens.assign(norm_compat=0.5), n_boot=10)
    assert np.isnan(p.value) and any("constant" in n for n in p.notes)
    nan_score = small_tokens.copy()
    nan_score.loc[:10, "score_tip"] = np.nan
    res = correlation_table(nan_score, scores={"tip": "score_tip", "kl": "score_kl"}, n_boot=20, kendall_n_boot=0)
    assert any("'tip' is NaN on 11 rows" in n for n in res.notes)
    assert np.isfinite(res.table.set_index("score").loc["tip", "spearman"])
