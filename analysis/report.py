"""One summary of a diagnostic run, its checks, and its text report: the single place statistics are assembled.

`summarize(df)` runs every section-4 statistic (and the extras) on a token table and returns a
JSON-serialisable dict (NaN written as null); `format_report(summary)` renders it as plain-text
tables ending in a verdict. The diagnose command, ``taopd analyze`` and the notebooks all call these
two, so no statistic is computed in two places.

The verdict is assembled from `checks(summary)`: each check states a claim of the paper, the
numbers that decide it on THIS run, and whether they do (passed True/False; None when undecidable).
A check passes only when a bootstrap interval excludes zero in the claimed direction.

Summary keys (every interval is a 95% prompt-cluster bootstrap percentile pair [low, high]):
    schema          "taopd.analysis.summary/1"
    run             run_name, k, extra_k, synthetic, outcome, n_rows, n_tokens, n_dropped_nonfinite_outcome,
                    n_clusters, cluster_column, n_boot, kendall_n_boot, seed, ratios
    notes           list of plain-English messages (dropped rows, missing CIs, constant scores, skipped sections)
    correlations    score -> spearman, spearman_ci_low/high, kendall, kendall_ci_low/high,
                    spearman_minus_ref, diff_ci_low/high (paired difference to `correlation_reference`)
    correlation_reference  "kl" (raw KL), or null when absent
    partial_compat_given_disagreement  value, ci, x, given (partial Spearman of G with C~ given D~)
    ols             beta_L, beta_L_ci, beta_I, beta_I_ci, gap, gap_ci, r2_base, r2_decomposed, r2_controls,
                    incremental_r2, incremental_r2_ci, base/decomposed: feature -> coef, ci, cluster_se; n, n_boot
    ols_by_k        "K" -> beta_L, beta_L_ci, beta_I, beta_I_ci, gap, gap_ci (base K and each extra K)
    support_gap     gap, ci, mean_high, mean_low, n_high, n_low      (Q3 support gap, nats)
    support_gap_by_k  "K" -> the same
    matched_gap     the same fields for the within-prompt matched gap
    mean_gain_all   value, ci (mean G over all tokens: the 'full' baseline)
    top_n           records: selector, ratio, n_tokens, n_keep, n_kept, mean_gain, ci_low, ci_high, gain_per_keep,
                    minus_<R>, minus_<R>_ci_low/high for R in `top_n_references`
    top_n_references  ["kl", "random"] (those present)
    retrieval       records: selector, ratio, n_keep, auroc, precision
    checks          records: name, claim, value, ci, passed (true/false/null), detail
    verdict         one paragraph stating what this run found
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from analysis.bootstrap import DEFAULT_N_BOOT, clusters_of
from analysis.io import available_ks, validate_tokens, with_k
from analysis.regression import fit_teachability_ols
from analysis.selectors import DEFAULT_RATIOS, retrieval_table, top_n_table
from analysis.stats import (
    DEFAULT_KENDALL_N_BOOT,
    correlation_table,
    finite_outcome,
    matched_gap,
    partial_correlation,
    support_gap,
)

SCHEMA = "taopd.analysis.summary/1"
# Scores shown in the report's correlation table, in this order (others stay in the summary).
REPORT_SCORES: tuple[str, ...] = ("teachability", "kl", "entropy", "tip", "compat", "incompatible", "random")
REFERENCE = "kl"  # raw KL: the baseline teachability must beat
HEADLINE_RATIO = 0.03  # the paper's headline top-N budget


def _json(obj: Any) -> Any:
    """Recursively convert numpy scalars/arrays and tuples to JSON types; NaN/inf -> None."""
    if isinstance(obj, Mapping):
        return {str(k): _json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_json(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _num(x: Any) -> float:
    """A summary value as float (None -> NaN)."""
    return float("nan") if x is None else float(x)


def _section(notes: list[str], name: str, fn: Callable[[], Any]) -> Any:
    """Run one section; a ValueError or LinAlgError becomes a note and the section is None."""
    try:
        return fn()
    except (ValueError, np.linalg.LinAlgError) as err:
        notes.append(f"{name}: skipped ({err})")
        return None


def _ols_dict(o: Any) -> dict[str, Any]:
    return {
        "outcome": o.outcome, "outcome_standardised": True, "features_standardised": True,
        "beta_L": o.beta_L, "beta_L_ci": o.beta_L_ci, "beta_I": o.beta_I, "beta_I_ci": o.beta_I_ci,
        "gap": o.gap, "gap_ci": o.gap_ci, "r2_base": o.base.r2, "r2_decomposed": o.decomposed.r2,
        "r2_controls": o.controls_r2, "incremental_r2": o.incremental_r2, "incremental_r2_ci": o.incremental_r2_ci,
        "base": {f: {"coef": o.base.coef[f], "ci": (o.base.ci_low[f], o.base.ci_high[f]),
                     "cluster_se": o.base.cluster_se[f]} for f in o.base.coef},
        "decomposed": {f: {"coef": o.decomposed.coef[f], "ci": (o.decomposed.ci_low[f], o.decomposed.ci_high[f]),
                           "cluster_se": o.decomposed.cluster_se[f]} for f in o.decomposed.coef},
        "n": o.base.n, "n_boot": o.n_boot,
    }


def _gap_dict(g: Any) -> dict[str, Any]:
    return {"gap": g.gap, "ci": (g.ci_low, g.ci_high), "mean_high": g.mean_high, "mean_low": g.mean_low,
            "n_high": g.n_high, "n_low": g.n_low}


def per_k_stats(
    df: pd.DataFrame,
    *,
    base_k: int | None = None,
    outcome: str = "gain",
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    notes: list[str] | None = None,
    precomputed: Mapping[Any, tuple[Any, Any]] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ols_by_k, support_gap_by_k): beta_L/beta_I/gap and the Q3 support gap at the base K and each extra K.

    Keys are K as strings. `precomputed` maps K -> (TeachabilityOLS, GapResult) already computed
    (either may be None). Failures become `notes` entries.
    """
    notes = [] if notes is None else notes
    base_k = base_k if base_k is not None else df.attrs.get("k")
    ks = ([int(base_k)] if base_k is not None else []) + [k for k in available_ks(df) if k != base_k]
    kw = dict(outcome=outcome, n_boot=n_boot, seed=seed)
    ols_by_k: dict[str, Any] = {}
    gap_by_k: dict[str, Any] = {}
    for k in ks:
        view = with_k(df, k, base_k=base_k)
        o, g = (precomputed or {}).get(k, (None, None))
        o = o or _section(notes, f"OLS K={k}", lambda: fit_teachability_ols(view, **kw))
        g = g or _section(notes, f"support gap K={k}", lambda: support_gap(view, **kw))
        if o is not None:
            full = _ols_dict(o)
            ols_by_k[str(k)] = _json({key: full[key] for key in ("beta_L", "beta_L_ci", "beta_I", "beta_I_ci", "gap", "gap_ci")})
        if g is not None:
            gap_by_k[str(k)] = _json(_gap_dict(g))
    return ols_by_k, gap_by_k


