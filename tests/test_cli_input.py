"""Bad command-line input: checked before any work, one line ``bilevel <cmd>: error: <what>; <fix>``, exit 2,
no traceback and nothing created on disk; ``--debug`` shows the traceback instead.

Each case runs ``bilevel.run.cli.main`` in this process from an empty working folder, and checks that the
folder (every file, its bytes and mtime) is the same afterwards.
"""
import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bilevel.errors import SpecError
from bilevel.run import cli, rundir

from processes import snapshot  # noqa: E402

TESTS = Path(__file__).parent
RUN = ["run", "ridge", "--smoke", "--no-progress"]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty working folder holding the files some cases point at."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "bad.toml").write_text("features = [\n")
    (tmp_path / "nested.toml").write_text("[ridge]\nfeatures = 3\n")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "settings.yaml").write_text("features: 3\n")
    (tmp_path / "date.toml").write_text("features = 1979-05-27\n")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "a_folder.toml").mkdir()
    return tmp_path


def refuse(argv, capsys, command="run") -> str:
    """``bilevel argv`` exits 2 with exactly one error line (no traceback, nothing on stdout)."""
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bilevel {command}: error: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return lines[0]


# (arguments after `bilevel run ridge --smoke`, what the error must say: the problem, then the fix)
BAD_RUN_ARGUMENTS = {
    "steps-zero": (["--steps", "0", "--out", "o"], ["--steps 0", "at least one outer step", "--steps N with N >= 1"]),
    "steps-negative": (["--steps", "-1", "--out", "o"], ["--steps -1", "--steps N with N >= 1"]),
    "checkpoint-every-negative": (["--steps", "2", "--checkpoint-every", "-1", "--out", "o"],
                                  ["--checkpoint-every -1", "--checkpoint-every K with K >= 0"]),
    "threads-negative": (["--steps", "2", "--threads", "-2", "--out", "o"],
                         ["--threads -2", "--threads N with N >= 0"]),
    "seed-negative": (["--steps", "2", "--seed", "-1", "--out", "o"], ["--seed -1", "--seed N with N >= 0"]),
    "seed-too-large": (["--steps", "2", "--seed", str(2 ** 32), "--out", "o"], ["--seed 4294967296", "[0, 2**32 - 1]"]),
    "set-without-equals": (["--steps", "2", "--set", "features", "--out", "o"],
                           ["--set 'features' has no '='", "write --set KEY=VALUE"]),
    "set-empty-key": (["--steps", "2", "--set", "=3", "--out", "o"],
                      ["--set '=3' has an empty key", "write --set KEY=VALUE"]),
    "set-blank-key": (["--steps", "2", "--set", "  =3", "--out", "o"], ["has an empty key", "write --set KEY=VALUE"]),
    "set-unknown-key": (["--steps", "2", "--set", "featurez=3", "--out", "o"],
                        ["unknown config key 'featurez'", "valid keys: features"]),
    "config-missing": (["--steps", "2", "--config", "missing.toml", "--out", "o"],
                       ["--config missing.toml: the file does not exist", "pass the path of a .toml or .json"]),
    "config-folder": (["--steps", "2", "--config", "a_folder.toml", "--out", "o"],
                      ["--config a_folder.toml is a folder, not a file", "pass the path of a .toml or .json"]),
    "config-wrong-type": (["--steps", "2", "--config", "settings.yaml", "--out", "o"],
                          [".yaml is not a settings format", "write the settings as a .toml or .json file"]),
    "config-bad-toml": (["--steps", "2", "--config", "bad.toml", "--out", "o"],
                        ["--config bad.toml is not valid TOML", "fix the file"]),
    "config-bad-encoding": (["--steps", "2", "--config", "binary.json", "--out", "o"],
                            ["--config binary.json is not valid JSON", "fix the file"]),
    "config-nested": (["--steps", "2", "--config", "nested.toml", "--out", "o"],
                      ["must hold one flat table", "move every setting to the top level"]),
    "config-not-a-table": (["--steps", "2", "--config", "list.json", "--out", "o"],
                           ["must hold one flat table", "not a list"]),
    "config-value-type": (["--steps", "2", "--config", "date.toml", "--out", "o"],
                          ["config key 'features' expects an int, got datetime.date(1979, 5, 27)"]),
    "out-is-a-file": (["--steps", "2", "--out", "a_file"],
                      ["--out a_file is an existing file, not a folder", "pass a folder path"]),
    "out-inside-a-file": (["--steps", "2", "--out", "a_file/run"],
                          ["--out a_file/run is inside", "a_file, which is a file", "pass a folder path"]),
    "out-empty": (["--steps", "2", "--out", ""], ["--out is empty", "e.g. --out runs/ridge"]),
    "resume-and-overwrite": (["--steps", "2", "--out", "o", "--resume", "--overwrite"],
                             ["--resume and --overwrite contradict each other", "pass only one of them"]),
    "resume-missing-folder": (["--steps", "2", "--out", "o", "--resume"],
                              ["run folder o does not exist", "drop --resume to start a new run there"]),
    "solver-unknown-option": (["--steps", "2", "--solver", "cg:maxiters=3", "--out", "o"],
                              ["'maxiters'", "valid options: ", "maxiter: int = 100"]),
    "solver-unknown-name": (["--steps", "2", "--solver", "cgg", "--out", "o"],
                            ["unknown solver 'cgg'", "registered solvers: cg, neumann"]),
    "problem-unknown": (None, ["unknown problem 'nosuchproblem'", "registered problems", "ridge"]),
}


