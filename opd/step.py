"""The math of one training step: selection over the whole batch, the registered loss at the kept positions.

`select_kept` picks this process's kept positions with the score registry over every process's rollouts, under
the run's named selection options (`TrainConfig.selection_options`: signals, normalisation, ties, top-up, fill);
for a weight rule's arm (IW-OPD) it keeps every valid position and `select_weights` gives the per-token weights;
`opd_step` runs the student's LM head at those positions only (`diagnostics.lm.forward.PositionLM`), evaluates
the registered loss (`diagnostics.losses`), weights it by the run's normalisation (`opd.normalization`; with soft
weights `soft_token_weights`: sum w l / sum w, or per sequence likewise) and accumulates gradients. The recipe
around it (rollouts, scoring, optimizer, evaluation) is `opd.trainer`.

Temperature (`TrainConfig.temperature` = T, the rollouts' sampling temperature): the policy that sampled is
the tempered student log_softmax(zS / T), so the loss reads it, as TRL's GRPO and DistillationTrainer do
(TEMPERATURE_CONVENTION, recorded in the run manifest). Selection keeps the untempered distributions.
"""

from __future__ import annotations

import torch

from diagnostics.core.nonfinite import NonFiniteError as BaseNonFiniteError
from diagnostics.generation.scoring import TEMPERED_KEYS
from diagnostics.lm.forward import PositionLM, ResponseBatch, kept_index
from diagnostics.losses import LossInputs, get_loss
from diagnostics.signals import SelectionOptions, get_score, rule_weights, select_by_name
from opd.config import Arm, TrainConfig
from opd.distributed import World
from opd.normalization import NORMALIZATIONS, token_weights

# What "tempered" means in the loss (manifest.json of a training run records it).
TEMPERATURE_CONVENTION = (
    "temperature T: student log-probs (old log-probs, the PPO ratio, the advantage, the full-vocabulary losses) "
    "are log_softmax(student logits / T), the distribution the rollouts were sampled from; the teacher's are "
    "tempered alike, log_softmax(teacher logits / T), in the advantage and in the full-vocabulary losses (TRL's "
    "DistillationTrainer convention: T on both distributions, so the student's target is its logits equal to the "
    "teacher's up to a constant, at every T); selection signals are the untempered distributions' "
    "(the paper's definitions); T = 1 is the untempered loss bit for bit; top_p < 1 is refused"
)


