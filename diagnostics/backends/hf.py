"""The `hf` backend: sampling with transformers `generate` (a model directory or the trainer's live
in-memory student) and exact scoring with both models in this process.

* Sampling is pure temperature + top-p (no top-k truncation, no repetition penalty, nothing from the
  checkpoint's generation_config.json). Each generation batch is seeded with
  `derive_seed(seed, batch index)` inside a forked RNG (the caller's global RNG state is untouched):
  same seed, batch size and device, same rollouts.
* `response_logprobs` come from a teacher-forced recompute on prompt + response after sampling
  (`diagnostics.forward.sampled_token_logprobs`: log_softmax(logits / T) over every LM-head row,
  without the top-p truncation), not from `output_scores` (post-processed by the warpers).
* `score`: `diagnostics.scoring.score_rollouts_hf` (full-vocabulary logits: exact signals).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pandas as pd
import torch
from transformers import GenerationConfig

from diagnostics.backends import GenerateOptions, register_backend
from diagnostics.evaluation import left_pad
from diagnostics.forward import sampled_token_logprobs
from diagnostics.models import load_model, resolve_device, resolve_dtype
from diagnostics.progress import progress_bar
from diagnostics.prompts import cut_at_stop
from diagnostics.rollouts import SamplingConfig, derive_seed
from diagnostics.scoring import ScoredBatch, score_rollouts_hf


@contextmanager
def _seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Seed torch's RNG inside a fork, so the caller's global RNG state is left as it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@contextmanager
def _plain_generation(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and an empty generation config, so no checkpoint default (top_k=20,
    repetition_penalty=1.05, ...) leaks into sampling; both restored afterwards."""
    saved_config, was_training = model.generation_config, model.training
    model.generation_config = GenerationConfig()
    model.eval()
    try:
        yield
    finally:
        model.generation_config = saved_config
        model.train(was_training)


@torch.no_grad()
def sample_hf(
    model: torch.nn.Module,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    stop_ids: list[int],
    pad_id: int,
    batch_size: int,
    progress: bool,
    vocab_size: int | None = None,
) -> list[tuple[int, int, list[int], str]]:
    """(prompt index, sample index, response ids, finish reason) for every prompt x sample.

    LM-head rows at or beyond `vocab_size` (padding: Qwen2.5 has 151,936 rows for 151,665 tokens) are never
    sampled: no tokenizer id exists for them, and the bank refuses them.
    """
    device = next(model.parameters()).device
    n_rows = model.get_output_embeddings().weight.shape[0]
    padding = list(range(vocab_size, n_rows)) if vocab_size is not None and vocab_size < n_rows else None
    rows = [(i, s) for i in range(len(prompts)) for s in range(sampling.n)]
    out = []
    starts = range(0, len(rows), batch_size)
    with _plain_generation(model):
        for b, start in enumerate(progress_bar(starts, desc="sampling (hf)", enabled=progress, leave=False)):
            batch = rows[start : start + batch_size]
            ids, mask = left_pad([prompts[i] for i, _ in batch], pad_id)
            with _seeded(device, derive_seed(sampling.seed, b)):
                generated = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    do_sample=True,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    top_k=0,  # no top-k truncation
                    max_new_tokens=sampling.max_new_tokens,
                    eos_token_id=stop_ids or None,
                    pad_token_id=pad_id,
                    suppress_tokens=padding,
                )
            for (i, s), tokens in zip(batch, generated[:, ids.shape[1] :].tolist()):
                out.append((i, s, *cut_at_stop(tokens, stop_ids, sampling.max_new_tokens)))
    return out


@register_backend("hf")
class HFBackend:
    """transformers generate + teacher-forced log-probs; exact scores."""

    signal_mode = "exact"

    def generate(self, model: Any, prompts: list[list[int]], sampling: SamplingConfig, stop_ids: list[int],
                 options: GenerateOptions) -> list[dict]:
        """Sampled responses with their teacher-forced log-probs (and top-K), one record per response."""
        if not isinstance(model, torch.nn.Module):  # a model directory
            device = resolve_device(options.device)
            model = load_model(str(model), device, resolve_dtype(options.dtype, device))
        samples = sample_hf(model, prompts, sampling, stop_ids, options.pad_id, options.batch_size, options.progress,
                            options.vocab_size)
        sampled, top_ids, top_lps = sampled_token_logprobs(
            model,
            [prompts[i] for i, _, _, _ in samples],
            [r for _, _, r, _ in samples],
            temperature=sampling.temperature,
            k=sampling.logprobs_k,
            max_tokens_per_batch=options.max_tokens_per_batch,
            progress=options.progress,
        )
        records = []
        for j, (i, s, response, reason) in enumerate(samples):
            record = {"prompt": i, "sample_idx": s, "response_ids": response, "response_logprobs": sampled[j],
                      "finish_reason": reason}
            if sampling.logprobs_k:
                record.update(topk_ids=top_ids[j], topk_logprobs=top_lps[j])
            records.append(record)
        return records

    def score(self, rollouts: pd.DataFrame, *, teacher: Any, k: int, stop_ids: list[int] | None,
              student: torch.nn.Module | None = None, vocab_size: int | None = None, progress: bool = True,
              max_tokens_per_batch: int = 16384, temperature: float = 1.0) -> ScoredBatch:
        """Exact signals from both models' full logits (student and teacher in this process); T != 1 adds the
        tempered sampled-token log-probs (`diagnostics.scoring.TEMPERED_KEYS`)."""
        return score_rollouts_hf(rollouts, student=student, teacher=teacher, vocab_size=vocab_size, stop_ids=stop_ids,
                                 k=k, max_tokens_per_batch=max_tokens_per_batch, temperature=temperature,
                                 progress=progress)
