"""Teacher scoring: exact hf-mode signals against a direct computation, masking, chunking, top-K mode."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from diagnostics.generation.backends import SamplingConfig
from diagnostics.generation.hf import score_rollouts_hf
from diagnostics.generation.rollouts import generate_rollouts
from diagnostics.generation.scoring import ScoredBatch, valid_mask
from diagnostics.generation.vllm import score_rollouts_vllm, teacher_prompt_topk
from diagnostics.lm.forward import sampled_token_logprobs
from diagnostics.lm.models import load_pair
from diagnostics.signals import FULL_VOCAB_KEYS, token_signals


@pytest.fixture(scope="module")
def pair(vllm_testbed):
    return load_pair(vllm_testbed.student_path, vllm_testbed.teacher_path, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def rollouts(pair, rollout_prompts):
    """HF rollouts plus one row whose response continues past an EOS (those positions are invalid)."""
    sampling = SamplingConfig(max_new_tokens=8, n=2, seed=11)
    df = generate_rollouts(pair.student, pair.tokenizer, rollout_prompts[:5], sampling, backend="hf", progress=False)
    extra = df.iloc[[0]].copy()
    eos = pair.tokenizer.eos_token_id
    extra.at[extra.index[0], "response_ids"] = np.array([9, eos, 12, 13], np.int32)
    extra.at[extra.index[0], "response_logprobs"] = np.zeros(4, np.float32)
    return pd.concat([df, extra], ignore_index=True)


def direct_signals(pair, prompt, response, positions, k):
    """token_signals on logits computed by plain full forwards, at the given response positions."""
    ids = torch.tensor([list(prompt) + list(response)])
    index = [len(prompt) - 1 + p for p in positions]
    with torch.no_grad():
        s = pair.student(ids).logits[0, index, : pair.vocab_size]
        t = pair.teacher(ids).logits[0, index, : pair.vocab_size]
    return token_signals(s, t, k=k, sampled_ids=torch.tensor([response[p] for p in positions]))


def test_hf_mode_equals_token_signals_on_directly_computed_logits(pair, rollouts):
    scored = score_rollouts_hf(rollouts, pair, k=4, progress=False)
    assert isinstance(scored, ScoredBatch) and scored.mode == "exact" and scored.k == 4
    assert set(FULL_VOCAB_KEYS) <= set(scored.signals)
    for row in (0, 3, len(rollouts) - 1):
        response = rollouts.response_ids[row]
        positions = [0, int(scored.valid[row].sum()) - 1]
        expected = direct_signals(pair, rollouts.prompt_ids[row], response, positions, k=4)
        for name, values in expected.items():
            got = scored.signals[name][row, positions]
            assert torch.allclose(got, values, atol=1e-5, rtol=1e-5), (name, row)


def test_invalid_positions_after_eos_and_padding_are_masked(pair, rollouts):
    scored = score_rollouts_hf(rollouts, pair, k=4, progress=False)
    last = len(rollouts) - 1
    assert scored.valid[last].tolist()[:4] == [True, True, False, False]  # [9, EOS | 12, 13]
    lengths = torch.tensor([len(r) for r in rollouts.response_ids])
    width = scored.valid.shape[1]
    assert width == int(lengths.max())
    padding = torch.arange(width)[None, :] >= lengths[:, None]
    assert not (scored.valid & padding).any()
    for values in scored.signals.values():
        assert (values[~scored.valid] == 0).all()
    frame = scored.to_frame()
    assert len(frame) == int(scored.valid.sum())
    assert (frame.signal_mode == "exact").all() and frame.attrs["mode"] == "exact"
    assert frame[frame.row == last].pos.tolist() == [0, 1]
    expected = {"row", "prompt_id", "sample_idx", "pos", "token_id", "rel_pos", "disagreement", "compat_mass"}
    assert expected <= set(frame.columns)
    first = frame[frame.row == 0]
    assert first.token_id.tolist() == rollouts.response_ids[0][: len(first)].tolist()


def test_hf_mode_is_invariant_to_batching_and_chunking(pair, rollouts):
    big = score_rollouts_hf(rollouts, pair, k=4, progress=False)
    small = score_rollouts_hf(rollouts, pair, k=4, max_tokens_per_batch=20, position_chunk=3, progress=False)
    assert torch.equal(big.valid, small.valid)
    for name in big.signals:
        assert torch.allclose(big.signals[name], small.signals[name], atol=1e-5), name


def test_hf_mode_with_bare_models_and_training_mode_restored(pair, rollouts):
    pair.student.train()
    scored = score_rollouts_hf(
        rollouts, student=pair.student, teacher=pair.teacher, vocab_size=pair.vocab_size,
        stop_ids=[pair.tokenizer.eos_token_id], k=2, progress=False
    )
    assert pair.student.training and not pair.teacher.training
    pair.student.eval()
    assert scored.k == 2
    with pytest.raises(ValueError, match="pass a ModelPair"):
        score_rollouts_hf(rollouts, student=pair.student)


def test_valid_mask_from_stop_tokens():
    ids, valid = valid_mask([np.array([3, 0, 4]), np.array([5])], stop_ids=[0])
    assert ids.tolist() == [[3, 0, 4], [5, -1, -1]]
    assert valid.tolist() == [[True, True, False], [True, False, False]]


def test_topk_mode_refuses_stores_it_cannot_score(rollouts, vllm_testbed):
    with pytest.raises(ValueError, match="missing column"):
        score_rollouts_vllm(rollouts, vllm_testbed.teacher_path)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_prompt_logprobs_match_hf_teacher(vllm_rollouts, pair, vllm_testbed):
    from test_rollouts import PARITY_TOL, hf_full_logprobs, topk_mismatches

    df = vllm_rollouts
    sampled, ids, lps = teacher_prompt_topk(vllm_testbed.teacher_path, list(df.prompt_ids), list(df.response_ids), 4,
                                            progress=False)
    # vLLM normalises over every LM-head row (padding included): compare with HF over every row
    hf_sampled, _, _ = sampled_token_logprobs(pair.teacher, list(df.prompt_ids), list(df.response_ids))
    diff = max(np.abs(a - b).max() for a, b in zip(sampled, hf_sampled))
    assert diff <= PARITY_TOL, f"teacher log-probs differ by {diff}"
    full = hf_full_logprobs(pair.teacher, df)
    mismatched = sum(topk_mismatches(i, lp, ref) for i, lp, ref in zip(ids, lps, full))
    assert mismatched == 0, f"{mismatched} positions have a different teacher top-K beyond ties"


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_mode_names_its_mode_and_agrees_with_hf_where_it_should(vllm_rollouts, pair, vllm_testbed):
    scored = score_rollouts_vllm(vllm_rollouts, vllm_testbed.teacher_path, progress=False)
    assert scored.mode == "topk" and scored.k == 4
    assert not set(FULL_VOCAB_KEYS) & set(scored.signals)
    frame = scored.to_frame()
    assert (frame.signal_mode == "topk").all() and frame.attrs["mode"] == "topk"
    exact = score_rollouts_hf(vllm_rollouts, pair, k=4, progress=False)
    assert torch.equal(scored.valid, exact.valid)
    v = scored.valid
    # the sampled-token student log-prob comes from the store (vLLM), the exact one from HF over V
    assert torch.allclose(scored.signals["student_logprob_sampled"][v], exact.signals["student_logprob_sampled"][v],
                          atol=1e-3)
    for name in ("overlap", "teacher_top1_in_student_topk", "sampled_in_student_topk"):
        agree = (scored.signals[name][v] == exact.signals[name][v]).float().mean()
        assert agree > 0.95, name  # identical sets except at near-ties
    # C from top-K only is the lower bound of the exact C
    assert (scored.signals["compat_mass"][v] <= exact.signals["compat_mass"][v] + 1e-3).all()
    with pytest.raises(ValueError, match="need 1 <= k <= 4"):
        score_rollouts_vllm(vllm_rollouts, vllm_testbed.teacher_path, k=5)
