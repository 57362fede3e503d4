"""Shared fixtures for the analysis tests: the committed results fixture and small synthetic tables."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from analysis.io import validate_tokens
from analysis.synthetic import synthetic_tokens

FIXTURE_RESULTS = Path(__file__).resolve().parents[1] / "fixtures" / "results"


@pytest.fixture(scope="session")
def fixture_results() -> Path:
    """The committed results folder (diagnose/fixture, train/fixture)."""
    assert (FIXTURE_RESULTS / "diagnose" / "fixture" / "tokens.parquet").exists(), "run tests/fixtures/make_fixture.py"
    return FIXTURE_RESULTS


@pytest.fixture(scope="session")
def small_tokens() -> pd.DataFrame:
    """~2,300 tokens over 40 prompts with a planted teachability effect and extra K = 16, 32."""
    df = validate_tokens(synthetic_tokens(n_prompts=40, seqs_per_prompt=2, seed=7))
    df.attrs.update(k=8, run_name="synthetic-test")
    return df


def _tiny_table(n_clusters: int = 4, per: int = 6) -> pd.DataFrame:
    synth = synthetic_tokens(n_prompts=n_clusters, seqs_per_prompt=1, min_len=per, max_len=per, extra_k=(), seed=3)
    return validate_tokens(synth)


@pytest.fixture
def tiny_table():
    """Factory of minimal valid token tables: tiny_table(n_clusters, per) -> one response per cluster."""
    return _tiny_table
