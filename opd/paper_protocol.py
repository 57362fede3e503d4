"""The paper's diagnostic protocol, `taopd diagnose protocol=paper`: train, then re-score.

What it measures: the gain at a token after full-token OPD trained on ALL tokens (the latest
checkpoint against the base student, at fixed contexts), where the project's own single-step
protocol (`diagnostics.engine`, the default) measures the gain at a token from one update on that
token's own loss. The chain, every stage resumable (a rerun of the same config continues it):

  1. prompt shard: the prompts the OPD run trains on, written to `prompt_shard.jsonl`: the testbed
     trainer's own stream (seed `opd.trainer.TRAIN_PROMPT_SEED` + seed, disjoint from the diagnose
     and evaluation splits), or for real models the prompt set `prompts` (a held-out shard; the
     trainer permutes it, as the release's `--rollout-shuffle`);
  2. full-token OPD from the base student (`opd.engines.run_training`, selector `full`,
     `save_rollouts`), in `<run>/opd/`, with the `train` overrides of the diagnose config; a killed
     run continues from its last checkpoint (`opd.checkpoint`);
  3. the bank: the run's first `n_sequences` rollouts in step order (`opd_rollouts.parquet`), each
     cut to `max_response_tokens` by the diagnostic's `make_bank`;
  4. the checkpoint: the run's final student (`<run>/opd/arms/full-r1-s<seed>/student`);
  5. re-scoring: `diagnostics.diagnose.run_diagnose` with mode=checkpoint on that bank file: the
     usual tables (bank.parquet, shards, tokens.parquet with `gain_rel_paper` and
     `disagreement_full`, manifest.json with "protocol": "paper" and this run's provenance).

The release this reproduces (public repository ckjsuperhh/taopd-baseline, folder TA-OPD/):
* `scripts/diagnostics/run_4b_to_1p7b_heldout_fixed_context_300.sh` L35-70: a deterministic held-out
  prompt shard (400 prompts of the latter half of DAPO-Math-17k, seed 41717); L95-103: the OPD run
  trains on it, NUM_ROLLOUT=151 rollout steps of ROLLOUT_BATCH_SIZE=2 x N_SAMPLES_PER_PROMPT=1 with
  GLOBAL_BATCH_SIZE=2 (one optimizer step per 2 rollouts), ROLLOUT_MAX_RESPONSE_LEN=256,
  SAVE_INTERVAL=25; L113 SAVE_DEBUG_ROLLOUT_DATA=1 keeps every step's rollouts; L122-126 the bank is
  exported from them with --max-samples 300; L128-140 the base student (theta0) is scored on it with
  --max-response-tokens 192; L142-157 the latest checkpoint (--iteration latest) is re-scored
  against that baseline.
* `slime_ta_opd/tools/export_fixed_context_bank.py` L114-124 (main): the first --max-samples
  response-bearing samples, rollout files in sorted order (L31); L56-57 skip empty responses.
  There, 151 steps x 2 = 302 rollouts, so the bank is all but one step's rollouts (the files sort
  as strings, "10.pt" before "2.pt", which decides only which step is left out). Here the bank is
  the first n_sequences rollouts in step order: the whole run when steps x rollouts-per-step =
  n_sequences; the testbed preset (150 x 8, chosen so that OPD teaches: 150 x 2 does not) banks the
  rollouts of the first 38 of its 150 steps.
* `slime_ta_opd/examples/on_policy_distillation/run-qwen3-1.7B-sampled-opd-sglang.sh`, GRPO_ARGS and
  OPTIMIZER_ARGS: sampled-token OPD (--use-opd, eps clip 0.2 / 0.28), Adam lr 1e-6 constant, weight
  decay 0.1, betas 0.9 / 0.98 (Megatron's default gradient clipping 1.0): `train.preset: paper` in
  `configs/diagnose_paper.yaml` (`opd.config`, `opd.optim`), with the testbed's lr.
* `slime_ta_opd/tools/eval_fixed_context_bank.py` L131-132 (responses cut to 192 tokens), L156
  (KLf_full, the full-vocabulary forward KL) and L199-201 (G_KLf = (KLf_base - KLf) / (KLf_base +
  1e-12)): `diagnostics.diagnose.release_columns`.
Under `torchrun --nproc_per_node N -m taopd.cli diagnose protocol=paper ...` every stage runs on N
processes: the OPD run as `taopd train` does, the re-scoring shard by shard (`diagnostics.shards`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

import pandas as pd

from diagnostics.core.config import ConfigError, check, load_config
from diagnostics.core.files import atomic_write, write_parquet
from diagnostics.core.rundir import claim_run_dir
from diagnostics.diagnose import resolved_models, run_diagnose, saved_config
from diagnostics.diagnose_config import DiagnoseConfig
from diagnostics.pair import ResolvedPair, load_prompts, resolve_pair
from diagnostics.shards import wait_for
from opd.config import Arm, TrainConfig
from opd.distributed import World
from opd.engines import run_training
from opd.trainer import TRAIN_PROMPT_SEED

# TrainConfig keys the protocol sets itself (from the diagnose config or by definition): a `train`
# override of one of them is an error naming it.
PROTOCOL_KEYS = ("student", "teacher", "testbed_config", "prompts", "prompt_column", "answer_column",
                 "enable_thinking", "selectors", "ratios", "seeds", "k",
                 "max_new_tokens", "temperature", "top_p", "device", "dtype", "save_students", "save_rollouts",
                 "run_name", "out_dir", "progress")
TRAIN_DIR = "opd"  # the OPD run inside the diagnose run directory
BANK_FILE = "opd_rollouts.parquet"  # the OPD run's first n_sequences rollouts: the bank file
SHARD_FILE = "prompt_shard.jsonl"


def check_paper_config(config: DiagnoseConfig) -> None:
    """protocol=paper trains its own checkpoint and bank: errors naming the keys that would contradict it."""
    check(config.protocol == "paper", "protocol", f"expected paper, got {config.protocol!r}")
    check(config.mode in ("single-step", "checkpoint"), "mode",
          f"protocol=paper re-scores a trained checkpoint (mode=checkpoint); got mode={config.mode}")
    check(not config.checkpoint, "checkpoint", "protocol=paper trains its own checkpoint; leave checkpoint empty")
    check(not config.bank, "bank", "protocol=paper banks its own OPD rollouts; leave bank empty")
    check(config.top_p == 1.0, "top_p", f"protocol=paper trains with top_p=1.0 only, got {config.top_p}")
    bad = sorted(set(config.train) & set(PROTOCOL_KEYS))
    check(not bad, f"train.{bad[0] if bad else ''}",
          "set by protocol=paper (the diagnose config's own key, or full-token OPD by definition)")


def train_config(config: DiagnoseConfig, run_dir: Path) -> TrainConfig:
    """The OPD run's TrainConfig: TrainConfig defaults, the `train` overrides, then the protocol's own
    keys (the pair, full-token OPD with one seed, the rollouts kept). Errors name `train.<key>`."""
    check_paper_config(config)
    forced: dict[str, Any] = {
        "student": config.student, "teacher": config.teacher, "testbed_config": config.testbed_config,
        "prompts": config.prompts, "prompt_column": config.prompt_column, "answer_column": config.answer_column,
        "enable_thinking": config.enable_thinking, "selectors": ["full"], "ratios": [1.0], "seeds": [config.seed],
        "k": config.k,
        "max_new_tokens": config.max_new_tokens, "temperature": config.temperature, "top_p": config.top_p,
        "device": config.device, "dtype": config.dtype, "save_students": True, "save_rollouts": True,
        "run_name": TRAIN_DIR, "out_dir": str(run_dir), "progress": True,
    }
    overrides = [f"{key}={json.dumps(value)}" for key, value in {**config.train, **forced}.items()]
    try:
        result = load_config(TrainConfig, None, overrides)
    except ConfigError as exc:
        raise ConfigError(f"train.{exc}".replace(" (in defaults + command-line overrides)", "")) from None
    rollouts = result.steps * result.batch_size * result.samples_per_prompt
    check(rollouts >= config.n_sequences, "n_sequences",
          f"the OPD run makes {result.steps} steps x {result.batch_size * result.samples_per_prompt} rollouts = "
          f"{rollouts}, fewer than the bank's n_sequences={config.n_sequences} (raise train.steps)")
    return result


def arm_dir(train: TrainConfig) -> Path:
    """The one arm of the OPD run (full-token OPD at ratio 1.0 with the diagnose seed)."""
    return Path(train.out_dir) / train.run_id() / "arms" / Arm("full", 1.0, train.seeds[0]).name


def rescore_config(config: DiagnoseConfig, run_dir: Path, train: TrainConfig) -> DiagnoseConfig:
    """The diagnose config of stage 5: mode=checkpoint on the OPD run's final student and rollouts."""
    return dataclasses.replace(config, mode="checkpoint", checkpoint=str(arm_dir(train) / "student"),
                               bank=str(run_dir / BANK_FILE), run_name=run_dir.name, out_dir=str(run_dir.parent))


