"""Each definition of the paper preset (analysis.paper, analysis.paper_summary) against a plain slow reference.

The references are written from the definitions (python loops, sorted lists), not from the code under
test; each docstring names the release file and function the definition comes from (repository
ckjsuperhh/taopd-baseline, folder TA-OPD/, commit 6a2da067).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis.paper import (
    matched_gap_within_samples,
    n_keep_paper,
    paper_frame,
    paper_ols,
    paper_position,
    paper_top_n,
    q3_support_gap,
    relative_gain,
    robust_norm,
    standardized_ols,
    top_n_rows,
    winsorize,
    zscore,
)
from analysis.paper_summary import robust_rank, side_by_side, summarize_paper, support_proxy_audit


def _quantile_ref(values: list[float], q: float) -> float:
    """Linear-interpolation quantile: position q (n - 1) in the sorted finite values."""
    v = sorted(x for x in values if math.isfinite(x))
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@pytest.fixture(scope="module")
def rng() -> np.random.Generator:
    return np.random.default_rng(12)


def test_relative_gain_is_the_release_formula() -> None:
    """(KL_base - KL_after) / (KL_base + 1e-12) (eval_fixed_context_bank.py _merge_gain); 0/0 -> 0, inf -> NaN."""
    before = [0.5, 2.0, 0.0, 1e-3, math.inf]
    after = [0.25, 2.5, 0.0, 0.0, 1.0]
    got = relative_gain(np.array(before), np.array(after))
    for g, b, a in zip(got, before, after):
        ref = (b - a) / (b + 1e-12)
        assert (math.isnan(g) and not math.isfinite(ref)) or g == pytest.approx(ref, rel=1e-15)
    assert got[2] == 0.0


def test_robust_norm_matches_a_plain_reference(rng: np.random.Generator) -> None:
    """clip((x - Q05) / (Q95 - Q05), 0, 1), NaN -> 0 (build_section3_analysis.py robust_norm L99-105)."""
    x = rng.lognormal(size=301)
    x[[3, 7]] = [np.nan, np.inf]
    lo, hi = _quantile_ref(list(x), 0.05), _quantile_ref(list(x), 0.95)
    ref = [0.0 if not math.isfinite(v) else min(1.0, max(0.0, (v - lo) / (hi - lo))) for v in x]
    np.testing.assert_allclose(robust_norm(x), ref, rtol=0, atol=1e-12)
    assert (robust_norm(np.full(10, 3.0)) == 0).all()  # Q95 - Q05 < 1e-12: all zero


def test_winsorize_and_zscore_match_plain_references(rng: np.random.Generator) -> None:
    """winsorize L116-120 (clip to the q and 1 - q quantiles), zscore L108-113 (population sd) of
    build_section3_analysis.py."""
    x = rng.standard_t(2, size=200)
    for q in (0.01, 0.05):
        lo, hi = _quantile_ref(list(x), q), _quantile_ref(list(x), 1 - q)
        np.testing.assert_allclose(winsorize(x, q), [min(hi, max(lo, v)) for v in x], atol=1e-12)
    m = _mean(list(x))
    sd = math.sqrt(_mean([(v - m) ** 2 for v in x]))
    np.testing.assert_allclose(zscore(x), [(v - m) / sd for v in x], atol=1e-12)
    assert (zscore(np.ones(5)) == 0).all()


def test_position_is_pos_over_length_minus_one() -> None:
    """tok_pos / max(L - 1, 1) (eval_fixed_context_bank.py _score_sample); one-token responses give 0."""
    pos, length = np.array([0, 3, 9, 0]), np.array([10, 10, 10, 1])
    assert paper_position(pos, length).tolist() == [0.0, 3 / 9, 1.0, 0.0]


def test_paper_frame_q3_and_drops(small_tokens: pd.DataFrame) -> None:
    """Q3 = H~ <= median and D~ >= median (build_section3_analysis.py L278); D~ is the full-vocabulary KL."""
    f = paper_frame(small_tokens)
    h, d = list(f["Hn"]), list(f["Dn"])
    mh, md = _quantile_ref(h, 0.5), _quantile_ref(d, 0.5)
    assert f["q3"].tolist() == [a <= mh and b >= md for a, b in zip(h, d)]
    np.testing.assert_allclose(f["Dn"], robust_norm(small_tokens["kl_forward"].to_numpy(np.float64)), atol=1e-12)


def test_standardized_ols_matches_normal_equations(rng: np.random.Generator) -> None:
    """z(y) on [1, z(X)] (build_section3_analysis.py ols L133-139): the normal equations, R^2 = 1 - SSR/SST."""
    X = rng.normal(size=(120, 3))
    y = X @ np.array([0.5, -1.0, 0.2]) + rng.normal(size=120)
    beta, r2 = standardized_ols(y, X)
    Z = np.column_stack([np.ones(120)] + [(X[:, j] - X[:, j].mean()) / X[:, j].std() for j in range(3)])
    yz = (y - y.mean()) / y.std()
    ref = np.linalg.solve(Z.T @ Z, Z.T @ yz)
    np.testing.assert_allclose(beta, ref[1:], atol=1e-10)
    assert r2 == pytest.approx(1 - ((yz - Z @ ref) ** 2).sum() / (yz**2).sum(), abs=1e-12)


def test_paper_ols_r2_decomposition_and_plus_c(small_tokens: pd.DataFrame) -> None:
    """Delta R^2 = decomposed - base [H, D, H*D, pos, H_T]; "+C" adds C~ (analyze_fixed_context_gain.py
    _regression_summary); every model refitted here with the plain normal equations."""
    f = paper_frame(small_tokens)
    out = paper_ols(f, n_boot=50)
    yz = zscore(f["gain_w01"].to_numpy())
    for model, cols in (("base", ["Hn", "Dn", "HxD", "pos_norm", "HTn"]), ("plus_c", ["Hn", "Dn", "HxD", "Cn",
                        "pos_norm", "HTn"]), ("decomposed", ["Hn", "DL", "DI", "pos_norm", "HTn"])):
        Z = np.column_stack([np.ones(len(f))] + [zscore(f[c].to_numpy()) for c in cols])
        ref = np.linalg.solve(Z.T @ Z, Z.T @ yz)
        assert list(out[model]["coef"].values()) == pytest.approx(ref[1:].tolist(), abs=1e-9)
        assert out[model]["r2"] == pytest.approx(1 - ((yz - Z @ ref) ** 2).sum() / (yz**2).sum(), abs=1e-12)
    assert out["delta_r2"] == pytest.approx(out["decomposed"]["r2"] - out["base"]["r2"])
    assert out["beta_L"] == out["decomposed"]["coef"]["DL"] and out["beta_I"] == out["decomposed"]["coef"]["DI"]
    assert out["beta_L_ci"][0] <= out["beta_L"] <= out["beta_L_ci"][1]


def test_support_and_matched_gap_match_loops(small_tokens: pd.DataFrame) -> None:
    """Inside Q3, C re-normalised within Q3: tertile gap (build_section3_analysis.py q3_support_summary
    L386-395, cluster_bootstrap_diff L142-194) and the within-sample matched gap (within_prompt_matching
    L197-225), on the raw relative gain; written as loops over rows and samples."""
    f = paper_frame(small_tokens)
    got = q3_support_gap(f, n_boot=0)
    rows = [r for r in f.to_dict("records") if r["q3"]]
    c = robust_norm(np.array([r["C"] for r in rows]))
    lo, hi = _quantile_ref(list(c), 1 / 3), _quantile_ref(list(c), 2 / 3)
    ref = _mean([r["gain_rel"] for r, v in zip(rows, c) if v >= hi]) - _mean(
        [r["gain_rel"] for r, v in zip(rows, c) if v <= lo])
    assert got["gap"] == pytest.approx(ref, abs=1e-12)
    diffs = []
    for seq in sorted({r["seq_id"] for r in rows}):
        sub = [(r, v) for r, v in zip(rows, c) if r["seq_id"] == seq]
        if len(sub) < 2:
            continue
        med = _quantile_ref([v for _, v in sub], 0.5)
        lows = [r for r, v in sub if v <= med]
        for r, v in sub:
            if v > med and lows:
                dist = [sum((r[k] - lr[k]) ** 2 for k in ("Hn", "Dn", "pos_norm")) for lr in lows]
                diffs.append(r["gain_rel"] - lows[dist.index(min(dist))]["gain_rel"])
    assert got["matched"]["pairs"] == len(diffs)
    assert got["matched"]["gap"] == pytest.approx(_mean(diffs), abs=1e-12)


def test_matched_gap_first_match_on_ties() -> None:
    """Equidistant low-C tokens: the first one (argmin) is the match, as in within_prompt_matching L218."""
    q3 = pd.DataFrame({"seq_id": [0, 0, 0], "s": [1.0, 0.0, 0.0], "Hn": [0.5, 0.4, 0.6], "Dn": [0.5] * 3,
                       "pos_norm": [0.0] * 3, "gain_rel": [1.0, 0.25, 0.75]})
    assert matched_gap_within_samples(q3, "s")["gap"] == pytest.approx(0.75)


def test_top_n_ties_by_score_then_earliest_row() -> None:
    """Ties by (score, -position): among equal scores the earliest rows are kept (spec, tip_compat.py)."""
    score = np.array([0.2, 1.0, 0.5, 1.0, 1.0, 0.5])
    ref = sorted(range(6), key=lambda i: (-score[i], i))[:4]
    assert top_n_rows(score, 4).tolist() == ref == [1, 3, 4, 2]


def test_n_keep_rounds_half_to_even() -> None:
    """max(1, round(n rho)) with Python's round (matched_fixed_context_topn.py L85)."""
    assert [n_keep_paper(n, r) for n, r in ((50, 0.05), (70, 0.05), (10, 0.01), (1000, 0.03))] == [2, 4, 1, 30]


