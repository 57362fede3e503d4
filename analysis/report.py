"""One summary of a diagnostic run, its checks, and its text report: the single place statistics are assembled.

`summarize(df)` runs every section-4 statistic (and the extras) on a token table and returns a
JSON-serialisable dict (NaN written as null); `format_report(summary)` renders it as plain-text
tables ending in a verdict. The diagnose command, ``taopd analyze`` and the notebooks all call these
two, so no statistic is computed in two places.

The verdict is assembled from `analysis.checks.checks(summary)`: each check states a claim of the paper,
the numbers that decide it on THIS run, and whether they do (passed True/False; None when undecidable).
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
    learnable_share value, ci, n_tokens: sum D C / sum D over the bank (exact D and C at the run's K), and
                    by_position_quartile: records quartile, rel_pos, value, ci, n_tokens (`learnable_share`;
                    docs/selection_rules.md: what it predicts and what not); null without D and C columns
    paper           the same statistics under the release's definitions (`analysis.paper_summary.summarize_paper`:
                    preset, protocol, measures, definitions, gain_stats, ols (+ ols_winsor05, ols_raw, ols_by_k),
                    support_gap(_by_k), matched_gap, top_n, support_proxies), null when the table lacks
                    the columns it needs; `side_by_side` lists each headline number under both definitions
    side_by_side    records: statistic, paper, project
    checks          records: name, claim, value, ci, passed (true/false/null), detail
    verdict         one paragraph stating what this run found
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from analysis.bootstrap import DEFAULT_N_BOOT, cluster_sums, clusters_of, noted_resample_weights, percentile_ci
from analysis.checks import REFERENCE, checks, checks_frame, ci_of, estimate, fmt, fmt_ci, num, verdict
from analysis.io import available_ks, require_columns, validate_tokens, with_k
from analysis.paper_summary import PROTOCOLS, has_paper_columns, side_by_side, summarize_paper
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


def _protocol(manifest: Mapping[str, Any]) -> dict[str, str]:
    """The run's protocol (manifest "protocol", else its "mode") and what its gain measures."""
    protocol = str(manifest.get("protocol") or manifest.get("mode") or "single-step")
    measures = manifest.get("protocol_meaning") or PROTOCOLS.get(protocol, protocol)
    return {"protocol": protocol, "measures": str(measures)}


def _paper_section(full: pd.DataFrame, manifest: Mapping[str, Any], *, n_boot: int, seed: int,
                   notes: list[str]) -> dict[str, Any] | None:
    """The paper preset's statistics (`summarize_paper`) on the whole table, or None with a note."""
    if not has_paper_columns(full):
        notes.append("paper definitions: skipped (the table lacks kl_forward_before/after, kl_forward, entropies, "
                     "compat_mass or resp_len)")
        return None
    return _section(notes, "paper definitions", lambda: summarize_paper(full, manifest=manifest, n_boot=n_boot,
                                                                        seed=seed))


