"""A tiny random Qwen2 and random prompt/response ids, shared by the forward and training-step tests.

Importable from any test module: pytest puts tests/ (the folder of the root conftest.py) on sys.path.
"""

from __future__ import annotations

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

V_ROWS, V = 40, 37  # LM-head rows vs shared vocabulary: padding rows are sliced away


def tiny_model(seed: int) -> Qwen2ForCausalLM:
    """Two layers, 32 wide, V_ROWS LM-head rows, untied; float32, weights from torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=V_ROWS, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).float()


def random_ids(gen: torch.Generator) -> tuple[list[list[int]], list[list[int]]]:
    """Four prompts (3, 5, 2, 4 tokens) and four responses (6, 2, 5, 4 tokens) of ids below V."""
    prompts = [torch.randint(0, V, (n,), generator=gen).tolist() for n in (3, 5, 2, 4)]
    responses = [torch.randint(0, V, (n,), generator=gen).tolist() for n in (6, 2, 5, 4)]
    return prompts, responses
