"""Two CPU processes (gloo) on the same rollouts, split between them, make the one-process update."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ddp_worker.py")

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(n: int, *args: str) -> None:
    torchrun_bin = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun_bin), "--nproc_per_node", str(n), "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_processes_make_the_single_process_update(tmp_path, small_testbed):
    from diagnostics.lm.models import load_model

    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    args = (small_testbed.student_path, small_testbed.teacher_path)
    subprocess.run([sys.executable, str(WORKER), str(one), *args], cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, capture_output=True)
    torchrun(2, str(WORKER), str(two), *args)
    base = dict(load_model(small_testbed.student_path, torch.device("cpu"), torch.float32).named_parameters())
    for normalization in ("kept_global", "per_sequence_mean"):
        single = torch.load(one / f"{normalization}_rank0.pt")
        ranks = [torch.load(two / f"{normalization}_rank{r}.pt") for r in (0, 1)]
        moved = max(float((single["params"][k] - base[k].detach()).abs().max()) for k in base)
        assert moved > 1e-5, "the update is empty: the comparison would be vacuous"
        for rank in ranks:
            assert rank["stats"]["kept_tokens"] == single["stats"]["kept_tokens"]
            assert rank["stats"]["loss"] == pytest.approx(single["stats"]["loss"], abs=1e-6)
            for name, value in single["params"].items():
                assert torch.allclose(rank["params"][name], value, atol=1e-6, rtol=0), (normalization, name)


def test_trainer_runs_under_two_processes(tmp_path, small_testbed):
    """The whole recipe under torchrun: batch split 4 + 4, selection and evaluation across ranks."""
    torchrun(2, "-m", "taopd.cli", "train", "--config", str(ROOT / "configs/train_quick.yaml"),
             f"testbed_config={ROOT / 'configs/testbed_small.yaml'}", f"out_dir={tmp_path}", "steps=3",
             "selectors=[teachability]")
    metrics = pd.read_parquet(tmp_path / "quick" / "metrics.parquet")
    assert metrics["step"].tolist() == [0, 1, 2, 3]
    assert metrics["kept_tokens"].iloc[1:].ge(8).all()  # min one per response over all 8 rollouts of both ranks
    assert (tmp_path / "quick" / "comparison.parquet").is_file()
    shutil.rmtree(tmp_path / "quick")
