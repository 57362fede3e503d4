"""`taopd diagnose protocol=paper`: config errors, the bank of the OPD run's own rollouts, the
release-definition columns against a plain reference, and the whole chain killed and resumed."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from diagnostics.core.config import ConfigError, load_config
from diagnostics.diagnose import read_bank_file, release_columns
from diagnostics.diagnose_config import DiagnoseConfig
from opd.paper_protocol import bank_rollouts, train_config

from processes import kill_after_first_checkpoint

ROOT = Path(__file__).resolve().parents[2]
PAPER_YAML = ROOT / "configs/diagnose_paper.yaml"


def paper(*overrides: str) -> DiagnoseConfig:
    return load_config(DiagnoseConfig, PAPER_YAML, list(overrides))


# ------------------------------------------------------------------------------------------ config


def test_preset_is_the_paper_protocol_and_forces_full_token_opd(tmp_path):
    config = paper(f"out_dir={tmp_path}")
    assert config.protocol == "paper"
    train = train_config(config, tmp_path / "run")
    assert train.selectors == ["full"] and train.seeds == [config.seed] and train.loss == "sampled_pg"
    assert train.save_rollouts and train.save_students
    assert train.optimizer == "paper" and train.normalization == "per_sequence_mean"  # the released trainer
    assert train.betas == [0.9, 0.98] and train.weight_decay == 0.1 and train.max_grad_norm == 1.0
    assert train.steps * train.batch_size * train.samples_per_prompt >= config.n_sequences
    assert train.out_dir == str(tmp_path / "run")


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"train\.selectors: set by protocol=paper"):
        train_config(paper("train.selectors=[teachability]"), Path("x"))
    with pytest.raises(ConfigError, match=r"train\.bogus: unknown key for TrainConfig"):
        train_config(paper("train.bogus=1"), Path("x"))
    with pytest.raises(ConfigError, match=r"train\.steps: must be >= 1"):
        train_config(paper("train.steps=0"), Path("x"))
    with pytest.raises(ConfigError, match=r"n_sequences: the OPD run makes 2 steps x 2 rollouts = 4, fewer"):
        train_config(paper("train.steps=2", "train.batch_size=2", "n_sequences=5"), Path("x"))
    with pytest.raises(ConfigError, match=r"checkpoint: protocol=paper trains its own"):
        train_config(paper("checkpoint=/some/student"), Path("x"))
    with pytest.raises(ConfigError, match=r"mode: protocol=paper re-scores"):
        train_config(paper("mode=first-order"), Path("x"))
    with pytest.raises(ConfigError, match=r"train: only protocol=paper trains"):
        paper("protocol=single-step", "mode=single-step")  # the preset's train overrides make no sense without training


def test_single_step_stays_the_default():
    config = load_config(DiagnoseConfig, ROOT / "configs/diagnose.yaml")
    assert config.protocol == "single-step" and config.mode == "single-step" and config.train == {}
    assert config == DiagnoseConfig()


# ------------------------------------------------------------------------------------------ the bank


def write_step(directory: Path, step: int, responses: list[list[int]], rank: int = 0) -> None:
    frame = pd.DataFrame({"prompt_id": range(len(responses)), "sample_idx": 0,
                          "prompt_ids": [[1, 2, step]] * len(responses), "response_ids": responses, "step": step})
    frame.to_parquet(directory / f"step_{step:06d}_rank{rank}.parquet", index=False)


def test_bank_is_the_first_rollouts_in_step_order(tmp_path):
    """The release's export keeps the first --max-samples response-bearing samples in file order
    (TA-OPD/slime_ta_opd/tools/export_fixed_context_bank.py, main and _sample_row)."""
    for step in (1, 2, 10):  # step 10 sorts after step 2 (zero-padded names), unlike the release's "10.pt"
        write_step(tmp_path, step, [[step, 7], [], [step, 8, 9]])
    bank = bank_rollouts(tmp_path, n_sequences=5, batch_size=3)
    assert bank["step"].tolist() == [1, 1, 2, 2, 10]  # empty responses skipped
    assert bank["prompt_id"].tolist() == [0, 2, 3, 5, 27]  # position in the run's prompt stream
    assert [list(r) for r in bank["response_ids"]] == [[1, 7], [1, 8, 9], [2, 7], [2, 8, 9], [10, 7]]
    with pytest.raises(ValueError, match="6 non-empty rollouts, fewer than n_sequences=7"):
        bank_rollouts(tmp_path, n_sequences=7, batch_size=3)


def test_bank_merges_the_processes_rollouts_in_batch_order(tmp_path):
    """Under torchrun each process rolls out a contiguous share of the step's prompts, in rank order
    (opd.distributed.World.local_rows); the bank is the one-process stream order."""
    for step in (2, 1):
        for rank in (3, 0, 2, 1):
            write_step(tmp_path, step, [[step, rank, 0], [step, rank, 1]], rank=rank)
    bank = bank_rollouts(tmp_path, n_sequences=16, batch_size=8)  # 4 processes x 2 prompts
    assert bank["prompt_id"].tolist() == list(range(16))
    assert [list(r) for r in bank["response_ids"]][:8] == [[1, r, i] for r in range(4) for i in (0, 1)]


def test_bank_file_errors_name_the_key(tmp_path):
    path = tmp_path / "bank.parquet"
    pd.DataFrame({"prompt_id": [0, 1], "prompt_ids": [[1], [2]], "response_ids": [[3], [4, 5]]}).to_parquet(path)
    assert [list(r) for r in read_bank_file(str(path), 1)["response_ids"]] == [[3]]
    with pytest.raises(ConfigError, match="n_sequences: the bank file .* holds 2 responses, fewer than n_sequences=3"):
        read_bank_file(str(path), 3)
    pd.DataFrame({"prompt_id": [0], "response_ids": [[3]]}).to_parquet(path)
    with pytest.raises(ConfigError, match=r"bank: .* lacks the columns \['prompt_ids'\]"):
        read_bank_file(str(path), 1)
    with pytest.raises(FileNotFoundError, match="bank: .* does not exist"):
        read_bank_file(str(tmp_path / "nope.parquet"), 1)


# ------------------------------------------------------------------------------------------ release columns


def test_release_columns_match_a_plain_reference():
    """gain_rel_paper = (KLf_base - KLf_after) / (KLf_base + 1e-12) and D = the full-vocabulary forward
    KL at the base student: TA-OPD/slime_ta_opd/tools/eval_fixed_context_bank.py L156 (KLf_full) and
    L199-201 (G_KLf)."""
    gen = torch.Generator().manual_seed(0)
    before = torch.rand(3, 5, generator=gen) * 2
    before[0, 0] = 0.0  # the release keeps KL_base = 0 finite (gain_rel is NaN there)
    after = before - torch.randn(3, 5, generator=gen) * 0.1
    kl_forward = before.clone()
    out = release_columns({"kl_forward_before": before, "kl_forward_after": after, "kl_forward": kl_forward})
    for i in range(3):
        for j in range(5):
            b, a = float(before[i, j]), float(after[i, j])
            want = (b - a) / (b + 1e-12)
            assert math.isclose(float(out["gain_rel_paper"][i, j]), want, rel_tol=1e-6, abs_tol=1e-6)
            assert float(out["disagreement_full"][i, j]) == float(kl_forward[i, j])


# ------------------------------------------------------------------------------------------ the chain


def command(out_dir: Path) -> list[str]:
    overrides = [f"testbed_config={ROOT / 'configs/testbed_small.yaml'}", f"out_dir={out_dir}", "run_name=p",
                 "n_sequences=8", "shard_sequences=2", "train.steps=8", "train.batch_size=2", "train.eval_every=4",
                 "train.eval_problems=16", "train.bank_sequences=4", "train.checkpoint_every=2", "train.lr=1e-3",
                 "device=cpu", "dtype=float32", "n_boot=20"]
    return [sys.executable, "-m", "taopd.cli", "diagnose", "--config", str(PAPER_YAML), *overrides]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str]) -> str:
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TQDM_DISABLE": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_chain_killed_and_resumed_loses_no_finished_work(tmp_path, small_testbed):
    reference = tmp_path / "reference" / "p"
    run(command(tmp_path / "reference"))
    tokens = pd.read_parquet(reference / "tokens.parquet")
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["protocol"] == "paper" and manifest["mode"] == "checkpoint"
    assert "after full-token OPD trained on all tokens" in manifest["protocol_meaning"]
    assert manifest["paper_protocol"]["steps"] == 8 and manifest["paper_protocol"]["rollouts_per_step"] == 2
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["protocol"] == "paper"
    columns = {"gain", "gain_rel", "gain_rel_paper", "disagreement_full", "score_teachability", "q3"}
    assert columns <= set(tokens.columns)
    bank = pd.read_parquet(reference / "bank.parquet")
    opd_rollouts = pd.read_parquet(reference / "opd_rollouts.parquet")
    assert len(bank) == 8 and opd_rollouts["step"].tolist() == [1, 1, 2, 2, 3, 3, 4, 4]  # the run's first rollouts
    assert [list(r) for r in bank["response_ids"]] == [list(r) for r in opd_rollouts["response_ids"]]
    assert (reference / "prompt_shard.jsonl").read_text().count("\n") == 16  # 8 steps x 2 prompts

    # kill -9 during training (after its first checkpoint), then rerun the same command
    killed = tmp_path / "killed" / "p"
    arm = killed / "opd" / "arms" / "full-r1-s0"
    kill_after_first_checkpoint(command(tmp_path / "killed"), ROOT, arm, timeout_s=300)
    assert not (arm / "result.json").exists(), "killed too late: the OPD run had finished"
    log = run(command(tmp_path / "killed"))
    assert "resumed from" in log  # training continued from its checkpoint, not from scratch
    got = pd.read_parquet(killed / "tokens.parquet")
    pd.testing.assert_frame_equal(got, tokens, check_exact=False, atol=1e-6, rtol=0)

    # a kill during re-scoring: the finished OPD run, the bank and the other shards are reused
    (killed / "tokens.parquet").unlink()
    (killed / "shards" / "shard_0001.pt").unlink()
    kept = [arm / "student" / "model.safetensors", killed / "opd_rollouts.parquet", killed / "bank.parquet",
            killed / "shards" / "shard_0000.pt", killed / "shards" / "shard_0002.pt"]
    stamps = {path: path.stat().st_mtime_ns for path in kept}
    log = run(command(tmp_path / "killed"))
    assert "resumed from" not in log
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in stamps.items()), "finished work was redone"
    pd.testing.assert_frame_equal(pd.read_parquet(killed / "tokens.parquet"), tokens, check_exact=False, atol=1e-6,
                                  rtol=0)


@pytest.mark.slow
def test_chain_under_two_processes(tmp_path, small_testbed):
    """torchrun: the OPD run trains on both processes (each rolls out half of a step's prompts), the bank merges
    their rollouts in the one-process stream order, the re-scoring splits its shards (diagnostics.shards)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    # the chain's command with 4 steps and no checkpoints (a key given twice is refused, so replace, not append)
    changed = {"train.steps": "4", "train.checkpoint_every": "0"}
    cmd = [f"{t.split('=')[0]}={changed[t.split('=')[0]]}" if t.split("=")[0] in changed else t
           for t in command(tmp_path)[1:]]
    log = run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
               str(free_port()), *cmd])
    out = tmp_path / "p"
    rollouts = sorted(p.name for p in (out / "opd" / "arms" / "full-r1-s0" / "rollouts").iterdir())
    assert rollouts == [f"step_{s:06d}_rank{r}.parquet" for s in (1, 2, 3, 4) for r in (0, 1)]
    opd_rollouts = pd.read_parquet(out / "opd_rollouts.parquet")
    assert opd_rollouts["prompt_id"].tolist() == list(range(8))
    assert opd_rollouts["step"].tolist() == [1, 1, 2, 2, 3, 3, 4, 4]
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert len(tokens) == sum(len(r) for r in pd.read_parquet(out / "bank.parquet")["response_ids"])
    assert tokens["gain"].notna().all() and log.count("summary") <= 2  # one process reports


