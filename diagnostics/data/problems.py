"""Problems and their answer checks: `Problem` (a prompt with its gold answer) and checks by name.

* `exact`: the response equals the answer after whitespace normalisation (`is_exact_match`);
  right for the testbed, whose answer is the whole response.
* `math`: the response's final answer is mathematically equal to the gold answer, by math-verify
  (https://github.com/huggingface/Math-Verify): the prediction is extracted from the response
  (`\\boxed{...}` first, then a final-answer phrase such as `Answer: 34` or `the final answer is 7`, then
  the last expression), the gold is parsed as if boxed, and the two are compared symbolically and
  numerically (1/2, 0.5 and \\frac{1}{2} are one answer). A response with no extractable answer is wrong.

`check_answer(response, answer, mode)` is the one entry point; `ANSWER_CHECKS` lists the names a config's
`answer_check` key may take.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One verifiable prompt: `answer` is the exact expected response text (no special tokens)."""

    prompt_id: int
    prompt: str
    answer: str


def normalize_answer(text: str) -> str:
    """Whitespace-normalised text, the unit of exact match."""
    return " ".join(text.split())


def is_exact_match(response: str, answer: str) -> bool:
    """The response equals the answer up to whitespace."""
    return normalize_answer(response) == normalize_answer(answer)


MATH_TIMEOUT_S = 5  # math-verify's own per-call limit (signal.alarm: main thread only)


def _timeout() -> int | None:
    """math-verify times out with signal.alarm, which works only on the main thread; elsewhere (lm-eval
    workers, a thread pool) it must be off or parse raises."""
    return MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def parse_gold(answer: str) -> list:
    """The gold answer as math-verify objects: parsed as `\\boxed{answer}` (so bare LaTeX such as
    `x^2+1` or `\\sqrt{2}/2` is read as math), falling back to the raw text (an answer already boxed or
    in `$...$`). Empty when nothing parses."""
    from math_verify import parse

    text = str(answer).strip()
    if not text:
        return []
    parsed = parse("\\boxed{" + text + "}", parsing_timeout=_timeout())
    return parsed or parse(text, parsing_timeout=_timeout())


def math_equal(response: str, answer: str) -> bool:
    """True when the final answer extracted from `response` equals `answer` by math-verify."""
    from math_verify import parse, verify

    gold = parse_gold(answer)
    if not gold:
        raise ValueError(f"answer_check=math: the gold answer {answer!r} does not parse as math")
    predicted = parse(response, parsing_timeout=_timeout())
    if not predicted:
        return False
    return bool(verify(gold, predicted, timeout_seconds=_timeout()))


ANSWER_CHECKS: dict[str, Callable[[str, str], bool]] = {
    "exact": is_exact_match,
    "math": math_equal,
}


def check_answer(response: str, answer: str, mode: str = "exact") -> bool:
    """Is `response` a correct answer to a problem whose gold answer is `answer`, under check `mode`."""
    try:
        checker = ANSWER_CHECKS[mode]
    except KeyError:
        raise ValueError(f"answer_check: unknown check {mode!r}; one of {', '.join(ANSWER_CHECKS)}") from None
    return checker(response, answer)


def correct_flags(responses: Sequence[str], answers: Sequence[str], mode: str = "exact") -> list[bool]:
    """`check_answer` over aligned responses and gold answers."""
    if len(responses) != len(answers):
        raise ValueError(f"{len(responses)} responses for {len(answers)} answers")
    flags = []
    for i, (response, answer) in enumerate(zip(responses, answers)):
        try:
            flags.append(check_answer(response, answer, mode))
        except ValueError as exc:
            raise ValueError(f"answers[{i}]: {exc}") from None
    return flags
