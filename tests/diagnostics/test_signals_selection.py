"""Tests for diagnostics/signals/selection.py (select) and the bad-input errors of selection's inputs."""

from __future__ import annotations

import math

import pytest
import torch

from diagnostics.signals import normalize_batch, select, selection_scores

from signals_reference import batch_signals


def test_select_exact_count_and_ceil_robustness():
    g = torch.Generator().manual_seed(0)
    score = torch.rand(4, 25, generator=g)
    valid = torch.ones(4, 25, dtype=torch.bool)
    mask = select(score, valid, 0.07, min_per_sequence=0)
    assert mask.sum() == 7  # ceil(0.07 * 100) = 7, not 8
    assert torch.equal(score[mask].sort().values, score.flatten().topk(7).values.sort().values)
    valid[1, :10] = False
    mask = select(score, valid, 0.25, min_per_sequence=0)
    assert mask.sum() == math.ceil(0.25 * 90) and not (mask & ~valid).any()


def test_select_ties_go_to_earlier_positions():
    score, valid = torch.zeros(3, 4), torch.ones(3, 4, dtype=torch.bool)
    mask = select(score, valid, 5 / 12, min_per_sequence=0)
    assert mask.flatten().tolist() == [True] * 5 + [False] * 7


def test_select_min_per_sequence():
    score = torch.tensor([[9.0, 8.0, 7.0, 6.0], [1.0, 3.0, 2.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[2] = False  # a sequence without valid positions gets nothing
    mask = select(score, valid, 0.25)  # budget ceil(0.25 * 8) = 2: both from row 0
    assert mask.tolist() == [[True, True, False, False], [False, True, False, False], [False] * 4]
    assert select(score, valid, 0.25, min_per_sequence=0).sum() == 2


def test_select_ratio_one_keeps_all_valid():
    g = torch.Generator().manual_seed(1)
    score, valid = torch.rand(3, 9, generator=g), torch.rand(3, 9, generator=g) < 0.5
    valid[0, 0] = True
    assert torch.equal(select(score, valid, 1.0), valid)


def test_select_seeded_tie_break_is_reproducible():
    score, valid = torch.zeros(4, 50), torch.ones(4, 50, dtype=torch.bool)
    score[0, 3] = 1.0  # a strict winner is always kept
    a = select(score, valid, 0.1, min_per_sequence=0, seed=7)
    assert torch.equal(a, select(score, valid, 0.1, min_per_sequence=0, seed=7))
    assert not torch.equal(a, select(score, valid, 0.1, min_per_sequence=0, seed=8))
    assert a[0, 3] and a.sum() == 20
    assert not torch.equal(a, select(score, valid, 0.1, min_per_sequence=0))  # not position order


def test_bad_selection_inputs():
    sig, valid = batch_signals()
    score = sig["disagreement"]
    for ratio in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            select(score, valid, ratio)
    with pytest.raises(ValueError, match="valid has no True"):
        select(score, torch.zeros_like(valid), 0.5)
    with pytest.raises(ValueError, match="valid shape"):
        select(score, valid[:, :-1], 0.5)
    with pytest.raises(ValueError, match="valid shape"):
        normalize_batch(score, valid[:-1])
    with pytest.raises(ValueError, match="valid has no True"):
        normalize_batch(score, torch.zeros_like(valid))
    nan = score.clone()
    nan[1, 2] = float("nan")
    valid[1, 2] = True
    with pytest.raises(ValueError, match=r"x has non-finite value nan at valid position \[1, 2\]"):
        normalize_batch(nan, valid)
    with pytest.raises(ValueError, match=r"score has NaN at valid position \[1, 2\]"):
        select(nan, valid, 0.5)
    with pytest.raises(ValueError, match="signals lacks 'compat_mass'"):
        selection_scores({k: v for k, v in sig.items() if k != "compat_mass"}, valid)
