"""Held-out evaluation during training, and the live selector check after it.

* `evaluate`: greedy exact match on the held-out problems, and the mean forward KL(pT || pS) per
  token on the common bank (held-out rollouts of the BASE student, fixed for the whole run, so every
  step and arm is measured on the same contexts). Work is split over processes and the counts summed.
* `live_gains`: the diagnostic engine's checkpoint protocol (`diagnostics.engine.checkpoint_gains`)
  between the base student and a trained one on that bank: G = KL(pT||pS_base) - KL(pT||pS_trained)
  per position, reduced to a per-sequence table for cluster statistics. On the same bank, the mean
  G equals the drop in `kl_to_teacher` from step 0 to the last step (a consistency check in tests).
* `summarize_gains`: a selector's mean live gain over its seeds with a 95% interval: a t interval
  over seeds (the training randomness) when there are >= 2 seeds, else a cluster bootstrap over
  bank sequences.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.stats
import torch

from diagnostics import engine
from diagnostics.evaluation import exact_match_accuracy
from diagnostics.task import Problem
from opd.distributed import World

BANK_SHARD = 32  # bank sequences per teacher/student scoring call


@torch.no_grad()
def evaluate(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    tokenizer,
    problems: list[Problem],
    bank: engine.BankTensors,
    vocab_size: int,
    max_new_tokens: int,
    world: World,
) -> dict[str, float]:
    """{"accuracy": greedy exact match, "kl_to_teacher": mean KL(pT||pS) per bank token}."""
    mine = problems[world.rank :: world.size]
    correct = exact_match_accuracy(student, tokenizer, mine, max_new_tokens=max_new_tokens, greedy=True) * len(mine) if mine else 0.0
    kl_sum, n_tok = 0.0, 0
    rows = torch.arange(len(bank))[world.rank :: world.size]
    for start in range(0, len(rows), BANK_SHARD):
        part = bank.select(rows[start : start + BANK_SHARD])
        t_lp = engine.response_logprobs(teacher, part, vocab_size)  # [b, T, V]
        s_lp = engine.response_logprobs(student, part, vocab_size)
        kl = engine.forward_kl(t_lp, s_lp)  # [b, T]
        kl_sum += float(kl[part.valid].double().sum())
        n_tok += int(part.valid.sum())
    return {
        "accuracy": world.sum(correct) / len(problems),
        "kl_to_teacher": world.sum(kl_sum) / world.sum(n_tok),
    }


@torch.no_grad()
def live_gains(base: torch.nn.Module, trained: torch.nn.Module, teacher: torch.nn.Module, bank: engine.BankTensors, vocab_size: int) -> pd.DataFrame:
    """Per bank sequence: seq (row), gain_sum (sum of G over its valid positions), n_tokens."""
    frames = []
    for start in range(0, len(bank), BANK_SHARD):
        part = bank.select(slice(start, start + BANK_SHARD))
        t_lp = engine.response_logprobs(teacher, part, vocab_size)
        gain = engine.checkpoint_gains(base, trained, part, t_lp, vocab_size)["gain"]  # [b, T], NaN invalid
        frames.append(pd.DataFrame({
            "seq": np.arange(start, start + len(part)),
            "gain_sum": torch.nan_to_num(gain.double(), nan=0.0).sum(1).numpy(),
            "n_tokens": part.valid.sum(1).numpy(),
        }))
    return pd.concat(frames, ignore_index=True)


def summarize_gains(per_seed: list[pd.DataFrame], *, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, ci_low, ci_high) of the token-mean live gain over a selector's seeds (95%)."""
    means = np.array([g["gain_sum"].sum() / g["n_tokens"].sum() for g in per_seed])
    mean = float(means.mean())
    if len(means) >= 2:
        half = scipy.stats.t.ppf(0.975, len(means) - 1) * means.std(ddof=1) / np.sqrt(len(means))
        return mean, float(mean - half), float(mean + half)
    g = per_seed[0]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(g), size=(n_boot, len(g)))  # resample whole sequences
    boot = g["gain_sum"].to_numpy()[idx].sum(1) / np.maximum(g["n_tokens"].to_numpy()[idx].sum(1), 1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return mean, float(lo), float(hi)
