"""Shared fixtures: the embedded testbeds, the shipped ones (diagnostics/testbed/shipped/) where the config's hash
matches, else built once and cached under .cache/."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TQDM_DISABLE", "1")  # keep test logs readable
os.environ.setdefault("TAOPD_CACHE_DIR", str(ROOT / ".cache"))  # the checkout's testbed cache, in every process

# `make test` runs the files on 2 pytest-xdist processes (`--dist loadfile`: a file's module fixtures are built once).
# The files of the session's vLLM fixtures (tests/diagnostics/conftest.py: a testbed trained for vLLM, its engine and
# rollouts, ~75 s): one unit of work, so one process builds them once.
VLLM_FILES = ("diagnostics/test_rollouts.py", "diagnostics/test_scoring.py", "diagnostics/test_store.py",
              "opd/test_opd_vllm_sync.py")


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: without the plugin (one process) it is never called
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """xdist's per-file scheduling, with the VLLM_FILES as one unit."""
    from xdist.scheduler import LoadFileScheduling

    vllm = {f"tests/{name}" for name in VLLM_FILES}
    missing = [name for name in VLLM_FILES if not (ROOT / "tests" / name).is_file()]
    assert not missing, f"VLLM_FILES names files that do not exist: {missing}"

    class Scheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return "tests/diagnostics/test_rollouts.py" if scope in vllm else scope

    return Scheduling(config, log)


@pytest.fixture(scope="module", autouse=True)
def _release_vllm_engine():
    """Shut the process's cached vLLM engine down after each test file: an idle CPU engine's processes keep
    polling (a quarter of a core), which slowed every later file of that test process."""
    yield
    if "diagnostics.generation.vllm" in sys.modules:
        sys.modules["diagnostics.generation.vllm"].release_vllm_engine()
    gc.collect()  # an engine held in a reference cycle (lm-eval's vLLM model) shuts down when collected


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
