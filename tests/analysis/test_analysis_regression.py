"""analysis.regression: planted coefficients, the moment bootstrap against lstsq, CI coverage, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from analysis.bootstrap import clusters_of, resample_indices, resample_weights
from analysis.io import validate_tokens
from analysis.regression import MODELS, base_residuals, bootstrap_standardized, design_features, fit_teachability_ols
from analysis.synthetic import synthetic_tokens


def _z(a: np.ndarray) -> np.ndarray:
    return (a - a.mean(axis=0)) / a.std(axis=0)


def _lstsq_std(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Plain reference: lstsq of z(y) on [1, z(X)]; returns the slopes."""
    A = np.column_stack([np.ones(len(y)), _z(X)])
    return np.linalg.lstsq(A, _z(y), rcond=None)[0][1:]


def test_exact_planted_coefficients():
    """No noise: G = 0.05 (2 D^L + 0.5 D^I), so the decomposed fit is exact and beta = b sd(x) / sd(G)."""
    df = validate_tokens(synthetic_tokens(n_prompts=30, b_l=2.0, b_i=0.5, b_h=0.0, prompt_sd=0.0, slope_sd=0.0,
                                          noise_sd=0.0, extra_k=(), seed=1))
    fit = fit_teachability_ols(df, n_boot=50)
    X = design_features(df)
    sd_y = df["gain"].std(ddof=0)
    assert fit.decomposed.r2 == pytest.approx(1.0, abs=1e-9)
    assert fit.beta_L == pytest.approx(0.05 * 2.0 * X["DL"].std(ddof=0) / sd_y, rel=1e-6)
    assert fit.beta_I == pytest.approx(0.05 * 0.5 * X["DI"].std(ddof=0) / sd_y, rel=1e-6)
    assert abs(fit.decomposed.coef["H"]) < 1e-6 and abs(fit.decomposed.coef["pos"]) < 1e-6
    assert fit.gap == pytest.approx(fit.beta_L - fit.beta_I)
    assert fit.incremental_r2 == pytest.approx(1.0 - fit.controls_r2)


def test_point_fit_matches_lstsq(small_tokens):
    fit = fit_teachability_ols(small_tokens, n_boot=0)
    X = design_features(small_tokens)
    y = small_tokens["gain"].to_numpy()
    for model, result in (("base", fit.base), ("decomposed", fit.decomposed)):
        ref = _lstsq_std(X[list(MODELS[model])].to_numpy(), y)
        np.testing.assert_allclose([result.coef[f] for f in MODELS[model]], ref, atol=1e-10)
    assert any("n_boot=0" in n for n in fit.notes) and np.isnan(fit.gap_ci[0])


def test_moment_bootstrap_equals_explicit_lstsq(small_tokens):
    cl = clusters_of(small_tokens)
    W = resample_weights(cl.n_clusters, 4, seed=3)
    feats = ["H", "DL", "DI", "pos", "HT"]
    X = design_features(small_tokens)[feats].to_numpy()
    y = small_tokens["gain"].to_numpy()
    betas, r2 = bootstrap_standardized(X, y, {"dec": list(range(5))}, cl, W)["dec"]
    for b in range(4):
        idx = resample_indices(cl, W[b])  # rows of a cluster drawn w times appear w times
        np.testing.assert_allclose(betas[b], _lstsq_std(X[idx], y[idx]), atol=1e-9)
        pred = np.column_stack([np.ones(len(idx)), _z(X[idx])]) @ np.concatenate([[0.0], betas[b]])
        assert r2[b] == pytest.approx(1 - ((_z(y[idx]) - pred) ** 2).sum() / len(idx), abs=1e-9)


def test_planted_coefficients_recovered_and_ci_coverage():
    """Truth from a 4000-prompt sample; 20 seeded 40-prompt tables: the CI covers it in >= 80% of them."""
    big = validate_tokens(synthetic_tokens(n_prompts=4000, seqs_per_prompt=1, min_len=30, max_len=30, extra_k=(),
                                           seed=10_000))
    truth = fit_teachability_ols(big, n_boot=0)
    assert truth.beta_L > truth.beta_I > 0  # b_l = 1.0 > b_i = 0.5 is recovered at scale
    hits_l = hits_gap = 0
    for rep in range(20):
        df = validate_tokens(synthetic_tokens(n_prompts=40, seqs_per_prompt=1, min_len=30, max_len=30, extra_k=(),
                                              seed=rep))
        fit = fit_teachability_ols(df, n_boot=200, seed=rep)
        hits_l += fit.beta_L_ci[0] <= truth.beta_L <= fit.beta_L_ci[1]
        hits_gap += fit.gap_ci[0] <= truth.gap <= fit.gap_ci[1]
    assert hits_l >= 16, hits_l
    assert hits_gap >= 16, hits_gap


def test_bad_input(small_tokens):
    one = small_tokens[small_tokens["prompt_id"] == 0]
    fit = fit_teachability_ols(one, n_boot=100)
    assert np.isnan(fit.beta_L_ci).all() and any("only 1 cluster" in n for n in fit.notes)
    const = small_tokens.assign(norm_teacher_entropy=0.0)
    fit = fit_teachability_ols(const, n_boot=20)
    assert np.isnan(fit.decomposed.coef["HT"]) and any("HT" in n for n in fit.notes)
    assert np.isfinite(fit.beta_L)
    nan = small_tokens.copy()
    nan.loc[:4, "gain"] = np.nan
    fit = fit_teachability_ols(nan, n_boot=0)
    assert any("dropped 5 rows" in n for n in fit.notes)
    with pytest.raises(ValueError, match="constant"):
        fit_teachability_ols(small_tokens.assign(gain=1.0), n_boot=0)
    with pytest.raises(ValueError, match="norm_compat"):
        fit_teachability_ols(small_tokens.drop(columns=["norm_compat"]), n_boot=0)


def test_base_residuals(small_tokens):
    r = base_residuals(small_tokens)
    assert r.shape == (len(small_tokens),)
    assert abs(r.mean()) < 1e-10
    # residuals are orthogonal to the base features
    X = design_features(small_tokens)[list(MODELS["base"])].to_numpy()
    np.testing.assert_allclose(_z(X).T @ r / len(r), 0.0, atol=1e-10)
