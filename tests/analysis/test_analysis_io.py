"""analysis.io: loading, validation, canonical order, with_k, run discovery."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from analysis.io import (
    TOKEN_REQUIRED,
    available_ks,
    cluster_column,
    find_runs,
    load_run,
    load_train_run,
    newest_run,
    require_columns,
    score_columns,
    validate_tokens,
    with_k,
)


def test_load_fixture_run(fixture_results):
    df, manifest = load_run(fixture_results / "diagnose" / "fixture")
    assert manifest["synthetic"] is True and manifest["k"] == 8
    assert df.attrs["run_name"] == "fixture" and df.attrs["k"] == 8
    assert set(TOKEN_REQUIRED) <= set(df.columns)
    # canonical (seq_id, pos) order
    assert (df[["seq_id", "pos"]].apply(tuple, axis=1).is_monotonic_increasing)
    assert {"teachability", "kl", "entropy", "tip", "random", "full"} <= set(score_columns(df))
    assert available_ks(df) == [16, 32]
    # the parquet file path works too
    df2, _ = load_run(fixture_results / "diagnose" / "fixture" / "tokens.parquet")
    assert len(df2) == len(df)


def test_load_train_fixture(fixture_results):
    metrics, comparison, manifest = load_train_run(fixture_results / "train" / "fixture")
    assert manifest["synthetic"] is True
    assert {"step", "selector", "ratio", "seed", "accuracy", "kl_to_teacher"} <= set(metrics.columns)
    assert comparison is not None and "live_gain_mean" in comparison.columns


def test_require_columns_names_missing():
    df = pd.DataFrame({"a": [1]})
    with pytest.raises(ValueError, match=r"my table: missing column\(s\) \['b', 'c'\]"):
        require_columns(df, ["a", "b", "c"], "my table")


def test_validate_missing_and_duplicates(small_tokens):
    with pytest.raises(ValueError, match="norm_compat"):
        validate_tokens(small_tokens.drop(columns=["norm_compat", "gain"]))
    with pytest.raises(ValueError, match="gain"):
        validate_tokens(small_tokens.drop(columns=["gain"]))
    dup = pd.concat([small_tokens.iloc[:3], small_tokens.iloc[:1]])
    with pytest.raises(ValueError, match="duplicate"):
        validate_tokens(dup)
    no_scores = small_tokens[[c for c in small_tokens.columns if not c.startswith("score_")]]
    with pytest.raises(ValueError, match="score"):
        validate_tokens(no_scores)


def test_validate_sorts(small_tokens):
    shuffled = small_tokens.sample(frac=1.0, random_state=0)
    out = validate_tokens(shuffled)
    pd.testing.assert_frame_equal(out.reset_index(drop=True), small_tokens.reset_index(drop=True))


def test_missing_run_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokens.parquet"):
        load_run(tmp_path)


def test_cluster_column(small_tokens):
    assert cluster_column(small_tokens) == "prompt_id"
    assert cluster_column(small_tokens.drop(columns=["prompt_id"])) == "seq_id"


def test_with_k_replaces_columns(small_tokens):
    v = with_k(small_tokens, 32)
    assert v.attrs["k"] == 32
    assert not any(c.endswith(("_k16", "_k32")) for c in v.columns)
    np.testing.assert_array_equal(v["norm_compat"], small_tokens["norm_compat_k32"])
    np.testing.assert_array_equal(v["score_teachability"], small_tokens["score_teachability_k32"])
    # K-independent columns are untouched
    np.testing.assert_array_equal(v["norm_entropy"], small_tokens["norm_entropy"])
    base = with_k(small_tokens, 8)
    np.testing.assert_array_equal(base["norm_compat"], small_tokens["norm_compat"])
    with pytest.raises(ValueError, match=r"extra K values \[16, 32\]"):
        with_k(small_tokens, 64)


def test_find_and_newest_runs(fixture_results, tmp_path):
    root = tmp_path / "results"
    shutil.copytree(fixture_results, root)
    (root / "diagnose" / "empty").mkdir()  # no table: not a run
    assert [p.name for p in find_runs(root, "diagnose")] == ["fixture"]
    assert newest_run(root, "train").name == "fixture"
    with pytest.raises(ValueError, match="unknown run kind"):
        find_runs(root, "bogus")
    with pytest.raises(FileNotFoundError):
        newest_run(tmp_path / "nothing", "diagnose")


def test_manifest_optional(fixture_results, tmp_path):
    run = tmp_path / "r1"
    run.mkdir()
    shutil.copy(fixture_results / "diagnose" / "fixture" / "tokens.parquet", run)
    with pytest.warns(UserWarning, match="manifest"):
        df, manifest = load_run(run)
    assert manifest["run_name"] == "r1"
    (run / "manifest.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="JSON object"):
        load_run(run)