def summarize(
    df: pd.DataFrame,
    *,
    n_boot: int = DEFAULT_N_BOOT,
    seed: int = 0,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    outcome: str = "gain",
    kendall_n_boot: int = DEFAULT_KENDALL_N_BOOT,
    manifest: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """All token-level statistics of one diagnostic table as a JSON-serialisable dict (keys: module docstring).

    Raises ValueError when columns are missing (naming them) or no row has a finite outcome; any other
    problem (a single cluster, constant scores, NaN gains, a failing section) is reported in ``notes``
    and the affected numbers are null.
    """
    manifest = dict(manifest or {})
    df = validate_tokens(df, what="token table")
    n_rows = len(df)
    df, notes = finite_outcome(df, outcome)
    run_name = str(manifest.get("run_name", df.attrs.get("run_name", "run")))
    base_k = manifest.get("k", df.attrs.get("k"))
    clusters = clusters_of(df)
    if clusters.n_clusters < 2:
        notes.append(f"single cluster ({clusters.column}): no bootstrap is possible; every CI is null")
    kw = dict(outcome=outcome, n_boot=n_boot, seed=seed)

    corr = _section(notes, "correlations", lambda: correlation_table(
        df, reference=REFERENCE, kendall_n_boot=kendall_n_boot, kendall_scores=REPORT_SCORES, **kw))
    partial = _section(notes, "partial correlation", lambda: partial_correlation(df, **kw))
    ols = _section(notes, "OLS", lambda: fit_teachability_ols(df, **kw))
    sgap = _section(notes, "support gap", lambda: support_gap(df, **kw))
    mgap = _section(notes, "matched gap", lambda: matched_gap(df, **kw))
    topn = _section(notes, "top-N", lambda: top_n_table(df, ratios=ratios, references=(REFERENCE, "random"), **kw))
    retr = _section(notes, "retrieval", lambda: retrieval_table(df, outcome=outcome, ratios=ratios))
    for part in (corr, partial, ols, sgap, mgap, topn):
        if part is not None:
            notes.extend(n for n in part.notes if n not in notes)

    ks = ([int(base_k)] if base_k is not None else []) + [k for k in available_ks(df) if k != base_k]
    ols_by_k, gap_by_k = per_k_stats(df, base_k=base_k, notes=notes, precomputed={base_k: (ols, sgap)}, **kw)

    summary: dict[str, Any] = {
        "schema": SCHEMA,
        "run": {
            "run_name": run_name, "k": base_k, "extra_k": [k for k in ks if k != base_k],
            "synthetic": manifest.get("synthetic"), "outcome": outcome, "n_rows": n_rows, "n_tokens": len(df),
            "n_dropped_nonfinite_outcome": n_rows - len(df), "n_clusters": clusters.n_clusters,
            "cluster_column": clusters.column, "n_boot": n_boot, "kendall_n_boot": kendall_n_boot,
            "seed": seed, "ratios": list(ratios),
        },
        "notes": notes,
        "correlations": {} if corr is None else {
            r["score"]: {k: v for k, v in r.items() if k != "score"} for r in corr.table.to_dict("records")},
        "correlation_reference": None if corr is None else corr.reference,
        "partial_compat_given_disagreement": None if partial is None else {
            "value": partial.value, "ci": (partial.ci_low, partial.ci_high), "x": partial.x, "given": partial.given},
        "ols": None if ols is None else _ols_dict(ols),
        "ols_by_k": ols_by_k,
        "support_gap": None if sgap is None else _gap_dict(sgap),
        "support_gap_by_k": gap_by_k,
        "matched_gap": None if mgap is None else _gap_dict(mgap),
        "mean_gain_all": None if topn is None else {"value": topn.mean_gain_all, "ci": topn.mean_gain_all_ci},
        "top_n": [] if topn is None else topn.table.to_dict("records"),
        "top_n_references": [] if topn is None else topn.references,
        "retrieval": [] if retr is None else retr.to_dict("records"),
    }
    summary = _json(summary)
    summary["checks"] = _json(checks(summary))
    summary["verdict"] = verdict(summary)
    return summary


# ----------------------------------------------------------------------------- checks and verdict


def _fmt(x: Any, digits: int = 3) -> str:
    """Signed fixed-point number, scientific when tiny, 'n/a' for None/NaN."""
    x = _num(x)
    if not math.isfinite(x):
        return "n/a"
    return f"{x:+.{digits}f}" if abs(x) >= 10 ** -digits or x == 0 else f"{x:+.2e}"


def _fmt_ci(ci: Any, digits: int = 3) -> str:
    lo, hi = (None, None) if ci is None else ci
    if lo is None or hi is None:
        return "[CI n/a]"
    return f"[{_fmt(lo, digits)}, {_fmt(hi, digits)}]"


def _excludes_zero_above(ci: Any) -> bool | None:
    """True if the CI lies above 0, False if it includes or lies below 0, None when unavailable."""
    if ci is None or ci[0] is None or ci[1] is None:
        return None
    return bool(ci[0] > 0)


def checks(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The paper's claims tested on this run: name, claim, value, ci, passed (None = undecidable), detail."""
    out: list[dict[str, Any]] = []

    def add(name: str, claim: str, value: Any, ci: Any, passed: bool | None, detail: str) -> None:
        out.append({"name": name, "claim": claim, "value": value, "ci": ci, "passed": passed, "detail": detail})

    corr = summary.get("correlations") or {}
    t, k = corr.get("teachability"), corr.get(REFERENCE)
    if t and k:
        diff_ci = (t.get("diff_ci_low"), t.get("diff_ci_high"))
        sep = None
        if None not in (t.get("spearman_ci_low"), k.get("spearman_ci_high")):
            sep = t["spearman_ci_low"] > k["spearman_ci_high"]
        add("spearman_teachability_above_kl",
            "teachability ranks gains better than raw KL (Spearman with G)",
            t.get("spearman_minus_ref"), diff_ci, _excludes_zero_above(diff_ci),
            f"teachability {_fmt(t.get('spearman'))} {_fmt_ci((t.get('spearman_ci_low'), t.get('spearman_ci_high')))} vs "
            f"raw KL {_fmt(k.get('spearman'))} {_fmt_ci((k.get('spearman_ci_low'), k.get('spearman_ci_high')))}; "
            f"paired difference {_fmt(t.get('spearman_minus_ref'))} {_fmt_ci(diff_ci)}; "
            f"individual CIs {'do not overlap' if sep else 'overlap' if sep is False else 'n/a'}")
    ols = summary.get("ols")
    if ols:
        add("beta_L_above_beta_I", "learnable disagreement predicts gain more than incompatible (beta_L > beta_I)",
            ols.get("gap"), ols.get("gap_ci"), _excludes_zero_above(ols.get("gap_ci")),
            f"beta_L {_fmt(ols.get('beta_L'))} {_fmt_ci(ols.get('beta_L_ci'))} vs beta_I {_fmt(ols.get('beta_I'))} "
            f"{_fmt_ci(ols.get('beta_I_ci'))}; gap {_fmt(ols.get('gap'))} {_fmt_ci(ols.get('gap_ci'))}")
        add("incremental_r2_positive", "D^L and D^I add explanatory power over [H, pos, H^T]",
            ols.get("incremental_r2"), ols.get("incremental_r2_ci"), _excludes_zero_above(ols.get("incremental_r2_ci")),
            f"R^2 {_fmt(ols.get('r2_decomposed'), 4)} vs controls {_fmt(ols.get('r2_controls'), 4)}")
    for key, claim in (("support_gap", "inside Q3, high-C tokens gain more than low-C tokens"),
                       ("matched_gap", "at matched H, D and position, higher-C tokens gain more")):
        g = summary.get(key)
        if g:
            add(f"{key}_positive", claim, g.get("gap"), g.get("ci"), _excludes_zero_above(g.get("ci")),
                f"{key.replace('_', ' ')} {_fmt(g.get('gap'), 4)} nats {_fmt_ci(g.get('ci'), 4)} "
                f"(high {_fmt(g.get('mean_high'), 4)}, n={g.get('n_high')}; "
                f"low {_fmt(g.get('mean_low'), 4)}, n={g.get('n_low')})")
    p = summary.get("partial_compat_given_disagreement")
    if p:
        add("partial_compat_positive", "C carries information about G beyond D (partial Spearman)",
            p.get("value"), p.get("ci"), _excludes_zero_above(p.get("ci")),
            f"partial Spearman of G with {p.get('x')} given {p.get('given')} {_fmt(p.get('value'))} {_fmt_ci(p.get('ci'))}")
    rows = {(r["selector"], r["ratio"]): r for r in summary.get("top_n") or []}
    ratios = sorted({r for _, r in rows})
    if ratios:
        ratio = min(ratios, key=lambda r: abs(r - HEADLINE_RATIO))
        for other in summary.get("top_n_references") or []:
            t_row, o_row = rows.get(("teachability", ratio)), rows.get((other, ratio))
            if not (t_row and o_row):
                continue
            ci = (t_row.get(f"minus_{other}_ci_low"), t_row.get(f"minus_{other}_ci_high"))
            add(f"top_n_teachability_above_{other}",
                f"at {ratio:.0%} retention teachability keeps higher-gain tokens than {other}",
                t_row.get(f"minus_{other}"), ci, _excludes_zero_above(ci),
                f"mean G kept: teachability {_fmt(t_row.get('mean_gain'), 4)} "
                f"{_fmt_ci((t_row.get('ci_low'), t_row.get('ci_high')), 4)} vs {other} {_fmt(o_row.get('mean_gain'), 4)} "
                f"{_fmt_ci((o_row.get('ci_low'), o_row.get('ci_high')), 4)}; paired difference "
                f"{_fmt(t_row.get(f'minus_{other}'), 4)} {_fmt_ci(ci, 4)}")
    return out


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


# ----------------------------------------------------------------------------- text report


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    body = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join([line, "-" * len(line), *body])


def format_report(summary: Mapping[str, Any]) -> str:
    """Plain-text report: run header, correlations, OLS, gaps, top-N, checks, notes and the verdict."""
    run = summary.get("run", {})
    out = [f"taopd analysis: {run.get('run_name')}"
           + (" [SYNTHETIC]" if run.get("synthetic") else ""),
           f"K={run.get('k')} (extra {run.get('extra_k')}), {run.get('n_tokens')} tokens "
           f"({run.get('n_dropped_nonfinite_outcome')} dropped: non-finite {run.get('outcome')}), "
           f"{run.get('n_clusters')} clusters by {run.get('cluster_column')}, "
           f"{run.get('n_boot')} cluster-bootstrap resamples (Kendall {run.get('kendall_n_boot')}), 95% percentile CIs", ""]

    corr = summary.get("correlations") or {}
    rows = []
    for s in [s for s in REPORT_SCORES if s in corr] + [s for s in corr if s not in REPORT_SCORES]:
        c = corr[s]
        rows.append([s, _fmt(c.get("spearman")), _fmt_ci((c.get("spearman_ci_low"), c.get("spearman_ci_high"))),
                     _fmt(c.get("kendall")), _fmt_ci((c.get("kendall_ci_low"), c.get("kendall_ci_high"))),
                     _fmt(c.get("spearman_minus_ref")), _fmt_ci((c.get("diff_ci_low"), c.get("diff_ci_high")))])
    out += ["Rank correlation of each score with gain G",
            _table(["score", "Spearman", "95% CI", "Kendall", "95% CI", f"minus {REFERENCE}", "95% CI"], rows), ""]

    ols = summary.get("ols")
    if ols:
        out += ["Standardised OLS (features robust-normalised then z-scored; outcome z-scored: sd(G) per sd(feature))",
                _table(["model", "feature", "beta", "95% CI"],
                       [[m, f, _fmt(v["coef"]), _fmt_ci(v["ci"])] for m in ("base", "decomposed") for f, v in ols[m].items()]),
                f"beta_L - beta_I = {_fmt(ols['gap'])} {_fmt_ci(ols['gap_ci'])};  R^2 base {_fmt(ols['r2_base'], 4)}, "
                f"decomposed {_fmt(ols['r2_decomposed'], 4)}, incremental over [H, pos, H^T] "
                f"{_fmt(ols['incremental_r2'], 4)} {_fmt_ci(ols['incremental_r2_ci'], 4)}", ""]
    by_k = summary.get("ols_by_k") or {}
    if len(by_k) > 1:
        gk = summary.get("support_gap_by_k") or {}
        out += ["Per top-K", _table(["K", "beta_L", "95% CI", "beta_I", "95% CI", "gap", "95% CI", "Q3 support gap", "95% CI"],
                                    [[k, _fmt(v["beta_L"]), _fmt_ci(v["beta_L_ci"]), _fmt(v["beta_I"]), _fmt_ci(v["beta_I_ci"]),
                                      _fmt(v["gap"]), _fmt_ci(v["gap_ci"]), _fmt(gk.get(k, {}).get("gap"), 4),
                                      _fmt_ci(gk.get(k, {}).get("ci"), 4)] for k, v in by_k.items()]), ""]
    gap_rows = []
    for key in ("support_gap", "matched_gap"):
        g = summary.get(key)
        if g:
            gap_rows.append([key, _fmt(g["gap"], 4), _fmt_ci(g["ci"], 4), str(g["n_high"]), str(g["n_low"])])
    p = summary.get("partial_compat_given_disagreement")
    if gap_rows:
        out += ["Support gaps (nats of forward-KL reduction)", _table(["gap", "value", "95% CI", "n high", "n low"], gap_rows)]
    if p:
        out += [f"partial Spearman of G with C~ given D~: {_fmt(p['value'])} {_fmt_ci(p['ci'])}"]
    out.append("")

    top = summary.get("top_n") or []
    if top:
        mg = summary.get("mean_gain_all") or {}
        refs = summary.get("top_n_references") or []
        headers = ["selector", "ratio", "N", "mean G", "95% CI", "gain/keep"]
        for r in refs:
            headers += [f"minus {r}", "95% CI"]

        def top_row(r: Mapping[str, Any]) -> list[str]:
            cells = [r["selector"], f"{r['ratio']:.0%}", str(r["n_kept"]), _fmt(r["mean_gain"], 4),
                     _fmt_ci((r["ci_low"], r["ci_high"]), 4), _fmt(r["gain_per_keep"], 3)]
            for ref in refs:
                cells += [_fmt(r[f"minus_{ref}"], 4), _fmt_ci((r[f"minus_{ref}_ci_low"], r[f"minus_{ref}_ci_high"]), 4)]
            return cells

        out += [f"Exact top-N selection: mean G of kept tokens (nats); all tokens {_fmt(mg.get('value'), 4)} "
                f"{_fmt_ci(mg.get('ci'), 4)}; gain per keep = mean G / ratio",
                _table(headers, [top_row(r) for r in sorted(top, key=lambda r: (r["ratio"], -_num(r["mean_gain"])))]), ""]

    ch = summary.get("checks") or []
    if ch:
        mark = {True: "PASS", False: "FAIL", None: "n/a"}
        out += ["Checks (pass = 95% CI above zero)",
                _table(["check", "result", "value", "95% CI"],
                       [[c["name"], mark[c["passed"]], _fmt(c["value"], 4), _fmt_ci(c["ci"], 4)] for c in ch]), ""]
    if summary.get("notes"):
        out += ["Notes:", *[f"  - {n}" for n in summary["notes"]], ""]
    out += ["Verdict: " + str(summary.get("verdict", ""))]
    return "\n".join(out)


def checks_frame(summary: Mapping[str, Any]) -> pd.DataFrame:
    """The checks as a table (for notebooks): name, passed, value, ci_low, ci_high, claim, detail."""
    rows = [{"name": c["name"], "passed": c["passed"], "value": c["value"],
             "ci_low": (c["ci"] or [None, None])[0], "ci_high": (c["ci"] or [None, None])[1],
             "claim": c["claim"], "detail": c["detail"]} for c in summary.get("checks", [])]
    return pd.DataFrame(rows, columns=["name", "passed", "value", "ci_low", "ci_high", "claim", "detail"])


def summary_tables(summary: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    """The summary's sections as DataFrames (for notebooks): correlations, ols, per_k, gaps, top_n, retrieval, checks."""
    corr = pd.DataFrame.from_dict(summary.get("correlations") or {}, orient="index")
    corr.index.name = "score"
    ols = summary.get("ols") or {}
    ols_rows = [{"model": m, "feature": f, "beta": v["coef"], "ci_low": v["ci"][0], "ci_high": v["ci"][1],
                 "cluster_se": v["cluster_se"]} for m in ("base", "decomposed") for f, v in (ols.get(m) or {}).items()]
    gk = summary.get("support_gap_by_k") or {}
    per_k = [{"K": int(k), **{key: v[key] for key in ("beta_L", "beta_I", "gap")},
              "gap_ci_low": v["gap_ci"][0], "gap_ci_high": v["gap_ci"][1],
              "support_gap": (gk.get(k) or {}).get("gap"), "support_gap_ci_low": ((gk.get(k) or {}).get("ci") or [None])[0],
              "support_gap_ci_high": ((gk.get(k) or {}).get("ci") or [None, None])[1]}
             for k, v in (summary.get("ols_by_k") or {}).items()]
    gaps = [{"gap": key, "value": g["gap"], "ci_low": g["ci"][0], "ci_high": g["ci"][1], "n_high": g["n_high"],
             "n_low": g["n_low"]} for key in ("support_gap", "matched_gap") if (g := summary.get(key))]
    return {
        "correlations": corr,
        "ols": pd.DataFrame(ols_rows),
        "per_k": pd.DataFrame(per_k),
        "gaps": pd.DataFrame(gaps),
        "top_n": pd.DataFrame(summary.get("top_n") or []),
        "retrieval": pd.DataFrame(summary.get("retrieval") or []),
        "checks": checks_frame(summary),
    }
