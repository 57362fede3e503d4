"""Issue 13: every bad input a clear error, no silent wrong run, nothing overwritten.

One test per probe of `benchmarks/probe_bad_inputs.py` (the table a reviewer runs to see every
message): exit status 2, exactly one `error:` line that names the argument, file or position, no
traceback, and every results file that existed before hashes the same after. Most probes call
`taopd.cli.main` in this process (seconds); the hub-offline probe needs a fresh process (the hub reads
HF_HUB_OFFLINE at import). Then the pieces the table cannot show: disk full and an unwritable
directory, the non-finite guard of both recipes (nonfinite.json, last good state), the lock against a
second process, and results files following the umask.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import math
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("probe_bad_inputs", ROOT / "benchmarks" / "probe_bad_inputs.py")
probes = importlib.util.module_from_spec(_spec)
sys.modules["probe_bad_inputs"] = probes  # dataclasses look their module up by name
_spec.loader.exec_module(probes)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, small_testbed):
    """A finished diagnostic run, prompt files, bad model directories, runs to corrupt and to lock."""
    ws = tmp_path_factory.mktemp("probes")
    places = probes.build_workspace(ws)
    return ws, places


def run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    """`taopd argv` through `taopd.cli.main` in this process: (exit status, stderr + stdout)."""
    from taopd.cli import main

    old = Path.cwd()
    os.chdir(ROOT)
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        rc = exc.code
    finally:
        os.chdir(old)
    out = capsys.readouterr()
    return rc, out.err + out.out


def assert_one_clear_error(rc: int, output: str, expect: str) -> None:
    lines = probes.error_lines(output)
    assert rc == 2, output
    assert "Traceback" not in output
    assert len(lines) == 1, output
    assert expect in lines[0], lines[0]


@pytest.mark.parametrize("probe", probes.PROBES, ids=[p.name for p in probes.PROBES])
def test_probe(probe, workspace, capsys, monkeypatch):
    ws, places = workspace
    if probe.skip_if_cuda and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    argv = [s.format(**places) for s in probe.argv]
    before = probes.results_hashes(ws)
    holder = probes.hold_lock(probe.lock.format(**places)) if probe.lock else None
    try:
        if probe.subprocess_only:
            rc, output = probes.run_subprocess(argv, {k: v.format(**places) for k, v in probe.env})
        else:
            monkeypatch.setenv("TQDM_DISABLE", "1")
            rc, output = run_in_process(argv, capsys)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    if probe.success:
        assert probes.judge(probe, "", rc, output), output
    else:
        assert_one_clear_error(rc, output, probe.expect.format(**places))
    assert probes.changed_results(before, ws) == []


def test_a_probe_as_a_real_process(workspace):
    """The exit status and stderr of the installed command itself (the table runs in-process above)."""
    ws, places = workspace
    rc, output = probes.run_subprocess(["analyze", places["good"], "--n-boot", "-5"])
    assert_one_clear_error(rc, output, "--n-boot: must be >= 0")


# ------------------------------------------------------------------------------------------ 1. analyze


def test_analyze_out_leaves_the_run_directory_alone(workspace, capsys):
    ws, places = workspace
    before = probes.results_hashes(ws)
    rc, output = run_in_process(["analyze", places["good"], "--n-boot", "5", "--out", str(ws / "report")], capsys)
    assert rc == 0, output
    assert (ws / "report" / "summary.json").is_file()
    assert probes.changed_results(before, ws) == []


# ------------------------------------------------------------------------------------------ 4. the OS says no


def test_disk_full_is_one_line_and_keeps_the_summary(workspace, capsys, monkeypatch):
    """ENOSPC while writing summary.json: one line naming the file; the old summary.json is intact."""
    ws, places = workspace
    import diagnostics.core.files

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    before = probes.results_hashes(ws)
    monkeypatch.setattr(diagnostics.core.files.os, "replace", full)
    rc, output = run_in_process(["analyze", places["good"], "--n-boot", "5"], capsys)
    assert_one_clear_error(rc, output, f"No space left on device: {places['good']}/summary.json (the disk is full")
    assert probes.changed_results(before, ws) == []
    assert not list(Path(places["good"]).glob(".summary.json.*"))  # the temporary file is removed


def test_a_full_disk_is_named_whatever_the_writer_says(tmp_path, monkeypatch):
    """torch.save reports a full disk as "unexpected pos"; atomic_write says ENOSPC and names the file."""
    import diagnostics.core.files
    from diagnostics.core.files import atomic_write

    def write(tmp):
        Path(tmp).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(diagnostics.core.files, "_disk_full", lambda directory: True)
    with pytest.raises(OSError, match=rf"No space left on device: '{tmp_path}/shard.pt'") as info:
        atomic_write(tmp_path / "shard.pt", write)
    assert info.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_os_level_probes(workspace):
    """A real full disk (tmpfs) and real unwritable results (user nobody), where the OS allows them."""
    ws, places = workspace
    ran = 0
    for _, _, probe, expect, status in probes.OS_PROBES:
        if probe is probes.probe_ctrl_c:
            continue  # its own test below
        before = probes.results_hashes(ws)
        result = probe(ws, places)
        if result is None:
            continue
        ran += 1
        assert probes.judge(None, expect, *result, status), result[1]
        assert probes.changed_results(before, ws) == []
    if not ran:
        pytest.skip("neither tmpfs nor another user is available here")


# ------------------------------------------------------------------------------------------ 2. non-finite


def test_train_blowup_record_and_last_good_checkpoint(workspace, capsys):
    """lr=1e30: step 2's logits are NaN although the weights are finite; the arm stops with nonfinite.json
    naming arm, step and quantity, and the state after step 1 (all checks passed) kept as a checkpoint."""
    ws, places = workspace
    argv = [s.format(**places) for s in probes.train("run_name=blowup", "lr=1e30", *probes.TRAIN_SHORT)]
    rc, output = run_in_process(argv, capsys)
    assert_one_clear_error(rc, output, "full-r1-s0: step 2: student logits non-finite")
    arm_dir = ws / "results/train/blowup/arms/full-r1-s0"
    record = json.loads((arm_dir / "nonfinite.json").read_text())
    assert (record["arm"], record["step"], record["quantity"]) == ("full-r1-s0", 2, "student logits")
    assert record["checkpoint"] == str(arm_dir / "ckpt-000001")
    assert (arm_dir / "ckpt-000001" / "student.pt").is_file()
    assert record["checkpoint_max_abs_weight"] > 1e20  # an exploded state is visible as such
    assert not (arm_dir / "result.json").exists()


def test_nonfinite_weights_keep_the_last_checkpoint(tmp_path):
    """Weights NaN after an optimizer step: nothing is saved over the arm's last checkpoint."""
    from opd.distributed import World
    from opd.nonfinite import WeightsNonFinite, check_weights, stop_arm
    from opd.step import NonFiniteError

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    world = World.create("cpu")
    from opd.checkpoint import save_checkpoint

    good = save_checkpoint(tmp_path, 4, model, optimizer, {"step": 4, "data_position": 4, "train_seconds": 0.0},
                           [{"step": 4}], world)
    with torch.no_grad():
        model.weight[1, 2] = math.inf
    with pytest.raises(WeightsNonFinite, match=r"weight has 1 of 6 entries NaN/inf") as info:
        check_weights(model)
    expected = r"arm-x: step 6: student weights non-finite.*last good state: .*ckpt-000004"
    with pytest.raises(NonFiniteError, match=expected):
        stop_arm(info.value, arm_name="arm-x", step=6, arm_dir=tmp_path, student=model, optimizer=optimizer,
                 state={"step": 5}, metrics=[], world=world, bank=None)
    record = json.loads((tmp_path / "nonfinite.json").read_text())
    assert (record["quantity"], record["step"], record["checkpoint"]) == ("student weights", 6, str(good))
    assert sorted(p.name for p in tmp_path.glob("ckpt-*")) == ["ckpt-000004"]


