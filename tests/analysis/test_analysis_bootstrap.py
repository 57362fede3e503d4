"""analysis.bootstrap: resample weights, percentile intervals, the weighted mean against explicit resampling."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.bootstrap import (
    bootstrap_mean,
    can_bootstrap,
    cluster_sums,
    clusters_of,
    percentile_ci,
    resample_indices,
    resample_weights,
)


def test_weights_are_cluster_draws():
    W = resample_weights(7, 50, seed=1)
    assert W.shape == (50, 7)
    np.testing.assert_array_equal(W.sum(axis=1), 7)
    np.testing.assert_array_equal(W, resample_weights(7, 50, seed=1))  # seeded
    assert not np.array_equal(W, resample_weights(7, 50, seed=2))


def test_cluster_sums_matches_groupby():
    df = pd.DataFrame({"seq_id": [3, 3, 1, 2, 1], "x": [1.0, 2.0, 3.0, 4.0, 5.0]})
    cl = clusters_of(df)
    assert cl.n_clusters == 3 and cl.column == "seq_id"
    np.testing.assert_allclose(cluster_sums(df["x"].to_numpy(), cl), [3.0, 8.0, 4.0])  # order of first appearance
    two = cluster_sums(np.column_stack([df["x"], 2 * df["x"]]), cl)
    np.testing.assert_allclose(two[:, 1], [6.0, 16.0, 8.0])


def test_bootstrap_mean_equals_explicit_resample(small_tokens):
    cl = clusters_of(small_tokens)
    W = resample_weights(cl.n_clusters, 5, seed=0)
    y = small_tokens["gain"].to_numpy()
    mask = small_tokens["q3"].to_numpy()
    fast = bootstrap_mean(y, mask, cl, W)
    for b in range(5):
        idx = resample_indices(cl, W[b])
        assert np.isclose(fast[b], y[idx][mask[idx]].mean())


def test_percentile_ci_and_guards():
    lo, hi = percentile_ci(np.arange(1001, dtype=float))
    assert (lo, hi) == pytest.approx((25.0, 975.0))
    assert np.isnan(percentile_ci(np.full(10, np.nan))).all()
    single = clusters_of(pd.DataFrame({"seq_id": [0, 0, 0]}))
    ok, why = can_bootstrap(single, 100)
    assert not ok and "only 1 cluster" in why
    assert not can_bootstrap(single, 0)[0]
