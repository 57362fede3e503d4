"""The fixed-context diagnostic recipe: rollouts -> context bank -> per-token gains -> tokens.parquet.

One readable workflow driven by `DiagnoseConfig` (`configs/diagnose.yaml`):
  1. resolve the model pair (the embedded testbed when none is given; `diagnostics.pair`) and check
     compatibility;
  2. sample held-out student rollouts (`diagnostics.generation.rollouts`), stored as `rollouts.parquet`;
  3. freeze them as a context bank (`bank.parquet`): B responses, each cut to at most L tokens;
  4. for each shard of sequences: teacher and student log-probs (the teacher's only for the shard,
     so peak memory is bounded by the shard), every signal of `diagnostics.signals` (per configured
     K) and the gains of the configured mode (`diagnostics.engine`), written atomically as
     `shards/shard_XXXX.pt` ([b, T] grids) -- a rerun after a kill skips finished shards;
  5. on the [B, T] grids of the whole bank: normalise H, D, C once, every registered score and the
     Q3 flag, then one write of `tokens.parquet` (one row per valid position, (seq_id, pos) order);
     in single-step mode also the `group` variant (`group.parquet`);
  6. `manifest.json` records everything needed to reproduce any row.
`protocol` says what the gain measures. single-step (the default, this module alone): the gain at a
token from one update on that token's own loss, on held-out base-student rollouts. paper (the
paper's protocol, orchestrated by `opd.paper_protocol` because it trains): the gain at a token after
full-token OPD trained on all tokens, re-scored (mode=checkpoint) on that run's own first rollouts,
which this module reads as a bank file (`bank`).
The statistics (summary.json) are computed by `analysis/`, which the `taopd` command calls; this
module never imports `analysis`.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

from diagnostics import engine
from diagnostics.bank import bank_batch, make_bank, read_bank, read_bank_file
from diagnostics.core.files import write_json, write_parquet
from diagnostics.core.lock import release_run_lock
from diagnostics.core.nonfinite import check_group_finite, check_shard_finite, nonfinite_recorded
from diagnostics.core.rundir import claim_run_dir
from diagnostics.data.prompts import render_text
from diagnostics.diagnose_config import DiagnoseConfig, protocol_meaning
from diagnostics.generation.backends import SamplingConfig
from diagnostics.generation.rollouts import generate_rollouts
from diagnostics.generation.store import make_manifest, read_store, write_store
from diagnostics.generation.vllm import release_vllm_engine
from diagnostics.lm.forward import ResponseBatch, full_logprobs, map_sequence_chunks
from diagnostics.lm.models import ModelPair, check_pair, check_path, directory_hash, load_model, load_pair
from diagnostics.lm.precision import master_weights, resolve_precision
from diagnostics.pair import (
    BANK_SPLIT_SEED,
    ResolvedPair,
    check_k,
    check_prompts,
    heldout_problems,
    manifest_base,
    resolve_pair,
)
from diagnostics.shards import Processes, run_shards, wait_for
from diagnostics.signals import normalize_batch, select, selection_scores, token_signals
from diagnostics.signals.scores import RAW_SIGNALS, get_score, rule_weights

# Signals that do not depend on K: stored once, without a _k{K} suffix.
K_INDEPENDENT = (
    "student_entropy", "teacher_entropy", "kl_forward", "kl_reverse",
    "student_logprob_sampled", "teacher_logprob_sampled",
)
SIGNAL_MODE = "exact"  # the engine scores full-vocabulary log-probs of both models (token_signals)
RELATIVE_GAIN_EPS = 1e-12  # the release's (KL_base - KL_after) / (KL_base + eps)


# ------------------------------------------------------------------------------------------ one shard


def shard_signals(
    student_lp: torch.Tensor, teacher_lp: torch.Tensor, bank: ResponseBatch, ks: list[int], default_k: int
) -> dict[str, torch.Tensor]:
    """Every signal at the valid positions, per K (extra K columns suffixed _k{K}). -> name: [b, T]."""
    valid = bank.valid
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        signals = token_signals(student_lp[valid], teacher_lp[valid], k=k, sampled_ids=bank.targets[valid])
        suffix = "" if k == default_k else f"_k{k}"
        for name, values in signals.items():
            if suffix and name in K_INDEPENDENT:
                continue  # stored once
            full = torch.full(valid.shape, torch.nan)
            full[valid] = values.float()
            out[name + suffix] = full
    return out


def compute_shard(
    pair: ModelPair,
    bank: ResponseBatch,
    config: DiagnoseConfig,
    ks: list[int],
    default_k: int,
    trained: torch.nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """Signals and gains for one shard of sequences. -> name: [b, T] tensors (NaN where invalid).

    A memory-bounded chunk of the shard's sequences at a time (`diagnostics.lm.forward.map_sequence_chunks`): both
    models' [b, T, V] log-probs exist for one chunk only (2 sequences at Qwen's vocabulary and T = 74).
    """
    return map_sequence_chunks(lambda part, _rows: _shard_chunk(pair, part, config, ks, default_k, trained),
                               bank, pair.vocab_size)


def _shard_chunk(pair: ModelPair, bank: ResponseBatch, config: DiagnoseConfig, ks: list[int], default_k: int,
                 trained: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    """`compute_shard` on one chunk of sequences."""
    teacher_lp = full_logprobs(pair.teacher, bank, pair.vocab_size)  # [b, T, V]: this chunk only
    student_lp = full_logprobs(pair.student, bank, pair.vocab_size)
    out = shard_signals(student_lp, teacher_lp, bank, ks, default_k)
    step = engine.StepConfig(loss=config.loss, optimizer=config.optimizer, lr=config.lr,
                             compute_dtype=resolve_precision(config.mixed_precision, pair.dtype, pair.device).compute)
    if config.mode == "checkpoint":
        gains = engine.checkpoint_gains(pair.student, trained, bank, teacher_lp, pair.vocab_size)
    elif choose_method(config, pair.student, bank) == "vmap":
        gains = engine.single_step_vmap(
            pair.student, bank, teacher_lp, step, pair.vocab_size,
            first_order=config.mode == "first-order", memory_budget_bytes=config.memory_budget_gb * 1e9,
        )
    else:
        if config.mode == "first-order":
            raise ValueError("mode=first-order needs method=vmap (per-position gradients)")
        gains = engine.single_step_loop(pair.student, bank, teacher_lp, step, pair.vocab_size)
    out.update(engine.finish_gains(gains))
    return out


def choose_method(config: DiagnoseConfig, model: torch.nn.Module, bank: ResponseBatch) -> str:
    """vmap when one sequence's stacked per-position gradients fit the memory budget."""
    if config.method != "auto":
        return config.method
    n_params = sum(p.numel() for p in model.parameters())
    return "vmap" if bank.valid.shape[1] * n_params * 16 <= config.memory_budget_gb * 1e9 else "loop"


