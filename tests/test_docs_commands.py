"""Every `make` and `taopd` command written in the README and docs/ parses: the target or subcommand exists, and every
`key=value` names a key of that command's config (nested keys through nested configs; free below a dict field).

Commands are read from fenced `bash` blocks (lines joined at a trailing backslash) and from inline code spans.
Placeholders (`<run>`, `...`) are skipped; a value is not checked, only its key.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import typing
from pathlib import Path

import pytest

from diagnostics.diagnose_config import DiagnoseConfig
from diagnostics.testbed.config import TestbedConfig
from opd.config import TrainConfig
from opd.evaluate import EvaluateConfig
from taopd.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIGS = {"testbed": TestbedConfig, "diagnose": DiagnoseConfig, "train": TrainConfig, "evaluate": EvaluateConfig}
# make target -> the taopd subcommand its ARGS go to
MAKE_SUBCOMMAND = {"diagnose": "diagnose", "diagnose-paper": "diagnose", "train-taopd": "train", "evaluate": "evaluate",
                   "testbed": "testbed", "train-zoo": "train"}
MAKE_VARIABLES = {"STUDENT", "TEACHER", "CONFIG", "ARGS", "RUN", "ENGINE"}


SUBCOMMANDS = set(next(a for a in build_parser()._actions if a.dest == "command").choices)


def make_targets() -> set[str]:
    return {m.group(1) for m in re.finditer(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M)}


def commands(text: str) -> list[str]:
    """`make ...` / `taopd ...` command lines of a markdown text (an inline span may name a command without its
    required arguments: `taopd analyze`)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            line = re.sub(r"^(CUDA_VISIBLE_DEVICES=\S+\s+)", "", line)
            if re.match(r"(make|taopd) ", line):
                found.append(line)
            elif "-m taopd.cli " in line:
                found.append("taopd " + line.split("-m taopd.cli ", 1)[1])
    for span in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
        if re.match(r"(make|taopd) [a-z]", span):
            found.append(span)
    return found


ALL = [(doc.relative_to(ROOT).as_posix(), cmd) for doc in DOCS for cmd in commands(doc.read_text())]


def key_exists(config: type, key: str) -> bool:
    """Does `a.b.c` name a field of the config dataclass (a dict field takes any keys below it)?"""
    head, _, rest = key.partition(".")
    fields = {f.name: f for f in dataclasses.fields(config)}
    if head not in fields:
        return False
    if not rest:
        return True
    hint = typing.get_type_hints(config)[head]
    if dataclasses.is_dataclass(hint):
        return key_exists(hint, rest)
    return typing.get_origin(hint) is dict or hint is dict


def check_overrides(subcommand: str, tokens: list[str], where: str) -> None:
    for token in tokens:
        if "=" in token and not token.startswith("-"):
            key = token.split("=", 1)[0]
            assert key_exists(CONFIGS[subcommand], key), f"{where}: {key!r} is not a key of `taopd {subcommand}`"


def placeholder(token: str) -> bool:
    return "<" in token or token == "..." or "$" in token


def test_the_docs_hold_commands():
    assert len(ALL) >= 20, ALL
    assert any(cmd.startswith("taopd train") for _, cmd in ALL)


@pytest.mark.parametrize("doc, command", ALL)
def test_command_parses(doc, command):
    tokens = [t for t in shlex.split(command) if not placeholder(t)]
    where = f"{doc}: {command}"
    if tokens[0] == "make":
        target, *rest = tokens[1:]
        assert target in make_targets(), f"{where}: no make target {target!r}"
        for token in rest:
            name, _, value = token.partition("=")
            assert name in MAKE_VARIABLES, f"{where}: {name!r} is not a variable the Makefile reads"
            if name == "ARGS" and target in MAKE_SUBCOMMAND:
                check_overrides(MAKE_SUBCOMMAND[target], [t for t in shlex.split(value) if not placeholder(t)], where)
        return
    argv = tokens[1:]
    subcommand = argv[0]
    if len(argv) == 1:  # a command named in prose, e.g. `taopd analyze`
        assert subcommand in SUBCOMMANDS, f"{where}: no subcommand {subcommand!r}"
        return
    try:
        build_parser().parse_known_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: taopd does not parse it")
    if subcommand in CONFIGS:
        check_overrides(subcommand, argv[1:], where)


def test_a_wrong_key_is_caught():
    with pytest.raises(AssertionError, match="not a key"):
        check_overrides("train", ["selectors=[x]", "no_such_key=1"], "here")
    assert key_exists(TrainConfig, "trl_args.use_vllm") and key_exists(TestbedConfig, "teacher.train_steps")
    assert not key_exists(TestbedConfig, "teacher.no_such_key")
