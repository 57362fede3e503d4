"""The testbed's synthetic verifiable tasks over single-token words: sorting, and its written trace.

A problem is `sort kd ab xq ... :`. Task `sort`: the answer is the words in alphabetical order, then
the end-of-text token (`n_items + 1` tokens). Task `trace`: the answer is the selection-sort trace
(`selection_trace`): each step writes the smallest remaining word, ` |`, the words still left, ` ;`
(51 tokens for 8 words). Every word is one token (the testbed tokenizer is a Qwen2-style byte-level
BPE whose merges build each two-letter word, with its leading space, into one token; Qwen's
pre-tokenizer splits digits one by one, so numbers could not be single tokens). Positions differ in
difficulty: copying the previous list is predictable, each step's minimum and the skipped word are
decisions, and a wrong earlier choice makes later ones ambiguous.

A task's problems are `diagnostics.data.problems.Problem`s, the shape of any verifiable prompt set (real
models read theirs through `diagnostics.data.prompt_sets`), so evaluation code never depends on this task.
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from diagnostics.data.problems import Problem

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
# every third two-letter combination, in alphabetical order: aa, ad, ag, ... (226 available)
ALL_WORDS = ["".join(pair) for pair in itertools.product(string.ascii_lowercase, repeat=2)][::3]


def task_words(n_words: int, pool: Sequence[str] = ALL_WORDS) -> list[str]:
    """The task's vocabulary: the first `n_words` words of `pool` (sorted, alphabetical; default `ALL_WORDS`;
    the Qwen2-vocabulary testbed passes the words that are one Qwen2 token)."""
    if not 2 <= n_words <= len(pool):
        raise ValueError(f"n_words: must be in [2, {len(pool)}], got {n_words}")
    if list(pool) != sorted(pool):
        raise ValueError("pool: the task's words must be in alphabetical order (answers sort by position)")
    return list(pool[:n_words])


def sort_problems(n: int, *, seed: int, n_items: int, n_words: int, pool: Sequence[str] = ALL_WORDS
                  ) -> list[Problem]:
    """`n` problems: sort `n_items` distinct words drawn from the first `n_words` words of `pool`. Seeded."""
    words = task_words(n_words, pool)
    rng = np.random.default_rng(seed)
    problems = []
    for i in range(n):
        picked = rng.choice(n_words, size=n_items, replace=False)
        prompt = "sort " + " ".join(words[j] for j in picked) + " :"
        answer = " ".join(words[j] for j in sorted(picked.tolist()))
        problems.append(Problem(prompt_id=i, prompt=prompt, answer=answer))
    return problems


# Separators of the selection-sort trace: ` |` after the step's minimum, ` ;` between steps.
TRACE_SYMBOLS = ("|", ";")


def selection_trace(words: list[str]) -> str:
    """The selection-sort trace of `words`: each step writes the smallest remaining word, ` |`, the
    words still left (in prompt order), and ` ;`; the last step writes the last word alone.

    `kd ab xq` -> `ab | kd xq ; kd | xq ; xq`. Most tokens copy the previous step's list (predictable
    once the step's minimum is known); the minima and the skipped word are the decisions.
    """
    remaining = list(words)
    steps = []
    while remaining:
        smallest = min(remaining)
        remaining.remove(smallest)
        steps.append(" ".join([smallest, "|", *remaining]) if remaining else smallest)
    return " ; ".join(steps)


def trace_length(n_items: int) -> int:
    """Tokens in a selection-trace response of `n_items` words, EOS included."""
    return sum(n_items - j + 3 for j in range(1, n_items)) + 2


def trace_problems(n: int, *, seed: int, n_items: int, n_words: int, pool: Sequence[str] = ALL_WORDS
                   ) -> list[Problem]:
    """`n` problems `sort w1 .. wn :` (words from the first `n_words` of `pool`) whose answer is the
    selection-sort trace. Seeded."""
    words = task_words(n_words, pool)
    rng = np.random.default_rng(seed)
    problems = []
    for i in range(n):
        picked = [words[j] for j in rng.choice(n_words, size=n_items, replace=False)]
        problems.append(Problem(prompt_id=i, prompt="sort " + " ".join(picked) + " :", answer=selection_trace(picked)))
    return problems


@dataclass(frozen=True)
class Task:
    """A testbed task: its seeded problem stream, its response length and the symbols its tokenizer needs."""

    problems: Callable[..., list[Problem]]  # (n, *, seed, n_items, n_words, pool) -> problems
    response_tokens: Callable[[int], int]  # n_items -> tokens per response, EOS included
    symbols: tuple[str, ...] = ()  # single-token ` symbol`s beyond `sort`, ` :` and the words


TASKS = {
    "sort": Task(sort_problems, lambda n_items: n_items + 1),
    "trace": Task(trace_problems, trace_length, TRACE_SYMBOLS),
}


