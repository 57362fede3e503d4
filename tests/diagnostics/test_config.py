"""Config loading: YAML + overrides, errors that name the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from diagnostics.core.config import ConfigError, check_device, load_config, parse_override
from diagnostics.testbed.config import TestbedConfig

ROOT = Path(__file__).resolve().parents[2]


def test_yaml_mirrors_dataclass_defaults():
    config = load_config(TestbedConfig, ROOT / "configs/testbed.yaml")
    assert config == TestbedConfig()


def test_overrides_apply_nested_and_typed():
    overrides = ["teacher.train_steps=7", "k=16", "student.lr=1e-2"]
    config = load_config(TestbedConfig, ROOT / "configs/testbed.yaml", overrides)
    assert config.teacher.train_steps == 7 and config.k == 16 and config.student.lr == 0.01


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "seed: 1\nbogus: 3\n")
    with pytest.raises(ConfigError, match=r"bogus.*unknown key.*cfg\.yaml"):
        load_config(TestbedConfig, path)


def test_unknown_nested_key(tmp_path):
    path = write(tmp_path, "teacher: {layers: 3}\n")
    with pytest.raises(ConfigError, match=r"teacher\.layers: unknown key"):
        load_config(TestbedConfig, path)


def test_wrong_type_names_key_and_file(tmp_path):
    path = write(tmp_path, "k: eight\n")
    with pytest.raises(ConfigError, match=r"k: expected an integer.*'eight'.*cfg\.yaml"):
        load_config(TestbedConfig, path)


def test_bool_is_not_an_int(tmp_path):
    with pytest.raises(ConfigError, match=r"seed: expected an integer"):
        load_config(TestbedConfig, write(tmp_path, "seed: true\n"))


def test_out_of_range_names_key_and_file(tmp_path):
    path = write(tmp_path, "student: {lr: -1.0}\n")
    with pytest.raises(ConfigError, match=r"student\.lr: must be > 0.*cfg\.yaml"):
        load_config(TestbedConfig, path)


def test_override_out_of_range_says_overrides():
    with pytest.raises(ConfigError, match=r"k: must be >= 1.*overrides"):
        load_config(TestbedConfig, ROOT / "configs/testbed.yaml", ["k=0"])


def test_testbed_task_and_capacity_steps_checked_before_any_build():
    with pytest.raises(ConfigError, match=r"task: must be one of \['sort', 'trace'\], got 'merge'.*overrides"):
        load_config(TestbedConfig, ROOT / "configs/testbed.yaml", ["task=merge"])
    with pytest.raises(ConfigError, match=r"capacity_steps: must be 0 or > student\.train_steps \(850\), got 850"):
        load_config(TestbedConfig, ROOT / "configs/testbed.yaml", ["capacity_steps=850"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(TestbedConfig, None, ["k"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TestbedConfig, tmp_path / "nope.yaml")


@pytest.mark.parametrize("text", [".inf", "-.inf", ".nan", "1e999"])
def test_non_finite_numbers_are_refused_naming_the_key(text):
    with pytest.raises(ConfigError, match=r"student\.lr: must be a finite number.*overrides"):
        load_config(TestbedConfig, ROOT / "configs/testbed.yaml", [f"student.lr={text}"])


@pytest.mark.parametrize("text, message", [
    ("extra_k=[1,", r"override 'extra_k=\[1,': extra_k: cannot parse '\[1,' at column 4"),
    ("a={b", r"override 'a=\{b': a: cannot parse"),
    ("=3", "empty key"),
    ("a..b=3", "empty key"),
])
def test_malformed_override_values_name_the_override(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_override(text)


def test_invalid_yaml_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"cfg\.yaml: invalid YAML") as info:
        load_config(TestbedConfig, write(tmp_path, "seed: [1,\n"))
    assert "\n" not in str(info.value)


def test_device_checks():
    check_device("auto")
    check_device("cpu")
    for bad, message in (("tpu", "must be one of"), ("cpu:0", "cpu takes no index"), ("cuda:x", "must be one of")):
        with pytest.raises(ConfigError, match=f"^device: {message}"):
            check_device(bad)
    with pytest.raises(ConfigError, match="^device: must be one of auto, cpu, cuda, got 'cuda:0'"):
        check_device("cuda:0", allowed=("auto", "cpu", "cuda"), indexed=False)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'cuda' requested but this machine has no CUDA GPU"):
            check_device("cuda")
