"""Tests for diagnostics/signals/normalize.py and scores.py: normalisation, the scores, the registry."""

from __future__ import annotations

import pytest
import torch

from diagnostics.signals import (
    get_score,
    list_scores,
    normalize_batch,
    register_q3_variant,
    register_score,
    select,
    selection_scores,
)
from diagnostics.signals import scores as score_registry

from signals_reference import INF, batch_signals


def test_normalize_batch_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 30, generator=g)
    valid = torch.rand(4, 30, generator=g) < 0.7
    lo, hi = torch.quantile(x[valid], torch.tensor([0.05, 0.95]))
    want = ((x - lo) / (hi - lo + 1e-6)).clamp(0, 1) * valid
    torch.testing.assert_close(normalize_batch(x, valid), want)
    flat = torch.full((2, 5), 3.0)
    assert torch.equal(normalize_batch(flat, torch.ones(2, 5, dtype=torch.bool)), torch.zeros(2, 5))



def test_selection_scores_formulas_and_q3():
    sig, valid = batch_signals()
    out = selection_scores(sig, valid, seed=1)
    assert set(out) == set(list_scores("selection")) | {"q3"}  # weight rules: rule_weights
    h, d, c = (normalize_batch(sig[key], valid) for key in ("student_entropy", "disagreement", "compat_mass"))
    s = d * c
    want = {"teachability": s, "incompatible": d * (1 - c), "entropy": h, "kl": d, "tip": h + d - h * d,
            "compat": c, "teachability_entropy": h + s - h * s, "full": valid.float()}
    for name, val in want.items():
        torch.testing.assert_close(out[name], val * valid, msg=name)
    q3 = valid & (h < torch.quantile(h[valid], 0.5)) & (d >= torch.quantile(d[valid], 0.5))
    assert torch.equal(out["q3"], q3) and q3.any()
    for name, inner in (("q3_compat", c), ("q3_teachability", s), ("q3_incompatible", d * (1 - c))):
        torch.testing.assert_close(out[name][q3], inner[q3])
        assert (out[name][~q3] == -INF).all()
    assert (out["q3_only"][~q3] == -INF).all() and (out["q3_only"][q3] >= 0).all()
    mask = select(out["q3_compat"], valid, 1.0)
    assert torch.equal(mask, q3)  # a q3 selector never keeps a position outside Q3


def test_selection_scores_random_is_seeded_and_topk_entropy_fallback():
    sig, valid = batch_signals()
    a, b = selection_scores(sig, valid, seed=3), selection_scores(sig, valid, seed=3)
    assert torch.equal(a["random"], b["random"])
    assert not torch.equal(a["random"], selection_scores(sig, valid, seed=4)["random"])
    topk_sig = {"student_entropy_topk": sig["student_entropy"]}
    topk_sig.update({key: sig[key] for key in ("disagreement", "compat_mass")})
    torch.testing.assert_close(selection_scores(topk_sig, valid)["tip"], a["tip"])


def test_registry():
    names = list_scores()
    for name in ("full", "random", "entropy", "kl", "compat", "teachability", "incompatible", "tip",
                 "teachability_entropy", "q3_compat", "q3_teachability", "q3_incompatible", "q3_only"):
        assert name in names
    spec = get_score("teachability")
    assert spec.needs == ("D", "C") and not spec.restrict_to_q3 and spec.description
    assert get_score("q3_only").restrict_to_q3
    with pytest.raises(KeyError, match="registered scores: .*teachability"):
        get_score("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_score("kl", description="dup")(lambda norm, valid, g: norm["D"])
    with pytest.raises(ValueError, match="unknown signals"):
        register_score("uses_x", description="bad need", needs=("X",))
    with pytest.raises(ValueError, match="reserved"):
        register_score("q3", description="clashes with the Q3 mask key")


def test_new_score_is_seen_by_selection_scores(monkeypatch):
    monkeypatch.setattr(score_registry, "_SCORES", dict(score_registry._SCORES))  # leave the real registry untouched

    @register_score("d_squared", description="D~^2", needs=("D",))
    def _d2(norm, valid, generator):
        return norm["D"] ** 2

    sig, valid = batch_signals()
    out = selection_scores(sig, valid)
    torch.testing.assert_close(out["d_squared"], out["kl"] ** 2)



def test_selection_scores_returns_the_normalised_signals_it_used():
    sig, valid = batch_signals()
    scores, norm = selection_scores(sig, valid, seed=2, return_normalized=True)
    plain = selection_scores(sig, valid, seed=2)
    assert list(scores) == list(plain) and all(torch.equal(scores[n], plain[n]) for n in plain)
    assert set(norm) == {"H", "D", "C", "DC"}
    for short, key in (("H", "student_entropy"), ("D", "disagreement"), ("C", "compat_mass")):
        assert torch.equal(norm[short], normalize_batch(sig[key], valid))
    assert torch.equal(norm["DC"], normalize_batch(sig["disagreement"] * sig["compat_mass"], valid))
    assert torch.equal(scores["teachability"], norm["D"] * norm["C"])


def test_q3_variants_are_their_base_scores_restricted_to_q3():
    for variant, base in (("q3_compat", "compat"), ("q3_teachability", "teachability"),
                          ("q3_incompatible", "incompatible"), ("q3_only", "random")):
        spec, base_spec = get_score(variant), get_score(base)
        assert spec.fn is base_spec.fn and spec.needs == base_spec.needs and spec.restrict_to_q3
    sig, valid = batch_signals()
    out = selection_scores(sig, valid, seed=5)
    for variant, base in (("q3_compat", "compat"), ("q3_teachability", "teachability")):
        assert torch.equal(out[variant], out[base].masked_fill(~out["q3"], -INF))
    q3 = out["q3"]
    assert not torch.equal(out["q3_only"][q3], out["random"][q3])  # its own generator (seeded by name)


def test_register_q3_variant(monkeypatch):
    monkeypatch.setattr(score_registry, "_SCORES", dict(score_registry._SCORES))
    spec = register_q3_variant("tip", description="TIP inside Q3")
    assert (spec.name, spec.needs, spec.restrict_to_q3) == ("q3_tip", ("H", "D"), True)
    sig, valid = batch_signals()
    out = selection_scores(sig, valid)
    assert torch.equal(out["q3_tip"], out["tip"].masked_fill(~out["q3"], -INF))
    with pytest.raises(KeyError, match="unknown score 'nope'"):
        register_q3_variant("nope", description="no base")
    with pytest.raises(ValueError, match="already registered"):
        register_q3_variant("compat", description="duplicate of q3_compat")
