"""The context bank: frozen held-out responses of the base student, each cut to at most L tokens.

`make_bank` freezes rollouts as rows (seq_id, prompt_id, prompt_ids, response_ids), `validate_bank` checks them
against the pair's vocabulary (errors name the first bad row), `read_bank` loads a stored bank, and `bank_batch`
pads it into the `ResponseBatch` every forward takes. The diagnostic and the trainer's live gain share it.
`read_bank_file` reads a bank file given as the diagnostic's `bank` key (e.g. the paper protocol's OPD rollouts).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from diagnostics.core.config import check
from diagnostics.core.files import read_user_parquet
from diagnostics.lm.forward import ResponseBatch

BANK_COLUMNS = ("prompt_id", "prompt_ids", "response_ids")  # what a bank file (`bank`) must hold


def make_bank(rollouts: pd.DataFrame, max_response_tokens: int, vocab_size: int) -> pd.DataFrame:
    """Freeze rollouts as a context bank: seq_id, prompt_id, prompt_ids, response_ids (cut to L)."""
    bank = pd.DataFrame(
        {
            "seq_id": np.arange(len(rollouts)),
            "prompt_id": rollouts["prompt_id"].to_numpy(),
            "prompt_ids": [list(map(int, p)) for p in rollouts["prompt_ids"]],
            "response_ids": [list(map(int, r))[:max_response_tokens] for r in rollouts["response_ids"]],
        }
    )
    validate_bank(bank, vocab_size, "bank")
    return bank


def validate_bank(bank: pd.DataFrame, vocab_size: int, where: str) -> None:
    """Errors naming the first bad row, before any long computation."""
    missing = {"seq_id", "prompt_ids", "response_ids"} - set(bank.columns)
    if missing:
        raise ValueError(f"{where}: missing columns {sorted(missing)}")
    for row in bank.itertuples():
        for name in ("prompt_ids", "response_ids"):
            ids = getattr(row, name)
            if len(ids) == 0:
                raise ValueError(f"{where}: seq_id {row.seq_id} has an empty {name}")
            bad = [i for i in ids if not 0 <= int(i) < vocab_size]
            if bad:
                raise ValueError(f"{where}: seq_id {row.seq_id} {name} has token id {bad[0]} "
                                 f"outside the vocabulary [0, {vocab_size})")


def read_bank(path: Path, vocab_size: int) -> pd.DataFrame:
    """A bank written by `make_bank`, validated against the pair's vocabulary."""
    bank = pd.read_parquet(path)
    validate_bank(bank, vocab_size, str(path))
    return bank


def bank_batch(bank: pd.DataFrame, pad_id: int | None) -> ResponseBatch:
    """The bank as one padded batch ([B, L] ids, [B, T] positions), in row order; every response
    position is valid (pad id 0 when the tokenizer has none)."""
    ids = {name: [[int(t) for t in row] for row in bank[name]] for name in ("prompt_ids", "response_ids")}
    return ResponseBatch.from_ids(ids["prompt_ids"], ids["response_ids"], pad_id or 0)


def read_bank_file(path: str, n_sequences: int) -> pd.DataFrame:
    """The first `n_sequences` responses of a bank file (`bank`): a parquet with BANK_COLUMNS, e.g. the
    paper protocol's OPD rollouts (the release's `tools/export_fixed_context_bank.py --max-samples`)."""
    frame = read_user_parquet(path, "bank")
    missing = [c for c in BANK_COLUMNS if c not in frame.columns]
    check(not missing, "bank", f"{path} lacks the columns {missing} (a bank file holds {list(BANK_COLUMNS)})")
    check(len(frame) >= n_sequences, "n_sequences",
          f"the bank file {path} holds {len(frame)} responses, fewer than n_sequences={n_sequences}")
    return frame.head(n_sequences).reset_index(drop=True)
