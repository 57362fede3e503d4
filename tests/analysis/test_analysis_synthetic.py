"""analysis.synthetic: the score columns come from the score registry (diagnostics.signals), at every K."""

from __future__ import annotations

import re

import numpy as np
import torch

from analysis.synthetic import synthetic_tokens
from diagnostics.signals import get_score, list_scores, register_score, selection_scores
from diagnostics.signals import scores as score_registry


def _score_columns(df, suffix: str = "") -> list[str]:
    """Score names of the columns score_<name><suffix> (suffix "" = the base K: no _k<K> ending)."""
    found = (re.fullmatch(r"score_(.+?)(_k\d+)?", c) for c in df.columns)
    return [m[1] for m in found if m and (m[2] or "") == suffix]


def test_score_columns_are_the_registered_scores():
    df = synthetic_tokens(n_prompts=6, extra_k=(16, 32), seed=1)
    # the selection rules of H, D, C (and position); rules reading raw signals the table lacks (the teacher's
    # entropy, the sampled log-probs, overlap: diagnostics.signals.rules) and weight rules have no score column
    want = [n for n in list_scores("selection") if not get_score(n).raw_needs]
    assert _score_columns(df) == want
    for kk in (16, 32):
        assert _score_columns(df, f"_k{kk}") == want


def test_score_values_are_selection_scores_of_the_table():
    seed = 3
    df = synthetic_tokens(n_prompts=6, extra_k=(16,), seed=seed)
    for sfx in ("", "_k16"):
        raw = {"student_entropy": df["student_entropy"], "disagreement": df["disagreement" + sfx],
               "compat_mass": df["compat_mass" + sfx]}
        signals = {key: torch.tensor(col.to_numpy(), dtype=torch.float32)[None] for key, col in raw.items()}  # [1, n]
        valid = torch.ones(1, len(df), dtype=torch.bool)
        scores, norm = selection_scores(signals, valid, seed=seed, return_normalized=True)
        for name in scores.keys() - {"q3"}:  # the rules these signals feed (test above)
            np.testing.assert_array_equal(df[f"score_{name}{sfx}"].to_numpy(), scores[name][0].double().numpy())
        np.testing.assert_array_equal(df["q3" + sfx].to_numpy(), scores["q3"][0].numpy())
        for short, column in (("H", "norm_entropy"), ("D", "norm_disagreement"), ("C", "norm_compat")):
            np.testing.assert_array_equal(df[column + sfx].to_numpy(), norm[short][0].double().numpy())


def test_a_newly_registered_score_gets_a_column(monkeypatch):
    monkeypatch.setattr(score_registry, "_SCORES", dict(score_registry._SCORES))  # leave the real registry untouched
    register_score("d_squared", description="D~^2", needs=("D",))(lambda norm, valid, generator: norm["D"] ** 2)
    df = synthetic_tokens(n_prompts=4, extra_k=(), seed=0)
    assert "d_squared" in _score_columns(df) and "d_squared" in list_scores()
    np.testing.assert_allclose(df["score_d_squared"], df["score_kl"] ** 2, rtol=1e-6)
