"""diagnostics.run: the run setup both recipes share (pair, held-out prompts, run directory, bank, manifest)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from diagnostics.config import ConfigError
from diagnostics.run import (
    DEFAULT_K_REAL,
    ResolvedPair,
    bank_batch,
    check_run_dir,
    config_hash,
    heldout_problems,
    make_bank,
    read_bank,
    resolve_pair,
    validate_bank,
)


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
    with pytest.raises(ConfigError, match="prompts: real models need a JSONL prompt file"):
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