def write_prompt_shard(train: TrainConfig, resolved: ResolvedPair, path: Path) -> None:
    """The prompts the OPD run trains on, in stream order (provenance; the trainer draws them itself)."""
    if path.is_file():
        return
    n = train.steps * train.batch_size
    if resolved.testbed is not None:
        problems = resolved.testbed.config.problems(n, TRAIN_PROMPT_SEED + train.seeds[0])
        lines = [json.dumps({"prompt": p.prompt, "answer": p.answer}) for p in problems]
    else:  # real models: the prompt set as loaded (the trainer permutes it per epoch); any file type or hub id
        problems = load_prompts(train.prompts, "prompts", prompt_column=train.prompt_column,
                                answer_column=train.answer_column)
        lines = [json.dumps({"prompt": p.prompt, "answer": p.answer}) for p in problems]
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))


def bank_rollouts(rollout_dir: Path, n_sequences: int, batch_size: int) -> pd.DataFrame:
    """The OPD run's first `n_sequences` non-empty rollouts in step order (within a step: the batch's
    order, the processes' shares in rank order as the trainer splits the batch), with prompt_id the
    prompt's position in the run's prompt stream."""
    named = [(p, re.fullmatch(r"step_(\d+)_rank(\d+)\.parquet", p.name)) for p in rollout_dir.glob("step_*.parquet")]
    files = sorted((int(m[1]), int(m[2]), p) for p, m in named if m)  # (step, rank): numerically, rank 10 after 9
    if not files:
        raise FileNotFoundError(f"{rollout_dir}: the OPD run kept no rollouts")
    share = batch_size // (1 + max(rank for _, rank, _ in files))  # prompts per process (opd.distributed.local_rows)
    frames = []
    for _, rank, path in files:
        frame = pd.read_parquet(path)
        frames.append(frame.assign(prompt_id=(frame["step"] - 1) * batch_size + rank * share + frame["prompt_id"]))
    rollouts = pd.concat(frames, ignore_index=True)
    rollouts = rollouts[rollouts["response_ids"].map(len) > 0]  # as the release's _sample_row
    if len(rollouts) < n_sequences:
        raise ValueError(f"{rollout_dir}: {len(rollouts)} non-empty rollouts, fewer than n_sequences={n_sequences}")
    return rollouts.head(n_sequences).reset_index(drop=True)


