"""The learnable share of a pair, sum D C / sum D, against a plain loop; its bootstrap against explicit resamples."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.bootstrap import clusters_of, percentile_ci, resample_indices, resample_weights
from analysis.report import format_report, learnable_share, summarize
from analysis.synthetic import synthetic_tokens


def table(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n_seq, length = 12, 9
    rows = []
    for s in range(n_seq):
        for p in range(length):
            rows.append({"seq_id": s, "prompt_id": s // 2, "pos": p, "rel_pos": p / length,
                         "disagreement": rng.exponential(), "compat_mass": rng.uniform()})
    return pd.DataFrame(rows)


def test_learnable_share_equals_a_plain_loop():
    df = table()
    out = learnable_share(df, n_boot=50, seed=3)
    num = sum(r.disagreement * r.compat_mass for r in df.itertuples())
    den = sum(r.disagreement for r in df.itertuples())
    assert out["value"] == pytest.approx(num / den, rel=1e-12)
    for q in out["by_position_quartile"]:
        lo, hi = q["rel_pos"]
        part = [r for r in df.itertuples() if lo <= r.rel_pos < hi]
        assert q["n_tokens"] == len(part)
        want = sum(r.disagreement * r.compat_mass for r in part) / sum(r.disagreement for r in part)
        assert q["value"] == pytest.approx(want, rel=1e-12)
    assert sum(q["n_tokens"] for q in out["by_position_quartile"]) == len(df)


def test_learnable_share_interval_is_the_cluster_bootstrap():
    df = table(1)
    out = learnable_share(df, n_boot=40, seed=7)
    clusters = clusters_of(df)
    weights = resample_weights(clusters.n_clusters, 40, 7)
    shares = []
    for row in weights:  # explicit resamples: whole prompts drawn with replacement
        part = df.iloc[resample_indices(clusters, row)]
        shares.append((part.disagreement * part.compat_mass).sum() / part.disagreement.sum())
    assert out["ci"] == pytest.approx(percentile_ci(np.array(shares)), rel=1e-9)
    assert out["ci"][0] <= out["value"] <= out["ci"][1]


def test_every_summary_reports_the_learnable_share():
    df = synthetic_tokens(n_prompts=20, seed=0)
    summary = summarize(df, n_boot=20)
    share = summary["learnable_share"]
    assert 0 <= share["value"] <= 1 and len(share["by_position_quartile"]) == 4
    assert "Learnable share" in format_report(summary)
    no_d = summarize(df.drop(columns=["disagreement"]), n_boot=0)  # a table without raw D: the section is a note
    assert no_d["learnable_share"] is None and any("learnable share" in n for n in no_d["notes"])
