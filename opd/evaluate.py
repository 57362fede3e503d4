"""`taopd evaluate`: answer accuracy of trained students, by the project's own generation and by lm-eval.

Students: the base student and every arm's final student of a `taopd train` run directory
(`run=results/train/<run>`: arms/<arm>/student, written with save_students=true), and any model
directories or hub ids in `students`.

Problems: the run's own held-out problems (the testbed's split 0, or the first `eval_problems` of the
run's `eval_prompts` file), rendered exactly as the trainer renders them, so greedy evaluation of an
arm's student reproduces the accuracy its last training evaluation logged; or any prompt set
(`prompts=`: a local JSON / JSONL / parquet file or a hub id, with a column mapping and the chat
template, `diagnostics.data.prompt_sets`).

Accuracy is checked by name (`answer_check`: exact | math, `diagnostics.data.problems`). Greedy: one pass.
Sampled (`greedy=false`): `n_samples` responses per problem at `temperature` for each seed in `seeds`;
pass@1 is the mean correctness over samples and problems (its intervals are computed from
`evaluation.parquet` in `analysis.pass_at_1`). With `lm_eval_tasks` every student also runs those
lm-eval tasks (HF or vLLM backend, `opd.downstream`); `lm_eval_heldout=true` adds the problems above as
the local lm-eval task `taopd_heldout`, scored with the same answer check.

Writes `<out>/evaluation.parquet` (one row per student x seed x sample x problem: the response and whether
it is correct), `lm_eval.parquet` (one row per student x task x metric), `lm_eval/<student>.json`
(lm-eval's results) and `manifest.json`; out = `<run>/evaluation` or `results/evaluate/<name>`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from diagnostics.core.config import (
    ConfigError,
    check,
    check_applies,
    check_at_least,
    check_cpu_threads,
    check_run_name,
    check_temperature,
    check_unique,
)
from diagnostics.core.files import read_json, write_json, write_parquet
from diagnostics.core.progress import progress_bar
from diagnostics.core.rundir import check_not_a_run, config_hash
from diagnostics.core.seeds import derive_seed
from diagnostics.data.problems import ANSWER_CHECKS, Problem, correct_flags
from diagnostics.data.prompt_sets import load_prompt_set, render_problems
from diagnostics.generation.hf import generate_responses
from diagnostics.generation.store import package_versions
from diagnostics.lm.models import load_model, resolve_device, resolve_dtype
from diagnostics.pair import DEFAULT_MAX_NEW_TOKENS_REAL, resolve_pair
from opd.config import TrainConfig
from opd.downstream import (
    HELDOUT_TASK,
    LM_EVAL_COLUMNS,
    make_task_manager,
    results_rows,
    run_lm_eval,
    write_problem_task,
)
from opd.downstream import write_results_json as write_lm_eval_json
from opd.trainer import EVAL_SPLIT_SEED, heldout

EVALUATION_COLUMNS = ["student", "selector", "ratio", "train_seed", "eval_seed", "sample", "problem_id", "response",
                      "correct"]


@dataclass
class EvaluateConfig:
    """Config of `taopd evaluate`; see configs/evaluate.yaml."""

    # students
    run: str = ""  # a `taopd train` run directory: its base student and every arm's final student
    students: list[str] = field(default_factory=list)  # more model dirs or hub ids
    include_base: bool = True  # with `run`: evaluate the run's base (untrained) student too
    # problems
    prompts: str = ""  # "" = the run's held-out problems; else a .jsonl/.json/.parquet file or a hub id
    prompt_column: str = "prompt"  # name or dotted path (e.g. prompt.0.content)
    answer_column: str = "answer"  # e.g. reward_model.ground_truth, label, solution
    split: str = "test"  # hub datasets only
    subset: str = ""  # hub dataset configuration name; "" = none
    n_problems: int = 0  # 0 = the run's eval_problems (or the whole prompt set)
    chat_template: bool = True  # prompts= only: render through the tokenizer's chat template when it has one
    enable_thinking: bool | None = None  # prompts= only: Qwen3's switch (false: no think block); null = the template's
    system_prompt: str = ""  # prompts= only: a system turn before each text prompt
    answer_check: str = ""  # exact | math; "" = the run's answer_check (exact without a run)
    # generation
    greedy: bool = True  # greedy decoding (one pass; seeds and n_samples must stay 1)
    n_samples: int = 1  # sampled responses per problem and seed (greedy=false)
    seeds: list[int] = field(default_factory=lambda: [0])  # sampling seeds (greedy=false)
    temperature: float = 1.0
    max_new_tokens: int = 0  # 0 = the run's response cap (testbed: its response length), else 256
    batch_size: int = 64  # prompts per generate call (the trainer's evaluation uses 64)
    # lm-eval
    lm_eval_tasks: list[str] = field(default_factory=list)  # lm-eval task names, e.g. [minerva_math500, aime24]
    lm_eval_heldout: bool = False  # also run the problems above as the local lm-eval task taopd_heldout
    lm_eval_backend: Literal["hf", "vllm"] = "hf"
    lm_eval_include: list[str] = field(default_factory=list)  # folders of local lm-eval task YAMLs
    lm_eval_limit: int = 0  # documents per task (0 = all)
    lm_eval_batch_size: int = 64  # hf backend
    lm_eval_gen_kwargs: str = ""  # e.g. "max_gen_toks=4096,temperature=0"
    lm_eval_model_args: str = ""  # extra model_args, e.g. "tensor_parallel_size=2,gpu_memory_utilization=0.8"
    lm_eval_chat_template: bool = False  # lm-eval's apply_chat_template for its tasks
    # machine, output
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    cpu_threads: int = 1  # torch threads on CPU; 0 = torch's default
    out_dir: str = ""  # "" = <run>/evaluation, or results/evaluate/<name>
    name: str = ""  # "" = eval-<config hash> (without a run)
    progress: bool = True

    def __post_init__(self) -> None:
        check(bool(self.run) or bool(self.students), "run", "give a training run directory (run=...) or students")
        check(bool(self.run) or bool(self.prompts) or bool(self.lm_eval_tasks), "prompts",
              "students without a run need a prompt set (prompts=file.jsonl or a hub id) or lm_eval_tasks")
        check(not self.lm_eval_heldout or bool(self.run) or bool(self.prompts), "lm_eval_heldout",
              "needs problems: a run or a prompt set")
        check(not self.answer_check or self.answer_check in ANSWER_CHECKS, "answer_check",
              f"must be one of {', '.join(ANSWER_CHECKS)} (or empty for the run's), got {self.answer_check!r}")
        check_at_least(self, 0, "n_problems", "max_new_tokens", "lm_eval_limit")
        check_cpu_threads(self.cpu_threads)
        check_at_least(self, 1, "n_samples", "batch_size", "lm_eval_batch_size")
        check(len(self.seeds) >= 1, "seeds", f"must hold at least one seed, got {self.seeds}")
        check_unique(self.seeds, "seeds")
        check(not self.greedy or (self.n_samples == 1 and len(self.seeds) == 1), "n_samples",
              "greedy decoding is deterministic: n_samples and seeds > 1 need greedy=false")
        check_temperature(self.temperature)
        check_applies(self, "temperature", not self.greedy, "greedy=true decodes the most likely token; temperature "
                      "is for sampled evaluation (greedy=false)")
        for key in ("students", "lm_eval_tasks", "lm_eval_include"):
            check_unique(getattr(self, key), key)
        if self.name:
            check_run_name(self.name, "name")
        for key in ("enable_thinking", "system_prompt", "chat_template"):  # the run's problems: as trained
            default = {"enable_thinking": None, "system_prompt": "", "chat_template": True}[key]
            check(getattr(self, key) == default or bool(self.prompts), key,
                  "applies to a prompt set (prompts=...); the run's own problems are rendered as the trainer did")


@dataclass(frozen=True)
class Student:
    """One model to evaluate; selector/ratio/train_seed are set for a run's arm students."""

    name: str
    path: str
    selector: str = ""
    ratio: float = float("nan")
    train_seed: int = -1