def run_paper_protocol(config: DiagnoseConfig, world: World | None = None) -> Path:
    """Run (or resume) the whole chain; returns the diagnose run directory (tokens.parquet, manifest.json).
    Under a launch (`world`, torchrun): the OPD run trains on every process (`opd.trainer`'s split), the
    first process writes the prompt shard and the bank, and the re-scoring splits the shards over the
    processes (`diagnostics.shards`)."""
    started = time.perf_counter()
    first = world is None or world.is_main
    train_config(config, Path(config.out_dir))  # every key checked before any model is built or loaded
    resolved = resolve_pair(config.student, config.teacher, testbed_config=config.testbed_config, k=config.k,
                            max_new_tokens=config.max_new_tokens)
    run_dir = Path(config.out_dir) / config.run_id(resolved_models(config, resolved))
    train = train_config(config, run_dir)
    rescore = rescore_config(config, run_dir, train)
    claim_run_dir(run_dir, saved_config(rescore, resolved), ignore={"n_boot"}, lock=first)  # before training

    if first:
        write_prompt_shard(train, resolved, run_dir / SHARD_FILE)
    train_dir = Path(train.out_dir) / train.run_id()
    resume = (train_dir / "config.json").is_file()
    if world is not None:
        world.barrier()  # every process has read `resume` before the first one writes config.json
    run_training(train, resume=resume)  # skips a finished arm, else resumes
    bank_file = run_dir / BANK_FILE
    if first and not bank_file.is_file():
        write_parquet(bank_file, bank_rollouts(arm_dir(train) / "rollouts", config.n_sequences, train.batch_size))
    wait_for([bank_file])
    extra = provenance(train, train_dir, bank_file, started) if first else None
    return run_diagnose(rescore, manifest_extra=extra, processes=world)


def provenance(train: TrainConfig, train_dir: Path, bank_file: Path, started: float) -> dict[str, Any]:
    """manifest.json's record of the chain: the OPD run, what the bank is, the accuracy it reached."""
    metrics = pd.read_parquet(train_dir / "metrics.parquet")
    evaluated = metrics.dropna(subset=["accuracy"]).sort_values("step")
    bank = pd.read_parquet(bank_file, columns=["step"])
    return {"paper_protocol": {
        "train_run": str(train_dir),
        "train_config": train.fingerprint(),
        "steps": train.steps,
        "rollouts_per_step": train.batch_size * train.samples_per_prompt,
        "prompt_shard": str(train_dir.parent / SHARD_FILE),
        "bank": f"the OPD run's first {len(bank)} rollouts in step order (steps {int(bank['step'].min())}-"
                f"{int(bank['step'].max())}), cut to max_response_tokens",
        "checkpoint": f"the OPD run's final student, after step {train.steps}",
        "accuracy_before": float(evaluated["accuracy"].iloc[0]),
        "accuracy_after": float(evaluated["accuracy"].iloc[-1]),
        "kl_to_teacher_before": float(evaluated["kl_to_teacher"].iloc[0]),
        "kl_to_teacher_after": float(evaluated["kl_to_teacher"].iloc[-1]),
        "train_and_bank_seconds": round(time.perf_counter() - started, 1),  # this invocation; re-scoring: "seconds"
        "release": "ckjsuperhh/taopd-baseline TA-OPD/scripts/diagnostics/run_4b_to_1p7b_heldout_fixed_context_300.sh",
    }}
