"""The paper's diagnostic definitions (the `paper` preset), reimplemented from the public release.

The release (repository ckjsuperhh/taopd-baseline, folder ``TA-OPD/``) analyses a fixed-context
table with its own definitions, which differ from the project's own (``analysis.stats`` /
``analysis.regression``). Each is reimplemented here from its definition; the docstrings cite the
release file and the function (and, for build_section3_analysis.py and matched_fixed_context_topn.py,
the lines) they reproduce (release commit 6a2da067):

* gain: relative, (KL_base - KL_after) / (KL_base + 1e-12) of the full-vocabulary forward KL
  (``slime_ta_opd/tools/eval_fixed_context_bank.py`` ``_merge_gain``); winsorised at 1%/99% (5%/95% as
  robustness) in the OLS and the exact top-N (``tools/build_section3_analysis.py`` ``winsorize``
  L116-120, ``load_dataset`` L279-280; ``tools/matched_fixed_context_topn.py`` ``winsor`` L36-38,
  ``prepare`` L43); figures use asinh.
* H, H^T, D: full-vocabulary student entropy, teacher entropy and FORWARD KL(T||S) of the base student
  (``build_section3_analysis.py`` ``load_dataset`` L263-266); C: teacher mass on the student's top-K (``Cmass_true``).
  Each is robust-normalised clip((x - Q05) / (Q95 - Q05), 0, 1) over the table (``robust_norm`` L99-105,
  applied L270-273).
* position: tok_pos / max(L - 1, 1), L the (cut) response length (``eval_fixed_context_bank.py`` ``_score_sample``).
* Q3: H~ <= median(H~) and D~ >= median(D~) (``build_section3_analysis.py`` ``load_dataset`` L278).
* OLS: the outcome and every feature z-scored (population sd), least squares with an intercept; models
  base [H, D, H*D, pos, H^T], "+C" [H, D, H*D, C, pos, H^T], decomposed [H, D^L, D^I, pos, H^T]
  (``standardized_regressions`` L348-383, ``ols`` L133-139); Delta R^2 = decomposed minus base
  (``tools/analyze_fixed_context_gain.py`` ``_regression_summary``).
* support gap: inside Q3, C re-normalised within Q3, mean G (C~ >= 2/3-quantile) minus mean G
  (C~ <= 1/3-quantile) (``build_section3_analysis.py`` ``q3_support_summary`` L386-395, ``cluster_bootstrap_diff``
  L142-194); matched gap: inside Q3,
  within each sample, high C~ (> the sample's median) matched to its nearest low-C~ token on (H~, D~, pos)
  (``within_prompt_matching`` L197-225). Both on the raw (not winsorised) relative gain.
* exact top-N: N = max(1, round(rho n)), the N highest scores (``matched_fixed_context_topn.py``
  ``select_topn`` L78-81, ``summarize_selection`` L84-107), mean winsorised G and gain per keep = mean / (N / n).

Where the release is silent or not reproducible the choice is stated where it is made: ties in the
top-N go to the earlier row (seq_id, pos) (pandas' default sort leaves them to the platform); the
random selector is seeded without Python's salted ``hash``; prompt-cluster bootstrap intervals come
from ``analysis.bootstrap`` with the release's cluster, the sample (``seq_id``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from analysis.bootstrap import (
    DEFAULT_N_BOOT,
    Clusters,
    bootstrap_mean,
    bootstrap_mean_diff,
    can_bootstrap,
    noted_resample_weights,
    percentile_ci,
    resample_weights,
)
from analysis.io import require_columns, with_k
from analysis.regression import bootstrap_standardized

RELATIVE_EPS = 1e-12  # eval_fixed_context_bank.py _merge_gain: eps in the relative gain's denominator
NORM_QUANTILES = (0.05, 0.95)  # build_section3_analysis.py robust_norm L99
PAPER_RATIOS: tuple[float, ...] = (0.01, 0.03, 0.05, 0.10)  # matched_fixed_context_topn.py main (--ratios)
# Columns of tokens.parquet the paper preset needs (the K-dependent C may come from a _k{K} column).
PAPER_REQUIRED: tuple[str, ...] = (
    "seq_id", "pos", "resp_len", "kl_forward_before", "kl_forward_after", "kl_forward",
    "student_entropy", "teacher_entropy", "compat_mass",
)
# The OLS models: name -> features (build_section3_analysis.py standardized_regressions L350-354).
PAPER_MODELS: dict[str, tuple[str, ...]] = {
    "base": ("Hn", "Dn", "HxD", "pos_norm", "HTn"),
    "plus_c": ("Hn", "Dn", "HxD", "Cn", "pos_norm", "HTn"),
    "decomposed": ("Hn", "DL", "DI", "pos_norm", "HTn"),
}
# Outcomes of the OLS: the 1%/99% winsorised relative gain (primary), 5%/95% and raw (robustness).
OUTCOMES: dict[str, str] = {"winsor01": "gain_w01", "winsor05": "gain_w05", "raw": "gain_rel"}


# ----------------------------------------------------------------------------- the definitions


def relative_gain(kl_before: np.ndarray, kl_after: np.ndarray) -> np.ndarray:
    """(KL_base - KL_after) / (KL_base + 1e-12) (eval_fixed_context_bank.py _merge_gain); inf -> NaN."""
    before = np.asarray(kl_before, np.float64)
    with np.errstate(invalid="ignore"):  # inf - inf: a non-finite KL gives NaN, as pandas would
        out = (before - np.asarray(kl_after, np.float64)) / (before + RELATIVE_EPS)
    return np.where(np.isfinite(out), out, np.nan)


def _quantile(x: np.ndarray, q: float) -> float:
    """Linear-interpolation quantile of the finite values (pandas' Series.quantile); NaN when none."""
    finite = x[np.isfinite(x)]
    return float(np.quantile(finite, q)) if finite.size else float("nan")


def robust_norm(x: np.ndarray, q_low: float = NORM_QUANTILES[0], q_high: float = NORM_QUANTILES[1]) -> np.ndarray:
    """clip((x - Q_low) / (Q_high - Q_low), 0, 1); non-finite x -> 0; all 0 when Q_high - Q_low < 1e-12.

    build_section3_analysis.py robust_norm L99-105 (= analyze_fixed_context_gain.py _norm,
    matched_fixed_context_topn.py norm L27-33;
   ). Quantiles skip non-finite values.
    """
    x = np.asarray(x, np.float64)
    lo, hi = _quantile(x, q_low), _quantile(x, q_high)
    if not (np.isfinite(lo) and np.isfinite(hi)) or abs(hi - lo) < 1e-12:
        return np.zeros(x.size)
    out = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return np.where(np.isfinite(x), out, 0.0)


def winsorize(x: np.ndarray, q: float = 0.01) -> np.ndarray:
    """x clipped to [Q_q, Q_(1-q)] of its finite values; non-finite -> NaN.

    build_section3_analysis.py winsorize L116-120 (= matched_fixed_context_topn.py winsor L36-38).
    """
    x = np.where(np.isfinite(x), np.asarray(x, np.float64), np.nan)
    return np.clip(x, _quantile(x, q), _quantile(x, 1.0 - q))


def zscore(x: np.ndarray) -> np.ndarray:
    """(x - mean) / population sd; all 0 when sd < 1e-12 (build_section3_analysis.py zscore L108-113)."""
    x = np.asarray(x, np.float64)
    sd = x.std()
    return np.zeros(x.size) if not np.isfinite(sd) or sd < 1e-12 else (x - x.mean()) / sd


def paper_position(pos: np.ndarray, resp_len: np.ndarray) -> np.ndarray:
    """tok_pos / max(L - 1, 1) (eval_fixed_context_bank.py _score_sample); the project's rel_pos is pos / L."""
    return np.asarray(pos, np.float64) / np.maximum(np.asarray(resp_len, np.float64) - 1.0, 1.0)


def release_gain_and_d(src: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """[n] relative gain and [n] full-vocabulary forward KL of the base student: the table's release-definition
    columns ``gain_rel_paper`` / ``disagreement_full`` (written by `taopd diagnose`) when present, else the
    same definitions computed here from ``kl_forward_before/after`` and ``kl_forward``."""
    if "gain_rel_paper" in src.columns:
        gain = src["gain_rel_paper"].to_numpy(np.float64)
        gain = np.where(np.isfinite(gain), gain, np.nan)
    else:
        gain = relative_gain(src["kl_forward_before"].to_numpy(), src["kl_forward_after"].to_numpy())
    d = src["disagreement_full" if "disagreement_full" in src.columns else "kl_forward"].to_numpy(np.float64)
    return gain, d


def paper_frame(df: pd.DataFrame, *, k: int | None = None, normalise_first: bool = False) -> pd.DataFrame:
    """The release's analysis table from a ``tokens.parquet`` (at top-K `k` for C; default the base K).

    Columns: seq_id, pos, prompt_id (when present), gain_rel, gain_w01, gain_w05, H, HT, D, C, pos_norm,
    Hn, HTn, Dn, Cn, HxD, DL, DI, q3, and the raw support proxies of that K.
    `normalise_first=False` follows build_section3_analysis.py load_dataset L267-280: rows with a non-finite H, D,
    C, G or position are dropped, then the signals are normalised and G winsorised. `normalise_first=True`
    follows matched_fixed_context_topn.py prepare L41-62: normalise and winsorise over every row, then drop the
    rows whose G is not finite (the two differ only when some gain is NaN).
    """
    src = df if k is None or k == df.attrs.get("k") else with_k(df, k)
    require_columns(src, PAPER_REQUIRED, "paper definitions")
    f = pd.DataFrame({"seq_id": src["seq_id"].to_numpy(), "pos": src["pos"].to_numpy()})
    if "prompt_id" in src.columns:
        f["prompt_id"] = src["prompt_id"].to_numpy()
    f["gain_rel"], d = release_gain_and_d(src)
    signals = {"H": src["student_entropy"], "HT": src["teacher_entropy"], "D": d, "C": src["compat_mass"]}
    for name, values in signals.items():
        v = np.asarray(values, np.float64)
        f[name] = np.where(np.isfinite(v), v, np.nan)
    f["pos_norm"] = paper_position(src["pos"].to_numpy(), src["resp_len"].to_numpy())
    for proxy in ("compat_mass_lower", "overlap", "jaccard", "bhattacharyya", "teacher_top1_in_student_topk",
                  "sampled_in_student_topk"):
        if proxy in src.columns:
            f[proxy] = src[proxy].to_numpy(np.float64)
    finite = np.isfinite(f[["gain_rel", "H", "D", "C", "pos_norm"]].to_numpy()).all(axis=1)
    if not finite.any():
        raise ValueError(f"paper definitions: no row of {len(f)} has a finite relative gain (kl_forward_before/after), "
                         "student entropy, kl_forward, compat_mass and position")
    if normalise_first:
        f = _normalise(f)
        return f.loc[np.isfinite(f["gain_rel"].to_numpy())].reset_index(drop=True)
    return _normalise(f.loc[finite].reset_index(drop=True))


def _normalise(f: pd.DataFrame) -> pd.DataFrame:
    """Normalised signals, products, Q3, winsorised gains (build_section3_analysis.py load_dataset L270-280)."""
    for name in ("H", "HT", "D", "C"):
        f[f"{name}n"] = robust_norm(f[name].to_numpy())
    f["HxD"] = f["Hn"] * f["Dn"]
    f["DL"] = f["Dn"] * f["Cn"]
    f["DI"] = f["Dn"] * (1.0 - f["Cn"])
    f["q3"] = (f["Hn"] <= np.quantile(f["Hn"], 0.5)) & (f["Dn"] >= np.quantile(f["Dn"], 0.5))
    f["gain_w01"] = winsorize(f["gain_rel"].to_numpy(), 0.01)
    f["gain_w05"] = winsorize(f["gain_rel"].to_numpy(), 0.05)
    return f


def sample_clusters(frame: pd.DataFrame) -> Clusters:
    """The release's bootstrap cluster: one response (``sample_ordinal`` there, ``seq_id`` here)."""
    codes, uniques = pd.factorize(frame["seq_id"], sort=False)
    return Clusters(codes=codes.astype(np.int64), n_clusters=len(uniques), column="seq_id")


# ----------------------------------------------------------------------------- OLS


def standardized_ols(y: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, float]:
    """Least squares of z(y) on [1, z(X)] (build_section3_analysis.py ols L133-139,
    standardized_regressions L362-369): (betas without
    the intercept, R^2). A constant column's z is 0 and its least-norm coefficient 0."""
    Z = np.column_stack([np.ones(len(y)), *(zscore(X[:, j]) for j in range(X.shape[1]))])
    yz = zscore(y)
    beta, *_ = np.linalg.lstsq(Z, yz, rcond=None)
    ss_tot = float(np.square(yz - yz.mean()).sum())
    r2 = 1.0 - float(np.square(yz - Z @ beta).sum()) / ss_tot if ss_tot > 1e-12 else 0.0
    return beta[1:], r2


def paper_ols(frame: pd.DataFrame, *, outcome: str = "gain_w01", n_boot: int = DEFAULT_N_BOOT,
              seed: int = 0) -> dict[str, Any]:
    """The three standardised OLS models of `outcome` (build_section3_analysis.py
    standardized_regressions L348-383).

    Returns coefficients per model, R^2 of each, delta_r2 = decomposed - base, delta_r2_plus_c =
    "+C" - base, beta_L / beta_I (the decomposed model's D^L and D^I) and their gap, each with a
    per-sample cluster-bootstrap 95% interval (``analysis.regression.bootstrap_standardized``).
    """
    notes: list[str] = []
    y = frame[outcome].to_numpy(np.float64)
    feats = sorted({f for m in PAPER_MODELS.values() for f in m})
    X = frame[feats].to_numpy(np.float64)
    out: dict[str, Any] = {"outcome": outcome, "n": len(frame), "notes": notes}
    for model, cols in PAPER_MODELS.items():
        beta, r2 = standardized_ols(y, X[:, [feats.index(c) for c in cols]])
        out[model] = {"coef": dict(zip(cols, beta.tolist())), "r2": r2}
    dec = out["decomposed"]["coef"]
    out.update(beta_L=dec["DL"], beta_I=dec["DI"], gap=dec["DL"] - dec["DI"], r2_base=out["base"]["r2"],
               r2_plus_c=out["plus_c"]["r2"], r2_decomposed=out["decomposed"]["r2"])
    out["delta_r2"] = out["r2_decomposed"] - out["r2_base"]
    out["delta_r2_plus_c"] = out["r2_plus_c"] - out["r2_base"]
    nan2 = (float("nan"), float("nan"))
    out.update(beta_L_ci=nan2, beta_I_ci=nan2, gap_ci=nan2, delta_r2_ci=nan2)
    W = noted_resample_weights(sample_clusters(frame), n_boot, seed, notes, "paper OLS")
    if W is not None:
        idx = {m: [feats.index(c) for c in cols] for m, cols in PAPER_MODELS.items()}
        boots = bootstrap_standardized(X, y, idx, sample_clusters(frame), W)
        b_dec = boots["decomposed"][0]
        jl, ji = PAPER_MODELS["decomposed"].index("DL"), PAPER_MODELS["decomposed"].index("DI")
        out.update(beta_L_ci=percentile_ci(b_dec[:, jl]), beta_I_ci=percentile_ci(b_dec[:, ji]),
                   gap_ci=percentile_ci(b_dec[:, jl] - b_dec[:, ji]),
                   delta_r2_ci=percentile_ci(boots["decomposed"][1] - boots["base"][1]))
    return out


# ----------------------------------------------------------------------------- support and matched gaps


def q3_support_gap(frame: pd.DataFrame, *, proxy: str = "C", outcome: str = "gain_rel",
                   n_boot: int = DEFAULT_N_BOOT, seed: int = 0) -> dict[str, Any]:
    """Inside Q3, `proxy` re-normalised within Q3; mean G (>= its 2/3-quantile) - mean G (<= 1/3-quantile).

    build_section3_analysis.py ``q3_support_summary`` L386-395 and ``cluster_bootstrap_diff`` L142-194 (
    thresholds fixed, per-sample cluster bootstrap). Also returns the matched gap on the same proxy.
    """
    notes: list[str] = []
    q3 = frame.loc[frame["q3"].to_numpy(bool)].reset_index(drop=True)
    nan = float("nan")
    out: dict[str, Any] = {"proxy": proxy, "n_q3": len(q3), "gap": nan, "ci": (nan, nan), "n_high": 0, "n_low": 0,
                           "notes": notes}
    if len(q3) < 2:
        notes.append(f"paper support gap: {len(q3)} token(s) in Q3; undefined")
        return out
    c = robust_norm(q3[proxy].to_numpy())
    y = q3[outcome].to_numpy(np.float64)
    low, high = c <= np.quantile(c, 1 / 3), c >= np.quantile(c, 2 / 3)
    out.update(gap=float(y[high].mean() - y[low].mean()), mean_high=float(y[high].mean()),
               mean_low=float(y[low].mean()), n_high=int(high.sum()), n_low=int(low.sum()))
    clusters = sample_clusters(q3)
    W = noted_resample_weights(clusters, n_boot, seed, notes, "paper support gap")
    if W is not None:
        out["ci"] = percentile_ci(bootstrap_mean_diff(y, high, low, clusters, W))
    out["matched"] = matched_gap_within_samples(q3.assign(_c=c), "_c", outcome=outcome)
    return out


def matched_gap_within_samples(q3: pd.DataFrame, score: str, *, outcome: str = "gain_rel",
                               controls: Sequence[str] = ("Hn", "Dn", "pos_norm")) -> dict[str, Any]:
    """Within each sample: tokens with `score` > the sample's median matched to the nearest (squared
    Euclidean on `controls`, first on ties) token at or below it; mean and median of G(high) - G(match).

    build_section3_analysis.py ``within_prompt_matching`` L197-225; samples with < 2 rows are skipped.
    """
    s = q3[score].to_numpy(np.float64)
    y = q3[outcome].to_numpy(np.float64)
    F = q3[list(controls)].to_numpy(np.float64)
    diffs: list[np.ndarray] = []
    for rows in q3.groupby("seq_id", sort=True).indices.values():
        if rows.size < 2:
            continue
        above = s[rows] > np.median(s[rows])
        hi, lo = rows[above], rows[~above]
        if hi.size == 0 or lo.size == 0:
            continue
        dist = ((F[hi, None, :] - F[None, lo, :]) ** 2).sum(axis=2)  # [n_hi, n_lo]
        diffs.append(y[hi] - y[lo[np.argmin(dist, axis=1)]])
    d = np.concatenate(diffs) if diffs else np.empty(0)
    return {"pairs": int(d.size), "gap": float(d.mean()) if d.size else float("nan"),
            "median": float(np.median(d)) if d.size else float("nan")}


# ----------------------------------------------------------------------------- exact top-N


def paper_selector_scores(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Selector name -> score (matched_fixed_context_topn.py prepare L49-58 and main's
    selectors, project names), plus the
    Q3 + low-C and Q3 + low-D^L selectors of the paper's Table 2 / Figure 3B ranked the same way
    (Q3 first: 2 * [Q3] + score)."""
    h, d, c = (frame[n].to_numpy(np.float64) for n in ("Hn", "Dn", "Cn"))
    dl, di = d * c, d * (1.0 - c)
    q3 = frame["q3"].to_numpy(bool).astype(np.float64) * 2.0
    return {
        "teachability": dl, "kl": d, "tip": h + d - h * d, "teachability_entropy": h + dl - h * dl,
        "entropy": h, "compat": c, "incompatible": di, "q3_compat": q3 + c, "q3_teachability": q3 + dl,
        "q3_kl": q3 + d, "q3_low_compat": q3 + (1.0 - c), "q3_low_teachability": q3 + (1.0 - dl),
    }


def n_keep_paper(n: int, ratio: float) -> int:
    """max(1, round(n * ratio)) with Python's round-half-to-even (matched_fixed_context_topn.py L85)."""
    return max(1, int(round(n * ratio)))


def top_n_rows(score: np.ndarray, n_keep: int) -> np.ndarray:
    """Row indices of the `n_keep` highest scores; ties to the earlier row, i.e. by (score, -position)."""
    return np.lexsort((np.arange(score.size), -score))[:n_keep]


def paper_top_n(frame: pd.DataFrame, *, ratios: Sequence[float] = PAPER_RATIOS, k: int = 0,
                n_boot: int = DEFAULT_N_BOOT, seed: int = 0, outcome: str = "gain_w01") -> pd.DataFrame:
    """Exact top-N of every paper selector at each ratio: mean G, per-sample cluster CI, gain per keep.

    `frame` is ``paper_frame(..., normalise_first=True)`` (matched_fixed_context_topn.py prepare
    L41-62, select_topn L78-81, summarize_selection L84-107).
    The random selector draws N rows without replacement, seeded by (seed, K, ratio).
    """
    y = frame[outcome].to_numpy(np.float64)
    scores = paper_selector_scores(frame)
    clusters = sample_clusters(frame)
    W = resample_weights(clusters.n_clusters, n_boot, seed) if can_bootstrap(clusters, n_boot)[0] else None
    rows = []
    for ratio in ratios:
        n = n_keep_paper(len(frame), ratio)
        rng = np.random.default_rng(seed + k * 1000 + int(ratio * 100000))
        picks = {name: top_n_rows(s, n) for name, s in scores.items()}
        picks["random"] = rng.choice(len(frame), size=n, replace=False)
        for name, idx in picks.items():
            mask = np.zeros(len(frame), bool)
            mask[idx] = True
            mean = float(y[idx].mean())
            ci = percentile_ci(bootstrap_mean(y, mask, clusters, W)) if W is not None else (np.nan, np.nan)
            rows.append(dict(K=k, selector=name, ratio=float(ratio), n_tokens=len(frame), n_keep=n,
                             mean_gain=mean, ci_low=ci[0], ci_high=ci[1], gain_per_keep=mean / (n / len(frame)),
                             q3_frac=float(frame["q3"].to_numpy(bool)[idx].mean())))
    return pd.DataFrame(rows)


def robust_gain_stats(frame: pd.DataFrame) -> dict[str, float]:
    """Raw mean, median, 5/95 trimmed mean and 1/99, 5/95 winsorised means of the relative gain
    (build_section3_analysis.py robust_gain_table L284-305)."""
    x = frame["gain_rel"].to_numpy(np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return dict.fromkeys(("mean", "median", "trimmed_mean_5_95", "winsor_mean_1_99", "winsor_mean_5_95"),
                             float("nan"))
    lo, hi = np.quantile(x, [0.05, 0.95])
    return {"mean": float(x.mean()), "median": float(np.median(x)),
            "trimmed_mean_5_95": float(x[(x >= lo) & (x <= hi)].mean()),
            "winsor_mean_1_99": float(winsorize(x, 0.01).mean()), "winsor_mean_5_95": float(winsorize(x, 0.05).mean())}
