"""TA-OPD training: one readable recipe (setup, step, evaluate, save), after torchtune's KD recipe.

A run trains one student per arm = (selector, ratio, seed) (`TrainConfig.arms`): full-token OPD at
ratio 1.0 and each other selector at each ratio, every arm with the same prompt stream per seed, the
same number of steps and the same rollouts per step. One step (`train_step`):

  1. prompts: the next `batch_size` training problems of the seed's stream (data position =
     (step - 1) * batch_size; this process takes its contiguous share);
  2. rollouts: the live student samples `samples_per_prompt` responses per prompt
     (`diagnostics.rollouts.generate_rollouts`, HF backend on the in-memory model);
  3. scoring: teacher and student logits on prompt + response, no grad, sliced to the shared
     vocabulary V, in position chunks -> `diagnostics.signals.token_signals`
     (`diagnostics.scoring.score_rollouts_hf`); log pS_old(y_t) and log pT(y_t) come from here too;
  4. selection (`select_kept`): `selection_scores` + `select` with the SAME score registry as the
     diagnostic, over the whole rollout batch (signals gathered from every process), at least
     `min_per_sequence` kept positions per response;
  5. `opd_step`: the registered loss at the kept positions only (`opd.batch.KeptPositionLM`: the
     LM head runs on kept rows only), normalised by the GLOBAL kept count (or per sequence), backward;
  6. finite checks, then the optimizer step (AdamW).
Every `eval_every` steps: greedy held-out exact match and KL(pT||pS) on the common bank
(`opd.evaluation`); every `checkpoint_every` steps: an atomic checkpoint (`opd.checkpoint`). After an
arm: the live selector check (G on the common bank, the engine's checkpoint protocol). After all
arms: metrics.parquet, comparison.parquet/.md (`opd.report`) and manifest.json in
`<out_dir>/<run>/`. `--resume` continues a killed run from each arm's last checkpoint.

Simplifications, and what a GPU deployment would change (none of it is tested here: no GPU):
* Rollouts use HF `generate` on the live student, on every device. On a GPU cluster they would use
  vLLM colocated with training (one engine per process, `enable_sleep_mode=True`, sleeping during the
  update and woken with fresh weights loaded after each optimizer step); the teacher could be a
  separate vLLM server queried in top-K mode (`diagnostics.scoring.score_rollouts_vllm`,
  `token_signals_topk`: D with the 1e-12 floor, C as its lower bound). Only the hf path is built.
* Under FSDP (`configs/accelerate_fsdp.yaml`) generation and checkpointing would need the full
  parameters gathered (`FSDP.summon_full_params` / `accelerator.get_state_dict`); this recipe reads
  the unwrapped module directly, which is right for one process and DDP only.
* Held-out evaluation is split over processes and summed; the live gain runs on rank 0 only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from diagnostics import engine
from diagnostics.config import ConfigError, config_to_dict, load_config
from diagnostics.diagnose import make_bank
from diagnostics.files import write_json, write_parquet
from diagnostics.models import check_pair, directory_hash, load_model, resolve_dtype, tokenizer_hash
from diagnostics.rollouts import SamplingConfig, generate_rollouts
from diagnostics.scoring import score_rollouts_hf
from diagnostics.signals import select, selection_scores
from diagnostics.task import Problem, load_problems, sort_problems
from opd.batch import KeptPositionLM, TrainBatch, check_head_path, kept_index
from opd.checkpoint import latest_checkpoint, load_checkpoint, remove_checkpoints, save_checkpoint
from opd.config import Arm, TrainConfig
from opd.distributed import World
from opd.evaluation import evaluate, live_gains
from opd.logger import NullLogger, make_logger
from opd.losses import LossInputs, get_loss, token_weights
from opd.memory import peak_mb, reset_peak
from opd.report import comparison_table, to_markdown

DEFAULT_K_REAL = 16  # the paper's top-K for real (Qwen-sized) vocabularies
TRAIN_PROMPT_SEED = 3_000_000  # training prompt stream of seed s: sort_problems(seed=TRAIN_PROMPT_SEED + s)
EVAL_SPLIT_SEED = 0  # held-out problems for exact match (the testbed report's split)
BANK_SPLIT_SEED = 2  # held-out prompts of the common bank (the diagnostic's bank split)
BANK_SAMPLING_SEED = 0


class NonFiniteError(RuntimeError):
    """A loss or gradient was NaN or infinite; the message names the step and what was non-finite."""


def _seed(*keys: int | str) -> int:
    """A 32-bit seed for a stream named by integers and strings (independent streams, no collisions)."""
    ints = [k if isinstance(k, int) else int.from_bytes(k.encode()[:8].ljust(8, b"\0"), "little") for k in keys]
    return int(np.random.SeedSequence(ints).generate_state(1, np.uint32)[0])


# ------------------------------------------------------------------------------------------ setup


@dataclass
class RunContext:
    """Everything the arms of a run share (built once by `setup_run`)."""

    config: TrainConfig
    world: World
    logger: NullLogger
    run_dir: Path
    student_path: str
    teacher_path: str
    tokenizer: object
    vocab_size: int
    k: int
    max_new_tokens: int
    stop_ids: list[int]
    dtype: torch.dtype
    teacher: KeptPositionLM  # frozen, eval mode
    eval_problems: list[Problem]  # prompts rendered (chat template applied)
    bank: engine.BankTensors
    base_eval: dict[str, float]
    train_texts: dict[int, list[str]] = field(default_factory=dict)  # seed -> rendered prompts, steps * batch_size


def render_text(tokenizer, text: str) -> str:
    """The prompt as the model sees it: through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None) is None:
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)


