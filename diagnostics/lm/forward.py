"""Teacher-forced forwards: a model's logits at the response positions of prompt + response sequences.

Position convention (everywhere in the toolkit): position `pos` of a row is the next-token
distribution at sequence index len(prompt) - 1 + pos, which predicts response[pos] from
prompt + response[:pos].

Every route here runs the decoder once over whole sequences (hidden states [b, L, H]) and the LM head
only on the selected positions, so no [b, L, V] tensor exists. That is only right when a model's
logits ARE lm_head(last hidden state) (no soft-capping, no logit scaling): `check_head_path` holds a
model to it, with one tolerance, `HEAD_PATH_TOL`.

* `ResponseBatch`: the one padded batch of prompt + response sequences (ids, attention mask, the
  sequence index that predicts each response token, targets, valid positions); the engine's bank and
  the trainer's rollouts are both one.
* `PositionLM`: an `nn.Module` wrapping a causal LM whose forward returns the logits at given
  (row, sequence index) pairs only; the trainer's kept-position forward (DDP/FSDP can wrap it) and
  the engine's functional per-sequence forward (`torch.func.functional_call` on it).
* `full_logprobs`: [B, T, V] log-probs at every response position of a `ResponseBatch` (engine,
  diagnose recipe, training evaluation), called on chunks of sequences sized by memory
  (`sequence_chunks`, `map_sequence_chunks`: `DENSE_CHUNK_BYTES` per [b, T, V] tensor, 2 sequences at
  Qwen's 151,936 rows and T = 74), never on a whole bank.
* `iter_response_logits`: memory-bounded streaming over unpadded prompt/response lists (rows batched by
  token count, LM head over chunks of positions), for one or several models at once; used by teacher
  scoring (`diagnostics.generation.scoring`) and the HF rollouts' log-prob recompute (`sampled_token_logprobs`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

# |logits - lm_head(decoder hidden)| allowed by `check_head_path` (float32 or bfloat16 logits of the same
# matmul; an architecture that soft-caps or scales its logits is off by far more).
HEAD_PATH_TOL = 1e-3


@dataclass
class ResponseBatch:
    """B prompt + response sequences, right-padded.

    ids:            [B, L] long, prompt + response, right-padded with the pad id.
    attention_mask: [B, L] long, 1 on real tokens. (The engine's forwards pass no mask: with right
                    padding and causal attention, padding never reaches a real position.)
    pred_idx:       [B, T] long, index in the sequence of the hidden state that predicts response
                    token t (= len(prompt) - 1 + t); 0 beyond the response.
    targets:        [B, T] long, response token ids (0 beyond the response).
    valid:          [B, T] bool, the positions to score: every response position by default, or the
                    caller's mask (e.g. up to and including the first stop token).
    """

    ids: Tensor
    attention_mask: Tensor
    pred_idx: Tensor
    targets: Tensor
    valid: Tensor

    def __len__(self) -> int:
        return self.ids.shape[0]

    def select(self, rows: slice | Tensor) -> ResponseBatch:
        """The sub-batch of the given rows (same widths L and T)."""
        fields = (self.ids, self.attention_mask, self.pred_idx, self.targets, self.valid)
        return ResponseBatch(*(x[rows] for x in fields))

    def to(self, device: torch.device) -> ResponseBatch:
        fields = (self.ids, self.attention_mask, self.pred_idx, self.targets, self.valid)
        return ResponseBatch(*(x.to(device) for x in fields))

    @classmethod
    def from_ids(
        cls,
        prompts: Sequence[Sequence[int]],
        responses: Sequence[Sequence[int]],
        pad_id: int,
        valid: Tensor | None = None,
    ) -> ResponseBatch:
        """Pad prompt/response id lists. `valid` [B, T] (T >= the longest response) marks the scored
        positions; None: every response position, T = the longest response."""
        if len(prompts) != len(responses) or (valid is not None and len(prompts) != valid.shape[0]):
            rows = "" if valid is None else f" and {valid.shape[0]} valid rows"
            raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses{rows} differ")
        lengths = torch.tensor([len(r) for r in responses])
        n, horizon = (len(prompts), int(lengths.max())) if valid is None else tuple(valid.shape)
        width = max(len(p) + len(r) for p, r in zip(prompts, responses))
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        pred_idx = torch.zeros((n, horizon), dtype=torch.long)
        targets = torch.zeros((n, horizon), dtype=torch.long)
        for row, (prompt, response) in enumerate(zip(prompts, responses)):
            if len(prompt) == 0:
                raise ValueError(f"prompts[{row}] is empty: the first response token needs a context")
            seq = [int(x) for x in prompt] + [int(x) for x in response]
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            t = len(response)
            pred_idx[row, :t] = torch.arange(len(prompt) - 1, len(prompt) - 1 + t)
            targets[row, :t] = torch.tensor(seq[len(prompt) :])
        in_response = torch.arange(horizon) < lengths[:, None]  # [B, T]
        if valid is None:
            valid = in_response
        elif (valid & ~in_response).any():
            raise ValueError("valid marks a position beyond the end of its response")
        return cls(ids, mask, pred_idx, targets, valid.clone())


def kept_index(batch: ResponseBatch, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(rows [n], response positions [n], sequence indices [n]) of the positions `keep` [B, T] marks, row-major."""
    rows, pos = keep.nonzero(as_tuple=True)
    return rows, pos, batch.pred_idx[rows, pos]


