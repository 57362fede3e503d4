"""Every bad input of issues 13 and 23, tried as a hostile new user would: each must end in exit status 2
and one line `error: ...` naming the argument, file or position, with no traceback, and leave the existing
results byte for byte as they were. Rows marked `success=True` are inputs whose correct outcome is success
(exit 0, no error line, results unchanged); Ctrl-C ends in one line and exit status 130.

    .venv/bin/python benchmarks/probe_bad_inputs.py            # every probe, one line each
    .venv/bin/python benchmarks/probe_bad_inputs.py --keep DIR # keep the workspace for a look

Each probe runs `.venv/bin/taopd ...` as a subprocess in a scratch workspace that holds a finished
diagnostic run (the small testbed, 4 sequences), prompt files, an empty and a truncated model
directory, a run with a corrupt config.json and a training run to lock, and (issue 23) copies of the finished
run with a truncated shard, a swapped shard, a corrupt or missing manifest, a BERT model, a model whose
config disagrees with its weights and one with NaN weights. The same table drives
tests/test_bad_inputs.py (there most probes call `taopd.cli.main` in-process, for speed).

Two probes need the operating system's help and are skipped where it is not there: "disk full" mounts
a 64 KiB tmpfs (root only) and "unwritable results" runs as user nobody (setpriv, as root) or chmods.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TAOPD_CACHE_DIR", str(ROOT / ".cache"))  # the checkout's testbed cache, in every subprocess
PYTHON = ROOT / ".venv" / "bin" / "python"
# `taopd` from this tree (the installed script imports wherever the package was installed from)
TAOPD_CMD = (str(PYTHON), "-m", "taopd.cli")
SMALL = "testbed_config=configs/testbed_small.yaml"


@dataclasses.dataclass(frozen=True)
class Probe:
    """One bad input: `argv` of `taopd` ({placeholders} from the workspace), the text its error line
    must contain (`expect`: the argument, file or position it names), and the issue item it covers."""

    item: str
    name: str
    argv: tuple[str, ...]
    expect: str
    env: tuple[tuple[str, str], ...] = ()  # extra environment (subprocess only)
    subprocess_only: bool = False  # needs a fresh process (environment read at import)
    lock: str = ""  # a run directory another process holds locked while the probe runs
    skip_if_cuda: bool = False  # the probe asks for a GPU that is absent
    success: bool = False  # the correct outcome is success: exit 0, no error line, results unchanged


def merged(base: tuple[str, ...], extra: tuple[str, ...]) -> tuple[str, ...]:
    """`base` overrides less those whose key `extra` sets again (a key twice on the command line is an error)."""
    keys = {e.split("=", 1)[0] for e in extra if "=" in e and not e.startswith("-")}
    return (*[b for b in base if b.split("=", 1)[0] not in keys or b.startswith("-")], *extra)


def diagnose(*extra: str) -> tuple[str, ...]:
    return merged(("diagnose", SMALL, "out_dir={ws}/results/diagnose", "n_sequences=4", "group_selectors=[]",
                   "n_boot=10", "shard_sequences=2"), extra)


def diagnose_real(*extra: str) -> tuple[str, ...]:
    """The diagnostic on a pair given as paths (the small testbed's), with a JSONL prompt file."""
    return diagnose(*merged(("student={student}", "teacher={teacher}", "prompts={ws}/prompts.jsonl",
                              "max_new_tokens=8"), extra))


def train(*extra: str) -> tuple[str, ...]:
    return merged(("train", "--config", "configs/train_quick.yaml", SMALL, "out_dir={ws}/results/train"), extra)


def evaluate(*extra: str) -> tuple[str, ...]:
    """`taopd evaluate` of the workspace's student on its prompt file (the config checks run first)."""
    return merged(("evaluate", "students=[{student}]", "prompts={ws}/prompts.jsonl", "max_new_tokens=8",
                   "out_dir={ws}/results/evaluate/probe"), extra)


# a training run cut short: one arm, three steps, tiny evaluation
TRAIN_SHORT = ("selectors=[full]", "steps=3", "eval_every=3", "eval_problems=4", "bank_sequences=2")

PROBES: list[Probe] = [
    # 1. data damaged
    Probe("1 data damaged", "analyze --n-boot -5", ("analyze", "{good}", "--n-boot", "-5"), "--n-boot: must be >= 0"),
    Probe("1 data damaged", "analyze --out onto a file", ("analyze", "{good}", "--out", "{good}/summary.json"),
          "--out: {good}/summary.json is a file"),
    Probe("1 data damaged", "analyze a missing run", ("analyze", "{ws}/results/diagnose/nothere"),
          "run directory {ws}/results/diagnose/nothere does not exist"),
    # 2. numerical blow-ups in training
    Probe("2 non-finite", "train lr=1e6", train("run_name=lr1e6", "lr=1e6", *TRAIN_SHORT),
          "full-r1-s0: step 3: student logits non-finite"),
    Probe("2 non-finite", "train lr=1e30", train("run_name=lr1e30", "lr=1e30", *TRAIN_SHORT),
          "full-r1-s0: step 2: student logits non-finite"),
    # 3. silent wrong runs
    Probe("3 silent wrong run", "diagnose k=1000 (70-token vocabulary)", diagnose("k=1000"), "k: K=1000 is not below"),
    Probe("3 silent wrong run", "diagnose extra_k=[4, 500]", diagnose("extra_k=[4, 500]"), "extra_k: K=500"),
    Probe("3 silent wrong run", "train device=tpu", train("device=tpu"), "device: must be one of auto, cpu, cuda"),
    Probe("3 silent wrong run", "train device=cuda without a GPU", train("device=cuda"), "device: 'cuda' requested",
          skip_if_cuda=True),
    Probe("3 silent wrong run", "train device=cuda:1", train("device=cuda:1"), "device: must be one of"),
    Probe("3 silent wrong run", "train 2-line eval_prompts, eval_problems=500",
          train("student={student}", "teacher={teacher}", "prompts={ws}/prompts.jsonl", "eval_prompts={ws}/two.jsonl",
                "eval_problems=500", "run_name=short_eval"), "eval_prompts: {ws}/two.jsonl has 2 prompts"),
    Probe("3 silent wrong run", "diagnose lr=1e6", diagnose("lr=1e6"), "lr: must be in (0, 1]"),
    Probe("3 silent wrong run", "diagnose lr=.inf", diagnose("lr=.inf"), "lr: must be a finite number"),
    Probe("3 silent wrong run", "diagnose lr=1e18", diagnose("lr=1e18"), "lr: must be in (0, 1]"),
    Probe("3 silent wrong run", "prompt characters outside the vocabulary",
          diagnose_real("prompts={ws}/oov.jsonl", "run_name=oov"), "{ws}/oov.jsonl: prompt 1: character 'Z' (U+005A)"),
    Probe("3 silent wrong run", "training prompts with characters outside the vocabulary",
          train("student={student}", "teacher={teacher}", "prompts={ws}/oov.jsonl", "eval_prompts={ws}/prompts.jsonl",
                "eval_problems=2", "bank_sequences=2", "run_name=oov"), "(seed 0's stream): prompt"),
    # 4. tracebacks for ordinary mistakes
    Probe("4 traceback", "truncated model.safetensors",
          diagnose_real("student={ws}/truncated", "run_name=trunc"),
          "student: {ws}/truncated/model.safetensors is damaged"),
    Probe("4 traceback", "malformed override extra_k=[1,", diagnose("extra_k=[1,"), "override 'extra_k=[1,'"),
    Probe("4 traceback", "diagnose device=cuda without a GPU", diagnose("device=cuda"), "device: 'cuda' requested",
          skip_if_cuda=True),
    Probe("4 traceback", 'JSONL {"prompt": 123}', diagnose_real("prompts={ws}/bad_prompt.jsonl", "run_name=badp"),
          "{ws}/bad_prompt.jsonl: row 2 (line 2): the prompt must be text"),
    Probe("4 traceback", "JSONL with a broken line", diagnose_real("prompts={ws}/broken.jsonl", "run_name=brokenp"),
          "{ws}/broken.jsonl: line 2: invalid JSON"),
    Probe("4 traceback", "hub id while offline",
          diagnose("student=nosuchorg/nosuchmodel", "teacher=nosuchorg/nosuchmodel", "prompts={ws}/prompts.jsonl"),
          "student: nosuchorg/nosuchmodel is not a local directory", env=(("HF_HUB_OFFLINE", "1"),),
          subprocess_only=True),
    Probe("4 traceback", "analyze given tokens.parquet", ("analyze", "{good}/tokens.parquet"),
          "{good}/tokens.parquet is a file; give its run directory"),
    Probe("4 traceback", "override after a flag (a=1 --resume b=2)",
          ("train", "--config", "configs/train_quick.yaml", SMALL, "--resume", "out_dir={ws}/results/train",
           "bogus_key=2"), "bogus_key: unknown key"),
    Probe("4 traceback", "unknown flag after overrides", ("train", SMALL, "--bogus"),
          "unrecognized arguments: --bogus"),
    # 5. messages that hide the problem
    Probe("5 message", "two train --resume of one run at once", train("run_name=locked", "--resume"),
          "{ws}/results/train/locked is in use by another taopd process", lock="{ws}/results/train/locked"),
    Probe("5 message", "diagnose while the same run is running", diagnose("run_name=good"),
          "{good} is in use by another taopd process", lock="{good}"),
    Probe("5 message", "corrupt run config.json", diagnose("run_name=corrupt"),
          "{ws}/results/diagnose/corrupt/config.json: the run's saved config is not valid JSON"),
    Probe("5 message", "checkpoint=/nonexistent", diagnose("mode=checkpoint", "checkpoint=/nonexistent"),
          "checkpoint: model directory /nonexistent does not exist"),
    Probe("5 message", "rich markup in the n_words error",
          ("testbed", "--config", "configs/testbed_small.yaml", "n_words=1000"), "n_words: must be in [n_items, 226]"),
    Probe("5 message", "empty model directory", diagnose_real("student={ws}/empty_model", "run_name=empty"),
          "student: {ws}/empty_model holds no model (no config.json; it is empty)"),
    # ---------------------------------------------------------------- issue 23: honoured or refused, never less
    # 1. a stored result replaced by less
    Probe("23.1 replaced by less", "analyze --seed -1", ("analyze", "{good}", "--seed", "-1"),
          "--seed: must be in [0, 2**63), got -1"),
    Probe("23.1 replaced by less", "analyze --n-boot too large to allocate",
          ("analyze", "{good}", "--n-boot", "1000000000000000"), "--n-boot: 1000000000000000 resamples x 4 clusters"),
    # 2. duplicates
    Probe("23.2 duplicates", "train ratios=[0.1, 0.1]", train("ratios=[0.1, 0.1]"), "ratios: 0.1 is given twice"),
    Probe("23.2 duplicates", "diagnose group_selectors=[kl, kl]", diagnose("group_selectors=[kl, kl]"),
          "group_selectors: 'kl' is given twice"),
    Probe("23.2 duplicates", "diagnose group_ratios=[0.05, 0.05]", diagnose("group_selectors=[kl]",
                                                                            "group_ratios=[0.05, 0.05]"),
          "group_ratios: 0.05 is given twice"),
    Probe("23.2 duplicates", "evaluate the same student twice", evaluate("students=[{student}, {student}]"),
          "students: '{student}' is given twice"),
    # 3. an explicit key against a preset
    Probe("23.3 explicit vs preset", "train preset=paper min_per_sequence=0",
          train("preset=paper", "min_per_sequence=0"),
          "min_per_sequence: set to 0 on the command line, but preset: paper sets it to 1"),
    Probe("23.3 explicit vs preset", "YAML setting lr twice",
          ("train", "--config", "{ws}/twice.yaml", SMALL, "out_dir={ws}/results/train"),
          "config file {ws}/twice.yaml: lr: set twice (lines 1 and 3)"),
    # 4. keys that do not apply
    Probe("23.4 does not apply", "prompts= on the testbed", diagnose("prompts={ws}/prompts.jsonl"),
          "prompts: does not apply here: the testbed's held-out problems are its own"),
    Probe("23.4 does not apply", "checkpoint= with mode=single-step", diagnose("checkpoint={student}"),
          "checkpoint: does not apply here: mode=checkpoint re-scores it; mode=single-step never does"),
    Probe("23.4 does not apply", "temperature with greedy evaluation", evaluate("temperature=0.5"),
          "temperature: does not apply here: greedy=true decodes the most likely token"),
    # 5. paths
    Probe("23.5 paths", "run_name=..", diagnose("run_name=.."), "run_name: must be one directory name"),
    Probe("23.5 paths", "out_dir a symlink loop", diagnose("out_dir={ws}/loop"),
          "out_dir: {ws}/loop is a symlink loop"),
    Probe("23.5 paths", "a directory given as the prompt file", diagnose_real("prompts={ws}/adir.jsonl"),
          "prompt file: {ws}/adir.jsonl is a directory; a file is expected here"),
    Probe("23.5 paths", "a directory given as --config", ("diagnose", "--config", "{ws}/adir.jsonl"),
          "config file: {ws}/adir.jsonl is a directory; a file is expected here"),
    Probe("23.5 paths", "out_dir a file", diagnose("out_dir={ws}/prompts.jsonl"),
          "out_dir: {ws}/prompts.jsonl is a file, not a directory"),
    # 6. models
    Probe("23.6 models", "a bidirectional (BERT) teacher", diagnose_real("teacher={ws}/bert"),
          "teacher: {ws}/bert is a bidirectional bert encoder"),
    Probe("23.6 models", "config vocab_size disagreeing with the weights", diagnose_real("student={ws}/vocab_off"),
          "student: {ws}/vocab_off/config.json says vocab_size="),
    # 7. numbers
    Probe("23.7 numbers", "temperature=1e-300", diagnose("temperature=1e-300"), "temperature: must be >= 0.001"),
    Probe("23.7 numbers", "NaN logits in generation", diagnose_real("student={ws}/nan_model", "backend=hf",
                                                                    "run_name=nan_gen"),
          "rollouts: generation logits non-finite at generated token 1"),
    # 8. data
    Probe("23.8 data", "non-UTF-8 prompt file", diagnose_real("prompts={ws}/latin1.jsonl"),
          "{ws}/latin1.jsonl: line 2: not UTF-8 text (byte 0xe9"),
    Probe("23.8 data", "JSONL answer NaN", diagnose_real("prompts={ws}/nan_answer.jsonl"),
          "{ws}/nan_answer.jsonl: row 2 (line 2): the answer is nan"),
    Probe("23.8 data", "n_problems larger than the file", evaluate("prompts={ws}/two.jsonl", "n_problems=5"),
          "{ws}/two.jsonl: holds 2 prompts, fewer than the 5 asked for"),
    # 9. messages
    Probe("23.9 messages", "truncated shard on resume", diagnose("run_name=trunc_shard"),
          "shard {ws}/results/diagnose/trunc_shard/shards/shard_0001.pt is damaged"),
    Probe("23.9 messages", "corrupt manifest.json", ("analyze", "{ws}/results/diagnose/bad_manifest"),
          "{ws}/results/diagnose/bad_manifest/manifest.json: the run's manifest is not valid JSON"),
    Probe("23.9 messages", "too-long prompt", diagnose_real("prompts={ws}/long.jsonl"),
          "{ws}/long.jsonl: prompt 1: "),
    Probe("23.9 messages", "evaluate run=<a diagnose run>", ("evaluate", "run={good}"),
          "run={good}: is a `taopd diagnose` run"),
    # 12. left open from issue 13
    Probe("23.12 left open", "train engine=trl lr=1e30 (TRL's nonfinite.json)",
          train("run_name=trl_lr1e30", "engine=trl", "lr=1e30", *TRAIN_SHORT),
          "full-r1-s0: step 2: student logits non-finite"),
    # 11. shard integrity
    Probe("23.11 shards", "a copy of shard 0 as shard 1", diagnose("run_name=swapped_shard"),
          "shard {ws}/results/diagnose/swapped_shard/shards/shard_0001.pt holds bank sequences [0, 1], not [2, 3]"),
    # ---------------------------------------------------------------- issue 23: 20 probes of classes not listed
    Probe("23.new unfinished run", "analyze a run stopped before its manifest", ("analyze", "{ws}/results/diagnose/"
                                                                                 "no_manifest"),
          "holds no manifest.json (the run stopped before it finished)"),
    Probe("23.new late failure", "diagnose mode=first-order method=loop",
          diagnose("mode=first-order", "method=loop"), "method: mode=first-order needs the per-position gradients"),
    Probe("23.new late failure", "diagnose n_boot too large (after the run)", diagnose("n_boot=1000000000000000"),
          "n_boot: 1000000000000000 resamples x 4 clusters"),
    Probe("23.new late failure", "diagnose seed=-1", diagnose("seed=-1"), "seed: each seed must be in [0, 2**31)"),
    Probe("23.new wrong config kind", "testbed_config= a train config", diagnose("testbed_config=configs/train.yaml"),
          "testbed_config: "),
    Probe("23.new output onto results", "analyze --json onto a run's tokens.parquet",
          ("analyze", "{good}", "--n-boot", "0", "--json", "{good}/tokens.parquet"),
          "--json: {good}/tokens.parquet exists and is not a summary written by analyze"),
    Probe("23.new output onto results", "analyze --out into another run", ("analyze", "{good}", "--n-boot", "0",
                                                                          "--out", "{ws}/results/diagnose/corrupt"),
          "--out: {ws}/results/diagnose/corrupt is another run's directory"),
    Probe("23.new output onto results", "evaluate out_dir=<a diagnose run>", evaluate("out_dir={good}"),
          "out_dir: {good} is another run's directory"),
    Probe("23.new empty value", "out_dir= (empty)", diagnose("out_dir="), "out_dir: must name a directory"),
    Probe("23.new empty value", "group_ratios=[] with group selectors",
          diagnose("group_selectors=[kl]", "group_ratios=[]"), "group_ratios: is empty while group_selectors is set"),
    Probe("23.new control characters", "run_name with a tab", diagnose('run_name="a\\tb"'),
          "run_name: must be one directory name"),
    Probe("23.new foreign checkpoint", "mode=checkpoint checkpoint=<the teacher>",
          diagnose("mode=checkpoint", "checkpoint={teacher}"),
          "checkpoint: {teacher} is not a trained copy of the student (intermediate_size"),
    # seed=1: a testbed that is not shipped, so the cache is where it would be built (a shipped one needs no cache)
    Probe("23.new environment", "TAOPD_CACHE_DIR a file", ("testbed", "--config", "configs/testbed_small.yaml",
                                                           "seed=1"),
          "TAOPD_CACHE_DIR: {ws}/prompts.jsonl is a file, not a directory",
          env=(("TAOPD_CACHE_DIR", "{ws}/prompts.jsonl"),), subprocess_only=True),
    Probe("23.new command line", "one key twice on the command line", diagnose("lr=1e-4", "lr=1e-3"),
          "lr: given twice on the command line ('lr=1e-4' and 'lr=1e-3')"),
    Probe("23.new figures", "figures --results a file", ("figures", "--results", "{ws}/prompts.jsonl", "--out",
                                                        "{ws}/figs"),
          "--results: {ws}/prompts.jsonl is a file, not a directory"),
    Probe("23.new context length", "max_new_tokens past the testbed's positions", diagnose("max_new_tokens=100000"),
          "max_new_tokens: 100000 leaves no room for a prompt"),
    Probe("23.new file format", "bank= a JSONL file", diagnose("bank={ws}/prompts.jsonl", "run_name=bank_jsonl"),
          "bank: {ws}/prompts.jsonl cannot be read as parquet"),
    Probe("23.new machine", "train cpu_threads beyond the machine", train("cpu_threads=100000"),
          "cpu_threads: 100000 threads on a machine with"),
    Probe("23.new success", "figures of an empty results directory", ("figures", "--results", "{ws}/empty_results",
                                                                      "--out", "{ws}/figs_empty", "--n-boot", "0"),
          "", success=True),
    Probe("23.new success", "analyze --n-boot 0 --out elsewhere", ("analyze", "{good}", "--n-boot", "0", "--out",
                                                                   "{ws}/report_nboot0"), "", success=True),
    # issue 22: token-selection rules (an unknown rule, a weight rule where a selection is needed, a bad budget)
    Probe("3 silent wrong run", "train an unknown rule", train("selectors=[full,nosuch]"),
          "selectors: unknown selector 'nosuch'"),
    Probe("3 silent wrong run", "train a weight rule as the top-up score", train("top_up=iw_opd"),
          "top_up: 'iw_opd' is a weight rule"),
    Probe("3 silent wrong run", "train a budget for a weight rule",
          train("selectors=[iw_opd]", "selector_ratios={{iw_opd:[0.05]}}"),  # {{ }}: str.format
          "selector_ratios: 'iw_opd' is a weight rule (it weights every token): it takes no budget"),
    Probe("3 silent wrong run", "train a rule's budget of 1.5",
          train("selectors=[entropy]", "selector_ratios={{entropy:[1.5]}}"),
          "selector_ratios: entropy: each ratio must be in (0, 1], got 1.5"),
    Probe("3 silent wrong run", "diagnose an unknown group rule", diagnose("group_selectors=[nosuch]"),
          "group_selectors: unknown selector ['nosuch']"),
]


# ------------------------------------------------------------------------------------------ workspace


def build_workspace(ws: Path) -> dict[str, str]:
    """The scratch results every probe must leave untouched, and the bad files; -> the placeholders."""
    sys.path.insert(0, str(ROOT))
    from diagnostics.core.config import load_config
    from diagnostics.core.files import share_tree
    from diagnostics.testbed.build import build_testbed
    from diagnostics.testbed.config import TestbedConfig, heldout_problems
    from opd.config import TrainConfig
    from taopd.cli import main

    config = load_config(TestbedConfig, ROOT / "configs/testbed_small.yaml", [f"cache_dir={ROOT / '.cache/testbed'}"])
    testbed = build_testbed(config, progress=False)  # absolute paths: the script may run from anywhere
    for name, path in (("student", testbed.student_path), ("teacher", testbed.teacher_path)):
        shutil.copytree(path, ws / "models" / name)  # copies anyone may read (the cache's weights are 0600)
    share_tree(ws / "models")
    places = {"ws": str(ws), "student": str(ws / "models/student"), "teacher": str(ws / "models/teacher"),
              "good": str(ws / "results/diagnose/good")}
    problems = heldout_problems(testbed.config, 6, split_seed=5)
    rows = [json.dumps({"prompt": p.prompt, "answer": p.answer}) for p in problems]
    (ws / "prompts.jsonl").write_text("\n".join(rows) + "\n")
    (ws / "two.jsonl").write_text("\n".join(rows[:2]) + "\n")
    (ws / "bad_prompt.jsonl").write_text(rows[0] + '\n{"prompt": 123, "answer": "x"}\n')
    (ws / "broken.jsonl").write_text(rows[0] + '\n{"prompt": "sort\n')
    oov = json.dumps({"prompt": problems[0].prompt + " Zé", "answer": "x"})  # 'Z' and 'é' are no testbed bytes
    (ws / "oov.jsonl").write_text("\n".join([oov, *rows[1:]]) + "\n")
    (ws / "empty_model").mkdir()
    shutil.copytree(testbed.student_path, ws / "truncated")
    weights = ws / "truncated" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with _cwd(ROOT), contextlib.redirect_stdout(io.StringIO()):  # the run every probe must leave as it is
        assert main([s.format(**places) for s in diagnose("run_name=good")]) == 0
    shutil.copytree(ws / "results/diagnose/good", ws / "results/diagnose/corrupt")
    (ws / "results/diagnose/corrupt/config.json").write_text("{\n")
    train_config = load_config(TrainConfig, ROOT / "configs/train_quick.yaml",
                               [SMALL, f"out_dir={ws}/results/train", "run_name=locked"])
    (ws / "results/train/locked").mkdir(parents=True)
    (ws / "results/train/locked/config.json").write_text(json.dumps(train_config.fingerprint()))
    issue23_files(ws, testbed, problems, rows)
    return places


def issue23_files(ws: Path, testbed, problems, rows: list[str]) -> None:
    """The bad files and damaged runs of issue 23's probes."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from diagnostics.core.files import share_tree

    (ws / "twice.yaml").write_text("lr: 1.0e-4\nsteps: 3\nlr: 2.0e-4\n")
    (ws / "adir.jsonl").mkdir()
    (ws / "empty_results").mkdir()
    os.symlink("loop", ws / "loop")  # points at itself
    (ws / "latin1.jsonl").write_bytes((rows[0] + "\n").encode() + b'{"prompt": "sort caf\xe9", "answer": "x"}\n')
    (ws / "nan_answer.jsonl").write_text(rows[0] + "\n" + json.dumps({"prompt": problems[1].prompt})[:-1]
                                         + ', "answer": NaN}\n')
    long = json.dumps({"prompt": " ".join([problems[0].prompt] * 40), "answer": "x"})  # past the 64 positions
    (ws / "long.jsonl").write_text("\n".join([long, *rows[1:4]]) + "\n")
    tokenizer = AutoTokenizer.from_pretrained(testbed.teacher_path)  # a BERT LM head sharing the pair's tokenizer
    bert = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                      num_attention_heads=1, intermediate_size=16, max_position_embeddings=128))
    bert.save_pretrained(ws / "bert")
    tokenizer.save_pretrained(ws / "bert")
    shutil.copytree(testbed.student_path, ws / "vocab_off")  # config.json's vocab_size off the weights' rows
    config = json.loads((ws / "vocab_off/config.json").read_text())
    (ws / "vocab_off/config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 8}))
    shutil.copytree(testbed.student_path, ws / "nan_model")  # every norm weight NaN: NaN logits from token 1
    weights = load_file(ws / "nan_model/model.safetensors")
    save_file({k: v.fill_(float("nan")) if "norm" in k else v for k, v in weights.items()},
              ws / "nan_model/model.safetensors", metadata={"format": "pt"})
    share_tree(ws)
    good = ws / "results/diagnose/good"
    clone_run(good, "trunc_shard")
    shard = ws / "results/diagnose/trunc_shard/shards/shard_0001.pt"
    os.truncate(shard, shard.stat().st_size // 2)
    clone_run(good, "swapped_shard")
    shutil.copyfile(ws / "results/diagnose/swapped_shard/shards/shard_0000.pt",
                    ws / "results/diagnose/swapped_shard/shards/shard_0001.pt")
    clone_run(good, "bad_manifest")
    (ws / "results/diagnose/bad_manifest/manifest.json").write_text("{\n")
    clone_run(good, "no_manifest")
    (ws / "results/diagnose/no_manifest/manifest.json").unlink()


def clone_run(src: Path, name: str) -> Path:
    """A copy of the diagnostic run `src` named `name` (its config.json and shards say so), to damage."""
    import torch

    from diagnostics.core.files import write_json
    from diagnostics.core.shards import read_shard, write_shard

    dst = src.parent / name
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    write_json(dst / "config.json", {**config, "run_name": name})  # as the run itself writes it
    for path in sorted((dst / "shards").glob("shard_*.pt")):
        rows = torch.load(path, weights_only=True)["seq_ids"]
        grids = read_shard(src / "shards" / path.name, rows)
        write_shard(path, grids, rows)  # stamped with the clone's config hash
    return dst


class _cwd:
    def __init__(self, path: Path) -> None:
        self.path, self.old = path, Path.cwd()

    def __enter__(self) -> None:
        os.chdir(self.path)

    def __exit__(self, *exc) -> None:
        os.chdir(self.old)


def results_hashes(ws: Path) -> dict[str, str]:
    """sha256 of every results file, by path; the lock files (the pid of their last holder) are not results."""
    return {str(p.relative_to(ws)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((ws / "results").rglob("*")) if p.is_file() and p.name != ".lock"}


def changed_results(before: dict[str, str], ws: Path) -> list[str]:
    """Results files that existed in `before` and are now gone or different (new run directories are allowed)."""
    after = results_hashes(ws)
    return [path for path, digest in before.items() if after.get(path) != digest]


def hold_lock(run_dir: str) -> subprocess.Popen:
    """Another process holding the lock of `run_dir` until killed (it prints 'held' once it has it)."""
    code = ("import sys, time; from diagnostics.core.lock import acquire_run_lock; acquire_run_lock(sys.argv[1]); "
            "print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([str(PYTHON), "-c", code, run_dir], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def run_subprocess(argv: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> tuple[int, str]:
    """`taopd argv` in a fresh process: (exit status, stderr + stdout)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run([*TAOPD_CMD, *argv], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    return done.returncode, done.stderr + done.stdout


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(("error:", "taopd: error:"))]


def cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------------ OS-level probes


def probe_disk_full(ws: Path, places: dict[str, str]) -> tuple[int, str] | None:
    """analyze --out onto a 64 KiB tmpfs filled to the brim; None where tmpfs cannot be mounted."""
    target = ws / "full"
    target.mkdir(exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(target)],
                                           capture_output=True).returncode:
        return None
    try:
        with open(target / "filler", "wb") as handle:  # leave no room for summary.json
            try:
                handle.write(b"\0" * (1 << 20))
            except OSError:
                pass
        return run_subprocess(["analyze", places["good"], "--n-boot", "5", "--out", str(target)])
    finally:
        subprocess.run(["umount", str(target)], capture_output=True)


