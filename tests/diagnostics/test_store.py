"""The rollout store: round trip, atomic replacement under SIGKILL, and rejection of bad files."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diagnostics.generation.store import (
    ROLLOUT_SCHEMA,
    TOPK_SCHEMA,
    make_manifest,
    manifest_path,
    read_manifest,
    read_store,
    to_table,
    write_store,
)

ROOT = Path(__file__).resolve().parents[2]


def synthetic_store(rows: int, *, k: int = 3, seed: int = 0) -> pd.DataFrame:
    """A valid store of `rows` responses with random lengths and top-K columns."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(rows):
        r = int(rng.integers(1, 12))
        records.append(
            {
                "prompt_id": i // 2,
                "sample_idx": i % 2,
                "prompt_ids": rng.integers(0, 50, int(rng.integers(1, 8))).astype(np.int32),
                "response_ids": rng.integers(0, 50, r).astype(np.int32),
                "response_logprobs": -rng.random(r).astype(np.float32),
                "finish_reason": "stop" if i % 3 else "length",
                "temperature": 1.0,
                "top_p": 1.0,
                "max_new_tokens": 12,
                "seed": 7,
                "topk_ids": rng.integers(0, 50, (r, k)).astype(np.int32),
                "topk_logprobs": -rng.random((r, k)).astype(np.float32),
            }
        )
    return pd.DataFrame(records)


def assert_frames_equal(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.columns) == list(b.columns)
    assert len(a) == len(b)
    for col in a.columns:
        for x, y in zip(a[col], b[col]):
            if isinstance(x, np.ndarray):
                assert x.dtype == np.asarray(y).dtype and x.shape == np.asarray(y).shape, col
                assert np.array_equal(x, y), col
            else:
                assert x == y, col


def test_round_trip_with_and_without_topk(tmp_path):
    df = synthetic_store(9)
    manifest = {"model_path": None, "backend": "hf", "sampling": {"temperature": 1.0}}
    path = write_store(df, tmp_path / "rollouts.parquet", manifest)
    back = read_store(path)
    assert_frames_equal(df, back)
    assert back["topk_ids"][0].ndim == 2 and back["topk_ids"][0].dtype == np.int32
    assert back.attrs["manifest"]["backend"] == "hf" and back.attrs["manifest"]["rows"] == 9
    assert json.loads(manifest_path(path).read_text()) == back.attrs["manifest"] == read_manifest(path)
    assert pq.read_schema(path).remove_metadata() == pa.schema(list(ROLLOUT_SCHEMA) + list(TOPK_SCHEMA))

    plain = df.drop(columns=["topk_ids", "topk_logprobs"])
    back = read_store(write_store(plain, tmp_path / "plain.parquet", manifest))
    assert_frames_equal(plain, back)


def test_manifest_records_provenance(vllm_testbed):
    from transformers import AutoTokenizer

    from diagnostics.lm.models import directory_hash, tokenizer_hash

    tokenizer = AutoTokenizer.from_pretrained(vllm_testbed.student_path)
    manifest = make_manifest(model_path=vllm_testbed.student_path, tokenizer=tokenizer, backend="vllm",
                             sampling={"n": 2})
    assert manifest["model_hash"] == directory_hash(vllm_testbed.student_path)
    assert manifest["tokenizer_hash"] == tokenizer_hash(tokenizer)
    assert {"torch", "transformers", "pandas", "pyarrow", "vllm"} <= set(manifest["versions"])
    assert manifest["backend"] == "vllm" and manifest["sampling"] == {"n": 2} and manifest["created"]


def test_dataframe_that_breaks_the_schema_is_not_written(tmp_path):
    df = synthetic_store(4)
    with pytest.raises(ValueError, match="missing column"):
        write_store(df.drop(columns=["seed"]), tmp_path / "x.parquet", {})
    bad = df.copy()
    bad.at[1, "response_logprobs"] = bad.at[1, "response_logprobs"][:-1]
    with pytest.raises(ValueError, match="row 1: response_logprobs"):
        to_table(bad)
    bad = df.copy()
    bad.at[0, "finish_reason"] = "abort"
    with pytest.raises(ValueError, match="finish_reason"):
        to_table(bad)
    assert not list(tmp_path.iterdir()), "a rejected write left files behind"


