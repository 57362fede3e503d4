"""lm-evaluation-harness on trained students: any registered lm-eval task (MATH-500, AIME, GSM8K, ...)
with the HF or vLLM backend, and a project prompt set written as a local lm-eval task.

* `write_problem_task(problems, task_dir, ...)`: the problems as a local lm-eval task: `data.parquet`
  (prompt, answer; parquet keeps answers as text), `<name>.yaml` (generate_until over that file, greedy,
  the project's stop token and response cap) and `<name>_utils.py` whose `process_results` scores with
  `diagnostics.data.problems.check_answer` -- the same check as `taopd evaluate`'s own path, so the two
  differ only in how the responses are generated.
* `run_lm_eval(model_path, tasks, ...)`: `lm_eval.simple_evaluate` with a `TaskManager` that also reads
  `include_path` (local task folders), returning lm-eval's results dict.
* `results_rows`: that dict as one row per (task, metric) with its stderr, for `lm_eval.parquet`.

The paper's downstream evaluation (TA-OPD/repro/08_downstream_eval.sh) runs `lm-eval run --model hf
--tasks gsm8k_cot` and `--tasks aime24,aime25 --gen_kwargs max_gen_toks=4096` on each student; the same
tasks run here by name (they download their data from the hub, so they need the network).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from diagnostics.core.files import atomic_write
from diagnostics.data.problems import ANSWER_CHECKS, Problem

HELDOUT_TASK = "taopd_heldout"  # the task name of the problems `taopd evaluate` scores itself
LM_EVAL_COLUMNS = ["student", "task", "metric", "filter", "value", "stderr", "n_samples"]

UTILS_SOURCE = '''"""Written by opd.downstream.write_problem_task: score a response with the project's answer check."""

from diagnostics.data.problems import check_answer

ANSWER_CHECK = {answer_check!r}


def process_results(doc, results):
    return {{"acc": float(check_answer(results[0], doc["answer"], ANSWER_CHECK))}}
