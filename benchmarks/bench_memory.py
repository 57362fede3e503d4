"""Peak memory per stage at Qwen's vocabulary (151,936 LM-head rows) on the CPU: does every stage stay bounded?

Each stage runs in its own subprocess (`--stage NAME`) so its peak resident set size (getrusage's ru_maxrss:
the process's high-water mark, models and libraries included) is its own:

  testbed     build (or reuse) configs/testbed_qwen_vocab.yaml and load the pair
  diagnose    `taopd diagnose`'s recipe, single-step gains (method auto: the per-position loop at this vocabulary),
              bank of --sequences responses x --tokens tokens, no group variant
  group       the group variant (`diagnostics.engine.group_step_gains`) on that bank: one update on a random 5%
              of the positions, the gain at every position
  train       `taopd train` (configs/train_quick.yaml on this testbed): full-token and 10% teachability arms,
              a common bank of --sequences x --tokens, micro-batches of --micro sequences

Usage: python benchmarks/bench_memory.py [--sequences 64] [--tokens 64] [--limit-gb 6] [--stages ...]
Prints a table of peak RSS (GB) and seconds per stage, and fails (exit 1) when a stage exceeds --limit-gb.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTBED_CONFIG = "configs/testbed_qwen_vocab.yaml"
STAGES = ("testbed", "diagnose", "group", "train")


def peak_rss_gb() -> float:
    """This process's peak resident set size (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def stage_testbed(args: argparse.Namespace) -> dict:
    from diagnostics.core.config import load_config
    from diagnostics.lm.models import load_pair
    from diagnostics.testbed.build import build_testbed
    from diagnostics.testbed.config import TestbedConfig

    testbed = build_testbed(load_config(TestbedConfig, Path(args.testbed_config), []), progress=False)
    pair = load_pair(testbed.student_path, testbed.teacher_path, device="cpu", dtype="float32")
    report = testbed.report
    return {"vocab": pair.vocab_size, "rows": pair.student.config.vocab_size, "build_s": report.get("build_s"),
            "bpe_tokens": report.get("bpe_tokens"), "added_tokens": report.get("added_tokens")}


def diagnose_config(args: argparse.Namespace, work: Path):
    from diagnostics.diagnose_config import DiagnoseConfig

    return DiagnoseConfig(testbed_config=str(Path(args.testbed_config).resolve()), n_sequences=args.sequences,
                          max_response_tokens=args.tokens, group_selectors=[], device="cpu", dtype="float32",
                          backend="hf", run_name="bench-memory", out_dir=str(work / "diagnose"))


def stage_diagnose(args: argparse.Namespace, work: Path) -> dict:
    import pandas as pd

    from diagnostics.diagnose import run_diagnose

    run_dir = run_diagnose(diagnose_config(args, work), progress=False)
    tokens = pd.read_parquet(run_dir / "tokens.parquet")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return {"positions": len(tokens), "method": manifest["method"], "finite_gains": int(tokens["gain"].notna().sum())}


def stage_group(args: argparse.Namespace, work: Path) -> dict:
    import torch

    from diagnostics import engine
    from diagnostics.bank import bank_batch, read_bank
    from diagnostics.lm.models import load_pair
    from diagnostics.signals import select

    run_dir = work / "diagnose" / "bench-memory"
    config = json.loads((run_dir / "config.json").read_text())["resolved_models"]
    pair = load_pair(config["student_path"], config["teacher_path"], device="cpu", dtype="float32")
    bank = bank_batch(read_bank(run_dir / "bank.parquet", pair.vocab_size), pair.tokenizer.pad_token_id)
    score = torch.rand(bank.valid.shape, generator=torch.Generator().manual_seed(0))
    keep = select(torch.where(bank.valid, score, float("-inf")), bank.valid, 0.05, seed=0)
    step = engine.StepConfig(loss="reverse_kl", optimizer="sgd", lr=1e-5)
    gain = engine.group_step_gains(pair.student, bank, pair.teacher, keep, step, pair.vocab_size)
    return {"bank": list(bank.valid.shape), "kept": int(keep.sum()), "finite_gains": int(gain.isfinite().sum())}


