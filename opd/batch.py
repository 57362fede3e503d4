"""A scored rollout batch as training tensors, and the student forward that pays only for kept positions.

`TrainBatch` holds one process's rollouts: prompt + response ids, right-padded, and where each
response position's distribution lives in the sequence. `KeptPositionLM` wraps a causal LM: it runs
the decoder over the whole sequences (every token stays in the context), gathers the final hidden
states of the kept positions, and applies the LM head to those rows only. So the [n, V] logits,
their log-softmax and the loss scale with the number of kept positions n, not with B x T: at 5%
retention the LM-head and loss memory is about 5% of full-token OPD's (benchmarks/bench_train.py).
Being an `nn.Module` whose forward does all of it, it can be wrapped by DDP/FSDP as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class TrainBatch:
    """B rollouts of one process.

    ids:            [B, L] long, prompt + response, right-padded with the pad id.
    attention_mask: [B, L] long, 1 on real tokens.
    pred_idx:       [B, T] long, index in the sequence of the hidden state that predicts response
                    token t (= len(prompt) - 1 + t); 0 at invalid positions.
    targets:        [B, T] long, response token ids (0 at invalid positions).
    valid:          [B, T] bool, response positions up to and including the first stop token.
    """

    ids: Tensor
    attention_mask: Tensor
    pred_idx: Tensor
    targets: Tensor
    valid: Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    def rows(self, index: slice) -> "TrainBatch":
        return TrainBatch(self.ids[index], self.attention_mask[index], self.pred_idx[index], self.targets[index], self.valid[index])

    def to(self, device: torch.device) -> "TrainBatch":
        return TrainBatch(*(x.to(device) for x in (self.ids, self.attention_mask, self.pred_idx, self.targets, self.valid)))

    @classmethod
    def from_ids(cls, prompts: list[list[int]], responses: list[list[int]], valid: Tensor, pad_id: int) -> "TrainBatch":
        """Pad prompt/response id lists; `valid` [B, T] (T >= the longest response) marks scored positions."""
        if len(prompts) != len(responses) or len(prompts) != valid.shape[0]:
            raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses and {valid.shape[0]} valid rows differ")
        n, horizon = valid.shape
        width = max(len(p) + len(r) for p, r in zip(prompts, responses))
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        pred_idx = torch.zeros((n, horizon), dtype=torch.long)
        targets = torch.zeros((n, horizon), dtype=torch.long)
        for row, (prompt, response) in enumerate(zip(prompts, responses)):
            if not prompt:
                raise ValueError(f"prompt {row} is empty: the first response token needs a context")
            seq = list(prompt) + list(response)
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            t = len(response)
            pred_idx[row, :t] = torch.arange(len(prompt) - 1, len(prompt) - 1 + t)
            targets[row, :t] = torch.tensor(response)
        lengths = torch.tensor([len(r) for r in responses])
        if (valid & (torch.arange(horizon) >= lengths[:, None])).any():
            raise ValueError("valid marks a position beyond the end of its response")
        return cls(ids, mask, pred_idx, targets, valid.clone())


def kept_index(batch: TrainBatch, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(rows [n], response positions [n], sequence indices [n]) of the kept positions, row-major."""
    rows, pos = keep.nonzero(as_tuple=True)
    return rows, pos, batch.pred_idx[rows, pos]


class KeptPositionLM(nn.Module):
    """A causal LM whose forward returns logits only at given positions.

    forward(ids [b, L], attention_mask [b, L], rows [n], cols [n]) -> [n, V] logits (model dtype),
    V = `vocab_size` (LM-head padding rows dropped): decoder hidden states [b, L, H], the n rows
    (rows[i], cols[i]) gathered BEFORE the LM head, then lm_head on [n, H].
    """

    def __init__(self, model: nn.Module, vocab_size: int):
        super().__init__()
        self.model = model
        self.vocab_size = vocab_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        picked = hidden[rows, cols]  # [n, H]: kept positions only
        return self.model.get_output_embeddings()(picked)[:, : self.vocab_size]


def check_head_path(model: nn.Module, ids: Tensor) -> None:
    """The decoder + LM-head route must give the model's own logits (no soft-capping or scaling)."""
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits.float()
        split = model.get_output_embeddings()(model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state).float()
    if not torch.allclose(full, split, atol=1e-4, rtol=1e-4):
        raise NotImplementedError(
            f"{type(model).__name__}: logits are not lm_head(decoder hidden states); the kept-position forward does not support it"
        )
