"""diagnostics.pair: the run setup both recipes share (pair, held-out prompts, run directory, bank, manifest)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from diagnostics.bank import bank_batch, make_bank, read_bank, validate_bank
from diagnostics.core.config import ConfigError
from diagnostics.core.rundir import check_run_dir, claim_run_dir, config_hash
from diagnostics.pair import DEFAULT_K_REAL, ResolvedPair, check_k, heldout_problems, resolve_pair


def test_real_models_take_the_real_defaults():
    pair = resolve_pair("s", "t", testbed_config="unused.yaml")
    assert pair == ResolvedPair("s", "t", DEFAULT_K_REAL, 256, None)
    assert resolve_pair("s", "t", testbed_config="unused.yaml", k=4, max_new_tokens=9).k == 4


def test_heldout_problems_from_a_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(5)))
    pair = ResolvedPair("s", "t", 16, 256)
    assert [p.prompt for p in heldout_problems(pair, 2, split_seed=0, prompts=str(path), key="prompts")] == ["q0", "q1"]
    last = heldout_problems(pair, 2, split_seed=2, prompts=str(path), key="eval_prompts", from_end=True)
    assert [p.answer for p in last] == ["a3", "a4"]
    with pytest.raises(ConfigError, match="eval_prompts: .* has 5 prompts, fewer than the 6"):
        heldout_problems(pair, 6, split_seed=0, prompts=str(path), key="eval_prompts")
    with pytest.raises(ConfigError, match="prompts: real models need a prompt file"):
        heldout_problems(pair, 1, split_seed=0, prompts="", key="prompts")


def test_check_run_dir(tmp_path):
    record = {"lr": 0.1, "steps": 3, "n_boot": 10}
    check_run_dir(tmp_path, record)  # nothing there: a fresh run
    check_run_dir(tmp_path, record, resume=False)
    with pytest.raises(FileNotFoundError, match="no run to resume"):
        check_run_dir(tmp_path, record, resume=True)
    (tmp_path / "config.json").write_text(json.dumps(record))
    check_run_dir(tmp_path, record)
    check_run_dir(tmp_path, record, resume=True)
    with pytest.raises(FileExistsError, match="--resume"):
        check_run_dir(tmp_path, record, resume=False)
    with pytest.raises(ConfigError, match=r"different config \(differing keys: lr: 0.1 -> 0.5, steps: 3 -> 4\)"):
        check_run_dir(tmp_path, {**record, "lr": 0.5, "steps": 4})
    check_run_dir(tmp_path, {**record, "n_boot": 99}, ignore={"n_boot"})


def test_config_hash_is_stable_and_order_free():
    assert config_hash({"a": 1, "b": [2]}) == config_hash({"b": [2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    assert len(config_hash({})) == 8


def test_bank_validation_names_the_row():
    bank = pd.DataFrame({"seq_id": [0, 1], "prompt_ids": [[1, 2], [1, 2]], "response_ids": [[3], [3, 999]]})
    with pytest.raises(ValueError, match="seq_id 1 response_ids has token id 999 outside the vocabulary"):
        validate_bank(bank, 50, "bank")
    rollouts = pd.DataFrame({"prompt_id": [0], "prompt_ids": [[1, 2]], "response_ids": [[]]})
    with pytest.raises(ValueError, match="empty response_ids"):
        make_bank(rollouts, 8, 50)


def test_bank_round_trip(tmp_path):
    rollouts = pd.DataFrame({"prompt_id": [7, 9], "prompt_ids": [[1, 2], [4]], "response_ids": [[3, 5, 6], [8]]})
    bank = make_bank(rollouts, 2, 10)  # responses cut to 2 tokens
    assert bank["response_ids"].tolist() == [[3, 5], [8]] and bank["seq_id"].tolist() == [0, 1]
    bank.to_parquet(tmp_path / "bank.parquet")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        read_bank(tmp_path / "bank.parquet", 6)
    tensors = bank_batch(read_bank(tmp_path / "bank.parquet", 10), None)
    assert tensors.ids.tolist() == [[1, 2, 3, 5], [4, 8, 0, 0]]  # pad id 0 when the tokenizer has none
    assert tensors.valid.tolist() == [[True, True], [True, False]]
    assert torch.equal(tensors.targets[0], torch.tensor([3, 5]))


def test_corrupt_saved_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{\n")
    with pytest.raises(ConfigError, match=rf"{tmp_path}/config.json: the run's saved config is not valid JSON"):
        check_run_dir(tmp_path, {"lr": 0.1})
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a JSON object"):
        check_run_dir(tmp_path, {"lr": 0.1})


def test_k_against_the_vocabulary():
    check_k(70, k=69, extra_k=[1, 8])
    with pytest.raises(ConfigError, match=r"^k: K=70 is not below the pair's vocabulary of 70 tokens"):
        check_k(70, k=70)
    with pytest.raises(ConfigError, match=r"^extra_k: K=1000 is not below"):
        check_k(70, k=4, extra_k=[8, 1000])


HOLD = ("import sys, time; from diagnostics.core.lock import acquire_run_lock; acquire_run_lock(sys.argv[1]); "
        "print('held', flush=True); time.sleep(600)")


def test_a_second_process_on_the_same_run_refuses(tmp_path):
    """One process per run directory: the second names the directory and the holder's pid; the lock
    goes with the holder (killed included); the same process may take its own lock again."""
    from diagnostics.core.lock import RunLockedError, acquire_run_lock, release_run_lock

    run_dir = tmp_path / "run"
    root = Path(__file__).resolve().parents[2]
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=root, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=rf"{run_dir} is in use by another taopd process \(pid {holder.pid}\)"):
            acquire_run_lock(run_dir)
        (run_dir / "config.json").write_text(json.dumps({"lr": 0.1}))
        with pytest.raises(RunLockedError):
            claim_run_dir(run_dir, {"lr": 0.1}, resume=True)
    finally:
        holder.kill()
        holder.wait()
    claim_run_dir(run_dir, {"lr": 0.1}, resume=True)  # the killed holder's lock is gone
    acquire_run_lock(run_dir)  # already ours: no-op
    release_run_lock(run_dir)


def test_claim_checks_before_creating_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run to resume"):
        claim_run_dir(tmp_path / "none", {"lr": 0.1}, resume=True)
    assert not (tmp_path / "none").exists()