def run_train_config(run_dir: Path) -> TrainConfig:
    """The TrainConfig a run was made with (its config.json; keys it predates take their defaults)."""
    path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run: {run_dir} is not a directory" if run_dir.exists()
                                else f"run: run directory {run_dir} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"run={run_dir}: holds no config.json (not a `taopd train` run directory)")
    saved = read_json(path, "the run's saved config")
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: the run's saved config is not a JSON object")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    foreign = sorted(k for k in saved if k not in known)
    if foreign:  # a diagnose run's config (mode, n_sequences, ...) or another tool's
        kind = "a `taopd diagnose` run" if {"mode", "n_sequences"} <= set(saved) else "not a `taopd train` run"
        raise ConfigError(f"run={run_dir}: is {kind} (its config.json has keys taopd train does not know: "
                          f"{', '.join(foreign[:4])}); evaluate takes a training run directory (results/train/<run>)")
    return TrainConfig(**saved)


def find_students(config: EvaluateConfig, train: TrainConfig | None, base_path: str | None) -> list[Student]:
    """The base student (with a run and include_base), every arm's saved student, then `students`."""
    out = []
    if train is not None:
        run_dir = Path(config.run)
        if config.include_base and base_path:
            out.append(Student("base", base_path))
        for arm in train.arms():
            path = run_dir / "arms" / arm.name / "student"
            if not path.is_dir():
                raise FileNotFoundError(f"run={run_dir}: arm {arm.name} has no saved student ({path}); the run "
                                        f"needs save_students=true and finished arms")
            out.append(Student(arm.name, str(path), arm.selector, arm.ratio, arm.seed))
    for given in config.students:
        out.append(Student(student_name(given, {s.name for s in out}), given))
    return out