def test_top_n_means_and_gain_per_keep(small_tokens: pd.DataFrame) -> None:
    """Mean winsorised G of the kept rows and gain per keep = mean / (N / n) (summarize_selection L84-107)."""
    f = paper_frame(small_tokens, normalise_first=True)
    table = paper_top_n(f, ratios=(0.05,), n_boot=0)
    row = table.set_index("selector").loc["teachability"]
    score = (f["Dn"] * f["Cn"]).tolist()
    n = max(1, round(len(f) * 0.05))
    kept = sorted(range(len(f)), key=lambda i: (-score[i], i))[:n]
    mean = _mean([f["gain_w01"][i] for i in kept])
    assert row["n_keep"] == n and row["mean_gain"] == pytest.approx(mean, abs=1e-12)
    assert row["gain_per_keep"] == pytest.approx(mean / (n / len(f)))
    assert set(table["selector"]) >= {"q3_low_compat", "q3_low_teachability", "random", "tip", "kl"}


def test_robust_rank_is_average_percentile_rank() -> None:
    """Average rank / n, non-finite -> the ranks' median (support_definition_robustness.py robust_rank)."""
    x = np.array([3.0, 1.0, 3.0, np.nan, 2.0])
    finite = [v for v in x if math.isfinite(v)]
    ref = [(sum(u < v for u in finite) + (sum(u == v for u in finite) + 1) / 2) / len(finite) for v in finite]
    got = robust_rank(x)
    np.testing.assert_allclose(got[[0, 1, 2, 4]], ref)
    assert got[3] == pytest.approx(float(np.median(ref)))


