"""Student rollouts: sample responses to prompts with vLLM or transformers, in the store schema.

One entry point, `generate_rollouts(model, tokenizer, prompts, sampling, backend=...)`, returns a
DataFrame in the schema of `diagnostics.generation.store` (one row per response). Two backends give the same
output (`diagnostics.generation.backends`): `vllm` (a model directory; fast) and `hf` (transformers `generate`;
also takes the trainer's live in-memory student). `auto` picks vLLM when a CUDA device and vLLM are
present, else HF.

What is stored, exactly:

* `response_ids` are cut after the first stop token (EOS included: learning to stop is a position
  too); `finish_reason` is "stop" when it ends in a stop token, "length" when `max_new_tokens` ran out.
  Stop tokens: the tokenizer's EOS plus the model's `generation_config.eos_token_id` (vLLM's own rule).
* `response_logprobs[t]` = log_softmax(logits_t / temperature)[y_t]: the log-prob of the sampled token
  under the raw next-token distribution scaled by the temperature, over every LM-head row, WITHOUT the
  top-p truncation. At temperature 1 (the paper's setting) it is the model's own log p(y_t | c_t).
  The optional top-K (`logprobs_k`) is the K largest of the same log-probs.
  hf: a teacher-forced recompute after sampling; vllm: the engine's log-probs in the matching
  `logprobs_mode` (see each backend's docstring for how, and the one combination vLLM refuses).
* Sampling is pure temperature + top-p: no top-k truncation, no repetition penalty, nothing inherited
  from the checkpoint's `generation_config.json`; seeds are derived per request (vLLM) or per batch
  (HF) with `derive_seed`. Same seed, same batch size, same device: same rollouts.

The backends live in `diagnostics.generation.backends` (`hf`, `vllm`, chosen by name); prompt rendering and
stop tokens in `diagnostics.data.prompts`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from diagnostics.data.prompts import (
    Prompt,
    fit_prompts,
    load_generation_config,
    max_positions,
    render_prompts,
    stop_token_ids,
    text_config,
)
from diagnostics.generation.backends import GenerateOptions, SamplingConfig, get_backend, resolve_backend
from diagnostics.lm.models import check_path


def _to_frame(records: list[dict], prompts: list[list[int]], prompt_ids: Sequence[int], sampling: SamplingConfig
              ) -> pd.DataFrame:
    """Backend records -> one row per response in the store schema, ordered by (prompt, sample_idx)."""
    rows = []
    for r in sorted(records, key=lambda r: (r["prompt"], r["sample_idx"])):
        row = {
            "prompt_id": int(prompt_ids[r["prompt"]]),
            "sample_idx": int(r["sample_idx"]),
            "prompt_ids": np.asarray(prompts[r["prompt"]], np.int32),
            "response_ids": np.asarray(r["response_ids"], np.int32),
            "response_logprobs": np.asarray(r["response_logprobs"], np.float32),
            "finish_reason": r["finish_reason"],
            "temperature": float(sampling.temperature),
            "top_p": float(sampling.top_p),
            "max_new_tokens": int(sampling.max_new_tokens),
            "seed": int(sampling.seed),
        }
        if "topk_ids" in r:
            row.update(topk_ids=r["topk_ids"], topk_logprobs=r["topk_logprobs"])
        rows.append(row)
    return pd.DataFrame(rows)


def _check_inputs(prompts: Sequence[Prompt], prompt_ids: Sequence[int] | None) -> list[int]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts: expected a list of prompts, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts: empty list, nothing to generate")
    ids = list(range(len(prompts))) if prompt_ids is None else [int(i) for i in prompt_ids]
    if len(ids) != len(prompts):
        raise ValueError(f"prompt_ids: {len(ids)} ids for {len(prompts)} prompts")
    if len(set(ids)) != len(ids):
        raise ValueError("prompt_ids: ids must be unique")
    return ids


def generate_rollouts(
    model: str | Path | torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    prompts: Sequence[Prompt],
    sampling: SamplingConfig,
    *,
    backend: str = "auto",
    prompt_ids: Sequence[int] | None = None,
    truncate_prompt: bool = False,
    chat_template: bool = True,
    max_model_len: int | None = None,
    batch_size: int = 64,
    max_tokens_per_batch: int = 16384,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
) -> pd.DataFrame:
    """Sample `sampling.n` responses per prompt; one row per response in the store schema.

    Args:
        model: a model directory (either backend) or an in-memory HF causal LM (hf only).
        tokenizer: the model's tokenizer; None loads it from the model directory.
        prompts: text, chat message lists or token-id lists (see `render_prompts`).
        sampling: temperature, top_p, max_new_tokens, n, seed, logprobs_k.
        backend: "auto" or a registered backend name (`diagnostics.generation.backends`: "hf", "vllm").
        prompt_ids: the `prompt_id` of each prompt (unique ints; default 0 .. len(prompts) - 1).
        truncate_prompt: when prompt + max_new_tokens exceeds the context, keep the prompt's last
            tokens instead of raising.
        chat_template: send text prompts through the tokenizer's chat template (if it has one).
        max_model_len: context length to enforce (default: the model's max_position_embeddings).
        batch_size: hf: sequences per `generate` call. max_tokens_per_batch: hf: tokens per batch of
            the teacher-forced log-prob recompute.
        device, dtype: hf, when loading `model` from a directory (`auto`: CUDA if present; float32
            on CPU, bfloat16 on GPU).
    Returns:
        DataFrame with the columns of `diagnostics.generation.store.ROLLOUT_SCHEMA` (+ `topk_ids`,
        `topk_logprobs` [R, K] when logprobs_k > 0), rows ordered by (prompt, sample_idx), and
        `df.attrs` = {"backend", "model_path", "sampling"} for `store.make_manifest`.
    """
    ids = _check_inputs(prompts, prompt_ids)
    model_path = str(model) if isinstance(model, (str, Path)) else None
    if model_path is not None:
        check_path(model_path, "model")
    backend = resolve_backend(backend, model)
    if tokenizer is None:
        if model_path is None:
            raise ValueError("tokenizer: required with an in-memory model")
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    if model_path is not None:
        config = AutoConfig.from_pretrained(model_path)
        generation_config = load_generation_config(model_path)
    else:
        config, generation_config = model.config, model.generation_config
    rows = int(text_config(config).vocab_size)
    if sampling.logprobs_k > rows:
        raise ValueError(f"logprobs_k={sampling.logprobs_k} exceeds the model's {rows} vocabulary rows")
    stop_ids = stop_token_ids(tokenizer, generation_config)
    max_len = max_model_len or max_positions(config)
    rendered = render_prompts(tokenizer, prompts, chat_template=chat_template)
    tokens = fit_prompts(rendered, max_len, sampling.max_new_tokens, truncate_prompt)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids or [0])[0]
    options = GenerateOptions(pad_id=pad_id, max_model_len=max_len, batch_size=batch_size,
                              max_tokens_per_batch=max_tokens_per_batch, device=device, dtype=dtype, progress=progress,
                              vocab_size=len(tokenizer))
    records = get_backend(backend).generate(model_path or model, tokens, sampling, stop_ids, options)
    df = _to_frame(records, tokens, ids, sampling)
    df.attrs.update(backend=backend, model_path=model_path, sampling=dataclasses.asdict(sampling))
    return df
