"""The run setup both recipes share (`diagnostics.diagnose` and `opd.trainer`): the pair and its prompts, written once.

* `resolve_pair`: the run's teacher-student pair -- real models as given, or the embedded testbed
  (built or reused from its cache) -- with its top-K and response-length defaults (`ResolvedPair`).
* `heldout_problems`, `load_prompts`: held-out problems: a split of the testbed's, or a slice of a real-model
  prompt set (`diagnostics.data.prompt_sets`: JSON / JSONL / parquet / hub id, column mapping, message lists).
* `check_k`, `check_prompts`: top-K values against the pair's vocabulary, and prompts against its
  tokenizer, as soon as the tokenizer is loaded (before the run directory is written).
* `manifest_base`: the provenance keys every run manifest records (models, hashes, signal mode).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig

from diagnostics.core.config import ConfigError, config_to_dict, load_config
from diagnostics.data.problems import Problem
from diagnostics.data.prompt_sets import load_prompt_set
from diagnostics.data.prompts import check_encodable, max_positions, render_text
from diagnostics.generation.store import package_versions
from diagnostics.lm.models import directory_hash, tokenizer_hash
from diagnostics.testbed.build import build_testbed
from diagnostics.testbed.config import TestbedConfig
from diagnostics.testbed.config import heldout_problems as testbed_heldout

DEFAULT_K_REAL = 16  # the paper's default top-K for real (Qwen-sized) vocabularies
DEFAULT_MAX_NEW_TOKENS_REAL = 256  # response cap for real models when the config gives none
BANK_SPLIT_SEED = 2  # the testbed's held-out split of every context bank (diagnostic and training)


@dataclass(frozen=True)
class ResolvedPair:
    """The models a run uses. `testbed` is the `diagnostics.testbed.build.Testbed` when the pair is the
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
    try:
        testbed_cfg = load_config(TestbedConfig, testbed_config)
    except ConfigError as exc:  # e.g. a diagnose or train config given as the testbed's: name the key that took it
        raise ConfigError(f"testbed_config: {exc}") from None
    testbed = build_testbed(testbed_cfg, progress=progress)
    tb = testbed.config
    limit = max_positions(AutoConfig.from_pretrained(testbed.student_path))
    if limit is not None and max_new_tokens >= limit:  # generate() would run past the position table
        raise ConfigError(f"max_new_tokens: {max_new_tokens} leaves no room for a prompt in the testbed models' "
                          f"{limit} positions (0 = the testbed's response length, {tb.max_new_tokens})")
    return ResolvedPair(testbed.student_path, testbed.teacher_path, k or tb.k, max_new_tokens or tb.max_new_tokens,
                        testbed)


def heldout_problems(
    pair: ResolvedPair, n: int, *, split_seed: int, prompts: str, key: str, from_end: bool = False,
    prompt_column: str = "prompt", answer_column: str = "answer", require_answer: bool = False,
) -> list[Problem]:
    """n held-out problems: the testbed's split `split_seed`, or, for real models, the first n
    (`from_end`: the last n) of the prompt set `prompts` (`load_prompts`). `key` names the config key."""
    if pair.testbed is not None:

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
    """A real-model prompt set (`diagnostics.data.prompt_sets.load_prompt_set`: a .jsonl / .json / .parquet file
    or a hub id, column names or dotted paths, text or message-list prompts); "" is an error naming `key`."""

    if not prompts:
        raise ConfigError(f"{key}: real models need a prompt file ({key}=path.jsonl, .json, .parquet or a hub id)")
    return load_prompt_set(prompts, prompt_column=prompt_column, answer_column=answer_column,
                           require_answer=require_answer)


# ------------------------------------------------------------------------------------------ run directory


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
    tokenizer: Any, prompts: list[Any], source: str, *, rendered: bool = False, enable_thinking: bool | None = None,
    model_path: str = "", max_new_tokens: int = 0,
) -> None:
    """Every prompt as the model will see it (chat template applied, with `enable_thinking`, unless
    `rendered`) encodes without losing a character (`diagnostics.data.prompts.check_encodable`) and, given
    `model_path`, fits the model's context with `max_new_tokens` after it; the error names `source` and the
    prompt (its row in the file) and the key that changes it."""
    limit = max_positions(AutoConfig.from_pretrained(model_path)) if model_path else None
    for i, prompt in enumerate(prompts):
        text = prompt if rendered else render_text(tokenizer, prompt, enable_thinking=enable_thinking)
        check_encodable(tokenizer, text, f"{source}: prompt {i + 1}")
        n_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"]) if limit is not None else 0
        if limit is not None and n_tokens + max_new_tokens > limit:
            raise ConfigError(f"{source}: prompt {i + 1}: {n_tokens} prompt tokens + max_new_tokens={max_new_tokens} "
                              f"exceed the model's {limit} positions (max_position_embeddings); shorten the prompt "
                              f"or lower max_new_tokens")


# ------------------------------------------------------------------------------------------ the context bank


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
