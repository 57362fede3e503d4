"""The fixed-context diagnostic engine: how much does one update on a token's OPD loss teach?

For a frozen bank of student-generated contexts, position (i, t) is the next-token distribution that
predicts `response_ids[i][t]` from `prompt_ids[i] + response_ids[i][:t]` (spec section 3).

`single_step` (the core): for every bank position, start from the base student, apply exactly one
update on the OPD loss of that position alone, and re-score the SAME context:
    gain[i, t]      = KL(pT || pS_before) - KL(pT || pS_after)           (forward KL, full vocabulary)
    spillover[i, t] = mean over the other valid positions t' of sequence i of the same reduction at t'.
Losses (`loss`): any loss of the registry `diagnostics.losses` (the trainer's), at its FIRST step:
old log-probs = the base student's, so a PPO ratio is 1 and clipping inactive. `reverse_kl` is the full
per-token OPD loss l_t = KL(pS || pT) (spec section 1); `sampled_pg` is then the policy-gradient loss
-A_t log pS(y_t) with A_t = log pT(y_t) - log pS_old(y_t) detached.
Update rules (`optimizer`): `sgd` (theta - lr g) or `adam` (Adam's first step from zero moments:
theta - lr g / (|g| + eps), since the bias-corrected moments are g and g^2).

Two implementations compute the same numbers:
- `method="vmap"`: per-position gradients with `torch.func.jacrev` (vmapped over sequences) and one
  batched functional forward of all updated parameter copies (`vmap(functional_call)`), chunked so
  that the stacked gradients fit a memory budget. Fast for small models.
- `method="loop"`: for large models, one position at a time: backward, in-place update, forward,
  restore the saved parameters. Memory: one extra copy of the parameters.
Every forward is `diagnostics.lm.forward`'s (decoder, then the LM head at response positions only).
`single_step_reference` is the plain oracle (deep copy, torch.optim step, forward) the tests hold
both against.

Mixed precision (`StepConfig.compute_dtype`, `diagnostics.lm.precision`): the student keeps float32 master
weights, so the update is applied to float32 values and a step far below bf16's spacing survives; the
forward of the LOSS (and the old log-probs it is compared with, so a PPO ratio is still exactly 1) runs
under bf16 autocast, the gradient is taken outside it. The MEASUREMENT (KL before and after, on the
float32 master weights) stays float32: a gain is a difference of two KLs of ~1e-4 nats at small lr, below
bf16's resolution. Measured on the small testbed, SGD 1e-4: gains through bf16 re-scoring correlate 0.17
with float32's, through float32 re-scoring of the bf16-gradient update they agree to a few percent
(tests/diagnostics/test_engine.py).

`first_order`: Proposition 1's estimate lr * <grad KL_fwd_t, update direction of l_t>.
`group_step`: one update on the mean loss of a whole kept set, gains measured at every position.
`checkpoint_gains`: gains between the base student and a trained checkpoint (the paper's protocol).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
from torch.func import functional_call, jacrev, vmap

from diagnostics.lm.forward import DENSE_CHUNK_BYTES, PositionLM, ResponseBatch, full_logprobs, sequence_chunks
from diagnostics.lm.precision import autocast, check_master_weights
from diagnostics.losses import LossInputs, LossSpec, get_loss, kl_divergence, list_losses

Optimizer = Literal["sgd", "adam"]
ADAM_EPS = 1e-8  # torch.optim.Adam's default


# --------------------------------------------------------------------------------------------------
# Per-position metrics and losses (pure functions on log-probs)
# --------------------------------------------------------------------------------------------------


def kl_forward(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(pT || pS) over the last dim, the gain's metric. [..., V] -> [...]."""
    return kl_divergence(teacher_logprobs, student_logprobs)


def kl_reverse(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(pS || pT) over the last dim (the full per-token OPD loss). [..., V] -> [...]."""
    return kl_divergence(student_logprobs, teacher_logprobs)


def token_logprobs(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(y_t) of the target tokens, detached. [..., V] log-probs, [...] targets -> [...]."""
    return logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1).detach()


