"""analysis.ranks: Spearman/Kendall known answers; the weighted-rank bootstrap against scipy on copied rows."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from analysis.bootstrap import clusters_of, resample_indices, resample_weights
from analysis.ranks import (
    bootstrap_kendall,
    bootstrap_partial_spearman,
    bootstrap_spearman,
    kendall,
    partial_spearman,
    spearman,
)


def test_spearman_known_answers():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -np.exp(x)) == pytest.approx(-1.0)
    # hand computation: ranks of y = [2, 1, 4, 3, 5]; d = [-1, 1, -1, 1, 0]; rho = 1 - 6*4/(5*24) = 0.8
    assert spearman(x, np.array([20.0, 10.0, 40.0, 30.0, 50.0])) == pytest.approx(0.8)
    # ties: average ranks, same as scipy
    y = np.array([1.0, 1.0, 2.0, 2.0, 3.0])
    assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic)
    assert np.isnan(spearman(x, np.ones(5)))


def test_kendall_known_answers():
    x = np.array([1.0, 2.0, 3.0, 4.0])
    # one discordant pair of six: tau = (5 - 1) / 6
    assert kendall(x, np.array([1.0, 3.0, 2.0, 4.0])) == pytest.approx(4 / 6)
    assert np.isnan(kendall(x, np.zeros(4)))


def test_partial_spearman_is_residual_correlation():
    rng = np.random.default_rng(0)
    z = rng.normal(size=500)
    x = z + rng.normal(size=500)
    y = z + rng.normal(size=500)
    rx, ry, rz = (scipy.stats.rankdata(v) for v in (x, y, z))
    res = lambda a: a - np.polyval(np.polyfit(rz, a, 1), rz)  # noqa: E731
    assert partial_spearman(x, y, z) == pytest.approx(np.corrcoef(res(rx), res(ry))[0, 1])
    assert abs(partial_spearman(x, y, z)) < 0.15 < spearman(x, y)  # correlated only through z


def test_weighted_bootstrap_equals_scipy_on_copied_rows(small_tokens):
    cl = clusters_of(small_tokens)
    W = resample_weights(cl.n_clusters, 6, seed=5)
    y = small_tokens["gain"].to_numpy()
    scores = {n: small_tokens[f"score_{n}"].to_numpy() for n in ("teachability", "q3_compat", "random", "kl")}
    fast = bootstrap_spearman(y, scores, cl, W)
    part = bootstrap_partial_spearman(y, scores["kl"], scores["teachability"], cl, W)
    kend = bootstrap_kendall(y, {"kl": scores["kl"]}, cl, W[:2])
    for b in range(6):
        idx = resample_indices(cl, W[b])
        for name, s in scores.items():  # includes -inf ties (q3_compat) and duplicated rows
            assert fast[name][b] == pytest.approx(scipy.stats.spearmanr(s[idx], y[idx]).statistic, abs=1e-12)
        expected = partial_spearman(y[idx], scores["kl"][idx], scores["teachability"][idx])
        assert part[b] == pytest.approx(expected, abs=1e-12)
    for b in range(2):
        idx = resample_indices(cl, W[b])
        assert kend["kl"][b] == pytest.approx(scipy.stats.kendalltau(scores["kl"][idx], y[idx]).statistic)
