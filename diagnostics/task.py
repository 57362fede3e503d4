"""The testbed's synthetic verifiable task: sort a list of single-token numbers.

A problem is `sort a b c ... :` and its answer is the same numbers in ascending order followed by
the end-of-text token. Every number is one token of a word-level vocabulary, so a response has
`n_numbers + 1` tokens. Positions differ in difficulty: the first and last answers (min, max) are
easy, the middle ones need the whole list, and a wrong earlier choice makes later ones ambiguous.

`Problem` is also the shape of any verifiable prompt set (real models read a JSONL of
`{"prompt": ..., "answer": ...}`), so evaluation code never depends on this particular task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
TASK_TOKENS = ("sort", ":")


@dataclass(frozen=True)
class Problem:
    """One verifiable prompt: `answer` is the exact expected response text (no special tokens)."""

    prompt_id: int
    prompt: str
    answer: str


def sort_problems(n: int, *, seed: int, n_numbers: int, max_value: int) -> list[Problem]:
    """`n` sorting problems with distinct numbers drawn from [0, max_value), seeded."""
    rng = np.random.default_rng(seed)
    problems = []
    for i in range(n):
        numbers = rng.choice(max_value, size=n_numbers, replace=False)
        prompt = "sort " + " ".join(str(x) for x in numbers) + " :"
        answer = " ".join(str(x) for x in sorted(numbers.tolist()))
        problems.append(Problem(prompt_id=i, prompt=prompt, answer=answer))
    return problems


def load_problems(path: str | Path) -> list[Problem]:
    """Read a JSONL prompt set: one `{"prompt": str, "answer": str}` object per line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    problems = []
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{line_no}: invalid JSON: {exc}") from None
        if not isinstance(row, dict) or "prompt" not in row:
            raise ValueError(f"{path}:{line_no}: expected an object with a 'prompt' key")
        problems.append(Problem(len(problems), row["prompt"], str(row.get("answer", ""))))
    if not problems:
        raise ValueError(f"prompt file {path} holds no prompts")
    return problems


def normalize_answer(text: str) -> str:
    """Whitespace-normalised text, the unit of exact match."""
    return " ".join(text.split())


def is_exact_match(response: str, answer: str) -> bool:
    return normalize_answer(response) == normalize_answer(answer)
