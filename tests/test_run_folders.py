"""One run per folder: the lock, refusing to mix runs, ``--overwrite``, and what ``--resume`` accepts.

Every refusal is checked to change nothing on disk: :func:`snapshot` records every file of the folder
(path, bytes, mtime) and every sub-folder before and after.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import filelock
import pytest
import torch
from safetensors.torch import load_file

from bilevel.run import cli, rundir

from processes import LAUNCH_2, env, snapshot  # noqa: E402

TESTS = Path(__file__).parent
RIDGE = ["ridge", "--smoke", "--no-progress"]


def refuse(argv, capsys) -> str:
    """Run ``bilevel <argv>`` in this process; it must exit 2 with one error line, which is returned."""
    assert cli.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bilevel run: error: "), lines
    return lines[0]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished 6-step ridge run, checkpointed every 3 steps (checkpoints at steps 3 and 6)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(["run", *RIDGE, "--steps", "6", "--checkpoint-every", "3", "--out", str(out)]) == 0
    return out


@pytest.fixture
def used(finished_run, tmp_path) -> Path:
    """A private copy of the finished run (mtimes preserved) that a test may try to spoil."""
    out = tmp_path / "run"
    shutil.copytree(finished_run, out, copy_function=shutil.copy2)
    return out


# ---- the lock ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", [[], ["--resume"], ["--overwrite"]], ids=["new", "resume", "overwrite"])
def test_a_folder_whose_lock_is_held_is_refused_for_any_run(used, mode, capsys):
    before = snapshot(used)
    held = filelock.FileLock(str(used / ".lock"), timeout=0)
    held.acquire()
    try:
        line = refuse(["run", *RIDGE, "--steps", "12", "--out", str(used), *mode], capsys)
    finally:
        held.release()
    assert f"run folder {used} is in use: another run holds its lock" in line
    assert "wait for that run to finish" in line and "choose another --out" in line
    assert snapshot(used) == before


def test_a_running_run_holds_its_folder_until_it_is_killed(tmp_path, capsys):
    """A real first run in another process: a second run is refused while it runs, and the kernel drops the
    lock when it is killed (no stale lock to clean up by hand)."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "bilevel.run.cli", "run", *RIDGE, "--steps", "100000000",
                              "--out", str(out)], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        metrics, deadline = out / "metrics.jsonl", time.time() + 180
        while not (metrics.is_file() and metrics.stat().st_size > 0):  # it is past its start: it holds the lock
            assert first.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.05)
        for mode in ([], ["--overwrite"]):
            line = refuse(["run", *RIDGE, "--steps", "2", "--out", str(out), *mode], capsys)
            assert "is in use: another run holds its lock" in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL
    assert cli.main(["run", *RIDGE, "--steps", "2", "--out", str(out), "--overwrite"]) == 0
    assert [r["step"] for r in rows(out)] == [0, 1]


# ---- a new run into a used folder ------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [None, "config.json", "metrics.jsonl", "checkpoints"])
def test_a_new_run_into_a_folder_holding_a_run_is_refused_and_changes_nothing(used, keep, capsys):
    """The whole run, or a single file of one (also without the .lock file, as an older runner left it)."""
    if keep is not None:
        for entry in list(used.iterdir()):
            if entry.name != keep:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    before = snapshot(used)
    line = refuse(["run", *RIDGE, "--steps", "3", "--seed", "4", "--out", str(used)], capsys)
    assert f"run folder {used} already holds a run" in line
    assert (keep or "config.json") in line
    assert "continue it with --resume" in line and "start over with --overwrite" in line
    if keep in (None, "checkpoints"):
        assert "newest step-00000006" in line
    assert snapshot(used) == before


def test_a_new_run_into_an_existing_empty_folder_or_one_with_other_files_is_allowed(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli.main(["run", *RIDGE, "--steps", "2", "--out", str(out)]) == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "outer.safetensors").is_file()