def resolve_pair(config: TrainConfig) -> tuple[str, str, int, int, object | None]:
    """(student path, teacher path, top-K, max_new_tokens, testbed or None)."""
    if config.student:
        return config.student, config.teacher, config.k or DEFAULT_K_REAL, config.max_new_tokens or 256, None
    from diagnostics.testbed import TestbedConfig, build_testbed

    testbed = build_testbed(load_config(TestbedConfig, config.testbed_config), progress=False)
    tb = testbed.config
    return testbed.student_path, testbed.teacher_path, config.k or tb.k, config.max_new_tokens or tb.max_new_tokens, testbed


def heldout(config: TrainConfig, testbed, n: int, split_seed: int) -> list[Problem]:
    """Held-out problems: the testbed's split `split_seed`, or the first n of `eval_prompts`."""
    if testbed is not None:
        from diagnostics.testbed import heldout_problems

        return heldout_problems(testbed.config, n, split_seed=split_seed)
    problems = load_problems(config.eval_prompts)
    if split_seed == BANK_SPLIT_SEED:  # the bank takes the file's last prompts, evaluation its first
        return problems[-n:]
    return problems[:n]


def training_texts(config: TrainConfig, testbed, seed: int, tokenizer) -> list[str]:
    """The seed's prompt stream, steps * batch_size rendered prompts (never the held-out seeds)."""
    n = config.steps * config.batch_size
    if testbed is not None:
        tb = testbed.config
        problems = sort_problems(n, seed=TRAIN_PROMPT_SEED + seed, n_items=tb.n_items, n_words=tb.n_words)
    else:
        pool = load_problems(config.prompts)
        order = np.concatenate([np.random.default_rng(TRAIN_PROMPT_SEED + seed + e).permutation(len(pool)) for e in range(-(-n // len(pool)))])
        problems = [pool[i] for i in order[:n]]
    return [render_text(tokenizer, p.prompt) for p in problems]


def prepare_run_dir(run_dir: Path, config: TrainConfig, resume: bool, world: World) -> None:
    """A fresh run directory, or (with resume) one holding the same config; errors name the keys."""
    saved_path = run_dir / "config.json"
    if saved_path.is_file():
        if not resume:
            raise FileExistsError(f"{run_dir} already holds a run: pass --resume to continue it, or run_name=<new name> for a new one")
        saved = json.loads(saved_path.read_text())
        current = config.fingerprint()
        differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if differing:
            detail = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differing)
            raise ConfigError(f"--resume: {run_dir} was run with a different config (differing keys: {detail})")
    elif resume:
        raise FileNotFoundError(f"--resume: {run_dir} holds no run to resume")
    world.barrier()  # every rank has checked before rank 0 writes
    if world.is_main:
        write_json(saved_path, config.fingerprint())
    world.barrier()


def build_bank(student_path: str, tokenizer, problems: list[Problem], config: TrainConfig, max_new_tokens: int, vocab_size: int, path: Path, world: World) -> engine.BankTensors:
    """The common bank: held-out rollouts of the BASE student, frozen in bank.parquet (rank 0 writes)."""
    if world.is_main and not path.is_file():
        sampling = SamplingConfig(temperature=config.temperature, top_p=config.top_p, max_new_tokens=max_new_tokens, n=1, seed=BANK_SAMPLING_SEED)
        rollouts = generate_rollouts(student_path, tokenizer, [p.prompt for p in problems], sampling, backend="hf", chat_template=False, device=str(world.device), progress=False)
        write_parquet(path, make_bank(rollouts, config.bank_max_tokens, vocab_size))
    world.barrier()
    bank = pd.read_parquet(path)
    ids = {name: [[int(t) for t in row] for row in bank[name]] for name in ("prompt_ids", "response_ids")}
    return engine.bank_tensors(ids["prompt_ids"], ids["response_ids"], tokenizer.pad_token_id or 0)


def setup_run(config: TrainConfig, *, resume: bool = False) -> RunContext:
    """Models, data and the run directory; the base student's evaluation (cached in base_eval.json)."""
    world = World.create(config.device)
    if world.device.type == "cpu" and config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    logger = make_logger(world.is_main, config.progress)
    student_path, teacher_path, k, max_new_tokens, testbed = resolve_pair(config)
    tokenizer, vocab_size = check_pair(student_path, teacher_path)  # raises on a mismatched pair
    run_dir = Path(config.out_dir) / config.run_id()
    prepare_run_dir(run_dir, config, resume, world)
    dtype = resolve_dtype(config.dtype, world.device)
    teacher_model = load_model(teacher_path, world.device, dtype)
    for p in teacher_model.parameters():
        p.requires_grad_(False)
    teacher = KeptPositionLM(teacher_model, vocab_size).eval()
    check_head_path(teacher_model, torch.tensor([[tokenizer.eos_token_id or 0] * 4], device=world.device))
    problems = [dataclasses.replace(p, prompt=render_text(tokenizer, p.prompt)) for p in heldout(config, testbed, config.eval_problems, EVAL_SPLIT_SEED)]
    bank_prompts = [dataclasses.replace(p, prompt=render_text(tokenizer, p.prompt)) for p in heldout(config, testbed, config.bank_sequences, BANK_SPLIT_SEED)]
    bank = build_bank(student_path, tokenizer, bank_prompts, config, max_new_tokens, vocab_size, run_dir / "bank.parquet", world)
    stop_ids = sorted({tokenizer.eos_token_id} - {None})
    ctx = RunContext(config, world, logger, run_dir, student_path, teacher_path, tokenizer, vocab_size, k, max_new_tokens, stop_ids, dtype, teacher, problems, bank, {})
    ctx.train_texts = {seed: training_texts(config, testbed, seed, tokenizer) for seed in config.seeds}
    ctx.base_eval = base_evaluation(ctx)
    return ctx


def base_evaluation(ctx: RunContext) -> dict[str, float]:
    """The base student's accuracy and KL (the step-0 row of every arm), computed once per run."""
    path = ctx.run_dir / "base_eval.json"
    if path.is_file():
        return json.loads(path.read_text())
    student = load_model(ctx.student_path, ctx.world.device, ctx.dtype)
    reset_peak(ctx.world.device)
    result = evaluate(student, ctx.teacher.model, ctx.tokenizer, ctx.eval_problems, ctx.bank, ctx.vocab_size, ctx.max_new_tokens, ctx.world)
    result["peak_mem_mb"] = peak_mb(ctx.world.device)
    if ctx.world.is_main:
        write_json(path, result)
    ctx.world.barrier()
    return result


# ------------------------------------------------------------------------------------------ step


def select_kept(signals: dict[str, torch.Tensor], valid: torch.Tensor, arm: Arm, min_per_sequence: int, world: World, seed: int) -> torch.Tensor:
    """[b, T] kept mask of this process, selected over the WHOLE batch of every process.

    signals: [b, T] "student_entropy", "disagreement", "compat_mass"; valid: [b, T] bool. The
    gathered [B, T'] signals are identical on every rank, so every rank selects the same mask.
    """
    local = torch.stack([signals["student_entropy"], signals["disagreement"], signals["compat_mass"], valid.float()], dim=-1)  # [b, T, 4]
    every = world.gather_rows(local)  # [B, T', 4], rank order
    valid_all = every[..., 3] > 0
    names = ("student_entropy", "disagreement", "compat_mass")
    scores = selection_scores({n: every[..., i] for i, n in enumerate(names)}, valid_all, seed=seed)
    keep = select(scores[arm.selector], valid_all, arm.ratio, min_per_sequence=min_per_sequence)  # [B, T']
    return keep[world.local_rows(keep.shape[0]), : valid.shape[1]]


def _nonfinite_report(out: torch.Tensor, inputs: LossInputs, rows: torch.Tensor, pos: torch.Tensor) -> str:
    bad = ~torch.isfinite(out)
    first = int(bad.nonzero()[0, 0])
    parts = [f"per-token loss non-finite at {int(bad.sum())} of {len(out)} kept positions (first: local sequence {int(rows[first])}, response position {int(pos[first])})"]
    for name, value in (("student log-probs", inputs.student_logprobs), ("old log-probs", inputs.old_logprobs),
                        ("teacher token log-probs", inputs.teacher_token_logprobs), ("teacher log-probs", inputs.teacher_logprobs)):
        if value is not None:
            finite = bool(torch.isfinite(value).all()) if name != "teacher log-probs" else not bool(torch.isnan(value).any() | torch.isposinf(value).any())
            parts.append(f"{name} {'finite' if finite else 'NON-FINITE'}")
    return "; ".join(parts)


def opd_step(model: torch.nn.Module, teacher: KeptPositionLM, batch: TrainBatch, signals: dict[str, torch.Tensor], keep: torch.Tensor, config: TrainConfig, world: World) -> dict[str, float]:
    """The math of one step: the loss at kept positions, normalised over the global batch, backward.

    Args:
        model: the student's `KeptPositionLM` (possibly DDP-wrapped), in train mode.
        teacher: the teacher's `KeptPositionLM` (frozen); run at kept positions for full-vocabulary losses.
        batch: this process's B rollouts. signals: [B, T] "student_logprob_sampled" = log pS_old(y_t)
            and "teacher_logprob_sampled" = log pT(y_t) (from scoring, no grad).
        keep: [B, T] bool, this process's kept positions (a subset of batch.valid).
    Gradients accumulate in .grad (micro-batch by micro-batch); the caller steps the optimizer.
    Returns {"loss": the global batch loss, "kept_tokens": global kept count, "clip_fraction"}.
    """
    spec = get_loss(config.loss)
    kept_per_seq = keep.sum(dim=1)  # [B]
    n_kept = int(world.sum(kept_per_seq.sum()))  # GLOBAL: every process and every micro-batch
    n_seq = int(world.sum((kept_per_seq > 0).sum()))  # sequences with a kept position, global
    micro = config.micro_batch_size or len(batch)
    starts = list(range(0, len(batch), micro))
    old_lp, teacher_lp = signals["student_logprob_sampled"], signals["teacher_logprob_sampled"]
    loss_sum = clipped = 0.0
    for i, start in enumerate(starts):
        part = slice(start, start + micro)
        mb = batch.rows(part).to(world.device)
        rows, pos, cols = kept_index(mb, keep[part].to(world.device))  # [n] each, n kept in this micro-batch
        with world.no_sync(model, skip=i < len(starts) - 1):  # all-reduce gradients once, after the last
            student_lp = torch.log_softmax(model(mb.ids, mb.attention_mask, rows, cols).float(), dim=-1)  # [n, V]
            teacher_full = None
            if spec.needs_teacher_full:
                with torch.no_grad():
                    teacher_full = torch.log_softmax(teacher(mb.ids, mb.attention_mask, rows, cols).float(), dim=-1)  # [n, V]
            inputs = LossInputs(
                student_logprobs=student_lp,
                targets=mb.targets[rows, pos],
                old_logprobs=old_lp[part].to(world.device)[rows, pos],
                teacher_token_logprobs=teacher_lp[part].to(world.device)[rows, pos],
                teacher_logprobs=teacher_full,
                clip_low=config.clip_low,
                clip_high=config.clip_high,
            )
            out = spec.fn(inputs)
            local_bad = int((~torch.isfinite(out["loss"])).sum())
            if world.sum(local_bad):  # every process stops at the same micro-batch (no hung all-reduce)
                raise NonFiniteError(_nonfinite_report(out["loss"], inputs, rows + start, pos) if local_bad else "per-token loss non-finite on another process")
            weights = token_weights(rows, config.normalization, n_kept, n_seq, kept_per_seq[part].to(world.device))  # [n]
            loss = (weights.to(out["loss"].device) * out["loss"]).sum()
            world.backward(loss * world.size)  # DDP averages over processes; x size makes it the global sum
        loss_sum += float(loss.detach())
        clipped += float(out["clipped"].sum()) if "clipped" in out else 0.0
    return {"loss": world.sum(loss_sum), "kept_tokens": n_kept, "clip_fraction": world.sum(clipped) / max(n_kept, 1)}


def train_step(ctx: RunContext, arm: Arm, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> dict:
    """Prompts -> rollouts -> scoring -> selection -> `opd_step` -> optimizer step. Returns the step's stats."""
    config, world = ctx.config, ctx.world
    student = world.unwrap(model).model
    texts = ctx.train_texts[arm.seed][(step - 1) * config.batch_size : step * config.batch_size]
    texts = texts[world.local_rows(len(texts))]
    sampling = SamplingConfig(config.temperature, config.top_p, ctx.max_new_tokens, config.samples_per_prompt, seed=_seed(arm.seed, step, world.rank, "rollout"))
    rollouts = generate_rollouts(student, ctx.tokenizer, texts, sampling, backend="hf", chat_template=False, progress=False)
    scored = score_rollouts_hf(rollouts, student=student, teacher=ctx.teacher.model, vocab_size=ctx.vocab_size, stop_ids=ctx.stop_ids, k=ctx.k, max_tokens_per_batch=config.scoring_tokens, progress=False)
    student.train()
    batch = TrainBatch.from_ids([[int(t) for t in p] for p in rollouts["prompt_ids"]], [[int(t) for t in r] for r in rollouts["response_ids"]], scored.valid, ctx.tokenizer.pad_token_id or 0)
    keep = select_kept(scored.signals, scored.valid, arm, config.min_per_sequence, world, seed=_seed(arm.seed, step, "select"))
    stats = opd_step(model, ctx.teacher, batch, scored.signals, keep, config, world)
    grad_norm = world.clip_grad_norm(model.parameters(), config.max_grad_norm)
    if not math.isfinite(grad_norm):
        raise NonFiniteError(f"gradient norm is {grad_norm} (loss {stats['loss']:.6g} was finite)")
    if stats["kept_tokens"] > 0:  # nothing kept (possible for Q3 selectors): no update at all
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {**stats, "valid_tokens": int(world.sum(scored.valid.sum()))}


# ------------------------------------------------------------------------------------------ arms


def metric_row(arm: Arm, step: int, **values) -> dict:
    """One metrics.parquet row; accuracy and kl_to_teacher are NaN at steps without evaluation."""
    row = {"step": step, "selector": arm.selector, "ratio": arm.ratio, "seed": arm.seed, "loss": math.nan, "kept_tokens": 0,
           "accuracy": math.nan, "kl_to_teacher": math.nan, "wall_time_s": 0.0, "peak_mem_mb": math.nan, "valid_tokens": 0}
    row.update(values)
    return row


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=tuple(config.betas))


def train_arm(ctx: RunContext, arm: Arm, *, progress: bool = True) -> None:
    """Train one arm from scratch or from its last checkpoint; writes arms/<arm>/ when done."""
    config, world = ctx.config, ctx.world
    arm_dir = ctx.run_dir / "arms" / arm.name
    if (arm_dir / "result.json").is_file():
        return
    torch.manual_seed(_seed(arm.seed, "init"))
    np.random.seed(_seed(arm.seed, "numpy"))
    student = load_model(ctx.student_path, world.device, ctx.dtype).train()
    model, optimizer = world.prepare(KeptPositionLM(student, ctx.vocab_size), make_optimizer(student, config))
    metrics = [metric_row(arm, 0, **{k: ctx.base_eval[k] for k in ("accuracy", "kl_to_teacher", "peak_mem_mb")})]
    state = {"step": 0, "data_position": 0, "train_seconds": 0.0}
    checkpoint = latest_checkpoint(arm_dir)
    if checkpoint is not None:
        state, metrics = load_checkpoint(checkpoint, student, optimizer, world)
        ctx.logger.info(f"[{arm.name}] resumed from {checkpoint} (step {state['step']})")
    bar = tqdm(range(state["step"] + 1, config.steps + 1), desc=arm.name, leave=False, disable=not (progress and world.is_main))
    for step in bar:
        started = time.perf_counter()
        reset_peak(world.device)
        try:
            stats = train_step(ctx, arm, model, optimizer, step)
        except NonFiniteError as err:
            path = save_checkpoint(arm_dir, step - 1, student, optimizer, state, metrics, world)
            if world.is_main:
                write_json(arm_dir / "nonfinite.json", {"step": step, "what": str(err), "checkpoint": str(path)})
            raise NonFiniteError(f"{arm.name}: step {step}: {err}; training stopped, last good state saved in {path}") from None
        state = {"step": step, "data_position": step * config.batch_size, "train_seconds": state["train_seconds"] + time.perf_counter() - started}
        row = metric_row(arm, step, loss=stats["loss"], kept_tokens=stats["kept_tokens"], valid_tokens=stats["valid_tokens"],
                         wall_time_s=state["train_seconds"], peak_mem_mb=peak_mb(world.device))
        if step % config.eval_every == 0 or step == config.steps:
            row.update(evaluate(student, ctx.teacher.model, ctx.tokenizer, ctx.eval_problems, ctx.bank, ctx.vocab_size, ctx.max_new_tokens, world))
            student.train()
        metrics.append(row)
        ctx.logger.log(row)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", kept=stats["kept_tokens"])
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
            save_checkpoint(arm_dir, step, student, optimizer, state, metrics, world)
    finish_arm(ctx, arm, arm_dir, student, metrics)
    world.release()


def finish_arm(ctx: RunContext, arm: Arm, arm_dir: Path, student: torch.nn.Module, metrics: list[dict]) -> None:
    """Live gain on the common bank, the final student, the arm's metrics; result.json marks it done."""
    world = ctx.world
    if world.is_main:
        base = load_model(ctx.student_path, world.device, ctx.dtype)
        gains = live_gains(base, student.eval(), ctx.teacher.model, ctx.bank, ctx.vocab_size)
        write_parquet(arm_dir / "live_gain.parquet", gains)
        if ctx.config.save_students:
            tmp = arm_dir / ".student.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            student.save_pretrained(tmp)
            ctx.tokenizer.save_pretrained(tmp)
            shutil.rmtree(arm_dir / "student", ignore_errors=True)
            tmp.rename(arm_dir / "student")
        frame = pd.DataFrame(metrics)
        write_parquet(arm_dir / "metrics.parquet", frame)
        live = float(gains["gain_sum"].sum() / gains["n_tokens"].sum())
        write_json(arm_dir / "result.json", {"arm": arm.name, "live_gain": live, "valid_tokens": int(frame["valid_tokens"].sum()),
                                             "kept_tokens": int(frame["kept_tokens"].sum())})
        remove_checkpoints(arm_dir)
    world.barrier()


# ------------------------------------------------------------------------------------------ run


def collect(ctx: RunContext) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(metrics of every arm, comparison table) from the arms' files."""
    frames, gains, valid = [], {}, {}
    for arm in ctx.config.arms():
        arm_dir = ctx.run_dir / "arms" / arm.name
        frames.append(pd.read_parquet(arm_dir / "metrics.parquet"))
        gains[(arm.selector, arm.ratio, arm.seed)] = pd.read_parquet(arm_dir / "live_gain.parquet")
        valid[(arm.selector, arm.ratio, arm.seed)] = json.loads((arm_dir / "result.json").read_text())["valid_tokens"]
    metrics = pd.concat(frames, ignore_index=True)
    metrics = metrics.astype({"step": "int64", "seed": "int64", "kept_tokens": "int64", "valid_tokens": "int64", "ratio": "float64"})
    return metrics, comparison_table(metrics, gains, valid)


def build_manifest(ctx: RunContext, seconds: float) -> dict:
    from importlib import metadata

    from diagnostics.store import package_versions

    config = ctx.config
    versions = package_versions()
    versions["accelerate"] = metadata.version("accelerate")
    return {
        "run_name": config.run_id(),
        "kind": "train",
        "synthetic": False,
        "student_path": ctx.student_path,
        "teacher_path": ctx.teacher_path,
        "student_hash": directory_hash(ctx.student_path),
        "teacher_hash": directory_hash(ctx.teacher_path),
        "tokenizer_hash": tokenizer_hash(ctx.tokenizer),
        "selectors": config.selectors,
        "ratios": config.ratios,
        "seeds": config.seeds,
        "steps": config.steps,
        "loss": config.loss,
        "normalization": config.normalization,
        "normalization_meaning": {
            "kept_global": "sum over kept positions / kept positions in the whole batch (all processes, all micro-batches)",
            "per_sequence_mean": "mean over each sequence's kept positions, then over sequences with a kept position",
        }[config.normalization],
        "signal_mode": "exact",
        "k": ctx.k,
        "vocab_size": ctx.vocab_size,
        "rollout_backend": "hf",
        "old_logprobs": "student log-probs from the scoring pass (no grad), before the update",
        "kl_to_teacher": "mean forward KL(pT||pS) per token on the common bank (base-student held-out rollouts)",
        "live_gain": "engine.checkpoint_gains(base, trained) on the common bank; CI: t over seeds (>= 2 seeds), else cluster bootstrap over sequences",
        "peak_mem": "CUDA max allocated" if ctx.world.device.type == "cuda" else "process RSS high-water mark per step (VmHWM, reset each step)",
        "prompt_seed_base": TRAIN_PROMPT_SEED,
        "eval_split_seed": EVAL_SPLIT_SEED,
        "bank_split_seed": BANK_SPLIT_SEED,
        "world_size": ctx.world.size,
        "device": str(ctx.world.device),
        "dtype": str(ctx.dtype).removeprefix("torch."),
        "versions": versions,
        "config": config_to_dict(config),
        "seconds": round(seconds, 1),
    }


def run_training(config: TrainConfig, *, resume: bool = False) -> Path:
    """Run (or with `resume`, continue) every arm; returns the run directory."""
    started = time.perf_counter()
    ctx = setup_run(config, resume=resume)
    arms = config.arms()
    ctx.logger.info(f"run {ctx.run_dir}: {len(arms)} arms x {config.steps} steps x {config.batch_size * config.samples_per_prompt} rollouts "
                    f"(base student: accuracy {ctx.base_eval['accuracy']:.3f}, KL(T||S) {ctx.base_eval['kl_to_teacher']:.4f})")
    for arm in tqdm(arms, desc="arms", disable=not (config.progress and ctx.world.is_main)):
        train_arm(ctx, arm, progress=config.progress)
    if ctx.world.is_main:
        metrics, comparison = collect(ctx)
        write_parquet(ctx.run_dir / "metrics.parquet", metrics)
        write_parquet(ctx.run_dir / "comparison.parquet", comparison)
        markdown = to_markdown(comparison, title=f"{config.run_id()}: selector comparison ({config.loss}, {config.normalization})")
        (ctx.run_dir / "comparison.md").write_text(markdown)
        write_json(ctx.run_dir / "manifest.json", build_manifest(ctx, time.perf_counter() - started))
        ctx.logger.info(markdown)
    ctx.world.barrier()
    return ctx.run_dir


def main(argv: list[str] | None = None) -> int:
    """`python -m opd.trainer [--config FILE] [--resume] [key=value ...]` (also under `accelerate launch`)."""
    parser = argparse.ArgumentParser(prog="opd.trainer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/train.yaml")
    parser.add_argument("--resume", action="store_true", help="continue the run in the config's run directory")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    try:
        config = load_config(TrainConfig, args.config, args.overrides)
        run_dir = run_training(config, resume=args.resume)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, NonFiniteError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"run: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