class PositionLM(nn.Module):
    """A causal LM whose forward returns logits only at given positions.

    forward(ids [b, L], attention_mask [b, L] or None, rows [n], cols [n]) -> [n, V] logits (model
    dtype), V = `vocab_size` (LM-head padding rows dropped): decoder hidden states [b, L, H], the n
    rows (rows[i], cols[i]) gathered BEFORE the LM head, then lm_head on [n, H]. So the logits, their
    log-softmax and a loss scale with n, not with b x L (the trainer at 5% retention pays ~5%).
    """

    def __init__(self, model: nn.Module, vocab_size: int):
        super().__init__()
        self.model = model
        self.vocab_size = vocab_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None, rows: Tensor, cols: Tensor) -> Tensor:
        decoder = self.model.get_decoder()
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        picked = hidden[rows, cols]  # [n, H]: the selected positions only
        return self.model.get_output_embeddings()(picked)[:, : self.vocab_size]


# Bytes one dense [b, T, V] float32 tensor may take where a bank is processed a chunk of sequences at a time
# (the group variant, a diagnose shard's signals and gains, training's evaluation): each step holds a few
# such tensors (teacher and student log-probs, a loss's temporaries and their gradients), so the peak stays
# within ~10 x this at any vocabulary. At V = 151,936 and T = 74 a chunk is 2 sequences.
DENSE_CHUNK_BYTES = 128 * 2**20


