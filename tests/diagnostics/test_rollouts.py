"""Rollouts: HF determinism, vLLM/HF log-prob parity, EOS handling, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from diagnostics.core.config import ConfigError
from diagnostics.data.prompts import cut_at_stop, fit_prompts, render_prompts, render_text
from diagnostics.generation.backends import (
    SamplingConfig,
    get_backend,
    list_backends,
    register_backend,
    resolve_backend,
)
from diagnostics.generation.rollouts import generate_rollouts
from diagnostics.generation.store import ROLLOUT_SCHEMA, read_store, write_store
from diagnostics.generation.vllm import vllm_logprobs_mode
from diagnostics.lm.forward import iter_response_logits, sampled_token_logprobs
from diagnostics.lm.models import load_model

PARITY_TOL = 1e-3  # float32, as required of vLLM vs HF
TIE_TOL = 1e-5  # two log-probs this close are a tie: their top-K order may differ across implementations


@pytest.fixture(scope="module")
def student(vllm_testbed):
    return load_model(vllm_testbed.student_path, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def tokenizer(vllm_testbed):
    return AutoTokenizer.from_pretrained(vllm_testbed.student_path)


def hf_sample(student, tokenizer, prompts, **kwargs):
    sampling = SamplingConfig(**{"max_new_tokens": 6, "n": 2, "seed": 0, **kwargs})
    return generate_rollouts(student, tokenizer, prompts, sampling, backend="hf", progress=False)


# --------------------------------------------------------------------------------------------
# Top-K comparison up to ties
# --------------------------------------------------------------------------------------------


def topk_mismatches(ids: np.ndarray, logprobs: np.ndarray, reference_full: np.ndarray) -> int:
    """Positions where a top-K [R, K] is not the reference's top-K up to exact ties.

    The j-th id must have, under the reference's full log-probs [R, V], the reference's j-th largest
    log-prob (within TIE_TOL): ids may differ only by swaps among tied tokens, including a tie at the
    K-th place (a different member of the tie is in the set). Log-probs must match within PARITY_TOL.
    """
    k = ids.shape[1]
    ref_sorted = -np.sort(-reference_full, axis=1)[:, :k]  # [R, K] the reference's top-K values
    assert np.abs(logprobs - ref_sorted).max() <= PARITY_TOL
    at_ids = np.take_along_axis(reference_full, ids.astype(np.int64), axis=1)  # reference log-prob of each id
    return int((np.abs(at_ids - ref_sorted) > TIE_TOL).any(axis=1).sum())


def test_topk_comparison_accepts_ties_and_rejects_real_swaps():
    full = np.log(np.array([[0.4, 0.2, 0.2, 0.1, 0.1]]))
    logprobs = np.log(np.array([[0.4, 0.2]]))
    assert topk_mismatches(np.array([[0, 1]]), logprobs, full) == 0
    assert topk_mismatches(np.array([[0, 2]]), logprobs, full) == 0  # tie at the K-th place: 1 or 2
    full_no_tie = np.log(np.array([[0.4, 0.21, 0.19, 0.1, 0.1]]))
    assert topk_mismatches(np.array([[0, 2]]), np.log(np.array([[0.4, 0.21]])), full_no_tie) == 1


def hf_full_logprobs(model, df) -> list[np.ndarray]:
    """[R, V] log-probs (all LM-head rows, temperature 1) at each response position, per row."""
    out = [None] * len(df)
    for chunk in iter_response_logits([model], list(df.prompt_ids), list(df.response_ids)):
        logp = torch.log_softmax(chunk.logits[0], dim=-1).numpy()
        for row in np.unique(chunk.rows.numpy()):
            sel = chunk.rows.numpy() == row
            block = np.zeros((len(df.response_ids[row]), logp.shape[1]), np.float32) if out[row] is None else out[row]
            block[chunk.pos.numpy()[sel]] = logp[sel]
            out[row] = block
    return out


# --------------------------------------------------------------------------------------------
# HF backend
# --------------------------------------------------------------------------------------------


def test_hf_rollouts_fit_the_store_schema_and_cut_at_eos(student, tokenizer, rollout_prompts, tmp_path):
    df = hf_sample(student, tokenizer, rollout_prompts[:6], logprobs_k=3)
    assert set(ROLLOUT_SCHEMA.names) | {"topk_ids", "topk_logprobs"} == set(df.columns)
    assert len(df) == 12 and list(df.sample_idx[:4]) == [0, 1, 0, 1] and df.attrs["backend"] == "hf"
    eos = tokenizer.eos_token_id
    for ids, reason, lps, top in zip(df.response_ids, df.finish_reason, df.response_logprobs, df.topk_ids):
        assert (reason == "stop") == (ids[-1] == eos)
        assert eos not in ids[:-1]  # cut after the first EOS, EOS kept
        assert reason == "stop" or len(ids) == 6
        assert len(lps) == len(ids) and top.shape == (len(ids), 3)
        assert (lps <= 0).all()
    assert (df.finish_reason == "stop").any()
    back = read_store(write_store(df, tmp_path / "r.parquet", {"backend": "hf"}))
    assert all(np.array_equal(a, b) for a, b in zip(back.topk_logprobs, df.topk_logprobs))


def test_hf_logprobs_are_tempered_log_softmax_of_the_raw_logits(student, tokenizer, rollout_prompts):
    df = hf_sample(student, tokenizer, rollout_prompts[:3], temperature=0.7, top_p=0.9, logprobs_k=2)
    prompt, response = list(df.prompt_ids[0]), list(df.response_ids[0])
    with torch.no_grad():
        logits = student(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
    expected = torch.log_softmax(logits / 0.7, dim=-1)  # no top-p truncation in the stored log-probs
    got = torch.as_tensor(df.response_logprobs[0])
    assert torch.allclose(got, expected.gather(1, torch.tensor(response)[:, None])[:, 0], atol=1e-5)
    assert torch.allclose(torch.as_tensor(df.topk_logprobs[0]), expected.topk(2).values, atol=1e-5)


def test_hf_same_seed_same_rollouts_other_seed_other_rollouts(student, tokenizer, rollout_prompts):
    rng_before = torch.get_rng_state()
    a = hf_sample(student, tokenizer, rollout_prompts, seed=5)
    assert torch.equal(torch.get_rng_state(), rng_before), "sampling must not move the caller's RNG"
    b = hf_sample(student, tokenizer, rollout_prompts, seed=5)
    c = hf_sample(student, tokenizer, rollout_prompts, seed=6)
    same = [np.array_equal(x, y) for x, y in zip(a.response_ids, b.response_ids)]
    assert all(same)
    assert all(np.array_equal(x, y) for x, y in zip(a.response_logprobs, b.response_logprobs))
    assert not all(np.array_equal(x, y) for x, y in zip(a.response_ids, c.response_ids))


def test_hf_backend_loads_a_path_and_accepts_chat_and_token_prompts(vllm_testbed, tokenizer):
    text = "sort aj aa am ad :"  # in the testbed vocabulary (an unencodable character is an error)
    chat = [{"role": "user", "content": text}]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert render_prompts(tokenizer, [text, chat, ids]) == [ids, ids, ids]  # the testbed's template is trivial
    sampling = SamplingConfig(max_new_tokens=4, seed=1)
    df = generate_rollouts(vllm_testbed.student_path, None, [text, chat, ids], sampling, backend="hf",
                           prompt_ids=[7, 8, 9], progress=False)
    assert list(df.prompt_id) == [7, 8, 9]
    assert all(np.array_equal(p, ids) for p in df.prompt_ids)


def test_trainer_mode_and_generation_config_are_restored(student, tokenizer, rollout_prompts):
    student.train()
    saved = student.generation_config
    hf_sample(student, tokenizer, rollout_prompts[:2])
    assert student.training and student.generation_config is saved
    student.eval()


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_empty_prompt_list_and_missing_model_are_named(student, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="prompts: empty list"):
        generate_rollouts(student, tokenizer, [], SamplingConfig(), backend="hf")
    with pytest.raises(FileNotFoundError, match=f"model: model directory {tmp_path}/missing does not exist"):
        generate_rollouts(str(tmp_path / "missing"), None, ["sort aa ad :"], SamplingConfig())
    with pytest.raises(ValueError, match="prompt_ids: 1 ids for 2 prompts"):
        generate_rollouts(student, tokenizer, ["a", "b"], SamplingConfig(), prompt_ids=[0])
    with pytest.raises(ValueError, match=r"prompts\[1\]: the prompt encodes to zero tokens"):
        generate_rollouts(student, tokenizer, ["sort aa :", ""], SamplingConfig(), chat_template=False)
    with pytest.raises(ValueError, match="in-memory model"):
        generate_rollouts(student, tokenizer, ["sort aa :"], SamplingConfig(), backend="vllm")
    with pytest.raises(ValueError, match="logprobs_k=999 exceeds"):
        generate_rollouts(student, tokenizer, ["sort aa :"], SamplingConfig(logprobs_k=999), backend="hf")


def test_sampling_config_ranges():
    bad_settings = ({"temperature": 0.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"n": 0}, {"max_new_tokens": 0},
                    {"logprobs_k": -1})
    for bad in bad_settings:
        with pytest.raises(ConfigError, match=next(iter(bad))):
            SamplingConfig(**bad)


def test_too_long_prompt_raises_or_is_left_truncated(student, tokenizer):
    limit = student.config.max_position_embeddings  # 64 on the testbed
    long_prompt = list(range(7, 37)) * 3  # 90 token ids
    sampling = SamplingConfig(max_new_tokens=10)
    message = rf"prompt 2: 90 prompt tokens \+ max_new_tokens=10 exceed the model's {limit}"
    with pytest.raises(ValueError, match=message):
        generate_rollouts(student, tokenizer, [[7, 8], long_prompt], sampling, backend="hf")
    df = generate_rollouts(student, tokenizer, [[7, 8], long_prompt], sampling, backend="hf", truncate_prompt=True,
                           progress=False)
    assert list(df.prompt_ids[1]) == long_prompt[-(limit - 10) :]
    assert list(df.prompt_ids[0]) == [7, 8]
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        fit_prompts([[1]], 8, 8, truncate=True)


def test_backend_choice_and_vllm_logprob_modes(student):
    assert resolve_backend("auto", student) == "hf"
    if not torch.cuda.is_available():
        assert resolve_backend("auto", "/some/path") == "hf"
    with pytest.raises(ValueError, match="backend: must be one of"):
        resolve_backend("sglang", student)
    assert vllm_logprobs_mode(SamplingConfig(temperature=1.0, top_p=0.9)) == "raw_logprobs"
    assert vllm_logprobs_mode(SamplingConfig(temperature=1.0)) == "processed_logprobs"
    assert vllm_logprobs_mode(SamplingConfig(temperature=0.7)) == "processed_logprobs"
    with pytest.raises(ValueError, match="use backend='hf'"):
        vllm_logprobs_mode(SamplingConfig(temperature=0.7, top_p=0.9))
    with pytest.raises(ValueError, match="needs a model directory"):
        resolve_backend("vllm", student)


def test_backend_registry_by_name(student, tokenizer):
    """A backend registered by name is what generate_rollouts runs; unknown names list the known ones."""
    assert list_backends() == ["hf", "vllm"]
    assert (get_backend("hf").signal_mode, get_backend("vllm").signal_mode) == ("exact", "topk")
    with pytest.raises(ValueError, match="unknown backend 'sglang'; known: auto, hf, vllm"):
        get_backend("sglang")

    @register_backend("echo")
    class Echo:  # every response is the prompt's last token, then stop
        signal_mode = "exact"

        def generate(self, model, prompts, sampling, stop_ids, options):
            return [{"prompt": i, "sample_idx": 0, "response_ids": [p[-1]], "response_logprobs": [0.0],
                     "finish_reason": "length"} for i, p in enumerate(prompts)]

    try:
        with pytest.raises(ValueError, match="already registered"):
            register_backend("echo")(Echo)
        df = generate_rollouts(student, tokenizer, [[5, 6], [7]], SamplingConfig(max_new_tokens=4), backend="echo",
                               progress=False)
        assert df["response_ids"].map(list).tolist() == [[6], [7]] and df.attrs["backend"] == "echo"
    finally:
        from diagnostics.generation import backends

        backends._BACKENDS.pop("echo")  # noqa: SLF001 - keep the registry as other tests expect it


def test_render_text_and_render_prompts_agree(tokenizer, monkeypatch):
    text = render_text(tokenizer, "sort ab :")  # the testbed template writes the content as it is
    assert render_prompts(tokenizer, ["sort ab :"]) == [tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert render_text(tokenizer, [{"role": "user", "content": "sort ab :"}]) == text
    monkeypatch.setattr(tokenizer, "chat_template", None)
    assert render_text(tokenizer, "sort ab :") == "sort ab :"
    with pytest.raises(ValueError, match="chat template"):
        render_text(tokenizer, [{"role": "user", "content": "x"}])


def test_cut_at_stop():
    assert cut_at_stop([5, 0, 3, 0], [0], 4) == ([5, 0], "stop")
    assert cut_at_stop([5, 6, 7], [0, 9], 3) == ([5, 6, 7], "length")
    assert cut_at_stop([9], [0, 9], 3) == ([9], "stop")


# --------------------------------------------------------------------------------------------
# vLLM backend (starts the engine once per session)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_logprobs_match_hf_teacher_forcing(vllm_rollouts, student):
    df = vllm_rollouts
    assert df.attrs["backend"] == "vllm" and len(df) == 32
    assert list(df.sample_idx[:4]) == [0, 1, 0, 1]
    lps, _, _ = sampled_token_logprobs(student, list(df.prompt_ids), list(df.response_ids))
    diff = max(np.abs(a - b).max() for a, b in zip(lps, df.response_logprobs))
    assert diff <= PARITY_TOL, f"sampled-token log-probs differ by {diff}"
    full = hf_full_logprobs(student, df)
    mismatched = sum(topk_mismatches(ids, top, ref) for ids, top, ref in zip(df.topk_ids, df.topk_logprobs, full))
    assert mismatched == 0, f"{mismatched} positions have a different top-K beyond ties"


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_rollouts_stop_at_eos_and_fit_the_store(vllm_rollouts, tokenizer, tmp_path):
    eos = tokenizer.eos_token_id
    for ids, reason in zip(vllm_rollouts.response_ids, vllm_rollouts.finish_reason):
        assert eos not in ids[:-1]
        assert (reason == "stop") == (ids[-1] == eos)
    assert (vllm_rollouts.finish_reason == "stop").any()
    back = read_store(write_store(vllm_rollouts, tmp_path / "v.parquet", {"backend": "vllm"}))
    assert len(back) == len(vllm_rollouts)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_same_seed_same_rollouts_and_tempered_logprobs(vllm_testbed, rollout_prompts, vllm_rollouts, student):
    from diagnostics.generation.vllm import _ENGINE  # noqa: PLC2701 - inspect the engine cache

    sampling = SamplingConfig(max_new_tokens=vllm_testbed.config.max_new_tokens + 2, n=2, seed=3, logprobs_k=4)
    again = generate_rollouts(vllm_testbed.student_path, None, rollout_prompts, sampling, backend="vllm",
                              progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(again.response_ids, vllm_rollouts.response_ids))
    # temperature != 1 (same engine): log-probs are log_softmax(logits / T)
    warm = SamplingConfig(max_new_tokens=5, n=1, seed=4, temperature=0.5)
    df = generate_rollouts(vllm_testbed.student_path, None, rollout_prompts[:8], warm, backend="vllm", progress=False)
    assert _ENGINE["key"][2] == "processed_logprobs"
    lps, _, _ = sampled_token_logprobs(student, list(df.prompt_ids), list(df.response_ids), temperature=0.5)
    assert max(np.abs(a - b).max() for a, b in zip(lps, df.response_logprobs)) <= PARITY_TOL
    assert "topk_ids" not in df.columns
