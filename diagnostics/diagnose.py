"""The fixed-context diagnostic recipe: rollouts -> context bank -> per-token gains -> tokens.parquet.

One readable workflow driven by `DiagnoseConfig` (`configs/diagnose.yaml`):
  1. resolve the model pair (the embedded testbed when none is given) and check compatibility;
  2. sample held-out student rollouts (`diagnostics.rollouts`), stored as `rollouts.parquet`;
  3. freeze them as a context bank (`bank.parquet`): B responses, each cut to at most L tokens;
  4. for each shard of sequences: teacher and student log-probs, every signal of
     `diagnostics.signals` (per configured K) and the gains of the configured mode
     (`diagnostics.engine`), written atomically as `shards/shard_XXXX.parquet` -- a rerun after a
     kill skips finished shards;
  5. normalise over the whole bank, add every registered score and the Q3 flag, and write
     `tokens.parquet`; in single-step mode also the `group` variant (`group.parquet`);
  6. `manifest.json` records everything needed to reproduce any row.
The statistics (summary.json) are computed by `analysis/`, which the `taopd` command calls; this
module never imports `analysis`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from diagnostics import engine
from diagnostics.config import check, config_to_dict
from diagnostics.files import write_json, write_parquet
from diagnostics.models import ModelPair, check_pair, directory_hash, load_model, load_pair, tokenizer_hash
from diagnostics.signals import list_scores, normalize_batch, select, selection_scores, token_signals

DEFAULT_K_REAL = 16  # the paper's default top-K for real (Qwen-sized) vocabularies


@dataclass
class DiagnoseConfig:
    """Config of `taopd diagnose`; `configs/diagnose.yaml` mirrors it key for key."""

    student: str = ""  # model dir or hub id; "" = the embedded testbed's student
    teacher: str = ""  # "" = the embedded testbed's teacher
    testbed_config: str = "configs/testbed.yaml"
    prompts: str = ""  # JSONL of {"prompt", "answer"} for real models; "" = testbed held-out problems
    n_sequences: int = 256  # B: responses in the bank (the paper: 300)
    max_response_tokens: int = 192  # L: responses are cut to this many tokens
    temperature: float = 1.0  # rollout sampling temperature (the paper's 1.0)
    top_p: float = 1.0
    max_new_tokens: int = 0  # 0 = the testbed's response length, or 256 for real models
    backend: Literal["auto", "hf", "vllm"] = "auto"
    mode: Literal["single-step", "checkpoint", "first-order"] = "single-step"
    loss: Literal["reverse_kl", "sampled"] = "reverse_kl"
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 1e-5  # small-step regime: first-order estimate and measured gain agree on the testbed
    k: int = 0  # top-K of the signals; 0 = the pair's default (testbed: its k; real models: 16)
    extra_k: list[int] = field(default_factory=list)  # more K values, columns suffixed _k{K}
    group_selectors: list[str] = field(default_factory=lambda: ["teachability", "incompatible", "kl", "entropy", "tip", "random"])
    group_ratios: list[float] = field(default_factory=lambda: [0.05])
    checkpoint: str = ""  # the trained student for mode=checkpoint
    method: Literal["auto", "vmap", "loop"] = "auto"  # single-step implementation
    memory_budget_gb: float = 2.0  # for the vmap method's stacked per-position gradients
    shard_sequences: int = 16  # sequences per resumable shard
    seed: int = 0
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    run_name: str = ""  # "" = derived from the config hash, so a rerun resumes the same run
    out_dir: str = "results/diagnose"
    n_boot: int = 1000  # cluster-bootstrap resamples for the summary

    def __post_init__(self) -> None:
        check(self.n_sequences >= 1, "n_sequences", f"must be >= 1, got {self.n_sequences}")
        check(self.max_response_tokens >= 1, "max_response_tokens", f"must be >= 1, got {self.max_response_tokens}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.max_new_tokens >= 0, "max_new_tokens", f"must be >= 0, got {self.max_new_tokens}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.k >= 0, "k", f"must be >= 1 (or 0 for the pair's default), got {self.k}")
        check(all(k >= 1 for k in self.extra_k), "extra_k", f"every K must be >= 1, got {self.extra_k}")
        check(all(0 < r <= 1 for r in self.group_ratios), "group_ratios", f"each ratio must be in (0, 1], got {self.group_ratios}")
        unknown = [s for s in self.group_selectors if s not in list_scores()]
        check(not unknown, "group_selectors", f"unknown selector {unknown[:1]}; registered: {', '.join(list_scores())}")
        check(self.shard_sequences >= 1, "shard_sequences", f"must be >= 1, got {self.shard_sequences}")
        check(self.memory_budget_gb > 0, "memory_budget_gb", f"must be > 0, got {self.memory_budget_gb}")
        check(self.n_boot >= 0, "n_boot", f"must be >= 0, got {self.n_boot}")
        check(bool(self.student) == bool(self.teacher), "teacher", "give both student and teacher, or neither (testbed)")
        check(self.mode != "checkpoint" or bool(self.checkpoint), "checkpoint", "mode=checkpoint needs a checkpoint path")

    def run_id(self, models: dict[str, str] | None = None) -> str:
        """The run directory name: stable for a config and its resolved model paths, so a rerun
        resumes it (and a rebuilt testbed, which lives under a new cache key, starts a new run)."""
        if self.run_name:
            return self.run_name
        payload = {k: v for k, v in config_to_dict(self).items() if k not in ("run_name", "out_dir", "n_boot")}
        payload["models"] = models or {}
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:8]
        return f"{self.mode}-{digest}"


@dataclass
class ResolvedPair:
    student_path: str
    teacher_path: str
    k: int
    max_new_tokens: int
    testbed: object | None  # diagnostics.testbed.Testbed when the testbed is used


def resolve_models(config: DiagnoseConfig) -> ResolvedPair:
    """Real models as given, or the embedded testbed (built or reused from its cache)."""
    if config.student:
        return ResolvedPair(config.student, config.teacher, config.k or DEFAULT_K_REAL, config.max_new_tokens or 256, None)
    from diagnostics.config import load_config
    from diagnostics.testbed import TestbedConfig, build_testbed

    testbed = build_testbed(load_config(TestbedConfig, config.testbed_config))
    tb = testbed.config
    return ResolvedPair(testbed.student_path, testbed.teacher_path, config.k or tb.k, config.max_new_tokens or tb.max_new_tokens, testbed)


def bank_prompts(config: DiagnoseConfig, resolved: ResolvedPair) -> list[str]:
    """Held-out prompts: the testbed's diagnostic split, or the first n_sequences of a JSONL file."""
    if resolved.testbed is not None:
        from diagnostics.testbed import heldout_problems

        return [p.prompt for p in heldout_problems(resolved.testbed.config, config.n_sequences, split_seed=2)]
    from diagnostics.task import load_problems

    if not config.prompts:
        raise ValueError("prompts: real models need a JSONL prompt file (prompts=path.jsonl)")
    problems = load_problems(config.prompts)
    if len(problems) < config.n_sequences:
        raise ValueError(f"prompts: {config.prompts} has {len(problems)} prompts, fewer than n_sequences={config.n_sequences}")
    return [p.prompt for p in problems[: config.n_sequences]]


