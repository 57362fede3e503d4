"""Temperature in training: the loss reads the tempered distribution the rollouts were sampled from.

(a) T = 1: `opd_step` is the untempered loss bit for bit and scoring adds no tempered keys; (b) T != 1: the old
log-probs are log_softmax(logits / T) at the sampled ids (a plain full-logits reference), the teacher's too
(`opd.step.TEMPERATURE_CONVENTION`), selection signals stay untempered, and the PPO ratio is 1 at the first
step; (c) top_p < 1 is a config error naming `top_p`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from diagnostics.core.config import ConfigError
from diagnostics.generation.hf import score_rollouts_hf
from diagnostics.generation.scoring import TEMPERED_KEYS
from diagnostics.lm.forward import PositionLM, ResponseBatch, kept_index
from diagnostics.losses import LossInputs, get_loss
from opd import step as step_module
from opd.config import TrainConfig
from opd.distributed import World
from opd.normalization import token_weights
from opd.step import opd_step

from tiny_lm import V, random_ids, tiny_model


@pytest.fixture(scope="module")
def world():
    return World.create("cpu")


def scored_rollouts(student, teacher, temperature: float):
    """Random prompts/responses as a rollout store, scored at `temperature`: (store, batch, ScoredBatch)."""
    prompts, responses = random_ids(torch.Generator().manual_seed(5))
    store = pd.DataFrame({"prompt_id": range(4), "sample_idx": [0] * 4, "prompt_ids": prompts,
                          "response_ids": responses})
    scored = score_rollouts_hf(store, student=student, teacher=teacher, vocab_size=V, k=4, temperature=temperature,
                               progress=False)
    batch = ResponseBatch.from_ids(prompts, responses, 0, scored.valid)
    return batch, scored


def reference_logprobs(model, batch: ResponseBatch, temperature: float) -> torch.Tensor:
    """[n] log_softmax(logits[:V] / T) at every valid position's sampled token, from the full [B, L, V] logits."""
    rows, pos, cols = kept_index(batch, batch.valid)
    with torch.no_grad():
        logits = model(input_ids=batch.ids, attention_mask=batch.attention_mask).logits[rows, cols, :V].float()
    return torch.log_softmax(logits / temperature, dim=-1).gather(1, batch.targets[rows, pos][:, None])[:, 0]


def capture_loss_inputs(monkeypatch) -> list[LossInputs]:
    """Make `opd_step` record the LossInputs it builds (the registered loss still runs)."""
    seen: list[LossInputs] = []

    def recording(name):
        spec = get_loss(name)
        return dataclasses.replace(spec, fn=lambda x: seen.append(x) or spec.fn(x))

    monkeypatch.setattr(step_module, "get_loss", recording)
    return seen


def test_top_p_below_one_is_a_config_error():
    with pytest.raises(ConfigError, match="top_p"):
        TrainConfig(top_p=0.9)
    TrainConfig(top_p=1.0, temperature=0.7)  # temperature alone is honoured


@pytest.mark.parametrize("loss", ["sampled_pg", "reverse_kl"])
def test_temperature_one_is_the_untempered_loss_bit_for_bit(world, loss):
    student, teacher = tiny_model(0), tiny_model(1)
    batch, scored = scored_rollouts(student, teacher, 1.0)
    assert not set(TEMPERED_KEYS) & set(scored.signals)
    config = TrainConfig(loss=loss, temperature=1.0)
    stats = opd_step(PositionLM(student, V), PositionLM(teacher, V), batch, scored.signals, batch.valid, config, world)
    grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad(set_to_none=True)
    # the pre-temperature formula, written out: untempered log-probs everywhere
    rows, pos, cols = kept_index(batch, batch.valid)
    student_lp = torch.log_softmax(PositionLM(student, V)(batch.ids, batch.attention_mask, rows, cols).float(), -1)
    with torch.no_grad():
        teacher_lp = torch.log_softmax(PositionLM(teacher, V)(batch.ids, batch.attention_mask, rows, cols).float(), -1)
    inputs = LossInputs(student_lp, batch.targets[rows, pos], scored.signals["student_logprob_sampled"][rows, pos],
                        scored.signals["teacher_logprob_sampled"][rows, pos], teacher_lp)
    weights = token_weights(rows, config.normalization, len(rows), 4, batch.valid.sum(1))
    reference = (weights * get_loss(loss).fn(inputs)["loss"]).sum()
    reference.backward()
    assert stats["loss"] == float(reference.detach())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, student.parameters()))


