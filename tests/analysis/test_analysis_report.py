"""analysis.report and analysis.checks: summarize on the fixture and synthetic tables, JSON, report text, computed
verdict, bad input."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from analysis.checks import checks, verdict
from analysis.io import load_run
from analysis.report import format_report, summarize, summary_tables

KEYS = {"schema", "run", "notes", "correlations", "correlation_reference", "partial_compat_given_disagreement", "ols",
        "ols_by_k", "support_gap", "support_gap_by_k", "matched_gap", "mean_gain_all", "top_n", "top_n_references",
        "retrieval", "learnable_share", "paper", "side_by_side", "checks", "verdict"}


@pytest.fixture(scope="module")
def fixture_summary(fixture_results):
    df, manifest = load_run(fixture_results / "diagnose" / "fixture")
    return summarize(df, manifest=manifest, n_boot=200, kendall_n_boot=20)


def test_summary_keys_and_json(fixture_summary):
    s = fixture_summary
    assert set(s) == KEYS
    json.dumps(s, allow_nan=False)  # strict JSON: NaN was written as null
    assert s["run"]["synthetic"] is True and s["run"]["k"] == 8 and s["run"]["extra_k"] == [16, 32]
    assert s["run"]["n_dropped_nonfinite_outcome"] == 3  # the fixture plants 3 NaN gains
    assert any("dropped 3" in n for n in s["notes"])
    assert set(s["ols_by_k"]) == set(s["support_gap_by_k"]) == {"8", "16", "32"}
    assert s["ols_by_k"]["8"]["beta_L"] == s["ols"]["beta_L"]
    assert s["ols_by_k"]["32"]["beta_L"] != s["ols"]["beta_L"]  # K views differ
    assert {"teachability", "kl", "entropy", "tip", "compat", "incompatible", "random"} <= set(s["correlations"])
    assert s["correlations"]["full"]["spearman"] is None
    assert {(r["selector"], r["ratio"]) for r in s["top_n"]} >= {("teachability", 0.03), ("kl", 0.1)}
    assert s["ols"]["outcome_standardised"] is True


def test_format_report(fixture_summary):
    text = format_report(fixture_summary)
    for part in ("taopd analysis: fixture [SYNTHETIC]", "Spearman", "beta_L - beta_I", "Per top-K", "support_gap",
                 "Exact top-N", "gain/keep", "Checks", "Verdict:"):
        assert part in text, part
    assert "nan" not in text.replace("n/a", "")


def test_tables(fixture_summary):
    t = summary_tables(fixture_summary)
    assert set(t) == {"correlations", "ols", "per_k", "gaps", "top_n", "retrieval", "checks", "side_by_side",
                      "paper_top_n", "paper_support_proxies"}
    assert len(t["side_by_side"]) == 8 and set(t["paper_top_n"]["K"]) == {8, 16, 32}
    assert len(t["per_k"]) == 3 and len(t["checks"]) == len(fixture_summary["checks"])


def test_verdict_follows_the_numbers(fixture_summary):
    s = copy.deepcopy(fixture_summary)
    s["ols"].update(gap=0.04, gap_ci=[0.01, 0.07])
    c = {x["name"]: x for x in checks(s)}
    assert c["beta_L_above_beta_I"]["passed"] is True
    s["checks"] = checks(s)
    assert "CONFIRMED that learnable disagreement" in verdict(s)
    s["ols"].update(gap=0.04, gap_ci=[-0.01, 0.07])
    s["checks"] = checks(s)
    assert {x["name"]: x for x in s["checks"]}["beta_L_above_beta_I"]["passed"] is False
    assert "NOT confirmed that learnable disagreement" in verdict(s)
    s["ols"]["gap_ci"] = [None, None]
    s["checks"] = checks(s)
    assert {x["name"]: x for x in s["checks"]}["beta_L_above_beta_I"]["passed"] is None
    assert "UNDECIDED whether learnable" in verdict(s)
    t = s["correlations"]["teachability"]
    t.update(spearman=0.3, spearman_ci_low=0.25, diff_ci_low=0.02, diff_ci_high=0.1)
    assert {x["name"]: x for x in checks(s)}["spearman_teachability_above_kl"]["passed"] is True


def test_planted_teachability_is_found(small_tokens):
    """A strong planted beta_L > beta_I on a larger table passes the OLS check."""
    from analysis.io import validate_tokens
    from analysis.synthetic import synthetic_tokens

    df = validate_tokens(synthetic_tokens(n_prompts=80, b_l=3.0, b_i=0.0, slope_sd=0.0, extra_k=(), seed=4))
    s = summarize(df, n_boot=200, kendall_n_boot=0, manifest={"run_name": "planted", "k": 8})
    c = {x["name"]: x for x in s["checks"]}
    assert c["beta_L_above_beta_I"]["passed"] is True
    assert c["top_n_teachability_above_random"]["passed"] is True
    assert "Run planted (K=8" in s["verdict"]


def test_bad_input(small_tokens):
    with pytest.raises(ValueError, match=r"missing column\(s\) \['norm_compat'\]"):
        summarize(small_tokens.drop(columns=["norm_compat"]), n_boot=10)
    with pytest.raises(ValueError, match="no rows with a finite 'gain'"):
        summarize(small_tokens.iloc[:0], n_boot=10)
    with pytest.raises(ValueError, match="no rows with a finite 'gain'"):
        summarize(small_tokens.assign(gain=np.nan), n_boot=10)
    one = small_tokens[small_tokens["prompt_id"] == 1]
    s = summarize(one, n_boot=50, kendall_n_boot=5)
    assert any("single cluster" in n for n in s["notes"])
    assert s["ols"]["beta_L"] is not None and s["ols"]["gap_ci"] == [None, None]
    assert s["support_gap"]["ci"] == [None, None]
    t = s["correlations"]["teachability"]
    assert t["spearman_minus_ref"] is not None and t["diff_ci_low"] is None  # point difference, no interval
    assert all(c["passed"] is None for c in s["checks"])
    json.dumps(s, allow_nan=False)
    const = summarize(small_tokens.assign(score_tip=0.3), n_boot=20, kendall_n_boot=0)
    assert const["correlations"]["tip"]["spearman"] is None
    assert any("'tip' is constant" in n for n in const["notes"])
    tiny = summarize(small_tokens.iloc[:2], n_boot=10, kendall_n_boot=0)  # too small for OLS: a note, no crash
    assert tiny["ols"] is None and any(n.startswith("OLS: skipped") for n in tiny["notes"])
    format_report(tiny)


def test_summary_has_the_paper_preset_beside_the_project(fixture_summary):
    """The summary carries the release's definitions (analysis.paper_summary) and names both, side by side."""
    s = fixture_summary
    assert s["paper"]["preset"] == "paper" and set(s["paper"]["definitions"]) == {"paper", "project"}
    assert s["run"]["protocol"] == "synthetic" and s["run"]["measures"]
    first = s["side_by_side"][0]
    assert first == {"statistic": "beta_L", "paper": s["paper"]["ols"]["beta_L"], "project": s["ols"]["beta_L"]}
    text = format_report(s)
    assert "Definitions side by side" in text and "Support-proxy audit" in text and "Paper exact top-N" in text