def make_bank(rollouts: pd.DataFrame, max_response_tokens: int, vocab_size: int) -> pd.DataFrame:
    """Freeze rollouts as a context bank: seq_id, prompt_id, prompt_ids, response_ids (cut to L)."""
    bank = pd.DataFrame(
        {
            "seq_id": np.arange(len(rollouts)),
            "prompt_id": rollouts["prompt_id"].to_numpy(),
            "prompt_ids": [list(map(int, p)) for p in rollouts["prompt_ids"]],
            "response_ids": [list(map(int, r))[:max_response_tokens] for r in rollouts["response_ids"]],
        }
    )
    validate_bank(bank, vocab_size, "bank")
    return bank


def validate_bank(bank: pd.DataFrame, vocab_size: int, where: str) -> None:
    """Errors naming the first bad row, before any long computation."""
    missing = {"seq_id", "prompt_ids", "response_ids"} - set(bank.columns)
    if missing:
        raise ValueError(f"{where}: missing columns {sorted(missing)}")
    for row in bank.itertuples():
        for name in ("prompt_ids", "response_ids"):
            ids = getattr(row, name)
            if len(ids) == 0:
                raise ValueError(f"{where}: seq_id {row.seq_id} has an empty {name}")
            bad = [i for i in ids if not 0 <= int(i) < vocab_size]
            if bad:
                raise ValueError(f"{where}: seq_id {row.seq_id} {name} has token id {bad[0]} outside the vocabulary [0, {vocab_size})")


