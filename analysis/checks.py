"""The paper's claims tested on one diagnostic summary (`checks`, `verdict`), and how numbers are written.

Each check states a claim, the numbers that decide it on THIS run, and whether they do: it passes only
when a bootstrap interval lies above zero (passed True/False; None when undecidable). `verdict` is one
paragraph built from the checks, never assumed. `fmt`, `fmt_ci` and `estimate` write a number, an
interval and both the way the report and the check details show them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

REFERENCE = "kl"  # raw KL: the baseline teachability must beat
HEADLINE_RATIO = 0.03  # the paper's headline top-N budget


def num(x: Any) -> float:
    """A summary value as float (None -> NaN)."""
    return float("nan") if x is None else float(x)


def fmt(x: Any, digits: int = 3) -> str:
    """Signed fixed-point number, scientific when tiny, 'n/a' for None/NaN."""
    x = num(x)
    if not math.isfinite(x):
        return "n/a"
    return f"{x:+.{digits}f}" if abs(x) >= 10 ** -digits or x == 0 else f"{x:+.2e}"


def fmt_ci(ci: Any, digits: int = 3) -> str:
    """A (low, high) pair as "[+0.100, +0.150]"; "[CI n/a]" when either end is missing."""
    lo, hi = (None, None) if ci is None else ci
    if lo is None or hi is None:
        return "[CI n/a]"
    return f"[{fmt(lo, digits)}, {fmt(hi, digits)}]"


def _excludes_zero_above(ci: Any) -> bool | None:
    """True if the CI lies above 0, False if it includes or lies below 0, None when unavailable."""
    if ci is None or ci[0] is None or ci[1] is None:
        return None
    return bool(ci[0] > 0)


def estimate(value: Any, ci: Any, digits: int = 3) -> str:
    """An estimate with its CI: "+0.123 [+0.100, +0.150]"."""
    return f"{fmt(value, digits)} {fmt_ci(ci, digits)}"


def ci_of(row: Mapping[str, Any], prefix: str = "") -> tuple[Any, Any]:
    """(row[<prefix>ci_low], row[<prefix>ci_high]), None where missing."""
    return row.get(f"{prefix}ci_low"), row.get(f"{prefix}ci_high")


def _check(name: str, claim: str, value: Any, ci: Any, detail: str) -> dict[str, Any]:
    """One check; it passes when the CI lies above zero (None = undecidable)."""
    return {"name": name, "claim": claim, "value": value, "ci": ci, "passed": _excludes_zero_above(ci),
            "detail": detail}


def _correlation_checks(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Teachability's Spearman with G above raw KL's (paired difference)."""
    corr = summary.get("correlations") or {}
    t, k = corr.get("teachability"), corr.get(REFERENCE)
    if not (t and k):
        return []
    diff_ci = ci_of(t, "diff_")
    sep = None
    if None not in (t.get("spearman_ci_low"), k.get("spearman_ci_high")):
        sep = t["spearman_ci_low"] > k["spearman_ci_high"]
    return [_check(
        "spearman_teachability_above_kl", "teachability ranks gains better than raw KL (Spearman with G)",
        t.get("spearman_minus_ref"), diff_ci,
        f"teachability {estimate(t.get('spearman'), ci_of(t, 'spearman_'))} vs "
        f"raw KL {estimate(k.get('spearman'), ci_of(k, 'spearman_'))}; "
        f"paired difference {estimate(t.get('spearman_minus_ref'), diff_ci)}; "
        f"individual CIs {'do not overlap' if sep else 'overlap' if sep is False else 'n/a'}")]


