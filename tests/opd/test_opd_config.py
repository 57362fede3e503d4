"""TrainConfig: range checks naming the key and file, YAML files mirroring the dataclass, arms."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from diagnostics.core.config import ConfigError, load_config
from diagnostics.signals import list_scores
from opd.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["train.yaml", "train_quick.yaml", "train_zoo.yaml"])
def test_yaml_mirrors_dataclass(name):
    data = yaml.safe_load((ROOT / "configs" / name).read_text())
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert list(data) == fields
    load_config(TrainConfig, ROOT / "configs" / name)


def test_default_yaml_equals_dataclass_defaults():
    assert load_config(TrainConfig, ROOT / "configs/train.yaml") == TrainConfig()


@pytest.mark.parametrize("override, key", [
    ("ratios=[0.0]", "ratios"), ("ratios=[1.5]", "ratios"), ("ratios=[-0.1]", "ratios"),
    ("steps=0", "steps"), ("lr=0", "lr"), ("clip_low=1.0", "clip_low"), ("normalization=mean", "normalization"),
    ("betas=[0.9]", "betas"), ("seeds=[]", "seeds"), ("eval_every=0", "eval_every"),
])
def test_bad_values_name_key_and_file(override, key):
    with pytest.raises(ConfigError, match=rf"{key}.*configs/train.yaml"):
        load_config(TrainConfig, ROOT / "configs/train.yaml", [override])


def test_unknown_selector_lists_registered():
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, ROOT / "configs/train.yaml", ["selectors=[full, nonsense]"])
    assert "selectors" in str(err.value) and "'nonsense'" in str(err.value)
    assert all(name in str(err.value) for name in list_scores())


def test_unknown_loss_and_key():
    with pytest.raises(ConfigError, match="loss: unknown loss 'kl'; registered: sampled_pg, reverse_kl, forward_kl"):
        TrainConfig(loss="kl")
    with pytest.raises(ConfigError, match="learning_rate: unknown key"):
        load_config(TrainConfig, ROOT / "configs/train.yaml", ["learning_rate=0.1"])


def test_every_registered_selector_is_accepted():
    config = TrainConfig(selectors=list_scores(), ratios=[0.05, 0.3], seeds=[0, 1])
    arms = config.arms()
    n_weight = len(list_scores("weight"))  # a weight rule trains every token: ratio 1.0 only, like full
    assert len(arms) == 2 * (1 + n_weight) + (len(list_scores()) - 1 - n_weight) * 2 * 2
    assert {a.ratio for a in arms if a.selector in ("full", *list_scores("weight"))} == {1.0}


def test_default_arms_and_run_id():
    arms = TrainConfig().arms()
    assert len(arms) == 6 * 3
    assert [a.name for a in arms[:4]] == ["full-r1-s0", "full-r1-s1", "full-r1-s2", "teachability-r0.05-s0"]
    assert TrainConfig().run_id() == TrainConfig(progress=False).run_id()
    assert TrainConfig().run_id() != TrainConfig(lr=1e-3).run_id()


@pytest.mark.parametrize("name, kind", [("accelerate_ddp.yaml", "MULTI_GPU"), ("accelerate_fsdp.yaml", "FSDP")])
def test_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs" / name))
    assert config.distributed_type.name == kind


def test_paper_preset_sets_the_release_values_and_no_default_moves():
    """opd/config.py: the released training code's choices (tip_compat.py selection, per-sequence loss
    normalisation, Megatron Adam); without a preset every key keeps today's default."""
    config = load_config(TrainConfig, ROOT / "configs/train.yaml", ["preset=paper"])
    assert (config.signals, config.signal_normalization, config.tie_break, config.top_up, config.q3_fill) == (
        "release_topk", "all_response_rows", "earliest_position", "teachability_entropy_ndc", False)
    assert (config.min_per_sequence, config.normalization, config.optimizer) == (1, "per_sequence_mean", "paper")
    assert (config.betas, config.weight_decay, config.max_grad_norm, config.lr) == ([0.9, 0.98], 0.1, 1.0, 1e-4)
    options = config.selection_options()
    assert options.to_dict() == {"signals": "release_topk", "normalization": "all_response_rows",
                                 "tie_break": "earliest_position", "q3_fill": False,
                                 "top_up": "teachability_entropy_ndc", "budget": "release"}
    default = TrainConfig()
    assert (default.signals, default.signal_normalization, default.tie_break, default.top_up) == (
        "exact", "valid_rows", "row_major", "")
    assert (default.min_per_sequence, default.normalization, default.optimizer, default.max_grad_norm) == (
        0, "kept_global", "adamw", 0.0)
    # the resolved values are what config.json records; loading them back is the same config
    assert TrainConfig(**{**config.fingerprint(), "progress": True}) == config