def bank_grids(
    pair: ModelPair, bank: ResponseBatch, config: DiagnoseConfig, ks: list[int], default_k: int,
    trained: torch.nn.Module | None, shard_dir: Path, *, progress: bool, processes: Processes | None = None,
) -> dict[str, torch.Tensor] | None:
    """Signals and gains of the whole bank, shard by shard (finished shards are read back, not recomputed;
    under a launch each process computes its share, `diagnostics.shards`). -> name: [B, T] tensors, NaN where
    invalid, on the first process; None on the others."""
    def compute(shard: int) -> dict[str, torch.Tensor]:
        rows = slice(shard * config.shard_sequences, (shard + 1) * config.shard_sequences)
        table = compute_shard(pair, bank.select(rows), config, ks, default_k, trained)
        check_shard_finite(table, bank.select(rows).valid, shard=shard, first_row=rows.start,
                           run_dir=shard_dir.parent, step=f"mode {config.mode}, {config.optimizer} lr={config.lr:g}")
        return table

    return run_shards(len(bank), config.shard_sequences, shard_dir, compute, processes=processes,
                      progress=progress, desc=f"diagnose ({config.mode})")


# ------------------------------------------------------------------------------------------ the whole bank


def bank_scores(grids: dict[str, torch.Tensor], valid: torch.Tensor, ks: list[int], default_k: int, seed: int
                ) -> dict[str, torch.Tensor]:
    """Normalised H~, D~, C~ over the whole bank, every registered score (score_<name>), every weight rule
    (weight_<name>) and Q3, per K. -> name: [B, T]."""
    def signal(name: str) -> torch.Tensor:  # 0 at invalid positions, as the scores expect
        return torch.where(valid, grids[name], 0.0)

    # the teacher entropy is no selection signal: normalised on its own, the same way
    out = {"norm_teacher_entropy": normalize_batch(signal("teacher_entropy"), valid)}
    for k in ks:
        sfx = "" if k == default_k else f"_k{k}"
        signals = {"student_entropy": signal("student_entropy"), "disagreement": signal("disagreement" + sfx),
                   "compat_mass": signal("compat_mass" + sfx), "overlap": signal("overlap" + sfx),
                   **{key: signal(key) for key in RAW_SIGNALS if key in K_INDEPENDENT}}  # the published rules' raw
        scores, norm = selection_scores(signals, valid, seed=seed, return_normalized=True)
        out.update({f"weight_{name}{sfx}": w for name, w in rule_weights(signals, valid, seed=seed).items()})
        out.update({"norm_entropy" + sfx: norm["H"], "norm_disagreement" + sfx: norm["D"],
                    "norm_compat" + sfx: norm["C"]})
        for name, score in scores.items():
            out[(name if name == "q3" else f"score_{name}") + sfx] = score
    return out