def learnable_share(df: pd.DataFrame, *, n_boot: int = DEFAULT_N_BOOT, seed: int = 0) -> dict[str, Any]:
    """The share of the bank's disagreement that is learnable: sum D C / sum D over all tokens, and per quartile
    of relative position, each with a prompt-cluster bootstrap interval (a ratio of cluster sums per resample).

    D = ``disagreement`` (exact union-top-K KL(pT' || pS')) and C = ``compat_mass`` (the teacher's mass on the
    student's top-K), both at the run's K. It says how much of the teacher's disagreement sits where the
    student's top-K covers the teacher's mass: the compatible, per-token learnable part (D^L = D C). A ratio of
    sums: heavy-disagreement tokens dominate it. What it predicts and what not: docs/selection_rules.md.
    """
    require_columns(df, ["disagreement", "compat_mass", "rel_pos"], "learnable share")
    d = df["disagreement"].to_numpy(np.float64)
    dc = d * df["compat_mass"].to_numpy(np.float64)
    ok = np.isfinite(d) & np.isfinite(dc)
    clusters = clusters_of(df)
    notes: list[str] = []
    weights = noted_resample_weights(clusters, n_boot, seed, notes, "learnable share")
    quartile = np.minimum((df["rel_pos"].to_numpy(np.float64) * 4).astype(np.int64), 3)  # rel_pos in [0, 1)

    def share(mask: np.ndarray) -> dict[str, Any]:
        num, den = np.where(mask, dc, 0.0), np.where(mask, d, 0.0)
        value = float(num.sum() / den.sum()) if den.sum() > 0 else float("nan")
        ci = (float("nan"), float("nan"))
        if weights is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                ci = percentile_ci((weights @ cluster_sums(num, clusters)) / (weights @ cluster_sums(den, clusters)))
        return {"value": value, "ci": ci, "n_tokens": int(mask.sum())}

    by_quartile = [{"quartile": q + 1, "rel_pos": (q / 4, (q + 1) / 4), **share(ok & (quartile == q))}
                   for q in range(4)]
    return {**share(ok), "by_position_quartile": by_quartile, "notes": notes}


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
            keys = ("beta_L", "beta_L_ci", "beta_I", "beta_I_ci", "gap", "gap_ci")
            ols_by_k[str(k)] = _json({key: full[key] for key in keys})
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
    full = df  # the paper preset applies the release's own row drops (analysis.paper.paper_frame)
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
    paper = _paper_section(full, {**manifest, "k": base_k}, n_boot=n_boot, seed=seed, notes=notes)
    share = _section(notes, "learnable share", lambda: learnable_share(df, n_boot=n_boot, seed=seed))
    if share is not None:
        notes.extend(n for n in share.pop("notes") if n not in notes)

    summary: dict[str, Any] = {
        "schema": SCHEMA,
        "run": {
            "run_name": run_name, "k": base_k, "extra_k": [k for k in ks if k != base_k],
            "synthetic": manifest.get("synthetic"), "outcome": outcome, "n_rows": n_rows, "n_tokens": len(df),
            "n_dropped_nonfinite_outcome": n_rows - len(df), "n_clusters": clusters.n_clusters,
            "cluster_column": clusters.column, "n_boot": n_boot, "kendall_n_boot": kendall_n_boot,
            "seed": seed, "ratios": list(ratios), **_protocol(manifest),
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
        "learnable_share": share,
        "paper": paper,
    }
    summary["side_by_side"] = side_by_side(summary) if paper is not None else []
    summary = _json(summary)
    summary["checks"] = _json(checks(summary))
    summary["verdict"] = verdict(summary)
    return summary


# ----------------------------------------------------------------------------- text report


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    body = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join([line, "-" * len(line), *body])


def _header_lines(run: Mapping[str, Any]) -> list[str]:
    """Run name, K, token and cluster counts, bootstrap settings."""
    return [f"taopd analysis: {run.get('run_name')}"
            + (" [SYNTHETIC]" if run.get("synthetic") else ""),
            f"K={run.get('k')} (extra {run.get('extra_k')}), {run.get('n_tokens')} tokens "
            f"({run.get('n_dropped_nonfinite_outcome')} dropped: non-finite {run.get('outcome')}), "
            f"{run.get('n_clusters')} clusters by {run.get('cluster_column')}, "
            f"{run.get('n_boot')} cluster-bootstrap resamples (Kendall {run.get('kendall_n_boot')}), "
            "95% percentile CIs", ""]


def _correlation_lines(summary: Mapping[str, Any]) -> list[str]:
    """Spearman and Kendall of each score with G, and the paired difference to the reference score."""
    corr = summary.get("correlations") or {}
    rows = []
    for s in [s for s in REPORT_SCORES if s in corr] + [s for s in corr if s not in REPORT_SCORES]:
        c = corr[s]
        rows.append([s, fmt(c.get("spearman")), fmt_ci(ci_of(c, "spearman_")),
                     fmt(c.get("kendall")), fmt_ci(ci_of(c, "kendall_")),
                     fmt(c.get("spearman_minus_ref")), fmt_ci(ci_of(c, "diff_"))])
    return ["Rank correlation of each score with gain G",
            _table(["score", "Spearman", "95% CI", "Kendall", "95% CI", f"minus {REFERENCE}", "95% CI"], rows), ""]


def _regression_lines(summary: Mapping[str, Any]) -> list[str]:
    """The standardised OLS, its per-K gaps, the support gaps and C's partial Spearman."""
    out: list[str] = []
    ols = summary.get("ols")
    if ols:
        out += ["Standardised OLS (features robust-normalised then z-scored; outcome z-scored: sd(G) per sd(feature))",
                _table(["model", "feature", "beta", "95% CI"],
                       [[m, f, fmt(v["coef"]), fmt_ci(v["ci"])]
                        for m in ("base", "decomposed") for f, v in ols[m].items()]),
                f"beta_L - beta_I = {estimate(ols['gap'], ols['gap_ci'])};  R^2 base {fmt(ols['r2_base'], 4)}, "
                f"decomposed {fmt(ols['r2_decomposed'], 4)}, incremental over [H, pos, H^T] "
                f"{estimate(ols['incremental_r2'], ols['incremental_r2_ci'], 4)}", ""]
    by_k = summary.get("ols_by_k") or {}
    if len(by_k) > 1:
        gk = summary.get("support_gap_by_k") or {}
        headers = ["K", "beta_L", "95% CI", "beta_I", "95% CI", "gap", "95% CI", "Q3 support gap", "95% CI"]
        out += ["Per top-K", _table(headers, [
            [k, fmt(v["beta_L"]), fmt_ci(v["beta_L_ci"]), fmt(v["beta_I"]), fmt_ci(v["beta_I_ci"]),
             fmt(v["gap"]), fmt_ci(v["gap_ci"]),
             fmt(gk.get(k, {}).get("gap"), 4), fmt_ci(gk.get(k, {}).get("ci"), 4)]
            for k, v in by_k.items()]), ""]
    gap_rows = []
    for key in ("support_gap", "matched_gap"):
        g = summary.get(key)
        if g:
            gap_rows.append([key, fmt(g["gap"], 4), fmt_ci(g["ci"], 4), str(g["n_high"]), str(g["n_low"])])
    if gap_rows:
        out += ["Support gaps (nats of forward-KL reduction)",
                _table(["gap", "value", "95% CI", "n high", "n low"], gap_rows)]
    p = summary.get("partial_compat_given_disagreement")
    if p:
        out += [f"partial Spearman of G with C~ given D~: {estimate(p['value'], p['ci'])}"]
    return [*out, ""]


def _top_n_lines(summary: Mapping[str, Any]) -> list[str]:
    """Mean G of each selector's exact top-N, and its paired difference to each reference selector."""
    top = summary.get("top_n") or []
    if not top:
        return []
    mg = summary.get("mean_gain_all") or {}
    refs = summary.get("top_n_references") or []
    headers = ["selector", "ratio", "N", "mean G", "95% CI", "gain/keep"]
    for r in refs:
        headers += [f"minus {r}", "95% CI"]

    def top_row(r: Mapping[str, Any]) -> list[str]:
        cells = [r["selector"], f"{r['ratio']:.0%}", str(r["n_kept"]), fmt(r["mean_gain"], 4),
                 fmt_ci((r["ci_low"], r["ci_high"]), 4), fmt(r["gain_per_keep"], 3)]
        for ref in refs:
            cells += [fmt(r[f"minus_{ref}"], 4), fmt_ci(ci_of(r, f"minus_{ref}_"), 4)]
        return cells

    ordered = sorted(top, key=lambda r: (r["ratio"], -num(r["mean_gain"])))
    return ["Exact top-N selection: mean G of kept tokens (nats); "
            f"all tokens {estimate(mg.get('value'), mg.get('ci'), 4)}; gain per keep = mean G / ratio",
            _table(headers, [top_row(r) for r in ordered]), ""]


def _share_lines(summary: Mapping[str, Any]) -> list[str]:
    """The learnable share sum D C / sum D, overall and per quartile of relative position."""
    share = summary.get("learnable_share")
    if not share:
        return []
    rows = [["all", str(share["n_tokens"]), fmt(share["value"], 4), fmt_ci(share["ci"], 4)]]
    rows += [[f"Q{q['quartile']} ({q['rel_pos'][0]:.0%}-{q['rel_pos'][1]:.0%})", str(q["n_tokens"]),
              fmt(q["value"], 4), fmt_ci(q["ci"], 4)] for q in share["by_position_quartile"]]
    return [f"Learnable share of the pair's disagreement: sum D C / sum D (exact, K={summary['run'].get('k')})",
            _table(["positions", "tokens", "share", "95% CI"], rows), ""]


def _group_lines(summary: Mapping[str, Any]) -> list[str]:
    """The group variant (when the run has one): per rule and budget, the whole bank's gain of one update on the
    kept set, and gain per kept token = that total / the number kept (a weight rule: every token, weighted)."""
    group = summary.get("group") or []
    if not group or "gain_per_kept" not in group[0]:
        return []
    rows = [[r["selector"], f"{r['ratio']:.0%}", str(r["n_kept"]), fmt(r["mean_gain_all"], 5),
             fmt(r["mean_gain_kept"], 5), fmt(r["gain_per_kept"], 4)] for r in group]
    return ["Group variant: one update on each rule's kept set; gain per kept token = total gain / tokens kept",
            _table(["rule", "budget", "kept", "mean G all", "mean G kept", "gain/kept token"], rows), ""]


def _paper_lines(summary: Mapping[str, Any]) -> list[str]:
    """The paper preset (release definitions) beside the project's numbers, its robustness, top-N and Table 6."""
    paper = summary.get("paper")
    if not paper:
        return []
    out = [f"Definitions side by side (protocol {paper['protocol']}: {paper['measures']})",
           *(f"  {d}" for d in paper["definitions"].values()),
           _table(["statistic", "paper (release)", "project"],
                  [[r["statistic"], fmt(r["paper"], 4), fmt(r["project"], 4)] for r in summary["side_by_side"]]),
           ""]
    rows = []
    for key, label in (("ols", "winsorised 1/99"), ("ols_winsor05", "winsorised 5/95"), ("ols_raw", "raw")):
        o = paper[key]
        rows.append([label, estimate(o["beta_L"], o["beta_L_ci"]), estimate(o["beta_I"], o["beta_I_ci"]),
                     fmt(o["r2_base"], 4), fmt(o["r2_plus_c"], 4), fmt(o["r2_decomposed"], 4), fmt(o["delta_r2"], 4)])
    out += ["Paper OLS of the relative gain (z-scored; Delta R^2 = decomposed - base)",
            _table(["gain", "beta_L [95% CI]", "beta_I [95% CI]", "R^2 base", "R^2 +C", "R^2 dec", "Delta R^2"], rows),
            ""]
    gk = paper.get("support_gap_by_k") or {}
    out += ["Paper per top-K (D = full-vocabulary KL; only C changes with K)",
            _table(["K", "beta_L", "beta_I", "Q3 support gap", "95% CI"],
                   [[k, fmt(v["beta_L"]), fmt(v["beta_I"]), fmt(gk.get(k, {}).get("gap"), 4),
                     fmt_ci(gk.get(k, {}).get("ci"), 4)] for k, v in (paper.get("ols_by_k") or {}).items()]), ""]
    top = [r for r in paper.get("top_n") or [] if r["K"] == paper.get("k") and r["ratio"] in (0.03, 0.05)]
    top.sort(key=lambda r: (r["ratio"], -num(r["mean_gain"])))
    out += ["Paper exact top-N (winsorised relative gain; ties to earlier positions)",
            _table(["selector", "ratio", "N", "mean G", "95% CI", "gain/keep", "Q3 frac"],
                   [[r["selector"], f"{r['ratio']:.0%}", str(r["n_keep"]), fmt(r["mean_gain"], 4),
                     fmt_ci((r["ci_low"], r["ci_high"]), 4), fmt(r["gain_per_keep"], 3), fmt(r["q3_frac"], 2)]
                    for r in top]), ""]
    audit = paper.get("support_proxies") or []
    if audit:
        out += ["Support-proxy audit (paper Table 6: C replaced by each proxy; percentile ranks)",
                _table(["proxy", "release", "beta_L", "beta_I", "Delta R^2", "Q3 gap D*c", "support gap", "matched"],
                       [[r["proxy"], r["release_name"], fmt(r["beta_L"]), fmt(r["beta_I"]), fmt(r["delta_r2"], 4),
                         fmt(r["gap_dl"], 4), fmt(r["support_gap"], 4), fmt(r["matched_gap"], 4)] for r in audit]),
                ""]
    return out


def format_report(summary: Mapping[str, Any]) -> str:
    """Plain-text report: run header, correlations, OLS, gaps, top-N, checks, notes and the verdict."""
    out = [*_header_lines(summary.get("run", {})), *_correlation_lines(summary), *_regression_lines(summary),
           *_top_n_lines(summary), *_share_lines(summary), *_group_lines(summary), *_paper_lines(summary)]
    ch = summary.get("checks") or []
    if ch:
        mark = {True: "PASS", False: "FAIL", None: "n/a"}
        out += ["Checks (pass = 95% CI above zero)",
                _table(["check", "result", "value", "95% CI"],
                       [[c["name"], mark[c["passed"]], fmt(c["value"], 4), fmt_ci(c["ci"], 4)] for c in ch]), ""]
    if summary.get("notes"):
        out += ["Notes:", *[f"  - {n}" for n in summary["notes"]], ""]
    out += ["Verdict: " + str(summary.get("verdict", ""))]
    return "\n".join(out)


def summary_tables(summary: Mapping[str, Any]) -> dict[str, pd.DataFrame]:
    """The summary's sections as DataFrames (for notebooks).

    Keys: correlations, ols, per_k, gaps, top_n, retrieval, checks, and the paper preset's side_by_side,
    paper_top_n, paper_support_proxies (empty when the summary has no paper section).
    """
    corr = pd.DataFrame.from_dict(summary.get("correlations") or {}, orient="index")
    corr.index.name = "score"
    ols = summary.get("ols") or {}
    ols_rows = [{"model": m, "feature": f, "beta": v["coef"], "ci_low": v["ci"][0], "ci_high": v["ci"][1],
                 "cluster_se": v["cluster_se"]} for m in ("base", "decomposed") for f, v in (ols.get(m) or {}).items()]
    gk = summary.get("support_gap_by_k") or {}
    per_k = []
    for k, v in (summary.get("ols_by_k") or {}).items():
        g = gk.get(k) or {}
        g_ci = g.get("ci") or [None, None]
        per_k.append({"K": int(k), **{key: v[key] for key in ("beta_L", "beta_I", "gap")},
                      "gap_ci_low": v["gap_ci"][0], "gap_ci_high": v["gap_ci"][1],
                      "support_gap": g.get("gap"), "support_gap_ci_low": g_ci[0], "support_gap_ci_high": g_ci[1]})
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
        "side_by_side": pd.DataFrame(summary.get("side_by_side") or []),
        "paper_top_n": pd.DataFrame((summary.get("paper") or {}).get("top_n") or []),
        "paper_support_proxies": pd.DataFrame((summary.get("paper") or {}).get("support_proxies") or []),
    }
