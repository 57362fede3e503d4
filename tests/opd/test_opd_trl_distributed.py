"""Two CPU processes (gloo, TRL's accelerate runtime under torchrun) running one `SelectiveDistillationTrainer`
step on a global batch split between them make the one-process update on the whole batch.

`accelerate launch --cpu` starts several CPU processes only through MPI, so the processes are started by
torchrun, whose environment accelerate's `Accelerator` (inside TRL's Trainer) reads: DDP over gloo."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("trl_ddp_worker.py")
CASES = ("reverse_kl_kept_global", "sampled_pg_kept_global", "sampled_pg_per_sequence_mean")

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(out: Path, student: str, teacher: str, processes: int) -> None:
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, str(WORKER), str(out), student, teacher]
    if processes > 1:
        torchrun = Path(sys.executable).with_name("torchrun")
        cmd = [str(torchrun), "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1", "--master_port",
               str(free_port()), *cmd[1:]]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_trl_processes_make_the_single_process_update(tmp_path, small_testbed):
    from diagnostics.lm.models import load_model
    from opd.integrations.trl import cut_vocab

    paths = (small_testbed.student_path, small_testbed.teacher_path)
    run_worker(tmp_path / "one", *paths, processes=1)
    run_worker(tmp_path / "two", *paths, processes=2)
    single_ref = torch.load(tmp_path / "one" / f"{CASES[0]}_rank0.pt")
    vocab = single_ref["params"]["model.embed_tokens.weight"].shape[0]
    base = dict(cut_vocab(load_model(paths[0], torch.device("cpu"), torch.float32), vocab).named_parameters())
    for case in CASES:
        single = torch.load(tmp_path / "one" / f"{case}_rank0.pt")
        moved = max(float((single["params"][k] - base[k].detach()).abs().max()) for k in base)
        assert moved > 1e-3, f"{case}: the update is empty, the comparison would be vacuous"
        kept, valid = single["logged"]["selection/kept_tokens"], single["logged"]["selection/valid_tokens"]
        assert 0 < kept < valid  # a real selection (teachability at 0.3), over the whole batch
        for rank in (0, 1):
            other = torch.load(tmp_path / "two" / f"{case}_rank{rank}.pt")
            for key in ("selection/kept_tokens", "selection/valid_tokens", "selection/disagreement_kept"):
                assert other["logged"][key] == pytest.approx(single["logged"][key], rel=1e-6), (case, key)
            assert other["logged"]["loss"] == pytest.approx(single["logged"]["loss"], abs=1e-6), case
            for name, value in single["params"].items():
                assert (other["params"][name] - value).abs().max() <= 1e-6, (case, rank, name)
