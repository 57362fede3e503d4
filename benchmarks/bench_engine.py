"""Single-step diagnostic: production (torch.func vmap) vs the plain oracle, side by side in one run.

The oracle deep-copies the student, takes one torch.optim step on one position's loss and re-scores
the sequence, for every bank position. The production path computes per-position gradients with
jacrev (vmapped over sequences) and re-scores all updated copies in one batched functional forward.
Prints both times, the speed ratio (target >= 20x) and the max difference of the gains.

    .venv/bin/python benchmarks/bench_engine.py [--sequences 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from diagnostics import engine  # noqa: E402
from diagnostics.core.config import load_config  # noqa: E402
from diagnostics.lm.forward import ResponseBatch, full_logprobs  # noqa: E402
from diagnostics.lm.models import load_pair  # noqa: E402
from diagnostics.testbed.build import build_testbed, encode_problem  # noqa: E402
from diagnostics.testbed.config import TestbedConfig, heldout_problems  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=32, help="bank sequences (each 9 positions on the testbed)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each path (median reported)")
    parser.add_argument("--testbed", default="configs/testbed.yaml")
    args = parser.parse_args()

    testbed = build_testbed(load_config(TestbedConfig, args.testbed))
    pair = load_pair(testbed.student_path, testbed.teacher_path, device="cpu", dtype="float32")
    problems = heldout_problems(testbed.config, args.sequences, split_seed=3)
    encoded = [encode_problem(pair.tokenizer, p) for p in problems]
    bank = ResponseBatch.from_ids([e[0] for e in encoded], [e[1] for e in encoded], pair.tokenizer.pad_token_id)
    teacher_lp = full_logprobs(pair.teacher, bank, pair.vocab_size)
    step = engine.StepConfig(loss="reverse_kl", optimizer="sgd", lr=1e-5)
    n_positions = int(bank.valid.sum())

    def timed(fn):
        times, out = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), out

    prod_fn = lambda: engine.single_step_vmap(pair.student, bank, teacher_lp, step, pair.vocab_size)  # noqa: E731
    oracle_fn = lambda: engine.single_step_reference(pair.student, bank, teacher_lp, step, pair.vocab_size)  # noqa: E731
    prod_fn()  # warm-up (first vmap trace)
    t_oracle, oracle = timed(oracle_fn)
    t_prod, prod = timed(prod_fn)
    diff = max((prod[k] - oracle[k]).abs().nan_to_num(0).max().item() for k in oracle)
    n_params = sum(p.numel() for p in pair.student.parameters())
    print(f"testbed student: {n_params:,} parameters, {n_positions} bank positions, "
          f"torch threads {torch.get_num_threads()}")
    print(f"oracle (deep copy, torch.optim step, forward): {t_oracle:.2f} s  "
          f"({1e3 * t_oracle / n_positions:.2f} ms/position)")
    print(f"production (jacrev + vmap functional forward): {t_prod:.3f} s  "
          f"({1e3 * t_prod / n_positions:.3f} ms/position)")
    print(f"speed ratio oracle/production: {t_oracle / t_prod:.1f}x   (target >= 20x)")
    print(f"max |production - oracle| over all outputs: {diff:.2e}")


if __name__ == "__main__":
    main()
