"""analysis.selectors: exact top-N (count, ties, candidates), mean gain and paired CIs, retrieval, overlap."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.selectors import kept_mask, kept_overlap, n_keep, retrieval_table, top_n_mask, top_n_table


def test_n_keep_rounds_half_up():
    assert n_keep(1000, 0.03) == 30
    assert n_keep(50, 0.01) == 1  # 0.5 -> 1 (Python's round would give 0)
    assert n_keep(150, 0.01) == 2  # 1.5 -> 2
    with pytest.raises(ValueError, match="retention ratio"):
        n_keep(10, 0.0)


def test_top_n_mask_ties_and_candidates():
    s = np.array([0.5, 1.0, 0.5, 1.0, 0.5, -np.inf, np.nan])
    np.testing.assert_array_equal(np.flatnonzero(top_n_mask(s, 3)), [0, 1, 3])  # tie at 0.5 -> earliest row
    np.testing.assert_array_equal(np.flatnonzero(top_n_mask(s, 2)), [1, 3])
    assert top_n_mask(s, 100).sum() == 5  # -inf and NaN are never kept
    assert top_n_mask(np.ones(10), 4).tolist() == [True] * 4 + [False] * 6


@pytest.mark.parametrize("ratio", [0.01, 0.03, 0.05, 0.10])
def test_keeps_exactly_n(small_tokens, ratio):
    n = n_keep(len(small_tokens), ratio)
    for col in ("score_teachability", "score_kl", "score_random", "score_full"):
        assert kept_mask(small_tokens, col, ratio).sum() == n


def test_kept_mask_aligned_with_unsorted_rows(small_tokens):
    shuffled = small_tokens.sample(frac=1.0, random_state=1)
    m = kept_mask(shuffled, "score_full", 0.05)  # constant score: ties -> earliest (seq_id, pos)
    kept = shuffled[m].sort_values(["seq_id", "pos"])
    first = small_tokens.iloc[: n_keep(len(small_tokens), 0.05)]
    assert kept[["seq_id", "pos"]].values.tolist() == first[["seq_id", "pos"]].values.tolist()


def test_top_n_table(small_tokens):
    res = top_n_table(small_tokens, n_boot=100)
    t = res.table
    assert "full" not in set(t["selector"]) and any("'full'" in n for n in res.notes)
    assert set(t["ratio"]) == {0.01, 0.03, 0.05, 0.10, 0.20}
    row = t[(t["selector"] == "teachability") & (t["ratio"] == 0.03)].iloc[0]
    mask = kept_mask(small_tokens, "score_teachability", 0.03)
    assert row["mean_gain"] == pytest.approx(small_tokens["gain"][mask].mean())
    assert row["gain_per_keep"] == pytest.approx(row["mean_gain"] / 0.03)
    assert row["ci_low"] <= row["mean_gain"] <= row["ci_high"]
    kl = t[t["selector"] == "kl"]
    assert (kl["minus_kl"] == 0).all() and (kl["minus_kl_ci_low"] == 0).all()
    assert res.references == ["kl", "random"]
    assert res.mean_gain_all == pytest.approx(small_tokens["gain"].mean())
    # Q3 variants have fewer candidates than N at 10%? Then the shortfall is noted, never padded.
    q3 = int(small_tokens["q3"].sum())
    short = t[(t["selector"] == "q3_only")]
    assert (short["n_kept"] == np.minimum(short["n_keep"], q3)).all()


def test_q3_shortfall_noted(tiny_table):
    df = tiny_table(n_clusters=4, per=10)
    df["score_q3_only"] = np.where(np.arange(len(df)) < 2, 1.0, -np.inf)
    res = top_n_table(df, ratios=(0.10,), selectors=["q3_only"], n_boot=10)
    assert res.table["n_kept"].tolist() == [2] and any("q3_only has 2 candidate(s) < N=4" in n for n in res.notes)
    with pytest.raises(ValueError, match="unknown selector"):
        top_n_table(df, selectors=["nope"])


def test_retrieval_perfect_and_noise(small_tokens):
    df = small_tokens.assign(score_teachability=small_tokens["gain"])
    r = retrieval_table(df, selectors=["teachability", "random"]).set_index(["selector", "ratio"])
    assert (r.loc["teachability", "auroc"] == 1.0).all() and (r.loc["teachability", "precision"] == 1.0).all()
    assert abs(r.loc[("random", 0.10), "auroc"] - 0.5) < 0.1


def test_kept_overlap(small_tokens):
    df = small_tokens.assign(score_tip=small_tokens["score_teachability"])  # identical kept sets
    o = kept_overlap(df, ratios=(0.05,), selectors=["teachability", "tip", "random"])
    j = o.set_index(["selector_a", "selector_b"])["jaccard"]
    assert j[("teachability", "tip")] == 1.0 and j[("tip", "teachability")] == 1.0
    assert j[("teachability", "teachability")] == 1.0
    a, b = kept_mask(df, "score_teachability", 0.05), kept_mask(df, "score_random", 0.05)
    assert j[("teachability", "random")] == pytest.approx((a & b).sum() / (a | b).sum())