def sequence_chunks(n_rows: int, horizon: int, vocab_size: int, *, budget_bytes: float = DENSE_CHUNK_BYTES,
                    max_rows: int | None = None) -> list[slice]:
    """Row slices covering 0..n_rows whose [b, horizon, vocab_size] float32 tensors fit `budget_bytes` (at least
    one row each), and at most `max_rows` rows."""
    rows = max(1, int(budget_bytes // max(1, horizon * vocab_size * 4)))
    if max_rows is not None:
        rows = max(1, min(rows, max_rows))
    return [slice(start, min(start + rows, n_rows)) for start in range(0, n_rows, rows)]


def map_sequence_chunks(fn, batch: ResponseBatch, vocab_size: int, *, budget_bytes: float = DENSE_CHUNK_BYTES,
                        max_rows: int | None = None) -> dict[str, Tensor]:
    """`fn(sub_batch, rows)` -> {name: [b, ...]} on each chunk of `sequence_chunks`, concatenated over rows.

    The one wrapper that bounds dense [b, T, V] log-probs by memory instead of by a fixed sequence count; `fn`
    must treat sequences independently (per-sequence results do not depend on the chunking).
    """
    parts: dict[str, list[Tensor]] = {}
    chunks = sequence_chunks(len(batch), batch.valid.shape[1], vocab_size, budget_bytes=budget_bytes,
                             max_rows=max_rows)
    for rows in chunks:
        for name, value in fn(batch.select(rows), rows).items():
            parts.setdefault(name, []).append(value)
    return {name: torch.cat(values) for name, values in parts.items()}


@torch.no_grad()
def full_logprobs(model: nn.Module, batch: ResponseBatch, vocab_size: int, batch_size: int = 16) -> Tensor:
    """log p(. | context) at every response position (valid or not), float32 on the CPU. -> [B, T, V]."""
    device = next(model.parameters()).device
    lm = PositionLM(model, vocab_size)
    out = []
    for start in range(0, len(batch), batch_size):
        chunk = batch.select(slice(start, start + batch_size)).to(device)
        b, horizon = chunk.pred_idx.shape
        rows = torch.arange(b, device=device).repeat_interleave(horizon)  # [b*T], row-major like pred_idx
        logits = lm(chunk.ids, None, rows, chunk.pred_idx.reshape(-1))  # [b*T, V]
        out.append(torch.log_softmax(logits.float(), dim=-1).reshape(b, horizon, -1).cpu())
    return torch.cat(out)


@dataclass
class ResponseChunk:
    """Logits at a chunk of response positions: position `pos` of row `row` predicts `targets`.

    rows, pos, targets: [n] long. logits: one [n, V] float32 tensor per model (V = all LM-head
    rows, or `vocab_size` when given), on each model's device.
    """

    rows: torch.Tensor
    pos: torch.Tensor
    targets: torch.Tensor
    logits: list[torch.Tensor]


def token_batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Row indices grouped so that rows x longest row <= max_tokens (a longer row goes alone).

    Rows are taken longest first, so each batch pads little.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def check_head_path(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """Raise NotImplementedError unless lm_head(decoder hidden states) equals the model's own logits.

    ids: [b, L] long on the model's device (a short sequence is enough).
    """
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits.float()
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        split = model.get_output_embeddings()(hidden).float()
    if not torch.allclose(full, split, atol=HEAD_PATH_TOL, rtol=HEAD_PATH_TOL):
        raise NotImplementedError(
            f"{type(model).__name__}: logits are not lm_head(decoder hidden states); "
            "the position-selected forward does not support this architecture"
        )


@torch.no_grad()
def iter_response_logits(
    models: Sequence[torch.nn.Module],
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    vocab_size: int | None = None,
    max_tokens_per_batch: int = 16384,
    position_chunk: int = 256,
    progress: bool = False,
) -> Iterator[ResponseChunk]:
    """Teacher-forced logits of every model at every response position, memory-bounded.

    Row i is prompts[i] + responses[i]; its position `pos` is the distribution at index
    len(prompt) - 1 + pos, which predicts responses[i][pos] from prompt + response[:pos]. Rows are
    right-padded into batches of at most `max_tokens_per_batch` tokens; each model runs its decoder
    once per batch (hidden states [b, L, H]) and its LM head over chunks of `position_chunk` response
    positions, so no [b, L, V] tensor ever exists. Logits are sliced to `vocab_size` if given.
    """
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    checked = False
    batches = token_batches(lengths, max_tokens_per_batch)
    for batch in tqdm(batches, desc="teacher forcing", disable=not progress, leave=False):
        padded = ResponseBatch.from_ids([prompts[i] for i in batch], [responses[i] for i in batch], 0)
        ids, mask = padded.ids, padded.attention_mask
        # gather index, row-major: (batch row b_idx, sequence index t_idx) of each response position pos
        b_idx, pos = padded.valid.nonzero(as_tuple=True)
        t_idx = padded.pred_idx[b_idx, pos]
        rows = torch.tensor(batch)[b_idx]
        targets = padded.targets[b_idx, pos]
        hidden = []
        for model in models:
            device = next(model.parameters()).device
            if not checked:
                check_head_path(model, ids[:1, : lengths[batch[0]]].to(device))
            states = model.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            hidden.append(states[b_idx.to(device), t_idx.to(device)])  # [n, H]: response positions only
        checked = True
        for start in range(0, len(pos), position_chunk):
            sel = slice(start, start + position_chunk)
            logits = [m.get_output_embeddings()(h[sel]).float()[:, :vocab_size] for m, h in zip(models, hidden)]
            yield ResponseChunk(rows[sel], pos[sel], targets[sel], logits)


def sampled_token_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    temperature: float = 1.0,
    k: int = 0,
    max_tokens_per_batch: int = 16384,
    progress: bool = False,
) -> tuple[list[np.ndarray], list[np.ndarray] | None, list[np.ndarray] | None]:
    """Teacher-forced log_softmax(logits / temperature) of each response token, and its top-K.

    Over all LM-head rows. Returns per row: the response tokens' log-probs float32 [R], and (if k > 0)
    top-K ids int32 [R, K] and log-probs float32 [R, K] in descending order (else None, None).
    """
    parts: dict[str, list[torch.Tensor]] = {"rows": [], "pos": [], "lp": [], "ids": [], "top": []}
    chunks = iter_response_logits([model], prompts, responses, max_tokens_per_batch=max_tokens_per_batch,
                                  progress=progress)
    for chunk in chunks:
        logp = torch.log_softmax(chunk.logits[0] / temperature, dim=-1)  # [n, V], on the model's device
        parts["rows"].append(chunk.rows)
        parts["pos"].append(chunk.pos)
        parts["lp"].append(logp.gather(1, chunk.targets[:, None].to(logp.device))[:, 0].cpu())
        if k:
            top = logp.topk(k, dim=-1)
            parts["ids"].append(top.indices.cpu())
            parts["top"].append(top.values.cpu())
    # chunks arrive batch by batch in length order: put positions back in (row, pos) order
    rows, pos = torch.cat(parts["rows"]).numpy(), torch.cat(parts["pos"]).numpy()
    order = np.lexsort((pos, rows))
    splits = np.cumsum([len(r) for r in responses])[:-1]

    def per_row(key: str, dtype: type) -> list[np.ndarray]:
        return np.split(torch.cat(parts[key]).numpy()[order].astype(dtype), splits)

    if not k:
        return per_row("lp", np.float32), None, None
    return per_row("lp", np.float32), per_row("ids", np.int32), per_row("top", np.float32)
