"""`opd_step` (the kept-position forward) against the naive full-logits path; a loss registered once is
both trainable here and diagnosable by the engine."""

from __future__ import annotations

import pytest
import torch

from diagnostics import engine
from diagnostics.lm.forward import PositionLM, ResponseBatch, full_logprobs
from diagnostics.losses import LossInputs, get_loss, register_loss
from opd.config import TrainConfig
from opd.distributed import World
from opd.step import opd_step

from tiny_lm import V, random_ids, tiny_model


@pytest.fixture(scope="module")
def world():
    return World.create("cpu")


def make_batch(seed: int = 0) -> tuple[ResponseBatch, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    prompts, responses = random_ids(gen)
    valid = torch.zeros(4, 6, dtype=torch.bool)
    for i, r in enumerate(responses):
        valid[i, : len(r)] = True
    batch = ResponseBatch.from_ids(prompts, responses, 0, valid)
    signals = {"student_logprob_sampled": -torch.rand(4, 6, generator=gen) * 3,
               "teacher_logprob_sampled": -torch.rand(4, 6, generator=gen) * 3}
    return batch, signals


def naive_loss(student, teacher, batch, signals, keep, config) -> torch.Tensor:
    """Full [B, L, V] logits, per-position loss in a python loop over kept positions, then the normalisation."""
    s_logits = student(input_ids=batch.ids, attention_mask=batch.attention_mask).logits
    s_lp_all = torch.log_softmax(s_logits[..., :V].float(), -1)
    with torch.no_grad():
        t_logits = teacher(input_ids=batch.ids, attention_mask=batch.attention_mask).logits
        t_lp_all = torch.log_softmax(t_logits[..., :V].float(), -1)
    spec = get_loss(config.loss)
    n_kept = int(keep.sum())
    n_seq = int(keep.any(1).sum())
    total = torch.zeros(())
    for b, t in keep.nonzero().tolist():
        idx = int(batch.pred_idx[b, t])
        x = LossInputs(s_lp_all[b, idx][None], batch.targets[b, t][None],
                       signals["student_logprob_sampled"][b, t][None], signals["teacher_logprob_sampled"][b, t][None],
                       t_lp_all[b, idx][None])
        loss = spec.fn(x)["loss"][0]
        weight = 1 / n_kept if config.normalization == "kept_global" else 1 / (int(keep[b].sum()) * n_seq)
        total = total + weight * loss
    return total


@pytest.mark.parametrize("loss", ["sampled_pg", "reverse_kl", "forward_kl"])
@pytest.mark.parametrize("normalization", ["kept_global", "per_sequence_mean"])
@pytest.mark.parametrize("micro", [0, 3])
def test_kept_path_equals_naive_path(world, loss, normalization, micro):
    batch, signals = make_batch()
    keep = batch.valid & (torch.rand(batch.valid.shape, generator=torch.Generator().manual_seed(1)) < 0.4)
    keep[1, 0] = True  # every row keeps something
    config = TrainConfig(loss=loss, normalization=normalization, micro_batch_size=micro)
    student, teacher = tiny_model(0), tiny_model(1)
    stats = opd_step(PositionLM(student, V), PositionLM(teacher, V), batch, signals, keep, config, world)
    fast = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    reference = naive_loss(student, teacher, batch, signals, keep, config)
    reference.backward()
    assert stats["loss"] == pytest.approx(float(reference.detach()), rel=1e-5, abs=1e-6)
    assert stats["kept_tokens"] == int(keep.sum())
    for name, p in student.named_parameters():
        assert torch.allclose(fast[name], p.grad, atol=1e-6, rtol=1e-4), name


def test_nothing_kept_gives_zero_loss_and_gradient(world):
    batch, signals = make_batch()
    student = tiny_model(0)
    stats = opd_step(PositionLM(student, V), PositionLM(tiny_model(1), V), batch, signals,
                     torch.zeros_like(batch.valid), TrainConfig(), world)
    assert stats["loss"] == 0 and stats["kept_tokens"] == 0
    assert all(p.grad is None or not p.grad.any() for p in student.parameters())


# A toy loss, registered once: squared error between the student's and the teacher's log-prob of the
# sampled token. Nothing else is written for it, yet the trainer and the engine both take it by name.
@register_loss("test_token_sq", description="(log pS(y) - log pT(y))^2, registered by a test")
def _token_sq(x: LossInputs) -> dict[str, torch.Tensor]:
    logp = x.student_logprobs.gather(1, x.targets[:, None])[:, 0]
    return {"loss": (logp - x.teacher_token_logprobs) ** 2}


def test_a_registered_loss_is_trainable_and_diagnosable(world):
    batch, signals = make_batch()
    student, teacher = tiny_model(0), tiny_model(1)
    # trainable: TrainConfig accepts the name; one opd_step + optimizer step changes the parameters
    config = TrainConfig(loss="test_token_sq")
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    stats = opd_step(PositionLM(student, V), PositionLM(teacher, V), batch, signals, batch.valid, config, world)
    assert stats["kept_tokens"] == int(batch.valid.sum()) and stats["loss"] > 0
    torch.optim.SGD(student.parameters(), lr=0.1).step()
    assert any(not torch.equal(before[n], p.detach()) for n, p in student.named_parameters())
    # diagnosable: the engine's single-step gains, vmap equal to the plain oracle
    student.load_state_dict(before)
    student.set_attn_implementation("eager")
    t_lp = full_logprobs(teacher, batch, V)
    step = engine.StepConfig(loss="test_token_sq", optimizer="sgd", lr=1e-3)
    fast = engine.single_step_vmap(student, batch, t_lp, step, V)
    oracle = engine.single_step_reference(student, batch, t_lp, step, V)
    valid = batch.valid
    assert fast["gain"][valid].abs().max() > 0
    assert torch.allclose(fast["gain"][valid], oracle["gain"][valid], atol=1e-6, rtol=1e-4)
    assert torch.equal(fast["gain"].isnan(), ~valid)


def test_select_kept_follows_the_runs_selection_options(world):
    """The trainer's selection hook: TrainConfig.selection_options() reaches select_by_name; the default
    options are today's select(selection_scores(...)) bit for bit."""
    from diagnostics.signals import select, select_by_name, selection_scores
    from opd.config import Arm
    from opd.step import select_kept

    gen = torch.Generator().manual_seed(4)
    keys = ("student_entropy", "disagreement", "compat_mass", "student_entropy_topk", "disagreement_topk_proxy",
            "compat_mass_lower")
    signals = {k: torch.rand(5, 9, generator=gen) for k in keys}
    valid = torch.rand(5, 9, generator=gen) < 0.8
    valid[:, 0] = True
    arm = Arm("q3_only_ranked", 0.1, 0)
    today = select_kept(signals, valid, Arm("teachability", 0.1, 0), 1, world, seed=3)
    scores = selection_scores({k: signals[k] for k in keys[:3]}, valid, seed=3)
    assert torch.equal(today, select(scores["teachability"], valid, 0.1, min_per_sequence=1))
    paper = TrainConfig(preset="paper").selection_options()
    got = select_kept(signals, valid, arm, 1, world, seed=3, options=paper)
    want = select_by_name(signals, valid, "q3_only_ranked", 0.1, min_per_sequence=1, seed=3, options=paper)
    assert torch.equal(got, want) and all(got[b].any() for b in range(5))  # top-up reaches every response
