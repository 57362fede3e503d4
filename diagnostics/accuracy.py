"""Answer accuracy on held-out verifiable problems (greedy or sampled), reused by training and `taopd evaluate`.

The check is named (`diagnostics.data.problems`): `exact` for the testbed, `math` (math-verify) for math answers.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from diagnostics.data.problems import Problem, correct_flags
from diagnostics.generation.hf import generate_responses


def answer_correctness(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[Problem],
    *,
    answer_check: str = "exact",
    **generation: Any,
) -> list[bool]:
    """Per problem: is the model's response correct under `answer_check` (`diagnostics.data.problems`:
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
