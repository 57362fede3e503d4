"""The fixed-context diagnostic engine: how much does one update on a token's OPD loss teach?

For a frozen bank of student-generated contexts, position (i, t) is the next-token distribution that
predicts `response_ids[i][t]` from `prompt_ids[i] + response_ids[i][:t]` (spec section 3).

`single_step` (the core): for every bank position, start from the base student, apply exactly one
update on the OPD loss of that position alone, and re-score the SAME context:
    gain[i, t]      = KL(pT || pS_before) - KL(pT || pS_after)           (forward KL, full vocabulary)
    spillover[i, t] = mean over the other valid positions t' of sequence i of the same reduction at t'.
Losses (`loss`): `reverse_kl`, the full per-token OPD loss l_t = KL(pS || pT) (spec section 1), or
`sampled`, the policy-gradient loss -A_t log pS(y_t) with A_t = log pT(y_t) - log pS_old(y_t) detached
(at the first step the PPO ratio is 1, so clipping is inactive and this is the exact first-step loss).
Update rules (`optimizer`): `sgd` (theta - lr g) or `adam` (Adam's first step from zero moments:
theta - lr g / (|g| + eps), since the bias-corrected moments are g and g^2).

Two implementations compute the same numbers:
- `method="vmap"`: per-position gradients with `torch.func.jacrev` (vmapped over sequences) and one
  batched functional forward of all updated parameter copies (`vmap(functional_call)`), chunked so
  that the stacked gradients fit a memory budget. Fast for small models.
- `method="loop"`: for large models, one position at a time: backward, in-place update, forward,
  restore the saved parameters. Memory: one extra copy of the parameters.
`single_step_reference` is the plain oracle (deep copy, torch.optim step, forward) the tests hold
both against.

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

Loss = Literal["reverse_kl", "sampled"]
Optimizer = Literal["sgd", "adam"]
ADAM_EPS = 1e-8  # torch.optim.Adam's default


@dataclass
class BankTensors:
    """A padded batch of bank sequences.

    ids:       [B, L] prompt + response ids, right-padded (causal attention: padding after a position
               never affects it, so no attention mask is needed).
    pred_idx:  [B, T] index into the sequence of the logit that predicts response token t
               (= prompt_len - 1 + t); 0 at invalid positions.
    targets:   [B, T] response token ids (0 at invalid positions).
    valid:     [B, T] bool, True for t < response length.
    """

    ids: torch.Tensor
    pred_idx: torch.Tensor
    targets: torch.Tensor
    valid: torch.Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    def select(self, rows: slice | torch.Tensor) -> "BankTensors":
        return BankTensors(self.ids[rows], self.pred_idx[rows], self.targets[rows], self.valid[rows])

    def to(self, device: torch.device) -> "BankTensors":
        return BankTensors(*(x.to(device) for x in (self.ids, self.pred_idx, self.targets, self.valid)))


def bank_tensors(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> BankTensors:
    """Pad a list of (prompt, response) pairs into `BankTensors`."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"prompt_ids has {len(prompt_ids)} rows but response_ids has {len(response_ids)}")
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids)]
    width, horizon = max(lengths), max(len(r) for r in response_ids)
    n = len(prompt_ids)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    pred_idx = torch.zeros((n, horizon), dtype=torch.long)
    targets = torch.zeros((n, horizon), dtype=torch.long)
    valid = torch.zeros((n, horizon), dtype=torch.bool)
    for row, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        if len(prompt) == 0:
            raise ValueError(f"prompt_ids[{row}] is empty: the first response token needs a context")
        seq = list(prompt) + list(response)
        ids[row, : len(seq)] = torch.tensor(seq)
        t = len(response)
        pred_idx[row, :t] = torch.arange(len(prompt) - 1, len(prompt) - 1 + t)
        targets[row, :t] = torch.tensor(response)
        valid[row, :t] = True
    return BankTensors(ids, pred_idx, targets, valid)


# --------------------------------------------------------------------------------------------------
# Per-position metrics and losses (pure functions on log-probs)
# --------------------------------------------------------------------------------------------------


