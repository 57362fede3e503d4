"""Teacher scoring of a rollout store: per-position inputs to `diagnostics.signals`, in two modes.

Position convention (both modes): position `pos` of row `b` is the next-token distribution that
predicts `response_ids[pos]` from `prompt_ids + response_ids[:pos]`. Valid positions are those up to
and including the first stop token of the response; positions after it and padding are invalid.

* `score_rollouts_hf` ("exact" mode): teacher and student in this process. Full-vocabulary logits
  sliced to the pair's shared vocabulary V (LM-head padding rows dropped), rows batched by token count
  (`max_tokens_per_batch`), no grad, and the LM heads applied to chunks of `position_chunk`
  positions, so no [B, L, V] tensor exists. Signals: `token_signals` (exact D, C, entropies, KLs),
  always of the untempered distributions; with `temperature` T != 1 also TEMPERED_KEYS, the sampled
  token's log_softmax(logits / T) of both models (what the trainer's ratio and advantage read).
* `score_rollouts_vllm` ("topk" mode): for teachers too big to sit beside the student. The teacher's
  top-K log-probs come from vLLM `prompt_logprobs=K` (temperature 1, max_tokens=1) on prompt +
  response; the student's top-K from the store's `topk_ids`/`topk_logprobs` (rollouts sampled at
  temperature 1 with logprobs_k >= K). Signals: `token_signals_topk` (D with the 1e-12 floor, C as
  the lower bound, no full-vocabulary keys). vLLM normalises over all LM-head rows (padding rows
  included); for trained checkpoints their mass is negligible.

Both return a `ScoredBatch`: padded [B, T] signals (B = store rows in store order, T = the longest
response), a `valid` mask, the mode, and `to_frame()` for a tidy per-position table whose
`signal_mode` column names the mode. Invalid entries of every signal are 0 (`valid` is the truth).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from diagnostics.backends.vllm import logprob_entry, vllm_engine
from diagnostics.forward import iter_response_logits
from diagnostics.models import ModelPair
from diagnostics.prompts import max_positions
from diagnostics.signals import token_signals, token_signals_topk

# Tokens per teacher-forcing batch and positions per LM-head chunk (memory: each chunk holds
# 2 x position_chunk x V float32 logits, 2 x 256 x 151,936 x 4 B = 311 MB for Qwen).
DEFAULT_MAX_TOKENS_PER_BATCH = 16384
DEFAULT_POSITION_CHUNK = 256
# sampled-token log-probs of the tempered distributions log_softmax(logits / T), student then teacher
TEMPERED_KEYS = ("student_logprob_tempered", "teacher_logprob_tempered")


@dataclass
class ScoredBatch:
    """Per-position signals of a rollout store.

    signals: {name: [B, T] float32}, 0 at invalid positions. valid: [B, T] bool.
    token_ids: [B, T] long, the response token each position predicts (-1 at padding).
    rows: [B] store row index; prompt_id, sample_idx: [B] long. mode: "exact" or "topk". k: top-K size.
    """

    signals: dict[str, torch.Tensor]
    valid: torch.Tensor
    token_ids: torch.Tensor
    rows: torch.Tensor
    prompt_id: torch.Tensor
    sample_idx: torch.Tensor
    mode: str
    k: int

    def to_frame(self) -> pd.DataFrame:
        """One row per valid position: row, prompt_id, sample_idx, pos, token_id, rel_pos (pos / response
        length), signal_mode, then every signal. `df.attrs["mode"]` and `["k"]` name the mode too."""
        b, t = self.valid.nonzero(as_tuple=True)
        lengths = self.valid.sum(dim=1)
        frame = pd.DataFrame(
            {
                "row": self.rows[b].numpy(),
                "prompt_id": self.prompt_id[b].numpy(),
                "sample_idx": self.sample_idx[b].numpy(),
                "pos": t.numpy(),
                "token_id": self.token_ids[b, t].numpy(),
                "rel_pos": (t.float() / lengths[b].float()).numpy(),
                "signal_mode": self.mode,
            }
        )
        for name, values in self.signals.items():
            frame[name] = values[b, t].numpy()
        frame.attrs.update(mode=self.mode, k=self.k)
        return frame


def valid_mask(responses: Sequence[np.ndarray], stop_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, T] response ids padded with -1, [B, T] valid mask: positions up to the first stop token)."""
    width = max(len(r) for r in responses)
    ids = torch.full((len(responses), width), -1, dtype=torch.long)
    for i, r in enumerate(responses):
        ids[i, : len(r)] = torch.as_tensor(np.asarray(r, dtype=np.int64))
    present = ids >= 0
    is_stop = torch.isin(ids, torch.tensor(list(stop_ids), dtype=torch.long)) & present
    after_stop = (is_stop.long().cumsum(dim=1) - is_stop.long()) > 0  # strictly after the first stop
    return ids, present & ~after_stop


