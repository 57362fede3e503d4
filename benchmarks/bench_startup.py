"""What a fresh `taopd` process pays before it does any work: `import taopd.cli`, with and without compiled bytecode.

Every CLI run, torchrun worker and vLLM engine process starts by importing torch and transformers; `make test`
starts dozens of them. Each row times one import in a fresh process (median of `--repeats`), side by side:
  bytecode       the venv as `make venv` leaves it (uv --compile-bytecode);
  no bytecode    the same with PYTHONPYCACHEPREFIX pointed at an empty folder and PYTHONDONTWRITEBYTECODE=1:
                 every module compiled from source on each import. An upper bound on a venv installed without
                 --compile-bytecode on a machine that sets PYTHONDONTWRITEBYTECODE (there pip had still compiled
                 torch; transformers and vllm were compiled at every import);
  floor          torch and transformers' AutoModelForCausalLM alone, with bytecode (what any process here that
                 loads a model pays).

Usage: python benchmarks/bench_startup.py [--repeats 3]  (about 3.5 minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "bytecode": ("import taopd.cli", {}),
    "no bytecode": ("import taopd.cli", {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": "{empty}"}),
    "floor": ("import torch; from transformers import AutoModelForCausalLM", {}),
}


def time_import(code: str, env: dict[str, str]) -> float:
    """Wall seconds of `python -c code` in a fresh process (interpreter start included)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per case (>= 1); the median is shown")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats: must be >= 1, got {args.repeats}")
    seconds = {}
    with tempfile.TemporaryDirectory() as empty:
        for name, (code, env) in CASES.items():
            env = {k: v.format(empty=empty) for k, v in env.items()}
            seconds[name] = statistics.median(time_import(code, env) for _ in range(args.repeats))
    print(f"{'case':<12} {'seconds':>8} {'vs bytecode':>12}")
    for name, value in seconds.items():
        print(f"{name:<12} {value:8.2f} {value / seconds['bytecode']:11.2f}x")


if __name__ == "__main__":
    main()