'''


def write_problem_task(
    problems: Sequence[Problem],
    task_dir: str | Path,
    *,
    name: str = HELDOUT_TASK,
    answer_check: str = "exact",
    max_gen_toks: int,
    until: Sequence[str],
) -> Path:
    """Write `problems` (prompts already rendered) as the lm-eval task `name` in `task_dir`; returns the
    folder (pass it as `include_path`). Greedy decoding, at most `max_gen_toks` tokens, stopping at
    `until` (and the tokenizer's EOS, which lm-eval always adds)."""
    if answer_check not in ANSWER_CHECKS:
        raise ValueError(f"answer_check: must be one of {', '.join(ANSWER_CHECKS)}, got {answer_check!r}")
    if not problems:
        raise ValueError("problems: empty list, nothing to write as a task")
    bad = [p.prompt_id for p in problems if not isinstance(p.prompt, str)]
    if bad:
        raise ValueError(f"problem {bad[0]}: render prompts to text before writing a task (a message list)")
    task_dir = Path(task_dir).resolve()
    data = pd.DataFrame({"prompt_id": [p.prompt_id for p in problems], "prompt": [p.prompt for p in problems],
                         "answer": [p.answer for p in problems]})
    data_path = task_dir / f"{name}.parquet"
    atomic_write(data_path, lambda tmp: data.to_parquet(tmp, index=False))
    utils = UTILS_SOURCE.format(answer_check=answer_check)
    atomic_write(task_dir / f"{name}_utils.py", lambda tmp: Path(tmp).write_text(utils))
    spec = {
        "task": name,
        "dataset_path": "parquet",
        "dataset_kwargs": {"data_files": {"test": str(data_path)}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "target_delimiter": "",
        "generation_kwargs": {"until": list(until), "do_sample": False, "max_gen_toks": int(max_gen_toks)},
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "num_fewshot": 0,
        "metadata": {"version": 1.0},
    }
    text = yaml.safe_dump(spec, sort_keys=False)
    text += f"process_results: !function {name}_utils.process_results\n"  # a YAML tag safe_dump cannot write
    atomic_write(task_dir / f"{name}.yaml", lambda tmp: Path(tmp).write_text(text))
    return task_dir


VLLM_CPU_DEFAULTS = {"gpu_memory_utilization": "0.2", "enforce_eager": "True"}  # as diagnostics.generation.vllm


def lm_eval_model_args(model_path: str, dtype: str, extra: str = "", *, vllm_cpu: bool = False) -> str:
    """lm-eval's model_args string (`extra`: more `key=value,...` pairs, e.g. vLLM's tensor_parallel_size).
    vLLM on CPU: a fifth of host RAM for the KV cache and eager mode unless `extra` says otherwise."""
    args = [f"pretrained={model_path}", f"dtype={dtype}"]
    given = {pair.split("=", 1)[0].strip() for pair in extra.split(",") if pair.strip()}
    if vllm_cpu:
        args += [f"{k}={v}" for k, v in VLLM_CPU_DEFAULTS.items() if k not in given]
    if extra:
        args.append(extra)
    return ",".join(args)


def run_lm_eval(
    model_path: str,
    tasks: Sequence[str],
    *,
    backend: str = "hf",
    include_path: Sequence[str | Path] = (),
    limit: int = 0,
    batch_size: int = 64,
    device: str = "cpu",
    dtype: str = "float32",
    gen_kwargs: str = "",
    model_args: str = "",
    chat_template: bool = False,
    seed: int = 0,
    task_manager: Any = None,
) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` of one model on `tasks`; local task folders in `include_path`
    (`task_manager`: one from `task_manager(include_path)`, reused over students: indexing lm-eval's
    task folders takes seconds)."""
    if backend not in ("hf", "vllm"):
        raise ValueError(f"lm_eval_backend: must be hf or vllm, got {backend!r}")
    if not tasks:
        raise ValueError("lm_eval_tasks: no task to run")
    import lm_eval

    manager = task_manager or make_task_manager(include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm_eval_tasks: unknown task {unknown[0]!r} (see `lm-eval ls tasks`; a local task "
                         f"folder goes in lm_eval_include)")
    with vllm_cpu_compat(backend, device):
        results = lm_eval.simple_evaluate(
            model=backend,
            model_args=lm_eval_model_args(model_path, dtype, model_args,
                                          vllm_cpu=backend == "vllm" and device.startswith("cpu")),
            tasks=list(tasks),
            task_manager=manager,
            batch_size=batch_size if backend == "hf" else vllm_batch_size(batch_size),
            device=device if backend == "hf" else None,
            limit=limit or None,
            gen_kwargs=gen_kwargs or None,
            apply_chat_template=chat_template,
            log_samples=False,
            bootstrap_iters=1000,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
        )
    if results is None:  # only rank 0 of a multi-process run gets results
        raise RuntimeError("lm-eval returned no results (not the main process?)")
    return results


@contextlib.contextmanager
def vllm_cpu_compat(backend: str, device: str) -> Iterator[None]:
    """Let lm-eval's vLLM backend run on the CPU build of vLLM.

    lm-eval reads `importlib.metadata.version("vllm")` when it imports its vLLM backend, but the CPU build
    is the distribution `vllm-cpu` (the Makefile's CPU install), so the import fails. For the call, a
    "vllm" lookup answers `<vllm-cpu version>+cpu`, which is what vLLM's own platform check
    (`vllm.platforms.vllm_version_matches_substr`) computes for that build; on CPU the engine is built in
    this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, as `diagnostics.generation.vllm` does). Nothing changes
    when the `vllm` distribution is installed (GPU machines) or for the hf backend.
    """
    if backend != "vllm":
        yield
        return
    original = importlib.metadata.version
    try:
        original("vllm")
        shim = None
    except importlib.metadata.PackageNotFoundError:
        try:
            cpu_version = original("vllm-cpu") + "+cpu"
        except importlib.metadata.PackageNotFoundError:
            raise ValueError("lm_eval_backend=vllm: neither vllm nor vllm-cpu is installed") from None
        shim = lambda name: cpu_version if name == "vllm" else original(name)  # noqa: E731
    saved_env = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    try:
        if shim is not None:
            importlib.metadata.version = shim
        if device.startswith("cpu"):
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        yield
    finally:
        importlib.metadata.version = original
        if saved_env is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved_env


def vllm_batch_size(batch_size: int) -> int | str:
    """lm-eval's vLLM batch size: "auto" (every request to vLLM at once, its fastest), except under
    TQDM_DISABLE, where lm-eval's "auto" turns on vLLM's progress bar and vLLM divides by the disabled
    bar's zero elapsed time (ZeroDivisionError in vllm/entrypoints/common/offline.py)."""
    return batch_size if os.environ.get("TQDM_DISABLE") else "auto"


def make_task_manager(include_path: Sequence[str | Path] = ()) -> Any:
    """lm-eval's TaskManager over its registered tasks plus the local task folders in `include_path`."""
    from lm_eval.tasks import TaskManager

    include = [str(Path(p).resolve()) for p in include_path]
    return TaskManager(include_path=include or None)


def results_rows(student: str, results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, metric, filter) of lm-eval's results: value, stderr (NaN when lm-eval gives
    "N/A") and the number of documents scored."""
    rows = []
    for task, metrics in results.get("results", {}).items():
        n = results.get("n-samples", {}).get(task, {}).get("effective", math.nan)
        for key, value in metrics.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append({"student": student, "task": task, "metric": metric, "filter": filt, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else math.nan,
                         "n_samples": n})
    return rows


def write_results_json(path: str | Path, results: dict[str, Any]) -> Path:
    """lm-eval's results (config and numbers; no per-sample logs) as JSON, atomically."""
    keep = {k: results[k] for k in ("results", "configs", "versions", "n-samples", "higher_is_better") if k in results}
    text = json.dumps(keep, indent=2, sort_keys=True, default=str) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
