"""The `paper` preset's summary: the release's statistics beside the project's own, each named.

`summarize_paper(df)` computes, with the definitions of ``analysis.paper`` (the release's), the
OLS (beta_L, beta_I, R^2 base / "+C" / decomposed, Delta R^2; winsorised 1%/99%, with 5%/95% and raw
as robustness), the Q3 support gap and the matched gap (C re-normalised within Q3), the exact top-N
per K, robust gain statistics, and the support-proxy audit of the paper's Table 6
(`support_proxy_audit`). `side_by_side(summary)` pairs each with the project's number from
``analysis.report.summarize`` and names both definitions; `format_paper_lines` renders them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from analysis.bootstrap import DEFAULT_N_BOOT, bootstrap_mean_diff, can_bootstrap, percentile_ci, resample_weights
from analysis.io import available_ks, require_columns, with_k
from analysis.paper import (
    OUTCOMES,
    PAPER_RATIOS,
    PAPER_REQUIRED,
    paper_frame,
    paper_ols,
    paper_position,
    paper_top_n,
    q3_support_gap,
    release_gain_and_d,
    robust_gain_stats,
    sample_clusters,
)

# Table 6 proxies: project column -> the release's name (support_definition_robustness.py analyze_one).
SUPPORT_PROXIES: dict[str, str] = {
    "compat_mass": "Cmass_true",
    "overlap": "Coverlap",
    "jaccard": "topk_jaccard",
    "compat_mass_lower": "shared_teacher_topk_mass",
    "bhattacharyya": "CBC",
    "teacher_top1_in_student_topk": "reach_t1",
    "sampled_in_student_topk": "target_in_student_topk",
}
# What each protocol's gain measures (README and every summary say it). The manifest's "protocol_meaning"
# wins when present; these mirror diagnostics.diagnose.PROTOCOL_MEANING (not imported: it pulls in
# transformers; tests/analysis/test_analysis_paper.py holds them equal).
PROTOCOLS: dict[str, str] = {
    "single-step": "the gain at a token from one update on that token's own loss (fixed context, held-out "
                   "base-student rollouts)",
    "paper": "the gain at a token after full-token OPD trained on all tokens: latest checkpoint vs the base "
             "student, re-scored on the OPD run's own first rollouts (the paper's protocol)",
    "checkpoint": "the gain at a token between the base student and a given checkpoint (same contexts)",
}
DEFINITIONS: dict[str, str] = {
    "paper": "release: relative gain (KL_base - KL_after) / (KL_base + 1e-12), winsorised 1%/99% in the OLS and "
             "top-N; D = full-vocabulary forward KL; Q3 = H~ <= median, D~ >= median; support and matched gaps "
             "inside Q3 on C normalised within Q3, matched within each sample; R^2 decomposed minus base; "
             "pos = pos / (L - 1); clusters = samples",
    "project": "project: absolute gain KL_before - KL_after (nats), unwinsorised; D = union-top-K forward KL; "
               "Q3 = H~ < median, D~ >= median; matched gap over all tokens within each prompt on raw C; R^2 "
               "decomposed minus [H, pos, H_T]; pos = pos / L; clusters = prompts",
}


def has_paper_columns(df: pd.DataFrame) -> bool:
    """Whether `df` carries every column the paper preset needs."""
    return all(c in df.columns for c in PAPER_REQUIRED)


# ----------------------------------------------------------------------------- Table 6


def robust_rank(x: np.ndarray) -> np.ndarray:
    """Percentile rank (average ranks, pct) of the finite values; the rest get the ranks' median
    (support_definition_robustness.py robust_rank)."""
    x = np.asarray(x, np.float64)
    finite = np.isfinite(x)
    if not finite.any():
        return np.zeros(x.size)
    s = pd.Series(np.where(finite, x, np.nan))
    ranks = s.rank(method="average", pct=True)
    return ranks.fillna(ranks.median()).clip(0.0, 1.0).to_numpy(np.float64)


def _z_median(x: np.ndarray) -> np.ndarray:
    """z-score after filling non-finite values with the median (support_definition_robustness.py zscore)."""
    x = np.where(np.isfinite(x), np.asarray(x, np.float64), np.nan)
    x = np.where(np.isnan(x), np.nanmedian(x), x)
    sd = x.std()
    return np.zeros(x.size) if not np.isfinite(sd) or sd < 1e-12 else (x - x.mean()) / sd


def _ols_r2(y: np.ndarray, cols: Sequence[np.ndarray]) -> tuple[float, np.ndarray]:
    """R^2 and coefficients (without the intercept) of y on [1, cols] (support_definition_robustness.py ols)."""
    X = np.column_stack([np.ones(y.size), *cols])
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    ss_tot = float(np.square(y - y.mean()).sum())
    r2 = 1.0 - float(np.square(y - X @ beta).sum()) / ss_tot if ss_tot > 1e-12 else float("nan")
    return r2, beta[1:]


def support_proxy_audit(df: pd.DataFrame, *, k: int | None = None, n_boot: int = DEFAULT_N_BOOT,
                        seed: int = 0) -> pd.DataFrame:
    """Table 6: for each support proxy in place of C, the decomposed OLS and the Q3 high-minus-low gap.

    Per support_definition_robustness.py ``analyze_one`` and ``bootstrap_group_diff``: H, H^T, D (full-
    vocabulary forward KL) and the proxy are percentile ranks; z-scored OLS of the relative gain on
    [H, D*c, D*(1-c), pos, H^T] (r2_decomposed, beta_L, beta_I) against the base [H, D, H*D, pos, H^T];
    inside Q3 (ranks), mean G of the top quartile of D*c minus the bottom quartile (gap_dl, per-sample
    cluster CI). Columns support_gap / matched_gap add the build_section3_analysis.py
    ``q3_support_summary`` gaps on the proxy itself, normalised within Q3.
    """
    src = df if k is None or k == df.attrs.get("k") else with_k(df, k)
    require_columns(src, PAPER_REQUIRED, "support-proxy audit")
    g, d = release_gain_and_d(src)
    hn, dn, htn = (robust_rank(v) for v in (src["student_entropy"].to_numpy(), d, src["teacher_entropy"].to_numpy()))
    pos = paper_position(src["pos"].to_numpy(), src["resp_len"].to_numpy())
    yz = _z_median(g)
    base_r2, _ = _ols_r2(yz, [_z_median(v) for v in (hn, dn, hn * dn, pos, htn)])
    q3 = (hn <= np.median(hn)) & (dn >= np.median(dn))
    frame = paper_frame(src)
    rows = []
    for col, release_name in SUPPORT_PROXIES.items():
        if col not in src.columns or np.isfinite(src[col].to_numpy(np.float64)).sum() < 100:
            continue
        c = robust_rank(src[col].to_numpy())
        r2, beta = _ols_r2(yz, [_z_median(v) for v in (hn, dn * c, dn * (1.0 - c), pos, htn)])
        gap = _quartile_gap(g, dn * c, q3, src["seq_id"].to_numpy(), n_boot, seed)
        sec3 = q3_support_gap(frame, proxy="C" if col == "compat_mass" else col, n_boot=0)
        rows.append(dict(proxy=col, release_name=release_name, r2_base=base_r2, r2_decomposed=r2,
                         delta_r2=r2 - base_r2, beta_L=float(beta[1]), beta_I=float(beta[2]),
                         beta_gap=float(beta[1] - beta[2]), **gap, support_gap=sec3["gap"],
                         matched_gap=sec3.get("matched", {}).get("gap", float("nan"))))
    return pd.DataFrame(rows)


def _quartile_gap(g: np.ndarray, score: np.ndarray, q3: np.ndarray, seq: np.ndarray, n_boot: int,
                  seed: int) -> dict[str, Any]:
    """Inside Q3 (finite G): mean G (score >= Q75) - mean G (score <= Q25), per-sample cluster CI."""
    keep = q3 & np.isfinite(g) & np.isfinite(score)
    nan = float("nan")
    if keep.sum() < 2:
        return dict(gap_dl=nan, gap_dl_ci_low=nan, gap_dl_ci_high=nan, n_high=0, n_low=0)
    y, s = g[keep], score[keep]
    high, low = s >= np.quantile(s, 0.75), s <= np.quantile(s, 0.25)
    clusters = sample_clusters(pd.DataFrame({"seq_id": seq[keep]}))
    ci = (nan, nan)
    if can_bootstrap(clusters, n_boot)[0]:
        W = resample_weights(clusters.n_clusters, n_boot, seed)
        ci = percentile_ci(bootstrap_mean_diff(y, high, low, clusters, W))
    return dict(gap_dl=float(y[high].mean() - y[low].mean()), gap_dl_ci_low=ci[0], gap_dl_ci_high=ci[1],
                n_high=int(high.sum()), n_low=int(low.sum()))


# ----------------------------------------------------------------------------- the summary


def _ols_brief(o: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("outcome", "n", "beta_L", "beta_L_ci", "beta_I", "beta_I_ci", "gap", "gap_ci", "r2_base", "r2_plus_c",
            "r2_decomposed", "delta_r2", "delta_r2_ci", "delta_r2_plus_c")
    out = {key: o[key] for key in keys}
    out["coef"] = {m: o[m]["coef"] for m in ("base", "plus_c", "decomposed")}
    return out


def summarize_paper(df: pd.DataFrame, *, manifest: Mapping[str, Any] | None = None, n_boot: int = DEFAULT_N_BOOT,
                    seed: int = 0, ratios: Sequence[float] = PAPER_RATIOS) -> dict[str, Any]:
    """Every statistic of the paper preset on one token table (keys: see `format_paper_lines`)."""
    manifest = dict(manifest or {})
    base_k = manifest.get("k", df.attrs.get("k"))
    ks = ([int(base_k)] if base_k is not None else []) + [k for k in available_ks(df) if k != base_k]
    frame = paper_frame(df)
    if len(frame) < 3:
        raise ValueError(f"the paper preset needs at least 3 rows with a finite relative gain, H, D, C and position; "
                         f"found {len(frame)} of {len(df)}")
    notes: list[str] = []
    if len(frame) < len(df):
        notes.append(f"paper: dropped {len(df) - len(frame)} rows with a non-finite gain, H, D, C or position")
    kw = dict(n_boot=n_boot, seed=seed)
    ols = {name: _ols_brief(paper_ols(frame, outcome=col, **kw)) for name, col in OUTCOMES.items()}
    gap = q3_support_gap(frame, **kw)
    by_k_ols: dict[str, Any] = {}
    by_k_gap: dict[str, Any] = {}
    tops = []
    for k in ks:
        fk = frame if k == base_k else paper_frame(df, k=k)
        o = ols["winsor01"] if k == base_k else _ols_brief(paper_ols(fk, **kw))
        by_k_ols[str(k)] = {key: o[key] for key in ("beta_L", "beta_L_ci", "beta_I", "beta_I_ci", "gap", "gap_ci",
                                                    "r2_base", "r2_decomposed", "delta_r2")}
        g = gap if k == base_k else q3_support_gap(fk, **kw)
        by_k_gap[str(k)] = {"gap": g["gap"], "ci": g["ci"], "n_high": g["n_high"], "n_low": g["n_low"]}
        tops.append(paper_top_n(paper_frame(df, k=k, normalise_first=True), ratios=ratios, k=k, **kw))
    for part in (gap, *(o for o in ols.values())):
        notes.extend(n for n in part.get("notes", []) if n not in notes)
    audit = support_proxy_audit(df, n_boot=n_boot, seed=seed)
    protocol = str(manifest.get("protocol") or manifest.get("mode") or "single-step")
    return {
        "preset": "paper", "protocol": protocol,
        "measures": str(manifest.get("protocol_meaning") or PROTOCOLS.get(protocol, protocol)),
        "definitions": dict(DEFINITIONS), "k": base_k, "n_tokens": len(frame), "notes": notes,
        "gain_stats": robust_gain_stats(frame),
        "ols": ols["winsor01"], "ols_winsor05": ols["winsor05"], "ols_raw": ols["raw"], "ols_by_k": by_k_ols,
        "support_gap": {key: gap[key] for key in ("gap", "ci", "n_high", "n_low", "n_q3")},
        "support_gap_by_k": by_k_gap,
        "matched_gap": gap.get("matched", {"pairs": 0, "gap": float("nan"), "median": float("nan")}),
        "top_n": pd.concat(tops, ignore_index=True).to_dict("records") if tops else [],
        "support_proxies": audit.to_dict("records"),
    }


def side_by_side(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows (statistic, paper, project): each headline number under both definitions."""
    paper = summary.get("paper") or {}
    ols_p, ols_o = paper.get("ols") or {}, summary.get("ols") or {}
    rows = [
        ("beta_L", ols_p.get("beta_L"), ols_o.get("beta_L")),
        ("beta_I", ols_p.get("beta_I"), ols_o.get("beta_I")),
        ("beta_L - beta_I", ols_p.get("gap"), ols_o.get("gap")),
        ("R^2 base", ols_p.get("r2_base"), ols_o.get("r2_base")),
        ("R^2 decomposed", ols_p.get("r2_decomposed"), ols_o.get("r2_decomposed")),
        ("Delta R^2 (paper: dec - base; project: dec - controls)", ols_p.get("delta_r2"),
         ols_o.get("incremental_r2")),
        ("Q3 support gap (paper: relative gain; project: nats)", (paper.get("support_gap") or {}).get("gap"),
         (summary.get("support_gap") or {}).get("gap")),
        ("matched gap (paper: in Q3, relative; project: all tokens, nats)", (paper.get("matched_gap") or {}).get("gap"),
         (summary.get("matched_gap") or {}).get("gap")),
    ]
    return [{"statistic": s, "paper": p, "project": o} for s, p, o in rows]