def test_a_refused_start_removes_the_folders_it_created(tmp_path, capsys, monkeypatch):
    """The run folder is created (to hold the lock) before the problem is built; a build that refuses (here
    a solver asked of a single-level objective) leaves no trace."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "problems_for_tests.failing", "--solver", "cg", "--steps", "2",
                     "--out", str(tmp_path / "a" / "b" / "run")]) == 2
    err = capsys.readouterr().err
    assert "is a single-level objective" in err and "--solver cg would do nothing; drop --solver" in err
    assert list(tmp_path.iterdir()) == []


# ---- --overwrite --------------------------------------------------------------------------------------------------
def test_overwrite_deletes_only_the_previous_runs_files(used, capsys):
    (used / "notes.txt").write_text("my notes")
    (used / "checkpoints" / "README").write_text("mine too")
    (used / "plots").mkdir()
    kept_before = {k: v for k, v in snapshot(used).items() if k.startswith(("notes.txt", "plots", "checkpoints/README"))}
    assert cli.main(["run", *RIDGE, "--steps", "2", "--seed", "7", "--out", str(used), "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "--overwrite: deleted the previous run's config.json" in err
    assert "checkpoints/step-00000006" in err
    assert "kept files it did not write: checkpoints/README, notes.txt, plots/" in err
    after = snapshot(used)
    assert {k: after.get(k) for k in kept_before} == kept_before  # same bytes, same mtime
    assert sorted(p.name for p in (used / "checkpoints").iterdir()) == ["README"]  # no old checkpoint mixed in
    assert json.loads((used / "config.json").read_text())["seed"] == 7
    assert [r["step"] for r in rows(used)] == [0, 1]


def test_overwrite_of_a_folder_without_a_run_just_runs(tmp_path):
    assert cli.main(["run", *RIDGE, "--steps", "1", "--out", str(tmp_path / "run"), "--overwrite"]) == 0
    assert [r["step"] for r in rows(tmp_path / "run")] == [0]


# ---- --resume -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, keys", [
    (["--set", "noise=0.3"], ["config noise: 0.5 → 0.3"]),
    (["--solver", "neumann"], ["solver: 'cg:maxiter=100,rtol=1e-6' → 'neumann'"]),
    (["--seed", "1"], ["seed: 0 → 1"]),
    (["--mixed-precision", "bf16"], ["mixed_precision: 'no' → 'bf16'"]),
    (["--seed", "2", "--set", "features=12", "--set", "inner_lr=0.2", "--solver", "cg:maxiter=7"],
     ["seed: 0 → 2", "config features: 10 → 12", "config inner_lr: 0.0 → 0.2", "solver: "]),
], ids=["config", "solver", "seed", "precision", "several"])
def test_resume_with_other_settings_is_refused_listing_every_key_and_changes_nothing(used, change, keys, capsys):
    before = snapshot(used)
    line = refuse(["run", *RIDGE, "--steps", "12", "--out", str(used), "--resume", *change], capsys)
    assert "step-00000006 was written with other settings" in line
    for key in keys:
        assert key in line
    assert line.count("→") == len(keys)  # every differing key, and only those
    assert "resume with the settings the run was started with" in line and "--overwrite" in line
    assert snapshot(used) == before


def test_a_checkpoint_that_reached_steps_is_refused_with_how_many_steps_it_has(used, capsys):
    before = snapshot(used)
    for steps in ("3", "6"):
        line = refuse(["run", *RIDGE, "--steps", steps, "--out", str(used), "--resume"], capsys)
        assert f"already has 6 steps (checkpoint step-00000006) and --steps {steps} asks for no more" in line
        assert "pass a larger --steps (e.g. --steps 12)" in line
    assert snapshot(used) == before


@pytest.mark.parametrize("first, then", [
    ("cg:maxiter=100", "cg"),                      # the default value spelt out, or left out
    ("cg:rtol=1e-6", None),                        # the problem's DEFAULT_SOLVER cg:maxiter=100,rtol=1e-6
], ids=["defaults", "problem-default"])
def test_equivalent_solver_specs_resume(tmp_path, first, then):
    out = tmp_path / "run"
    assert cli.main(["run", *RIDGE, "--solver", first, "--steps", "2", "--checkpoint-every", "2",
                     "--out", str(out)]) == 0
    again = ["--solver", then] if then else []
    assert cli.main(["run", *RIDGE, *again, "--steps", "3", "--out", str(out), "--resume"]) == 0
    assert [r["step"] for r in rows(out)] == [0, 1, 2]


def test_raising_steps_on_resume_equals_an_uninterrupted_run_bitwise(finished_run, used, tmp_path):
    full = tmp_path / "full"
    assert cli.main(["run", *RIDGE, "--steps", "10", "--out", str(full)]) == 0
    assert cli.main(["run", *RIDGE, "--steps", "10", "--out", str(used), "--resume"]) == 0
    a, b = load_file(str(full / "outer.safetensors")), load_file(str(used / "outer.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    resumed, uninterrupted = rows(used), rows(full)
    assert [r["step"] for r in resumed] == list(range(10))
    assert resumed[:6] == rows(finished_run)  # the first 6 steps were continued from, not run again
    drop = lambda r: {k: v for k, v in r.items() if k != "step_seconds"}  # noqa: E731  (wall time differs)
    assert [drop(r) for r in resumed] == [drop(r) for r in uninterrupted]
    assert json.loads((used / "config.json").read_text())["steps"] == 10


@pytest.mark.parametrize("saved, now, same", [
    ("cg:rtol=1e-7,maxiter=50", "cg:maxiter=50,rtol=1e-07", True),   # option order, spelling of a value
    ("cg:maxiter=100,rtol=1e-6", "cg", True),                        # both values are cg's defaults
    ("cg:maxiter=50", "cg", False),
    ("cg", "neumann", False),
    (None, "cg", False),                                             # a single-level run had no solver
])
def test_solver_specs_compare_up_to_defaults_and_order(saved, now, same):
    settings = rundir.RunSettings(problem="ridge", solver=now, seed=0, processes=1, mixed_precision="no")
    saved_payload = {"problem": "ridge", "solver": saved, "seed": 0, "num_processes": 1, "mixed_precision": "no",
                     "config": {}}
    assert rundir.settings_differences(saved_payload, settings) == ([] if same else [f"solver: {saved!r} → {now!r}"])


def test_settings_the_checkpoint_does_not_record_count_as_different():
    settings = rundir.RunSettings(problem="ridge", solver="cg", seed=0, processes=2, mixed_precision="no",
                                  config={"a": (1, 2)})
    saved = {"problem": "ridge", "solver": "cg:maxiter=100", "seed": 0, "num_processes": 1, "config": {"a": [1, 2]}}
    assert rundir.settings_differences(saved, settings) == ["processes: 1 → 2",
                                                            "mixed_precision: (not recorded) → 'no'"]
    unknown = rundir.RunSettings(problem="ridge", solver=rundir.UNKNOWN, seed=0, processes=1,
                                 mixed_precision="no", config={"a": [1, 2], "b": 3})
    assert rundir.settings_differences({**saved, "num_processes": 1, "mixed_precision": "no"}, unknown) == [
        "config b: (not recorded) → 3"]


def test_two_processes_refuse_a_one_process_checkpoint_and_both_exit_2(used):
    """The main process decides before Accelerate starts and tells the other: neither hangs, both exit 2."""
    before = snapshot(used)
    began = time.time()
    proc = subprocess.run(LAUNCH_2 + ["-m", "bilevel.run.cli", "run", *RIDGE, "--cpu", "--steps", "12",
                                      "--out", str(used), "--resume"],
                          env=env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0 and time.time() - began < 120
    # two processes write to one stderr at once, so their lines may interleave: count the messages, not lines
    assert proc.stderr.count("bilevel run: error: ") == 2, proc.stderr[-3000:]
    assert proc.stderr.count("processes: 1 → 2") == 2, proc.stderr[-3000:]
    assert proc.stderr.count("exitcode  : 2") == 2, proc.stderr[-3000:]  # the launcher's report of each process
    assert snapshot(used) == before
