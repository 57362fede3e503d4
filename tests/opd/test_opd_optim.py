"""opd/optim.py: the `paper` optimizer (the release's Megatron Adam) against a plain Adam loop, with clipping.

The release launches Megatron with --optimizer adam --lr 1e-6 --lr-decay-style constant --weight-decay 0.1
--adam-beta1 0.9 --adam-beta2 0.98 and no --clip-grad (TA-OPD/slime_ta_opd/examples/on_policy_distillation/
run-qwen3-1.7B-sampled-opd-sglang.sh, OPTIMIZER_ARGS); Megatron's Adam decays decoupled (AdamW), skips biases
and 1-D parameters and clips at global norm 1.0 by default (megatron/core/optimizer/__init__.py).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from opd.config import TrainConfig
from opd.distributed import World
from opd.optim import make_optimizer, optimizer_record

from tiny_lm import tiny_model


def _loss(model: torch.nn.Module, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 37, (3, 7), generator=gen)
    return model(input_ids=ids).logits.float().pow(2).sum() * 10  # gradient norm far above 1: clipping acts


def _reference_steps(params: dict[str, torch.Tensor], grads: list[dict[str, torch.Tensor]], lr: float) -> dict:
    """Two plain AdamW steps from the definition (float64): clip the global norm to 1.0 (torch's rule:
    g * min(1, 1 / (norm + 1e-6))), decay p by lr * 0.1 except biases and 1-D tensors, then
    m = 0.9 m + 0.1 g, v = 0.98 v + 0.02 g^2, p -= lr * (m / (1 - 0.9^t)) / (sqrt(v / (1 - 0.98^t)) + 1e-8)."""
    p = {n: x.double().clone() for n, x in params.items()}
    m = {n: torch.zeros_like(x) for n, x in p.items()}
    v = {n: torch.zeros_like(x) for n, x in p.items()}
    for t, g_raw in enumerate(grads, start=1):
        norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in g_raw.values()))
        scale = min(1.0, 1.0 / (norm + 1e-6))
        for n in p:
            g = g_raw[n].double() * scale
            if not (n.endswith(".bias") or p[n].dim() == 1):
                p[n] = p[n] * (1 - lr * 0.1)
            m[n] = 0.9 * m[n] + 0.1 * g
            v[n] = 0.98 * v[n] + 0.02 * g * g
            p[n] = p[n] - lr * (m[n] / (1 - 0.9**t)) / ((v[n] / (1 - 0.98**t)).sqrt() + 1e-8)
    return p


def test_paper_optimizer_is_the_release_adam_with_clipping():
    config = TrainConfig(optimizer="paper", lr=1e-2)
    assert (config.betas, config.weight_decay, config.max_grad_norm) == ([0.9, 0.98], 0.1, 1.0)
    model = tiny_model(0)
    optimizer = make_optimizer(model, config)
    decayed, plain = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 and not names[id(p)].endswith(".bias") for p in decayed["params"])
    assert {names[id(p)] for p in plain["params"]} == {n for n, p in model.named_parameters() if p.dim() == 1}
    assert len(plain["params"]) > 0 and len(decayed["params"]) > 0
    for group in optimizer.param_groups:
        assert group["betas"] == (0.9, 0.98) and group["eps"] == 1e-8 and group["lr"] == 1e-2
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    world = World.create("cpu")
    grads = []
    for step in range(2):  # the trainer's order: backward, clip with config.max_grad_norm, step
        optimizer.zero_grad(set_to_none=True)
        _loss(model, step).backward()
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        norm = world.clip_grad_norm(model.parameters(), config.max_grad_norm)
        assert norm > 10  # the reported norm is the pre-clip norm; the update used the clipped one
        optimizer.step()
    want = _reference_steps(start, grads, lr=1e-2)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach().double(), want[n], atol=2e-6, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    assert all(group["lr"] == 1e-2 for group in optimizer.param_groups)  # constant: no schedule


def test_adamw_and_adam_keep_todays_construction():
    model = tiny_model(1)
    for name, cls in (("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam)):
        optimizer = make_optimizer(model, TrainConfig(optimizer=name))
        assert type(optimizer) is cls and len(optimizer.param_groups) == 1
        group = optimizer.param_groups[0]
        assert group["betas"] == (0.9, 0.999) and group["weight_decay"] == 0.1 and group["lr"] == 1e-4
    assert TrainConfig().max_grad_norm == 0.0  # no clipping by default, as before


def test_optimizer_record_names_what_ran():
    record = optimizer_record(TrainConfig(preset="paper"))
    assert record["optimizer"] == "paper" and record["lr_schedule"] == "constant"
    assert record["betas"] == [0.9, 0.98] and record["max_grad_norm"] == 1.0 and "1-D" in record["optimizer_meaning"]


@pytest.mark.parametrize("override", [{"betas": [0.9, 0.95]}, {"weight_decay": 0.0}, {"max_grad_norm": 2.0}])
def test_paper_optimizer_refuses_other_hyperparameters(override):
    from diagnostics.core.config import ConfigError

    key = next(iter(override))
    with pytest.raises(ConfigError, match=rf"{key}.*optimizer: paper"):
        TrainConfig(optimizer="paper", **override)


def test_the_trainer_builds_and_clips_with_the_paper_optimizer(tmp_path, monkeypatch):
    """One step of `run_training` (small testbed, preset=paper): the optimizer the trainer steps is the paper's
    and every step clips the global gradient norm at 1.0."""
    from diagnostics.core.config import load_config
    from opd import trainer
    from opd.engines import run_training

    seen = {"optimizers": [], "max_norms": []}
    build = trainer.make_optimizer

    def spy_optimizer(model, config):
        seen["optimizers"].append(build(model, config))
        return seen["optimizers"][-1]

    clip = World.clip_grad_norm

    def spy_clip(self, parameters, max_norm):
        seen["max_norms"].append(max_norm)
        return clip(self, parameters, max_norm)

    monkeypatch.setattr(trainer, "make_optimizer", spy_optimizer)
    monkeypatch.setattr(World, "clip_grad_norm", spy_clip)
    root = Path(__file__).resolve().parents[2]
    config = load_config(TrainConfig, root / "configs/train_quick.yaml", [
        "preset=paper", "selectors=[teachability]", "steps=1", "eval_every=1", "eval_problems=4", "bank_sequences=2",
        f"out_dir={tmp_path}", "progress=false", "save_students=false", "checkpoint_every=0"])
    run_training(config)
    (optimizer,) = seen["optimizers"]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert all(g["betas"] == (0.9, 0.98) and g["eps"] == 1e-8 for g in optimizer.param_groups)
    assert seen["max_norms"] == [1.0]
    assert optimizer.state  # it stepped