def test_other_errors_are_not_called_blowups(tmp_path, small_testbed):
    """A RuntimeError with finite weights and logits is re-raised unchanged (a bug stays a bug)."""
    from diagnostics.bank import bank_batch
    from diagnostics.lm.models import load_model
    from opd.distributed import World
    from opd.nonfinite import stop_arm

    student = load_model(small_testbed.student_path, torch.device("cpu"), torch.float32)
    import pandas as pd

    bank = bank_batch(pd.DataFrame({"prompt_ids": [[5, 6, 7]], "response_ids": [[8, 9]]}), 0)
    err = RuntimeError("shape mismatch in something")
    with pytest.raises(RuntimeError, match="^shape mismatch in something$"):
        stop_arm(err, arm_name="a", step=1, arm_dir=tmp_path, student=student, optimizer=None, state={},
                 metrics=[], world=World.create("cpu"), bank=bank)
    assert not (tmp_path / "nonfinite.json").exists()


def test_diagnose_blowup_keeps_finished_shards(workspace, small_testbed):
    """lr=1e18 past the config check (a blow-up at a legal lr looks the same): the first shard with a NaN
    gain is not saved; nonfinite.json names shard, sequence, position and quantity; earlier shards stay."""
    from diagnostics.core.config import load_config
    from diagnostics.core.nonfinite import NonFiniteError
    from diagnostics.diagnose import run_diagnose
    from diagnostics.diagnose_config import DiagnoseConfig

    ws, places = workspace
    argv = [s.format(**places) for s in probes.diagnose("run_name=nan", "lr=1e-5")][1:]
    config = load_config(DiagnoseConfig, None, [a.replace("configs/", f"{ROOT}/configs/") for a in argv])
    config.lr = 1e18  # a valid config, then the step size of a blow-up
    with pytest.raises(NonFiniteError, match=r"is non-finite at shard 0, bank sequence \d+, response position \d+"):
        run_diagnose(config, progress=False)
    run_dir = ws / "results/diagnose/nan"
    record = json.loads((run_dir / "nonfinite.json").read_text())
    assert record["recipe"] == "diagnose" and record["shard"] == 0 and record["quantity"] in (
        "kl_forward_after", "gain", "kl_reverse_after")
    assert not list((run_dir / "shards").glob("shard_*.pt")) and not (run_dir / "tokens.parquet").exists()