def test_missing_truncated_and_corrupt_files_are_rejected(tmp_path):
    missing = tmp_path / "nope.parquet"
    with pytest.raises(ValueError, match=f"{re.escape(str(missing))}.*does not exist"):
        read_store(missing)
    path = write_store(synthetic_store(50), tmp_path / "r.parquet", {})
    data = path.read_bytes()
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{re.escape(str(truncated))}.*truncated or corrupt"):
        read_store(truncated)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"not a parquet file at all")
    with pytest.raises(ValueError, match=re.escape(str(corrupt))):
        read_store(corrupt)


def _write_raw(table: pa.Table, path: Path, rows: int) -> Path:
    table = table.replace_schema_metadata({b"taopd.rollout_manifest": json.dumps({"rows": rows}).encode()})
    pq.write_table(table, path)
    return path


@pytest.mark.parametrize(
    "mutation, message",
    [
        (lambda t: t.drop_columns(["finish_reason"]), r"missing column\(s\) \['finish_reason'\]"),
        (lambda t: t.append_column("reward", pa.array([1.0] * t.num_rows)), r"unknown column\(s\) \['reward'\]"),
        (lambda t: t.drop_columns(["topk_logprobs"]), "both be present"),
        (
            lambda t: t.set_column(
                t.schema.get_field_index("response_logprobs"),
                "response_logprobs",
                t.column("response_logprobs").cast(pa.list_(pa.float64())),
            ),
            r"column 'response_logprobs' has type list<\w+: double>",
        ),
        (
            lambda t: t.set_column(t.schema.get_field_index("prompt_id"), "prompt_id",
                                   t.column("prompt_id").cast(pa.string())),
            "column 'prompt_id' has type string",
        ),
    ],
)
def test_schema_mismatch_is_rejected_naming_file_and_column(tmp_path, mutation, message):
    table = to_table(synthetic_store(5))
    path = _write_raw(mutation(table), tmp_path / "bad.parquet", 5)
    with pytest.raises(ValueError, match=f"rollout store {re.escape(str(path))}: .*{message}"):
        read_store(path)


def test_file_without_manifest_or_with_wrong_row_count_is_rejected(tmp_path):
    table = to_table(synthetic_store(5))
    no_manifest = tmp_path / "plain.parquet"
    pq.write_table(table, no_manifest)
    with pytest.raises(ValueError, match=f"{re.escape(str(no_manifest))}: no embedded manifest"):
        read_store(no_manifest)
    with pytest.raises(ValueError, match="manifest says 4 rows, file has 5"):
        read_store(_write_raw(table, tmp_path / "rows.parquet", 4))


# The writer of a large store, slowed down per row group so that it can be killed mid-write.
SLOW_WRITER = """
import sys, time
import pyarrow.parquet as pq
sys.path.insert(0, {tests!r})
from diagnostics.generation import store
from test_store import synthetic_store

write_table = pq.ParquetWriter.write_table
def slow_write_table(self, *args, **kwargs):
    write_table(self, *args, **kwargs)
    time.sleep(0.1)
pq.ParquetWriter.write_table = slow_write_table
store.ROW_GROUP_SIZE = 100
store.write_store(synthetic_store(6000, seed=1), sys.argv[1], {{"writer": "new"}})
"""


@pytest.mark.slow
def test_writer_killed_mid_write_leaves_the_old_store_intact(tmp_path):
    target = tmp_path / "rollouts.parquet"
    old = synthetic_store(7)
    write_store(old, target, {"writer": "old"})
    script = tmp_path / "writer.py"
    script.write_text(SLOW_WRITER.format(tests=str(Path(__file__).parent)))
    proc = subprocess.Popen([sys.executable, str(script), str(target)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        partial = []
        while time.monotonic() < deadline and proc.poll() is None:
            partial = [p for p in tmp_path.glob(".rollouts.parquet.*.tmp") if p.stat().st_size > 4096]
            if partial:
                break
            time.sleep(0.02)
        assert partial, f"the writer never started writing (exit code {proc.poll()})"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the writer finished before it was killed"
    back = read_store(target)  # the old store, whole
    assert_frames_equal(old, back)
    assert back.attrs["manifest"]["writer"] == "old"
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_store(partial[0])  # what was killed really was a partial file


def test_store_files_follow_the_umask(tmp_path):
    """Results are shared: the store and its manifest get 0666 less the umask, not mkstemp's 0600."""
    old = os.umask(0o022)
    try:
        path = write_store(synthetic_store(3), tmp_path / "rollouts.parquet", {"backend": "hf"})
    finally:
        os.umask(old)
    for written in (path, manifest_path(path)):
        assert written.stat().st_mode & 0o777 == 0o644, written
