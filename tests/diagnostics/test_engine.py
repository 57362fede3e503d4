"""The fixed-context engine: production paths equal the plain oracle; group and checkpoint gains."""

from __future__ import annotations

import copy

import pytest
import torch

from diagnostics import engine
from diagnostics.forward import ResponseBatch, full_logprobs
from diagnostics.models import load_pair
from diagnostics.testbed import encode_problem, heldout_problems

TOL = 1e-5


@pytest.fixture(scope="module")
def setup(default_testbed):
    pair = load_pair(default_testbed.student_path, default_testbed.teacher_path, device="cpu", dtype="float32")
    # one attention kernel for every path (the vmap path runs eager attention): the comparison is
    # then about the update and re-scoring, not sdpa-vs-eager rounding
    pair.student.set_attn_implementation("eager")
    problems = heldout_problems(default_testbed.config, 5, split_seed=4)
    encoded = [encode_problem(pair.tokenizer, p) for p in problems]
    # ragged responses (cut to different lengths), so padding and masks are exercised
    responses = [resp[: 3 + 2 * i] for i, (_, resp) in enumerate(encoded)]
    bank = ResponseBatch.from_ids([e[0] for e in encoded], responses, pair.tokenizer.pad_token_id)
    teacher_lp = full_logprobs(pair.teacher, bank, pair.vocab_size)
    return pair, bank, teacher_lp


def assert_same(a: dict, b: dict, keys=None):
    for key in keys or b:
        assert torch.equal(a[key].isnan(), b[key].isnan()), key
        # 1e-5 absolute, relative to the KL values involved when they exceed 1 nat: a gain is a
        # difference of two KLs, and float32 carries ~7 significant digits of each
        scale = b[key].abs().nan_to_num(0).clamp(min=1.0)
        if "kl_forward_before" in b and key in ("gain", "spillover", "kl_forward_after"):
            scale = b["kl_forward_before"].nan_to_num(0).amax(dim=1, keepdim=True).clamp(min=1.0).expand_as(scale)
        diff = ((a[key] - b[key]).abs().nan_to_num(0) / scale).max().item()
        assert diff <= TOL, f"{key}: max scaled difference {diff:.2e}"


@pytest.mark.slow
# lr 1e-4 for every case: on the trace testbed a sampled_pg SGD step at 1e-3 overshoots (spillover up to
# 6.7 nats), and float32 rounding of such KLs differs between thread counts by more than TOL; at 1e-4 the
# single-position gains still reach 1.7 nats, far above TOL
@pytest.mark.parametrize("loss,optimizer,lr", [
    ("reverse_kl", "sgd", 1e-4), ("reverse_kl", "adam", 1e-4),
    ("sampled_pg", "sgd", 1e-4), ("sampled_pg", "adam", 1e-4),
    ("forward_kl", "sgd", 1e-4),
])
def test_vmap_and_loop_equal_the_oracle(setup, loss, optimizer, lr):
    pair, bank, teacher_lp = setup
    step = engine.StepConfig(loss=loss, optimizer=optimizer, lr=lr)
    oracle = engine.single_step_reference(pair.student, bank, teacher_lp, step, pair.vocab_size)
    fast = engine.single_step_vmap(pair.student, bank, teacher_lp, step, pair.vocab_size, memory_budget_bytes=5e7)
    loop = engine.single_step_loop(pair.student, bank, teacher_lp, step, pair.vocab_size)
    assert_same(fast, oracle)
    assert_same(loop, oracle)
    assert int(oracle["gain"].isfinite().sum()) == int(bank.valid.sum())  # every valid position measured
    assert oracle["gain"][~bank.valid].isnan().all()


def test_vmap_leaves_the_model_unchanged(setup):
    pair, bank, teacher_lp = setup
    before = copy.deepcopy(pair.student.state_dict())
    pair.student.set_attn_implementation("sdpa")
    attn = pair.student.config._attn_implementation
    engine.single_step_vmap(pair.student, bank, teacher_lp, engine.StepConfig(lr=1e-4), pair.vocab_size)
    assert pair.student.config._attn_implementation == attn
    assert all(torch.equal(before[k], v) for k, v in pair.student.state_dict().items())
    pair.student.set_attn_implementation("eager")


def test_first_order_matches_small_steps(setup):
    pair, bank, teacher_lp = setup
    out = engine.single_step_vmap(pair.student, bank, teacher_lp, engine.StepConfig(lr=1e-7), pair.vocab_size,
                                  first_order=True)
    valid = bank.valid
    # Proposition 1: for a small enough step, G = lr <grad L_fix, grad l_t> + O(lr^2)
    first_order = out["gain_first_order"][valid]
    rel = (out["gain"][valid] - first_order).abs() / first_order.abs().clamp(min=1e-9)
    assert rel.median() < 0.05


def test_group_step_equals_manual_update(setup):
    pair, bank, teacher_lp = setup
    keep = torch.zeros_like(bank.valid)
    keep[0, 1] = keep[2, 0] = keep[3, 4] = True
    step = engine.StepConfig(lr=1e-4)
    gain = engine.group_step_gains(pair.student, bank, pair.teacher, keep, step, pair.vocab_size, batch_size=2)
    student = copy.deepcopy(pair.student)
    opt = torch.optim.SGD(student.parameters(), lr=1e-4)
    total = 0.0
    for b, t in keep.nonzero().tolist():
        seq = bank.select(slice(b, b + 1))
        logits = student(input_ids=seq.ids).logits[0, seq.pred_idx[0, t], : pair.vocab_size]
        total = total + engine.reverse_kl(teacher_lp[b, t], torch.log_softmax(logits, -1))
    (total / 3).backward()
    opt.step()
    after = engine.forward_kl(teacher_lp, full_logprobs(student, bank, pair.vocab_size))
    before = engine.forward_kl(teacher_lp, full_logprobs(pair.student, bank, pair.vocab_size))
    expected = torch.where(bank.valid, before - after, torch.nan)
    assert_same({"gain": gain}, {"gain": expected})


def test_checkpoint_gains_zero_for_the_same_model(setup):
    pair, bank, teacher_lp = setup
    out = engine.checkpoint_gains(pair.student, pair.student, bank, teacher_lp, pair.vocab_size)
    assert out["gain"][bank.valid].abs().max() == 0
    assert out["gain"][~bank.valid].isnan().all()


def test_bad_inputs(setup):
    pair, bank, teacher_lp = setup
    with pytest.raises(ValueError, match="lr: must be > 0"):
        engine.StepConfig(lr=0.0)
    with pytest.raises(ValueError, match="loss: must be a registered loss \\(sampled_pg, reverse_kl, forward_kl"):
        engine.StepConfig(loss="kl")
    with pytest.raises(ValueError, match="keep: no valid position"):
        engine.group_step_gains(pair.student, bank, pair.teacher, torch.zeros_like(bank.valid), engine.StepConfig(),
                                pair.vocab_size)
