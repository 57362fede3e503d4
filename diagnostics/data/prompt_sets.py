"""Prompt sets through `datasets`: local JSON / JSONL / parquet files or hub ids, a column mapping,
message-list prompts, the chat template with Qwen3's `enable_thinking` switch, and the paper release's
held-out shard of DAPO-Math-17k.

* `load_prompt_set(source, prompt_column=, answer_column=)`: rows -> `diagnostics.data.problems.Problem`s (JSON /
  JSONL read exactly as written, parquet and hub ids through `datasets`). A column is a name or a
  dotted path into nested records (`reward_model.ground_truth`, `prompt.0.content`);
  a prompt is text or a chat message list (`[{"role": ..., "content": ...}]`); an answer is text or a number.
  A malformed record is an error naming the file and its row (and line, for JSONL).
* `render_problems(tokenizer, problems, enable_thinking=)`: prompts as the model sees them (text through
  the chat template with the generation prompt; Qwen3's `enable_thinking=False` writes the empty think block).
* `dapo_slime_records`, `heldout_shard_indices`, `build_heldout_shard`: the release's data preparation
  (dedup by prompt text) and its held-out diagnostic shard (400 prompts drawn with random.Random(41717)
  from the latter half of DAPO-Math-17k-dedup).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from diagnostics.core.files import atomic_write, write_json
from diagnostics.core.paths import check_user_path
from diagnostics.data.problems import Problem

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # file suffix -> datasets builder
ROLES = ("system", "user", "assistant", "tool")
DAPO_HUB_ID = "BytedTsinghua-SIA/DAPO-Math-17k"
DAPO_HELDOUT_SEED = 41717  # the release's DIAG_HELDOUT_SEED
DAPO_HELDOUT_SIZE = 400


class PromptSetError(ValueError):
    """A prompt set that cannot be used; the message names the file (or hub id) and the row."""


# ------------------------------------------------------------------------------------------ loading


def _load_rows(source: str, split: str, subset: str | None) -> tuple[Iterable[dict[str, Any]], list[str]]:
    """(records, where each record is: "row i" or "row i (line n)") of a local file or a hub id.

    JSON and JSONL are read with the json module, not datasets' JSON builder: that builder infers one
    arrow type per column and converts values to it (a column holding "7" and 1024 came back as the
    integers 7 and 1024; "1.50" would become 1.5), which changes answers, and its errors name no line.
    Parquet files and hub datasets carry their types and load through `datasets`.
    """
    import datasets

    path = Path(source)
    builder = LOCAL_BUILDERS.get(path.suffix.lower())
    if builder is not None or os.path.lexists(path):
        try:  # a directory, a symlink loop or an unreadable file is named as such
            check_user_path(path, "prompt file", "file")
        except FileNotFoundError:
            raise FileNotFoundError(f"prompt file {path} does not exist") from None
        if builder is None:
            raise PromptSetError(f"{path}: unsupported prompt file type {path.suffix!r}; "
                                 f"use one of {', '.join(LOCAL_BUILDERS)}")
        if path.suffix.lower() == ".jsonl":
            return _read_jsonl(path)
        if path.suffix.lower() == ".json":
            return _read_json(path)
        try:
            rows = datasets.load_dataset("parquet", data_files={"rows": str(path)}, split="rows")
        except Exception as exc:
            raise PromptSetError(f"{path}: could not be read as parquet: {exc}") from exc
        return rows, [f"row {i + 1}" for i in range(len(rows))]
    try:
        rows = datasets.load_dataset(source, name=subset, split=split)
    except Exception as exc:
        raise PromptSetError(f"{source}: not a local file, and loading it as a hub dataset (split {split!r}) "
                             f"failed (offline?): {exc}") from exc
    return rows, [f"row {i + 1}" for i in range(len(rows))]


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The objects of a JSONL file (blank lines skipped); an error names the first bad line."""
    records, where = [], []
    for line_no, raw in enumerate(path.read_bytes().splitlines(), start=1):
        line = _utf8(raw, path, f"line {line_no}")
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptSetError(f"{path}: line {line_no}: invalid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise PromptSetError(f"{path}: line {line_no}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
        where.append(f"row {len(records)} (line {line_no})")
    return records, where


def _read_json(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The objects of a JSON file holding a list of objects."""
    try:
        data = json.loads(_utf8(path.read_bytes(), path, "the file"))
    except json.JSONDecodeError as exc:
        raise PromptSetError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(data, list):
        raise PromptSetError(f"{path}: expected a JSON list of objects, got {type(data).__name__} (JSONL: one "
                             f"object per line, in a .jsonl file)")
    for i, record in enumerate(data):
        if not isinstance(record, dict):
            raise PromptSetError(f"{path}: row {i + 1}: expected a JSON object, got {type(record).__name__}")
    return data, [f"row {i + 1}" for i in range(len(data))]


def _utf8(raw: bytes, path: Path, where: str) -> str:
    """`raw` decoded as UTF-8 (JSON's encoding); else an error naming the file, the line and the byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PromptSetError(f"{path}: {where}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                             f"save the file as UTF-8") from None


def get_field(record: dict[str, Any], column: str) -> Any:
    """The value at `column` of a record: a name, or a dotted path through dicts and lists
    (`reward_model.ground_truth`, `prompt.0.content`). KeyError naming the missing part."""
    value: Any = record
    for part in column.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, (list, tuple)) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise KeyError(f"no {part!r} in column path {column!r}")
    return value


def as_prompt(value: Any) -> str | tuple[dict[str, str], ...]:
    """A prompt value checked: non-empty text, or a non-empty list of {"role", "content"} messages."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("the prompt is empty")
        return value
    if isinstance(value, (list, tuple)) and value:
        messages = []
        for j, message in enumerate(value):
            if not isinstance(message, dict) or not {"role", "content"} <= set(message):
                raise ValueError(f"message {j} is not an object with 'role' and 'content'")
            if message["role"] not in ROLES:
                raise ValueError(f"message {j}: unknown role {message['role']!r} (one of {', '.join(ROLES)})")
            if not isinstance(message["content"], str):
                raise ValueError(f"message {j}: content must be text, got {type(message['content']).__name__}")
            messages.append({"role": message["role"], "content": message["content"]})
        return tuple(messages)
    raise ValueError(f"the prompt must be text or a chat message list, got {type(value).__name__}")


def as_answer(value: Any) -> str:
    """An answer value as text: text, a number, or a list of one of them (some sets store [answer])."""
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or value is None or not isinstance(value, (str, int, float)):
        raise ValueError(f"the answer must be text or a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):  # str() would make "nan", which nothing ever matches
        raise ValueError(f"the answer is {value} (not a number); write it as text if it is meant literally")
    return str(value)


def load_prompt_set(
    source: str | Path,
    *,
    prompt_column: str = "prompt",
    answer_column: str = "answer",
    split: str = "train",
    subset: str | None = None,
    require_answer: bool = True,
    limit: int = 0,
) -> list[Problem]:
    """The problems of a local .jsonl / .json / .parquet file or a hub dataset id (`split`, `subset`).

    `prompt_column` / `answer_column`: names or dotted paths (DAPO-Math-17k: `prompt` holds a message
    list and `reward_model.ground_truth` the answer; the release's slime files: `prompt` and `label`).
    Without `require_answer` a missing answer is "". `limit` > 0 keeps the first `limit` rows (fewer rows is an error).
    A bad record raises `PromptSetError` naming the file, the row (1-based) and, for JSONL, its line.
    """
    source = str(source)
    rows, where_rows = _load_rows(source, split, subset)
    problems = []
    for i, record in enumerate(rows):
        if limit and i >= limit:
            break
        where = f"{source}: {where_rows[i]}"
        try:
            prompt = as_prompt(get_field(record, prompt_column))
            try:
                answer = as_answer(get_field(record, answer_column))
            except KeyError:
                if require_answer:
                    raise
                answer = ""
        except (KeyError, ValueError) as exc:
            columns = ", ".join(record) if isinstance(record, dict) else "?"
            message = exc.args[0] if exc.args else str(exc)
            raise PromptSetError(f"{where}: {message} (prompt_column={prompt_column!r}, "
                                 f"answer_column={answer_column!r}; the record's columns: {columns})") from None
        problems.append(Problem(prompt_id=i, prompt=prompt, answer=answer))  # type: ignore[arg-type]
    if not problems:
        raise PromptSetError(f"{source}: holds no prompts")
    if limit and len(problems) < limit:  # never a silent clamp: the run would report fewer problems than asked
        raise PromptSetError(f"{source}: holds {len(problems)} prompts, fewer than the {limit} asked for "
                             f"(n_problems={limit}; 0 takes them all)")
    return problems


# ------------------------------------------------------------------------------------------ rendering


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | Sequence[dict[str, str]],
    *,
    chat_template: bool = True,
    enable_thinking: bool | None = None,
    system_prompt: str = "",
) -> str:
    """The prompt as the model sees it.

    With `chat_template` and a tokenizer that has one: text becomes one user turn (after
    `system_prompt` when given), a message list is used as it is, and the template writes the generation
    prompt. `enable_thinking` (None = the template's default) is passed to the template: Qwen3's
    switch (False writes an empty `<think></think>` block so the model answers directly); a template
    that never reads it is an error rather than a silently ignored flag. Without a template, text is
    returned unchanged and a message list is an error.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not (chat_template and template):
        if not isinstance(prompt, str):
            raise ValueError("a chat message list needs a tokenizer with a chat template (and chat_template=True)")
        if enable_thinking is not None:
            raise ValueError("enable_thinking needs the tokenizer's chat template (and chat_template=True)")
        return prompt
    if enable_thinking is not None and "enable_thinking" not in str(template):
        raise ValueError("enable_thinking is set but the tokenizer's chat template has no enable_thinking switch "
                         "(a Qwen3 template has one); leave it unset for this model")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)


def render_problems(
    tokenizer: PreTrainedTokenizerBase, problems: Iterable[Problem], **options: Any
) -> list[Problem]:
    """Problems with their prompts rendered by `render_chat` (options: chat_template, enable_thinking,
    system_prompt); answers and ids unchanged."""
    return [dataclasses.replace(p, prompt=render_chat(tokenizer, p.prompt, **options)) for p in problems]


# ------------------------------------------------------------------------------------------ the release's data


def dapo_slime_records(records: Iterable[dict[str, Any]]) -> list[dict[str, str]]:
    """DAPO-Math-17k rows as the release's `dapo_math_17k_dedup_slime.jsonl`: {"prompt": the first
    message's content, "label": reward_model.ground_truth}, rows missing either dropped, duplicates of
    a prompt (compared after strip) dropped keeping the first (TA-OPD/repro/04_prepare_data.sh, lines
    40-58)."""
    seen: set[str] = set()
    out = []
    for record in records:
        try:
            prompt, label = record["prompt"][0]["content"], record["reward_model"]["ground_truth"]
        except (KeyError, IndexError, TypeError):
            continue
        if prompt is None or label is None or prompt.strip() in seen:
            continue
        seen.add(prompt.strip())
        out.append({"prompt": prompt, "label": label})
    return out


def heldout_shard_indices(n_rows: int, *, seed: int = DAPO_HELDOUT_SEED, size: int = DAPO_HELDOUT_SIZE) -> list[int]:
    """Row indices (sorted, 0-based into the whole file) of the release's held-out shard: `size` rows
    drawn with `random.Random(seed).sample` from the latter half, rows n_rows // 2 .. n_rows - 1
    (fewer when the half is smaller).

    TA-OPD/scripts/diagnostics/run_4b_to_1p7b_heldout_fixed_context_300.sh, lines 45-57 (sample over
    range(n // 2, n)); TA-OPD/repro/04_prepare_data.sh, lines 84-94 samples range(len(pool)) over the
    same half instead, which picks the same rows: `random.sample` draws positions, not values.
    """
    if n_rows < 2:
        raise ValueError(f"a held-out shard needs at least 2 source rows, got {n_rows}")
    pool = range(n_rows // 2, n_rows)
    return sorted(random.Random(seed).sample(pool, min(size, len(pool))))


def build_heldout_shard(
    source: str | Path, out: str | Path, *, seed: int = DAPO_HELDOUT_SEED, size: int = DAPO_HELDOUT_SIZE
) -> dict[str, Any]:
    """Write the held-out shard of the JSONL file `source` to `out` (its lines verbatim, in file order)
    and `<out>.indices.json` (seed, pool start, source rows, the chosen indices); returns that record.
    Rows are the file's non-blank lines (the release's files have no blank lines, where its two
    builders agree)."""
    source, out = Path(source), Path(out)
    if not source.is_file():
        raise FileNotFoundError(f"shard source {source} does not exist")
    rows = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    for row_no, line in enumerate(rows, start=1):
        try:
            json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptSetError(f"{source}: row {row_no}: invalid JSON ({exc})") from None
    indices = heldout_shard_indices(len(rows), seed=seed, size=size)
    atomic_write(out, lambda tmp: Path(tmp).write_text("\n".join(rows[i] for i in indices) + "\n", encoding="utf-8"))
    meta = {"source": str(source), "output": str(out), "seed": seed, "pool_start": len(rows) // 2,
            "n_source_rows": len(rows), "n_written": len(indices), "indices": indices}
    write_json(out.with_suffix(".indices.json"), meta)
    return meta


def load_problems(path: str | Path) -> list[Problem]:
    """A prompt set of `{"prompt", "answer"}` records (the answer optional: ""): a thin call of
    `diagnostics.data.prompt_sets.load_prompt_set`, which reads .jsonl / .json / .parquet files, checks each
    prompt (text or a chat message list) and names the file, row and line of a bad record."""

    return load_prompt_set(path, require_answer=False)
