"""Prompts as a model sees them: chat-template rendering, token ids, context-length checks, stop tokens.

Shared by the rollout backends (`diagnostics.generation.backends`), the diagnostic and the trainer:
* `render_text`: text (or a message list) through the tokenizer's chat template when it has one
  (`diagnostics.data.prompt_sets.render_chat`, with Qwen3's `enable_thinking` switch);
* `render_prompts`: token ids of text, message-list or token-id prompts; a character the tokenizer
  cannot encode (dropped, or mapped to its unknown token) is an error naming the prompt and the character
  (`check_encodable`), never a silently different prompt;
* `fit_prompts`: prompt + max_new_tokens within the model's context (or left-truncated);
* `stop_token_ids`, `cut_at_stop`: where a response ends (EOS included);
* `text_config`, `max_positions`, `load_generation_config`: what a checkpoint declares.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np
from transformers import GenerationConfig, PreTrainedTokenizerBase

from diagnostics.data.prompt_sets import render_chat

Prompt = str | Sequence[dict[str, str]] | Sequence[int]


def render_text(
    tokenizer: PreTrainedTokenizerBase, prompt: str | Sequence[dict[str, str]], *, enable_thinking: bool | None = None
) -> str:
    """The prompt as text the model sees: one user turn (or the message list) through the chat template
    with the generation prompt when the tokenizer has a template; plain text as it is otherwise.
    `enable_thinking`: Qwen3's switch (None = the template's default). One renderer for every caller:
    `diagnostics.data.prompt_sets.render_chat`."""
    return render_chat(tokenizer, prompt, enable_thinking=enable_thinking)


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
            check_encodable(tokenizer, prompt, f"prompts[{i}]")
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        elif isinstance(prompt, str) or (len(prompt) and isinstance(prompt[0], dict)):
            if not has_template:
                raise ValueError(f"prompts[{i}]: a chat message list needs a tokenizer with a chat template")
            text = render_text(tokenizer, prompt)
            check_encodable(tokenizer, text, f"prompts[{i}]")
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        elif all(isinstance(t, (int, np.integer)) for t in prompt):
            ids = [int(t) for t in prompt]
        else:
            raise TypeError(
                f"prompts[{i}]: expected text, a chat message list or token ids, got {type(prompt).__name__}"
            )
        if not ids:
            raise ValueError(f"prompts[{i}]: the prompt encodes to zero tokens")
        out.append(ids)
    return out


_encodable: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> characters known to encode


def check_encodable(tokenizer: PreTrainedTokenizerBase, text: str, where: str) -> None:
    """Raise ValueError naming `where`, the character and its offset when a character of `text` encodes to
    nothing (a byte-level BPE without that byte drops it) or to the unknown token.

    Checked per distinct character: whitespace is skipped (some tokenizers fold it into the next token).
    """
    known = _encodable.setdefault(tokenizer, set())
    unk = tokenizer.unk_token_id
    for offset, char in enumerate(text):
        if char in known or char.isspace():
            continue
        ids = tokenizer(char, add_special_tokens=False)["input_ids"]
        if not ids or (unk is not None and unk in ids):
            raise ValueError(f"{where}: character {char!r} (U+{ord(char):04X}) at offset {offset} is not in the "
                             f"tokenizer's vocabulary ({'dropped' if not ids else 'unknown token'}); "
                             f"remove it or use a tokenizer that encodes it")
        known.add(char)


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
                    f"prompt {i + 1}: {len(ids)} prompt tokens + max_new_tokens={max_new_tokens} exceed the model's "
                    f"{max_positions} positions (max_position_embeddings); shorten the prompt or lower max_new_tokens"
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


def text_config(config):
    """The language model's part of a (possibly multimodal) config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def max_positions(config) -> int | None:
    """The model's context length (max_position_embeddings), or None if it declares none."""
    value = getattr(text_config(config), "max_position_embeddings", None)
    return int(value) if value is not None else None


def load_generation_config(path: str) -> GenerationConfig | None:
    """The checkpoint's generation_config.json, or None when it has none."""
    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json
        return None
