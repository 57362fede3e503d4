"""`taopd train engine=trl` (opd.trl_recipe): the metrics rows it builds from TRL's log history, the settings it
refuses, and one end-to-end run on the small testbed logging to trackio's local store (offline)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from opd.config import Arm, TrainConfig
from opd.trl_recipe import arm_rows, check_trl_config

ROOT = Path(__file__).resolve().parents[2]
BASE = {"accuracy": 0.25, "kl_to_teacher": 0.5, "peak_mem_mb": 100.0}


def test_arm_rows_merge_trl_logs_and_evaluations_by_step():
    history = [  # as TRL's state.log_history holds them: ArmCallback's entry, then TRL's training log, per step
        {"step": 1, "peak_mem_mb": 110.0, "step_seconds": 2.0},
        {"step": 1, "loss": 0.5, "selection/kept_tokens": 3.0, "selection/valid_tokens": 40.0, "step_time": 0.1},
        {"step": 2, "peak_mem_mb": 120.0, "step_seconds": 3.0, "accuracy": 0.5, "kl_to_teacher": 0.25},
        {"step": 2, "loss": 0.25, "selection/kept_tokens": 4.0, "selection/valid_tokens": 38.0, "step_time": 0.1},
        {"step": 2, "train_runtime": 9.0, "train_loss": 0.375},  # Trainer's summary at the end
    ]
    rows = arm_rows(Arm("teachability", 0.1, 7), history, BASE)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["accuracy"] == 0.25 and rows[0]["kept_tokens"] == 0 and math.isnan(rows[0]["loss"])
    assert (rows[1]["loss"], rows[1]["kept_tokens"], rows[1]["valid_tokens"]) == (0.5, 3, 40)
    assert math.isnan(rows[1]["accuracy"]) and rows[1]["wall_time_s"] == 2.0
    assert (rows[2]["accuracy"], rows[2]["kl_to_teacher"], rows[2]["wall_time_s"]) == (0.5, 0.25, 5.0)
    assert (rows[2]["peak_mem_mb"], rows[2]["selector"], rows[2]["ratio"], rows[2]["seed"]) == (120.0, "teachability",
                                                                                               0.1, 7)


@pytest.mark.parametrize("override, key", [({"micro_batch_size": 4}, "micro_batch_size"),
                                           ({"optimizer": "adam"}, "optimizer")])
def test_unsupported_settings_are_refused_by_key(override, key):
    with pytest.raises(ValueError, match=key):
        check_trl_config(TrainConfig(engine="trl", **override))


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_trl_decay_split_is_the_paper_optimizers_on_qwen_models(arch):
    """optimizer: paper under TRL: HF's Trainer exempts the names it recognises (biases, *norm* weights) from weight
    decay; on Qwen-family models those are exactly Megatron's biases and 1-D parameters (opd.optim.no_weight_decay)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, Trainer

    from opd.optim import no_weight_decay

    config_class, model_class = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (Qwen3Config, Qwen3ForCausalLM)
    model = model_class(config_class(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    decayed_hf = set(Trainer.get_decay_parameter_names(None, model))
    decayed_paper = {name for name, param in model.named_parameters() if not no_weight_decay(name, param)}
    assert decayed_hf == decayed_paper
    assert any(name.endswith(".bias") for name, _ in model.named_parameters()) == (arch == "qwen2")
    check_trl_config(TrainConfig(engine="trl", optimizer="paper"))  # accepted


def test_report_to_needs_the_trl_engine():
    with pytest.raises(ValueError, match="report_to"):
        TrainConfig(report_to="trackio")


@pytest.mark.slow
def test_engine_trl_writes_the_comparison_and_logs_selection_to_trackio(tmp_path, small_testbed):
    """Two arms of the quick config through TRL with report_to=trackio, trackio's store in tmp_path (its
    TRACKIO_DIR is read at import, hence the subprocesses); the run writes the own engine's tables."""
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "taopd.cli", "train", "--config", str(ROOT / "configs/train_quick.yaml"),
           f"testbed_config={ROOT / 'configs/testbed_small.yaml'}", f"out_dir={tmp_path / 'out'}", "engine=trl",
           "report_to=trackio", "steps=2", "eval_every=2", "checkpoint_every=0", "selectors=[full, teachability]"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "out" / "quick"
    metrics = pd.read_parquet(run / "metrics.parquet")
    assert metrics.groupby("selector")["step"].apply(list).to_dict() == {"full": [0, 1, 2], "teachability": [0, 1, 2]}
    trained = metrics[metrics["step"] > 0]
    full, kept = trained[trained["selector"] == "full"], trained[trained["selector"] == "teachability"]
    assert (full["kept_tokens"] == full["valid_tokens"]).all() and (kept["kept_tokens"] < kept["valid_tokens"]).all()
    assert metrics.loc[metrics["step"] == 2, "accuracy"].notna().all()
    comparison = pd.read_parquet(run / "comparison.parquet")
    assert set(comparison["selector"]) == {"full", "teachability"}
    assert json.loads((run / "manifest.json").read_text())["engine"] == "trl"
    read = ("import json; from trackio.sqlite_storage import SQLiteStorage as S; "
            "print(json.dumps({r: S.get_logs('taopd', r) for r in S.get_runs('taopd')}))")
    stored = subprocess.run([sys.executable, "-c", read], env=env, capture_output=True, text=True, timeout=300)
    assert stored.returncode == 0, stored.stderr[-3000:]
    logs = json.loads(stored.stdout.strip().splitlines()[-1])
    assert sorted(logs) == ["quick/full-r1-s0", "quick/teachability-r0.1-s0"]
    steps = [row for row in logs["quick/teachability-r0.1-s0"] if "train/selection/kept_tokens" in row]
    assert [row["step"] for row in steps] == [1, 2]
    for row, expected in zip(steps, kept.itertuples()):
        assert row["train/selection/kept_tokens"] == expected.kept_tokens
        assert row["train/selection/effective_ratio"] == pytest.approx(expected.kept_tokens / expected.valid_tokens)
        for name in ("student_entropy", "disagreement", "compat_mass"):
            assert all(math.isfinite(row[f"train/selection/{name}_{where}"]) for where in ("kept", "all"))
    assert any("train/heldout/accuracy" in row for row in logs["quick/teachability-r0.1-s0"])


class Interrupted(RuntimeError):
    """Raised by the test to stop a run mid-arm (as a kill would)."""


@pytest.mark.slow
def test_a_killed_trl_arm_resumes_from_its_checkpoint_to_the_same_result(tmp_path, small_testbed, monkeypatch):
    """Steps 1-2, TRL's checkpoint, killed in step 3; `--resume` continues from checkpoint-2 (TRL restores
    weights, AdamW state, RNG and the data position) and ends where an uninterrupted run ends."""
    from diagnostics.core.config import load_config
    from opd import trl_recipe
    from opd.engines import run_training

    def config(name: str) -> TrainConfig:
        return load_config(TrainConfig, ROOT / "configs/train_quick.yaml", [
            f"testbed_config={ROOT / 'configs/testbed_small.yaml'}", f"out_dir={tmp_path}", f"run_name={name}",
            "engine=trl", "steps=4", "eval_every=4", "checkpoint_every=2", "selectors=[teachability]"])

    straight = pd.read_parquet(run_training(config("straight")) / "metrics.parquet")
    on_step_end = trl_recipe.ArmCallback.on_step_end

    def killed_at_step_3(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise Interrupted("killed")
        return on_step_end(self, args, state, control, **kwargs)

    monkeypatch.setattr(trl_recipe.ArmCallback, "on_step_end", killed_at_step_3)
    with pytest.raises(Interrupted):
        run_training(config("killed"))
    arm_dir = tmp_path / "killed" / "arms" / "teachability-r0.1-s0"
    assert [p.name for p in (arm_dir / "trl").glob("checkpoint-*")] == ["checkpoint-2"]
    monkeypatch.setattr(trl_recipe.ArmCallback, "on_step_end", on_step_end)
    resumed = pd.read_parquet(run_training(config("killed"), resume=True) / "metrics.parquet")
    assert resumed["step"].tolist() == straight["step"].tolist() == [0, 1, 2, 3, 4]
    columns = ["loss", "kept_tokens", "valid_tokens", "accuracy", "kl_to_teacher"]
    pd.testing.assert_frame_equal(resumed[columns], straight[columns], rtol=1e-5, atol=1e-6)
    assert not (arm_dir / "trl").exists()  # TRL's checkpoints removed once the arm is done