def _check_store(rollouts: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in rollouts.columns]
    if missing:
        raise ValueError(f"rollouts: missing column(s) {missing}")
    if len(rollouts) == 0:
        raise ValueError("rollouts: no rows to score")


def _scatter(
    flat: dict[str, torch.Tensor], b_idx: torch.Tensor, t_idx: torch.Tensor, shape: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """[N] signals at positions (b_idx, t_idx) -> [B, T] tensors, 0 elsewhere."""
    out = {}
    for name, values in flat.items():
        grid = torch.zeros(shape, dtype=torch.float32)
        grid[b_idx, t_idx] = values.float()
        out[name] = grid
    return out


def _batch_meta(rollouts: pd.DataFrame) -> dict[str, torch.Tensor]:
    return {
        "rows": torch.arange(len(rollouts)),
        "prompt_id": torch.tensor(rollouts["prompt_id"].to_numpy(dtype=np.int64)),
        "sample_idx": torch.tensor(rollouts["sample_idx"].to_numpy(dtype=np.int64)),
    }


# --------------------------------------------------------------------------------------------
# hf mode: exact signals from full logits
# --------------------------------------------------------------------------------------------


def _tempered_sampled(logits_s: torch.Tensor, logits_t: torch.Tensor, targets: torch.Tensor,
                      temperature: float) -> dict[str, torch.Tensor]:
    """TEMPERED_KEYS at c positions: log_softmax(logits / T) of each model at the sampled token, [c] float32."""
    index = targets.long().to(logits_s.device)[:, None]
    return {key: torch.log_softmax(logits.float() / temperature, dim=-1).gather(1, index)[:, 0]
            for key, logits in zip(TEMPERED_KEYS, (logits_s, logits_t))}


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
    _check_store(rollouts, ("prompt_id", "sample_idx", "prompt_ids", "response_ids"))
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
                signals.update(_tempered_sampled(logits_s, logits_t, chunk.targets, temperature))
            for name, values in signals.items():
                parts.setdefault(name, []).append(values)
            b_parts.append(chunk.rows)
            t_parts.append(chunk.pos)
    finally:
        student.train(was_training[0])
        teacher.train(was_training[1])
    flat = {name: torch.cat(values) for name, values in parts.items()}
    grids = _scatter(flat, torch.cat(b_parts), torch.cat(t_parts), tuple(valid.shape))
    return ScoredBatch(grids, valid, token_ids, mode="exact", k=k, **_batch_meta(rollouts))


# --------------------------------------------------------------------------------------------
# vllm mode: teacher top-K from prompt_logprobs, student top-K from the store
# --------------------------------------------------------------------------------------------


def teacher_prompt_topk(
    teacher_path: str,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    k: int,
    *,
    max_model_len: int | None = None,
    progress: bool = True,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Teacher log-probs at response positions via vLLM `prompt_logprobs=k` on prompt + response.

    Returns per row: log-prob of the response token float32 [R], top-K ids int32 [R, K] and top-K
    log-probs float32 [R, K] (descending), all at temperature 1 (raw log-probs).
    """
    from transformers import AutoConfig
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    max_len = max_model_len or max_positions(AutoConfig.from_pretrained(teacher_path))
    longest = max(len(p) + len(r) for p, r in zip(prompts, responses))
    if max_len is not None and longest + 1 > max_len:
        raise ValueError(f"teacher {teacher_path}: a prompt + response of {longest} tokens (+1 generated) "
                         f"exceeds max_model_len={max_len}")
    llm = vllm_engine(teacher_path, max_model_len=max_len, logprobs_mode="raw_logprobs", max_logprobs=k)
    params = SamplingParams(temperature=1.0, max_tokens=1, prompt_logprobs=k, detokenize=False)
    sequences = [TokensPrompt(prompt_token_ids=[int(t) for t in p] + [int(t) for t in r])
                 for p, r in zip(prompts, responses)]
    outputs = llm.generate(sequences, params, use_tqdm=progress)
    sampled, top_ids, top_lps = [], [], []
    for prompt, response, output in zip(prompts, responses, outputs):
        # prompt_logprobs[i] is the distribution predicting token i (entry 0 is None)
        entries = [logprob_entry(output.prompt_logprobs[len(prompt) + t], int(y), k) for t, y in enumerate(response)]
        sampled.append(np.array([e[0] for e in entries], np.float32))
        top_ids.append(np.array([e[1] for e in entries], np.int32).reshape(-1, k))
        top_lps.append(np.array([e[2] for e in entries], np.float32).reshape(-1, k))
    return sampled, top_ids, top_lps


def score_rollouts_vllm(
    rollouts: pd.DataFrame,
    teacher_path: str,
    *,
    k: int | None = None,
    stop_ids: Sequence[int] | None = None,
    max_model_len: int | None = None,
    progress: bool = True,
) -> ScoredBatch:
    """Top-K-mode signals: teacher top-K from vLLM prompt_logprobs, student top-K from the store.

    Args:
        rollouts: a store with `topk_ids`/`topk_logprobs` (rollouts sampled with logprobs_k >= k) at
            temperature 1 (the stored student log-probs must be the raw distribution's).
        teacher_path: the teacher's model directory (loaded into the process's vLLM engine).
        k: top-K size (default: the store's K; a smaller k keeps the student's first k).
        stop_ids: tokens that end a response (default: the teacher tokenizer's EOS).
    Returns:
        ScoredBatch (mode "topk") with the `token_signals_topk` keys plus sampled-token ones.
    """
    _check_store(rollouts, ("prompt_id", "sample_idx", "prompt_ids", "response_ids", "response_logprobs",
                            "topk_ids", "topk_logprobs"))
    temperatures = {1.0}
    if "temperature" in rollouts:
        temperatures = set(np.asarray(rollouts["temperature"], dtype=float).tolist())
    if temperatures != {1.0}:
        raise ValueError("rollouts: top-K scoring needs temperature-1 rollouts (stored student log-probs are "
                         f"tempered), got {sorted(temperatures)}")
    stored_k = int(np.asarray(rollouts["topk_ids"].iloc[0]).shape[1])
    k = stored_k if k is None else k
    if not 1 <= k <= stored_k:
        raise ValueError(f"k={k}: the store holds the student's top-{stored_k}; need 1 <= k <= {stored_k}")
    if stop_ids is None:
        from transformers import AutoTokenizer

        eos = AutoTokenizer.from_pretrained(teacher_path).eos_token_id
        stop_ids = [eos] if eos is not None else []
    responses = list(rollouts["response_ids"])
    token_ids, valid = valid_mask(responses, stop_ids)
    lengths = valid.sum(dim=1).tolist()
    kept = [np.asarray(r)[:n] for r, n in zip(responses, lengths)]
    t_sampled, t_ids, t_lps = teacher_prompt_topk(teacher_path, list(rollouts["prompt_ids"]), kept, k,
                                                  max_model_len=max_model_len, progress=progress)
    s_ids = np.concatenate([np.asarray(x)[:n, :k] for x, n in zip(rollouts["topk_ids"], lengths)])  # [N, k]
    s_lps = np.concatenate([np.asarray(x)[:n, :k] for x, n in zip(rollouts["topk_logprobs"], lengths)])
    s_sampled = np.concatenate([np.asarray(x)[:n] for x, n in zip(rollouts["response_logprobs"], lengths)])
    signals = token_signals_topk(
        torch.as_tensor(s_ids, dtype=torch.long),
        torch.as_tensor(s_lps, dtype=torch.float32),
        torch.as_tensor(np.concatenate(t_ids), dtype=torch.long),
        torch.as_tensor(np.concatenate(t_lps), dtype=torch.float32),
        sampled_ids=torch.as_tensor(np.concatenate(kept), dtype=torch.long),
        sampled_student_logprob=torch.as_tensor(s_sampled, dtype=torch.float32),
        sampled_teacher_logprob=torch.as_tensor(np.concatenate(t_sampled), dtype=torch.float32),
    )
    b_idx, t_idx = valid.nonzero(as_tuple=True)  # row-major: the same order as the concatenations
    grids = _scatter(dict(signals), b_idx, t_idx, tuple(valid.shape))
    return ScoredBatch(grids, valid, token_ids, mode="topk", k=k, **_batch_meta(rollouts))
