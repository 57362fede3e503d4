"""The training recipe end to end on the small testbed: outputs, bad inputs, NaN handling, every selector."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis.training import run_comparison
from diagnostics import losses
from diagnostics.core.config import ConfigError, load_config
from diagnostics.lm.models import IncompatibleModelsError
from diagnostics.signals import list_scores
from opd.config import TrainConfig
from opd.engines import run_training
from opd.step import NonFiniteError
from opd.trainer import LIVE_GAIN_COLUMNS

ROOT = Path(__file__).resolve().parents[2]
METRIC_COLUMNS = ["step", "selector", "ratio", "seed", "loss", "kept_tokens", "accuracy", "kl_to_teacher",
                  "wall_time_s", "peak_mem_mb"]
COMPARISON_COLUMNS = ["selector", "ratio", "n_seeds", "acc_before_mean", "acc_before_std", "acc_after_mean",
                      "acc_after_std", "supervised_tokens", "time_s", "peak_mem_mb", "live_gain_mean",
                      "live_gain_ci_low", "live_gain_ci_high"]

pytestmark = pytest.mark.slow


def quick_overrides(out_dir: Path, *overrides: str) -> list[str]:
    return [f"testbed_config={ROOT / 'configs/testbed_small.yaml'}", f"out_dir={out_dir}", *overrides]


def quick_config(out_dir: Path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, ROOT / "configs/train_quick.yaml", quick_overrides(out_dir, *overrides))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, small_testbed):
    """The run through `taopd train`: the trainer's raw tables, then the comparison from analysis."""
    from taopd.cli import main

    overrides = quick_overrides(tmp_path_factory.mktemp("train"), "seeds=[0, 1]")
    assert main(["train", "--config", str(ROOT / "configs/train_quick.yaml"), *overrides]) == 0
    config = load_config(TrainConfig, ROOT / "configs/train_quick.yaml", overrides)
    return config, Path(config.out_dir) / config.run_id()


def test_outputs_and_schema(quick_run):
    config, run_dir = quick_run
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    assert list(metrics.columns) == METRIC_COLUMNS + ["valid_tokens"]
    assert len(metrics) == len(config.arms()) * (config.steps + 1)
    evaluated = metrics.dropna(subset=["accuracy"])
    assert sorted(evaluated["step"].unique()) == [0, 3, 6]  # eval_every=3, steps=6
    assert metrics["kl_to_teacher"].isna().equals(metrics["accuracy"].isna())
    assert (metrics.loc[metrics["step"] > 0, "kept_tokens"] >= 1).all()
    full = metrics[(metrics["selector"] == "full") & (metrics["step"] > 0)]
    assert (full["kept_tokens"] == full["valid_tokens"]).all()
    sel = metrics[(metrics["selector"] == "teachability") & (metrics["step"] > 0)]
    assert (sel["kept_tokens"] < sel["valid_tokens"]).all()
    gains = pd.read_parquet(run_dir / "live_gain.parquet")
    assert list(gains.columns) == LIVE_GAIN_COLUMNS and len(gains) == len(config.arms()) * config.bank_sequences
    comparison = pd.read_parquet(run_dir / "comparison.parquet")
    assert set(COMPARISON_COLUMNS) <= set(comparison.columns)
    assert list(comparison["selector"]) == ["full", "teachability"] and list(comparison["n_seeds"]) == [2, 2]
    assert (run_dir / "comparison.md").read_text().count("\n| ") == 3
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["normalization"] == "kept_global" and manifest["kind"] == "train"
    assert len(manifest["student_hash"]) == 64 and "torch" in manifest["versions"]
    assert manifest["config"]["selectors"] == ["full", "teachability"]
    assert not list(run_dir.glob("arms/*/ckpt-*"))  # finished arms keep no checkpoints


