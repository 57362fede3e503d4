"""Loading and validating result tables written by `taopd diagnose` and `taopd train`.

A diagnostic run folder ``results/diagnose/<run>/`` holds ``tokens.parquet`` (one row per
(seq_id, pos)) and ``manifest.json``; a training run folder ``results/train/<run>/`` holds
``metrics.parquet``, ``comparison.parquet`` and ``manifest.json``. This module reads them,
checks the columns every analysis needs, puts token rows in canonical (seq_id, pos) order, and
offers `with_k` to view the table at one of the extra top-K values (columns ``<name>_k{K}``).

Every other module in `analysis` takes the frames returned here; nothing below computes a
statistic.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from diagnostics.core.files import read_json

# Columns without which no part of the token-level analysis can run.
TOKEN_REQUIRED: tuple[str, ...] = (
    "seq_id",
    "pos",
    "rel_pos",
    "gain",
    "norm_entropy",
    "norm_disagreement",
    "norm_compat",
    "norm_teacher_entropy",
)
METRICS_REQUIRED: tuple[str, ...] = ("step", "selector", "ratio", "seed", "loss")
COMPARISON_REQUIRED: tuple[str, ...] = (
    "selector",
    "ratio",
    "n_seeds",
    "acc_before_mean",
    "acc_before_std",
    "acc_after_mean",
    "acc_after_std",
)
SCORE_PREFIX = "score_"
_K_SUFFIX = re.compile(r"^(?P<base>.+)_k(?P<k>\d+)$")


def require_columns(df: pd.DataFrame, cols: Iterable[str], what: str) -> None:
    """Raise ValueError naming every column of `cols` that `df` lacks; `what` names the table/use."""
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(
            f"{what}: missing column(s) {missing}; the table has {len(df.columns)} columns "
            f"(first ones: {list(df.columns)[:12]})"
        )


def cluster_column(df: pd.DataFrame) -> str:
    """The bootstrap cluster: ``prompt_id`` when present (tokens of one prompt are correlated), else ``seq_id``."""
    if "prompt_id" in df.columns and df["prompt_id"].notna().all():
        return "prompt_id"
    require_columns(df, ["seq_id"], "cluster column")
    return "seq_id"


def score_columns(df: pd.DataFrame) -> dict[str, str]:
    """Map selector name -> score column for every ``score_<name>`` column at the base K (no ``_k`` suffix)."""
    out: dict[str, str] = {}
    for c in df.columns:
        if c.startswith(SCORE_PREFIX) and not _K_SUFFIX.match(c):
            out[c[len(SCORE_PREFIX) :]] = c
    return out


def canonical_order(df: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted by (seq_id, pos) with a fresh RangeIndex; returns `df` itself when already so."""
    seq = df["seq_id"].to_numpy()
    pos = df["pos"].to_numpy()
    if len(df) > 1:
        ordered = np.all((seq[1:] > seq[:-1]) | ((seq[1:] == seq[:-1]) & (pos[1:] > pos[:-1])))
    else:
        ordered = True
    if ordered and isinstance(df.index, pd.RangeIndex) and df.index.start == 0 and df.index.step == 1:
        return df
    out = df.sort_values(["seq_id", "pos"], kind="stable").reset_index(drop=True)
    out.attrs = dict(df.attrs)
    return out


def validate_tokens(df: pd.DataFrame, what: str = "tokens.parquet") -> pd.DataFrame:
    """Check columns, numeric dtypes and (seq_id, pos) uniqueness; return the table in canonical order."""
    require_columns(df, TOKEN_REQUIRED, what)
    if not score_columns(df):
        raise ValueError(f"{what}: no selector score columns (score_<name>) found")
    bad = [c for c in TOKEN_REQUIRED if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise ValueError(f"{what}: column(s) {bad} must be numeric, found {[str(df[c].dtype) for c in bad]}")
    dup = df.duplicated(["seq_id", "pos"])
    if dup.any():
        first = df.loc[dup, ["seq_id", "pos"]].iloc[0].tolist()
        raise ValueError(f"{what}: {int(dup.sum())} duplicate (seq_id, pos) rows, first {first}")
    return canonical_order(df)


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / "manifest.json"
    if not path.exists():
        warnings.warn(f"{folder}: no manifest.json; using the folder name as run_name", stacklevel=3)
        return {"run_name": folder.name}
    manifest = read_json(path, "the run's manifest")
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(manifest).__name__}")
    manifest.setdefault("run_name", folder.name)
    return manifest


