"""Mixed precision in training (issue 14 item 3): float32 master weights, bf16 autocast forwards.

A Qwen2 with weights ~N(0, 0.02) (transformers' Qwen2 init) trained through `opd_step` and AdamW:
* one update under bf16 autocast equals the float32 update to UPDATE_TOL (see there for why);
* 10 AdamW steps at lr 1e-6 (the paper's lr) change >= 99% of the weights with float32 master weights, while
  the same steps on bfloat16 parameters (the defect: `dtype: auto` on CUDA before) change few (BF16_CHANGED_MAX;
  the measured fraction is in the test).
Plus the option's resolution, the master-weight check, and one training run with mixed_precision=bf16 on CPU.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from diagnostics.core.config import ConfigError, load_config
from diagnostics.lm.forward import PositionLM, ResponseBatch
from diagnostics.lm.precision import AutocastPositionLM, changed_fraction, position_lm, resolve_precision
from opd.config import TrainConfig
from opd.distributed import World
from opd.step import opd_step

from tiny_lm import V, random_ids, tiny_model

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
MIXED = resolve_precision("bf16", torch.float32, CPU)
FP32 = resolve_precision("no", torch.float32, CPU)
# |update_bf16 - update_fp32| / |update_fp32| over all parameters, for one SGD step (the update is lr * grad, so
# this is the gradient's error). bf16 keeps 8 significand bits: each matmul input is rounded by up to 2^-9 ~ 2e-3
# relative, and the tiny model's forward and backward chain about ten such roundings; measured 0.43%, bound 3%.
UPDATE_TOL = 3e-2
# Adam's first step is lr * g / (|g| + eps), ~ lr * sign(g): bf16 noise flips the sign of near-zero gradient
# entries, so its update is compared by the share of entries (|g| above 1e-3 of the largest) whose direction
# agrees (measured 100%; 99.8% over every entry).
ADAM_SIGN_AGREEMENT_MIN = 0.95
CHANGED_MIN = 0.99  # float32 master weights: share of weights changed by 10 AdamW steps at lr 1e-6
BF16_CHANGED_MAX = 0.2  # bf16 parameters stepped directly (measured on this model: see the test)


@pytest.fixture(scope="module")
def world():
    return World.create("cpu")


def make_batch() -> tuple[ResponseBatch, dict[str, torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    prompts, responses = random_ids(gen)
    batch = ResponseBatch.from_ids(prompts, responses, 0)
    zeros = torch.zeros(batch.valid.shape)
    signals = {"student_logprob_sampled": zeros, "teacher_logprob_sampled": zeros}  # unused by reverse_kl
    return batch, signals, batch.valid.clone()


def train_config(**overrides) -> TrainConfig:
    return TrainConfig(loss="reverse_kl", lr=1e-6, weight_decay=0.1, **overrides)


def grads_of_one_step(lm: PositionLM, world: World) -> dict[str, torch.Tensor]:
    teacher = PositionLM(tiny_model(1), V).eval()
    batch, signals, keep = make_batch()
    lm.zero_grad(set_to_none=True)
    opd_step(lm, teacher, batch, signals, keep, train_config(), world)
    return {n: p.grad.detach().clone() for n, p in lm.model.named_parameters()}


def test_one_update_equals_the_float32_update(world):
    student = tiny_model(0)
    exact = grads_of_one_step(PositionLM(copy.deepcopy(student), V), world)
    mixed = grads_of_one_step(position_lm(copy.deepcopy(student), V, MIXED), world)
    assert all(g.dtype == torch.float32 for g in mixed.values())  # gradients on the float32 master weights
    flat_exact = torch.cat([g.flatten() for g in exact.values()])
    flat_mixed = torch.cat([mixed[n].flatten() for n in exact])
    error = float((flat_mixed - flat_exact).norm() / flat_exact.norm())
    assert 0 < error <= UPDATE_TOL, f"bf16-autocast update differs from float32's by {error:.4f}"
    significant = flat_exact.abs() > 1e-3 * flat_exact.abs().max()  # Adam direction: sign of g where g is not ~0
    agreement = float((flat_exact.sign() == flat_mixed.sign())[significant].float().mean())
    assert agreement >= ADAM_SIGN_AGREEMENT_MIN


def ten_adamw_steps(lm: PositionLM, world: World) -> float:
    """Share of weight entries (every parameter but the embedding) changed by 10 AdamW steps at lr 1e-6."""
    teacher = PositionLM(tiny_model(1), V).eval()
    batch, signals, keep = make_batch()
    config = train_config()
    optimizer = torch.optim.AdamW(lm.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    for _ in range(10):
        opd_step(lm, teacher, batch, signals, keep, config, world)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    # the embedding's rows of tokens absent from the batch get no gradient (in any precision): left out
    names = [n for n in before if "embed_tokens" not in n]
    return changed_fraction(before, lm.model, names)


def test_ten_steps_at_lr_1e6_change_nearly_every_weight(world):
    mixed = ten_adamw_steps(position_lm(tiny_model(0), V, MIXED), world)
    bf16 = ten_adamw_steps(PositionLM(tiny_model(0).to(torch.bfloat16), V), world)
    # measured on this model: 100% with float32 master weights (and in plain float32), 2.9% with bf16 parameters
    # (the measurement: 1.9%)
    assert mixed >= CHANGED_MIN, f"mixed precision changed only {mixed:.1%} of the weights"
    assert bf16 <= BF16_CHANGED_MAX, f"bf16 parameters changed {bf16:.1%}"


def test_resolution_and_checks():
    assert resolve_precision("auto", torch.float32, CPU).name == "no"  # CPU default: float32 throughout
    auto_gpu = resolve_precision("auto", torch.bfloat16, torch.device("cuda"))
    assert (auto_gpu.master, auto_gpu.compute, auto_gpu.device_type) == (torch.float32, torch.bfloat16, "cuda")
    pure = resolve_precision("no", torch.bfloat16, CPU)
    assert (pure.master, pure.compute) == (torch.bfloat16, None)
    assert isinstance(position_lm(tiny_model(0), V, MIXED), AutocastPositionLM)
    assert type(position_lm(tiny_model(0), V, FP32)) is PositionLM
    with pytest.raises(ValueError, match="float32 master weights"):
        position_lm(tiny_model(0).to(torch.bfloat16), V, MIXED)
    with pytest.raises(ValueError, match="mixed_precision: must be one of"):
        resolve_precision("fp8", torch.float32, CPU)
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config(TrainConfig, ROOT / "configs/train.yaml", ["mixed_precision=fp8"])
    # accelerate's spelling `no`, which YAML reads as false
    assert load_config(TrainConfig, ROOT / "configs/train.yaml", ["mixed_precision=no"]).mixed_precision == "no"


@pytest.mark.slow
def test_training_with_bf16_autocast_on_cpu(tmp_path, small_testbed):
    from opd.engines import run_training

    overrides = [f"testbed_config={ROOT / 'configs/testbed_small.yaml'}", f"out_dir={tmp_path}", "seeds=[0]",
                 "selectors=[full]", "mixed_precision=bf16", "steps=2", "eval_every=2", "checkpoint_every=0",
                 "save_students=true"]
    config = load_config(TrainConfig, ROOT / "configs/train_quick.yaml", overrides)
    run_dir = run_training(config)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["mixed_precision"] == "bf16" and manifest["rollout_backend"] == "hf"
    config_json = json.loads((run_dir / "arms/full-r1-s0/student/config.json").read_text())
    assert config_json.get("dtype", config_json.get("torch_dtype")) == "float32"
