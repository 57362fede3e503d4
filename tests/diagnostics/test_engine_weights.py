"""The group variant with soft weights (issue 22): sum w l / sum w against a plain loop, 0/1 weights equal to the
unweighted update bit for bit, and the diagnostic's group plan of a weight rule."""

from __future__ import annotations

import copy

import pytest
import torch

from diagnostics import engine
from diagnostics.diagnose import group_plan
from diagnostics.lm.forward import ResponseBatch, full_logprobs
from diagnostics.lm.models import load_pair
from diagnostics.testbed.build import encode_problem
from diagnostics.testbed.config import heldout_problems


@pytest.fixture(scope="module")
def setup(small_testbed):
    pair = load_pair(small_testbed.student_path, small_testbed.teacher_path, device="cpu", dtype="float32")
    problems = heldout_problems(small_testbed.config, 4, split_seed=4)
    encoded = [encode_problem(pair.tokenizer, p) for p in problems]
    responses = [resp[: 3 + 2 * i] for i, (_, resp) in enumerate(encoded)]  # ragged
    bank = ResponseBatch.from_ids([e[0] for e in encoded], responses, pair.tokenizer.pad_token_id)
    return pair, bank, full_logprobs(pair.teacher, bank, pair.vocab_size)


def test_weighted_group_step_equals_a_plain_loop(setup):
    pair, bank, teacher_lp = setup
    weights = torch.rand(bank.valid.shape, generator=torch.Generator().manual_seed(2)) * bank.valid
    step = engine.StepConfig(lr=1e-4)
    gain = engine.group_step_gains(pair.student, bank, pair.teacher, bank.valid, step, pair.vocab_size, batch_size=2,
                                   weights=weights)
    student = copy.deepcopy(pair.student)
    total, w_sum = 0.0, 0.0
    for b, t in bank.valid.nonzero().tolist():  # reverse KL at each position, weighted, over sum w
        seq = bank.select(slice(b, b + 1))
        logits = student(input_ids=seq.ids).logits[0, seq.pred_idx[0, t], : pair.vocab_size]
        total = total + float(weights[b, t]) * engine.kl_reverse(teacher_lp[b, t], torch.log_softmax(logits, -1))
        w_sum += float(weights[b, t])
    (total / w_sum).backward()
    torch.optim.SGD(student.parameters(), lr=1e-4).step()
    after = engine.kl_forward(teacher_lp, full_logprobs(student, bank, pair.vocab_size))
    before = engine.kl_forward(teacher_lp, full_logprobs(pair.student, bank, pair.vocab_size))
    expected = torch.where(bank.valid, before - after, torch.nan)
    valid = bank.valid
    assert gain[valid].abs().max() > 0
    torch.testing.assert_close(gain[valid], expected[valid], atol=1e-6, rtol=1e-3)


def test_zero_one_weights_are_the_unweighted_group_step(setup):
    pair, bank, _ = setup
    keep = torch.zeros_like(bank.valid)
    keep[0, 1] = keep[2, 0] = keep[3, 4] = True
    step = engine.StepConfig(lr=1e-4)
    plain = engine.group_step_gains(pair.student, bank, pair.teacher, keep, step, pair.vocab_size, batch_size=2)
    weighted = engine.group_step_gains(pair.student, bank, pair.teacher, keep, step, pair.vocab_size, batch_size=2,
                                       weights=keep.float())
    assert torch.equal(plain.isnan(), weighted.isnan())
    assert torch.equal(plain[bank.valid], weighted[bank.valid])
    with pytest.raises(ValueError, match="weight 0"):
        engine.group_step_gains(pair.student, bank, pair.teacher, keep, step, pair.vocab_size,
                                weights=torch.zeros(keep.shape))


def test_group_plan_runs_a_weight_rule_at_full_budget_beside_full():
    assert group_plan(["kl", "iw_opd"], [0.05, 0.1]) == [("kl", 0.05), ("kl", 0.1), ("iw_opd", 1.0), ("full", 1.0)]
    assert group_plan(["kl"], [0.05]) == [("kl", 0.05)]
