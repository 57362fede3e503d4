"""The diagnostic under torchrun: 2 CPU processes (gloo) write the same tables as one, and a killed process
resumes shard by shard (diagnostics.shards)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from processes import kill_rank_when

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def diagnose_command(processes: int, out: Path, *overrides: str) -> list[str]:
    args = ["-m", "taopd.cli", "diagnose", f"testbed_config={ROOT / 'configs/testbed_small.yaml'}",
            f"out_dir={out}", "run_name=r", "backend=hf", "device=cpu", "n_boot=10", *overrides]
    if processes == 1:
        return [sys.executable, *args]
    torchrun = Path(sys.executable).with_name("torchrun")
    return [str(torchrun), "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1", "--master_port",
            str(free_port()), *args]


def run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def assert_same_tables(a: Path, b: Path, names=("tokens.parquet",)) -> None:
    for name in names:
        pd.testing.assert_frame_equal(pd.read_parquet(a / "r" / name), pd.read_parquet(b / "r" / name))


# one set of overrides for both tests, so they share the one-process reference run; 4 shards of 2 sequences, so a
# kill after the first shard lands mid-run
OVERRIDES = ("n_sequences=8", "shard_sequences=2", "group_selectors=[teachability, random]", "group_ratios=[0.2]")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, small_testbed) -> Path:
    out = tmp_path_factory.mktemp("one")
    run(diagnose_command(1, out, *OVERRIDES))
    return out


def test_two_processes_write_the_tables_of_one(tmp_path, one_process):
    run(diagnose_command(2, tmp_path / "two", *OVERRIDES))
    assert_same_tables(one_process, tmp_path / "two", ("tokens.parquet", "group.parquet", "bank.parquet"))
    assert sorted(p.name for p in (tmp_path / "two" / "r" / "shards").iterdir()) == \
        ["shard_0000.pt", "shard_0001.pt", "shard_0002.pt", "shard_0003.pt"]


def test_a_killed_process_resumes_to_the_same_tables(tmp_path, one_process):
    shards = tmp_path / "two" / "r" / "shards"
    exit_code = kill_rank_when(diagnose_command(2, tmp_path / "two", *OVERRIDES), ROOT, ENV, rank=1,
                               ready=lambda: len(list(shards.glob("shard_*.pt"))) >= 1, timeout_s=300)
    assert exit_code != 0, "torchrun reports the killed process"
    finished = sorted(shards.glob("shard_*.pt"))
    assert 1 <= len(finished) < 4, "the kill should land mid-run"
    assert not (tmp_path / "two" / "r" / "tokens.parquet").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in finished}
    run(diagnose_command(2, tmp_path / "two", *OVERRIDES))
    assert all((shards / name).stat().st_mtime_ns == stamp for name, stamp in stamps.items()), \
        "finished shards were recomputed"
    assert_same_tables(one_process, tmp_path / "two", ("tokens.parquet", "group.parquet"))
