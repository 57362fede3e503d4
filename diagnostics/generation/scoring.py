"""Teacher scoring of a rollout store, the parts both backends share: `ScoredBatch` and the store helpers.

Position convention (both modes): position `pos` of row `b` is the next-token distribution that
predicts `response_ids[pos]` from `prompt_ids + response_ids[:pos]`. Valid positions are those up to
and including the first stop token of the response; positions after it and padding are invalid.

The backends score in one of two modes:
* "exact" (`diagnostics.generation.hf.score_rollouts_hf`): teacher and student in this process,
  full-vocabulary logits sliced to the pair's shared vocabulary V (LM-head padding rows dropped),
  rows batched by token count (`max_tokens_per_batch`), the LM heads applied to chunks of `position_chunk`
  positions, so no [B, L, V] tensor exists. Signals: `token_signals` (exact D, C, entropies, KLs),
  always of the untempered distributions; with `temperature` T != 1 also TEMPERED_KEYS, the sampled
  token's log_softmax(logits / T) of both models (what the trainer's ratio and advantage read).
* "topk" (`diagnostics.generation.vllm.score_rollouts_vllm`): for teachers too big to sit beside the
  student. The teacher's top-K log-probs come from vLLM `prompt_logprobs=K`; the student's from the
  store's `topk_ids`/`topk_logprobs`. Signals: `token_signals_topk` (D with the 1e-12 floor, C as
  the lower bound, no full-vocabulary keys).

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


def check_store(rollouts: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in rollouts.columns]
    if missing:
        raise ValueError(f"rollouts: missing column(s) {missing}")
    if len(rollouts) == 0:
        raise ValueError("rollouts: no rows to score")


def scatter_rows(
    flat: dict[str, torch.Tensor], b_idx: torch.Tensor, t_idx: torch.Tensor, shape: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """[N] signals at positions (b_idx, t_idx) -> [B, T] tensors, 0 elsewhere."""
    out = {}
    for name, values in flat.items():
        grid = torch.zeros(shape, dtype=torch.float32)
        grid[b_idx, t_idx] = values.float()
        out[name] = grid
    return out


def batch_meta(rollouts: pd.DataFrame) -> dict[str, torch.Tensor]:
    return {
        "rows": torch.arange(len(rollouts)),
        "prompt_id": torch.tensor(rollouts["prompt_id"].to_numpy(dtype=np.int64)),
        "sample_idx": torch.tensor(rollouts["sample_idx"].to_numpy(dtype=np.int64)),
    }


# --------------------------------------------------------------------------------------------
# hf mode: exact signals from full logits
# --------------------------------------------------------------------------------------------


def tempered_sampled(logits_s: torch.Tensor, logits_t: torch.Tensor, targets: torch.Tensor,
                      temperature: float) -> dict[str, torch.Tensor]:
    """TEMPERED_KEYS at c positions: log_softmax(logits / T) of each model at the sampled token, [c] float32."""
    index = targets.long().to(logits_s.device)[:, None]
    return {key: torch.log_softmax(logits.float() / temperature, dim=-1).gather(1, index)[:, 0]
            for key, logits in zip(TEMPERED_KEYS, (logits_s, logits_t))}


# --------------------------------------------------------------------------------------------
# vllm mode: teacher top-K from prompt_logprobs, student top-K from the store
# --------------------------------------------------------------------------------------------