def others_can_read(path: Path) -> bool:
    """Whether a user who is neither owner nor in the group can pass through every folder above `path` and read
    and enter `path` itself (what nobody needs to import the project from the checkout)."""
    return all(p.stat().st_mode & 0o001 for p in path.parents) and path.stat().st_mode & 0o005 == 0o005


def run_unprivileged(ws: Path, argv: list[str]) -> tuple[int, str] | None:
    """`taopd argv` as a user who cannot write the root-owned results (nobody, via setpriv, when we are root;
    else ourselves with the results chmod'ed read-only); None where neither is possible."""
    results = ws / "results"
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [results, *results.rglob("*")] if p.is_dir()}
        for path in modes:
            path.chmod(0o555)
        try:
            return run_subprocess(argv)
        finally:
            for path, mode in modes.items():
                path.chmod(mode)
    if shutil.which("setpriv") is None or not others_can_read(ROOT):
        return None  # a checkout in a private folder (mktemp -d makes 0700): nobody cannot import the project
    for path in (ws, *ws.parents):  # nobody must be able to read the workspace
        if path == Path("/"):
            break
        path.chmod(path.stat().st_mode | 0o005)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(ws), "HF_HOME": str(ws / "hf")}
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *TAOPD_CMD, *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if "Permission denied" in done.stderr and "error:" not in done.stderr:
        return None  # nobody cannot even start the program here
    return done.returncode, done.stderr + done.stdout


