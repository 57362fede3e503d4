"""Rollout backends behind one seam: `generate` (sample responses) and `score` (teacher signals).

A backend is an object with a `name`, the `signal_mode` of its scores ("exact": full-vocabulary
logits of both models in this process; "topk": the teacher's top-K log-probs only) and two methods:

    generate(model, prompts, sampling, stop_ids, options) -> list of records, one per response:
        {"prompt": index, "sample_idx", "response_ids", "response_logprobs", "finish_reason"
         (+ "topk_ids", "topk_logprobs" when sampling.logprobs_k > 0)}
    score(rollouts, *, teacher, k, stop_ids, student=None, vocab_size=None, progress=True, temperature=1.0)
        -> diagnostics.generation.scoring.ScoredBatch  (temperature != 1: also
        `diagnostics.generation.scoring.TEMPERED_KEYS`, or an error where the backend cannot give them)

Two are built in, registered by name: `hf` (transformers `generate`, also on the trainer's live
in-memory student; exact scores) and `vllm` (a model directory served by one cached vLLM engine per
process; top-K scores from `prompt_logprobs`). A new backend is one class with `@register_backend`
in a module of this package (or anywhere imported before use). Implementations are imported on
first use, so `import diagnostics.generation.rollouts` never imports vLLM.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch

from diagnostics.core.config import check
from diagnostics.generation.scoring import ScoredBatch

BUILTIN = {"hf": "diagnostics.generation.hf", "vllm": "diagnostics.generation.vllm"}  # name -> module
_BACKENDS: dict[str, Backend] = {}


@dataclass(frozen=True)
class GenerateOptions:
    """How a backend runs `generate` (each uses what applies to it).

    pad_id: left-padding id (hf). max_model_len: the context length to enforce (vllm engine).
    batch_size: sequences per `generate` call (hf). max_tokens_per_batch: tokens per batch of the
    teacher-forced log-prob recompute (hf). device, dtype: when hf loads a model directory.
    """

    pad_id: int = 0
    max_model_len: int | None = None
    batch_size: int = 64
    max_tokens_per_batch: int = 16384
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True
    vocab_size: int | None = None  # tokenizer length: LM-head rows at or beyond it are padding, never sampled (hf)


class Backend(Protocol):
    """What `generate_rollouts` and the scorers need from a backend (see the module docstring)."""

    name: str
    signal_mode: str

    def generate(self, model: Any, prompts: list[list[int]], sampling: SamplingConfig, stop_ids: list[int],
                 options: GenerateOptions) -> list[dict]: ...

    def score(self, rollouts: pd.DataFrame, *, teacher: Any, k: int, stop_ids: list[int] | None,
              student: torch.nn.Module | None = None, vocab_size: int | None = None,
              progress: bool = True, temperature: float = 1.0) -> ScoredBatch: ...


def register_backend(name: str) -> Callable[[type], type]:
    """Class decorator: register one instance of the class under `name` (which sets its `name`); a duplicate
    name raises."""

    def decorator(cls: type) -> type:
        if name in _BACKENDS:
            raise ValueError(f"backend {name!r} is already registered")
        instance = cls()
        instance.name = name
        _BACKENDS[name] = instance
        return cls

    return decorator


def list_backends() -> list[str]:
    """Every backend name: the built-in ones and any registered since."""
    return sorted(set(BUILTIN) | set(_BACKENDS))


def get_backend(name: str) -> Backend:
    """The backend registered as `name` (a built-in one is imported on first use); unknown names raise."""
    if name not in _BACKENDS and name in BUILTIN:
        importlib.import_module(BUILTIN[name])
    if name not in _BACKENDS:
        raise ValueError(f"backend: unknown backend {name!r}; known: {', '.join(['auto', *list_backends()])}")
    return _BACKENDS[name]


def vllm_available() -> bool:
    """Whether the vllm package can be imported."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, model: Any) -> str:
    """`auto`: vLLM when a CUDA device and vLLM are present and the model is a path, else HF.
    An in-memory model can only be sampled by hf."""
    is_path = isinstance(model, (str, Path))
    if backend == "auto":
        return "vllm" if is_path and torch.cuda.is_available() and vllm_available() else "hf"
    if backend not in list_backends():
        raise ValueError(f"backend: must be one of {['auto', *list_backends()]}, got {backend!r}")
    if backend == "vllm" and not is_path:
        raise ValueError("backend='vllm' needs a model directory, not an in-memory model (use backend='hf')")
    return backend


@dataclass
class SamplingConfig:
    """How rollouts are sampled (TRL naming). Temperature 1.0 is the paper's rollout temperature."""

    temperature: float = 1.0  # > 0; log-probs are log_softmax(logits / temperature)
    top_p: float = 1.0  # nucleus mass in (0, 1]; 1 = no truncation
    max_new_tokens: int = 256  # response length cap (EOS included)
    n: int = 1  # samples per prompt
    seed: int = 0  # per-prompt (vLLM) / per-batch (HF) seeds are derived from it
    logprobs_k: int = 0  # 0: no top-K; else store the student's top-K ids/log-probs per position

    def __post_init__(self) -> None:
        check(self.temperature > 0, "temperature",
              f"must be > 0 (greedy decoding has no log-probs), got {self.temperature}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(self.n >= 1, "n", f"must be >= 1, got {self.n}")
        check(0 <= self.seed < 2**63, "seed", f"must be in [0, 2**63), got {self.seed}")
        check(self.logprobs_k >= 0, "logprobs_k", f"must be >= 0, got {self.logprobs_k}")