def _tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T; at T = 1 the same tensor (no op at all, so T = 1 is bit-identical to the untempered loss)."""
    return logits if temperature == 1.0 else logits / temperature


class NonFiniteError(BaseNonFiniteError):
    """A loss or gradient was NaN or infinite; the message names the step and what was non-finite."""


def select_kept(
    signals: dict[str, torch.Tensor], valid: torch.Tensor, arm: Arm, min_per_sequence: int, world: World, seed: int,
    options: SelectionOptions = SelectionOptions(),
) -> torch.Tensor:
    """[b, T] kept mask of this process, selected over the WHOLE batch of every process.

    signals: [b, T], the keys `options.source_keys()` names (exact: "student_entropy", "disagreement",
    "compat_mass"); valid: [b, T] bool. The gathered [B, T'] signals are identical on every rank, so every
    rank selects the same mask. These are the UNTEMPERED model distributions' signals at every temperature
    (the paper's definitions of D, C and the entropy); only the loss reads tempered log-probs
    (TEMPERATURE_CONVENTION). The response rows of "all_response_rows" are the valid positions: scoring
    stops at a response's stop token and there is no other loss mask. A weight rule keeps every valid position
    (`select_weights` weights them); a selection rule reading raw signals (e.g. "excess_loss") gathers those too.
    """
    if get_score(arm.selector).kind == "weight":
        return valid.clone()
    names = rule_signal_keys(arm.selector, options)
    local = torch.stack([*(signals[n] for n in names), valid.float()], dim=-1)  # [b, T, n + 1]
    every = world.gather_rows(local)  # [B, T', n + 1], rank order
    valid_all = every[..., -1] > 0
    keep = select_by_name({n: every[..., i] for i, n in enumerate(names)}, valid_all, arm.selector, arm.ratio,
                          min_per_sequence=min_per_sequence, seed=seed, options=options)  # [B, T']
    return keep[world.local_rows(keep.shape[0]), : valid.shape[1]]


def rule_signal_keys(selector: str, options: SelectionOptions) -> tuple[str, ...]:
    """The [b, T] signal keys a rule reads: H, D, C under `options` for a selection rule plus its raw signals."""
    spec = get_score(selector)
    base = options.source_keys() if spec.kind == "selection" else ()
    return base + tuple(k for k in spec.raw_needs if k not in base)


def select_weights(
    signals: dict[str, torch.Tensor], valid: torch.Tensor, arm: Arm, world: World, seed: int,
) -> torch.Tensor | None:
    """[b, T] float32 weights of this process's positions for a weight rule's arm (`rule_weights` over the
    WHOLE batch of every process, as `select_kept`); None for a selection rule (the 0/1 mask alone)."""
    spec = get_score(arm.selector)
    if spec.kind != "weight":
        return None
    names = spec.raw_needs
    local = torch.stack([*(signals[n] for n in names), valid.float()], dim=-1)  # [b, T, n + 1]
    every = world.gather_rows(local)  # [B, T', n + 1], rank order
    weights = rule_weights({n: every[..., i] for i, n in enumerate(names)}, every[..., -1] > 0, seed=seed,
                           names=[arm.selector])[arm.selector]  # [B, T']
    return weights[world.local_rows(weights.shape[0]), : valid.shape[1]]


def soft_token_weights(
    w: torch.Tensor, seq_of_kept: torch.Tensor, normalization: str, w_global: float, n_seq_global: int,
    w_per_seq: torch.Tensor,
) -> torch.Tensor:
    """One loss weight per kept position for per-token weights w (spec 1 with soft weights).

    kept_global: w_t / sum_global w (the loss is sum w l / sum w); per_sequence_mean: w_t / (sum of w in its
    sequence x sequences with a positive weight sum), the mean of each sequence's weighted mean. With w = 1 at
    every kept position this is `opd.normalization.token_weights` bit for bit (the same float32 base times 1.0).

    Args:
        w: [n] float32 weights of the kept positions. seq_of_kept: [n] long, their local sequence rows.
        w_global: sum of w over the whole batch (every process). n_seq_global: sequences with a positive
            weight sum, whole batch. w_per_seq: [B_local] float32 weight sum per local sequence.
    """
    if normalization == "kept_global":
        base = torch.full(seq_of_kept.shape, 1.0 / (w_global if w_global > 0 else 1.0))
    elif normalization == "per_sequence_mean":
        per_seq = w_per_seq[seq_of_kept].float()
        per_seq = torch.where(per_seq > 0, per_seq, 1.0)  # a kept position's row has a positive sum unless all w = 0
        base = 1.0 / (per_seq * max(n_seq_global, 1))
    else:
        raise ValueError(f"normalization: must be one of {list(NORMALIZATIONS)}, got {normalization!r}")
    return base * w.to(base.device)


def _nonfinite_report(out: torch.Tensor, inputs: LossInputs, rows: torch.Tensor, pos: torch.Tensor) -> str:
    """Where a per-token loss went non-finite, and which of its inputs were already non-finite."""
    bad = ~torch.isfinite(out)
    first = int(bad.nonzero()[0, 0])
    parts = [f"per-token loss non-finite at {int(bad.sum())} of {len(out)} kept positions "
             f"(first: local sequence {int(rows[first])}, response position {int(pos[first])})"]
    named = (("student log-probs", inputs.student_logprobs), ("old log-probs", inputs.old_logprobs),
             ("teacher token log-probs", inputs.teacher_token_logprobs), ("teacher log-probs", inputs.teacher_logprobs))
    for name, value in named:
        if value is None:
            continue
        if name == "teacher log-probs":  # full-vocabulary log-probs: -inf (probability 0) is allowed
            finite = not bool(torch.isnan(value).any() | torch.isposinf(value).any())
        else:
            finite = bool(torch.isfinite(value).all())
        parts.append(f"{name} {'finite' if finite else 'NON-FINITE'}")
    return "; ".join(parts)


def opd_step(
    model: torch.nn.Module, teacher: PositionLM, batch: ResponseBatch, signals: dict[str, torch.Tensor],
    keep: torch.Tensor, config: TrainConfig, world: World, weights: torch.Tensor | None = None,
) -> dict[str, float]:
    """The math of one step: the loss at kept positions, normalised over the global batch, backward.

    Args:
        model: the student's `PositionLM` (possibly DDP-wrapped), in train mode.
        teacher: the teacher's `PositionLM` (frozen); run at kept positions for full-vocabulary losses.
        batch: this process's B rollouts. signals: [B, T] "student_logprob_sampled" = log pS_old(y_t)
            and "teacher_logprob_sampled" = log pT(y_t) (from scoring, no grad); at config.temperature != 1
            their tempered versions `diagnostics.generation.scoring.TEMPERED_KEYS` instead (TEMPERATURE_CONVENTION).
        keep: [B, T] bool, this process's kept positions (a subset of batch.valid).
        weights: None (the 0/1 mask: `token_weights`) or [B, T] float >= 0, a soft weight per position
            (`select_weights`); the loss is then normalised by the weight sums (`soft_token_weights`), and
            weights equal to keep's 0/1 give the mask's loss and gradients bit for bit.
    Gradients accumulate in .grad (micro-batch by micro-batch); the caller steps the optimizer.
    Returns {"loss": the global batch loss, "kept_tokens": global kept count, "clip_fraction"}.
    """
    spec = get_loss(config.loss)
    kept_per_seq = keep.sum(dim=1)  # [B]
    n_kept = int(world.sum(kept_per_seq.sum()))  # GLOBAL: every process and every micro-batch
    n_seq = int(world.sum((kept_per_seq > 0).sum()))  # sequences with a kept position, global
    if weights is not None:  # soft weights: sums of w replace the counts (a 0/1 w gives the counts exactly)
        weights = torch.where(keep, weights.float(), 0.0)  # [B, T]
        w_per_seq = weights.sum(dim=1)  # [B]
        w_global = float(world.sum(w_per_seq.sum()))
        n_seq = int(world.sum((w_per_seq > 0).sum()))
    micro = config.micro_batch_size or len(batch)
    starts = list(range(0, len(batch), micro))
    temperature = config.temperature
    # Old log-probs, ratio and advantage: the tempered student (the sampling policy) and the tempered teacher
    # (TEMPERATURE_CONVENTION); at T = 1 these are the untempered scoring keys, as before.
    old_key, teacher_key = TEMPERED_KEYS if temperature != 1.0 else ("student_logprob_sampled",
                                                                       "teacher_logprob_sampled")
    old_lp, teacher_lp = signals[old_key], signals[teacher_key]
    loss_sum = clipped = 0.0
    for i, start in enumerate(starts):
        part = slice(start, start + micro)
        mb = batch.select(part).to(world.device)
        rows, pos, cols = kept_index(mb, keep[part].to(world.device))  # [n] each, n kept in this micro-batch
        with world.no_sync(model, skip=i < len(starts) - 1):  # all-reduce gradients once, after the last
            logits = _tempered(model(mb.ids, mb.attention_mask, rows, cols).float(), temperature)
            student_lp = torch.log_softmax(logits, dim=-1)  # [n, V], the tempered policy
            del logits  # [n, V] that backward does not need: no extra peak memory at real vocabularies
            teacher_full = None
            if spec.needs_teacher_full:
                with torch.no_grad():  # [n, V]
                    t_logits = _tempered(teacher(mb.ids, mb.attention_mask, rows, cols).float(), temperature)
                    teacher_full = torch.log_softmax(t_logits, dim=-1)  # tempered alike (TEMPERATURE_CONVENTION)
                    del t_logits
            inputs = LossInputs(
                student_logprobs=student_lp,
                targets=mb.targets[rows, pos],
                old_logprobs=old_lp[part].to(world.device)[rows, pos],
                teacher_token_logprobs=teacher_lp[part].to(world.device)[rows, pos],
                teacher_logprobs=teacher_full,
                clip_low=config.clip_low,
                clip_high=config.clip_high,
            )
            out = spec.fn(inputs)
            local_bad = int((~torch.isfinite(out["loss"])).sum())
            if world.sum(local_bad):  # every process stops at the same micro-batch (no hung all-reduce)
                raise NonFiniteError(_nonfinite_report(out["loss"], inputs, rows + start, pos) if local_bad
                                     else "per-token loss non-finite on another process")
            if weights is None:
                token_w = token_weights(rows, config.normalization, n_kept, n_seq,
                                        kept_per_seq[part].to(world.device))  # [n]
            else:
                token_w = soft_token_weights(weights[part].to(world.device)[rows, pos], rows, config.normalization,
                                             w_global, n_seq, w_per_seq[part].to(world.device))  # [n]
            loss = (token_w.to(out["loss"].device) * out["loss"]).sum()
            world.backward(loss * world.size)  # DDP averages over processes; x size makes it the global sum
        loss_sum += float(loss.detach())
        clipped += float(out["clipped"].sum()) if "clipped" in out else 0.0
    return {"loss": world.sum(loss_sum), "kept_tokens": n_kept, "clip_fraction": world.sum(clipped) / max(n_kept, 1)}
