"""Loading a teacher-student pair through transformers Auto classes, and checking they are compatible.

Token-level distillation compares the two models' next-token distributions id by id, so the pair
must share one tokenizer. `check_compatibility` runs before any weights are loaded: the tokenizers
must map the same ids to the same strings with the same special tokens, and the models' vocabulary
(LM-head rows) may differ only by padding rows beyond the tokenizer's length (Qwen2.5: 151,936 rows
for 0.5B-3B vs 152,064 for 7B+, tokenizer length 151,665). Those rows are dropped from both sides
consistently: every logit tensor handed to `diagnostics.signals` is sliced to `pair.vocab_size`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from diagnostics.core.paths import check_user_path
from diagnostics.core.progress import quiet_library_bars


class IncompatibleModelsError(ValueError):
    """The teacher and student cannot be compared token by token."""


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is float32 on CPU (exact comparisons) and bfloat16 on GPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype: must be one of {['auto', *table]}, got {dtype!r}")
    return table[dtype]


def check_path(path: str, what: str) -> None:
    """A local-looking path that does not exist, or a directory that holds no model, is an error now
    naming `what` and the path, not a hub lookup or a tokenizer library's message later."""
    looks_local = path.startswith((".", "/", "~")) or Path(path).exists() or path.count("/") > 1
    local = Path(path).expanduser()
    if looks_local or os.path.lexists(local):  # a symlink loop or a file named here is said as such
        try:
            check_user_path(local, what, "directory")
        except FileNotFoundError:
            raise FileNotFoundError(f"{what}: model directory {path} does not exist") from None
    if looks_local and not (local / "config.json").is_file():
        held = sorted(p.name for p in local.iterdir())[:5]
        raise FileNotFoundError(f"{what}: {path} holds no model (no config.json; "
                                f"{'it is empty' if not held else 'found: ' + ', '.join(held)})")
    for weights in sorted(local.glob("*.safetensors")) if looks_local else []:
        if not os.access(weights, os.R_OK):  # safetensors reports an unreadable file as "No such file"
            raise PermissionError(errno.EACCES, f"{what}: cannot read the model weights", str(weights))
        try:  # the header only (memory-mapped): a truncated file fails here, before any run directory is written
            with safe_open(str(weights), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{what}: {weights} is damaged ({exc}); a truncated download? re-download or re-save "
                             f"the model") from None


def _pretrained(loader, path: str, what: str):
    """`loader.from_pretrained(path)`, its errors (no network for a hub id, unreadable files) naming `what`."""
    try:
        return loader.from_pretrained(path)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not Path(path).expanduser().is_dir():
            raise FileNotFoundError(f"{what}: {path} is not a local directory and cannot be loaded from the Hugging "
                                    f"Face hub or its cache (offline? {first})") from None
        raise ValueError(f"{what}: cannot load {loader.__name__.removeprefix('Auto')} from {path}: {first}") from None


def check_compatibility(
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
    student_vocab_rows: int,
    teacher_vocab_rows: int,
) -> int:
    """Return the shared vocabulary size V (the tokenizer's length) or raise naming the first mismatch.

    Rows of either LM head beyond V are padding and are dropped from both sides.
    """
    n_student, n_teacher = len(student_tokenizer), len(teacher_tokenizer)
    student_tokens = student_tokenizer.convert_ids_to_tokens(list(range(n_student)))
    teacher_tokens = teacher_tokenizer.convert_ids_to_tokens(list(range(n_teacher)))
    for token_id in range(max(n_student, n_teacher)):
        s = student_tokens[token_id] if token_id < n_student else "<no such id>"
        t = teacher_tokens[token_id] if token_id < n_teacher else "<no such id>"
        if s != t:
            raise IncompatibleModelsError(
                f"tokenizers differ at id {token_id}: student {s!r} vs teacher {t!r}"
            )
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id"):
        s, t = getattr(student_tokenizer, attr), getattr(teacher_tokenizer, attr)
        if s != t:
            raise IncompatibleModelsError(f"special token {attr} differs: student {s} vs teacher {t}")
    s_special = sorted(student_tokenizer.all_special_ids)
    t_special = sorted(teacher_tokenizer.all_special_ids)
    if s_special != t_special:
        raise IncompatibleModelsError(f"special token ids differ: student {s_special} vs teacher {t_special}")
    vocab = n_student
    for who, rows in (("student", student_vocab_rows), ("teacher", teacher_vocab_rows)):
        if rows < vocab:
            raise IncompatibleModelsError(
                f"{who} model has {rows} vocabulary rows but the tokenizer has {vocab} tokens "
                f"(ids {rows}..{vocab - 1} have no logits)"
            )
    return vocab


def vocab_rows(config) -> int:
    """Number of LM-head rows a model config declares."""
    rows = getattr(config, "vocab_size", None)
    if rows is None and hasattr(config, "get_text_config"):
        rows = config.get_text_config().vocab_size
    return int(rows)


@dataclass
class ModelPair:
    """A student and a teacher that share a tokenizer; `vocab_size` is the shared (unpadded) V."""

    student: torch.nn.Module
    teacher: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    vocab_size: int
    student_path: str
    teacher_path: str
    device: torch.device
    dtype: torch.dtype


