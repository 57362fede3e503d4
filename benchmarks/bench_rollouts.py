"""Rollout throughput: generated tokens per second of the vLLM and HF backends on the same prompts.

One timed run per backend after a warm-up (vLLM's engine start is reported separately: it is paid
once per process). HF time includes its teacher-forced log-prob recompute, which is part of what the
backend delivers. Prints both rates and their ratio; on CPU the figure is only reported.

    .venv/bin/python benchmarks/bench_rollouts.py [--student PATH] [--n-prompts 64]

Default student: the default testbed's if it is built, else the small testbed's (both use head
size 32, which vLLM's CPU attention supports).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def testbed_config(name: str):
    from diagnostics.core.config import load_config
    from diagnostics.testbed.config import TestbedConfig

    return load_config(TestbedConfig, ROOT / "configs" / name, [f"cache_dir={ROOT / '.cache/testbed'}"])


def default_student() -> str:
    """The default testbed's student if built, else the small testbed's (built now, seconds)."""
    from diagnostics.testbed.build import build_testbed

    config = testbed_config("testbed.yaml")
    built = config.cache_root() / config.cache_key()
    if (built / "report.json").is_file():
        return str(built / "student")
    return build_testbed(testbed_config("testbed_small.yaml"), progress=False).student_path


def prompts_for(path: str, n: int) -> list[str]:
    """Held-out problems of the testbed the student belongs to; generic prompts for another model."""
    from diagnostics.core.config import ConfigError, load_config
    from diagnostics.testbed.config import TestbedConfig, heldout_problems

    try:  # a testbed stores its config (JSON, which is YAML) beside the models
        config = load_config(TestbedConfig, Path(path).parent / "config.json")
    except ConfigError:
        return [f"Problem {i}: compute {i} + {2 * i} and explain the steps." for i in range(n)]
    return [p.prompt for p in heldout_problems(config, n)]


def timed(backend: str, path: str, prompts: list[str], sampling) -> tuple[float, int]:
    from diagnostics.generation.rollouts import generate_rollouts

    start = time.perf_counter()
    df = generate_rollouts(path, None, prompts, sampling, backend=backend, progress=False)
    return time.perf_counter() - start, int(sum(len(r) for r in df.response_ids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", help="student model directory (default: a testbed student)")
    parser.add_argument("--n-prompts", type=int, default=64, help="prompts per run (>= 64 for a stable rate)")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: fill the context")
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig, AutoTokenizer

    from diagnostics.data.prompts import max_positions, render_prompts
    from diagnostics.generation.backends import SamplingConfig
    from diagnostics.generation.rollouts import generate_rollouts
    from diagnostics.generation.vllm import check_vllm_supported, release_vllm_engine

    path = args.student or default_student()
    check_vllm_supported(path)
    prompts = prompts_for(path, args.n_prompts)
    longest = max(len(ids) for ids in render_prompts(AutoTokenizer.from_pretrained(path), prompts))
    max_new = args.max_new_tokens or min(256, max_positions(AutoConfig.from_pretrained(path)) - longest)
    sampling = SamplingConfig(max_new_tokens=max_new, n=args.n, seed=0)
    print(f"student {path}\n{len(prompts)} prompts x {args.n} samples, max_new_tokens {max_new}, "
          f"torch threads {torch.get_num_threads()}")

    t0 = time.perf_counter()
    generate_rollouts(path, None, prompts[:2], sampling, backend="vllm", progress=False)  # engine start + warm-up
    engine_s = time.perf_counter() - t0
    vllm_s, vllm_tokens = timed("vllm", path, prompts, sampling)
    release_vllm_engine()  # its worker processes would compete with HF for the cores
    generate_rollouts(path, None, prompts[:2], sampling, backend="hf", progress=False)  # warm-up
    hf_s, hf_tokens = timed("hf", path, prompts, sampling)

    vllm_rate, hf_rate = vllm_tokens / vllm_s, hf_tokens / hf_s
    print(f"vllm: {vllm_rate:9.1f} tokens/s ({vllm_tokens} tokens in {vllm_s:.2f} s; "
          f"engine start + warm-up {engine_s:.1f} s)")
    print(f"hf:   {hf_rate:9.1f} tokens/s ({hf_tokens} tokens in {hf_s:.2f} s, incl. the log-prob recompute)")
    print(f"ratio vllm / hf: {vllm_rate / hf_rate:.2f}x")


if __name__ == "__main__":  # vLLM's CPU workers are spawned: this guard is required
    main()