def load_run(path: str | Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Load a diagnostic run: `path` is the run folder or its ``tokens.parquet``.

    Returns (tokens in (seq_id, pos) order, manifest dict). ``df.attrs`` carries ``run_name`` and
    ``k`` (the base top-K) so `with_k` and the figures can name them.
    """
    path = Path(path)
    folder = path.parent if path.suffix == ".parquet" else path
    table = path if path.suffix == ".parquet" else folder / "tokens.parquet"
    if not table.exists():
        raise FileNotFoundError(f"no tokens.parquet at {table}")
    manifest = _read_manifest(folder)
    df = validate_tokens(pd.read_parquet(table), what=str(table))
    df.attrs["run_name"] = str(manifest.get("run_name", folder.name))
    if manifest.get("k") is not None:
        df.attrs["k"] = int(manifest["k"])
    return df, manifest


def load_train_run(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame | None, dict[str, Any]]:
    """Load a training run folder: (metrics, comparison or None when absent, manifest)."""
    folder = Path(path)
    if folder.suffix == ".parquet":
        folder = folder.parent
    metrics_path = folder / "metrics.parquet"
    if not metrics_path.exists():
        raise FileNotFoundError(f"no metrics.parquet at {metrics_path}")
    metrics = pd.read_parquet(metrics_path)
    require_columns(metrics, METRICS_REQUIRED, str(metrics_path))
    comparison = None
    comp_path = folder / "comparison.parquet"
    if comp_path.exists():
        comparison = pd.read_parquet(comp_path)
        require_columns(comparison, COMPARISON_REQUIRED, str(comp_path))
    manifest = _read_manifest(folder)
    metrics.attrs["run_name"] = str(manifest["run_name"])
    return metrics, comparison, manifest


def available_ks(df: pd.DataFrame) -> list[int]:
    """The extra K values present as ``norm_compat_k{K}`` columns (the base K is in ``df.attrs['k']``)."""
    ks = set()
    for c in df.columns:
        m = _K_SUFFIX.match(c)
        if m and m.group("base") == "norm_compat":
            ks.add(int(m.group("k")))
    return sorted(ks)


def with_k(df: pd.DataFrame, k: int, *, base_k: int | None = None) -> pd.DataFrame:
    """View of the table at top-K = `k`: every ``<name>_k{k}`` column replaces ``<name>``.

    All ``_k*`` columns are dropped from the result, so downstream functions see one K only.
    When `k` is the base K (`base_k`, default ``df.attrs['k']``) the base columns are kept as they are.
    Raises ValueError listing the available K values when `k` is neither.
    """
    base_k = base_k if base_k is not None else df.attrs.get("k")
    suffix = f"_k{k}"
    replace = {c: c[: -len(suffix)] for c in df.columns if c.endswith(suffix) and _K_SUFFIX.match(c)}
    if not replace and k != base_k:
        raise ValueError(f"no columns for K={k}; base K={base_k}, extra K values {available_ks(df)}")
    extra = [c for c in df.columns if _K_SUFFIX.match(c)]
    out = df.drop(columns=extra + [v for v in replace.values() if v in df.columns])
    for col, base in replace.items():
        out[base] = df[col].to_numpy()
    out.attrs = dict(df.attrs)
    out.attrs["k"] = int(k)
    return out


def find_runs(results_dir: str | Path, kind: str) -> list[Path]:
    """Run folders under ``results_dir/<kind>/`` holding the kind's main table, oldest first.

    `kind` is ``"diagnose"`` (tokens.parquet) or ``"train"`` (metrics.parquet). Order: modification
    time of the table, then folder name (so a fresh checkout, where all times are equal, is stable).
    """
    table = {"diagnose": "tokens.parquet", "train": "metrics.parquet"}
    if kind not in table:
        raise ValueError(f"unknown run kind {kind!r}; known: {sorted(table)}")
    root = Path(results_dir) / kind
    runs = [p.parent for p in root.glob(f"*/{table[kind]}")]
    return sorted(runs, key=lambda p: (p.joinpath(table[kind]).stat().st_mtime, p.name))


def newest_run(results_dir: str | Path, kind: str) -> Path:
    """The most recent run folder of `kind` under `results_dir`; FileNotFoundError when there is none."""
    runs = find_runs(results_dir, kind)
    if not runs:
        raise FileNotFoundError(f"no {kind} runs under {Path(results_dir) / kind}")
    return runs[-1]


def lost_sections(old_path: str | Path, new: dict[str, Any]) -> list[str]:
    """The sections a summary.json at `old_path` holds (not null, not empty) that `new` would drop or null:
    a rerun must never replace a summary by less (a section skipped now, for whatever reason, keeps the old
    file; the caller refuses). [] when there is no old summary or it is unreadable as JSON."""
    path = Path(old_path)
    if not path.is_file():
        return []
    try:
        old = read_json(path, "summary")
    except ValueError:
        return []  # a damaged old summary holds nothing to keep
    if not isinstance(old, dict):
        return []
    return sorted(key for key, value in old.items()
                  if key != "notes" and value not in (None, {}, []) and new.get(key) in (None, {}, []))


def count_clusters(table: str | Path) -> int:
    """The bootstrap clusters of a tokens.parquet (distinct prompt_id, else seq_id), reading that column only."""
    names = pq.read_schema(table).names
    column = "prompt_id" if "prompt_id" in names else "seq_id"
    return len(pq.read_table(table, columns=[column]).column(0).unique())