def student_name(given: str, taken: set[str]) -> str:
    """A name for a `students` entry unique among `taken` by construction: its directory name, else the whole
    path with '/' as '_', else that with a counter (two different students never share a row)."""
    for name in (Path(given).name or given, given.strip("/").replace("/", "_")):
        if name and name not in taken:
            return name
    base = given.strip("/").replace("/", "_") or "student"
    return next(f"{base}-{i}" for i in range(2, len(taken) + 3) if f"{base}-{i}" not in taken)


def evaluation_problems(
    config: EvaluateConfig, train: TrainConfig | None, pair, tokenizer
) -> list[Problem]:
    """The prompt set, rendered; or the run's held-out problems rendered as the trainer renders them; none
    when there is neither (lm-eval tasks only)."""
    if not config.prompts and train is None:
        return []
    if config.prompts:
        problems = load_prompt_set(config.prompts, prompt_column=config.prompt_column,
                                   answer_column=config.answer_column, split=config.split,
                                   subset=config.subset or None, limit=config.n_problems)
        return render_problems(tokenizer, problems, chat_template=config.chat_template,
                               enable_thinking=config.enable_thinking, system_prompt=config.system_prompt)

    return heldout(train, pair, config.n_problems or train.eval_problems, EVAL_SPLIT_SEED, tokenizer)


def score_student(
    model: torch.nn.Module, tokenizer, problems: list[Problem], config: EvaluateConfig, answer_check: str,
    max_new_tokens: int,
) -> pd.DataFrame:
    """Rows (eval_seed, sample, problem_id, response, correct) of one student: one greedy pass, or
    n_samples sampled responses per problem for each seed (prompts repeated, one generate stream per seed)."""
    prompts = [p.prompt for p in problems]
    answers = [p.answer for p in problems]
    frames = []
    for seed in config.seeds:
        repeated = [p for p in prompts for _ in range(config.n_samples)]  # problem-major
        responses = generate_responses(model, tokenizer, repeated, max_new_tokens=max_new_tokens,
                                       greedy=config.greedy, temperature=config.temperature,
                                       seed=derive_seed(seed, 16), batch_size=config.batch_size)
        gold = [a for a in answers for _ in range(config.n_samples)]
        frames.append(pd.DataFrame({
            "eval_seed": seed,
            "sample": np.tile(np.arange(config.n_samples), len(problems)),
            "problem_id": np.repeat([p.prompt_id for p in problems], config.n_samples),
            "response": responses,
            "correct": correct_flags(responses, gold, answer_check),
        }))
    return pd.concat(frames, ignore_index=True)


def _setup(config: EvaluateConfig):
    """(train config or None, resolved pair or None, tokenizer, problems, answer check, max_new_tokens)."""
    from transformers import AutoTokenizer

    train = pair = None
    if config.run:
        train = run_train_config(Path(config.run))
        pair = resolve_pair(train.student, train.teacher, testbed_config=train.testbed_config, k=train.k,
                            max_new_tokens=train.max_new_tokens, progress=False)
    tokenizer_path = pair.student_path if pair is not None else config.students[0]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    if tokenizer.pad_token_id is None:  # batched generation pads on the left
        tokenizer.pad_token = tokenizer.eos_token
    problems = evaluation_problems(config, train, pair, tokenizer)
    answer_check = config.answer_check or (train.answer_check if train is not None else "exact")
    max_new_tokens = config.max_new_tokens or (pair.max_new_tokens if pair is not None
                                               else DEFAULT_MAX_NEW_TOKENS_REAL)
    return train, pair, tokenizer, problems, answer_check, max_new_tokens


