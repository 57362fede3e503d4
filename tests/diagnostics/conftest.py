"""Fixtures shared by the rollout, store and scoring tests.

`vllm_testbed` is the small testbed (head size 32, which vLLM's CPU attention supports), trained
longer so that its responses end in EOS. The student's and teacher's vocabularies still differ in LM-head
rows (37 vs 48), so the padding path is exercised. `vllm_rollouts` samples once per session (tests/conftest.py
shuts the process's vLLM engine down after each test file).
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VLLM_TESTBED_OVERRIDES = [
    # trained long enough to learn the answer format (responses end in EOS), still seconds
    "student.train_steps=150",
    "teacher.train_steps=300",
]


@pytest.fixture(scope="session")
def vllm_testbed():
    """A tiny testbed (seconds to build) whose models vLLM can run on CPU."""
    from diagnostics.core.config import load_config
    from diagnostics.testbed.build import build_testbed
    from diagnostics.testbed.config import TestbedConfig

    overrides = [f"cache_dir={ROOT / '.cache/testbed'}", *VLLM_TESTBED_OVERRIDES]
    return build_testbed(load_config(TestbedConfig, ROOT / "configs/testbed_small.yaml", overrides))


@pytest.fixture(scope="session")
def rollout_prompts(vllm_testbed):
    from diagnostics.testbed.config import heldout_problems

    return [p.prompt for p in heldout_problems(vllm_testbed.config, 16)]


@pytest.fixture(scope="session")
def vllm_rollouts(vllm_testbed, rollout_prompts):
    """Student rollouts from vLLM with the student's top-4 per position (engine started once)."""
    from diagnostics.generation.backends import SamplingConfig
    from diagnostics.generation.rollouts import generate_rollouts

    sampling = SamplingConfig(max_new_tokens=vllm_testbed.config.max_new_tokens + 2, n=2, seed=3, logprobs_k=4)
    return generate_rollouts(vllm_testbed.student_path, None, rollout_prompts, sampling, backend="vllm", progress=False)