def position_loss(
    spec: LossSpec,
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
) -> torch.Tensor:
    """The registered loss at n positions, at its first step. [n, V] log-probs, [n] targets and
    old log-probs (the base student's log pS(y_t)) -> [n]."""
    inputs = LossInputs(
        student_logprobs=student_logprobs,
        targets=targets,
        old_logprobs=old_logprobs,
        teacher_token_logprobs=token_logprobs(teacher_logprobs, targets),
        teacher_logprobs=teacher_logprobs,
    )
    return spec.fn(inputs)["loss"]


def update_direction(grad: torch.Tensor, optimizer: Optimizer) -> torch.Tensor:
    """The step the optimizer takes per unit learning rate on its first step."""
    if optimizer == "sgd":
        return grad
    return grad / (grad.abs() + ADAM_EPS)  # Adam, first step: m_hat = g, sqrt(v_hat) = |g|


# --------------------------------------------------------------------------------------------------
# Batched forwards
# --------------------------------------------------------------------------------------------------


def _sequence_logprobs(lm: PositionLM, params, ids, pred_idx, compute: torch.dtype | None = None) -> torch.Tensor:
    """Functional forward of ONE sequence: [L] ids, [T] pred_idx -> [T, V] float32 log-probs."""
    rows = torch.zeros_like(pred_idx)  # the one sequence of the [1, L] batch
    with autocast(pred_idx.device.type, compute):  # the forward only; jacrev's backward runs after it returns
        logits = functional_call(lm, params, (ids.unsqueeze(0), None, rows, pred_idx))
    return torch.log_softmax(logits.float(), dim=-1)


def old_logprobs(model: torch.nn.Module, batch: ResponseBatch, vocab_size: int, step: StepConfig,
                 base_logprobs: torch.Tensor) -> torch.Tensor:
    """[B, T] log pS_old(y_t) of the base student, in the precision of the loss forward (so the first step's
    PPO ratio is exactly 1): `base_logprobs` [B, T, V] without mixed precision, else an autocast forward."""
    if step.compute_dtype is None:
        return token_logprobs(base_logprobs, batch.targets.to(base_logprobs.device))
    with step.autocast(next(model.parameters()).device):
        lp = full_logprobs(model, batch, vocab_size, batch_size=len(batch))
    return token_logprobs(lp, batch.targets).to(base_logprobs.device)


def _detached_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


# --------------------------------------------------------------------------------------------------
# Single-step gains
# --------------------------------------------------------------------------------------------------


