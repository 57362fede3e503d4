"""Answer accuracy on held-out verifiable problems (greedy or sampled), reused by training and `taopd evaluate`.

The check is named (`diagnostics.answers`): `exact` for the testbed, `math` (math-verify) for math answers.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from diagnostics.answers import correct_flags
from diagnostics.task import Problem


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
        )
        for row in out[:, ids.shape[1] :].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def answer_correctness(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[Problem],
    *,
    answer_check: str = "exact",
    **generation: Any,
) -> list[bool]:
    """Per problem: is the model's response correct under `answer_check` (`diagnostics.answers`:
    exact = whole-response match, math = math-verify on the final answer).

    ``generation``: the keywords of `generate_responses` (max_new_tokens, greedy, temperature, seed, batch_size).
    """
    if not problems:
        raise ValueError("problems: empty list, nothing to evaluate")
    was_training = model.training
    model.eval()
    responses = generate_responses(model, tokenizer, [p.prompt for p in problems], **generation)
    model.train(was_training)
    return correct_flags(responses, [p.answer for p in problems], answer_check)


def answer_accuracy(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, problems: list[Problem], *,
    answer_check: str = "exact", **generation: Any,
) -> float:
    """Fraction of problems answered correctly under `answer_check` (see `answer_correctness`)."""
    flags = answer_correctness(model, tokenizer, problems, answer_check=answer_check, **generation)
    return sum(flags) / len(flags)


def exact_match_accuracy(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, problems: list[Problem], **generation: Any
) -> float:
    """Fraction of problems whose response equals the answer exactly (whitespace-normalised)."""
    return answer_accuracy(model, tokenizer, problems, answer_check="exact", **generation)