@pytest.mark.parametrize("case", list(BAD_RUN_ARGUMENTS))
def test_bad_run_argument_is_one_line_naming_problem_and_fix_and_creates_nothing(case, workdir, capsys):
    args, expected = BAD_RUN_ARGUMENTS[case]
    argv = ["run", "nosuchproblem", "--steps", "2", "--out", "o"] if args is None else RUN + args
    before = snapshot(workdir)
    line = refuse(argv, capsys)
    for text in expected:
        assert text in line, (text, line)
    assert snapshot(workdir) == before


@pytest.mark.parametrize("tracker, package", [("wandb", "wandb"), ("mlflow", "mlflow"), ("tensorboard", "tensorboard")])
def test_a_tracker_whose_package_is_missing_is_refused_with_the_install_command(tracker, package, workdir, capsys,
                                                                              monkeypatch):
    """accelerate silently drops an unavailable tracker; the runner refuses it. The package is made missing
    for the test (find_spec None) so that the case holds whatever is installed here."""
    real = importlib.util.find_spec
    modules = rundir.TRACKER_PACKAGES[tracker][0]
    monkeypatch.setattr(rundir.importlib.util, "find_spec", lambda name, *a: None if name in modules else real(name, *a))
    before = snapshot(workdir)
    line = refuse(RUN + ["--steps", "2", "--out", "o", "--log-with", tracker], capsys)
    assert f"--log-with {tracker}: the {package} package is not installed" in line
    assert f"pip install {package}, or drop --log-with {tracker}" in line
    assert snapshot(workdir) == before


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_log_with_wandb_without_wandb_installed_is_refused(workdir, capsys):
    line = refuse(RUN + ["--steps", "2", "--out", "o", "--log-with", "wandb"], capsys)
    assert "pip install wandb" in line


def test_an_unwritable_out_is_refused_before_any_work(workdir, capsys, monkeypatch):
    """os.access is asked of the nearest existing parent (faked here: the tests may run as root, for whom
    every folder is writable; the real permission case follows)."""
    (workdir / "locked").mkdir()
    real = os.access
    monkeypatch.setattr(rundir.os, "access", lambda p, mode, **kw: False if Path(p).name == "locked" else real(p, mode, **kw))
    before = snapshot(workdir)
    line = refuse(RUN + ["--steps", "2", "--out", "locked/deeper/run"], capsys)
    assert "--out locked/deeper/run: its parent" in line and "locked is not writable by this user" in line
    assert "pass a folder you can write to" in line
    line = refuse(RUN + ["--steps", "2", "--out", "locked"], capsys)
    assert "--out locked: the folder itself is not writable" in line
    assert snapshot(workdir) == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_parent_and_an_unreadable_config_are_refused(workdir, capsys):
    (workdir / "ro").mkdir()
    (workdir / "secret.toml").write_text("features = 3\n")
    os.chmod(workdir / "ro", 0o555)
    os.chmod(workdir / "secret.toml", 0o000)
    try:
        assert "is not writable by this user" in refuse(RUN + ["--steps", "2", "--out", "ro/run"], capsys)
        assert "secret.toml is not readable" in refuse(RUN + ["--steps", "2", "--config", "secret.toml",
                                                              "--out", "o"], capsys)
    finally:
        os.chmod(workdir / "ro", 0o755)
        os.chmod(workdir / "secret.toml", 0o644)