@pytest.mark.slow
def test_chain_with_the_trl_engine_under_two_processes(tmp_path, small_testbed):
    """train.engine=trl under torchrun: TRL trains the OPD stage on both processes (the paper optimizer as TRL's
    adamw_torch) and each keeps its completions as the own engine does; the chain banks them in the one-process
    stream order and re-scores its final student split over the processes."""
    from transformers import AutoTokenizer

    torchrun = Path(sys.executable).with_name("torchrun")
    changed = {"train.steps": "4", "train.checkpoint_every": "0"}
    cmd = [f"{t.split('=')[0]}={changed[t.split('=')[0]]}" if t.split("=")[0] in changed else t
           for t in command(tmp_path)[1:]]
    run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         *cmd, "train.engine=trl"])
    out = tmp_path / "p"
    arm = out / "opd" / "arms" / "full-r1-s0"
    assert sorted(p.name for p in (arm / "rollouts").iterdir()) == \
        [f"step_{s:06d}_rank{r}.parquet" for s in range(1, 5) for r in (0, 1)]
    assert json.loads((out / "opd" / "config.json").read_text())["engine"] == "trl"
    opd_rollouts = pd.read_parquet(out / "opd_rollouts.parquet")
    assert opd_rollouts["prompt_id"].tolist() == list(range(8))
    assert opd_rollouts["step"].tolist() == [1, 1, 2, 2, 3, 3, 4, 4]
    # each banked rollout's prompt is the stream's prompt at its prompt_id (the shard TRL trained on, in order)
    shard = [json.loads(line)["prompt"] for line in (out / "prompt_shard.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(small_testbed.student_path)
    assert [tokenizer.decode(ids) for ids in opd_rollouts["prompt_ids"]] == shard[:8]
    assert opd_rollouts["response_ids"].map(len).gt(0).all()
    tokens = pd.read_parquet(out / "tokens.parquet")
    assert len(tokens) == sum(len(r) for r in pd.read_parquet(out / "bank.parquet")["response_ids"])
    assert tokens["gain"].notna().all()
