"""The run setup both recipes share (`diagnostics.diagnose` and `opd.trainer`), written once.

* `resolve_pair`: the run's teacher-student pair -- real models as given, or the embedded testbed
  (built or reused from its cache) -- with its top-K and response-length defaults (`ResolvedPair`).
* `heldout_problems`, `load_prompts`: held-out problems: a split of the testbed's, or a slice of a real-model
  prompt set (`diagnostics.prompt_sets`: JSON / JSONL / parquet / hub id, column mapping, message lists).
* `config_hash`, `check_run_dir`, `claim_run_dir`: a run directory is named by a hash of what the run
  computes, and holds one config: continuing it with another is an error naming the differing keys;
  one process at a time works in it (`diagnostics.lock`).
* `check_k`, `check_prompts`: top-K values against the pair's vocabulary, and prompts against its
  tokenizer, as soon as the tokenizer is loaded (before the run directory is written).
* `make_bank`, `validate_bank`, `read_bank`, `bank_batch`: the frozen context bank (held-out
  responses of the base student, each cut to at most L tokens) and its padded tensors.
* `manifest_base`: the provenance keys every run manifest records (models, hashes, signal mode).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from diagnostics.config import ConfigError, config_to_dict
from diagnostics.forward import ResponseBatch
from diagnostics.lock import acquire_run_lock
from diagnostics.models import directory_hash, tokenizer_hash
from diagnostics.task import Problem

DEFAULT_K_REAL = 16  # the paper's default top-K for real (Qwen-sized) vocabularies
DEFAULT_MAX_NEW_TOKENS_REAL = 256  # response cap for real models when the config gives none
BANK_SPLIT_SEED = 2  # the testbed's held-out split of every context bank (diagnostic and training)


@dataclass(frozen=True)
class ResolvedPair:
    """The models a run uses. `testbed` is the `diagnostics.testbed.Testbed` when the pair is the
    embedded testbed (its paths include the build's cache key), else None."""

    student_path: str
    teacher_path: str
    k: int  # top-K of the set signals
    max_new_tokens: int  # rollout length cap
    testbed: Any | None = None


def resolve_pair(
    student: str, teacher: str, *, testbed_config: str, k: int = 0, max_new_tokens: int = 0, progress: bool = True
) -> ResolvedPair:
    """Real models as given (`k` and `max_new_tokens` default to the real-model values), or, when
    `student` is "", the embedded testbed built from `testbed_config` (its k and response length)."""
    if student:
        return ResolvedPair(student, teacher, k or DEFAULT_K_REAL, max_new_tokens or DEFAULT_MAX_NEW_TOKENS_REAL)
    from diagnostics.config import load_config
    from diagnostics.testbed import TestbedConfig, build_testbed

    testbed = build_testbed(load_config(TestbedConfig, testbed_config), progress=progress)
    tb = testbed.config
    return ResolvedPair(testbed.student_path, testbed.teacher_path, k or tb.k, max_new_tokens or tb.max_new_tokens,
                        testbed)


def heldout_problems(
    pair: ResolvedPair, n: int, *, split_seed: int, prompts: str, key: str, from_end: bool = False,
    prompt_column: str = "prompt", answer_column: str = "answer", require_answer: bool = False,
) -> list[Problem]:
    """n held-out problems: the testbed's split `split_seed`, or, for real models, the first n
    (`from_end`: the last n) of the prompt set `prompts` (`load_prompts`). `key` names the config key."""
    if pair.testbed is not None:
        from diagnostics.testbed import heldout_problems as testbed_heldout

        return testbed_heldout(pair.testbed.config, n, split_seed=split_seed)
    problems = load_prompts(prompts, key, prompt_column=prompt_column, answer_column=answer_column,
                            require_answer=require_answer)
    if len(problems) < n:
        raise ConfigError(f"{key}: {prompts} has {len(problems)} prompts, fewer than the {n} the run needs")
    return problems[-n:] if from_end else problems[:n]


def load_prompts(
    prompts: str, key: str, *, prompt_column: str = "prompt", answer_column: str = "answer",
    require_answer: bool = False,
) -> list[Problem]:
    """A real-model prompt set (`diagnostics.prompt_sets.load_prompt_set`: a .jsonl / .json / .parquet file
    or a hub id, column names or dotted paths, text or message-list prompts); "" is an error naming `key`."""
    from diagnostics.prompt_sets import load_prompt_set

    if not prompts:
        raise ConfigError(f"{key}: real models need a prompt file ({key}=path.jsonl, .json, .parquet or a hub id)")
    return load_prompt_set(prompts, prompt_column=prompt_column, answer_column=answer_column,
                           require_answer=require_answer)


# ------------------------------------------------------------------------------------------ run directory


def config_hash(payload: dict[str, Any]) -> str:
    """8 hex digits naming a run: sha256 of the payload as sorted JSON."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:8]


def check_run_dir(
    run_dir: Path, record: dict[str, Any], *, resume: bool | None = None, ignore: Collection[str] = ()
) -> None:
    """Check that `run_dir` may hold the run whose `config.json` is `record` (the caller writes it).

    resume None: continue the run when there is one (the diagnostic skips finished shards);
    True: there must be one to continue; False: there must be none. A saved config that differs
    from `record` outside the keys in `ignore` is an error naming each key and both values.
    """
    saved_path = Path(run_dir) / "config.json"
    if not saved_path.is_file():
        if resume:
            raise FileNotFoundError(f"--resume: {run_dir} holds no run to resume")
        return
    if resume is False:
        raise FileExistsError(
            f"{run_dir} already holds a run: pass --resume to continue it, or run_name=<new name> for a new one"
        )
    try:
        saved = json.loads(saved_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{saved_path}: the run's saved config is not valid JSON ({exc}); the run directory is "
                          f"damaged: restore the file or use another run_name") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{saved_path}: the run's saved config is not a JSON object; use another run_name")
    differing = sorted(k for k in set(saved) | set(record) if k not in ignore and saved.get(k) != record.get(k))
    if differing:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {record.get(k)!r}" for k in differing)
        raise ConfigError(
            f"{run_dir} holds a run with a different config (differing keys: {detail}); use another run_name"
        )


def claim_run_dir(
    run_dir: Path, record: dict[str, Any], *, resume: bool | None = None, ignore: Collection[str] = (),
    lock: bool = True,
) -> None:
    """`check_run_dir`, then this process's lock on `run_dir` (`diagnostics.lock`), then the check again.

    The first check fails before the directory is created; the second, under the lock, sees what a
    process that held the lock before us left. `lock` False: another rank of this run holds it.
    """
    check_run_dir(run_dir, record, resume=resume, ignore=ignore)
    if lock:
        acquire_run_lock(run_dir)
        check_run_dir(run_dir, record, resume=resume, ignore=ignore)


def check_k(vocab_size: int, *, k: int, extra_k: Collection[int] = (), key: str = "k") -> None:
    """Every top-K must be below the vocabulary: K >= V makes every token "in the top-K", so C = 1 - 0
    carries no information (and K > V cannot be computed); raised right after the model config is read."""
    if k >= vocab_size:
        raise ConfigError(f"{key}: K={k} is not below the pair's vocabulary of {vocab_size} tokens "
                          f"(top-K signals need 1 <= K < {vocab_size})")
    bad = [value for value in extra_k if value >= vocab_size]
    if bad:
        raise ConfigError(f"extra_k: K={bad[0]} is not below the pair's vocabulary of {vocab_size} tokens "
                          f"(top-K signals need 1 <= K < {vocab_size})")


def check_prompts(
    tokenizer: Any, prompts: list[Any], source: str, *, rendered: bool = False, enable_thinking: bool | None = None
) -> None:
    """Every prompt as the model will see it (chat template applied, with `enable_thinking`, unless
    `rendered`) encodes without losing a character (`diagnostics.prompts.check_encodable`); the error
    names `source` and the prompt."""
    from diagnostics.prompts import check_encodable, render_text

    for i, prompt in enumerate(prompts):
        text = prompt if rendered else render_text(tokenizer, prompt, enable_thinking=enable_thinking)
        check_encodable(tokenizer, text, f"{source}: prompt {i + 1}")


# ------------------------------------------------------------------------------------------ the context bank


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
                raise ValueError(f"{where}: seq_id {row.seq_id} {name} has token id {bad[0]} "
                                 f"outside the vocabulary [0, {vocab_size})")


def read_bank(path: Path, vocab_size: int) -> pd.DataFrame:
    """A bank written by `make_bank`, validated against the pair's vocabulary."""
    bank = pd.read_parquet(path)
    validate_bank(bank, vocab_size, str(path))
    return bank


def bank_batch(bank: pd.DataFrame, pad_id: int | None) -> ResponseBatch:
    """The bank as one padded batch ([B, L] ids, [B, T] positions), in row order; every response
    position is valid (pad id 0 when the tokenizer has none)."""
    ids = {name: [[int(t) for t in row] for row in bank[name]] for name in ("prompt_ids", "response_ids")}
    return ResponseBatch.from_ids(ids["prompt_ids"], ids["response_ids"], pad_id or 0)


# ------------------------------------------------------------------------------------------ manifest


def manifest_base(
    pair: ResolvedPair,
    tokenizer: Any,
    *,
    signal_mode: str,
    vocab_size: int,
    device: torch.device,
    dtype: torch.dtype,
    config: Any,
    seconds: float,
    versions: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The provenance keys of every run manifest; each recipe adds its own.

    `signal_mode` is the mode the run's signals were computed in ("exact": full-vocabulary logits;
    "topk": top-K log-probs only), as reported by the scorer that computed them.
    """
    from diagnostics.store import package_versions

    return {
        "student_path": pair.student_path,
        "teacher_path": pair.teacher_path,
        "student_hash": directory_hash(pair.student_path),
        "teacher_hash": directory_hash(pair.teacher_path),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "signal_mode": signal_mode,
        "k": pair.k,
        "vocab_size": vocab_size,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "versions": versions or package_versions(),
        "config": config_to_dict(config),
        "seconds": round(seconds, 1),
    }
