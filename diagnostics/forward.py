"""Teacher-forced forwards: a model's logits at the response positions of prompt + response sequences.

Position convention (everywhere in the toolkit): position `pos` of a row is the next-token
distribution at sequence index len(prompt) - 1 + pos, which predicts response[pos] from
prompt + response[:pos].

Every route here runs the decoder once over whole sequences (hidden states [b, L, H]) and the LM head
only on the selected positions, so no [b, L, V] tensor exists. That is only right when a model's
logits ARE lm_head(last hidden state) (no soft-capping, no logit scaling): `check_head_path` holds a
model to it, with one tolerance, `HEAD_PATH_TOL`.

* `iter_response_logits`: memory-bounded streaming over unpadded prompt/response lists (rows batched by
  token count, LM head over chunks of positions), for one or several models at once; used by teacher
  scoring (`diagnostics.scoring`) and the HF rollouts' log-prob recompute (`sampled_token_logprobs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

# |logits - lm_head(decoder hidden)| allowed by `check_head_path` (float32 or bfloat16 logits of the same
# matmul; an architecture that soft-caps or scales its logits is off by far more).
HEAD_PATH_TOL = 1e-3


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
        split = model.get_output_embeddings()(model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state).float()
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
    for batch in tqdm(token_batches(lengths, max_tokens_per_batch), desc="teacher forcing", disable=not progress, leave=False):
        seqs = [list(prompts[i]) + list(responses[i]) for i in batch]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s)] = 1
        # gather index: (batch row j, sequence index) of each response position
        b_idx = torch.cat([torch.full((len(responses[i]),), j) for j, i in enumerate(batch)])
        pos = torch.cat([torch.arange(len(responses[i])) for i in batch])
        t_idx = torch.cat([len(prompts[i]) - 1 + torch.arange(len(responses[i])) for i in batch])
        rows = torch.tensor(batch)[b_idx]
        targets = ids[b_idx, t_idx + 1]
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
    chunks = iter_response_logits([model], prompts, responses, max_tokens_per_batch=max_tokens_per_batch, progress=progress)
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