def check_pair(student_path: str, teacher_path: str, *, names: tuple[str, str] = ("student", "teacher"),
               same_architecture: bool = False) -> tuple[PreTrainedTokenizerBase, int]:
    """The compatibility check alone (tokenizers and configs, no weights). Returns (tokenizer, V).
    `names` are the config keys of the two paths, for the error messages."""
    check_path(student_path, names[0])
    check_path(teacher_path, names[1])
    student_tok = _pretrained(AutoTokenizer, student_path, names[0])
    teacher_tok = _pretrained(AutoTokenizer, teacher_path, names[1])
    paths = (student_path, teacher_path)
    configs = [_pretrained(AutoConfig, path, what) for path, what in zip(paths, names)]
    for config, path, what in zip(configs, paths, names):
        check_causal_lm(config, path, what)
        check_weight_rows(config, path, what)
    vocab = check_compatibility(student_tok, teacher_tok, vocab_rows(configs[0]), vocab_rows(configs[1]))
    if same_architecture:  # the second is a trained state of the first (mode=checkpoint)
        check_same_architecture(configs, paths, names)
    return student_tok, vocab


ARCHITECTURE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def check_same_architecture(configs: list, paths: tuple[str, str], names: tuple[str, str]) -> None:
    """A trained checkpoint of the base model has the base's architecture (a checkpoint of another model, say the
    teacher, shares the tokenizer but is no state of this student: every gain would compare two models)."""
    for key in ARCHITECTURE_KEYS:
        a, b = (getattr(config, key, None) for config in configs)
        if a != b:
            raise IncompatibleModelsError(f"{names[1]}: {paths[1]} is not a trained copy of the {names[0]} "
                                          f"({key} {b} vs the {names[0]}'s {a})")


def check_causal_lm(config, path: str, what: str) -> None:
    """The model predicts each token from the ones before it (a causal LM): an encoder's LM head (BERT) sees the
    tokens after a position too, so its "next-token" distributions, and every signal built on them, are not
    next-token predictions; an encoder-decoder has no single-stream next-token head either."""
    kind = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise IncompatibleModelsError(f"{what}: {path} is an encoder-decoder model ({kind}); on-policy distillation "
                                      f"here needs two causal (left-to-right) language models")
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise IncompatibleModelsError(f"{what}: {path} is a {kind} model, which has no causal language-model head "
                                      f"in transformers; both models must be causal LMs")
    if kind in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise IncompatibleModelsError(f"{what}: {path} is a bidirectional {kind} encoder (is_decoder is false: every "
                                      f"position sees the tokens after it); both models must be causal LMs")


EMBEDDING_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "word_embeddings.weight",
                      "embed_in.weight", "embed_out.weight")


def check_weight_rows(config, path: str, what: str) -> None:
    """The weights' embedding / LM-head rows match the config's vocab_size (read from the safetensors headers,
    no weights loaded); a mismatch is named here, not as a size-mismatch traceback inside from_pretrained."""
    local = Path(path).expanduser()
    rows = vocab_rows(config)
    for weights in sorted(local.glob("*.safetensors")) if local.is_dir() else []:
        with safe_open(str(weights), framework="pt") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape() if name.endswith(EMBEDDING_SUFFIXES) else None
                if shape and len(shape) == 2 and shape[0] != rows:
                    raise IncompatibleModelsError(
                        f"{what}: {path}/config.json says vocab_size={rows} but {weights.name} holds {name} with "
                        f"{shape[0]} rows; the config does not belong to these weights")


def load_model(path: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A causal LM in eval mode on `device` in `dtype` (hub id or local directory)."""
    quiet_library_bars()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, SafetensorError, EOFError, pickle.UnpicklingError) as exc:  # a damaged file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot load the model weights in {path} ({type(exc).__name__}: {first}); "
                         f"a truncated or damaged weights file? re-download or re-save it") from None
    return model.to(device).eval()


def load_pair(student_path: str, teacher_path: str, *, device: str = "auto", dtype: str = "auto",
              checked: tuple[PreTrainedTokenizerBase, int] | None = None) -> ModelPair:
    """Check compatibility first (cheap), then load both models in eval mode. `checked` is `check_pair`'s result
    where the caller has run it already (a real vocabulary's tokenizer takes seconds to load)."""
    tokenizer, vocab = checked or check_pair(student_path, teacher_path)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    student = load_model(student_path, dev, torch_dtype)
    teacher = load_model(teacher_path, dev, torch_dtype)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return ModelPair(student, teacher, tokenizer, vocab, student_path, teacher_path, dev, torch_dtype)


def directory_hash(path: str | Path) -> str:
    """sha256 over a model directory's files (names and contents), for manifests.

    Hub ids are resolved to their local snapshot first. Files are streamed, so large checkpoints
    cost one read.
    """
    local = Path(path).expanduser()
    if not local.is_dir():
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(str(path), local_files_only=True))
    digest = hashlib.sha256()
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(local)).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the id -> token map and the special tokens."""
    payload = {
        "tokens": tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))),
        "special": sorted(tokenizer.all_special_tokens),
    }
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()