def shard_signals(student_lp: torch.Tensor, teacher_lp: torch.Tensor, bank: engine.BankTensors, ks: list[int], default_k: int) -> dict[str, torch.Tensor]:
    """Every signal at the valid positions, per K (extra K columns suffixed _k{K}). -> name: [B, T]."""
    valid = bank.valid
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        signals = token_signals(student_lp[valid], teacher_lp[valid], k=k, sampled_ids=bank.targets[valid])
        suffix = "" if k == default_k else f"_k{k}"
        for name, values in signals.items():
            if suffix and name in ("student_entropy", "teacher_entropy", "kl_forward", "kl_reverse", "student_logprob_sampled", "teacher_logprob_sampled"):
                continue  # K-independent: stored once
            full = torch.full(valid.shape, torch.nan)
            full[valid] = values.float()
            out[name + suffix] = full
    return out


def compute_shard(pair: ModelPair, bank: engine.BankTensors, config: DiagnoseConfig, ks: list[int], default_k: int, trained=None) -> dict[str, torch.Tensor]:
    """Signals and gains for one shard of sequences. -> name: [b, T] tensors (NaN where invalid)."""
    teacher_lp = engine.response_logprobs(pair.teacher, bank, pair.vocab_size)
    student_lp = engine.response_logprobs(pair.student, bank, pair.vocab_size)
    out = shard_signals(student_lp, teacher_lp, bank, ks, default_k)
    step = engine.StepConfig(loss=config.loss, optimizer=config.optimizer, lr=config.lr)
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


def choose_method(config: DiagnoseConfig, model: torch.nn.Module, bank: engine.BankTensors) -> str:
    """vmap when one sequence's stacked per-position gradients fit the memory budget."""
    if config.method != "auto":
        return config.method
    n_params = sum(p.numel() for p in model.parameters())
    return "vmap" if bank.valid.shape[1] * n_params * 16 <= config.memory_budget_gb * 1e9 else "loop"


def to_frame(table: dict[str, torch.Tensor], valid: torch.Tensor, seq_ids: np.ndarray) -> pd.DataFrame:
    """[b, T] tensors -> one row per valid (seq_id, pos)."""
    rows, cols = valid.nonzero(as_tuple=True)
    frame = {"seq_id": seq_ids[rows.numpy()], "pos": cols.numpy()}
    frame.update({name: values[rows, cols].numpy() for name, values in table.items()})
    return pd.DataFrame(frame)


def add_scores(tokens: pd.DataFrame, ks: list[int], default_k: int, seed: int) -> pd.DataFrame:
    """Normalised H~, D~, C~ over the whole bank, every registered score, and Q3 (per K)."""
    seq_index = {s: i for i, s in enumerate(sorted(tokens["seq_id"].unique()))}
    b_idx = torch.tensor(tokens["seq_id"].map(seq_index).to_numpy())
    t_idx = torch.tensor(tokens["pos"].to_numpy())
    shape = (len(seq_index), int(t_idx.max()) + 1)
    valid = torch.zeros(shape, dtype=torch.bool)
    valid[b_idx, t_idx] = True

    def grid(column: str) -> torch.Tensor:
        out = torch.zeros(shape)
        out[b_idx, t_idx] = torch.tensor(tokens[column].to_numpy(), dtype=torch.float32)
        return out

    tokens = tokens.copy()
    tokens["norm_teacher_entropy"] = normalize_batch(grid("teacher_entropy"), valid)[b_idx, t_idx].numpy()
    for k in ks:
        sfx = "" if k == default_k else f"_k{k}"
        signals = {"student_entropy": grid("student_entropy"), "disagreement": grid("disagreement" + sfx), "compat_mass": grid("compat_mass" + sfx)}
        tokens["norm_entropy" + sfx] = normalize_batch(signals["student_entropy"], valid)[b_idx, t_idx].numpy()
        tokens["norm_disagreement" + sfx] = normalize_batch(signals["disagreement"], valid)[b_idx, t_idx].numpy()
        tokens["norm_compat" + sfx] = normalize_batch(signals["compat_mass"], valid)[b_idx, t_idx].numpy()
        for name, score in selection_scores(signals, valid, seed=seed).items():
            column = name if name == "q3" else f"score_{name}"
            tokens[column + sfx] = score[b_idx, t_idx].numpy()
    return tokens


