"""Shared fixtures: the embedded testbeds, the shipped ones (diagnostics/testbed/shipped/) where the config's hash
matches, else built once and cached under .cache/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TQDM_DISABLE", "1")  # keep test logs readable
os.environ.setdefault("TAOPD_CACHE_DIR", str(ROOT / ".cache"))  # the checkout's testbed cache, in every process


@pytest.fixture(scope="session")
def small_testbed():
    """A tiny testbed (shipped; seconds to build) for machinery tests; not for accuracy criteria."""
    from diagnostics.core.config import load_config
    from diagnostics.testbed.build import build_testbed
    from diagnostics.testbed.config import TestbedConfig

    config = load_config(TestbedConfig, ROOT / "configs/testbed_small.yaml", [f"cache_dir={ROOT / '.cache/testbed'}"])
    return build_testbed(config)


@pytest.fixture(scope="session")
def default_testbed():
    """The default testbed (the pair every command uses by default): shipped, loaded in a second."""
    from diagnostics.core.config import load_config
    from diagnostics.testbed.build import build_testbed
    from diagnostics.testbed.config import TestbedConfig

    config = load_config(TestbedConfig, ROOT / "configs/testbed.yaml", [f"cache_dir={ROOT / '.cache/testbed'}"])
    return build_testbed(config)
