"""The trainer's optimizers by name (`TrainConfig.optimizer`): `adamw`, `adam` and the release's `paper`.

* `adamw`: torch AdamW(lr, betas, weight_decay) on every parameter (the project's default).
* `adam`: torch Adam(lr, betas, weight_decay): weight decay as an L2 term in the gradient.
* `paper`: the optimizer the paper's release trained with: Megatron-LM's Adam under the release's flags,
  `--optimizer adam --lr 1e-6 --lr-decay-style constant --weight-decay 0.1 --adam-beta1 0.9
  --adam-beta2 0.98` and no `--clip-grad` (TA-OPD/slime_ta_opd/examples/on_policy_distillation/
  run-qwen3-1.7B-sampled-opd-sglang.sh, OPTIMIZER_ARGS, public repository ckjsuperhh/taopd-baseline).
  Megatron's "adam" is decoupled weight decay (Transformer Engine / apex FusedAdam in AdamW mode; its
  torch fallback is `torch.optim.AdamW`: megatron/core/optimizer/__init__.py, imports), eps 1e-8 (its
  `--adam-eps` default), no weight decay on biases and 1-D parameters (norm gains; its default
  parameter groups, `_get_param_groups` / `get_standard_config_overrides`), gradient clipping at
  global norm 1.0 (its `--clip-grad` default) and a constant learning rate. `PAPER_ADAM` holds the
  values; `opd.config` writes betas, weight_decay and max_grad_norm into the config so the saved
  config shows them, and the trainer clips with `max_grad_norm` as for any optimizer. The learning
  rate stays `TrainConfig.lr` (the release's 1e-6 is for Qwen3 models; the testbed has its own).

The trainer has no learning-rate schedule: every optimizer here runs at a constant learning rate.
"""

from __future__ import annotations

import torch

OPTIMIZERS = ("adamw", "adam", "paper")
# Megatron-LM Adam as the release ran it (module docstring); max_grad_norm is Megatron's --clip-grad default
PAPER_ADAM = {"betas": [0.9, 0.98], "weight_decay": 0.1, "max_grad_norm": 1.0, "eps": 1e-8}


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Megatron's default rule: biases and 1-D parameters (norm gains) are not decayed."""
    return name.endswith(".bias") or param.dim() == 1


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """[decayed, not decayed] parameter groups of the trainable parameters (Megatron's default split)."""
    decay, keep = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (keep if no_weight_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, config) -> torch.optim.Optimizer:
    """The optimizer `config.optimizer` names, over `model`'s parameters (config: `opd.config.TrainConfig`)."""
    betas = tuple(config.betas)
    if config.optimizer == "paper":
        return torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=betas,
                                 eps=PAPER_ADAM["eps"])
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=betas)
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=betas)
    raise ValueError(f"optimizer: must be one of {list(OPTIMIZERS)}, got {config.optimizer!r}")


def optimizer_record(config) -> dict:
    """What the run's optimizer is, for manifest.json."""
    meaning = {
        "adamw": "torch AdamW on every parameter (decoupled weight decay)",
        "adam": "torch Adam on every parameter (weight decay as an L2 gradient term)",
        "paper": "the release's Megatron-LM Adam: torch AdamW, eps 1e-8, no weight decay on biases and 1-D "
                 "parameters, gradient clipping at global norm 1.0",
    }[config.optimizer]
    return {"optimizer": config.optimizer, "optimizer_meaning": meaning, "lr": config.lr, "lr_schedule": "constant",
            "betas": list(config.betas), "weight_decay": config.weight_decay, "max_grad_norm": config.max_grad_norm,
            "eps": PAPER_ADAM["eps"]}
