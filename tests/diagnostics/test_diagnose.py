"""The diagnose recipe end to end: outputs, resume after a real kill, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from diagnostics.core.config import ConfigError, load_config
from diagnostics.diagnose import run_diagnose
from diagnostics.diagnose_config import DiagnoseConfig

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = ["seq_id", "pos", "kl_forward_before", "kl_forward_after", "gain", "gain_rel", "spillover"]


def small(tmp_path, *extra: str) -> DiagnoseConfig:
    overrides = [
        f"testbed_config={ROOT / 'configs/testbed_small.yaml'}", f"out_dir={tmp_path}", "n_sequences=6",
        "shard_sequences=2", "backend=hf", "group_ratios=[0.2]", "group_selectors=[teachability, random]",
        "extra_k=[2]", *extra,
    ]
    return load_config(DiagnoseConfig, ROOT / "configs/diagnose.yaml", overrides)


@pytest.mark.slow
def test_outputs_and_manifest(tmp_path, small_testbed):
    run_dir = run_diagnose(small(tmp_path), progress=False)
    tokens = pd.read_parquet(run_dir / "tokens.parquet")
    assert set(REQUIRED) <= set(tokens.columns)
    expected = {"disagreement", "compat_mass", "disagreement_k2", "score_teachability", "score_teachability_k2", "q3",
                "token", "score_prefix", "score_excess_loss", "score_teacher_entropy", "score_topk_overlap_k2",
                "weight_iw_opd"}  # the published rules (issue 22): a weight rule is a weight_<name> column
    assert expected <= set(tokens.columns)
    bank = pd.read_parquet(run_dir / "bank.parquet")
    assert len(tokens) == sum(len(r) for r in bank["response_ids"])  # one row per valid position
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for key in ("student_path", "teacher_path", "bank_path", "mode", "loss", "optimizer", "lr", "k", "seed", "dtype",
                "versions", "student_hash", "teacher_hash"):
        assert key in manifest, key
    group = pd.read_parquet(run_dir / "group.parquet")
    assert set(group["selector"]) == {"teachability", "random"}
    assert group.groupby("selector")["kept"].sum().min() >= 1


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted(tmp_path, small_testbed):
    # all three runs in fresh processes with one torch thread: a test process's state (thread pools, libraries an
    # earlier test imported) can round float sums differently from a fresh process's
    script = (
        "import sys\nimport torch\ntorch.set_num_threads(1)\n"
        "from diagnostics.core.config import load_config\n"
        "from diagnostics.diagnose import run_diagnose\nfrom diagnostics.diagnose_config import DiagnoseConfig\n"
        "if __name__ == '__main__':\n"
        "    run_diagnose(load_config(DiagnoseConfig, sys.argv[1], sys.argv[2:]), progress=False)\n"
    )
    overrides = [
        f"testbed_config={ROOT / 'configs/testbed_small.yaml'}", f"out_dir={tmp_path / 'killed'}", "n_sequences=8",
        "shard_sequences=1", "backend=hf", "group_selectors=[]", "run_name=r",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", script, str(ROOT / "configs/diagnose.yaml")]
    proc = subprocess.Popen([*command, *overrides], env=env, cwd=ROOT)
    shard_dir = tmp_path / "killed" / "r" / "shards"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(shard_dir.glob("shard_*.pt"))) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = sorted(shard_dir.glob("shard_*.pt"))
    assert 2 <= len(finished) < 8, "the kill should land mid-run"
    assert not (tmp_path / "killed" / "r" / "tokens.parquet").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in finished}
    subprocess.run([*command, *overrides], env=env, cwd=ROOT, check=True)  # the resume
    unchanged = all((shard_dir / name).stat().st_mtime_ns == stamp for name, stamp in stamps.items())
    assert unchanged, "finished shards were recomputed"
    fresh_overrides = [o if not o.startswith("out_dir") else f"out_dir={tmp_path / 'fresh'}" for o in overrides]
    subprocess.run([*command, *fresh_overrides], env=env, cwd=ROOT, check=True)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "killed" / "r" / "tokens.parquet"),
                                  pd.read_parquet(tmp_path / "fresh" / "r" / "tokens.parquet"))


def test_config_errors_before_any_model():
    with pytest.raises(ConfigError, match=r"lr: must be in \(0, 1\]"):
        load_config(DiagnoseConfig, ROOT / "configs/diagnose.yaml", ["lr=0"])
    with pytest.raises(ConfigError, match="checkpoint: mode=checkpoint needs"):
        load_config(DiagnoseConfig, ROOT / "configs/diagnose.yaml", ["mode=checkpoint"])
    with pytest.raises(ConfigError, match="group_selectors: unknown selector.*registered"):
        load_config(DiagnoseConfig, ROOT / "configs/diagnose.yaml", ["group_selectors=[nope]"])
    with pytest.raises(ConfigError, match="teacher: give both"):
        load_config(DiagnoseConfig, ROOT / "configs/diagnose.yaml", ["student=/x"])


def test_resume_with_another_config_names_the_keys(tmp_path, small_testbed):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    config = json.loads(json.dumps(small(tmp_path).__dict__, default=list))
    (run_dir / "config.json").write_text(json.dumps({**config, "lr": 1.0}))
    with pytest.raises(ValueError, match="different config.*lr"):
        run_diagnose(small(tmp_path, "run_name=r"), progress=False)


def test_mismatched_models_rejected_before_compute(tmp_path, small_testbed, default_testbed):
    config = small(tmp_path, f"student={small_testbed.student_path}", f"teacher={default_testbed.teacher_path}")
    with pytest.raises(ValueError, match="tokenizers differ|vocabulary rows"):
        run_diagnose(config, progress=False)


def test_run_id_follows_the_resolved_models():
    config = DiagnoseConfig()
    first = config.run_id({"student_path": ".cache/testbed/aaaa/student", "teacher_path": "t"})
    assert first == config.run_id({"student_path": ".cache/testbed/aaaa/student", "teacher_path": "t"})
    # a rebuilt testbed lives under a new cache key: its run must not resume the old one's shards
    assert first != config.run_id({"student_path": ".cache/testbed/bbbb/student", "teacher_path": "t"})