def test_analysis_reads_the_run(quick_run):
    from analysis.io import load_train_run
    from analysis.plots import plot_learning_curves

    metrics, comparison, manifest = load_train_run(quick_run[1])
    assert comparison is not None and manifest["run_name"] == "quick"
    plot_learning_curves(metrics, run_name="quick")


def test_live_gain_is_the_kl_drop_on_the_bank(quick_run):
    """Both are measured on the same bank: mean G = KL(step 0) - KL(last step), per seed."""
    _, run_dir = quick_run
    for arm_dir in (run_dir / "arms").iterdir():
        result = json.loads((arm_dir / "result.json").read_text())
        arm = pd.read_parquet(arm_dir / "metrics.parquet")
        drop = arm["kl_to_teacher"].iloc[0] - arm["kl_to_teacher"].iloc[-1]
        assert result["live_gain"] == pytest.approx(drop, abs=1e-5)
    comparison = pd.read_parquet(run_dir / "comparison.parquet")
    assert (comparison["live_gain_ci_low"] <= comparison["live_gain_mean"]).all()
    assert (comparison["live_gain_mean"] <= comparison["live_gain_ci_high"]).all()


def test_existing_run_needs_resume_and_same_config(quick_run):
    config, run_dir = quick_run
    with pytest.raises(FileExistsError, match="--resume"):
        run_training(config)
    changed = quick_config(Path(config.out_dir), "seeds=[0, 1]", "lr=0.5", "steps=7")
    with pytest.raises(ConfigError, match=r"differing keys: lr: 0.001 -> 0.5, steps: 6 -> 7"):
        run_training(changed, resume=True)
    before = pd.read_parquet(run_dir / "metrics.parquet")
    run_training(config, resume=True)  # every arm is done: nothing to train, same tables
    pd.testing.assert_frame_equal(before, pd.read_parquet(run_dir / "metrics.parquet"))


def test_arms_side_by_side_equal_one_process(quick_run, tmp_path):
    """arm_workers=2 (two spawned processes, four arms): every table equals the one-process run's but the clocks."""
    config, run_dir = quick_run
    side = quick_config(tmp_path, "seeds=[0, 1]", "arm_workers=2")
    assert side.run_id() == config.run_id()  # arm_workers is not in the run hash: it changes no result
    side_dir = run_training(side)
    clocks = ["wall_time_s", "peak_mem_mb"]
    pd.testing.assert_frame_equal(pd.read_parquet(side_dir / "metrics.parquet").drop(columns=clocks),
                                  pd.read_parquet(run_dir / "metrics.parquet").drop(columns=clocks))
    pd.testing.assert_frame_equal(pd.read_parquet(side_dir / "live_gain.parquet"),
                                  pd.read_parquet(run_dir / "live_gain.parquet"))


def test_arms_side_by_side_refuses_what_it_cannot_split(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="arm_workers: .*engine own and rollout_backend hf only"):
        quick_config(tmp_path, "arm_workers=2", "rollout_backend=vllm")
    with pytest.raises(ConfigError, match="arm_workers: must be >= 1"):
        quick_config(tmp_path, "arm_workers=0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="arm_workers: 2 processes side by side inside a multi-process launch"):
        run_training(quick_config(tmp_path, "arm_workers=2"))


def test_resume_without_run_is_an_error(tmp_path, small_testbed):
    with pytest.raises(FileNotFoundError, match="no run to resume"):
        run_training(quick_config(tmp_path), resume=True)


def test_mismatched_pair_is_refused(tmp_path, small_testbed):
    import shutil

    from diagnostics.testbed.build import build_tokenizer

    teacher = tmp_path / "teacher"
    shutil.copytree(small_testbed.teacher_path, teacher)
    build_tokenizer(20).save_pretrained(teacher)  # another word list: other ids, other length
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "sort ab ad :", "answer": "ab ad"}\n')
    config = quick_config(tmp_path, f"student={small_testbed.student_path}", f"teacher={teacher}", f"prompts={prompts}",
                          f"eval_prompts={prompts}")
    with pytest.raises(IncompatibleModelsError, match="tokenizers differ"):
        run_training(config)
    assert not (tmp_path / "quick").exists()  # refused before anything was written


