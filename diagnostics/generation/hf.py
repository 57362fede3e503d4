"""The `hf` backend: sampling with transformers `generate` (a model directory or the trainer's live
in-memory student) and exact scoring with both models in this process.

* Sampling is pure temperature + top-p (no top-k truncation, no repetition penalty, nothing from the
  checkpoint's generation_config.json). Each generation batch is seeded with
  `derive_seed(seed, batch index)` inside a forked RNG (the caller's global RNG state is untouched):
  same seed, batch size and device, same rollouts.
* `response_logprobs` come from a teacher-forced recompute on prompt + response after sampling
  (`diagnostics.lm.forward.sampled_token_logprobs`: log_softmax(logits / T) over every LM-head row,
  without the top-p truncation), not from `output_scores` (post-processed by the warpers).
* `generate_responses`: batched greedy (or sampled) generation of whole responses for answer accuracy
  (`diagnostics.accuracy`), on left-padded prompts (`encode_prompts`, `left_pad`).
* `score`: `score_rollouts_hf` (full-vocabulary logits of both models in this process: exact signals;
  the mode is described in `diagnostics.generation.scoring`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase

from diagnostics.core.nonfinite import NonFiniteError
from diagnostics.core.progress import progress_bar
from diagnostics.core.seeds import derive_seed
from diagnostics.data.prompts import cut_at_stop
from diagnostics.generation.backends import GenerateOptions, SamplingConfig, register_backend
from diagnostics.generation.scoring import (
    DEFAULT_MAX_TOKENS_PER_BATCH,
    DEFAULT_POSITION_CHUNK,
    ScoredBatch,
    batch_meta,
    check_store,
    scatter_rows,
    tempered_sampled,
    valid_mask,
)
from diagnostics.lm.forward import iter_response_logits, sampled_token_logprobs
from diagnostics.lm.models import ModelPair, load_model, resolve_device, resolve_dtype
from diagnostics.signals import token_signals


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


class FiniteLogitsGuard(LogitsProcessor):
    """A generate() logits processor that stops generation at the first NaN or +inf score (after temperature;
    -inf is a masked token and allowed, a row of nothing but -inf is not): the same stop as training's guard,
    naming the generated position, instead of torch.multinomial's "probability tensor contains inf/nan"."""

    def __init__(self) -> None:
        self.position = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        bad = torch.isnan(scores).any(dim=-1) | torch.isposinf(scores).any(dim=-1) | torch.isneginf(scores).all(dim=-1)
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            raise NonFiniteError(f"generation logits non-finite at generated token {self.position + 1} of batch row "
                                 f"{row} (NaN/inf scores after temperature: the model's weights or the temperature)")
        self.position += 1
        return scores


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
                    logits_processor=LogitsProcessorList([FiniteLogitsGuard()]),
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
        tempered sampled-token log-probs (`diagnostics.generation.scoring.TEMPERED_KEYS`)."""
        return score_rollouts_hf(rollouts, student=student, teacher=teacher, vocab_size=vocab_size, stop_ids=stop_ids,
                                 k=k, max_tokens_per_batch=max_tokens_per_batch, temperature=temperature,
                                 progress=progress)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt, without special tokens (chat templates are applied upstream)."""
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] ids and attention mask, padded on the left so generation continues every row."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids, mask


@torch.no_grad()
def generate_responses(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int,
    greedy: bool = True,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
) -> list[str]:
    """Decoded responses (special tokens stripped, cut at EOS) for each prompt."""
    device = next(model.parameters()).device
    encoded = encode_prompts(tokenizer, prompts)
    generator_seed = torch.Generator().manual_seed(seed)
    texts: list[str] = []
    for start in range(0, len(encoded), batch_size):
        ids, mask = left_pad(encoded[start : start + batch_size], tokenizer.pad_token_id)
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator_seed)))
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            temperature=temperature if not greedy else None,
            top_k=0 if not greedy else None,
            top_p=1.0 if not greedy else None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            logits_processor=LogitsProcessorList([FiniteLogitsGuard()]),
        )
        for row in out[:, ids.shape[1] :].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def score_rollouts_hf(
    rollouts: pd.DataFrame,
    pair: ModelPair | None = None,
    *,
    student: torch.nn.Module | None = None,
    teacher: torch.nn.Module | None = None,
    vocab_size: int | None = None,
    stop_ids: Sequence[int] | None = None,
    k: int = 16,
    max_tokens_per_batch: int = DEFAULT_MAX_TOKENS_PER_BATCH,
    position_chunk: int = DEFAULT_POSITION_CHUNK,
    temperature: float = 1.0,
    progress: bool = True,
) -> ScoredBatch:
    """Exact per-position signals of a rollout store with both models in this process.

    Args:
        rollouts: a store DataFrame (at least prompt_id, sample_idx, prompt_ids, response_ids).
        pair: a `ModelPair` (models, shared V, tokenizer); or `student`, `teacher` and `vocab_size`.
        stop_ids: tokens that end a response (default: the pair tokenizer's EOS; with bare models and
            no stop_ids every stored response position is valid).
        k: top-K size of the set signals. max_tokens_per_batch, position_chunk: memory bounds.
        temperature: the rollouts' sampling temperature T; T != 1 adds TEMPERED_KEYS (the `token_signals`
            keys stay those of the untempered distributions either way).
    Returns:
        ScoredBatch (mode "exact") with every `token_signals` key plus the sampled-token ones.
    """
    check_store(rollouts, ("prompt_id", "sample_idx", "prompt_ids", "response_ids"))
    if pair is not None:
        student, teacher, vocab_size = pair.student, pair.teacher, pair.vocab_size
        if stop_ids is None and pair.tokenizer.eos_token_id is not None:
            stop_ids = [pair.tokenizer.eos_token_id]
    if student is None or teacher is None or vocab_size is None:
        raise ValueError("score_rollouts_hf: pass a ModelPair, or student, teacher and vocab_size")
    responses = list(rollouts["response_ids"])
    token_ids, valid = valid_mask(responses, stop_ids or [])
    # only valid positions are scored: drop anything after a stop token before teacher forcing
    kept = [np.asarray(r)[: int(n)] for r, n in zip(responses, valid.sum(dim=1))]
    was_training = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    b_parts, t_parts = [], []
    try:
        chunks = iter_response_logits(
            [student, teacher],
            list(rollouts["prompt_ids"]),
            kept,
            vocab_size=vocab_size,
            max_tokens_per_batch=max_tokens_per_batch,
            position_chunk=position_chunk,
            progress=progress,
        )
        for chunk in chunks:
            # token_signals works on CPU float32 tensors
            logits_s, logits_t = (x.cpu() for x in chunk.logits)
            signals = token_signals(logits_s, logits_t, k=k, sampled_ids=chunk.targets)
            if temperature != 1.0:
                signals.update(tempered_sampled(logits_s, logits_t, chunk.targets, temperature))
            for name, values in signals.items():
                parts.setdefault(name, []).append(values)
            b_parts.append(chunk.rows)
            t_parts.append(chunk.pos)
    finally:
        student.train(was_training[0])
        teacher.train(was_training[1])
    flat = {name: torch.cat(values) for name, values in parts.items()}
    grids = scatter_rows(flat, torch.cat(b_parts), torch.cat(t_parts), tuple(valid.shape))
    return ScoredBatch(grids, valid, token_ids, mode="exact", k=k, **batch_meta(rollouts))
