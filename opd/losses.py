"""OPD token losses (a registry, as verl's policy losses) and the two budget normalisations.

A loss maps the student's log-probs at the KEPT positions (and what the teacher and the rollout
provide there) to one loss per kept position. Everything is float32 and works on [n, V] rows of
kept positions only: the caller never materialises logits at unkept positions (spec 1, "Budgeted
objective": unselected tokens stay in the context, only their loss is masked).

Registered losses (spec section 1):

* ``sampled_pg`` (default; what the paper trains with): advantage A_t = log pT(y_t) - log pS_old(y_t),
  detached, in a PPO-style clipped policy-gradient loss with ratio r_t = pS(y_t) / pS_old(y_t):
  l_t = -min(r_t A_t, clip(r_t, 1 - clip_low, 1 + clip_high) A_t), clip 0.2 low / 0.28 high.
  Reads only the sampled token: the teacher's full distribution is never needed.
* ``reverse_kl``: l_t = KL(pS || pT) = sum_v pS(v) [log pS(v) - log pT(v)] over the full vocabulary.
* ``forward_kl``: l_t = KL(pT || pS) = sum_v pT(v) [log pT(v) - log pS(v)] (gradient through pS only).

Normalisation (spec 1; the manifest records which one a run used):

* ``kept_global``: L = sum over kept positions of l_t / (number kept in the WHOLE batch), the count
  taken over every process and gradient-accumulation micro-batch.
* ``per_sequence_mean``: mean over the kept tokens of each sequence, then over the sequences that
  have a kept token (the released trainer's choice), the sequence count again global.

`token_weights` turns either rule into one weight per kept position, so a micro-batch's share of
the loss is sum(w_t l_t) and the gradient of the whole batch is the sum of the micro-batches'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

__all__ = [
    "LossInputs",
    "LossSpec",
    "NORMALIZATIONS",
    "register_loss",
    "get_loss",
    "list_losses",
    "token_weights",
]

NEG_INF = float("-inf")
NORMALIZATIONS = ("kept_global", "per_sequence_mean")
Normalization = Literal["kept_global", "per_sequence_mean"]


@dataclass
class LossInputs:
    """What a loss may read, at n kept positions.

    student_logprobs: [n, V] float32 log pS(. | c_t), WITH grad (the current policy).
    targets: [n] long, the sampled token y_t.
    old_logprobs: [n] float32 log pS_old(y_t) of the policy that sampled the rollout, no grad.
    teacher_token_logprobs: [n] float32 log pT(y_t), no grad.
    teacher_logprobs: [n, V] float32 log pT(. | c_t), no grad; None unless the loss `needs_teacher_full`.
    clip_low, clip_high: PPO ratio clip range [1 - clip_low, 1 + clip_high].
    """

    student_logprobs: Tensor
    targets: Tensor
    old_logprobs: Tensor
    teacher_token_logprobs: Tensor
    teacher_logprobs: Tensor | None = None
    clip_low: float = 0.2
    clip_high: float = 0.28


LossFn = Callable[[LossInputs], dict[str, Tensor]]


@dataclass(frozen=True)
class LossSpec:
    """One registered loss: fn(inputs) -> {"loss": [n] per-position loss, other [n] diagnostics}."""

    name: str
    fn: LossFn
    description: str
    needs_teacher_full: bool


_LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, *, description: str, needs_teacher_full: bool = False) -> Callable[[LossFn], LossFn]:
    """Decorator registering a loss under ``name``; a duplicate name raises ValueError.

    ``needs_teacher_full``: the loss reads the teacher's full [n, V] log-probs (the trainer then
    runs the teacher's LM head at the kept positions); otherwise only log pT(y_t) is provided.
    """

    def decorator(fn: LossFn) -> LossFn:
        if name in _LOSSES:
            raise ValueError(f"loss {name!r} is already registered (by {_LOSSES[name].fn.__qualname__})")
        _LOSSES[name] = LossSpec(name, fn, description, needs_teacher_full)
        return fn

    return decorator


def get_loss(name: str) -> LossSpec:
    """The registered LossSpec; KeyError listing the registered names if unknown."""
    try:
        return _LOSSES[name]
    except KeyError:
        raise KeyError(f"unknown loss {name!r}; registered losses: {list_losses()}") from None


def list_losses() -> list[str]:
    """Registered loss names, in registration order."""
    return list(_LOSSES)


@register_loss("sampled_pg", description="PPO-clipped policy gradient with A_t = log pT(y_t) - log pS_old(y_t) (the paper's)")
def sampled_pg(x: LossInputs) -> dict[str, Tensor]:
    logp = x.student_logprobs.gather(1, x.targets[:, None])[:, 0]  # [n] log pS(y_t), with grad
    advantage = (x.teacher_token_logprobs - x.old_logprobs).detach()  # spec 1: A_t, detached
    ratio = torch.exp(logp - x.old_logprobs.detach())  # r_t = pS / pS_old, in log space
    clipped = ratio.clamp(1.0 - x.clip_low, 1.0 + x.clip_high)
    # -min(r A, clip(r) A) = max(-r A, -clip(r) A): the pessimistic bound of PPO
    loss = torch.maximum(-ratio * advantage, -clipped * advantage)
    is_clipped = (-clipped * advantage > -ratio * advantage).float()  # the clipped term is the active one
    return {"loss": loss, "clipped": is_clipped.detach(), "advantage": advantage}


@register_loss("reverse_kl", description="KL(pS || pT) over the full vocabulary (the full per-token OPD loss)", needs_teacher_full=True)
def reverse_kl(x: LossInputs) -> dict[str, Tensor]:
    s, t = x.student_logprobs, x.teacher_logprobs
    # sum_v pS (log pS - log pT). log_softmax of finite logits is finite, so pS = 0 never meets
    # log pS = -inf here; a teacher -inf (masked token) with pS > 0 gives +inf (the true value).
    loss = (s.exp() * (s - t)).sum(dim=1)
    return {"loss": loss}


@register_loss("forward_kl", description="KL(pT || pS) over the full vocabulary", needs_teacher_full=True)
def forward_kl(x: LossInputs) -> dict[str, Tensor]:
    s, t = x.student_logprobs, x.teacher_logprobs
    # sum_v pT (log pT - log pS); terms with pT = 0 (log pT = -inf) are 0. where() picks 0 there and
    # its gradient w.r.t. s in the unpicked branch is -pT = 0, so no NaN leaks into backward.
    terms = torch.where(t == NEG_INF, 0.0, t.exp() * (t - s))
    return {"loss": terms.sum(dim=1)}


def token_weights(seq_of_kept: Tensor, normalization: str, n_kept_global: int, n_seq_global: int, n_kept_per_seq: Tensor) -> Tensor:
    """One weight per kept position so that the batch loss is sum_t w_t l_t (spec 1).

    Args:
        seq_of_kept: [n] long, the (local) sequence row of each kept position.
        normalization: "kept_global" (w = 1 / n_kept_global) or "per_sequence_mean"
            (w = 1 / (kept in that sequence * n_seq_global)).
        n_kept_global: kept positions in the whole batch (all processes, all micro-batches).
        n_seq_global: sequences with at least one kept position, in the whole batch.
        n_kept_per_seq: [B_local] long, kept positions per local sequence.
    Returns:
        [n] float32 weights (empty when n = 0).
    """
    if normalization == "kept_global":
        return torch.full(seq_of_kept.shape, 1.0 / max(n_kept_global, 1))
    if normalization == "per_sequence_mean":
        per_seq = n_kept_per_seq[seq_of_kept].float().clamp_min(1.0)  # >= 1 for a kept position's row
        return 1.0 / (per_seq * max(n_seq_global, 1))
    raise ValueError(f"normalization: must be one of {list(NORMALIZATIONS)}, got {normalization!r}")