def probe_unwritable(ws: Path, places: dict[str, str]) -> tuple[int, str] | None:
    """diagnose (on the workspace's readable copy of the testbed pair) into results the user cannot write."""
    return run_unprivileged(ws, [s.format(**places) for s in diagnose_real("run_name=ro")])


def probe_read_only_analyze(ws: Path, places: dict[str, str]) -> tuple[int, str] | None:
    """analyze of a run the user may read but not write (without --out)."""
    return run_unprivileged(ws, ["analyze", places["good"], "--n-boot", "5"])


def probe_ctrl_c(ws: Path, places: dict[str, str]) -> tuple[int, str]:
    """Ctrl-C (SIGINT) while a diagnostic runs: one line and exit status 130 (finished work is kept)."""
    # 64 one-sequence shards: seconds of shards after the first, so the interrupt lands mid-run (16 took 0.6 s once
    # imports got faster, and a 0.2 s poll on a loaded machine missed them all)
    argv = [s.format(**places) for s in diagnose("run_name=ctrl_c", "n_sequences=64", "shard_sequences=1")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([*TAOPD_CMD, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    shards = ws / "results/diagnose/ctrl_c/shards"
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline and not list(shards.glob("shard_*.pt")):
        time.sleep(0.01)  # interrupt once the run is under way (its first shard written)
    if proc.poll() is not None:
        out, err = proc.communicate()
        return proc.returncode, f"the run ended (exit {proc.returncode}) before it could be interrupted\n{err + out}"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, err + out


# OS-level probes: (item, name, function, the text the error line must contain, the exit status)
OS_PROBES = [
    ("4 traceback", "disk full (analyze --out on a full tmpfs)", probe_disk_full, "No space left on device", 2),
    ("4 traceback", "unwritable results directory (non-root user)", probe_unwritable, "Permission denied", 2),
    ("1 data damaged", "analyze read-only results (non-root user)", probe_read_only_analyze, "pass --out DIR", 2),
    ("23.9 messages", "Ctrl-C during a diagnostic", probe_ctrl_c, "interrupted (Ctrl-C)", 130),
]


def probe_tampered_shipped(ws: Path, places: dict[str, str]) -> tuple[int, str]:
    """`taopd testbed` on a copy of the shipped testbeds whose small teacher's weights have one byte flipped
    (TAOPD_SHIPPED_TESTBEDS points at the copy): an error naming the file, nothing built in its place."""
    shipped = ws / "shipped"
    if not shipped.exists():
        shutil.copytree(ROOT / "diagnostics" / "testbed" / "shipped", shipped)
        weights = shipped / "small" / "teacher" / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(bytes(data))
    return run_subprocess(["testbed", "--config", "configs/testbed_small.yaml", f"cache_dir={ws}/shipped-cache"],
                          {"TAOPD_SHIPPED_TESTBEDS": str(shipped)})


# issue 24: a probe that needs a tampered copy of the shipped testbeds (made in the workspace), run as the OS probes are
OS_PROBES.append(("1 data damaged", "tampered shipped testbed file (one byte of a weight file)", probe_tampered_shipped,
                  "small/teacher/model.safetensors does not match its sha256", 2))


def judge(probe: Probe | None, expect: str, rc: int, output: str, status: int = 2) -> bool:
    """A probe's outcome as the issue asks: one line `error:` naming `expect` and exit `status`, no traceback;
    for a success probe, exit 0 and no error line."""
    lines = error_lines(output)
    if probe is not None and probe.success:
        return rc == 0 and not lines and "Traceback" not in output
    return rc == status and len(lines) == 1 and expect in lines[0] and "Traceback" not in output


# ------------------------------------------------------------------------------------------ main


def run_all(ws: Path) -> int:
    places = build_workspace(ws)
    failures = 0
    probes = [(p.item, p.name, p) for p in PROBES] + [(item, name, entry) for item, name, *entry in OS_PROBES]
    for item, name, probe in probes:
        before = results_hashes(ws)
        holder, status = None, 2
        if isinstance(probe, list):
            result, expect, status = probe[0](ws, places), probe[1], probe[2]
            if result is None:
                print(f"[skip] {item:20s} {name}: the OS does not allow the setup here")
                continue
        else:
            if probe.skip_if_cuda and cuda_present():
                print(f"[skip] {item:20s} {name}: a GPU is present")
                continue
            expect = probe.expect.format(**places)
            holder = hold_lock(probe.lock.format(**places)) if probe.lock else None
            try:
                env = {key: value.format(**places) for key, value in probe.env}
                result = run_subprocess([s.format(**places) for s in probe.argv], env)
            finally:
                if holder is not None:
                    holder.kill()
                    holder.wait()
        rc, output = result
        lines = error_lines(output)
        ok = judge(probe if isinstance(probe, Probe) else None, expect, rc, output, status)
        same = not changed_results(before, ws)
        failures += not (ok and same)
        status = "ok  " if ok and same else "FAIL"
        print(f"[{status}] {item:20s} {name}: exit {rc}, results {'unchanged' if same else 'CHANGED'}\n"
              f"       {lines[0] if lines else output.strip().splitlines()[-1:]}")
    print(f"{len(probes)} probes, {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", help="workspace directory to create and keep (default: a temporary one)")
    args = parser.parse_args()
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=False)
        sys.exit(run_all(Path(args.keep).resolve()))
    with tempfile.TemporaryDirectory(prefix="taopd-probe-") as tmp:
        sys.exit(run_all(Path(tmp)))