def output_dir(config: EvaluateConfig) -> Path:
    if config.out_dir:
        return Path(config.out_dir)
    if config.run:
        return Path(config.run) / "evaluation"
    payload = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("out_dir", "name", "progress")}
    return Path("results/evaluate") / (config.name or "eval-" + config_hash(payload))


def run_evaluation(config: EvaluateConfig) -> Path:
    """Evaluate every student (own generation, then lm-eval tasks); returns the output directory."""
    started = time.perf_counter()
    device = resolve_device(config.device)
    if device.type == "cpu" and config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    dtype = resolve_dtype(config.dtype, device)
    train, pair, tokenizer, problems, answer_check, max_new_tokens = _setup(config)
    students = find_students(config, train, pair.student_path if pair is not None else None)
    out = output_dir(config)
    check_not_a_run(out, "out_dir", allowed_kind="evaluate")  # a diagnose or train run's files stay theirs
    frames, lm_rows = [], []
    for student in progress_bar(students if problems else [], desc="students", enabled=config.progress):
        model = load_model(student.path, device, dtype)
        rows = score_student(model, tokenizer, problems, config, answer_check, max_new_tokens)
        frames.append(rows.assign(student=student.name, selector=student.selector, ratio=student.ratio,
                                  train_seed=student.train_seed)[EVALUATION_COLUMNS])
        del model
    evaluation = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=EVALUATION_COLUMNS)
    write_parquet(out / "evaluation.parquet", evaluation)
    if config.lm_eval_tasks or config.lm_eval_heldout:
        lm_rows = run_lm_eval_all(config, students, problems, tokenizer, answer_check, max_new_tokens, out, device)
    write_parquet(out / "lm_eval.parquet", pd.DataFrame(lm_rows, columns=LM_EVAL_COLUMNS))
    write_json(out / "manifest.json", {
        "kind": "evaluate", "config": dataclasses.asdict(config), "answer_check": answer_check,
        "max_new_tokens": max_new_tokens, "n_problems": len(problems), "students": [dataclasses.asdict(s)
                                                                                    for s in students],
        "pass_at_1": "mean correctness over problems, samples and seeds (greedy: one pass)",
        "device": str(device), "dtype": str(dtype).removeprefix("torch."), "versions": package_versions(),
        "seconds": round(time.perf_counter() - started, 1),
    })
    return out


def run_lm_eval_all(config: EvaluateConfig, students: list[Student], problems: list[Problem], tokenizer,
                    answer_check: str, max_new_tokens: int, out: Path, device: torch.device) -> list[dict]:
    """Every student on the lm-eval tasks (plus taopd_heldout when asked); lm_eval/<student>.json each."""
    tasks, include = list(config.lm_eval_tasks), list(config.lm_eval_include)
    if config.lm_eval_heldout:
        stops = [tokenizer.eos_token] if tokenizer.eos_token else []
        include.append(str(write_problem_task(problems, out / "lm_eval_task", answer_check=answer_check,
                                              max_gen_toks=max_new_tokens, until=stops)))
        tasks.append(HELDOUT_TASK)
    dtype = "float32" if config.dtype == "auto" and device.type == "cpu" else (
        "bfloat16" if config.dtype == "auto" else config.dtype)
    rows, manager = [], make_task_manager(include)
    for student in students:
        try:
            results = run_lm_eval(student.path, tasks, backend=config.lm_eval_backend, task_manager=manager,
                                  limit=config.lm_eval_limit, batch_size=config.lm_eval_batch_size,
                                  device=str(device), dtype=dtype, gen_kwargs=config.lm_eval_gen_kwargs,
                                  model_args=config.lm_eval_model_args, chat_template=config.lm_eval_chat_template,
                                  seed=config.seeds[0])
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        write_lm_eval_json(out / "lm_eval" / f"{student.name}.json", results)
        rows += results_rows(student.name, results)
    return rows