def _ols_checks(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """beta_L > beta_I, and the incremental R^2 of D^L and D^I."""
    ols = summary.get("ols")
    if not ols:
        return []
    return [
        _check("beta_L_above_beta_I", "learnable disagreement predicts gain more than incompatible (beta_L > beta_I)",
               ols.get("gap"), ols.get("gap_ci"),
               f"beta_L {estimate(ols.get('beta_L'), ols.get('beta_L_ci'))} vs "
               f"beta_I {estimate(ols.get('beta_I'), ols.get('beta_I_ci'))}; "
               f"gap {estimate(ols.get('gap'), ols.get('gap_ci'))}"),
        _check("incremental_r2_positive", "D^L and D^I add explanatory power over [H, pos, H^T]",
               ols.get("incremental_r2"), ols.get("incremental_r2_ci"),
               f"R^2 {fmt(ols.get('r2_decomposed'), 4)} vs controls {fmt(ols.get('r2_controls'), 4)}"),
    ]


def _compat_checks(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The support gaps inside Q3 and at matched H, D, position; C's partial Spearman given D."""
    out = []
    for key, claim in (("support_gap", "inside Q3, high-C tokens gain more than low-C tokens"),
                       ("matched_gap", "at matched H, D and position, higher-C tokens gain more")):
        g = summary.get(key)
        if g:
            out.append(_check(f"{key}_positive", claim, g.get("gap"), g.get("ci"),
                              f"{key.replace('_', ' ')} {fmt(g.get('gap'), 4)} nats {fmt_ci(g.get('ci'), 4)} "
                              f"(high {fmt(g.get('mean_high'), 4)}, n={g.get('n_high')}; "
                              f"low {fmt(g.get('mean_low'), 4)}, n={g.get('n_low')})"))
    p = summary.get("partial_compat_given_disagreement")
    if p:
        out.append(_check("partial_compat_positive", "C carries information about G beyond D (partial Spearman)",
                          p.get("value"), p.get("ci"),
                          f"partial Spearman of G with {p.get('x')} given {p.get('given')} "
                          f"{estimate(p.get('value'), p.get('ci'))}"))
    return out


def _top_n_checks(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """At the ratio nearest HEADLINE_RATIO, teachability's kept tokens gain more than each reference's."""
    rows = {(r["selector"], r["ratio"]): r for r in summary.get("top_n") or []}
    ratios = sorted({r for _, r in rows})
    if not ratios:
        return []
    out = []
    ratio = min(ratios, key=lambda r: abs(r - HEADLINE_RATIO))
    for other in summary.get("top_n_references") or []:
        t_row, o_row = rows.get(("teachability", ratio)), rows.get((other, ratio))
        if not (t_row and o_row):
            continue
        ci = ci_of(t_row, f"minus_{other}_")
        out.append(_check(
            f"top_n_teachability_above_{other}",
            f"at {ratio:.0%} retention teachability keeps higher-gain tokens than {other}",
            t_row.get(f"minus_{other}"), ci,
            f"mean G kept: teachability {estimate(t_row.get('mean_gain'), ci_of(t_row), 4)} "
            f"vs {other} {estimate(o_row.get('mean_gain'), ci_of(o_row), 4)}; "
            f"paired difference {estimate(t_row.get(f'minus_{other}'), ci, 4)}"))
    return out


def checks(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The paper's claims tested on this run: name, claim, value, ci, passed (None = undecidable), detail."""
    return [*_correlation_checks(summary), *_ols_checks(summary), *_compat_checks(summary), *_top_n_checks(summary)]


def verdict(summary: Mapping[str, Any]) -> str:
    """Plain-English statement of what this run found, built from `checks` (never assumed)."""
    run = summary.get("run", {})
    head = (f"Run {run.get('run_name')} (K={run.get('k')}, {run.get('n_tokens')} tokens, "
            f"{run.get('n_clusters')} {run.get('cluster_column')} clusters"
            f"{', SYNTHETIC data' if run.get('synthetic') else ''}):")
    found = summary.get("checks") or checks(summary)
    n_pass = sum(c["passed"] is True for c in found)
    n_dec = sum(c["passed"] is not None for c in found)
    head += f" {n_pass} of {len(found)} checks confirmed ({len(found) - n_dec} undecidable)."
    parts = []
    for c in found:
        if c["passed"] is True:
            parts.append(f"CONFIRMED that {c['claim']} ({c['detail']}).")
        elif c["passed"] is False:
            parts.append(f"NOT confirmed that {c['claim']}: the interval does not lie above zero ({c['detail']}).")
        else:
            parts.append(f"UNDECIDED whether {c['claim']}: no interval available ({c['detail']}).")
    if not parts:
        parts.append("no check could be computed; see notes.")
    return " ".join([head, *parts])


def checks_frame(summary: Mapping[str, Any]) -> pd.DataFrame:
    """The checks as a table (for notebooks): name, passed, value, ci_low, ci_high, claim, detail."""
    rows = [{"name": c["name"], "passed": c["passed"], "value": c["value"],
             "ci_low": (c["ci"] or [None, None])[0], "ci_high": (c["ci"] or [None, None])[1],
             "claim": c["claim"], "detail": c["detail"]} for c in summary.get("checks", [])]
    return pd.DataFrame(rows, columns=["name", "passed", "value", "ci_low", "ci_high", "claim", "detail"])
