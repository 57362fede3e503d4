"""analysis.variants: the first-order agreement and the group variant's summary."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from analysis.variants import first_order_agreement, group_summary


def test_first_order_agreement():
    rng = np.random.default_rng(0)
    gain = rng.normal(size=50)
    tokens = pd.DataFrame({"gain": gain, "gain_first_order": gain + 0.1 * rng.normal(size=50)})
    tokens.loc[3, "gain_first_order"] = np.nan  # dropped, not compared
    agreement = first_order_agreement(tokens)
    kept = tokens.dropna()
    assert agreement["n"] == 49
    expected = scipy.stats.spearmanr(kept["gain_first_order"], kept["gain"]).statistic
    assert agreement["spearman"] == pytest.approx(expected)
    assert first_order_agreement(tokens.drop(columns="gain_first_order")) is None


def test_group_summary():
    group = pd.DataFrame({
        "selector": ["kl"] * 4 + ["random"] * 4, "ratio": 0.5, "seq_id": [0, 0, 1, 1] * 2, "pos": [0, 1] * 4,
        "kept": [True, False, False, True, False, False, False, False],
        "gain": [1.0, 2.0, 3.0, 4.0, 0.5, 0.5, 0.5, 1.5],
    })
    rows = group_summary(group)
    assert [r["selector"] for r in rows] == ["kl", "random"]
    assert rows[0] == {"selector": "kl", "ratio": 0.5, "n_kept": 2, "mean_gain_all": 2.5, "mean_gain_kept": 2.5,
                       "gain_per_kept": 5.0}  # the whole bank's gain, 10, per kept token
    assert rows[1]["n_kept"] == 0 and rows[1]["mean_gain_all"] == 0.75 and np.isnan(rows[1]["mean_gain_kept"])
    assert np.isnan(rows[1]["gain_per_kept"])
    with pytest.raises(ValueError, match="group.parquet: missing column"):
        group_summary(group.drop(columns="kept"))
