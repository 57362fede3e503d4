"""Shared fixtures: the embedded testbeds, the shipped ones (diagnostics/testbed/shipped/) where the config's hash
matches, else built once and cached under .cache/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TQDM_DISABLE", "1")  # keep test logs readable
os.environ.setdefault("TAOPD_CACHE_DIR", str(ROOT / ".cache"))  # the checkout's testbed cache, in every process
# One torch (OpenMP) thread in every test process and every process a test starts: `make test` already runs 2 test
# processes on a 2-core machine, and torchrun tests start 2 more; OpenMP threads spin while they wait, so more threads
# than cores made the suite ~1.5x slower. One thread also makes a subprocess's float sums round as the test's own.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# `make test` runs the files on 2 pytest-xdist processes (`--dist loadfile`: a file's module fixtures are built once),
# handed out in collection order. These files take 40-190 s each (measured with `pytest --durations=0`); collected
# first, they start first and the short files fill the gaps at the end, instead of one long file running alone.
LONGEST_FILES = (
    "diagnostics/test_rollouts.py", "diagnostics/test_scoring.py", "diagnostics/test_store.py",
    "opd/test_opd_vllm_sync.py", "test_bad_inputs.py", "diagnostics/test_qwen3.py", "opd/test_paper_protocol.py",
    "diagnostics/test_diagnose_processes.py", "opd/test_evaluate.py", "opd/test_opd_resume.py",
    "opd/test_opd_distributed.py", "opd/test_opd_trl_distributed.py", "opd/test_opd_trainer.py",
    "opd/test_opd_trl_recipe.py",
)
# The files of the session's vLLM fixtures (tests/diagnostics/conftest.py: a testbed trained for vLLM, its engine and
# rollouts, ~75 s): one unit of work, so one process builds them once.
VLLM_FILES = LONGEST_FILES[:4]


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """xdist's per-file scheduling, with the VLLM_FILES as one unit."""
    from xdist.scheduler import LoadFileScheduling

    vllm = {f"tests/{name}" for name in VLLM_FILES}

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
    import gc
    import sys

    if "diagnostics.generation.vllm" in sys.modules:
        sys.modules["diagnostics.generation.vllm"].release_vllm_engine()
    gc.collect()  # an engine held in a reference cycle (lm-eval's vLLM model) shuts down when collected


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The longest files first (in LONGEST_FILES' order), every other file after them in its usual order."""
    rank = {ROOT / "tests" / name: i for i, name in enumerate(LONGEST_FILES)}
    missing = [str(path) for path in rank if not path.is_file()]
    assert not missing, f"LONGEST_FILES names files that do not exist: {missing}"
    items.sort(key=lambda item: rank.get(Path(item.path), len(rank)))  # stable: each file keeps its own order


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
