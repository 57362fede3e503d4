"""The OPD token losses: one registry, used by the trainer (`opd`) and the diagnostic engine alike.

A loss maps the student's log-probs at n positions (and what the teacher and the rollout provide
there) to one loss per position. Everything is float32 on [n, V] rows: the trainer passes the kept
positions only (spec 1, "Budgeted objective": unselected tokens stay in the context, only their loss
is masked); the engine passes one position (or one sequence's positions) at a time and takes the
loss's FIRST step: old log-probs = the current student's, so a PPO ratio is 1 and clipping inactive.

Registered losses (spec section 1):

* ``sampled_pg`` (default for training; what the paper trains with): advantage
  A_t = log pT(y_t) - log pS_old(y_t), detached, in a PPO-style clipped policy-gradient loss with
  ratio r_t = pS(y_t) / pS_old(y_t): l_t = -min(r_t A_t, clip(r_t, 1 - clip_low, 1 + clip_high) A_t),
  clip 0.2 low / 0.28 high. Reads only the sampled token: the teacher's full distribution is never
  needed. At the first step (r = 1) its gradient is -A_t grad log pS(y_t).
* ``reverse_kl`` (default for the diagnostic): l_t = KL(pS || pT) over the full vocabulary.
* ``forward_kl``: l_t = KL(pT || pS) (gradient through pS only).

A new loss is one function plus one ``@register_loss``; `taopd train loss=<name>` and
`taopd diagnose loss=<name>` then both take it. `kl_divergence` is the toolkit's one KL between two
log-prob tensors (the engine's forward/reverse KL metrics are it too).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diagnostics.core.registry import add_once, lookup

__all__ = ["LossInputs", "LossSpec", "register_loss", "get_loss", "list_losses", "kl_divergence"]


def kl_divergence(p_logprobs: Tensor, q_logprobs: Tensor) -> Tensor:
    """KL(p || q) = sum_v p(v) [log p(v) - log q(v)] over the last dim. [..., V] -> [...].

    Terms with p(v) = 0 (log p = -inf, or exp underflow) contribute 0 (0 log 0 = 0); where() picks 0
    there, and its unpicked branch gets a zero gradient times p = 0, so no NaN reaches backward from a
    masked q entry either. q(v) = 0 with p(v) > 0 gives +inf, the true value.
    """
    p = p_logprobs.exp()
    return torch.where(p > 0, p * (p_logprobs - q_logprobs), 0.0).sum(-1)


@dataclass
class LossInputs:
    """What a loss may read, at n positions.

    student_logprobs: [n, V] float32 log pS(. | c_t), WITH grad (the current policy).
    targets: [n] long, the sampled token y_t.
    old_logprobs: [n] float32 log pS_old(y_t) of the policy that sampled the rollout, no grad.
    teacher_token_logprobs: [n] float32 log pT(y_t), no grad.
    teacher_logprobs: [n, V] float32 log pT(. | c_t), no grad; None unless the loss `needs_teacher_full`
        (the engine always provides it).
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
    The function must be traceable by torch.func (no data-dependent Python control flow on tensor
    values) for the engine's vmap method.
    """

    def decorator(fn: LossFn) -> LossFn:
        add_once(_LOSSES, "loss", name, LossSpec(name, fn, description, needs_teacher_full))
        return fn

    return decorator


def get_loss(name: str) -> LossSpec:
    """The registered LossSpec; KeyError listing the registered names if unknown."""
    return lookup(_LOSSES, "loss", "losses", name)


def list_losses() -> list[str]:
    """Registered loss names, in registration order."""
    return list(_LOSSES)


@register_loss("sampled_pg",
               description="PPO-clipped policy gradient with A_t = log pT(y_t) - log pS_old(y_t) (the paper's)")
def sampled_pg(x: LossInputs) -> dict[str, Tensor]:
    logp = x.student_logprobs.gather(1, x.targets[:, None])[:, 0]  # [n] log pS(y_t), with grad
    advantage = (x.teacher_token_logprobs - x.old_logprobs).detach()  # spec 1: A_t, detached
    ratio = torch.exp(logp - x.old_logprobs.detach())  # r_t = pS / pS_old, in log space
    clipped = ratio.clamp(1.0 - x.clip_low, 1.0 + x.clip_high)
    # -min(r A, clip(r) A) = max(-r A, -clip(r) A): the pessimistic bound of PPO
    loss = torch.maximum(-ratio * advantage, -clipped * advantage)
    is_clipped = (-clipped * advantage > -ratio * advantage).float()  # the clipped term is the active one
    return {"loss": loss, "clipped": is_clipped.detach(), "advantage": advantage}


@register_loss("reverse_kl", description="KL(pS || pT) over the full vocabulary (the full per-token OPD loss)",
               needs_teacher_full=True)
def reverse_kl(x: LossInputs) -> dict[str, Tensor]:
    # log_softmax of finite logits is finite; a teacher -inf (masked token) with pS > 0 gives +inf
    return {"loss": kl_divergence(x.student_logprobs, x.teacher_logprobs)}


@register_loss("forward_kl", description="KL(pT || pS) over the full vocabulary", needs_teacher_full=True)
def forward_kl(x: LossInputs) -> dict[str, Tensor]:
    # terms with pT = 0 are 0, with no NaN in the gradient (see kl_divergence)
    return {"loss": kl_divergence(x.teacher_logprobs, x.student_logprobs)}