def forward_kl(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(pT || pS) over the last dim. [..., V] -> [...]. Terms with pT = 0 contribute 0."""
    p_t = teacher_logprobs.exp()
    return torch.where(p_t > 0, p_t * (teacher_logprobs - student_logprobs), 0.0).sum(-1)


def reverse_kl(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(pS || pT) over the last dim: the full per-token OPD loss l_t (spec section 1)."""
    p_s = student_logprobs.exp()
    return torch.where(p_s > 0, p_s * (student_logprobs - teacher_logprobs), 0.0).sum(-1)


def position_loss(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    targets: torch.Tensor,
    advantage: torch.Tensor,
    loss: Loss,
) -> torch.Tensor:
    """The OPD loss per position. [..., V] log-probs, [...] targets/advantage -> [...]."""
    if loss == "reverse_kl":
        return reverse_kl(teacher_logprobs, student_logprobs)
    # sampled-token policy gradient at the first step: -A_t log pS(y_t), A_t detached
    return -advantage * student_logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def sampled_advantage(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A_t = log pT(y_t) - log pS_old(y_t), detached. [..., V] -> [...]."""
    index = targets.unsqueeze(-1)
    return (teacher_logprobs.gather(-1, index) - student_logprobs.gather(-1, index)).squeeze(-1).detach()


def update_direction(grad: torch.Tensor, optimizer: Optimizer) -> torch.Tensor:
    """The step the optimizer takes per unit learning rate on its first step."""
    if optimizer == "sgd":
        return grad
    return grad / (grad.abs() + ADAM_EPS)  # Adam, first step: m_hat = g, sqrt(v_hat) = |g|


# --------------------------------------------------------------------------------------------------
# Batched forwards
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def response_logprobs(model: torch.nn.Module, bank: BankTensors, vocab_size: int, batch_size: int = 16) -> torch.Tensor:
    """log pS(. | context) at every response position, float32. -> [B, T, V] (V = shared vocabulary)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(bank), batch_size):
        chunk = bank.select(slice(start, start + batch_size)).to(device)
        logits = model(input_ids=chunk.ids, use_cache=False).logits  # [b, L, rows]
        picked = logits.gather(1, chunk.pred_idx.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        out.append(torch.log_softmax(picked[..., :vocab_size].float(), dim=-1).cpu())
    return torch.cat(out)


def _sequence_logprobs(model, params, ids, pred_idx, vocab_size: int) -> torch.Tensor:
    """Functional forward of ONE sequence: [L] ids, [T] pred_idx -> [T, V] float32 log-probs."""
    logits = functional_call(model, params, (ids.unsqueeze(0),), {"use_cache": False}).logits[0]
    return torch.log_softmax(logits[pred_idx, :vocab_size].float(), dim=-1)


def _detached_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


# --------------------------------------------------------------------------------------------------
# Single-step gains
# --------------------------------------------------------------------------------------------------


@dataclass
class StepConfig:
    loss: Loss = "reverse_kl"
    optimizer: Optimizer = "sgd"
    lr: float = 1.0

    def __post_init__(self) -> None:
        if self.loss not in ("reverse_kl", "sampled"):
            raise ValueError(f"loss: must be 'reverse_kl' or 'sampled', got {self.loss!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer: must be 'sgd' or 'adam', got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")


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
    bank: BankTensors,
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
        return _single_step_vmap(model, bank, teacher_logprobs, step, vocab_size, first_order, memory_budget_bytes, device)
    finally:
        if previous_attn not in (None, "eager") and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(previous_attn)


def _single_step_vmap(model, bank, teacher_logprobs, step, vocab_size, first_order, memory_budget_bytes, device):
    params = _detached_params(model)
    horizon = bank.valid.shape[1]
    chunk = _chunk_size(model, horizon, memory_budget_bytes)

    def losses(p, ids, pred_idx, t_lp, targets, advantage, valid):  # one sequence -> [T]
        s_lp = _sequence_logprobs(model, p, ids, pred_idx, vocab_size)
        return position_loss(s_lp, t_lp, targets, advantage, step.loss) * valid

    def fwd_kls(p, ids, pred_idx, t_lp, valid):  # one sequence -> [T] forward KL (for first order)
        return forward_kl(t_lp, _sequence_logprobs(model, p, ids, pred_idx, vocab_size)) * valid

    def measure(p, ids, pred_idx, t_lp):  # one updated copy -> ([T] forward KL, [T] reverse KL)
        s_lp = _sequence_logprobs(model, p, ids, pred_idx, vocab_size)
        return forward_kl(t_lp, s_lp), reverse_kl(t_lp, s_lp)

    results: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(bank), chunk):
        part = bank.select(slice(start, start + chunk)).to(device)
        t_lp = teacher_logprobs[start : start + chunk].to(device)
        b, T = part.valid.shape
        s_lp = response_logprobs(model, part, vocab_size, batch_size=b)  # [b, T, V], one batched forward
        advantage = sampled_advantage(s_lp, t_lp, part.targets)
        validf = part.valid.float()
        args = (part.ids, part.pred_idx, t_lp, part.targets, advantage, validf)
        grads = vmap(jacrev(losses), in_dims=(None, 0, 0, 0, 0, 0, 0))(params, *args)  # name -> [b, T, *shape]
        directions = {name: update_direction(g, step.optimizer) for name, g in grads.items()}
        first_order_gain = None
        if first_order:  # before the directions are overwritten below
            fix_grads = vmap(jacrev(fwd_kls), in_dims=(None, 0, 0, 0, 0))(params, part.ids, part.pred_idx, t_lp, validf)
            first_order_gain = step.lr * sum((fix_grads[n] * directions[n]).flatten(2).sum(-1) for n in params)  # [b, T]
            del fix_grads
        # one updated parameter copy per (sequence, position), theta - lr d, built in place in the
        # direction tensors (one pass, no extra [b*T, *shape] allocation): [b*T, *shape]
        stacked = {name: d.mul_(-step.lr).add_(params[name]).reshape(b * T, *params[name].shape) for name, d in directions.items()}
        repeat = lambda x: x.repeat_interleave(T, dim=0)  # noqa: E731  [b, ...] -> [b*T, ...]
        with torch.no_grad():
            kl_f, kl_r = vmap(measure, in_dims=(0, 0, 0, 0))(stacked, repeat(part.ids), repeat(part.pred_idx), repeat(t_lp))
        before_f, before_r = forward_kl(t_lp, s_lp), reverse_kl(t_lp, s_lp)
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
    bank: BankTensors,
    teacher_logprobs: torch.Tensor,
    step: StepConfig,
    vocab_size: int,
    *,
    progress=None,
) -> dict[str, torch.Tensor]:
    """Single-step gains one position at a time (large models). Same outputs as `single_step_vmap`."""
    device = next(model.parameters()).device
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
        base_lp = response_logprobs(model, seq, vocab_size).to(device)  # [1, T, V]
        advantage = sampled_advantage(base_lp, t_lp, seq.targets)
        before_f[i], before_r[i] = forward_kl(t_lp, base_lp)[0].cpu(), reverse_kl(t_lp, base_lp)[0].cpu()
        for t in range(int(seq.valid.sum())):
            # a fresh forward per position: the in-place update below invalidates any retained graph
            logits = model(input_ids=seq.ids, use_cache=False).logits
            s_lp = torch.log_softmax(logits[0, seq.pred_idx[0, t], :vocab_size].float(), dim=-1)  # [V]
            loss = position_loss(s_lp, t_lp[0, t], seq.targets[0, t], advantage[0, t], step.loss)
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(step.lr * update_direction(g, step.optimizer))
                new_lp = response_logprobs(model, seq, vocab_size)[0].to(device)  # [T, V]
                kl_after[i, t] = forward_kl(t_lp[0], new_lp).cpu()
                rev_after[i, t] = reverse_kl(t_lp[0, t], new_lp[t]).cpu()
                for p, original in zip(params, saved):
                    p.copy_(original)
            if progress is not None:
                progress.update(1)
    out = _gain_table(before_f, kl_after, bank.valid)
    out.update(kl_forward_before=before_f, kl_reverse_before=before_r, kl_reverse_after=rev_after)
    return _masked(out, bank.valid)


