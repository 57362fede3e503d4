"""Benchmark: ``token_signals`` against the floor of one ``log_softmax`` per input.

On N x V float32 logits (default N=4,096, V=151,936: Qwen's vocabulary), times
``token_signals(student, teacher, k)`` and, in the same run and interleaved with it, the floor
``torch.log_softmax(student); torch.log_softmax(teacher)`` (warm-up first, median of repeats).
Prints the time ratio (target <= 2.0; also against log_softmax into preallocated outputs, which
skips the page faults of fresh outputs) and the peak resident memory each call adds over the
inputs (VmHWM from /proc/self/status, reset before each call via /proc/self/clear_refs), and
the float32-vs-float64 error of a few rows as a sanity check.

The logits are synthetic but shaped like a language model's: a Gaussian body plus a sparse
heavy right tail, so the student's mean entropy is a few nats and the teacher is correlated
with the student (the entropies are printed).

    .venv/bin/python benchmarks/bench_signals.py            # full size (about 14 GB of RAM)
    .venv/bin/python benchmarks/bench_signals.py --n 256 --v 32000   # quick run

On a shared machine, other processes on the cores slow the many OpenMP regions of the chunked
loop far more than the floor's two big calls (threads spin-wait for descheduled peers); the
header prints the load average. ``OMP_WAIT_POLICY=PASSIVE`` or ``--threads 1`` (applied to both
sides) give contention-robust figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diagnostics.signals import DEFAULT_CHUNK_LOGITS, token_signals  # noqa: E402


def make_logits(n: int, v: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Student/teacher logits [n, v] float32, built in row blocks to keep the RSS at the inputs."""
    g = torch.Generator().manual_seed(seed)
    student = torch.empty(n, v)
    teacher = torch.empty(n, v)
    for start in range(0, n, 256):
        rows = slice(start, start + 256)
        body = torch.randn(student[rows].shape, generator=g).mul_(2.0)
        # Sparse heavy tail: about 20 tokens per row get a large boost (the "plausible" tokens).
        boost = (torch.rand(body.shape, generator=g) < 20 / v).float()
        boost.mul_(torch.rand(body.shape, generator=g).mul_(12.0).add_(6.0))
        student[rows] = body + boost
        # Teacher: the same plausible tokens reweighted, plus independent noise.
        noise = torch.randn(body.shape, generator=g)
        teacher[rows] = body.mul_(0.7).add_(noise, alpha=1.4).add_(boost, alpha=1.1)
    return student, teacher


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def peak_extra_mb(fn) -> float:
    """Peak RSS added by fn() over the RSS before it, in MB (VmHWM after resetting it)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return float("nan")
    before = _status_kb("VmRSS")
    result = fn()
    peak = _status_kb("VmHWM")
    del result
    return (peak - before) / 1024


def floor_fn(student, teacher, out=None):
    """The floor: one log_softmax per input (into preallocated ``out`` tensors if given)."""
    if out is None:
        return torch.log_softmax(student, dim=-1), torch.log_softmax(teacher, dim=-1)
    return torch.log_softmax(student, dim=-1, out=out[0]), torch.log_softmax(teacher, dim=-1, out=out[1])


def time_interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Wall times of each fn, interleaved round by round (so load changes hit all alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            result = fn()
            times[name].append(time.perf_counter() - start)
            del result
    return times


def float64_errors(student, teacher, sig, k: int, rows: int = 8) -> dict[str, float]:
    """Max abs error of a few rows against float64 (entropy, KLs, C)."""
    ls = torch.log_softmax(student[:rows].double(), -1)
    lt = torch.log_softmax(teacher[:rows].double(), -1)
    ref = {
        "student_entropy": -(ls.exp() * ls).sum(-1),
        "kl_forward": (lt.exp() * (lt - ls)).sum(-1),
        "kl_reverse": (ls.exp() * (ls - lt)).sum(-1),
        "compat_mass": lt.exp().gather(1, student[:rows].topk(k, -1).indices).sum(-1),
    }
    return {key: float((sig[key][:rows].double() - val).abs().max()) for key, val in ref.items()}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4096, help="rows (tokens)")
    ap.add_argument("--v", type=int, default=151_936, help="vocabulary size")
    ap.add_argument("--k", type=int, default=16, help="top-K size")
    ap.add_argument("--chunk-size", type=int, default=None,
                    help=f"rows per chunk (default: token_signals' own, {DEFAULT_CHUNK_LOGITS} // V)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of each (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-floor", action="store_true",
                    help="time and measure token_signals only (e.g. N=8192: the floor's outputs need 20 GB)")
    args = ap.parse_args()
    args.chunk_size = args.chunk_size or max(1, min(DEFAULT_CHUNK_LOGITS // args.v, args.n))
    return args


def compare_times(student, teacher, args) -> None:
    """Interleaved timing of the floor(s) and token_signals; prints medians and ratios."""
    fns = {"signals": lambda: token_signals(student, teacher, args.k, chunk_size=args.chunk_size)}
    labels = {"signals": "token_signals"}
    token_signals(student[:64], teacher[:64], args.k, chunk_size=args.chunk_size)  # warm-up
    if not args.no_floor:
        out_buffers = (torch.empty_like(student), torch.empty_like(teacher))
        floor_fn(student[:64], teacher[:64])
        floor_fn(student, teacher, out_buffers)  # touches the preallocated pages once
        fns = {"floor": lambda: floor_fn(student, teacher),
               "floor_out": lambda: floor_fn(student, teacher, out_buffers), **fns}
        labels = {"floor": "floor: log_softmax x2", "floor_out": "log_softmax x2, out= buffers", **labels}
    times = time_interleaved(fns, args.repeats)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    for name, label in labels.items():
        print(f"{label:30s} median {med[name]:7.3f} s  {[f'{x:.3f}' for x in times[name]]}")
    if not args.no_floor:
        print(f"ratio token_signals / floor: {med['signals'] / med['floor']:.2f} (target <= 2.0); "
              f"/ out= floor (no output allocation): {med['signals'] / med['floor_out']:.2f}")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, load average "
          f"{os.getloadavg()[0]:.1f}, N={args.n}, V={args.v}, k={args.k}, chunk_size={args.chunk_size}")
    t0 = time.perf_counter()
    student, teacher = make_logits(args.n, args.v, args.seed)
    size_gib = student.numel() * 4 / 2**30
    print(f"inputs: 2 x {size_gib:.2f} GiB float32, built in {time.perf_counter() - t0:.1f} s")
    compare_times(student, teacher, args)

    sig = None

    def keep_sig():
        nonlocal sig
        sig = token_signals(student, teacher, args.k, chunk_size=args.chunk_size)
        return sig

    peak_sig = peak_extra_mb(keep_sig)
    peak_floor = float("nan") if args.no_floor else peak_extra_mb(lambda: floor_fn(student, teacher))
    print(f"peak RSS over inputs: floor {peak_floor:.0f} MB, token_signals {peak_sig:.0f} MB "
          f"(work buffers 5 x chunk x V float32 = {5 * args.chunk_size * args.v * 4 / 2**20:.0f} MB)")
    print(f"mean entropy: student {sig['student_entropy'].mean():.2f}, teacher "
          f"{sig['teacher_entropy'].mean():.2f} nats; mean D {sig['disagreement'].mean():.3f}, "
          f"mean C {sig['compat_mass'].mean():.3f}")
    errs = float64_errors(student, teacher, sig, args.k)
    print("max abs error vs float64 on 8 rows: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))


if __name__ == "__main__":
    main()