def test_support_proxy_audit_rows(small_tokens: pd.DataFrame) -> None:
    """Table 6: one row per proxy present; the C row's Q3 quartile gap of D*c equals a loop reference."""
    audit = support_proxy_audit(small_tokens, n_boot=20).set_index("proxy")
    assert {"compat_mass", "overlap", "jaccard", "compat_mass_lower", "bhattacharyya"} <= set(audit.index)
    g = relative_gain(small_tokens["kl_forward_before"].to_numpy(), small_tokens["kl_forward_after"].to_numpy())
    h, d = robust_rank(small_tokens["student_entropy"].to_numpy()), robust_rank(small_tokens["kl_forward"].to_numpy())
    s = d * robust_rank(small_tokens["compat_mass"].to_numpy())
    mh, md = _quantile_ref(list(h), 0.5), _quantile_ref(list(d), 0.5)
    rows = [i for i in range(len(g)) if h[i] <= mh and d[i] >= md and math.isfinite(g[i])]
    lo, hi = _quantile_ref([s[i] for i in rows], 0.25), _quantile_ref([s[i] for i in rows], 0.75)
    ref = _mean([g[i] for i in rows if s[i] >= hi]) - _mean([g[i] for i in rows if s[i] <= lo])
    assert audit.loc["compat_mass", "gap_dl"] == pytest.approx(ref, abs=1e-12)
    assert audit.loc["compat_mass", "release_name"] == "Cmass_true"


def test_summarize_paper_and_side_by_side(small_tokens: pd.DataFrame) -> None:
    """The preset's summary names its definitions and protocol; side_by_side pairs paper and project numbers."""
    s = summarize_paper(small_tokens, manifest={"k": 8, "protocol": "paper"}, n_boot=20)
    assert s["preset"] == "paper" and "trained on all tokens" in s["measures"]
    assert set(s["ols_by_k"]) == {"8", "16", "32"} and set(s["definitions"]) == {"paper", "project"}
    assert {r["K"] for r in s["top_n"]} == {8, 16, 32}
    rows = side_by_side({"paper": s, "ols": {"beta_L": 0.1}})
    assert rows[0] == {"statistic": "beta_L", "paper": s["ols"]["beta_L"], "project": 0.1}


def test_protocol_meanings_mirror_the_diagnostic() -> None:
    """The summary's protocol wording equals diagnostics.diagnose.PROTOCOL_MEANING for every protocol it has."""
    from analysis.paper_summary import PROTOCOLS
    from diagnostics.diagnose_config import PROTOCOL_MEANING

    for name, meaning in PROTOCOL_MEANING.items():
        assert PROTOCOLS[name] == meaning


def test_release_columns_of_the_table_are_used_when_present(small_tokens: pd.DataFrame) -> None:
    """`taopd diagnose` writes gain_rel_paper and disagreement_full; the preset reads them rather than recomputing."""
    df = small_tokens.copy()
    df["gain_rel_paper"] = np.linspace(-1.0, 1.0, len(df))
    df["disagreement_full"] = np.linspace(0.0, 2.0, len(df))
    f = paper_frame(df)
    np.testing.assert_array_equal(f["gain_rel"], df["gain_rel_paper"])
    np.testing.assert_array_equal(f["D"], df["disagreement_full"])