def stage_train(args: argparse.Namespace, work: Path) -> dict:
    import pandas as pd

    from diagnostics.core.config import load_config
    from opd.config import TrainConfig
    from opd.engines import run_training

    overrides = [f"testbed_config={Path(args.testbed_config).resolve()}", f"bank_sequences={args.sequences}",
                 f"bank_max_tokens={args.tokens}", f"micro_batch_size={args.micro}", "steps=2", "eval_every=2",
                 "eval_problems=16", "checkpoint_every=0", f"out_dir={work / 'train'}", "run_name=bench-memory"]
    run_dir = run_training(load_config(TrainConfig, ROOT / "configs/train_quick.yaml", overrides))
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    return {"arms": int(metrics[["selector", "ratio", "seed"]].drop_duplicates().shape[0]), "metric_rows": len(metrics)}


def run_stage(name: str, args: argparse.Namespace) -> dict:
    """Run one stage in a fresh interpreter; its JSON line (peak RSS, seconds, details)."""
    command = [sys.executable, __file__, "--stage", name, "--work", str(args.work), "--sequences", str(args.sequences),
               "--tokens", str(args.tokens), "--micro", str(args.micro), "--testbed-config", args.testbed_config]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TQDM_DISABLE": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"stage {name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--sequences", type=int, default=64, help="bank sequences (diagnose, group, train's bank)")
    parser.add_argument("--tokens", type=int, default=64, help="bank tokens per sequence")
    parser.add_argument("--micro", type=int, default=4, help="train: sequences per forward/backward")
    parser.add_argument("--limit-gb", type=float, default=6.0, help="the stated bound on every stage's peak RSS")
    parser.add_argument("--work", type=Path, default=None, help="run directories (default: a temporary one)")
    parser.add_argument("--testbed-config", default=str(ROOT / TESTBED_CONFIG), help="the Qwen-vocabulary testbed")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: run one stage here
    args = parser.parse_args()
    if args.stage:
        import torch

        torch.set_num_threads(1)
        started = time.perf_counter()
        fn = {"testbed": lambda: stage_testbed(args), "diagnose": lambda: stage_diagnose(args, args.work),
              "group": lambda: stage_group(args, args.work), "train": lambda: stage_train(args, args.work)}[args.stage]
        details = fn()
        print(json.dumps({"stage": args.stage, "peak_rss_gb": round(peak_rss_gb(), 3),
                          "seconds": round(time.perf_counter() - started, 1), **details}))
        return 0
    if args.work is None:
        args.work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    stages = ["testbed", *[s for s in args.stages if s != "testbed"]]  # the testbed first: later stages load it
    if "group" in stages and "diagnose" not in stages and not (args.work / "diagnose").is_dir():
        stages.insert(stages.index("group"), "diagnose")  # the group variant runs on the diagnose stage's bank
    print(f"peak RSS per stage, Qwen vocabulary ({TESTBED_CONFIG}), bank {args.sequences} x {args.tokens}, "
          f"limit {args.limit_gb} GB; work dir {args.work}")
    print(f"testbed config: {args.testbed_config}")
    print(f"{'stage':<10} {'peak RSS GB':>11} {'seconds':>8}  details")
    over = []
    for name in stages:
        row = run_stage(name, args)
        details = {k: v for k, v in row.items() if k not in ("stage", "peak_rss_gb", "seconds")}
        print(f"{name:<10} {row['peak_rss_gb']:>11.2f} {row['seconds']:>8.1f}  {json.dumps(details)}", flush=True)
        if row["peak_rss_gb"] > args.limit_gb:
            over.append(name)
    if over:
        print(f"OVER the {args.limit_gb} GB bound: {', '.join(over)}")
        return 1
    print(f"every stage within {args.limit_gb} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
