"""Every bad input of issue 13, tried as a hostile new user would: each must end in exit status 2 and
one line `error: ...` naming the argument, file or position, with no traceback, and leave the existing
results byte for byte as they were.

    .venv/bin/python benchmarks/probe_bad_inputs.py            # every probe, one line each
    .venv/bin/python benchmarks/probe_bad_inputs.py --keep DIR # keep the workspace for a look

Each probe runs `.venv/bin/taopd ...` as a subprocess in a scratch workspace that holds a finished
diagnostic run (the small testbed, 4 sequences), prompt files, an empty and a truncated model
directory, a run with a corrupt config.json and a training run to lock. The same table drives
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
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAOPD = ROOT / ".venv" / "bin" / "taopd"
PYTHON = ROOT / ".venv" / "bin" / "python"
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


def diagnose(*extra: str) -> tuple[str, ...]:
    return ("diagnose", SMALL, "out_dir={ws}/results/diagnose", "n_sequences=4", "group_selectors=[]",
            "n_boot=10", "shard_sequences=2", *extra)


def diagnose_real(*extra: str) -> tuple[str, ...]:
    """The diagnostic on a pair given as paths (the small testbed's), with a JSONL prompt file."""
    return diagnose("student={student}", "teacher={teacher}", "prompts={ws}/prompts.jsonl", "max_new_tokens=8",
                    *extra)


def train(*extra: str) -> tuple[str, ...]:
    return ("train", "--config", "configs/train_quick.yaml", SMALL, "out_dir={ws}/results/train", *extra)


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
    return places


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
    done = subprocess.run([str(TAOPD), *argv], cwd=ROOT, env=full_env, capture_output=True, text=True,
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
    if shutil.which("setpriv") is None:
        return None
    for path in (ws, *ws.parents):  # nobody must be able to read the workspace
        if path == Path("/"):
            break
        path.chmod(path.stat().st_mode | 0o005)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(ws), "HF_HOME": str(ws / "hf")}
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", str(TAOPD), *argv],
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


# OS-level probes: (item, name, function, the text the error line must contain)
OS_PROBES = [
    ("4 traceback", "disk full (analyze --out on a full tmpfs)", probe_disk_full, "No space left on device"),
    ("4 traceback", "unwritable results directory (non-root user)", probe_unwritable, "Permission denied"),
    ("1 data damaged", "analyze read-only results (non-root user)", probe_read_only_analyze, "pass --out DIR"),
]


# ------------------------------------------------------------------------------------------ main


def run_all(ws: Path) -> int:
    places = build_workspace(ws)
    failures = 0
    probes = [(p.item, p.name, p) for p in PROBES] + [(item, name, (fn, text)) for item, name, fn, text in OS_PROBES]
    for item, name, probe in probes:
        before = results_hashes(ws)
        holder = None
        if isinstance(probe, tuple):
            result, expect = probe[0](ws, places), probe[1]
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
                result = run_subprocess([s.format(**places) for s in probe.argv], dict(probe.env))
            finally:
                if holder is not None:
                    holder.kill()
                    holder.wait()
        rc, output = result
        lines = error_lines(output)
        ok = rc == 2 and len(lines) == 1 and expect in lines[0] and "Traceback" not in output
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
