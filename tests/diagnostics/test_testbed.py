"""The embedded testbed: build, cache, determinism, and the criteria the project relies on."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from diagnostics.core.config import load_config
from diagnostics.lm.models import check_pair
from diagnostics.testbed.build import build_testbed
from diagnostics.testbed.config import TestbedConfig
from diagnostics.testbed.rebuild import rebuild_testbed
from diagnostics.testbed.report import criteria_failures

ROOT = Path(__file__).resolve().parents[2]


def small_config(cache_dir) -> TestbedConfig:
    return load_config(TestbedConfig, ROOT / "configs/testbed_small.yaml", [f"cache_dir={cache_dir}"])


def test_small_build_is_standard_hf_checkpoints(small_testbed):
    for path in (small_testbed.student_path, small_testbed.teacher_path):
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            assert (Path(path) / name).is_file(), name
    check_pair(small_testbed.student_path, small_testbed.teacher_path)


@pytest.mark.slow
def test_cache_reuse_force_and_bit_identical_rebuild(tmp_path):
    config = small_config(tmp_path / "a")  # the builder itself: the shipped small pair is not used
    first = build_testbed(config, use_shipped=False)
    t0 = time.perf_counter()
    again = build_testbed(config, use_shipped=False)
    assert time.perf_counter() - t0 < 5 and again.root == first.root and again.report == first.report
    weights_before = load_file(Path(first.student_path) / "model.safetensors")
    rebuilt = build_testbed(config, force=True)
    other_dir = build_testbed(small_config(tmp_path / "b"), use_shipped=False)
    for candidate in (rebuilt, other_dir):
        for role in ("student", "teacher"):
            a = load_file(Path(getattr(first, f"{role}_path")) / "model.safetensors")
            b = load_file(Path(getattr(candidate, f"{role}_path")) / "model.safetensors")
            assert a.keys() == b.keys()
            assert all(a[k].equal(b[k]) for k in a), f"{role} weights differ between two builds with one seed"
    del weights_before
    assert not list(Path(tmp_path / "a").glob("*.tmp-*")), "temporary build directory left behind"


def test_cache_key_changes_with_config(tmp_path):
    a = small_config(tmp_path)
    b = load_config(TestbedConfig, ROOT / "configs/testbed_small.yaml", [f"cache_dir={tmp_path}", "seed=1"])
    c = load_config(TestbedConfig, ROOT / "configs/testbed_small.yaml", ["cache_dir=/elsewhere"])
    assert a.cache_key() != b.cache_key()
    assert a.cache_key() == c.cache_key()  # where the cache lives is not part of what is built


def assert_default_criteria(report: dict) -> None:
    """The criteria the testbed exists for (issue: a testbed where on-policy distillation teaches)."""
    assert report["vocab_size"] >= 200
    assert report["response_tokens_median"] >= 48  # so 5% keeps >= 2 tokens per response
    assert report["teacher_acc_greedy"] >= 0.95, report
    # an under-trained student with room to learn, whose own samples are sometimes right
    assert 0.10 <= report["student_acc_greedy"] <= 0.50, report
    assert report["student_acc_sampled"] >= 0.05, report
    assert report["capacity_acc_greedy"] >= 0.80, report  # the same student, trained on, learns the task
    # learnable and incompatible disagreement side by side among the high-D positions
    assert report["c_top20d_range"] >= 0.3, report
    assert report["k"] < report["vocab_size"] / 10
    assert criteria_failures(report) == []  # `taopd testbed --rebuild` holds the same criteria


def test_default_testbed_meets_the_criteria(default_testbed):
    """The pair every command uses (shipped: its report, measured when it was built)."""
    assert_default_criteria(default_testbed.report)


@pytest.mark.build
def test_default_testbed_built_from_scratch_meets_the_criteria(tmp_path):
    """`make test-build`: the default pair trained from its config (~11 minutes on one core) meets the criteria;
    its largest weight difference from the shipped pair is printed (bit identity depends on the CPU type)."""
    config = load_config(TestbedConfig, ROOT / "configs/testbed.yaml", [f"cache_dir={tmp_path}"])
    built, comparison = rebuild_testbed(config)
    assert built.source == "built" and comparison is not None and comparison.name == "default"
    print("\n".join(comparison.lines()))
    assert_default_criteria(built.report)
    assert comparison.structure == [] and comparison.criteria == []


def test_criteria_failures_name_each_missed_bound():
    report = {"teacher_acc_greedy": 0.97, "student_acc_greedy": 0.6, "student_acc_sampled": 0.05,
              "response_tokens_median": 51.0, "c_top20d_range": 0.29}
    assert criteria_failures(report) == [
        "student_acc_greedy = 0.6 (must be in [0.1, 0.5])",
        "capacity_acc_greedy = None (must be in [0.8, 1])",
        "c_top20d_range = 0.29 (must be >= 0.3)",
    ]


def test_selection_trace_and_its_length():
    from diagnostics.testbed.task import selection_trace, trace_length, trace_problems

    assert selection_trace(["kd", "ab", "xq"]) == "ab | kd xq ; kd | xq ; xq"
    for n in (2, 5, 8):
        (problem,) = trace_problems(1, seed=n, n_items=n, n_words=50)
        words = problem.prompt.split()[1:-1]
        steps = problem.answer.split(" ; ")
        assert [step.split()[0] for step in steps] == sorted(words)  # the minima, in order, are the sorted list
        assert len(problem.answer.split()) + 1 == trace_length(n)  # every word and symbol one token, + EOS


def test_trace_tokens_are_single_tokens():
    from diagnostics.testbed.build import build_tokenizer, encode_problem
    from diagnostics.testbed.task import TRACE_SYMBOLS, trace_problems

    tokenizer = build_tokenizer(40, TRACE_SYMBOLS)
    (problem,) = trace_problems(1, seed=0, n_items=6, n_words=40)
    prompt, response = encode_problem(tokenizer, problem)
    assert len(prompt) == 6 + 2 and len(response) == len(problem.answer.split()) + 1
    assert tokenizer.decode(response, skip_special_tokens=True) == " " + problem.answer
