"""Prompt-cluster bootstrap: resample whole clusters with replacement, as the paper's section 4 asks.

Tokens within one rollout (and one prompt) are correlated, so every interval in `analysis`
resamples clusters, never tokens. One resample is represented by a vector of cluster
multiplicities ``w[c]`` (a multinomial draw of n_clusters over n_clusters equally likely
clusters); a token's weight is its cluster's multiplicity. For statistics that are ratios of
sums (means, differences of means) and for OLS (via per-cluster moment matrices), the resampled
statistic is then an exact weighted computation, with no row copying. Percentile intervals.

The weights depend only on (n_clusters, n_boot, seed), so statistics computed with the same seed
share resamples and their differences are paired.

Shapes: n rows, C clusters, B resamples; ``codes`` [n] in 0..C-1, ``weights`` [B, C].
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.io import cluster_column

DEFAULT_N_BOOT = 1000
MIN_CLUSTERS_FOR_CI = 2


@dataclass(frozen=True)
class Clusters:
    """Cluster index per row of a token table."""

    codes: np.ndarray  # [n] int64, 0..n_clusters-1
    n_clusters: int
    column: str  # the id column the clusters come from


def clusters_of(df: pd.DataFrame) -> Clusters:
    """Clusters for `df` (``prompt_id`` when present, else ``seq_id``), codes in order of first appearance."""
    col = cluster_column(df)
    codes, uniques = pd.factorize(df[col], sort=False)
    return Clusters(codes=codes.astype(np.int64), n_clusters=len(uniques), column=col)


def resample_weights(n_clusters: int, n_boot: int, seed: int) -> np.ndarray:
    """[B, C] cluster multiplicities of `n_boot` cluster-bootstrap resamples (each row sums to C)."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_clusters, np.full(n_clusters, 1.0 / n_clusters), size=n_boot).astype(np.float64)


def can_bootstrap(clusters: Clusters, n_boot: int) -> tuple[bool, str | None]:
    """Whether a cluster bootstrap is possible; else a note saying why (reported, CI set to NaN)."""
    if n_boot <= 0:
        return False, "bootstrap disabled (n_boot=0): confidence intervals are NaN"
    if clusters.n_clusters < MIN_CLUSTERS_FOR_CI:
        return False, (
            f"only {clusters.n_clusters} cluster ({clusters.column}); a cluster bootstrap needs at least "
            f"{MIN_CLUSTERS_FOR_CI}: confidence intervals are NaN"
        )
    return True, None


def noted_resample_weights(
    clusters: Clusters, n_boot: int, seed: int, notes: list[str], what: str
) -> np.ndarray | None:
    """`resample_weights` when a bootstrap is possible; else None, with `what: why` appended to `notes`."""
    ok, why = can_bootstrap(clusters, n_boot)
    if not ok:
        notes.append(f"{what}: {why}")
        return None
    return resample_weights(clusters.n_clusters, n_boot, seed)


def cluster_sums(values: np.ndarray, clusters: Clusters) -> np.ndarray:
    """Per-cluster sums: values [n] or [n, ...] -> [C] or [C, ...]."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        return np.bincount(clusters.codes, weights=values, minlength=clusters.n_clusters)
    # Sort rows by cluster, then one reduceat over contiguous blocks (every code 0..C-1 occurs).
    order = np.argsort(clusters.codes, kind="stable")
    starts = np.searchsorted(clusters.codes[order], np.arange(clusters.n_clusters))
    return np.add.reduceat(values[order], starts, axis=0)


def percentile_ci(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap `samples` [B] (NaN samples ignored; all NaN -> (nan, nan))."""
    samples = np.asarray(samples, dtype=np.float64)
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(finite, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_mean(
    values: np.ndarray, mask: np.ndarray, clusters: Clusters, weights: np.ndarray
) -> np.ndarray:
    """[B] resampled means of ``values[mask]`` (NaN in a resample that draws no masked row)."""
    num = cluster_sums(np.where(mask, values, 0.0), clusters)  # [C]
    den = cluster_sums(mask.astype(np.float64), clusters)  # [C]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ num) / (weights @ den)


def bootstrap_mean_diff(
    values: np.ndarray, mask_a: np.ndarray, mask_b: np.ndarray, clusters: Clusters, weights: np.ndarray
) -> np.ndarray:
    """[B] resampled mean(values[mask_a]) - mean(values[mask_b])."""
    return bootstrap_mean(values, mask_a, clusters, weights) - bootstrap_mean(values, mask_b, clusters, weights)


def token_weights(clusters: Clusters, weights: np.ndarray) -> np.ndarray:
    """[B, n] per-row multiplicities: each row's cluster multiplicity in each resample."""
    return weights[:, clusters.codes]


def resample_indices(clusters: Clusters, weights_row: np.ndarray) -> np.ndarray:
    """Row indices of one explicit resample (rows of a cluster drawn w times appear w times).

    For statistics with no weighted form (Kendall's tau); the plain reference for the weighted ones.
    """
    reps = weights_row.astype(np.int64)[clusters.codes]  # [n]
    return np.repeat(np.arange(clusters.codes.size), reps)


MAX_SEED = 2**63  # numpy's and torch's seeds: non-negative 64-bit integers
MEMORY_SHARE = 4  # the resample weights may take at most 1/MEMORY_SHARE of free memory (sections hold copies)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (MemAvailable), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_bootstrap_args(n_boot: int, seed: int, n_clusters: int, *, keys: tuple[str, str] = ("--n-boot", "--seed")
                         ) -> None:
    """Refuse, before anything runs or is written, a bootstrap the user's arguments make impossible: a seed
    numpy cannot take, or more resamples than memory holds ([n_boot, n_clusters] float64 weights, several at
    once). Every section would otherwise be skipped, and a summary of "skipped" notes replace a real one."""
    n_key, seed_key = keys
    if n_boot < 0:
        raise ValueError(f"{n_key}: must be >= 0 (0 = no intervals), got {n_boot}")
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"{seed_key}: must be in [0, 2**63), got {seed}")
    need = n_boot * max(n_clusters, 1) * 8
    free = available_memory()
    if free is not None and need * MEMORY_SHARE > free:
        raise ValueError(f"{n_key}: {n_boot} resamples x {n_clusters} clusters need {need / 1e9:.3g} GB per copy of "
                         f"the resample weights, more than a {MEMORY_SHARE}th of the {free / 1e9:.3g} GB of memory "
                         f"available; lower it (default {DEFAULT_N_BOOT})")
