"""Held-out evaluation during training, and the live selector check after it.

* `evaluate`: greedy exact match on the held-out problems, and the mean forward KL(pT || pS) per
  token on the common bank (held-out rollouts of the BASE student, fixed for the whole run, so every
  step and arm is measured on the same contexts). Work is split over processes and the counts summed.
* `live_gains`: the diagnostic engine's checkpoint protocol (`diagnostics.engine.checkpoint_gains`)
  between the base student and a trained one on that bank: G = KL(pT||pS_base) - KL(pT||pS_trained)
  per position, reduced to a per-sequence table for cluster statistics. On the same bank, the mean
  G equals the drop in `kl_to_teacher` from step 0 to the last step (a consistency check in tests).
Their statistics over seeds are computed in `analysis.training`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from diagnostics import engine
from diagnostics.evaluation import exact_match_accuracy
from diagnostics.forward import ResponseBatch, full_logprobs
from diagnostics.task import Problem
from opd.distributed import World

BANK_SHARD = 32  # bank sequences per teacher/student scoring call


@torch.no_grad()
def evaluate(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    tokenizer,
    problems: list[Problem],
    bank: ResponseBatch,
    vocab_size: int,
    max_new_tokens: int,
    world: World,
) -> dict[str, float]:
    """{"accuracy": greedy exact match, "kl_to_teacher": mean KL(pT||pS) per bank token}."""
    mine = problems[world.rank :: world.size]
    accuracy = 0.0
    if mine:
        accuracy = exact_match_accuracy(student, tokenizer, mine, max_new_tokens=max_new_tokens, greedy=True)
    correct = accuracy * len(mine)
    kl_sum, n_tok = 0.0, 0
    rows = torch.arange(len(bank))[world.rank :: world.size]
    for start in range(0, len(rows), BANK_SHARD):
        part = bank.select(rows[start : start + BANK_SHARD])
        t_lp = full_logprobs(teacher, part, vocab_size)  # [b, T, V]
        s_lp = full_logprobs(student, part, vocab_size)
        kl = engine.forward_kl(t_lp, s_lp)  # [b, T]
        kl_sum += float(kl[part.valid].double().sum())
        n_tok += int(part.valid.sum())
    return {
        "accuracy": world.sum(correct) / len(problems),
        "kl_to_teacher": world.sum(kl_sum) / world.sum(n_tok),
    }


@torch.no_grad()
def live_gains(
    base: torch.nn.Module, trained: torch.nn.Module, teacher: torch.nn.Module, bank: ResponseBatch, vocab_size: int
) -> pd.DataFrame:
    """Per bank sequence: seq (row), gain_sum (sum of G over its valid positions), n_tokens."""
    frames = []
    for start in range(0, len(bank), BANK_SHARD):
        part = bank.select(slice(start, start + BANK_SHARD))
        t_lp = full_logprobs(teacher, part, vocab_size)
        gain = engine.checkpoint_gains(base, trained, part, t_lp, vocab_size)["gain"]  # [b, T], NaN invalid
        frames.append(pd.DataFrame({
            "seq": np.arange(start, start + len(part)),
            "gain_sum": torch.nan_to_num(gain.double(), nan=0.0).sum(1).numpy(),
            "n_tokens": part.valid.sum(1).numpy(),
        }))
    return pd.concat(frames, ignore_index=True)
