"""Tests for diagnostics/signals/topk.py (token_signals_topk) against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from diagnostics.signals import TOPK_KEYS, token_signals, token_signals_topk

from signals_reference import CASES, INF, assert_matches, random_logits, ref_topk_mode, topk_inputs


@pytest.mark.parametrize("case", ["random", "ties", "one_hot"])
@pytest.mark.parametrize("k", [1, 4, 16])
def test_topk_mode_matches_reference(case, k):
    s, t = CASES[case](6, 37, seed=k + 100)
    si, sl, ti, tl = topk_inputs(s, t, k)
    got = token_signals_topk(si, sl, ti, tl)
    assert got.mode == "topk" and got.k == k
    assert set(got) == set(TOPK_KEYS)  # no full-vocabulary keys
    assert_matches(got, ref_topk_mode(si, sl, ti, tl))
    torch.testing.assert_close(got["compat_mass"], got["compat_mass_lower"])


def test_topk_mode_agrees_with_exact_on_set_signals():
    s, t = random_logits(8, 50, seed=4)
    exact = token_signals(s, t, 6)
    topk = token_signals_topk(*topk_inputs(s, t, 6))
    same = ("overlap", "jaccard", "teacher_top1_in_student_topk", "student_entropy_topk", "compat_mass_lower")
    for key in same:
        torch.testing.assert_close(topk[key], exact[key], atol=1e-6, rtol=1e-6)
    assert (topk["disagreement"] >= 0).all()


def test_topk_mode_masked_logprobs_and_sampled():
    si = torch.tensor([[3, 1, 2]])
    sl = torch.tensor([[-0.1, -INF, -3.0]])
    ti = torch.tensor([[1, 3, 7]])
    tl = torch.tensor([[-0.5, -1.0, -INF]])
    got = token_signals_topk(si, sl, ti, tl, sampled_ids=torch.tensor([2]),
                             sampled_student_logprob=torch.tensor([-3.0]),
                             sampled_teacher_logprob=torch.tensor([-9.0]))
    assert_matches(got, ref_topk_mode(si, sl, ti, tl), keys=TOPK_KEYS)
    assert got["sampled_in_student_topk"].item() == 1.0
    assert got["student_logprob_sampled"].item() == -3.0 and got["teacher_logprob_sampled"].item() == -9.0


def test_topk_mode_teacher_top1_tie_breaks_by_lower_id():
    si, sl = torch.tensor([[4, 5]]), torch.tensor([[-0.5, -1.0]])
    ti, tl = torch.tensor([[9, 4]]), torch.tensor([[-0.7, -0.7]])  # tie: top-1 is id 4
    assert token_signals_topk(si, sl, ti, tl)["teacher_top1_in_student_topk"].item() == 1.0



def test_bad_topk_inputs():
    si, sl, ti, tl = topk_inputs(*random_logits(4, 20, seed=0), 3)
    bad = tl.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="teacher_topk_logprobs has NaN at row 2, column 1"):
        token_signals_topk(si, sl, ti, bad)
    with pytest.raises(ValueError, match="teacher_topk_ids must have shape"):
        token_signals_topk(si, sl, ti[:, :2], tl)
    dup = si.clone()
    dup[1, 2] = dup[1, 0]
    with pytest.raises(ValueError, match="student_topk_ids row 1 repeats"):
        token_signals_topk(dup, sl, ti, tl)
    with pytest.raises(ValueError, match="student_topk_logprobs row 0 is all -inf"):
        token_signals_topk(si, torch.full_like(sl, -INF), ti, tl)