def release_columns(grids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The release's definitions beside ours, in every mode (issue 12 items 2-3): `gain_rel_paper` =
    (KL_base - KL_after) / (KL_base + 1e-12) (release `tools/eval_fixed_context_bank.py` L199-201, G_KLf;
    `gain_rel` is NaN where KL_base = 0 instead) and `disagreement_full` = the full-vocabulary forward
    KL(pT || pS_base) (L156, KLf_full), the D of the release's analyses (`disagreement` is union-top-K)."""
    before = grids["kl_forward_before"]
    return {"gain_rel_paper": (before - grids["kl_forward_after"]) / (before + RELATIVE_GAIN_EPS),
            "disagreement_full": grids["kl_forward"].clone()}


def token_table(grids: dict[str, torch.Tensor], bank: ResponseBatch, bank_df: pd.DataFrame, tokenizer
                ) -> pd.DataFrame:
    """[B, T] grids -> one row per valid (seq_id, pos), row-major, with the token metadata first."""
    rows, cols = bank.valid.nonzero(as_tuple=True)  # row-major: (seq_id, pos) order
    rows_np, pos = rows.numpy(), cols.numpy()
    resp_len = bank.valid.sum(dim=1).numpy()[rows_np]  # = len(response_ids) of each bank row
    token_id = bank.targets[rows, cols].numpy()
    frame = {
        "seq_id": bank_df["seq_id"].to_numpy()[rows_np],
        "pos": pos,
        "prompt_id": bank_df["prompt_id"].to_numpy()[rows_np],
        "resp_len": resp_len,
        "rel_pos": pos / resp_len,
        "token_id": token_id,
        "token": tokenizer.convert_ids_to_tokens(token_id.tolist()),
    }
    frame.update({name: values[rows, cols].numpy() for name, values in grids.items()})
    return pd.DataFrame(frame)


# ------------------------------------------------------------------------------------------ the recipe


def saved_config(config: DiagnoseConfig, resolved: ResolvedPair) -> dict:
    """What config.json records: the config and the resolved models (resuming must match both)."""
    return {**config.fingerprint(), "resolved_models": resolved_models(config, resolved)}


def resolved_models(config: DiagnoseConfig, resolved: ResolvedPair) -> dict[str, str]:
    """The model paths a run actually used (the testbed's include its cache key)."""
    return {"student_path": resolved.student_path, "teacher_path": resolved.teacher_path,
            "checkpoint_path": config.checkpoint}


def sample_bank_rollouts(config: DiagnoseConfig, resolved: ResolvedPair, path: Path,
                         tokenizer: PreTrainedTokenizerBase) -> pd.DataFrame:
    """Held-out student rollouts (`tokenizer`: the student's), stored at `path` with their manifest (read back on
    resume)."""
    if path.is_file():
        return read_store(path)
    sampling = SamplingConfig(temperature=config.temperature, top_p=config.top_p,
                              max_new_tokens=resolved.max_new_tokens, n=1, seed=config.seed)
    problems = heldout_problems(resolved, config.n_sequences, split_seed=BANK_SPLIT_SEED, prompts=config.prompts,
                                key="prompts", prompt_column=config.prompt_column, answer_column=config.answer_column)
    texts = [render_text(tokenizer, p.prompt, enable_thinking=config.enable_thinking) for p in problems]
    with nonfinite_recorded(path.parent, recipe="diagnose", stage="rollouts", temperature=config.temperature):
        rollouts = generate_rollouts(resolved.student_path, tokenizer, texts, sampling, backend=config.backend,
                                     chat_template=False)  # rendered above
    if rollouts.attrs.get("backend") == "vllm":  # its engine holds 0.9 of a GPU and the pair loads next
        release_vllm_engine()
    manifest = make_manifest(model_path=resolved.student_path, tokenizer=tokenizer,
                             backend=rollouts.attrs.get("backend", config.backend),
                             sampling=dataclasses.asdict(sampling))
    write_store(rollouts, path, manifest)
    return rollouts


def run_diagnose(config: DiagnoseConfig, *, progress: bool = True, manifest_extra: dict | None = None,
                 processes: Processes | None = None) -> Path:
    """Run (or resume) the diagnostic; returns the run directory holding tokens.parquet. protocol=paper
    runs come through `opd.paper_protocol`, which adds its provenance as `manifest_extra`. Under a launch
    (`processes`: `opd.distributed.World`), the first process claims the run, samples the bank and, once
    every process has written its shards (`diagnostics.shards`), merges and writes the tables; the others
    compute their shards on their own device and return."""
    started = time.perf_counter()
    first = processes is None or processes.is_main
    resolved = resolve_pair(config.student, config.teacher, testbed_config=config.testbed_config, k=config.k,
                            max_new_tokens=config.max_new_tokens)
    checked = check_pair(resolved.student_path, resolved.teacher_path)  # cheap: tokenizers and configs
    tokenizer, vocab = checked
    check_k(vocab, k=resolved.k, extra_k=config.extra_k)
    if resolved.testbed is None and config.prompts:  # the file's rows, count and characters, before any write
        problems = heldout_problems(resolved, config.n_sequences, split_seed=BANK_SPLIT_SEED, prompts=config.prompts,
                                    key="prompts", prompt_column=config.prompt_column,
                                    answer_column=config.answer_column)
        check_prompts(tokenizer, [p.prompt for p in problems], config.prompts, enable_thinking=config.enable_thinking,
                      model_path=resolved.student_path, max_new_tokens=resolved.max_new_tokens)
    if config.mode == "checkpoint":
        check_path(config.checkpoint, "checkpoint")
        check_pair(resolved.student_path, config.checkpoint, names=("student", "checkpoint"), same_architecture=True)
    run_dir = Path(config.out_dir) / config.run_id(resolved_models(config, resolved))
    claim_run_dir(run_dir, saved_config(config, resolved), ignore={"n_boot"}, lock=first)
    ks = [resolved.k] + [k for k in config.extra_k if k != resolved.k]
    bank_path = run_dir / "bank.parquet"
    rollouts = None
    if first:
        write_json(run_dir / "config.json", saved_config(config, resolved))
        if config.bank:
            rollouts = read_bank_file(config.bank, config.n_sequences)
        elif not bank_path.is_file():
            rollouts = sample_bank_rollouts(config, resolved, run_dir / "rollouts.parquet", tokenizer)
    device = config.device if processes is None else str(processes.device)  # a launch: this process's device
    pair = load_pair(resolved.student_path, resolved.teacher_path, device=device, dtype=config.dtype, checked=checked)
    pair.student = master_weights(pair.student, resolved.student_path,
                                  resolve_precision(config.mixed_precision, pair.dtype, pair.device))
    trained = load_model(config.checkpoint, pair.device, pair.dtype) if config.mode == "checkpoint" else None

    if rollouts is not None and not bank_path.is_file():
        bank_df = make_bank(rollouts, config.max_response_tokens, pair.vocab_size)
        write_parquet(bank_path, bank_df)
    else:
        wait_for([bank_path])  # the first process writes it
        bank_df = read_bank(bank_path, pair.vocab_size)
    bank = bank_batch(bank_df, pair.tokenizer.pad_token_id)

    grids = bank_grids(pair, bank, config, ks, resolved.k, trained, run_dir / "shards", progress=progress,
                       processes=processes)
    if grids is None:  # not the first process: its shards are written
        return run_dir
    grids.update(bank_scores(grids, bank.valid, ks, resolved.k, config.seed))
    grids.update(release_columns(grids))
    tokens = token_table(grids, bank, bank_df, pair.tokenizer)
    write_parquet(run_dir / "tokens.parquet", tokens)

    if config.mode == "single-step" and config.group_selectors:
        group = run_group(pair, bank, grids, config, bank_df["seq_id"].to_numpy())
        check_group_finite(group, run_dir, step=f"{config.optimizer} lr={config.lr:g}")
        write_parquet(run_dir / "group.parquet", group)

    method = "checkpoint" if config.mode == "checkpoint" else choose_method(config, pair.student, bank)
    manifest = build_manifest(config, resolved, pair, ks, bank_path, tokens, method, time.perf_counter() - started)
    manifest.update(manifest_extra or {})
    write_json(run_dir / "manifest.json", manifest)
    release_run_lock(run_dir)
    return run_dir


def run_group(pair: ModelPair, bank: ResponseBatch, grids: dict[str, torch.Tensor], config: DiagnoseConfig,
              seq_ids: np.ndarray) -> pd.DataFrame:
    """Per selector and ratio: keep = select(score), one update on the kept set, gain at every position.

    The teacher's log-probs are computed per batch of sequences inside the engine, never for the
    whole bank at once.
    """
    rows, cols = bank.valid.nonzero(as_tuple=True)
    step = engine.StepConfig(loss=config.loss, optimizer=config.optimizer, lr=config.lr,
                             compute_dtype=resolve_precision(config.mixed_precision, pair.dtype, pair.device).compute)
    frames = []
    for selector, ratio in group_plan(config.group_selectors, config.group_ratios):
        weights = grids[f"weight_{selector}"] if get_score(selector).kind == "weight" else None
        if weights is not None:  # a weight rule: every valid position, weighted (engine.group_step_gains)
            keep = bank.valid.clone()
        else:
            keep = select(torch.where(bank.valid, grids[f"score_{selector}"], float("-inf")), bank.valid, ratio,
                          seed=config.seed)
        gain = engine.group_step_gains(pair.student, bank, pair.teacher, keep, step, pair.vocab_size, weights=weights)
        frames.append(pd.DataFrame({
            "selector": selector, "ratio": ratio, "seq_id": seq_ids[rows.numpy()], "pos": cols.numpy(),
            "kept": keep[rows, cols].numpy(), "gain": gain[rows, cols].numpy(),
        }))
    return pd.concat(frames, ignore_index=True)


def group_plan(selectors: list[str], ratios: list[float]) -> list[tuple[str, float]]:
    """(rule, ratio) of the group variant: a selection rule at each ratio; a weight rule at 1.0 (every token,
    weighted), with `full` at 1.0 beside it (once): a weight rule is compared against full-token OPD."""
    plan = [(s, r) for s in selectors for r in ([1.0] if get_score(s).kind == "weight" else map(float, ratios))]
    weighted = any(get_score(s).kind == "weight" for s in selectors)
    return plan + [("full", 1.0)] if weighted and ("full", 1.0) not in plan else plan


def build_manifest(config: DiagnoseConfig, resolved: ResolvedPair, pair: ModelPair, ks: list[int], bank_path: Path,
                   tokens: pd.DataFrame, method: str, seconds: float) -> dict:
    """manifest.json of a diagnostic run: the shared provenance keys plus the diagnostic's own."""
    return {
        **manifest_base(resolved, pair.tokenizer, signal_mode=SIGNAL_MODE, vocab_size=pair.vocab_size,
                        device=pair.device, dtype=pair.dtype, config=config, seconds=seconds),
        "run_name": Path(bank_path).parent.name,
        "checkpoint_path": config.checkpoint or None,
        "checkpoint_hash": directory_hash(config.checkpoint) if config.checkpoint else None,
        "bank_path": str(bank_path),
        "mode": config.mode,
        "protocol": config.protocol,
        "protocol_meaning": protocol_meaning(config),
        "bank_source": config.bank or "held-out base-student rollouts (rollouts.parquet)",
        "loss": config.loss,
        "optimizer": config.optimizer,
        "lr": config.lr,
        "extra_k": [k for k in ks if k != resolved.k],
        "seed": config.seed,
        "gain": "absolute forward-KL reduction KL(pT||pS_before) - KL(pT||pS_after), nats",
        "gain_rel_paper": "(KL(pT||pS_before) - KL(pT||pS_after)) / (KL(pT||pS_before) + 1e-12), the release's",
        "disagreement_full": "full-vocabulary forward KL(pT||pS_before), the release's D",
        "method": method,
        "n_sequences": int(tokens["seq_id"].nunique()),
        "n_tokens": len(tokens),
        "n_nonfinite_gains": int((~np.isfinite(tokens["gain"].to_numpy())).sum()),
    }