def resolved_models(config: DiagnoseConfig, resolved: ResolvedPair) -> dict[str, str]:
    """The model paths a run actually used (the testbed's include its cache key)."""
    return {"student_path": resolved.student_path, "teacher_path": resolved.teacher_path, "checkpoint_path": config.checkpoint}


def saved_config(config: DiagnoseConfig, resolved: ResolvedPair) -> dict:
    """What config.json records: the config and the resolved models (resuming must match both)."""
    return {**json.loads(json.dumps(config_to_dict(config))), "resolved_models": resolved_models(config, resolved)}


def check_resume(run_dir: Path, config: DiagnoseConfig, resolved: ResolvedPair) -> None:
    """A run directory holds one config and model pair: resuming with another is an error naming the keys."""
    saved_path = run_dir / "config.json"
    if not saved_path.is_file():
        return
    saved = json.loads(saved_path.read_text())
    current = saved_config(config, resolved)
    ignore = {"n_boot"}
    differing = sorted(k for k in set(saved) | set(current) if k not in ignore and saved.get(k) != current.get(k))
    if differing:
        raise ValueError(f"{run_dir} holds a run with a different config (keys: {', '.join(differing)}); use another run_name")


def run_diagnose(config: DiagnoseConfig, *, progress: bool = True) -> Path:
    """Run (or resume) the diagnostic; returns the run directory holding tokens.parquet."""
    from diagnostics.rollouts import SamplingConfig, generate_rollouts
    from diagnostics.store import make_manifest, read_store, write_store

    started = time.perf_counter()
    resolved = resolve_models(config)
    check_pair(resolved.student_path, resolved.teacher_path)  # cheap: tokenizers and configs only
    if config.mode == "checkpoint":
        check_pair(resolved.student_path, config.checkpoint)
    run_dir = Path(config.out_dir) / config.run_id(resolved_models(config, resolved))
    check_resume(run_dir, config, resolved)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", saved_config(config, resolved))
    ks = [resolved.k] + [k for k in config.extra_k if k != resolved.k]

    # 1. rollouts (held-out prompts), reused on resume
    rollouts_path = run_dir / "rollouts.parquet"
    if rollouts_path.is_file():
        rollouts = read_store(rollouts_path)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(resolved.student_path)
        sampling = SamplingConfig(temperature=config.temperature, top_p=config.top_p, max_new_tokens=resolved.max_new_tokens, n=1, seed=config.seed)
        prompts = bank_prompts(config, resolved)
        rollouts = generate_rollouts(resolved.student_path, tokenizer, prompts, sampling, backend=config.backend)
        manifest = make_manifest(model_path=resolved.student_path, tokenizer=tokenizer, backend=rollouts.attrs.get("backend", config.backend), sampling=dataclasses.asdict(sampling))
        write_store(rollouts, rollouts_path, manifest)

    pair = load_pair(resolved.student_path, resolved.teacher_path, device=config.device, dtype=config.dtype)
    trained = load_model(config.checkpoint, pair.device, pair.dtype) if config.mode == "checkpoint" else None

    # 2. the context bank
    bank_path = run_dir / "bank.parquet"
    if bank_path.is_file():
        bank_df = pd.read_parquet(bank_path)
        validate_bank(bank_df, pair.vocab_size, str(bank_path))
    else:
        bank_df = make_bank(rollouts, config.max_response_tokens, pair.vocab_size)
        write_parquet(bank_path, bank_df)
    bank = engine.bank_tensors(list(bank_df["prompt_ids"]), list(bank_df["response_ids"]), pair.tokenizer.pad_token_id or 0)
    seq_ids = bank_df["seq_id"].to_numpy()

    # 3. shards of gains and signals
    shard_dir = run_dir / "shards"
    n_shards = -(-len(bank) // config.shard_sequences)
    frames = []
    for shard in tqdm(range(n_shards), desc=f"diagnose ({config.mode})", disable=not progress):
        path = shard_dir / f"shard_{shard:04d}.parquet"
        if not path.is_file():
            rows = slice(shard * config.shard_sequences, (shard + 1) * config.shard_sequences)
            part = bank.select(rows)
            table = compute_shard(pair, part, config, ks, resolved.k, trained)
            write_parquet(path, to_frame(table, part.valid, seq_ids[rows]))
        frames.append(pd.read_parquet(path))
    tokens = pd.concat(frames, ignore_index=True)

    # 4. bank-wide normalisation and scores, token metadata
    tokens = add_scores(tokens, ks, resolved.k, config.seed)
    lengths = bank_df.set_index("seq_id")["response_ids"].map(len)
    prompt_of = bank_df.set_index("seq_id")["prompt_id"]
    tokens.insert(2, "prompt_id", tokens["seq_id"].map(prompt_of).to_numpy())
    tokens.insert(3, "resp_len", tokens["seq_id"].map(lengths).to_numpy())
    tokens.insert(4, "rel_pos", tokens["pos"] / tokens["resp_len"])
    token_ids = [int(bank_df["response_ids"].iloc[s][p]) for s, p in zip(tokens["seq_id"], tokens["pos"])]
    tokens.insert(5, "token_id", token_ids)
    tokens.insert(6, "token", pair.tokenizer.convert_ids_to_tokens(token_ids))
    write_parquet(run_dir / "tokens.parquet", tokens)

    # 5. the group variant: one update on each selector's kept set, gains everywhere
    if config.mode == "single-step" and config.group_selectors:
        group = run_group(pair, bank, tokens, config, seq_ids)
        write_parquet(run_dir / "group.parquet", group)

    method = "checkpoint" if config.mode == "checkpoint" else choose_method(config, pair.student, bank)
    write_json(run_dir / "manifest.json", build_manifest(config, resolved, pair, ks, bank_path, tokens, method, time.perf_counter() - started))
    return run_dir


def run_group(pair: ModelPair, bank: engine.BankTensors, tokens: pd.DataFrame, config: DiagnoseConfig, seq_ids: np.ndarray) -> pd.DataFrame:
    """Per selector and ratio: keep = select(score), one update on the kept set, gain at every position."""
    row_of = {s: i for i, s in enumerate(seq_ids)}
    b_idx = torch.tensor(tokens["seq_id"].map(row_of).to_numpy())
    t_idx = torch.tensor(tokens["pos"].to_numpy())
    teacher_lp = engine.response_logprobs(pair.teacher, bank, pair.vocab_size)
    step = engine.StepConfig(loss=config.loss, optimizer=config.optimizer, lr=config.lr)
    frames = []
    for selector in config.group_selectors:
        score = torch.full(bank.valid.shape, float("-inf"))
        score[b_idx, t_idx] = torch.tensor(tokens[f"score_{selector}"].to_numpy(), dtype=torch.float32)
        for ratio in config.group_ratios:
            keep = select(score, bank.valid, ratio, seed=config.seed)
            gain = engine.group_step_gains(pair.student, bank, teacher_lp, keep, step, pair.vocab_size)
            frames.append(pd.DataFrame({
                "selector": selector, "ratio": ratio, "seq_id": tokens["seq_id"].to_numpy(), "pos": tokens["pos"].to_numpy(),
                "kept": keep[b_idx, t_idx].numpy(), "gain": gain[b_idx, t_idx].numpy(),
            }))
    return pd.concat(frames, ignore_index=True)


def build_manifest(config, resolved: ResolvedPair, pair: ModelPair, ks, bank_path: Path, tokens: pd.DataFrame, method: str, seconds: float) -> dict:
    from diagnostics.store import package_versions

    return {
        "run_name": Path(bank_path).parent.name,
        "student_path": resolved.student_path,
        "teacher_path": resolved.teacher_path,
        "checkpoint_path": config.checkpoint or None,
        "bank_path": str(bank_path),
        "mode": config.mode,
        "loss": config.loss,
        "optimizer": config.optimizer,
        "lr": config.lr,
        "k": resolved.k,
        "extra_k": [k for k in ks if k != resolved.k],
        "seed": config.seed,
        "dtype": str(pair.dtype).removeprefix("torch."),
        "device": str(pair.device),
        "vocab_size": pair.vocab_size,
        "signal_mode": "exact",
        "gain": "absolute forward-KL reduction KL(pT||pS_before) - KL(pT||pS_after), nats",
        "method": method,
        "n_sequences": int(tokens["seq_id"].nunique()),
        "n_tokens": len(tokens),
        "n_nonfinite_gains": int((~np.isfinite(tokens["gain"].to_numpy())).sum()),
        "student_hash": directory_hash(resolved.student_path),
        "teacher_hash": directory_hash(resolved.teacher_path),
        "checkpoint_hash": directory_hash(config.checkpoint) if config.checkpoint else None,
        "tokenizer_hash": tokenizer_hash(pair.tokenizer),
        "versions": package_versions(),
        "config": config_to_dict(config),
        "seconds": round(seconds, 1),
    }