# ------------------------------------------------------------------------------------------ 6. file modes


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_results_files_follow_the_umask(tmp_path, umask):
    import pandas as pd

    from diagnostics.core.files import write_json, write_parquet

    old = os.umask(umask)
    try:
        paths = [write_json(tmp_path / "a.json", {"x": 1}),
                 write_parquet(tmp_path / "b.parquet", pd.DataFrame({"x": [1]}))]
    finally:
        os.umask(old)
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_a_finished_run_follows_the_umask(workspace):
    """Every file of a diagnostic run (parquet, JSON, shards) has the mode open(path, "w") would give it."""
    from diagnostics.core.files import file_mode

    ws, places = workspace
    files = [p for p in Path(places["good"]).rglob("*") if p.is_file()]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    wrong = {name: oct(mode) for name, mode in modes.items() if mode != file_mode()}
    assert files and not wrong


def test_group_blowup_is_named(tmp_path):
    import pandas as pd

    from diagnostics.core.nonfinite import NonFiniteError, check_group_finite

    group = pd.DataFrame({"selector": ["kl", "kl"], "ratio": [0.05, 0.05], "seq_id": [3, 3], "pos": [0, 1],
                          "kept": [True, False], "gain": [0.1, math.nan]})
    check_group_finite(group.iloc[:1], tmp_path, step="sgd lr=1e-05")
    with pytest.raises(NonFiniteError, match=r"group gain is non-finite for selector kl at ratio 0.05 \(bank "
                                             r"sequence 3, response position 1; 1 positions; sgd lr=1e-05\)"):
        check_group_finite(group, tmp_path, step="sgd lr=1e-05")
    record = json.loads((tmp_path / "nonfinite.json").read_text())
    assert (record["quantity"], record["selector"], record["seq_id"], record["pos"]) == ("group gain", "kl", 3, 1)


