"""Tests for diagnostics/signals/rules.py: each published rule against a plain loop written from its definition."""

from __future__ import annotations

import math

import pytest
import torch

from diagnostics.signals import get_score, list_scores, rule_weights, select, select_by_name, selection_scores
from diagnostics.signals.rules import iw_opd_weights

RAW = ("teacher_entropy", "student_logprob_sampled", "teacher_logprob_sampled", "overlap")


def batch(b: int = 5, t: int = 17, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Random raw signals and a valid mask whose rows are contiguous prefixes of different lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    valid = torch.arange(t)[None, :] < lengths[:, None]
    sig = {
        "student_entropy": torch.rand(b, t, generator=g) * 3,
        "disagreement": torch.rand(b, t, generator=g),
        "compat_mass": torch.rand(b, t, generator=g),
        "teacher_entropy": torch.rand(b, t, generator=g) * 2,
        "student_logprob_sampled": -torch.rand(b, t, generator=g) * 4,
        "teacher_logprob_sampled": -torch.rand(b, t, generator=g) * 4,
        "overlap": torch.randint(0, 5, (b, t), generator=g).float() / 4,
    }
    return sig, valid


def ref_positions(valid: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row: (index among the row's valid positions, row length) at each column, plain loops."""
    out = []
    for row in valid.tolist():
        n, i, cells = sum(row), 0, []
        for ok in row:
            cells.append((i, n))
            i += ok
        out.append(cells)
    return out


def test_position_rules_are_relative_positions():
    sig, valid = batch()
    out = selection_scores(sig, valid)
    for b, cells in enumerate(ref_positions(valid)):
        for t, (i, n) in enumerate(cells):
            if valid[b, t]:
                assert out["prefix"][b, t].item() == pytest.approx(1 - i / n, abs=1e-7)
                assert out["suffix"][b, t].item() == pytest.approx((i + 1) / n, abs=1e-7)
            else:
                assert out["prefix"][b, t] == 0 and out["suffix"][b, t] == 0


def test_prefix_keeps_the_earliest_share_of_every_response():
    valid = torch.ones(4, 20, dtype=torch.bool)
    sig = batch(4, 20)[0]
    keep = select(selection_scores(sig, valid)["prefix"], valid, 0.3, min_per_sequence=0)
    assert torch.equal(keep, torch.arange(20)[None, :].expand(4, 20) < 6)  # 30% of 20 = the first 6 of each
    keep = select(selection_scores(sig, valid)["suffix"], valid, 0.3, min_per_sequence=0)
    assert torch.equal(keep, torch.arange(20)[None, :].expand(4, 20) >= 14)


def test_raw_signal_rules_equal_their_definitions():
    sig, valid = batch(seed=3)
    out = selection_scores(sig, valid)
    for b in range(valid.shape[0]):
        for t in range(valid.shape[1]):
            if not valid[b, t]:
                continue
            tl, sl = sig["teacher_logprob_sampled"][b, t].item(), sig["student_logprob_sampled"][b, t].item()
            # Rho-1: loss under the student minus loss under the reference (the teacher), loss = -log p
            assert out["excess_loss"][b, t].item() == pytest.approx((-sl) - (-tl), abs=1e-6)
            assert out["teacher_entropy"][b, t].item() == pytest.approx(sig["teacher_entropy"][b, t].item())
            assert out["topk_overlap"][b, t].item() == pytest.approx(sig["overlap"][b, t].item())


def ref_iw_opd(teacher: list[float], student: list[float], valid: list[bool], gamma: float) -> list[float]:
    """IW-OPD Algorithm 1 for one response: w_t = 1 + gamma (1 - sum_{s<t} |a_s| / max(sum_s |a_s|, 1e-8))."""
    a = [abs(t - s) if ok else 0.0 for t, s, ok in zip(teacher, student, valid)]
    total = max(sum(a), 1e-8)
    out, prefix = [], 0.0
    for ai, ok in zip(a, valid):
        out.append(1 + gamma * (1 - prefix / total) if ok else 0.0)
        prefix += ai
    return out


@pytest.mark.parametrize("gamma", [0.5, 0.0, 2.0])
def test_iw_opd_weights_equal_algorithm_1(gamma):
    sig, valid = batch(seed=5)
    got = iw_opd_weights(sig["teacher_logprob_sampled"], sig["student_logprob_sampled"], valid, gamma=gamma)
    for b in range(valid.shape[0]):
        want = ref_iw_opd(sig["teacher_logprob_sampled"][b].tolist(), sig["student_logprob_sampled"][b].tolist(),
                          valid[b].tolist(), gamma)
        assert got[b].tolist() == pytest.approx(want, abs=1e-6)
    assert torch.equal(rule_weights(sig, valid)["iw_opd"], iw_opd_weights(
        sig["teacher_logprob_sampled"], sig["student_logprob_sampled"], valid))
    agree = iw_opd_weights(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool))
    assert torch.equal(agree, torch.full((2, 3), 1.5))  # S = 0: the epsilon guard, every weight 1 + gamma


def test_iw_opd_weights_equal_installed_trl():
    """The installed TRL's IWOPDTrainer._compute_iw_opd_loss on the same log-probs, weights read off its gradient.

    Its loss is sum_t -log pS(y_t) w_t a_t / n with w_t a_t detached, so for the student logits z_t
    d loss / d z_t[y_t] = -w_t a_t (1 - pS(y_t)) / n: w_t = -n grad / (a_t (1 - pS(y_t))).
    """
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.experimental.iw_opd.iw_opd_trainer import IWOPDTrainer

    g = torch.Generator().manual_seed(11)
    b, t, v = 3, 9, 6
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, v, (b, t), generator=g)
    valid = torch.arange(t)[None, :] < torch.tensor([[9], [5], [1]])
    labels = torch.where(valid, tokens, -100)
    teacher = torch.log_softmax(torch.randn(b, t, v, generator=g, dtype=torch.float64), -1)
    teacher_lp = teacher.gather(-1, tokens[..., None])[..., 0]
    fake = SimpleNamespace(temperature=1.0, iw_opd_gamma=0.5, iw_opd_epsilon=1e-8,
                           model=SimpleNamespace(training=True), _metrics={"train": defaultdict(list)})
    n = int(valid.sum())
    loss = IWOPDTrainer._compute_iw_opd_loss(fake, student_logits=logits, completion_tokens=tokens, labels=labels,
                                             teacher_actual_logprobs=teacher_lp, num_items_in_batch=n)
    (grad,) = torch.autograd.grad(loss, logits)
    student_lp = torch.log_softmax(logits.detach(), -1).gather(-1, tokens[..., None])[..., 0]
    a = teacher_lp - student_lp
    g_y = grad.gather(-1, tokens[..., None])[..., 0]
    trl_w = -n * g_y / (a * (1 - student_lp.exp()))
    ours = iw_opd_weights(teacher_lp, student_lp, valid)
    torch.testing.assert_close(ours[valid].double(), trl_w[valid], atol=1e-6, rtol=0)


def test_kinds_and_bad_uses():
    assert get_score("iw_opd").kind == "weight" and get_score("prefix").kind == "selection"
    for name in ("prefix", "suffix", "teacher_entropy", "excess_loss", "topk_overlap", "iw_opd"):
        assert name in list_scores() and get_score(name).description
    assert "iw_opd" not in list_scores("selection") and list_scores("weight") == ["iw_opd"]
    sig, valid = batch()
    assert "iw_opd" not in selection_scores(sig, valid)
    with pytest.raises(ValueError, match="iw_opd.*weight rule"):
        select_by_name(sig, valid, "iw_opd", 0.05, min_per_sequence=0, seed=0)
    with pytest.raises(ValueError, match="'prefix' is a selection rule"):
        rule_weights(sig, valid, names=["prefix"])
    del sig["teacher_entropy"]
    assert "teacher_entropy" not in selection_scores(sig, valid)  # a signal the caller lacks: that rule is left out
    with pytest.raises(ValueError, match="needs the signal.*teacher_entropy"):
        select_by_name(sig, valid, "teacher_entropy", 0.05, min_per_sequence=0, seed=0)


def test_eighty_twenty_is_entropy_at_twenty_percent():
    """80/20 (arXiv 2506.01939): keep the top-20% student-entropy tokens; `entropy` at ratio 0.2 keeps that set."""
    sig, valid = batch(8, 40, seed=7)
    keep = select_by_name(sig, valid, "entropy", 0.2, min_per_sequence=0, seed=0)
    h = sig["student_entropy"][valid]
    n = math.ceil(0.2 * int(valid.sum()) - 1e-9)
    threshold = h.sort(descending=True).values[n - 1]
    assert torch.equal(keep, valid & (sig["student_entropy"] >= threshold))
