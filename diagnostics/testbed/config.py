"""The testbed's configuration and the facts derived from it: model specs, vocabularies, seeds, held-out split.

`TestbedConfig` (mirrored by configs/testbed*.yaml) names a testbed; its `cache_key()` (a hash of every field
that changes the build, BUILD_VERSION included) names the cached or shipped build. `heldout_problems` is the
report's and the diagnostic's held-out split; `task_token_ids` the token ids a task's words use.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from transformers import PreTrainedTokenizerBase
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

from diagnostics.core.config import check, config_to_dict
from diagnostics.core.paths import check_user_path
from diagnostics.data.problems import Problem
from diagnostics.testbed.qwen_vocab import (
    build_qwen2_tokenizer,
    single_token_words,
)
from diagnostics.testbed.task import ALL_WORDS, TASKS, Task, task_words

# Bump when the build procedure changes, so old caches are not reused.
BUILD_VERSION = 4


# vLLM's CPU attention kernels exist for these head sizes only; the testbed must run under vLLM.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


# A minimal chat template so the chat-message path works on the testbed: the user turn is the prompt.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


CACHE_ENV = "TAOPD_CACHE_DIR"


def default_cache_dir() -> Path:
    """The testbed cache, one place per user whatever the working directory: $TAOPD_CACHE_DIR/testbed, else
    $XDG_CACHE_HOME/taopd/testbed, else ~/.cache/taopd/testbed (a relative cache_dir would rebuild the testbed,
    minutes, in every directory a command is run from)."""
    if os.environ.get(CACHE_ENV):
        return check_user_path(os.environ[CACHE_ENV], CACHE_ENV, "writable directory") / "testbed"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "taopd" / "testbed"


@dataclass
class ModelSpec:
    hidden_size: int = 192  # width of the residual stream
    num_layers: int = 3
    num_heads: int = 6
    intermediate_size: int = 512
    vocab_multiple: int = 1  # pad LM-head rows to a multiple of this (Qwen-style padding)
    vocab_rows: int = 0  # > 0: exactly this many LM-head rows (Qwen2.5: 151,936), instead of vocab_multiple
    tie_embeddings: bool = False  # one matrix for the input embedding and the LM head (Qwen2.5-0.5B..3B tie)
    train_steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_multiple", "batch_size"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        check(self.hidden_size % self.num_heads == 0, "hidden_size", "must be divisible by num_heads")
        head_size = self.hidden_size // self.num_heads
        check(
            head_size in VLLM_CPU_HEAD_SIZES,
            "num_heads",
            f"head size hidden_size/num_heads = {head_size} is not one vLLM's CPU attention supports "
            f"{VLLM_CPU_HEAD_SIZES}",
        )
        check(self.vocab_rows >= 0, "vocab_rows", f"must be >= 0, got {self.vocab_rows}")
        check(self.train_steps >= 0, "train_steps", f"must be >= 0, got {self.train_steps}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")


@dataclass
class TestbedConfig:
    """Config of `taopd testbed`; `configs/testbed.yaml` mirrors it key for key."""

    __test__ = False  # not a pytest test class despite its name

    seed: int = 0
    task: str = "trace"  # trace (the selection-sort trace) | sort (the sorted list only)
    vocabulary: str = "task"  # task (a BPE of the task's words only) | qwen2 (the real Qwen2 vocabulary, 151,665)
    n_items: int = 8  # words per problem
    n_words: int = 200  # size of the task's word vocabulary, each word one token
    k: int = 4  # default top-K of this model pair
    teacher: ModelSpec = field(
        default_factory=lambda: ModelSpec(
            hidden_size=128, num_layers=2, num_heads=4, intermediate_size=384, vocab_multiple=64,
            train_steps=2500, lr=3e-3, warmup_steps=100,
        )
    )
    student: ModelSpec = field(
        default_factory=lambda: ModelSpec(
            hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, train_steps=850, lr=2e-3
        )
    )
    eval_problems: int = 500  # held-out problems for the accuracy report
    spread_problems: int = 200  # student samples for the C-spread report
    capacity_steps: int = 3000  # >0: keep training the student to this step and report its accuracy
    # vocabulary qwen2: the task is learned on its own tokens, then this many full-softmax steps train one shared
    # offset of the other LM-head rows (the rest at calibration_body_lr; diagnostics.testbed.qwen_vocab.calibrate_rows)
    calibration_steps: int = 0
    calibration_batch_size: int = 8
    calibration_lr: float = 3e-3
    calibration_body_lr: float = 0.0  # > 0: the body and the task's rows train with the full softmax too
    cache_dir: str = ""  # "" = the per-user cache (default_cache_dir), whatever the working directory

    def __post_init__(self) -> None:
        check(self.task in TASKS, "task", f"must be one of {sorted(TASKS)}, got {self.task!r}")
        check(
            self.capacity_steps == 0 or self.capacity_steps > self.student.train_steps,
            "capacity_steps",
            f"must be 0 or > student.train_steps ({self.student.train_steps}), got {self.capacity_steps}",
        )
        check(self.n_items >= 2, "n_items", f"must be >= 2, got {self.n_items}")
        check(self.vocabulary in VOCABULARIES, "vocabulary", f"must be one of {VOCABULARIES}, got {self.vocabulary!r}")
        pool = len(word_pool(self.vocabulary))
        check(self.n_items <= self.n_words <= pool, "n_words", f"must be in [n_items, {pool}], got {self.n_words}")
        check(self.calibration_steps >= 0, "calibration_steps", f"must be >= 0, got {self.calibration_steps}")
        check(self.calibration_batch_size >= 1, "calibration_batch_size",
              f"must be >= 1, got {self.calibration_batch_size}")
        check(self.calibration_lr > 0, "calibration_lr", f"must be > 0, got {self.calibration_lr}")
        check(self.calibration_body_lr >= 0, "calibration_body_lr", f"must be >= 0, got {self.calibration_body_lr}")
        check(self.k >= 1, "k", f"must be >= 1, got {self.k}")
        check(self.eval_problems >= 1, "eval_problems", f"must be >= 1, got {self.eval_problems}")
        check(self.spread_problems >= 1, "spread_problems", f"must be >= 1, got {self.spread_problems}")

    @property
    def task_spec(self) -> Task:
        return TASKS[self.task]

    @property
    def max_new_tokens(self) -> int:
        """Response length in tokens, EOS included (every problem of a task has the same length)."""
        return self.task_spec.response_tokens(self.n_items)

    def problems(self, n: int, seed: int) -> list[Problem]:
        """`n` problems of this testbed's task from the seeded stream `seed`."""
        return self.task_spec.problems(n, seed=seed, n_items=self.n_items, n_words=self.n_words,
                                       pool=word_pool(self.vocabulary))

    def cache_root(self) -> Path:
        """Where builds of this config live: `cache_dir`, or the per-user default."""
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()

    def cache_key(self) -> str:
        payload = config_to_dict(self)
        payload.pop("cache_dir")
        # fields added after version 4 stay out of the hash at the values older builds had, so their caches stay valid
        later = (("task", "sort"), ("capacity_steps", 0), ("vocabulary", "task"), ("calibration_steps", 0),
                 ("calibration_batch_size", 8), ("calibration_lr", 3e-3), ("calibration_body_lr", 0.0))
        for key, default in later:
            if payload[key] == default:
                payload.pop(key)
        for role in ("teacher", "student"):
            for key, default in (("vocab_rows", 0), ("tie_embeddings", False)):
                if payload[role][key] == default:
                    payload[role].pop(key)
        payload["build_version"] = BUILD_VERSION
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


