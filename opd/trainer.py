"""TA-OPD training: one readable recipe (setup, step, evaluate, save), after torchtune's KD recipe.

A run trains one student per arm = (selector, ratio, seed) (`TrainConfig.arms`): full-token OPD at
ratio 1.0 and each other selector at each ratio, every arm with the same prompt stream per seed, the
same number of steps and the same rollouts per step. One step (`train_step`):

  1. prompts: the next `batch_size` training problems of the seed's stream (data position =
     (step - 1) * batch_size; this process takes its contiguous share);
  2. rollouts: the live student samples `samples_per_prompt` responses per prompt
     (`opd.rollout_engine`, `rollout_backend`: HF generate on the in-memory model, or a vLLM engine colocated
     in this process whose weights are loaded from the student after every optimizer step);
  3. scoring: teacher and student logits on prompt + response, no grad, sliced to the shared
     vocabulary V, in position chunks -> `diagnostics.signals.token_signals`
     (the `hf` backend's `score`, `diagnostics.generation.hf.score_rollouts_hf`); log pS_old(y_t) and log pT(y_t)
     come from here too (at temperature T != 1 those of log_softmax(logits / T): `opd.step.TEMPERATURE_CONVENTION`);
  4. selection (`opd.step.select_kept`): `selection_scores` + `select` with the SAME score registry as the
     diagnostic, over the whole rollout batch (signals gathered from every process), at least
     `min_per_sequence` kept positions per response, under the run's named selection options
     (`TrainConfig.selection_options`; `preset: paper` = the release's, `opd.config`);
  5. `opd.step.opd_step`: the registered loss at the kept positions only (`diagnostics.lm.forward.PositionLM`: the
     LM head runs on kept rows only), normalised by the GLOBAL kept count (or per sequence), backward;
  6. finite checks, then the optimizer step (`opd.optim`: adamw | adam | paper, the release's Megatron Adam).
Every `eval_every` steps: greedy held-out exact match and KL(pT||pS) on the common bank
(`opd.monitor`); every `checkpoint_every` steps: an atomic checkpoint (`opd.checkpoint`). After an
arm: the live selector check (G on the common bank, the engine's checkpoint protocol). After all
arms: the raw tables metrics.parquet and live_gain.parquet, and manifest.json in `<out_dir>/<run>/`
(`taopd train` adds comparison.parquet/.md from `analysis.training`). `--resume` continues a killed
run from each arm's last checkpoint.

Simplifications, and what a GPU deployment would change (none of it is tested here: no GPU):
* Precision (`mixed_precision`, `diagnostics.lm.precision`): on CUDA the student keeps float32 master weights and
  runs its forwards (rollouts, scoring, the loss, evaluation) under bf16 autocast; the teacher is stored in `dtype`.
* `rollout_backend: vllm` runs one colocated engine for one process (sleeping during the update on CUDA); with
  several processes only hf is built. The teacher could be a separate vLLM server queried in top-K mode
  (`diagnostics.generation.vllm.score_rollouts_vllm`, `token_signals_topk`); only exact (HF) teacher scoring is
  built.
* Under FSDP (`configs/accelerate_fsdp.yaml`) generation and checkpointing would need the full
  parameters gathered (`FSDP.summon_full_params` / `accelerator.get_state_dict`); this recipe reads
  the unwrapped module directly, which is right for one process and DDP only.
* Held-out evaluation is split over processes and summed; the live gain runs on rank 0 only.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from diagnostics.bank import bank_batch, make_bank, read_bank
from diagnostics.core.files import read_json, share_tree, write_json, write_parquet
from diagnostics.core.lock import release_run_lock
from diagnostics.core.progress import progress_bar
from diagnostics.core.rundir import claim_run_dir
from diagnostics.core.seeds import derive_seed
from diagnostics.data.problems import Problem
from diagnostics.data.prompts import render_text
from diagnostics.generation.backends import SamplingConfig, get_backend
from diagnostics.generation.rollouts import generate_rollouts
from diagnostics.generation.store import package_versions
from diagnostics.lm.forward import PositionLM, ResponseBatch, check_head_path
from diagnostics.lm.models import check_pair, load_model, resolve_dtype
from diagnostics.lm.precision import Precision, inference, position_lm, resolve_precision
from diagnostics.pair import (
    BANK_SPLIT_SEED,
    ResolvedPair,
    check_k,
    check_prompts,
    heldout_problems,
    load_prompts,
    manifest_base,
    resolve_pair,
)
from opd.checkpoint import latest_checkpoint, load_checkpoint, remove_checkpoints, save_checkpoint
from opd.config import Arm, TrainConfig
from opd.distributed import World
from opd.logger import NullLogger, make_logger
from opd.memory import peak_mb, reset_peak
from opd.monitor import evaluate, live_gains
from opd.nonfinite import check_weights, stop_arm, stop_together
from opd.optim import make_optimizer, optimizer_record  # make_optimizer: also imported from here by others
from opd.rollout_engine import RolloutEngine
from opd.step import TEMPERATURE_CONVENTION, NonFiniteError, opd_step, select_kept, select_weights

# training prompt stream of seed s: the testbed task's problems(seed=TRAIN_PROMPT_SEED + s)
TRAIN_PROMPT_SEED = 3_000_000
EVAL_SPLIT_SEED = 0  # held-out problems for exact match (the testbed report's split)
BANK_SAMPLING_SEED = 0
BACKEND = "hf"  # rollouts and scoring on the live in-memory student (see the module docstring)
LIVE_GAIN_COLUMNS = ["selector", "ratio", "seed", "seq", "gain_sum", "n_tokens"]  # live_gain.parquet of a run


# ------------------------------------------------------------------------------------------ setup


@dataclass
class RunContext:
    """Everything the arms of a run share (built once by `setup_run`)."""

    config: TrainConfig
    world: World
    logger: NullLogger
    run_dir: Path
    pair: ResolvedPair  # model paths, top-K, max_new_tokens
    tokenizer: object
    vocab_size: int
    stop_ids: list[int]
    dtype: torch.dtype
    teacher: PositionLM  # frozen, eval mode
    eval_problems: list[Problem]  # prompts rendered (chat template applied)
    bank: ResponseBatch
    base_eval: dict[str, float]
    train_texts: dict[int, list[str]] = field(default_factory=dict)  # seed -> rendered prompts, steps * batch_size
    precision: Precision | None = None  # the trained student's: float32 master weights + autocast, or dtype
    rollouts: RolloutEngine | None = None  # rollout_backend hf | vllm (colocated, synced after each step)


def heldout(config: TrainConfig, pair: ResolvedPair, n: int, split_seed: int, tokenizer) -> list[Problem]:
    """Held-out problems with rendered prompts: the testbed's split `split_seed`, or from
    `eval_prompts` (the common bank takes the file's last prompts, evaluation its first; answers required)."""
    problems = heldout_problems(pair, n, split_seed=split_seed, prompts=config.eval_prompts, key="eval_prompts",
                                from_end=split_seed == BANK_SPLIT_SEED, prompt_column=config.prompt_column,
                                answer_column=config.answer_column, require_answer=True)
    return [dataclasses.replace(p, prompt=render_text(tokenizer, p.prompt, enable_thinking=config.enable_thinking))
            for p in problems]


def training_texts(config: TrainConfig, testbed, seed: int, tokenizer) -> list[str]:
    """The seed's prompt stream, steps * batch_size rendered prompts (never the held-out seeds)."""
    n = config.steps * config.batch_size
    if testbed is not None:
        problems = testbed.config.problems(n, TRAIN_PROMPT_SEED + seed)
    else:
        pool = load_prompts(config.prompts, "prompts", prompt_column=config.prompt_column,
                            answer_column=config.answer_column)
        epochs = range(-(-n // len(pool)))  # one permutation of the pool per epoch
        order = np.concatenate([np.random.default_rng(TRAIN_PROMPT_SEED + seed + e).permutation(len(pool))
                                for e in epochs])
        problems = [pool[i] for i in order[:n]]
    return [render_text(tokenizer, p.prompt, enable_thinking=config.enable_thinking) for p in problems]


def prepare_run_dir(run_dir: Path, config: TrainConfig, resume: bool, world: World) -> None:
    """A fresh run directory, or (with resume) one holding the same config; errors name the keys.
    Rank 0 holds the run's lock (`diagnostics.core.lock`): a second command on the same run refuses."""
    claim_run_dir(run_dir, config.fingerprint(), resume=resume, lock=world.is_main)
    world.barrier()  # every rank has checked before rank 0 writes
    if world.is_main:
        write_json(run_dir / "config.json", config.fingerprint())
    world.barrier()


def build_bank(pair: ResolvedPair, tokenizer, vocab_size: int, problems: list[Problem], config: TrainConfig,
               path: Path, world: World) -> ResponseBatch:
    """The common bank: held-out rollouts of the BASE student, frozen in bank.parquet (rank 0 writes)."""
    if world.is_main and not path.is_file():
        sampling = SamplingConfig(temperature=config.temperature, top_p=config.top_p,
                                  max_new_tokens=pair.max_new_tokens, n=1, seed=BANK_SAMPLING_SEED)
        rollouts = generate_rollouts(pair.student_path, tokenizer, [p.prompt for p in problems], sampling,
                                     backend=BACKEND, chat_template=False, device=str(world.device), progress=False)
        write_parquet(path, make_bank(rollouts, config.bank_max_tokens, vocab_size))
    world.barrier()
    return bank_batch(read_bank(path, vocab_size), tokenizer.pad_token_id)


def setup_run(config: TrainConfig, *, resume: bool = False, claim: bool = True) -> RunContext:
    """Models, data and the run directory; the base student's evaluation (cached in base_eval.json).
    `claim` False: a side-by-side arm process (`train_side_by_side`) whose parent holds the run directory and wrote
    its bank and base evaluation."""
    world = World.create(config.device)
    if world.device.type == "cpu" and config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    logger = make_logger(world.is_main, config.progress)
    pair = resolve_pair(config.student, config.teacher, testbed_config=config.testbed_config, k=config.k,
                        max_new_tokens=config.max_new_tokens, progress=False)
    tokenizer, vocab_size = check_pair(pair.student_path, pair.teacher_path)  # raises on a mismatched pair
    check_k(vocab_size, k=pair.k)
    train_texts = {seed: training_texts(config, pair.testbed, seed, tokenizer) for seed in config.seeds}
    eval_problems = heldout(config, pair, config.eval_problems, EVAL_SPLIT_SEED, tokenizer)  # file too short: now
    bank_problems = heldout(config, pair, config.bank_sequences, BANK_SPLIT_SEED, tokenizer)
    run_dir = Path(config.out_dir) / config.run_id()
    if pair.testbed is None:  # a character a JSONL prompt loses is an error now, not at some arm's step
        check_prompts(tokenizer, [p.prompt for p in eval_problems + bank_problems], config.eval_prompts, rendered=True)
        for seed, texts in train_texts.items():
            check_prompts(tokenizer, texts, f"{config.prompts} (seed {seed}'s stream)", rendered=True)
    if claim:
        prepare_run_dir(run_dir, config, resume, world)
    dtype = resolve_dtype(config.dtype, world.device)
    precision = resolve_precision(config.mixed_precision, dtype, world.device)
    rollout_engine = RolloutEngine(config.rollout_backend, pair.student_path, tokenizer, precision, max_model_len=None,
                                   world_size=world.size)
    teacher_model = load_model(pair.teacher_path, world.device, dtype)
    for p in teacher_model.parameters():
        p.requires_grad_(False)
    teacher = PositionLM(teacher_model, vocab_size).eval()
    check_head_path(teacher_model, torch.tensor([[tokenizer.eos_token_id or 0] * 4], device=world.device))
    ctx = RunContext(
        config=config, world=world, logger=logger, run_dir=run_dir, pair=pair, tokenizer=tokenizer,
        vocab_size=vocab_size, stop_ids=sorted({tokenizer.eos_token_id} - {None}), dtype=dtype, teacher=teacher,
        eval_problems=eval_problems,
        bank=build_bank(pair, tokenizer, vocab_size, bank_problems, config, run_dir / "bank.parquet", world),
        base_eval={},
        train_texts=train_texts,
        precision=precision, rollouts=rollout_engine,
    )
    ctx.base_eval = base_evaluation(ctx)
    return ctx


def base_evaluation(ctx: RunContext) -> dict[str, float]:
    """The base student's accuracy and KL (the step-0 row of every arm), computed once per run."""
    path = ctx.run_dir / "base_eval.json"
    if path.is_file():
        return read_json(path, "the base student's evaluation")
    student = load_model(ctx.pair.student_path, ctx.world.device, ctx.precision.master)  # as the trained students
    reset_peak(ctx.world.device)
    with inference(ctx.precision):
        result = evaluate(student, ctx.teacher.model, ctx.tokenizer, ctx.eval_problems, ctx.bank, ctx.vocab_size,
                          ctx.pair.max_new_tokens, ctx.world, answer_check=ctx.config.answer_check)
    result["peak_mem_mb"] = peak_mb(ctx.world.device)
    if ctx.world.is_main:
        write_json(path, result)
    ctx.world.barrier()
    return result


# ------------------------------------------------------------------------------------------ step


def train_step(ctx: RunContext, arm: Arm, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int) -> dict:
    """Prompts -> rollouts -> scoring -> selection -> `opd_step` -> optimizer step. Returns the step's stats."""
    config, world = ctx.config, ctx.world
    student = world.unwrap(model).model
    texts = ctx.train_texts[arm.seed][(step - 1) * config.batch_size : step * config.batch_size]
    texts = texts[world.local_rows(len(texts))]
    sampling = SamplingConfig(config.temperature, config.top_p, ctx.pair.max_new_tokens, config.samples_per_prompt,
                              seed=derive_seed(arm.seed, step, world.rank, "rollout"))
    local_error = None
    try:  # the local phase: an error here on one process must stop every process (stop_together), not hang them
        rollouts = ctx.rollouts.generate(student, texts, sampling)  # hf, or the colocated vLLM engine (synced)
        if config.save_rollouts:  # the paper protocol's bank is the run's own rollouts (opd.paper_protocol)
            write_parquet(ctx.run_dir / "arms" / arm.name / "rollouts" / f"step_{step:06d}_rank{world.rank}.parquet",
                          rollouts[["prompt_id", "sample_idx", "prompt_ids", "response_ids"]].assign(step=step))
        with inference(ctx.precision):  # old log-probs in the loss forward's precision: the first ratio is 1
            scored = get_backend(BACKEND).score(rollouts, teacher=ctx.teacher.model, k=ctx.pair.k,
                                                stop_ids=ctx.stop_ids, student=student, vocab_size=ctx.vocab_size,
                                                max_tokens_per_batch=config.scoring_tokens,
                                                temperature=config.temperature, progress=False)
    except (RuntimeError, ValueError) as err:
        local_error = err
    stop_together(world, local_error)
    student.train()
    batch = ResponseBatch.from_ids(list(rollouts["prompt_ids"]), list(rollouts["response_ids"]),
                                   ctx.tokenizer.pad_token_id or 0, scored.valid)
    keep = select_kept(scored.signals, scored.valid, arm, config.min_per_sequence, world,
                       seed=derive_seed(arm.seed, step, "select"), options=config.selection_options())
    weights = select_weights(scored.signals, scored.valid, arm, world, seed=derive_seed(arm.seed, step, "select"))
    stats = opd_step(model, ctx.teacher, batch, scored.signals, keep, config, world, weights=weights)
    grad_norm = world.clip_grad_norm(model.parameters(), config.max_grad_norm)
    if not math.isfinite(grad_norm):
        raise NonFiniteError(f"gradient norm is {grad_norm} (loss {stats['loss']:.6g} was finite)")
    if stats["kept_tokens"] > 0:  # nothing kept (possible for Q3 selectors): no update at all
        optimizer.step()
        check_weights(student)  # a finite gradient can still overflow a weight (lr too large)
        ctx.rollouts.sync(student)  # rollout_backend vllm: the next step samples the updated weights
    optimizer.zero_grad(set_to_none=True)
    return {**stats, "valid_tokens": int(world.sum(scored.valid.sum()))}


# ------------------------------------------------------------------------------------------ arms


def metric_row(arm: Arm, step: int, **values) -> dict:
    """One metrics.parquet row; accuracy and kl_to_teacher are NaN at steps without evaluation."""
    row = {"step": step, "selector": arm.selector, "ratio": arm.ratio, "seed": arm.seed, "loss": math.nan,
           "kept_tokens": 0, "accuracy": math.nan, "kl_to_teacher": math.nan, "wall_time_s": 0.0,
           "peak_mem_mb": math.nan, "valid_tokens": 0}
    row.update(values)
    return row


def train_arm(ctx: RunContext, arm: Arm, *, progress: bool = True) -> None:
    """Train one arm from scratch or from its last checkpoint; writes arms/<arm>/ when done."""
    config, world = ctx.config, ctx.world
    arm_dir = ctx.run_dir / "arms" / arm.name
    if (arm_dir / "result.json").is_file():
        return
    torch.manual_seed(derive_seed(arm.seed, "init"))
    np.random.seed(derive_seed(arm.seed, "numpy"))
    student = load_model(ctx.pair.student_path, world.device, ctx.precision.master).train()
    model, optimizer = world.prepare(position_lm(student, ctx.vocab_size, ctx.precision),
                                     make_optimizer(student, config))
    metrics = [metric_row(arm, 0, **{k: ctx.base_eval[k] for k in ("accuracy", "kl_to_teacher", "peak_mem_mb")})]
    state = {"step": 0, "data_position": 0, "train_seconds": 0.0}
    checkpoint = latest_checkpoint(arm_dir)
    if checkpoint is not None:
        state, metrics = load_checkpoint(checkpoint, student, optimizer, world)
        ctx.logger.info(f"[{arm.name}] resumed from {checkpoint} (step {state['step']})")
    ctx.rollouts.sync(student)  # the arm's starting weights (base or checkpoint) into a vllm engine
    bar = progress_bar(range(state["step"] + 1, config.steps + 1), desc=arm.name, leave=False,
                       enabled=progress and world.is_main)
    for step in bar:
        started = time.perf_counter()
        reset_peak(world.device)
        try:
            stats = train_step(ctx, arm, model, optimizer, step)
        except (RuntimeError, ValueError) as err:  # NonFiniteError, or a blow-up surfacing elsewhere (opd.nonfinite)
            stop_arm(err, arm_name=arm.name, step=step, arm_dir=arm_dir, student=student, optimizer=optimizer,
                     state=state, metrics=metrics, world=world, bank=ctx.bank)
        seconds = state["train_seconds"] + time.perf_counter() - started
        state = {"step": step, "data_position": step * config.batch_size, "train_seconds": seconds}
        row = metric_row(arm, step, loss=stats["loss"], kept_tokens=stats["kept_tokens"],
                         valid_tokens=stats["valid_tokens"], wall_time_s=seconds, peak_mem_mb=peak_mb(world.device))
        if step % config.eval_every == 0 or step == config.steps:
            with inference(ctx.precision):
                row.update(evaluate(student, ctx.teacher.model, ctx.tokenizer, ctx.eval_problems, ctx.bank,
                                    ctx.vocab_size, ctx.pair.max_new_tokens, world, answer_check=config.answer_check))
            student.train()
        metrics.append(row)
        ctx.logger.log(row)
        bar.set_postfix(loss=f"{stats['loss']:.4f}", kept=stats["kept_tokens"], refresh=False)  # no line per step
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
            save_checkpoint(arm_dir, step, student, optimizer, state, metrics, world)
    finish_arm(ctx, arm, arm_dir, student, metrics)
    world.release()


def finish_arm(ctx: RunContext, arm: Arm, arm_dir: Path, student: torch.nn.Module, metrics: list[dict]) -> None:
    """Live gain on the common bank, the final student, the arm's metrics; result.json marks it done."""
    world = ctx.world
    if world.is_main:
        base = load_model(ctx.pair.student_path, world.device, ctx.precision.master)
        gains = live_gains(base, student.eval(), ctx.teacher.model, ctx.bank, ctx.vocab_size)
        write_parquet(arm_dir / "live_gain.parquet", gains)
        if ctx.config.save_students:
            tmp = arm_dir / ".student.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            student.save_pretrained(tmp)
            ctx.tokenizer.save_pretrained(tmp)
            share_tree(tmp)  # save_pretrained writes model.safetensors 0600; results follow the umask
            shutil.rmtree(arm_dir / "student", ignore_errors=True)
            tmp.rename(arm_dir / "student")
        frame = pd.DataFrame(metrics)
        write_parquet(arm_dir / "metrics.parquet", frame)
        live = float(gains["gain_sum"].sum() / gains["n_tokens"].sum())
        write_json(arm_dir / "result.json", {"arm": arm.name, "live_gain": live,
                                             "valid_tokens": int(frame["valid_tokens"].sum()),
                                             "kept_tokens": int(frame["kept_tokens"].sum())})
        remove_checkpoints(arm_dir)
    world.barrier()


# ------------------------------------------------------------------------------------------ run


def collect(ctx: RunContext) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The raw per-arm tables of every arm, stacked: (metrics, live gains). The comparison table
    over them is computed by `analysis.training.comparison_table` (the `taopd train` command)."""
    metrics, gains = [], []
    for arm in ctx.config.arms():
        arm_dir = ctx.run_dir / "arms" / arm.name
        metrics.append(pd.read_parquet(arm_dir / "metrics.parquet"))
        live = pd.read_parquet(arm_dir / "live_gain.parquet")
        gains.append(live.assign(selector=arm.selector, ratio=arm.ratio, seed=arm.seed)[LIVE_GAIN_COLUMNS])
    frame = pd.concat(metrics, ignore_index=True)
    dtypes = {"step": "int64", "seed": "int64", "kept_tokens": "int64", "valid_tokens": "int64", "ratio": "float64"}
    frame = frame.astype(dtypes)
    return frame, pd.concat(gains, ignore_index=True)


NORMALIZATION_MEANING = {
    "kept_global": "sum over kept positions / kept positions in the whole batch (all processes, all micro-batches)",
    "per_sequence_mean": "mean over each sequence's kept positions, then over sequences with a kept position",
}


def build_manifest(ctx: RunContext, seconds: float) -> dict:
    """manifest.json of a training run: the shared provenance keys plus the trainer's own."""
    config = ctx.config
    versions = {**package_versions(), "accelerate": metadata.version("accelerate")}
    base = manifest_base(ctx.pair, ctx.tokenizer, signal_mode=get_backend(BACKEND).signal_mode,
                         vocab_size=ctx.vocab_size, device=ctx.world.device, dtype=ctx.dtype, config=config,
                         seconds=seconds, versions=versions)
    return {
        **base,
        "run_name": config.run_id(),
        "kind": "train",
        "synthetic": False,
        "selectors": config.selectors,
        "ratios": config.ratios,
        "seeds": config.seeds,
        "steps": config.steps,
        "loss": config.loss,
        "normalization": config.normalization,
        "normalization_meaning": NORMALIZATION_MEANING[config.normalization],
        "selection": {"preset": config.preset, "preset_keys": config.preset_keys(),  # the keys the preset set
                      **config.selection_options().to_dict()},  # diagnostics.signals.selectors
        "optimizer": optimizer_record(config),
        "rollout_backend": config.rollout_backend,
        "mixed_precision": ctx.precision.name,
        "old_logprobs": "student log-probs from the scoring pass (no grad), before the update",
        "temperature": config.temperature,
        "temperature_convention": TEMPERATURE_CONVENTION,
        "kl_to_teacher": "mean forward KL(pT||pS) per token on the common bank (base-student held-out rollouts)",
        "live_gain": "engine.checkpoint_gains(base, trained) on the common bank, per bank sequence in "
                     "live_gain.parquet; comparison CI: t over seeds (>= 2 seeds), else cluster bootstrap "
                     "over sequences",
        "peak_mem": "CUDA max allocated" if ctx.world.device.type == "cuda"
                    else "process RSS high-water mark per step (VmHWM, reset each step)",
        "prompt_seed_base": TRAIN_PROMPT_SEED,
        "eval_split_seed": EVAL_SPLIT_SEED,
        "bank_split_seed": BANK_SPLIT_SEED,
        "world_size": ctx.world.size,
    }


def run_arms(config: TrainConfig, resume: bool, train_one: Callable[[RunContext, Arm], None], *,
             manifest_extra: dict | None = None) -> Path:
    """The run around the arms: setup, `train_one(ctx, arm)` for each arm, the raw tables, the manifest."""
    started = time.perf_counter()
    if config.arm_workers > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"arm_workers: {config.arm_workers} processes side by side inside a multi-process launch "
                         f"(WORLD_SIZE {os.environ['WORLD_SIZE']}); use one or the other")
    ctx = setup_run(config, resume=resume)
    arms = config.arms()
    engine = f" (engine {config.engine})" if config.engine != "own" else ""
    ctx.logger.info(f"run {ctx.run_dir}{engine}: {len(arms)} arms x {config.steps} steps x "
                    f"{config.batch_size * config.samples_per_prompt} rollouts (base student: accuracy "
                    f"{ctx.base_eval['accuracy']:.3f}, KL(T||S) {ctx.base_eval['kl_to_teacher']:.4f})")
    if config.arm_workers > 1:
        train_side_by_side(ctx, arms, train_one)
    else:
        for arm in progress_bar(arms, desc="arms", enabled=config.progress and ctx.world.is_main):
            train_one(ctx, arm)
    ctx.rollouts.close()
    if ctx.world.is_main:
        metrics, gains = collect(ctx)
        write_parquet(ctx.run_dir / "metrics.parquet", metrics)
        write_parquet(ctx.run_dir / "live_gain.parquet", gains)
        manifest = build_manifest(ctx, time.perf_counter() - started)
        manifest.update(manifest_extra or {})
        write_json(ctx.run_dir / "manifest.json", manifest)
    ctx.world.barrier()
    release_run_lock(ctx.run_dir)  # rank 0 held it (prepare_run_dir); a no-op elsewhere
    return ctx.run_dir


# ------------------------------------------------------------------------------------------ arms side by side

_WORKER_CONTEXT: RunContext | None = None  # a side-by-side arm process's run context (set by _start_arm_process)


def _start_arm_process(config: TrainConfig) -> None:
    global _WORKER_CONTEXT
    _WORKER_CONTEXT = setup_run(config, resume=True, claim=False)  # reads the parent's bank and base evaluation


def _train_in_arm_process(train_one: Callable[[RunContext, Arm], None], arm: Arm) -> str:
    train_one(_WORKER_CONTEXT, arm)
    return arm.name


def train_side_by_side(ctx: RunContext, arms: list[Arm], train_one: Callable[[RunContext, Arm], None]) -> None:
    """`arm_workers` processes (spawned; each loads the pair once) train the unfinished arms, one arm at a time
    each. An arm's outputs do not depend on which process trains it or what it trained before (every arm seeds
    its own initialisation, rollouts and selection), so the run equals the one-process run; `train_one` must
    pickle (a module-level function or a partial of one). The first arm that fails stops the run here."""
    pending = [arm for arm in arms if not (ctx.run_dir / "arms" / arm.name / "result.json").is_file()]
    if not pending:
        return
    workers = min(ctx.config.arm_workers, len(pending))
    ctx.logger.info(f"{len(pending)} arms on {workers} processes side by side (arm_workers)")
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_start_arm_process, initargs=(ctx.config,)) as pool:
        futures = [pool.submit(_train_in_arm_process, train_one, arm) for arm in pending]
        bar = progress_bar(as_completed(futures), desc="arms", total=len(futures),
                           enabled=ctx.config.progress and ctx.world.is_main)
        try:
            for future in bar:
                future.result()
        except BaseException:
            for future in futures:  # unstarted arms stay unstarted: a rerun with --resume trains them
                future.cancel()
            raise