def test_a_blowup_with_finite_weights_keeps_the_earlier_checkpoint(tmp_path):
    """NaN loss at step 7 after a periodic checkpoint at step 5: the state after step 6 is saved, and
    ckpt-000005 is set aside as ckpt-000005.kept (not deleted by that save, ignored by --resume)."""
    from opd.checkpoint import latest_checkpoint, save_checkpoint
    from opd.distributed import World
    from opd.nonfinite import stop_arm
    from opd.step import NonFiniteError

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    world = World.create("cpu")
    save_checkpoint(tmp_path, 5, model, optimizer, {"step": 5, "data_position": 5, "train_seconds": 0.0}, [], world)
    with pytest.raises(NonFiniteError, match=r"arm-y: step 7: per-token loss non-finite.*ckpt-000006"):
        stop_arm(NonFiniteError("per-token loss non-finite at 1 of 4 kept positions"), arm_name="arm-y", step=7,
                 arm_dir=tmp_path, student=model, optimizer=optimizer,
                 state={"step": 6, "data_position": 6, "train_seconds": 0.0}, metrics=[], world=world, bank=None)
    record = json.loads((tmp_path / "nonfinite.json").read_text())
    assert record["checkpoint"].endswith("ckpt-000006") and record["earlier_checkpoint"].endswith("ckpt-000005.kept")
    assert (tmp_path / "ckpt-000005.kept" / "student.pt").is_file()
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-000006"


def test_damaged_weights_name_the_directory_at_load_too(workspace):
    """Past the header check (a file damaged after it), the weights load itself names the directory."""
    from diagnostics.lm.models import load_model

    ws, _ = workspace
    with pytest.raises(ValueError, match=rf"cannot load the model weights in {ws}/truncated \(SafetensorError"):
        load_model(str(ws / "truncated"), torch.device("cpu"), torch.float32)


def test_saved_models_follow_the_umask(tmp_path, small_testbed):
    """save_pretrained writes model.safetensors 0600; share_tree (the trainer's saved students) fixes that."""
    from diagnostics.core.files import file_mode, share_tree
    from diagnostics.lm.models import load_model

    load_model(small_testbed.student_path, torch.device("cpu"), torch.float32).save_pretrained(tmp_path / "student")
    share_tree(tmp_path / "student")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "student").iterdir()}
    assert modes and set(modes.values()) == {file_mode()}, modes


def test_unreadable_weights_are_named_not_called_missing(tmp_path, small_testbed, monkeypatch):
    """safetensors reports a file it may not read as "No such file"; the pair check says Permission denied."""
    import shutil

    from diagnostics.lm.models import check_path

    shutil.copytree(small_testbed.student_path, tmp_path / "student")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path).endswith(".safetensors")
                        else real_access(path, mode))
    with pytest.raises(PermissionError, match=rf"student: cannot read the model weights: '{tmp_path}/student/model"):
        check_path(str(tmp_path / "student"), "student")


# ------------------------------------------------------------------------------------------ issue 23


def test_a_summary_never_loses_sections(workspace, capsys, monkeypatch):
    """A rerun whose sections are skipped (for any reason) is refused; the stored summary.json stays as it was."""
    import taopd.cli

    ws, places = workspace
    report = ws / "report_sections"
    rc, output = run_in_process(["analyze", places["good"], "--n-boot", "5", "--out", str(report)], capsys)
    assert rc == 0, output
    before = (report / "summary.json").read_bytes()
    real = taopd.cli.summarize

    def skipping(*args, **kwargs):
        summary = real(*args, **kwargs)
        summary["notes"].append("OLS: skipped (a reason)")
        return {**summary, "ols": None, "correlations": {}}

    monkeypatch.setattr(taopd.cli, "summarize", skipping)
    rc, output = run_in_process(["analyze", places["good"], "--n-boot", "5", "--out", str(report)], capsys)
    assert_one_clear_error(rc, output, f"{report}/summary.json: the new summary would lose sections it holds "
                                       f"(correlations, ols: OLS: skipped (a reason))")
    assert (report / "summary.json").read_bytes() == before


def test_student_names_are_unique_by_construction():
    from opd.evaluate import student_name

    taken: set[str] = set()
    for given in ["a/student", "b/student", "a_student", "a/student/"]:
        taken.add(student_name(given, taken))
    assert taken == {"student", "b_student", "a_student", "a_student-2"}