VOCABULARIES = ("task", "qwen2")


@functools.cache
def word_pool(vocabulary: str) -> tuple[str, ...]:
    """The task's candidate words (sorted) for a vocabulary: with Qwen2's, those whose ` word` is one token."""
    if vocabulary == "qwen2":
        return tuple(single_token_words(qwen2_tokenizer(), ALL_WORDS))
    return tuple(ALL_WORDS)


@functools.cache
def qwen2_tokenizer() -> Qwen2Tokenizer:
    """The Qwen2 tokenizer with the testbed's chat template (built once per process, ~3 s)."""
    tokenizer = build_qwen2_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def task_token_ids(config: TestbedConfig, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every token id the task's prompts and responses use (words, `sort`, ` :`, symbols, EOS), sorted."""
    texts = ["sort :", *(" " + w for w in task_words(config.n_words, word_pool(config.vocabulary))),
             *(" " + s for s in config.task_spec.symbols)]
    ids = {i for text in texts for i in tokenizer(text, add_special_tokens=False)["input_ids"]}
    return sorted(ids | {tokenizer.eos_token_id})


# Held-out problems use seeds far from the training streams.
TRAIN_SEED_OFFSET = {"teacher": 1_000, "student": 2_000}


CALIBRATION_SEED_OFFSET = 3_000


HELDOUT_SEED = 7_777_777


def heldout_problems(config: TestbedConfig, n: int, *, split_seed: int = 0) -> list[Problem]:
    """Held-out problems (never trained on in practice: drawn from a separate seed stream)."""
    return config.problems(n, HELDOUT_SEED + split_seed)
