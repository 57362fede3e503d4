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
            rc, output = probes.run_subprocess(argv, dict(probe.env))
        else:
            monkeypatch.setenv("TQDM_DISABLE", "1")
            rc, output = run_in_process(argv, capsys)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
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
    for _, _, probe, expect in probes.OS_PROBES:
        before = probes.results_hashes(ws)
        result = probe(ws, places)
        if result is None:
            continue
        ran += 1
        assert_one_clear_error(*result, expect)
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
    from diagnostics.diagnose import DiagnoseConfig, run_diagnose

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
