"""Held-out evaluation during training, and the live selector check after it.

* `evaluate`: greedy accuracy on the held-out problems (exact match or math-verify: `answer_check`), and
  the mean forward KL(pT || pS) per token on the common bank (held-out rollouts of the BASE student,
  fixed for the whole run, so every step and arm is measured on the same contexts). Work is split over
  processes and the counts summed.
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
from diagnostics.accuracy import answer_accuracy
from diagnostics.data.problems import Problem
from diagnostics.lm.forward import ResponseBatch, full_logprobs, sequence_chunks
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
    answer_check: str = "exact",
) -> dict[str, float]:
    """{"accuracy": greedy accuracy under `answer_check` (exact match, or math-verify: `diagnostics.data.problems`),
    "kl_to_teacher": mean KL(pT||pS) per bank token}."""
    mine = problems[world.rank :: world.size]
    accuracy = 0.0
    if mine:
        accuracy = answer_accuracy(student, tokenizer, mine, answer_check=answer_check, max_new_tokens=max_new_tokens,
                                   greedy=True)
    correct = accuracy * len(mine)
    kl_sum, n_tok = 0.0, 0
    rows = torch.arange(len(bank))[world.rank :: world.size]
    for chunk in sequence_chunks(len(rows), bank.valid.shape[1], vocab_size, max_rows=BANK_SHARD):  # bounded [b, T, V]
        part = bank.select(rows[chunk])
        t_lp = full_logprobs(teacher, part, vocab_size)  # [b, T, V]
        s_lp = full_logprobs(student, part, vocab_size)
        kl = engine.kl_forward(t_lp, s_lp)  # [b, T]
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
    for chunk in sequence_chunks(len(bank), bank.valid.shape[1], vocab_size, max_rows=BANK_SHARD):
        part = bank.select(chunk)
        t_lp = full_logprobs(teacher, part, vocab_size)
        gain = engine.checkpoint_gains(base, trained, part, t_lp, vocab_size)["gain"]  # [b, T], NaN invalid
        frames.append(pd.DataFrame({
            "seq": np.arange(chunk.start, chunk.stop),
            "gain_sum": torch.nan_to_num(gain.double(), nan=0.0).sum(1).numpy(),
            "n_tokens": part.valid.sum(1).numpy(),
        }))
    return pd.concat(frames, ignore_index=True)