def single_step_reference(
    model: torch.nn.Module,
    bank: BankTensors,
    teacher_logprobs: torch.Tensor,
    step: StepConfig,
    vocab_size: int,
) -> dict[str, torch.Tensor]:
    """The plain oracle: for each position, deep-copy the student, take one torch.optim step on that
    position's loss, and re-score the same sequence. Slow; used by tests and the benchmark."""
    B, T = bank.valid.shape
    before_lp = response_logprobs(model, bank, vocab_size)
    kl_after = torch.full((B, T, T), torch.nan)
    rev_after = torch.full((B, T), torch.nan)
    for i in range(B):
        seq = bank.select(slice(i, i + 1))
        t_lp = teacher_logprobs[i : i + 1]
        for t in range(int(seq.valid.sum())):
            student = copy.deepcopy(model)
            optimizer_cls = torch.optim.SGD if step.optimizer == "sgd" else torch.optim.Adam
            optimizer = optimizer_cls(student.parameters(), lr=step.lr)
            logits = student(input_ids=seq.ids, use_cache=False).logits
            s_lp = torch.log_softmax(logits[0, seq.pred_idx[0], :vocab_size].float(), dim=-1)  # [T, V]
            advantage = sampled_advantage(before_lp[i], t_lp[0], seq.targets[0])
            position_loss(s_lp[t], t_lp[0, t], seq.targets[0, t], advantage[t], step.loss).backward()
            optimizer.step()
            new_lp = response_logprobs(student, seq, vocab_size)[0]
            kl_after[i, t] = forward_kl(t_lp[0], new_lp)
            rev_after[i, t] = reverse_kl(t_lp[0, t], new_lp[t])
    before_f = forward_kl(teacher_logprobs, before_lp)
    out = _gain_table(before_f, kl_after, bank.valid)
    out.update(
        kl_forward_before=before_f,
        kl_reverse_before=reverse_kl(teacher_logprobs, before_lp),
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
    bank: BankTensors,
    teacher_logprobs: torch.Tensor,
    keep: torch.Tensor,
    step: StepConfig,
    vocab_size: int,
    batch_size: int = 16,
) -> torch.Tensor:
    """One update on the mean loss over the kept positions `keep` [B, T] (the kept_global
    normalisation), then the forward-KL reduction at EVERY bank position. -> [B, T] (NaN invalid)."""
    if keep.shape != bank.valid.shape:
        raise ValueError(f"keep has shape {tuple(keep.shape)}, expected {tuple(bank.valid.shape)}")
    n_kept = int((keep & bank.valid).sum())
    if n_kept == 0:
        raise ValueError("keep: no valid position is kept")
    device = next(model.parameters()).device
    student = copy.deepcopy(model)
    before_lp = response_logprobs(model, bank, vocab_size, batch_size)
    student.zero_grad(set_to_none=True)
    for start in range(0, len(bank), batch_size):  # accumulate sum over kept / n_kept
        part = bank.select(slice(start, start + batch_size)).to(device)
        mask = (keep[start : start + batch_size] & bank.valid[start : start + batch_size]).to(device)
        if not mask.any():
            continue
        t_lp = teacher_logprobs[start : start + batch_size].to(device)
        logits = student(input_ids=part.ids, use_cache=False).logits
        picked = logits.gather(1, part.pred_idx.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        s_lp = torch.log_softmax(picked[..., :vocab_size].float(), dim=-1)
        advantage = sampled_advantage(before_lp[start : start + batch_size].to(device), t_lp, part.targets)
        loss = (position_loss(s_lp, t_lp, part.targets, advantage, step.loss) * mask).sum() / n_kept
        loss.backward()
    with torch.no_grad():
        for p in student.parameters():
            if p.grad is not None:
                p.sub_(step.lr * update_direction(p.grad, step.optimizer))
    after_lp = response_logprobs(student, bank, vocab_size, batch_size)
    gain = forward_kl(teacher_logprobs, before_lp) - forward_kl(teacher_logprobs, after_lp)
    return torch.where(bank.valid, gain, torch.nan)


def checkpoint_gains(
    base: torch.nn.Module,
    trained: torch.nn.Module,
    bank: BankTensors,
    teacher_logprobs: torch.Tensor,
    vocab_size: int,
) -> dict[str, torch.Tensor]:
    """The paper's protocol: G = KL(pT || pS_base) - KL(pT || pS_trained) at every bank position."""
    before_lp = response_logprobs(base, bank, vocab_size)
    after_lp = response_logprobs(trained, bank, vocab_size)
    before_f, after_f = forward_kl(teacher_logprobs, before_lp), forward_kl(teacher_logprobs, after_lp)
    out = {
        "kl_forward_before": before_f,
        "kl_forward_after": after_f,
        "gain": before_f - after_f,
        "kl_reverse_before": reverse_kl(teacher_logprobs, before_lp),
        "kl_reverse_after": reverse_kl(teacher_logprobs, after_lp),
    }
    # spillover has no meaning without a per-position update; keep the column, as NaN
    out["spillover"] = torch.full_like(before_f, torch.nan)
    return _masked(out, bank.valid)