def test_an_unreadable_config_is_refused(workdir, capsys, monkeypatch):
    (workdir / "secret.toml").write_text("features = 3\n")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p).endswith("secret.toml") else real(p, mode, **kw))
    line = refuse(RUN + ["--steps", "2", "--config", "secret.toml", "--out", "o"], capsys)
    assert "--config secret.toml is not readable by this user; fix its permissions or pass another file" in line


@pytest.mark.parametrize("argv, expected", [
    (["check", "ridge", "--smoke", "--threads", "-1"], "--threads -1"),
    (["check", "ridge", "--smoke", "--seed", "-3"], "--seed -3"),
    (["check", "ridge", "--smoke", "--set", "noise"], "--set 'noise' has no '='"),
    (["check", "ridge", "--smoke", "--config", "missing.toml"], "--config missing.toml: the file does not exist"),
])
def test_check_shares_the_argument_checks(argv, expected, workdir, capsys):
    assert expected in refuse(argv, capsys, command="check")


@pytest.mark.parametrize("argv, message", [
    (RUN + ["--steps", "abc", "--out", "o"], "bilevel run: error: argument --steps: invalid int value: 'abc' "
                                             "(see bilevel run --help)"),
    (RUN + ["--out", "o"], "bilevel run: error: the following arguments are required: --steps (see bilevel run --help)"),
    (RUN + ["--steps", "1", "--out", "o", "--log-with", "neptune"],
     "bilevel run: error: argument --log-with: invalid choice: 'neptune' (choose from "),  # quoting varies by Python
])
def test_argparse_usage_errors_are_one_line_and_exit_2(argv, message, workdir, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.endswith("(see bilevel run --help)\n") and err.count("\n") == 1
    assert list(workdir.glob("o")) == []


def test_debug_reraises_with_the_traceback(workdir, capsys):
    with pytest.raises(rundir.RunArgumentError, match=r"--steps 0: a run needs at least one outer step"):
        cli.main(["--debug", *RUN, "--steps", "0", "--out", "o"])
    with pytest.raises(SpecError, match="has no '='"):
        cli.main([*RUN, "--steps", "1", "--set", "x", "--out", "o", "--debug"])  # after the command too
    proc = subprocess.run([sys.executable, "-m", "bilevel.run.cli", "--debug", *RUN, "--steps", "0", "--out", "o"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1  # an uncaught exception
    assert "Traceback (most recent call last)" in proc.stderr and "RunArgumentError: --steps 0" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "bilevel.run.cli", *RUN, "--steps", "0", "--out", "o"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "bilevel run: error: --steps 0: a run needs at least one outer step; pass --steps N with N >= 1"]


def test_an_unexpected_error_is_one_line_exit_1_and_debug_shows_it(workdir, capsys, monkeypatch):
    """A RuntimeError inside the run (the test problem fails at step 0): not bad input, so exit 1."""
    monkeypatch.syspath_prepend(str(TESTS))
    argv = ["run", "problems_for_tests.failing", "--set", "fail_process=0", "--set", "fail_step=0", "--steps", "2",
            "--no-progress", "--out", "f"]
    assert cli.main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("bilevel run: error: RuntimeError: deliberate failure on process 0 at step 0")
    assert "rerun with --debug to see the traceback" in lines[0]
    with pytest.raises(RuntimeError, match="deliberate failure"):
        cli.main(["--debug", *argv[:-1], "f2"])


def test_a_problem_file_path_is_loaded_and_a_bad_one_refused(workdir, capsys):
    """``bilevel run path/to/file.py``: the file is the problem; a missing file or one that lacks the problem
    names is one line, exit 2, nothing created."""
    from bilevel.run.problems import load_problem
    (workdir / "mine.py").write_text("from bilevel.problems.ridge import Config, SMOKE, build, DEFAULT_SOLVER\n")
    (workdir / "half.py").write_text("Config = SMOKE = None\n")
    assert load_problem(str(workdir / "mine.py")).DEFAULT_SOLVER == "cg:maxiter=100,rtol=1e-6"
    before = snapshot(workdir)
    line = refuse(["run", "missing.py", "--steps", "1", "--out", "o"], capsys)
    assert "problem file 'missing.py' does not exist" in line and "defines Config, SMOKE, build" in line
    line = refuse(["run", "half.py", "--steps", "1", "--out", "o"], capsys)
    assert "is not a problem file: it lacks build" in line
    assert snapshot(workdir) == before
