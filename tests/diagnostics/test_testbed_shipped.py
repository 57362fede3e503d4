"""The shipped testbeds (issue 24): found by their config's hash and verified, used without building, and the
builder kept honest: the small pair trained from scratch here matches the shipped one."""

from __future__ import annotations

import time
from pathlib import Path

from diagnostics.core.config import load_config
from diagnostics.lm.models import check_pair
from diagnostics.testbed.build import build_testbed
from diagnostics.testbed.config import TestbedConfig
from diagnostics.testbed.manifest import SHIPPED_DIR, cpu_identity, find_shipped, read_manifest
from diagnostics.testbed.rebuild import compare_weights
from taopd.cli import main

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = {"default": "configs/testbed.yaml", "small": "configs/testbed_small.yaml",
           "sort": "configs/testbed_sort.yaml"}


def test_each_shipped_testbed_verifies_and_matches_its_config():
    """A config edited after shipping would silently fall back to a local build: its hash must still match."""
    entries = read_manifest(SHIPPED_DIR)
    assert sorted(entries) == sorted(SHIPPED)
    for name, config_file in SHIPPED.items():
        config = load_config(TestbedConfig, ROOT / config_file)
        assert entries[name]["config_file"] == config_file
        assert entries[name]["cache_key"] == config.cache_key(), f"{config_file} changed since '{name}' was shipped"
        assert find_shipped(config, SHIPPED_DIR) == (name, SHIPPED_DIR / name)


def test_the_default_config_loads_the_shipped_pair_without_building(tmp_path):
    config = load_config(TestbedConfig, ROOT / "configs/testbed.yaml", [f"cache_dir={tmp_path}"])
    t0 = time.perf_counter()
    testbed = build_testbed(config)
    assert time.perf_counter() - t0 < 10
    assert (testbed.source, testbed.root) == ("shipped", SHIPPED_DIR / "default")
    assert list(tmp_path.iterdir()) == []  # nothing built, nothing cached
    check_pair(testbed.student_path, testbed.teacher_path)


def test_small_pair_rebuilt_from_scratch_matches_the_shipped_one(tmp_path, capsys):
    """`taopd testbed --rebuild` on the small pair: bit identical on the shipped build's CPU type, else the same
    checkpoints, tensor names and shapes (the small pair promises no accuracies)."""
    rc = main(["testbed", "--config", str(ROOT / "configs/testbed_small.yaml"), "--rebuild", f"cache_dir={tmp_path}"])
    output = capsys.readouterr().out
    assert rc == 0, output
    config = load_config(TestbedConfig, ROOT / "configs/testbed_small.yaml", [f"cache_dir={tmp_path}"])
    rebuilt = tmp_path / config.cache_key()
    assert (rebuilt / "report.json").is_file()
    assert "shipped 'small'" in output and "max |weight difference|" in output
    max_diff, structure = compare_weights(SHIPPED_DIR / "small", rebuilt)
    assert structure == [] and sorted(max_diff) == ["student", "teacher"]
    if read_manifest(SHIPPED_DIR)["small"]["built_on"] == cpu_identity():
        assert max_diff == {"student": 0.0, "teacher": 0.0}, "a rebuild on the shipped build's CPU type differs"
        assert "bit-identical" in output


def test_compare_weights_gives_the_largest_difference_and_names_structure(tmp_path):
    """Against a plain reference: one weight moved by 0.5 is a max difference of 0.5 there, 0 elsewhere; a renamed
    tensor and a missing checkpoint are structural differences."""
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(SHIPPED_DIR / "small", copy)
    path = copy / "student" / "model.safetensors"
    weights = load_file(path)
    name = sorted(weights)[0]
    moved = weights[name].clone()
    moved.view(-1)[3] += 0.5
    reference = (moved.double() - weights[name].double()).abs().max().item()
    save_file({**weights, name: moved}, path)
    max_diff, structure = compare_weights(SHIPPED_DIR / "small", copy)
    assert max_diff == {"student": reference, "teacher": 0.0} and structure == []
    save_file({("renamed" if k == name else k): v for k, v in weights.items()}, path)
    shutil.rmtree(copy / "teacher")
    _, structure = compare_weights(SHIPPED_DIR / "small", copy)
    assert structure == ["checkpoint teacher only in one", f"student: tensor {name} only in one",
                         "student: tensor renamed only in one"]
