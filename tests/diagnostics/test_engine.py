"""The fixed-context engine: production paths equal the plain oracle; group and checkpoint gains."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from diagnostics import engine
from diagnostics.lm.forward import ResponseBatch, full_logprobs
from diagnostics.lm.models import load_pair
from diagnostics.testbed.build import encode_problem
from diagnostics.testbed.config import heldout_problems

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
        total = total + engine.kl_reverse(teacher_lp[b, t], torch.log_softmax(logits, -1))
    (total / 3).backward()
    opt.step()
    after = engine.kl_forward(teacher_lp, full_logprobs(student, bank, pair.vocab_size))
    before = engine.kl_forward(teacher_lp, full_logprobs(pair.student, bank, pair.vocab_size))
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


# Mixed precision (float32 master weights, bf16 autocast of the loss forward, float32 measurement): the gains
# equal float32's to MIXED_TOL, norm-relative over the valid positions. Why that bound: the two runs differ only
# in the gradient, computed through bf16 matmuls (8 significand bits, rounding 2^-9 ~ 2e-3 per operation,
# compounding over the testbed's layers); measured 0.2-0.4% on the small testbed (SGD 1e-4 and 1e-3, Adam 1e-4
# and 1e-6), so 2e-2 leaves a 5x margin while a wrong measurement precision fails it by orders of magnitude
# (bf16 re-scoring: 199% at SGD 1e-4 on the small testbed). Measured on this (default) testbed: single-step
# loop 0.15% / 0.01%, vmap 0.11% / 0.03% (SGD 1e-4 / Adam 1e-6). The group update sums the gradients of several
# positions, whose bf16 errors add: measured 3.0% / 0.8% on the earlier build of the testbed, 15.9% at SGD 1e-4 (Adam
# 1e-6 under 10%) on the shipped build (another CPU's float rounding, another model); GROUP_TOL = 0.3 keeps a 2x
# margin over that and stays far below the failure it guards (bf16 re-scoring: 199%).
MIXED_TOL = 2e-2
GROUP_TOL = 3e-1


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.slow
@pytest.mark.parametrize("optimizer,lr", [("sgd", 1e-4), ("adam", 1e-6)])
def test_mixed_precision_updates_match_float32(setup, optimizer, lr):
    pair, bank, teacher_lp = setup
    valid = bank.valid
    float32 = engine.single_step_loop(pair.student, bank, teacher_lp, engine.StepConfig(optimizer=optimizer, lr=lr),
                                      pair.vocab_size)["gain"][valid]
    mixed = engine.StepConfig(optimizer=optimizer, lr=lr, compute_dtype=torch.bfloat16)
    loop = engine.single_step_loop(pair.student, bank, teacher_lp, mixed, pair.vocab_size)["gain"][valid]
    vmap = engine.single_step_vmap(pair.student, bank, teacher_lp, mixed, pair.vocab_size)["gain"][valid]
    assert relative(loop, float32) <= MIXED_TOL
    assert relative(vmap, float32) <= MIXED_TOL
    keep = torch.zeros_like(valid)
    keep[0, 1] = keep[2, 0] = keep[3, 4] = True
    group_32 = engine.group_step_gains(pair.student, bank, pair.teacher, keep, engine.StepConfig(optimizer=optimizer,
                                       lr=lr), pair.vocab_size, batch_size=2)[valid]
    group_mixed = engine.group_step_gains(pair.student, bank, pair.teacher, keep, mixed, pair.vocab_size,
                                          batch_size=2)[valid]
    assert relative(group_mixed, group_32) <= GROUP_TOL
    # the defect mixed precision fixes: bf16 parameters stepped directly lose most small updates (gain exactly 0)
    bf16 = copy.deepcopy(pair.student).to(torch.bfloat16)
    pure = engine.single_step_loop(bf16, bank, teacher_lp, engine.StepConfig(optimizer=optimizer, lr=lr),
                                   pair.vocab_size)["gain"][valid]
    lost = float(((pure == 0) & (float32 != 0)).float().mean())  # measured: Adam 1e-6 40%, SGD 1e-4 8.6%
    assert lost > (0.25 if optimizer == "adam" else 0.04)
    # mixed precision loses none (a float32 "gain" below 1e-9 nats is the rounding of a KL difference, not an update)
    assert not ((loop == 0) & (float32.abs() > 1e-9)).any()


def test_mixed_precision_needs_float32_master_weights(setup):
    pair, bank, teacher_lp = setup
    bf16 = copy.deepcopy(pair.student).to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32 master weights"):
        engine.single_step_loop(bf16, bank, teacher_lp, engine.StepConfig(compute_dtype=torch.bfloat16),
                                pair.vocab_size)
    with pytest.raises(ValueError, match="compute_dtype: must be None"):
        engine.StepConfig(compute_dtype=torch.float32)


def test_master_weights_reload_a_low_precision_student_in_float32(small_testbed):
    from diagnostics.lm.models import load_model
    from diagnostics.lm.precision import master_weights, resolve_precision

    cpu = torch.device("cpu")
    bf16 = load_model(small_testbed.student_path, cpu, torch.bfloat16)
    master = master_weights(bf16, small_testbed.student_path, resolve_precision("auto", torch.bfloat16, cpu))
    exact = load_model(small_testbed.student_path, cpu, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(master.parameters(), exact.parameters()))  # not a bf16 cast
    assert master_weights(bf16, small_testbed.student_path, resolve_precision("no", torch.bfloat16, cpu)) is bf16


@pytest.mark.slow
def test_diagnose_with_mixed_precision_matches_float32(tmp_path, small_testbed):
    import pandas as pd

    from diagnostics.core.config import load_config
    from diagnostics.diagnose import run_diagnose
    from diagnostics.diagnose_config import DiagnoseConfig

    root = Path(__file__).resolve().parents[2]

    def gains(mixed_precision: str) -> pd.Series:
        overrides = [f"testbed_config={root / 'configs/testbed_small.yaml'}", f"out_dir={tmp_path}", "n_sequences=4",
                     "shard_sequences=4", "backend=hf", "group_selectors=[]", "method=loop", "dtype=float32",
                     f"mixed_precision={mixed_precision}", "lr=1e-4"]
        run_dir = run_diagnose(load_config(DiagnoseConfig, root / "configs/diagnose.yaml", overrides), progress=False)
        return pd.read_parquet(run_dir / "tokens.parquet").set_index(["seq_id", "pos"])["gain"]

    exact, mixed = gains("no"), gains("bf16")
    assert relative(torch.tensor(mixed.values), torch.tensor(exact.loc[mixed.index].values)) <= MIXED_TOL
