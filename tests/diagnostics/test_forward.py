"""The teacher-forced forward: the padded batch, position-selected logits against full logits, head-path check."""

from __future__ import annotations

import pytest
import torch

from diagnostics.lm.forward import PositionLM, ResponseBatch, check_head_path, full_logprobs, kept_index

from tiny_lm import V_ROWS, V, random_ids, tiny_model


def make_batch(valid: bool = True) -> ResponseBatch:
    gen = torch.Generator().manual_seed(0)
    prompts, responses = random_ids(gen)
    mask = torch.zeros(4, 7, dtype=torch.bool)  # wider than the longest response
    for i, r in enumerate(responses):
        mask[i, : len(r) - 1] = True  # e.g. positions after a stop token are not scored
    return ResponseBatch.from_ids(prompts, responses, 0, mask if valid else None)


def test_kept_logits_rows_match_full_logits():
    batch = make_batch()
    model = tiny_model(0)
    rows, pos, cols = kept_index(batch, batch.valid)
    kept = PositionLM(model, V)(batch.ids, batch.attention_mask, rows, cols)  # [n, V]
    full = model(input_ids=batch.ids, attention_mask=batch.attention_mask).logits[rows, cols, :V]
    assert kept.shape == (int(batch.valid.sum()), V)
    assert torch.allclose(kept, full, atol=1e-5)
    check_head_path(model, batch.ids[:1])


def test_full_logprobs_equal_full_forward_at_every_position():
    batch = make_batch(valid=False)
    model = tiny_model(0).eval()
    got = full_logprobs(model, batch, V, batch_size=3)  # [B, T, V], two chunks
    logits = model(input_ids=batch.ids).logits
    expected = torch.log_softmax(logits.gather(1, batch.pred_idx[..., None].expand(-1, -1, V_ROWS))[..., :V], -1)
    assert got.shape == (4, 6, V)
    assert torch.allclose(got, expected, atol=1e-6)


def test_head_path_check_rejects_scaled_logits():
    model = tiny_model(0)
    original = model.forward
    model.forward = lambda *a, **k: type(original(*a, **k))(logits=original(*a, **k).logits * 2)  # noqa: E731
    with pytest.raises(NotImplementedError, match="lm_head"):
        check_head_path(model, torch.tensor([[1, 2, 3]]))


def test_batch_positions_and_errors():
    batch = ResponseBatch.from_ids([[5, 6, 7]], [[8, 9]], 0, torch.tensor([[True, True, False]]))
    assert batch.ids.tolist() == [[5, 6, 7, 8, 9]] and batch.attention_mask.tolist() == [[1] * 5]
    assert batch.pred_idx[0, :2].tolist() == [2, 3] and batch.targets[0, :2].tolist() == [8, 9]
    default = ResponseBatch.from_ids([[5, 6, 7], [4]], [[8, 9], [3]], 0)
    assert default.valid.tolist() == [[True, True], [True, False]]
    assert default.select(slice(1, 2)).ids.tolist() == [[4, 3, 0, 0, 0]]
    with pytest.raises(ValueError, match="beyond the end"):
        ResponseBatch.from_ids([[5]], [[8]], 0, torch.tensor([[True, True]]))
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        ResponseBatch.from_ids([[1, 2], []], [[3], [4]], 0)
    with pytest.raises(ValueError, match="differ"):
        ResponseBatch.from_ids([[1]], [[3], [4]], 0)
