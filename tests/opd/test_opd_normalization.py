"""opd.normalization: the two budget normalisations against plain loops."""

from __future__ import annotations

import pytest
import torch

from opd.normalization import token_weights


def test_token_weights_match_loops():
    seq = torch.tensor([0, 0, 0, 2, 3, 3])  # kept positions of sequences 0, 2, 3 (1 has none)
    per_seq = torch.tensor([3, 0, 1, 2])
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    w = token_weights(seq, "kept_global", 6, 3, per_seq)
    assert float((w * losses).sum()) == pytest.approx(sum(losses.tolist()) / 6)
    w = token_weights(seq, "per_sequence_mean", 6, 3, per_seq)
    expected = ((1 + 2 + 3) / 3 + 4 / 1 + (5 + 6) / 2) / 3
    assert float((w * losses).sum()) == pytest.approx(expected)
    # global counts larger than the local ones (other processes hold the rest)
    w = token_weights(seq, "kept_global", 12, 6, per_seq)
    assert float((w * losses).sum()) == pytest.approx(21 / 12)
    assert token_weights(torch.zeros(0, dtype=torch.long), "kept_global", 0, 0, per_seq).numel() == 0
    with pytest.raises(ValueError, match="normalization"):
        token_weights(seq, "mean", 6, 3, per_seq)
