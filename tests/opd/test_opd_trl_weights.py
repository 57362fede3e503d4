"""A weight rule (IW-OPD) through the TRL integration: one step equals the project's `opd_step` with the same soft
weights, in both normalisations; a weight rule keeps every completion position."""

from __future__ import annotations

import pytest
import torch
from test_opd_trl import LR, PROMPTS, RESPONSES, load_pair, make_trainer, pair, trl_batch, trl_gradient, valid_mask

from diagnostics.lm.forward import PositionLM, ResponseBatch
from diagnostics.signals import iw_opd_weights
from opd.config import TrainConfig
from opd.distributed import World
from opd.integrations.trl import TOKEN_LOGPROBS
from opd.step import opd_step

__all__ = ["pair"]  # the module fixture, shared


@pytest.mark.parametrize("normalization", ["kept_global", "per_sequence_mean"])
def test_one_trl_step_with_iw_opd_weights_equals_opd_step(pair, monkeypatch, tmp_path, normalization):
    trainer = make_trainer(pair, monkeypatch, tmp_path, None, loss="sampled_pg", normalization=normalization,
                           selector="iw_opd", ratio=0.05)
    assert trainer.weighted and trainer.registry_loss and trainer.ratio == 1.0
    signals, valid = trainer.completion_signals(trl_batch(pair[0].pad_token_id))  # before the step
    assert torch.equal(trainer.select_positions(signals, valid), valid)
    weights = trainer.position_weights(signals, valid)
    want = iw_opd_weights(signals["teacher_logprob_sampled"], signals["student_logprob_sampled"], valid)
    assert torch.equal(weights, want) and weights[valid].min() < weights[valid].max()
    trl_gradient(trainer)
    trainer.optimizer.step()

    tokenizer, vocab, _, _ = pair
    student, teacher = load_pair(pair)
    batch = ResponseBatch.from_ids(PROMPTS, RESPONSES, tokenizer.pad_token_id, valid_mask())
    token = {"student_logprob_sampled": signals[TOKEN_LOGPROBS[0]],
             "teacher_logprob_sampled": signals[TOKEN_LOGPROBS[1]]}
    optimizer = torch.optim.SGD(student.parameters(), lr=LR)
    opd_step(PositionLM(student, vocab).train(), PositionLM(teacher, vocab).eval(), batch, token, valid,
             TrainConfig(loss="sampled_pg", normalization=normalization, lr=LR), World.create("cpu"), weights=weights)
    optimizer.step()
    base = {n: p.detach() for n, p in load_pair(pair)[0].named_parameters()}
    expected = dict(student.named_parameters())
    assert max(float((expected[n] - base[n]).abs().max()) for n in base) > 1e-4  # not a vacuous comparison
    for name, param in trainer.model.named_parameters():
        assert (param.detach() - expected[name].detach()).abs().max() <= 1e-6, name