@dataclass
class StepConfig:
    loss: str = "reverse_kl"  # a name in diagnostics.losses
    optimizer: Optimizer = "sgd"
    lr: float = 1.0
    # autocast dtype of every student forward (mixed precision: the student's parameters must be float32, the
    # master weights the update is applied to); None = forwards in the parameters' dtype
    compute_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.loss not in list_losses():
            raise ValueError(f"loss: must be a registered loss ({', '.join(list_losses())}), got {self.loss!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer: must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.compute_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"compute_dtype: must be None, torch.bfloat16 or torch.float16, got {self.compute_dtype}")

    def check_model(self, model: torch.nn.Module) -> None:
        """Mixed precision needs float32 master weights: a bf16 parameter would round the update away."""
        check_master_weights(model, self.compute_dtype is not None)

    def autocast(self, device: torch.device):
        """The autocast region of a student forward (no-op without mixed precision)."""
        return autocast(device.type, self.compute_dtype)


def _gain_table(before: torch.Tensor, after: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """before [b, T]; after [b, T(updated at), T(measured at)] forward KLs -> self gain and spillover."""
    change = before.unsqueeze(1) - after  # [b, t, t']: reduction at t' after the update at t
    eye = torch.eye(before.shape[1], dtype=torch.bool)
    gain = torch.diagonal(change, dim1=1, dim2=2)  # [b, T]
    others = valid.unsqueeze(1) & ~eye  # valid t' != t
    n_others = others.sum(-1)
    spill = torch.where(others, change, 0.0).sum(-1) / n_others.clamp(min=1)
    spill = torch.where(n_others > 0, spill, torch.nan)  # one-token responses have no spillover
    kl_after = torch.diagonal(after, dim1=1, dim2=2)
    return {"kl_forward_after": kl_after, "gain": gain, "spillover": spill}


def _chunk_size(model: torch.nn.Module, horizon: int, memory_budget_bytes: float) -> int:
    """Sequences per vmap chunk: per-position gradients, updated copies and backward temporaries."""
    n_params = sum(p.numel() for p in model.parameters())
    per_sequence = horizon * n_params * 4 * 4
    return max(1, int(memory_budget_bytes // per_sequence))


def single_step_vmap(
    model: torch.nn.Module,
    bank: ResponseBatch,
    teacher_logprobs: torch.Tensor,
    step: StepConfig,
    vocab_size: int,
    *,
    first_order: bool = False,
    memory_budget_bytes: float = 2e9,
) -> dict[str, torch.Tensor]:
    """Single-step gains with torch.func. teacher_logprobs [B, T, V]. Returns [B, T] tensors.

    Keys: kl_forward_before, kl_forward_after, gain, spillover, kl_reverse_before, kl_reverse_after,
    and gain_first_order when `first_order`.
    """
    device = next(model.parameters()).device
    # sdpa has no batching rule under vmap and falls back to a slow per-sample loop; eager
    # attention is the same math and vectorises (restored afterwards)
    previous_attn = getattr(model.config, "_attn_implementation", None)
    if previous_attn not in (None, "eager") and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    try:
        return _single_step_vmap(model, bank, teacher_logprobs, step, vocab_size, first_order, memory_budget_bytes,
                                 device)
    finally:
        if previous_attn not in (None, "eager") and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(previous_attn)


def _single_step_vmap(model, bank, teacher_logprobs, step, vocab_size, first_order, memory_budget_bytes, device):
    step.check_model(model)
    lm = PositionLM(model, vocab_size)
    params = _detached_params(lm)
    spec, compute = get_loss(step.loss), step.compute_dtype
    horizon = bank.valid.shape[1]
    chunk = _chunk_size(model, horizon, memory_budget_bytes)

    def losses(p, ids, pred_idx, t_lp, targets, old_lp, valid):  # one sequence -> [T]
        s_lp = _sequence_logprobs(lm, p, ids, pred_idx, compute)
        return position_loss(spec, s_lp, t_lp, targets, old_lp) * valid

    def fwd_kls(p, ids, pred_idx, t_lp, valid):  # one sequence -> [T] forward KL (for first order)
        return kl_forward(t_lp, _sequence_logprobs(lm, p, ids, pred_idx)) * valid

    def measure(p, ids, pred_idx, t_lp):  # one updated copy -> ([T] forward KL, [T] reverse KL), float32
        s_lp = _sequence_logprobs(lm, p, ids, pred_idx)
        return kl_forward(t_lp, s_lp), kl_reverse(t_lp, s_lp)

    results: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(bank), chunk):
        part = bank.select(slice(start, start + chunk)).to(device)
        t_lp = teacher_logprobs[start : start + chunk].to(device)
        b, T = part.valid.shape
        s_lp = full_logprobs(model, part, vocab_size, batch_size=b).to(device)  # [b, T, V], one batched forward
        old_lp = old_logprobs(model, part, vocab_size, step, s_lp)  # [b, T] the base student's log pS(y_t)
        validf = part.valid.float()
        args = (part.ids, part.pred_idx, t_lp, part.targets, old_lp, validf)
        grads = vmap(jacrev(losses), in_dims=(None, 0, 0, 0, 0, 0, 0))(params, *args)  # name -> [b, T, *shape]
        directions = {name: update_direction(g, step.optimizer) for name, g in grads.items()}
        first_order_gain = None
        if first_order:  # before the directions are overwritten below
            fix_grads = vmap(jacrev(fwd_kls), in_dims=(None, 0, 0, 0, 0))(params, part.ids, part.pred_idx, t_lp, validf)
            # [b, T]: lr * <grad KL(pT || pS), d> per position, summed over every parameter tensor
            first_order_gain = step.lr * sum((fix_grads[n] * directions[n]).flatten(2).sum(-1) for n in params)
            del fix_grads
        # one updated parameter copy per (sequence, position), theta - lr d, built in place in the
        # direction tensors (one pass, no extra [b*T, *shape] allocation): [b*T, *shape]
        stacked = {name: d.mul_(-step.lr).add_(params[name]).reshape(b * T, *params[name].shape)
                   for name, d in directions.items()}
        repeat = lambda x: x.repeat_interleave(T, dim=0)  # noqa: E731  [b, ...] -> [b*T, ...]
        with torch.no_grad():
            kl_f, kl_r = vmap(measure, in_dims=(0, 0, 0, 0))(stacked, repeat(part.ids), repeat(part.pred_idx),
                                                             repeat(t_lp))
        before_f, before_r = kl_forward(t_lp, s_lp), kl_reverse(t_lp, s_lp)
        out = _gain_table(before_f, kl_f.reshape(b, T, T), part.valid)
        out["kl_forward_before"] = before_f
        out["kl_reverse_before"] = before_r
        out["kl_reverse_after"] = torch.diagonal(kl_r.reshape(b, T, T), dim1=1, dim2=2)
        if first_order_gain is not None:
            out["gain_first_order"] = first_order_gain
        for key, value in out.items():
            results.setdefault(key, []).append(value.detach().cpu())
        del grads, directions, stacked
    return _masked({k: torch.cat(v) for k, v in results.items()}, bank.valid)


def _masked(table: dict[str, torch.Tensor], valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """NaN at invalid positions, so nothing downstream mistakes padding for a measurement."""
    return {k: torch.where(valid, v, torch.nan) for k, v in table.items()}


def single_step_loop(
    model: torch.nn.Module,
    bank: ResponseBatch,
    teacher_logprobs: torch.Tensor,
    step: StepConfig,
    vocab_size: int,
    *,
    progress=None,
) -> dict[str, torch.Tensor]:
    """Single-step gains one position at a time (large models). Same outputs as `single_step_vmap`."""
    device = next(model.parameters()).device
    step.check_model(model)
    lm, spec = PositionLM(model, vocab_size), get_loss(step.loss)
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    B, T = bank.valid.shape
    kl_after = torch.full((B, T, T), torch.nan)
    rev_after = torch.full((B, T), torch.nan)
    before_f = torch.full((B, T), torch.nan)
    before_r = torch.full((B, T), torch.nan)
    for i in range(B):
        seq = bank.select(slice(i, i + 1)).to(device)
        t_lp = teacher_logprobs[i : i + 1].to(device)
        base_lp = full_logprobs(model, seq, vocab_size).to(device)  # [1, T, V]
        old_lp = old_logprobs(model, seq, vocab_size, step, base_lp)  # [1, T]
        before_f[i], before_r[i] = kl_forward(t_lp, base_lp)[0].cpu(), kl_reverse(t_lp, base_lp)[0].cpu()
        row = torch.zeros(1, dtype=torch.long, device=device)
        for t in range(int(seq.valid.sum())):
            # a fresh forward per position: the in-place update below invalidates any retained graph
            at = slice(t, t + 1)
            with step.autocast(device):  # the forward and loss only; the gradient is taken outside autocast
                s_lp = torch.log_softmax(lm(seq.ids, None, row, seq.pred_idx[0, at]).float(), dim=-1)  # [1, V]
                loss = position_loss(spec, s_lp, t_lp[0, at], seq.targets[0, at], old_lp[0, at])[0]
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(step.lr * update_direction(g, step.optimizer))
                new_lp = full_logprobs(model, seq, vocab_size)[0].to(device)  # [T, V], float32 measurement
                kl_after[i, t] = kl_forward(t_lp[0], new_lp).cpu()
                rev_after[i, t] = kl_reverse(t_lp[0, t], new_lp[t]).cpu()
                for p, original in zip(params, saved):
                    p.copy_(original)
            if progress is not None:
                progress.update(1)
    out = _gain_table(before_f, kl_after, bank.valid)
    out.update(kl_forward_before=before_f, kl_reverse_before=before_r, kl_reverse_after=rev_after)
    return _masked(out, bank.valid)


def single_step_reference(
    model: torch.nn.Module,
    bank: ResponseBatch,
    teacher_logprobs: torch.Tensor,
    step: StepConfig,
    vocab_size: int,
) -> dict[str, torch.Tensor]:
    """The plain oracle: for each position, deep-copy the student, take one torch.optim step on that
    position's loss, and re-score the same sequence. Slow; used by tests and the benchmark."""
    B, T = bank.valid.shape
    spec, device = get_loss(step.loss), next(model.parameters()).device
    step.check_model(model)
    before_lp = full_logprobs(model, bank, vocab_size)
    old_all = old_logprobs(model, bank, vocab_size, step, before_lp)  # [B, T]
    kl_after = torch.full((B, T, T), torch.nan)
    rev_after = torch.full((B, T), torch.nan)
    for i in range(B):
        seq = bank.select(slice(i, i + 1))
        t_lp = teacher_logprobs[i : i + 1]
        for t in range(int(seq.valid.sum())):
            student = copy.deepcopy(model)
            optimizer_cls = torch.optim.SGD if step.optimizer == "sgd" else torch.optim.Adam
            optimizer = optimizer_cls(student.parameters(), lr=step.lr)
            at = slice(t, t + 1)
            with step.autocast(device):  # forward and loss; backward outside autocast
                logits = PositionLM(student, vocab_size)(seq.ids, None, torch.zeros(T, dtype=torch.long),
                                                         seq.pred_idx[0])
                s_lp = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
                loss = position_loss(spec, s_lp[at], t_lp[0, at], seq.targets[0, at], old_all[i, at])[0]
            loss.backward()
            optimizer.step()
            new_lp = full_logprobs(student, seq, vocab_size)[0]
            kl_after[i, t] = kl_forward(t_lp[0], new_lp)
            rev_after[i, t] = kl_reverse(t_lp[0, t], new_lp[t])
    before_f = kl_forward(teacher_logprobs, before_lp)
    out = _gain_table(before_f, kl_after, bank.valid)
    out.update(
        kl_forward_before=before_f,
        kl_reverse_before=kl_reverse(teacher_logprobs, before_lp),
        kl_reverse_after=rev_after,
    )
    return _masked(out, bank.valid)


def finish_gains(table: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Derived columns: relative gain and the reverse-KL change (reduction, positive = closer)."""
    out = dict(table)
    before = out["kl_forward_before"]
    # relative gain is undefined where the student already matches the teacher (KL = 0)
    out["gain_rel"] = torch.where(before > 0, out["gain"] / before, torch.nan)
    out["kl_reverse_change"] = out["kl_reverse_before"] - out["kl_reverse_after"]
    return out


# --------------------------------------------------------------------------------------------------
# Group step and checkpoint gains
# --------------------------------------------------------------------------------------------------


def group_step_gains(
    model: torch.nn.Module,
    bank: ResponseBatch,
    teacher: torch.nn.Module,
    keep: torch.Tensor,
    step: StepConfig,
    vocab_size: int,
    batch_size: int = 16,
    dense_chunk_bytes: float = DENSE_CHUNK_BYTES,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """One update on the mean loss over the kept positions `keep` [B, T] (the kept_global
    normalisation), then the forward-KL reduction at EVERY bank position. -> [B, T] (NaN invalid).
    With `weights` ([B, T] >= 0, a weight rule's) the update's loss is sum w l / sum w over the kept positions
    (0/1 weights equal to keep give the unweighted update bit for bit).

    The teacher's (and the students') [b, T, V] log-probs exist for one chunk of at most `batch_size`
    sequences and `dense_chunk_bytes` per tensor at a time (`diagnostics.lm.forward.sequence_chunks`), never
    for the whole bank (the teacher runs twice: before and after the update). The chunking changes only
    the order of the gradient's sum.
    """
    if keep.shape != bank.valid.shape:
        raise ValueError(f"keep has shape {tuple(keep.shape)}, expected {tuple(bank.valid.shape)}")
    n_kept = int((keep & bank.valid).sum())
    if n_kept == 0:
        raise ValueError("keep: no valid position is kept")
    if weights is not None:  # soft weights: their sum replaces the count (a 0/1 weight's sum is the count exactly)
        weights = torch.where(keep & bank.valid, weights.float(), 0.0)
        n_kept = float(weights.sum())
        if not n_kept > 0:
            raise ValueError("weights: every kept position has weight 0")
    device = next(model.parameters()).device
    step.check_model(model)
    student = copy.deepcopy(model)
    lm, spec = PositionLM(student, vocab_size), get_loss(step.loss)
    chunks = sequence_chunks(len(bank), bank.valid.shape[1], vocab_size, budget_bytes=dense_chunk_bytes,
                             max_rows=batch_size)
    before_f = []  # [b, T] forward KLs of the base student, per chunk
    student.zero_grad(set_to_none=True)
    for chunk in chunks:  # accumulate sum over kept / n_kept
        part = bank.select(chunk)
        t_lp = full_logprobs(teacher, part, vocab_size, batch_size)  # [b, T, V]
        before_lp = full_logprobs(model, part, vocab_size, batch_size)
        before_f.append(kl_forward(t_lp, before_lp))
        mask = (keep[chunk] & part.valid).to(device)
        if not mask.any():
            continue
        if weights is not None:
            mask = mask * weights[chunk].to(device)  # [b, T] soft weights, 0 outside the kept positions
        part, t_lp = part.to(device), t_lp.to(device)
        b, horizon = part.pred_idx.shape
        rows = torch.arange(b, device=device).repeat_interleave(horizon)  # every position, row-major: [b*T]
        with step.autocast(device):  # forward and loss; backward outside autocast
            s_lp = torch.log_softmax(lm(part.ids, None, rows, part.pred_idx.reshape(-1)).float(), dim=-1)  # [b*T, V]
            old_lp = old_logprobs(model, part, vocab_size, step, before_lp).to(device)  # [b, T]
            flat = (s_lp, t_lp.reshape(b * horizon, -1), part.targets.reshape(-1), old_lp.reshape(-1))
            loss = (position_loss(spec, *flat).reshape(b, horizon) * mask).sum() / n_kept
        loss.backward()
        del s_lp, flat, loss, t_lp, before_lp  # the next chunk's [b, T, V] tensors replace these, not join them
    with torch.no_grad():
        for p in student.parameters():
            if p.grad is not None:
                p.sub_(step.lr * update_direction(p.grad, step.optimizer))
    gains = []
    for chunk, before in zip(chunks, before_f):
        part = bank.select(chunk)
        t_lp = full_logprobs(teacher, part, vocab_size, batch_size)
        gains.append(before - kl_forward(t_lp, full_logprobs(student, part, vocab_size, batch_size)))
    return torch.where(bank.valid, torch.cat(gains), torch.nan)


def checkpoint_gains(
    base: torch.nn.Module,
    trained: torch.nn.Module,
    bank: ResponseBatch,
    teacher_logprobs: torch.Tensor,
    vocab_size: int,
) -> dict[str, torch.Tensor]:
    """The paper's protocol: G = KL(pT || pS_base) - KL(pT || pS_trained) at every bank position."""
    before_lp = full_logprobs(base, bank, vocab_size)
    after_lp = full_logprobs(trained, bank, vocab_size)
    before_f, after_f = kl_forward(teacher_logprobs, before_lp), kl_forward(teacher_logprobs, after_lp)
    out = {
        "kl_forward_before": before_f,
        "kl_forward_after": after_f,
        "gain": before_f - after_f,
        "kl_reverse_before": kl_reverse(teacher_logprobs, before_lp),
        "kl_reverse_after": kl_reverse(teacher_logprobs, after_lp),
    }
    # spillover has no meaning without a per-position update; keep the column, as NaN
    out["spillover"] = torch.full_like(before_f, torch.nan)
    return _masked(out, bank.valid)
