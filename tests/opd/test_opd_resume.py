"""Kill -9 a training run after its first checkpoint, resume it, and get the uninterrupted run's metrics."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from processes import kill_after_first_checkpoint

ROOT = Path(__file__).resolve().parents[2]
COMPARED = ["step", "selector", "ratio", "seed", "loss", "kept_tokens", "valid_tokens", "accuracy", "kl_to_teacher"]

pytestmark = pytest.mark.slow


def command(out_dir: Path, *extra: str) -> list[str]:
    overrides = [f"testbed_config={ROOT / 'configs/testbed_small.yaml'}", f"out_dir={out_dir}",
                 "selectors=[teachability]", "steps=24", "checkpoint_every=3", "eval_every=4"]
    config = str(ROOT / "configs/train_quick.yaml")
    return [sys.executable, "-m", "taopd.cli", "train", "--config", config, *extra, *overrides]


def run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, small_testbed):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    run(command(reference))
    arm_dir = killed / "quick" / "arms" / "teachability-r0.1-s0"
    proc = kill_after_first_checkpoint(command(killed), ROOT, arm_dir, timeout_s=240)
    assert proc.returncode == -signal.SIGKILL
    assert not (arm_dir / "result.json").exists(), "killed too late: the arm had finished"
    assert not (killed / "quick" / "metrics.parquet").exists()
    run(command(killed, "--resume"))
    want = pd.read_parquet(reference / "quick" / "metrics.parquet")[COMPARED]
    got = pd.read_parquet(killed / "quick" / "metrics.parquet")[COMPARED]
    pd.testing.assert_frame_equal(got, want, check_exact=False, atol=1e-6, rtol=0)
    want_c = pd.read_parquet(reference / "quick" / "comparison.parquet")
    got_c = pd.read_parquet(killed / "quick" / "comparison.parquet")
    cols = ["acc_after_mean", "kl_after_mean", "supervised_tokens", "live_gain_mean"]
    pd.testing.assert_frame_equal(got_c[cols], want_c[cols], check_exact=False, atol=1e-6, rtol=0)