def test_tempered_old_logprobs_and_first_step_ratio(world, monkeypatch):
    temperature = 0.7
    student, teacher = tiny_model(0), tiny_model(1)
    batch, scored = scored_rollouts(student, teacher, temperature)
    rows, pos, _ = kept_index(batch, batch.valid)
    old = scored.signals["student_logprob_tempered"][rows, pos]
    assert torch.allclose(old, reference_logprobs(student, batch, temperature), atol=1e-6, rtol=0)
    assert torch.allclose(scored.signals["teacher_logprob_tempered"][rows, pos],
                          reference_logprobs(teacher, batch, temperature), atol=1e-6, rtol=0)
    # selection signals stay the untempered distributions'
    assert torch.allclose(scored.signals["student_logprob_sampled"][rows, pos],
                          reference_logprobs(student, batch, 1.0), atol=1e-6, rtol=0)
    assert not torch.allclose(old, scored.signals["student_logprob_sampled"][rows, pos], atol=1e-3)

    seen = capture_loss_inputs(monkeypatch)
    config = TrainConfig(loss="sampled_pg", temperature=temperature, clip_low=1e-4, clip_high=1e-4)
    stats = opd_step(PositionLM(student, V), PositionLM(teacher, V), batch, scored.signals, batch.valid, config,
                     world)
    (inputs,) = seen
    now = inputs.student_logprobs.gather(1, inputs.targets[:, None])[:, 0]
    assert torch.allclose(now.detach(), reference_logprobs(student, batch, temperature), atol=1e-6, rtol=0)
    assert torch.equal(inputs.old_logprobs, old)
    ratio = torch.exp(now - inputs.old_logprobs).detach()
    # the same float32 weights and the same log_softmax(logits / T) in scoring and in the step: exactly 1 here
    assert torch.equal(ratio, torch.ones_like(ratio))
    assert stats["clip_fraction"] == 0.0  # even a +-1e-4 clip range is never active at the first step
    # the untempered old log-probs (the bug) would not give a ratio of 1
    untempered = torch.exp(now - scored.signals["student_logprob_sampled"][rows, pos]).detach()
    assert (untempered - 1).abs().max() > 1e-2


def test_full_vocabulary_losses_temper_the_teacher_too(world, monkeypatch):
    temperature = 1.5
    student, teacher = tiny_model(0), tiny_model(1)
    batch, scored = scored_rollouts(student, teacher, temperature)
    seen = capture_loss_inputs(monkeypatch)
    opd_step(PositionLM(student, V), PositionLM(teacher, V), batch, scored.signals, batch.valid,
             TrainConfig(loss="reverse_kl", temperature=temperature), world)
    (inputs,) = seen
    assert torch.allclose(inputs.teacher_logprobs.gather(1, inputs.targets[:, None])[:, 0],
                          reference_logprobs(teacher, batch, temperature), atol=1e-6, rtol=0)
    assert torch.allclose(inputs.teacher_token_logprobs, reference_logprobs(teacher, batch, temperature),
                          atol=1e-6, rtol=0)


@pytest.mark.slow
def test_tempered_training_runs_and_records_the_convention(tmp_path, small_testbed):
    from diagnostics.core.config import load_config
    from opd.engines import run_training
    from opd.step import TEMPERATURE_CONVENTION

    root = Path(__file__).resolve().parents[2]
    config = load_config(TrainConfig, root / "configs/train_quick.yaml",
                         [f"testbed_config={root / 'configs/testbed_small.yaml'}", f"out_dir={tmp_path}",
                          "temperature=0.7", "steps=2", "selectors=[full]", "checkpoint_every=0", "eval_every=2"])
    run_dir = run_training(config)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["temperature"] == 0.7 and manifest["temperature_convention"] == TEMPERATURE_CONVENTION
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert metrics["loss"].iloc[1:].notna().all()
