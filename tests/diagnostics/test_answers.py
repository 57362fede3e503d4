"""Answer checking: math-verify equivalences on the fixture problems, exact match unchanged, errors named."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from diagnostics.data.problems import ANSWER_CHECKS, check_answer, correct_flags, math_equal, parse_gold

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "data" / "math_answers.jsonl"


def fixture_rows() -> list[dict]:
    return [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("row", fixture_rows(), ids=lambda r: r["response"][:30])
def test_math_check_on_fixture(row):
    """Each fixture response is judged as labelled (boxed, `Answer:` lines, final-answer phrases, LaTeX forms)."""
    assert check_answer(row["response"], row["answer"], "math") is row["correct"]


@pytest.mark.parametrize("form", ["1/2", "0.5", "\\frac{1}{2}", "\\dfrac12", "\\frac12"])
@pytest.mark.parametrize("gold", ["1/2", "0.5", "\\frac{1}{2}"])
def test_one_half_forms_are_one_answer(gold, form):
    assert math_equal(f"The answer is $\\boxed{{{form}}}$", gold)


def test_math_rejects_wrong_and_missing_answers():
    assert not math_equal("\\boxed{0.51}", "1/2")
    assert not math_equal("no number here", "1/2")


def test_exact_check_is_whitespace_normalised_whole_response():
    assert check_answer(" ab  cd\n", "ab cd", "exact")
    assert not check_answer("ab cd ef", "ab cd", "exact")
    assert not check_answer("\\boxed{0.5}", "1/2", "exact")  # exact stays exact: no math equivalence


def test_unknown_check_and_unparseable_gold_are_named():
    with pytest.raises(ValueError, match="answer_check: unknown check 'fuzzy'"):
        check_answer("1", "1", "fuzzy")
    with pytest.raises(ValueError, match="does not parse as math"):
        math_equal("\\boxed{1}", "")
    assert set(ANSWER_CHECKS) == {"exact", "math"}


def test_gold_parses_bare_latex():
    assert parse_gold("x^2+1") and parse_gold("\\sqrt{2}/2") and parse_gold("34")


def test_math_check_off_the_main_thread():
    """lm-eval and thread pools call the check off the main thread, where signal-based timeouts cannot run."""
    out = []
    worker = threading.Thread(target=lambda: out.append(math_equal("\\boxed{0.5}", "1/2")))
    worker.start()
    worker.join()
    assert out == [True]


def test_correct_flags_aligns_and_checks_lengths():
    assert correct_flags(["\\boxed{7}", "\\boxed{8}"], ["7", "7"], "math") == [True, False]
    with pytest.raises(ValueError, match="2 responses for 1 answers"):
        correct_flags(["a", "b"], ["a"])
    with pytest.raises(ValueError, match=r"answers\[1\]: answer_check=math: the gold answer '' does not parse"):
        correct_flags(["\\boxed{7}", "\\boxed{8}"], ["7", ""], "math")


def test_answer_correctness_applies_the_named_check(monkeypatch):
    """The evaluation entry point (used by the trainer and `taopd evaluate`) scores with the named check."""
    import torch

    from diagnostics import accuracy as evaluation
    from diagnostics.data.problems import Problem

    monkeypatch.setattr(evaluation, "generate_responses", lambda model, tok, prompts, **kw: ["so \\boxed{0.5}"] * 2)
    problems = [Problem(0, "half?", "\\frac{1}{2}"), Problem(1, "third?", "1/3")]
    model = torch.nn.Linear(1, 1)
    assert evaluation.answer_correctness(model, None, problems, answer_check="math") == [True, False]
    assert evaluation.answer_accuracy(model, None, problems, answer_check="exact") == 0.0
    assert model.training  # the model's mode is restored
