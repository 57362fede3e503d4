"""diagnostics.losses against plain per-position loops, math properties, clipping, registry, the one KL."""

from __future__ import annotations

import math

import pytest
import torch

from diagnostics import engine
from diagnostics.losses import LossInputs, get_loss, kl_divergence, list_losses, register_loss

N, V = 7, 11


def make_inputs(seed: int = 0, *, same: bool = False, ratio_scale: float = 0.3) -> LossInputs:
    gen = torch.Generator().manual_seed(seed)
    s_logits = torch.randn(N, V, generator=gen, dtype=torch.float64).float() * 2
    t_logits = s_logits.clone() if same else torch.randn(N, V, generator=gen) * 2
    s_lp = torch.log_softmax(s_logits, dim=-1).requires_grad_(True)
    t_lp = torch.log_softmax(t_logits, dim=-1)
    targets = torch.randint(0, V, (N,), generator=gen)
    old = s_lp.detach().gather(1, targets[:, None])[:, 0] + ratio_scale * torch.randn(N, generator=gen)
    return LossInputs(s_lp, targets, old, t_lp.gather(1, targets[:, None])[:, 0], t_lp)


def reference_sampled_pg(x: LossInputs) -> list[float]:
    out = []
    for i in range(N):
        logp = float(x.student_logprobs.detach()[i, x.targets[i]])
        adv = float(x.teacher_token_logprobs[i]) - float(x.old_logprobs[i])
        ratio = math.exp(logp - float(x.old_logprobs[i]))
        clipped = min(max(ratio, 1 - x.clip_low), 1 + x.clip_high)
        out.append(-min(ratio * adv, clipped * adv))
    return out


def reference_kl(p_lp: torch.Tensor, q_lp: torch.Tensor) -> list[float]:
    """KL(p || q) row by row with python floats; 0 log 0 = 0."""
    rows = []
    for i in range(p_lp.shape[0]):
        total = 0.0
        for v in range(p_lp.shape[1]):
            p = math.exp(float(p_lp[i, v]))
            if p > 0:
                total += p * (float(p_lp[i, v]) - float(q_lp[i, v]))
        rows.append(total)
    return rows


def test_sampled_pg_matches_loop():
    x = make_inputs()
    got = get_loss("sampled_pg").fn(x)["loss"]
    assert torch.allclose(got, torch.tensor(reference_sampled_pg(x)), atol=1e-5)


def test_sampled_pg_first_step_gradient_is_policy_gradient():
    # ratio = 1 (old = current): l = -A r, d l / d log pS(y) = -A (the unbiased reverse-KL estimator)
    x = make_inputs(ratio_scale=0.0)
    x.old_logprobs = x.student_logprobs.detach().gather(1, x.targets[:, None])[:, 0]
    loss = get_loss("sampled_pg").fn(x)["loss"]
    (grad,) = torch.autograd.grad(loss.sum(), x.student_logprobs)
    adv = x.teacher_token_logprobs - x.old_logprobs
    expected = torch.zeros(N, V)
    expected[torch.arange(N), x.targets] = -adv
    assert torch.allclose(grad, expected, atol=1e-6)


@pytest.mark.parametrize("log_ratio, advantage, clipped", [
    (math.log(1.5), 1.0, True),    # r > 1 + 0.28 and A > 0: clipped, no gradient
    (math.log(1.1), 1.0, False),   # inside the range
    (math.log(0.5), -1.0, True),   # r < 1 - 0.2 and A < 0: clipped, no gradient
    (math.log(0.5), 1.0, False),   # r < 1 - 0.2 but A > 0: the unclipped term is the min
    (math.log(1.5), -1.0, False),  # r > 1 + 0.28 but A < 0: unclipped (pessimistic) term
])
def test_sampled_pg_clipping(log_ratio, advantage, clipped):
    s_lp = torch.log_softmax(torch.zeros(1, 4), dim=-1).requires_grad_(True)
    targets = torch.tensor([2])
    old = s_lp.detach()[:, 2] - log_ratio
    x = LossInputs(s_lp, targets, old, old + advantage, None)
    out = get_loss("sampled_pg").fn(x)
    ratio = math.exp(log_ratio)
    bound = min(max(ratio, 0.8), 1.28)
    assert float(out["loss"].detach()) == pytest.approx(-min(ratio * advantage, bound * advantage), rel=1e-6)
    assert bool(out["clipped"][0]) is clipped
    (grad,) = torch.autograd.grad(out["loss"].sum(), s_lp)
    if clipped:
        assert torch.all(grad == 0)
    else:
        assert float(grad[0, 2]) == pytest.approx(-advantage * ratio, rel=1e-5)


@pytest.mark.parametrize("name, order", [("reverse_kl", "st"), ("forward_kl", "ts")])
def test_kl_losses_match_loops_and_engine(name, order):
    x = make_inputs(1)
    got = get_loss(name).fn(x)["loss"]
    s, t = x.student_logprobs.detach(), x.teacher_logprobs
    p, q = (s, t) if order == "st" else (t, s)
    assert torch.allclose(got, torch.tensor(reference_kl(p, q)), atol=1e-5)
    engine_fn = engine.kl_reverse if name == "reverse_kl" else engine.kl_forward
    assert torch.equal(got.detach(), engine_fn(t, s))  # one KL implementation
    assert torch.equal(got.detach(), kl_divergence(p, q))


@pytest.mark.parametrize("name", ["reverse_kl", "forward_kl"])
def test_kl_losses_zero_for_identical_models(name):
    x = make_inputs(2, same=True)
    loss = get_loss(name).fn(x)["loss"]
    (grad,) = torch.autograd.grad(loss.sum(), x.student_logprobs)
    assert torch.allclose(loss, torch.zeros(N), atol=1e-6)
    # zero gradient w.r.t. the logits (through log_softmax) at the minimum
    logits = x.teacher_logprobs.clone().requires_grad_(True)
    x2 = LossInputs(torch.log_softmax(logits, -1), x.targets, x.old_logprobs, x.teacher_token_logprobs,
                    x.teacher_logprobs)
    (g2,) = torch.autograd.grad(get_loss(name).fn(x2)["loss"].sum(), logits)
    assert g2.abs().max() < 1e-6


def test_forward_kl_masked_teacher_token_has_no_nan_gradient():
    x = make_inputs(3)
    t = x.teacher_logprobs.clone()
    t[:, 0] = float("-inf")
    x.teacher_logprobs = torch.log_softmax(t, dim=-1)
    loss = get_loss("forward_kl").fn(x)["loss"]
    (grad,) = torch.autograd.grad(loss.sum(), x.student_logprobs)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_registry_errors():
    assert list_losses()[:3] == ["sampled_pg", "reverse_kl", "forward_kl"]
    with pytest.raises(KeyError, match="registered losses: \\['sampled_pg', 'reverse_kl', 'forward_kl'"):
        get_loss("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_loss("sampled_pg", description="dup")(lambda x: {"loss": x.targets.float()})