def test_nan_loss_stops_with_a_checkpoint(tmp_path, small_testbed, monkeypatch):
    real = losses.get_loss("sampled_pg")
    calls = {"n": 0}

    def poisoned(x):
        calls["n"] += 1
        out = real.fn(x)
        if calls["n"] == 3:  # the third step's loss
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setitem(losses._LOSSES, "sampled_pg", losses.LossSpec("sampled_pg", poisoned, real.description, False))
    config = quick_config(tmp_path, "selectors=[teachability]", "checkpoint_every=0")
    message = (r"teachability-r0.1-s0: step 3: per-token loss non-finite at \d+ of \d+ kept positions"
               r".*student log-probs finite")
    with pytest.raises(NonFiniteError, match=message):
        run_training(config)
    arm_dir = tmp_path / "quick" / "arms" / "teachability-r0.1-s0"
    report = json.loads((arm_dir / "nonfinite.json").read_text())
    assert report["step"] == 3
    saved = pd.read_parquet(arm_dir / "ckpt-000002" / "metrics.parquet")
    assert saved["step"].tolist() == [0, 1, 2] and saved["loss"].iloc[1:].map(math.isfinite).all()
    assert not (arm_dir / "result.json").exists()


def test_every_registered_selector_trains(tmp_path, small_testbed):
    config = quick_config(tmp_path, f"selectors={list_scores()}", "steps=1", "eval_every=1", "ratios=[0.2]",
                          "checkpoint_every=0")
    run_dir = run_training(config)
    comparison, _ = run_comparison(run_dir)
    assert list(comparison["selector"]) == list_scores()
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    step1 = metrics[metrics["step"] == 1].set_index("selector")
    assert step1.loc["full", "kept_tokens"] == step1.loc["full", "valid_tokens"]
    for name in list_scores():
        if not name.startswith("q3_"):  # Q3 selectors may run out of candidates
            assert step1.loc[name, "kept_tokens"] >= min(config.batch_size, step1.loc[name, "valid_tokens"])


def test_unknown_selector_at_runtime_lists_registered():
    with pytest.raises(ConfigError, match="registered: full, random"):
        TrainConfig(selectors=["bogus"])


def test_kept_positions_of_old_policy_match_current(small_testbed):
    """At the step's start the student equals the policy that sampled: the PPO ratio is exactly 1."""
    from diagnostics.generation.backends import SamplingConfig
    from diagnostics.generation.hf import score_rollouts_hf
    from diagnostics.generation.rollouts import generate_rollouts
    from diagnostics.lm.forward import PositionLM, ResponseBatch, kept_index
    from diagnostics.lm.models import load_pair

    pair = load_pair(small_testbed.student_path, small_testbed.teacher_path, device="cpu", dtype="float32")
    rollouts = generate_rollouts(pair.student, pair.tokenizer, ["sort ab ad ag aj :"] * 4,
                                 SamplingConfig(max_new_tokens=5), backend="hf", progress=False)
    scored = score_rollouts_hf(rollouts, pair, k=4, progress=False)
    batch = ResponseBatch.from_ids(list(rollouts["prompt_ids"]), list(rollouts["response_ids"]), 0, scored.valid)
    rows, pos, cols = kept_index(batch, batch.valid)
    with torch.no_grad():
        logits = PositionLM(pair.student, pair.vocab_size)(batch.ids, batch.attention_mask, rows, cols)
        lp = torch.log_softmax(logits, -1)
    now = lp.gather(1, batch.targets[rows, pos][:, None])[:, 0]
    assert torch.allclose(now, scored.signals["student_logprob_sampled"][rows, pos], atol=1e-5)
