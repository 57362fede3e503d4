"""Soft per-token weights in the loss (issue 22): both normalisations against a plain reference, 0/1 weights equal
to the mask bit for bit, and a weight rule's arm (IW-OPD) through `select_kept` / `select_weights`."""

from __future__ import annotations

import pytest
import torch
from test_opd_step import make_batch

from diagnostics.lm.forward import PositionLM
from diagnostics.losses import LossInputs, get_loss
from diagnostics.signals import iw_opd_weights
from opd.config import Arm, TrainConfig
from opd.distributed import World
from opd.step import opd_step, select_kept, select_weights, soft_token_weights

from tiny_lm import V, tiny_model


@pytest.fixture(scope="module")
def world():
    return World.create("cpu")


def naive_weighted_loss(student, teacher, batch, signals, weights, config) -> torch.Tensor:
    """Full logits, a python loop over positions with w > 0, then the normalisation written from its definition:
    kept_global sum w l / sum w; per_sequence_mean the mean over sequences (sum w > 0) of sum w l / sum w."""
    s_lp_all = torch.log_softmax(student(input_ids=batch.ids, attention_mask=batch.attention_mask).logits[..., :V]
                                 .float(), -1)
    with torch.no_grad():
        t_lp_all = torch.log_softmax(teacher(input_ids=batch.ids, attention_mask=batch.attention_mask).logits[..., :V]
                                     .float(), -1)
    spec = get_loss(config.loss)
    per_seq: dict[int, list[tuple[float, torch.Tensor]]] = {}
    for b, t in (weights > 0).nonzero().tolist():
        idx = int(batch.pred_idx[b, t])
        x = LossInputs(s_lp_all[b, idx][None], batch.targets[b, t][None],
                       signals["student_logprob_sampled"][b, t][None], signals["teacher_logprob_sampled"][b, t][None],
                       t_lp_all[b, idx][None])
        per_seq.setdefault(b, []).append((float(weights[b, t]), spec.fn(x)["loss"][0]))
    if config.normalization == "kept_global":
        total_w = sum(w for items in per_seq.values() for w, _ in items)
        return sum(w * loss for items in per_seq.values() for w, loss in items) / total_w
    means = [sum(w * loss for w, loss in items) / sum(w for w, _ in items) for items in per_seq.values()]
    return sum(means) / len(means)


@pytest.mark.parametrize("loss", ["sampled_pg", "reverse_kl"])
@pytest.mark.parametrize("normalization", ["kept_global", "per_sequence_mean"])
@pytest.mark.parametrize("micro", [0, 3])
def test_soft_weights_equal_the_plain_reference(world, loss, normalization, micro):
    batch, signals = make_batch()
    weights = torch.rand(batch.valid.shape, generator=torch.Generator().manual_seed(4)) * batch.valid
    weights[2] = 0.0  # a sequence with no weight: left out of per_sequence_mean's count
    config = TrainConfig(loss=loss, normalization=normalization, micro_batch_size=micro)
    student, teacher = tiny_model(0), tiny_model(1)
    stats = opd_step(PositionLM(student, V), PositionLM(teacher, V), batch, signals, batch.valid, config, world,
                     weights=weights)
    fast = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    reference = naive_weighted_loss(student, teacher, batch, signals, weights, config)
    reference.backward()
    assert stats["loss"] == pytest.approx(float(reference.detach()), rel=1e-5, abs=1e-6)
    for name, p in student.named_parameters():
        assert torch.allclose(fast[name], p.grad, atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("normalization", ["kept_global", "per_sequence_mean"])
@pytest.mark.parametrize("micro", [0, 3])
def test_zero_one_weights_are_the_mask_bit_for_bit(world, normalization, micro):
    batch, signals = make_batch()
    keep = batch.valid & (torch.rand(batch.valid.shape, generator=torch.Generator().manual_seed(1)) < 0.4)
    keep[1, 0] = True
    config = TrainConfig(normalization=normalization, micro_batch_size=micro)
    grads = []
    for weights in (None, keep.float()):
        student = tiny_model(0)
        stats = opd_step(PositionLM(student, V), PositionLM(tiny_model(1), V), batch, signals, keep, config, world,
                         weights=weights)
        grads.append(([p.grad.clone() for p in student.parameters()], stats))
    (mask_grads, mask_stats), (w_grads, w_stats) = grads
    assert mask_stats == w_stats
    assert all(torch.equal(a, b) for a, b in zip(mask_grads, w_grads))


def test_soft_token_weights_with_ones_is_token_weights():
    from opd.normalization import token_weights

    rows = torch.tensor([0, 0, 1, 3, 3, 3])
    per_seq = torch.tensor([2, 1, 0, 3])
    for norm in ("kept_global", "per_sequence_mean"):
        want = token_weights(rows, norm, 6, 3, per_seq)
        got = soft_token_weights(torch.ones(6), rows, norm, 6.0, 3, per_seq.float())
        assert torch.equal(got, want), norm
    with pytest.raises(ValueError, match="normalization"):
        soft_token_weights(torch.ones(6), rows, "mean", 6.0, 3, per_seq.float())


def test_weight_rule_arm_keeps_every_token_with_iw_opd_weights(world):
    batch, signals = make_batch()
    arm = Arm("iw_opd", 1.0, 0)
    keep = select_kept(signals, batch.valid, arm, 0, world, seed=0)
    assert torch.equal(keep, batch.valid)
    weights = select_weights(signals, batch.valid, arm, world, seed=0)
    want = iw_opd_weights(signals["teacher_logprob_sampled"], signals["student_logprob_sampled"], batch.valid)
    assert torch.equal(weights, want)
    assert select_weights(signals, batch.valid, Arm("random", 0.5, 0), world, seed=0) is None
