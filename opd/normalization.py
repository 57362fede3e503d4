"""The two budget normalisations of the OPD loss over kept positions (spec 1).

The losses themselves live in `diagnostics.losses` (one registry for training and the diagnostic).
The manifest records which normalisation a run used:

* ``kept_global``: L = sum over kept positions of l_t / (number kept in the WHOLE batch), the count
  taken over every process and gradient-accumulation micro-batch.
* ``per_sequence_mean``: mean over the kept tokens of each sequence, then over the sequences that
  have a kept token (the released trainer's choice), the sequence count again global.

`token_weights` turns either rule into one weight per kept position, so a micro-batch's share of
the loss is sum(w_t l_t) and the gradient of the whole batch is the sum of the micro-batches'.
"""

from __future__ import annotations

import torch
from torch import Tensor

NORMALIZATIONS = ("kept_global", "per_sequence_mean")


def token_weights(
    seq_of_kept: Tensor, normalization: str, n_kept_global: int, n_seq_global: int, n_kept_per_seq: Tensor
) -> Tensor:
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
