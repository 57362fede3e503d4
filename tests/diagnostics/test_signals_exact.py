"""Tests for diagnostics/signals/exact.py (token_signals).

Every fast path is held against the plain float64 reference of signals_reference.py on small
vocabularies and adversarial logits (ties, -inf, one-hot, K = 1, K >= V, low-precision dtypes);
then math properties and the bad-input errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from diagnostics.signals import FULL_VOCAB_KEYS, SAMPLED_KEYS, TOPK_KEYS, token_signals
from diagnostics.signals import exact as exact_mode

from signals_reference import CASES, INF, assert_matches, masked_logits, random_logits, ref_exact


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("k", [1, 3, 8, 37, 50])
def test_exact_matches_reference(case, k):
    n, v = 6, 37
    s, t = CASES[case](n, v, seed=k)
    y = torch.arange(n) * 5 % v
    got = token_signals(s, t, k, chunk_size=4, sampled_ids=y)
    assert got.mode == "exact" and got.k == k
    assert set(got) == set(FULL_VOCAB_KEYS + TOPK_KEYS + SAMPLED_KEYS)
    assert_matches(got, ref_exact(s, t, k, y))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("case", ["random", "ties", "masked"])
def test_exact_low_precision_inputs(dtype, case):
    """bf16/fp16/fp64 inputs: computed in float32, equal to the reference on the cast values."""
    s, t = CASES[case](5, 29, seed=3)
    s, t = s.to(dtype), t.to(dtype)
    assert_matches(token_signals(s, t, 4, chunk_size=2), ref_exact(s, t, 4))


@pytest.mark.parametrize("vocab", [203, 256])  # with and without a tail outside the columns
@pytest.mark.parametrize("case", ["random", "ties", "masked"])
def test_exact_column_candidate_path(monkeypatch, vocab, case):
    """The strided-column top-K search (used for large V) on a small V with tiny columns."""
    monkeypatch.setattr(exact_mode, "_GROUP", 4)
    monkeypatch.setattr(exact_mode, "_MIN_COLUMNS", 4)
    s, t = CASES[case](6, vocab, seed=vocab)
    if case == "ties":  # make the top-K boundary tie across many columns
        s = (s > 2).float() * 3.0 + (s == 1).float()
    got = token_signals(s, t, 5, chunk_size=4)
    assert_matches(got, ref_exact(s, t, 5))


def test_exact_real_vocabulary_matches_vectorised_reference():
    """V = 151,936 with the default columns and bf16-quantised logits (boundary ties)."""
    g = torch.Generator().manual_seed(0)
    n, v, k = 4, 151_936, 16
    s = (torch.randn(n, v, generator=g) * 3).bfloat16()
    t = (s.float() + torch.randn(n, v, generator=g)).bfloat16()
    s[0, 1000:1040] = s[0].max() + 1  # 40 tokens tie at the top
    got = token_signals(s, t, k)
    sd, td = s.double(), t.double()
    ls, lt = sd.log_softmax(1), td.log_softmax(1)
    S = sd.sort(dim=1, descending=True, stable=True).indices[:, :k]  # stable: lower id first in ties
    T = td.sort(dim=1, descending=True, stable=True).indices[:, :k]
    want = {
        "student_entropy": -(ls.exp() * ls).sum(1),
        "kl_forward": (lt.exp() * (lt - ls)).sum(1),
        "kl_reverse": (ls.exp() * (ls - lt)).sum(1),
        "compat_mass": lt.exp().gather(1, S).sum(1),
        "overlap": (T[:, :, None] == S[:, None, :]).any(2).double().mean(1),
    }
    assert torch.equal(S[0], torch.arange(1000, 1016))
    for key, val in want.items():
        torch.testing.assert_close(got[key].double(), val, atol=1e-4, rtol=1e-5, msg=key)


def test_chunking_does_not_change_results():
    s, t = masked_logits(9, 41, seed=5)
    a = token_signals(s, t, 6, chunk_size=1)
    b = token_signals(s, t, 6, chunk_size=1000)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-6)


def test_signal_dict_survives_autograd_inputs_and_pickling():
    import pickle

    s, t = random_logits(3, 11, seed=0)
    out = token_signals(s.requires_grad_(), t, 2)
    assert not any(v.requires_grad for v in out.values())
    back = pickle.loads(pickle.dumps(out))
    assert (back.mode, back.k, list(back)) == ("exact", 2, list(out))


def test_empty_batch():
    out = token_signals(torch.empty(0, 10), torch.empty(0, 10), 3)
    assert all(v.shape == (0,) for v in out.values())


# ----------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["random", "ties", "masked", "one_hot"])
def test_identical_inputs(case):
    s, _ = CASES[case](6, 37, seed=11)
    out = token_signals(s, s.clone(), 5)
    for key in ("disagreement", "kl_forward", "kl_reverse"):
        torch.testing.assert_close(out[key], torch.zeros(6), atol=1e-6, rtol=0)
    for key in ("overlap", "jaccard", "teacher_top1_in_student_topk", "bhattacharyya"):
        torch.testing.assert_close(out[key], torch.ones(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["compat_mass"], out["compat_mass_lower"])
    torch.testing.assert_close(out["student_entropy"], out["teacher_entropy"])
    full = token_signals(s, s.clone(), 37)  # S = T = whole vocabulary: C = 1
    torch.testing.assert_close(full["compat_mass"], torch.ones(6), atol=1e-6, rtol=0)


def test_k_at_least_vocab_is_whole_vocabulary():
    s, t = random_logits(4, 7, seed=2)
    out = token_signals(s, t, 100)
    torch.testing.assert_close(out["overlap"], torch.ones(4))  # |S cap T| / K_eff with K_eff = V
    torch.testing.assert_close(out["disagreement"], out["kl_forward"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["student_entropy_topk"] * math.log(7), out["student_entropy"])


def test_masked_tokens_give_one_sided_infinite_kl():
    s = torch.tensor([[0.0, -INF, 1.0, 0.5], [0.0, 2.0, 1.0, 0.5], [0.0, -INF, 1.0, -INF]])
    t = torch.tensor([[0.0, 2.0, 0.3, 0.5], [0.0, 2.0, -INF, 0.5], [0.0, -INF, 1.0, -INF]])
    out = token_signals(s, t, 3)
    # row 0: the student masks a teacher token; row 1: the reverse; row 2: shared masks only.
    assert out["kl_forward"].tolist()[:2] == [INF, out["kl_forward"][1].item()] and out["kl_forward"][1] < INF
    assert out["kl_reverse"][0] < INF and out["kl_reverse"][1] == INF
    assert torch.isfinite(out["kl_forward"][2]) and torch.isfinite(out["kl_reverse"][2])
    assert out["disagreement"][0] == INF  # token 1 is in T but masked for the student
    assert_matches(out, ref_exact(s, t, 3))



# ----------------------------------------------------------------------------------------------
# Bad input: ValueError naming the argument and the first offending position
# ----------------------------------------------------------------------------------------------


def test_bad_logits():
    s, t = random_logits(6, 20, seed=0)
    with pytest.raises(ValueError, match="student_logits .* teacher_logits .* same"):
        token_signals(s, t[:, :19])
    bad = t.clone()
    bad[3, 17] = float("nan")
    with pytest.raises(ValueError, match=r"teacher_logits has NaN at row 3, column 17"):
        token_signals(s, bad, 4, chunk_size=2)
    bad = s.clone()
    bad[4, 2] = INF
    with pytest.raises(ValueError, match=r"student_logits has \+inf at row 4, column 2"):
        token_signals(bad, t, 4, chunk_size=4)
    bad = s.clone()
    bad[5] = -INF
    with pytest.raises(ValueError, match="student_logits row 5 is all -inf"):
        token_signals(bad, t, 4)
    for k in (0, -1):
        with pytest.raises(ValueError, match="k must be"):
            token_signals(s, t, k)
    with pytest.raises(ValueError, match="sampled_ids"):
        token_signals(s, t, 4, sampled_ids=torch.full((6,), 20))
    with pytest.raises(ValueError, match="chunk_size"):
        token_signals(s, t, 4, chunk_size=0)


def test_bad_logits_in_column_path(monkeypatch):
    monkeypatch.setattr(exact_mode, "_GROUP", 4)
    monkeypatch.setattr(exact_mode, "_MIN_COLUMNS", 4)
    s, t = random_logits(5, 64, seed=0)
    s[2, 33] = float("nan")
    with pytest.raises(ValueError, match="student_logits has NaN at row 2, column 33"):
        token_signals(s, t, 3)