@pytest.mark.parametrize("override, key", [
    ("min_per_sequence=2", "min_per_sequence"), ("optimizer=adam", "optimizer"),
    ("normalization=kept_global", "normalization"), ("min_per_sequence=0", "min_per_sequence"),
    ("betas=[0.9, 0.95]", "betas"),
])
def test_paper_preset_refuses_a_conflicting_key(override, key):
    """A key written on the command line, even at its default, is the user's: never silently the preset's."""
    with pytest.raises(ConfigError, match=rf"{key}: set to .* on the command line, but (preset: paper|optimizer: "
                                          rf"paper) sets it to"):
        load_config(TrainConfig, ROOT / "configs/train.yaml", ["preset=paper", override])


def test_a_yaml_key_beside_the_preset_is_the_users(tmp_path):
    """In a file that sets the preset, every key is written by the user; a file mirroring the defaults is not."""
    (tmp_path / "own.yaml").write_text("preset: paper\nmin_per_sequence: 0\n")
    with pytest.raises(ConfigError, match=rf"min_per_sequence: set to 0 in {tmp_path}/own.yaml, but preset: paper"):
        load_config(TrainConfig, tmp_path / "own.yaml")
    config = load_config(TrainConfig, ROOT / "configs/train.yaml", ["preset=paper"])  # min_per_sequence: 0 there
    assert config.min_per_sequence == 1 and "min_per_sequence" in config.preset_keys()


def test_a_yaml_key_set_twice_is_refused(tmp_path):
    (tmp_path / "twice.yaml").write_text("lr: 1.0e-4\nsteps: 3\nlr: 2.0e-4\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: lr: set twice \(lines 1 and 3\)"):
        load_config(TrainConfig, tmp_path / "twice.yaml")


@pytest.mark.parametrize("override, key", [
    ("signals=topk", "signals"), ("signal_normalization=rows", "signal_normalization"),
    ("tie_break=random", "tie_break"), ("top_up=nope", "top_up"), ("top_up=q3_only", "top_up"),
    ("preset=release", "preset"), ("optimizer=sgd", "optimizer"),
])
def test_bad_selection_options_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"{key}"):
        load_config(TrainConfig, ROOT / "configs/train.yaml", [override])


def test_new_keys_at_default_leave_the_run_hash_alone():
    fingerprint = TrainConfig().fingerprint()
    assert not {"preset", "signals", "signal_normalization", "tie_break", "top_up", "q3_fill"} & set(fingerprint)
    assert TrainConfig(signals="release_topk").run_id() != TrainConfig().run_id()
    assert TrainConfig(signals="release_topk").fingerprint()["signals"] == "release_topk"


def test_train_zoo_arms_and_selector_ratios():
    """configs/train_zoo.yaml: every rule at 5%, entropy also at 20% (80/20), full and the weight rule at 1.0."""
    config = load_config(TrainConfig, ROOT / "configs/train_zoo.yaml")
    pairs = {(a.selector, a.ratio) for a in config.arms()}
    assert {("full", 1.0), ("iw_opd", 1.0), ("entropy", 0.05), ("entropy", 0.2), ("prefix", 0.05)} <= pairs
    assert len(config.arms()) == 13 * 3
    assert TrainConfig(selectors=["kl"], selector_ratios={"kl": [0.1, 0.2]}).arms()[0].ratio == 0.1
    for bad, match in (({"iw_opd": [0.05]}, "weight rule"), ({"full": [0.5]}, "keeps every token"),
                       ({"kl": [0.0]}, "in \\(0, 1\\]"), ({"nope": [0.1]}, "unknown selector"),
                       ({"tip": [0.1]}, "not in selectors")):
        with pytest.raises(ConfigError, match=match):
            TrainConfig(selectors=["kl", "iw_opd", "full"], selector_ratios=bad)
    with pytest.raises(ConfigError, match="top_up: 'iw_opd' is a weight rule"):
        TrainConfig(top_up="iw_opd")