def test_the_manifest_names_the_keys_the_preset_set():
    from diagnostics.core.config import load_config
    from opd.config import TrainConfig

    config = load_config(TrainConfig, ROOT / "configs/train.yaml", ["preset=paper"])
    assert set(config.preset_keys()) == {"signals", "signal_normalization", "tie_break", "top_up", "q3_fill",
                                         "min_per_sequence", "budget", "normalization", "optimizer", "betas",
                                         "weight_decay", "max_grad_norm"}
    assert load_config(TrainConfig, ROOT / "configs/train.yaml").preset_keys() == []
    source = (ROOT / "opd/trainer.py").read_text()
    assert '"preset_keys": config.preset_keys()' in source  # build_manifest writes them into manifest.json


def test_the_testbed_cache_is_one_place_whatever_the_directory(tmp_path, monkeypatch):
    from diagnostics.testbed.config import TestbedConfig

    monkeypatch.delenv("TAOPD_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    roots = set()
    for cwd in (tmp_path, ROOT):
        monkeypatch.chdir(cwd)
        roots.add(TestbedConfig().cache_root())
    assert roots == {tmp_path / "xdg" / "taopd" / "testbed"}
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert TestbedConfig().cache_root() == tmp_path / "home" / ".cache" / "taopd" / "testbed"
    monkeypatch.setenv("TAOPD_CACHE_DIR", str(tmp_path))
    assert TestbedConfig().cache_root() == tmp_path / "testbed"
    assert TestbedConfig(cache_dir=str(tmp_path / "own")).cache_root() == tmp_path / "own"


def test_generation_blowup_writes_nonfinite_json(workspace, capsys):
    """NaN weights: generation stops at the first sampled token, with nonfinite.json beside the run's files."""
    ws, places = workspace
    argv = [s.format(**places) for s in probes.diagnose_real("student={ws}/nan_model", "backend=hf",
                                                             "run_name=nan_gen_record")]
    rc, output = run_in_process(argv, capsys)
    assert_one_clear_error(rc, output, "rollouts: generation logits non-finite at generated token 1")
    record = json.loads((ws / "results/diagnose/nan_gen_record/nonfinite.json").read_text())
    assert (record["recipe"], record["stage"], record["quantity"]) == ("diagnose", "rollouts", "generation logits")
    assert not (ws / "results/diagnose/nan_gen_record/rollouts.parquet").exists()


def test_trl_blowup_writes_nonfinite_json(workspace, capsys):
    """engine=trl: a blow-up stops the arm with arms/<arm>/nonfinite.json, as the own engine's guard does."""
    ws, places = workspace
    argv = [s.format(**places) for s in probes.train("run_name=trl_record", "engine=trl", "lr=1e30",
                                                     *probes.TRAIN_SHORT)]
    rc, output = run_in_process(argv, capsys)
    assert_one_clear_error(rc, output, "full-r1-s0: step 2: student logits non-finite")
    record = json.loads((ws / "results/train/trl_record/arms/full-r1-s0/nonfinite.json").read_text())
    assert (record["engine"], record["arm"], record["step"], record["quantity"]) == ("trl", "full-r1-s0", 2,
                                                                                      "student logits")


def test_a_checkpoint_on_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    """torch.save on a full disk says "unexpected pos"; save_checkpoint says ENOSPC naming the checkpoint and
    leaves no half-written temporary, the older checkpoint intact."""
    import diagnostics.core.files
    import opd.checkpoint
    from opd.checkpoint import latest_checkpoint, save_checkpoint
    from opd.distributed import World

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    world = World.create("cpu")
    state = {"step": 1, "data_position": 1, "train_seconds": 0.0}
    save_checkpoint(tmp_path, 1, model, optimizer, state, [], world)
    real_save = torch.save

    def full(obj, path, *args, **kwargs):
        if str(path).endswith("student.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(opd.checkpoint.torch, "save", full)
    monkeypatch.setattr(diagnostics.core.files, "_disk_full", lambda directory: True)
    with pytest.raises(OSError, match=rf"No space left on device: '{tmp_path}/ckpt-000002'") as info:
        save_checkpoint(tmp_path, 2, model, optimizer, {**state, "step": 2}, [], world)
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000001"]
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-000001"
    from taopd.cli import error_line

    assert error_line(info.value).startswith(f"No space left on device: {tmp_path}/ckpt-000002 (the disk is full")


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_testbed_cache_files_follow_the_umask(tmp_path, umask):
    """save_pretrained writes model.safetensors 0600; a testbed build shares it like any result."""
    from diagnostics.core.config import load_config
    from diagnostics.core.files import file_mode
    from diagnostics.testbed.build import build_testbed
    from diagnostics.testbed.config import TestbedConfig

    config = load_config(TestbedConfig, ROOT / "configs/testbed_small.yaml",
                         [f"cache_dir={tmp_path}", "capacity_steps=0", "teacher.train_steps=2", "student.train_steps=1",
                          "eval_problems=2", "spread_problems=2"])
    old = os.umask(umask)
    try:
        testbed = build_testbed(config, progress=False)
        mode = file_mode()
    finally:
        os.umask(old)
    files = [p for p in Path(testbed.root).rglob("*") if p.is_file()]
    wrong = {str(p.relative_to(testbed.root)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if stat.S_IMODE(p.stat().st_mode) != mode}
    assert files and not wrong


def test_the_paper_preset_keeps_the_release_budget():
    """tip_compat.py L450 keeps ceil(n * ratio) in float64: 7% of 100 positions keeps 8, the project's rule 7;
    both against the definition written out (the release's float product; the exact decimal product)."""
    from fractions import Fraction

    from diagnostics.signals import select

    for ratio, n in [(0.07, 100), (0.05, 60), (0.1, 30), (0.3, 10), (0.05, 256), (0.25, 7)]:
        release = max(1, min(n, math.ceil(n * ratio)))
        exact = max(1, min(n, math.ceil(Fraction(str(ratio)) * n)))
        score = torch.arange(n, dtype=torch.float64).view(1, n)
        valid = torch.ones(1, n, dtype=torch.bool)
        assert int(select(score, valid, ratio, min_per_sequence=0, budget_rule="release").sum()) == release
        assert int(select(score, valid, ratio, min_per_sequence=0).sum()) == exact
    assert (math.ceil(100 * 0.07), math.ceil(Fraction("0.07") * 100)) == (8, 7)


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_exit_130(workspace):
    """SIGINT mid-run: one line, exit status 130, no traceback; the finished shards are kept for the resume."""
    ws, places = workspace
    rc, output = probes.probe_ctrl_c(ws, places)
    assert probes.judge(None, "interrupted (Ctrl-C)", rc, output, 130), output
    assert list((ws / "results/diagnose/ctrl_c/shards").glob("shard_*.pt"))


@pytest.mark.slow
def test_a_blowup_on_one_ddp_rank_stops_every_rank(tmp_path):
    """2 gloo processes under torchrun: rank 1 fails in the local phase, rank 0 does not; both stop with an
    error within seconds instead of rank 0 waiting in the next all-reduce."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
           str(ROOT / "tests/opd/stop_worker.py"), str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "rank1.txt").read_text() == "generation logits non-finite at generated token 1"
    assert (tmp_path / "rank0.txt").read_text().startswith("student logits non-finite on another process's rollouts "
                                                           "(1 of 2 processes stopped this step")


# ------------------------------------------------------------------------------------------ issue 24: shipped testbeds


def test_a_tampered_shipped_testbed_file_is_one_error_naming_it(tmp_path, capsys, monkeypatch):
    """One byte of a shipped weight file flipped: `taopd testbed` and `taopd diagnose` stop with one line naming the
    file; nothing is built in its place (no cache directory) and no run directory is written."""
    import shutil

    from diagnostics.testbed.manifest import SHIPPED_DIR, SHIPPED_ENV

    shipped = tmp_path / "shipped"
    shutil.copytree(SHIPPED_DIR, shipped)
    weights = shipped / "small" / "teacher" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    monkeypatch.setenv(SHIPPED_ENV, str(shipped))
    expect = f"shipped testbed 'small': {weights} does not match its sha256"
    rc, output = run_in_process(["testbed", "--config", "configs/testbed_small.yaml", f"cache_dir={tmp_path}/cache"],
                                capsys)
    assert_one_clear_error(rc, output, expect)
    argv = [s.format(ws=tmp_path) for s in probes.diagnose()]  # the small testbed via testbed_config=
    rc, output = run_in_process(argv, capsys)
    assert_one_clear_error(rc, output, expect)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "results").exists()
