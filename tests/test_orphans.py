"""No orphans: a worker never outlives its launcher (bilevel/run/lifetime.py).

Two parts:
- ``accelerate launch`` of a 2-process CPU run, the launcher killed by SIGTERM, SIGINT or SIGKILL: every
  worker is gone within 10 s. The three jobs start together (start-up is most of the time on 2 cores).
- the mechanisms one by one, in plain processes that load lifetime.py from its file (no torch import:
  fast): the parent-death signal and its getppid watchdog fallback, the race where the launcher died
  before install(), the clean stop (finally blocks run, one line and no traceback, exit code 128 +
  signal) and the deadline that ends a process whose cleanup hangs.

Processes are found and checked through /proc (Linux), not psutil.
"""
import glob
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from test_runner import LAUNCH_2, env

from bilevel.run import lifetime

LIFETIME_FILE = Path(lifetime.__file__)
SIGNALS = ("SIGTERM", "SIGINT", "SIGKILL")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl: Linux only")


def children(pid: int) -> list[int]:
    found = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            found += [int(p) for p in Path(path).read_text().split()]
        except OSError:
            pass
    return found


def alive(pid: int) -> bool:
    """Running (a zombie has exited: it only waits for its parent to read its status)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_until(condition, timeout: float, poll: float = 0.05) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(poll)
    return condition()


def kill_if_alive(pids) -> None:
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


# ---- accelerate launch: kill the launcher ----------------------------------------------------------------
@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """One 2-process ridge run per signal, started together; outer_lr=0 keeps it running (and finite)."""
    started = {}
    for name in SIGNALS:
        out = tmp_path_factory.mktemp(f"orphans-{name}")
        command = LAUNCH_2 + ["-m", "bilevel.run.cli", "run", "ridge", "--smoke", "--cpu", "--steps", "100000",
                              "--set", "outer_lr=0", "--out", str(out / "run"), "--no-progress"]
        log = open(out / "log.txt", "w")
        started[name] = (subprocess.Popen(command, env=env(), stdout=log, stderr=subprocess.STDOUT), out)
    yield started
    for launcher, out in started.values():
        kill_if_alive([*children(launcher.pid), launcher.pid])
        launcher.wait()


@pytest.mark.parametrize("name", SIGNALS)
def test_workers_exit_when_the_launcher_is_killed(jobs, name):
    launcher, out = jobs[name]
    metrics = out / "run" / "metrics.jsonl"
    # the workers are in the outer loop once they have logged a step (start-up is over)
    ready = wait_until(lambda: len(children(launcher.pid)) == 2 and metrics.exists() and metrics.stat().st_size > 0,
                       timeout=180, poll=0.2)
    assert ready, f"the job did not start: {(out / 'log.txt').read_text()[-3000:]}"
    workers = children(launcher.pid)
    try:
        launcher.send_signal(getattr(signal, name))
        assert wait_until(lambda: not any(alive(p) for p in workers), timeout=10), (
            f"after {name} to the launcher, workers {[p for p in workers if alive(p)]} still run: "
            f"{(out / 'log.txt').read_text()[-3000:]}")
    finally:
        kill_if_alive(workers)


# ---- the mechanisms, in plain processes -------------------------------------------------------------------
def load_lifetime() -> str:
    """Python source that loads lifetime.py from its file as module ``lifetime`` (no torch import)."""
    return textwrap.dedent(f"""
        import importlib.util, os, sys, time
        spec = importlib.util.spec_from_file_location("lifetime", {str(LIFETIME_FILE)!r})
        lifetime = sys.modules["lifetime"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(lifetime)
    """)


def start_child_under_parent(tmp_path: Path, child_body: str, parent_waits_for: str = "ready"):
    """Test → parent (plain python) → child. The child runs ``child_body`` after loading lifetime and writes
    its pid to ``pid``; the parent waits for the file ``parent_waits_for`` and then sleeps (or exits)."""
    child = tmp_path / "child.py"
    child.write_text(load_lifetime() + textwrap.dedent(f"""
        open({str(tmp_path / 'pid')!r}, "w").write(str(os.getpid()))
    """) + textwrap.dedent(child_body))
    parent = textwrap.dedent(f"""
        import os, subprocess, sys, time
        subprocess.Popen([sys.executable, {str(child)!r}], stderr=open({str(tmp_path / 'child.err')!r}, "w"))
        while not os.path.exists({str(tmp_path / parent_waits_for)!r}):
            time.sleep(0.02)
        time.sleep(float(sys.argv[1]))
    """)
    return parent


@pytest.mark.parametrize("mechanism", ["prctl", "watchdog"])
def test_a_child_exits_when_its_parent_is_killed(tmp_path, mechanism):
    parent = start_child_under_parent(tmp_path, f"""
        lifetime.install(force=True, mechanism={mechanism!r})
        try:
            open({str(tmp_path / 'ready')!r}, "w").close()
            while True:
                time.sleep(0.05)
        finally:
            open({str(tmp_path / 'unwound')!r}, "w").close()
    """)
    proc = subprocess.Popen([sys.executable, "-c", parent, "600"])
    try:
        assert wait_until(lambda: (tmp_path / "ready").exists(), timeout=60), "the child did not start"
        child = int((tmp_path / "pid").read_text())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # prctl: the kernel signals at once; the watchdog polls getppid every second
        assert wait_until(lambda: not alive(child), timeout=5), f"the child outlived its parent ({mechanism})"
        assert (tmp_path / "unwound").exists(), "SIGTERM must unwind the child (its finally block did not run)"
        assert "received SIGTERM (the launcher has ended); stopping" in (tmp_path / "child.err").read_text()
    finally:
        kill_if_alive([int((tmp_path / "pid").read_text())] if (tmp_path / "pid").exists() else [])


def test_a_child_whose_launcher_died_before_install_stops_at_install(tmp_path):
    """The race prctl alone misses: the parent is gone before the parent-death signal is set."""
    parent = start_child_under_parent(tmp_path, f"""
        open({str(tmp_path / 'imported')!r}, "w").close()
        while os.getppid() == lifetime.PARENT_AT_IMPORT:   # wait for the parent to die
            time.sleep(0.02)
        lifetime.install(force=True)
        open({str(tmp_path / 'survived')!r}, "w").close()
        time.sleep(600)
    """, parent_waits_for="imported")
    subprocess.run([sys.executable, "-c", parent, "0"], timeout=60)  # exits as soon as the child is imported
    child = int((tmp_path / "pid").read_text())
    try:
        assert wait_until(lambda: not alive(child), timeout=10), "the child outlived its parent"
        assert not (tmp_path / "survived").exists()
        assert "ended before this worker started; stopping" in (tmp_path / "child.err").read_text()
    finally:
        kill_if_alive([child])


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_stop_signal_unwinds_and_exits_with_128_plus_the_signal(tmp_path, name, code):
    script = load_lifetime() + textwrap.dedent(f"""
        lifetime.install(force=True)
        try:
            print("ready", flush=True)  # inside the try: the signal may come as soon as the test reads it
            time.sleep(600)
        finally:
            open({str(tmp_path / 'unwound')!r}, "w").close()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    began = time.time()
    proc.send_signal(getattr(signal, name))
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert (tmp_path / "unwound").exists()
    assert time.time() - began < 5
    assert f"received {name} (from the launcher, which is stopping the workers); stopping" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_the_deadline_ends_a_process_whose_cleanup_hangs(tmp_path, name, code):
    script = load_lifetime() + textwrap.dedent("""
        lifetime.install(force=True, grace=1.0)
        try:
            print("ready", flush=True)  # inside the try: the signal may come as soon as the test reads it
            time.sleep(600)
        finally:
            while True:          # a cleanup that never ends
                time.sleep(0.05)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    began = time.time()
    proc.send_signal(getattr(signal, name))
    _, err = proc.communicate(timeout=30)
    elapsed = time.time() - began
    assert proc.returncode == code, err
    assert f"still running 1 s after {name}; exiting now" in err
    assert 0.9 < elapsed < 6, elapsed


def test_install_outside_a_launcher_changes_nothing(monkeypatch):
    for name in lifetime.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    before = {s: signal.getsignal(s) for s in lifetime.STOP_SIGNALS}
    assert not lifetime.launched_by_a_launcher()
    assert lifetime.install() is None
    assert {s: signal.getsignal(s) for s in lifetime.STOP_SIGNALS} == before


@pytest.mark.parametrize("variables, expected", [
    ({"LOCAL_RANK": "0", "WORLD_SIZE": "2"}, True),             # torchrun / accelerate launch --multi_gpu
    ({"TORCHELASTIC_RUN_ID": "none"}, True),
    ({"ACCELERATE_DYNAMO_MODE": "default"}, True),              # accelerate launch, one process
    ({"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}, False),  # a user's own settings
    ({}, False),
])
def test_launcher_detection(variables, expected):
    assert lifetime.launched_by_a_launcher(variables) is expected


@pytest.mark.parametrize("kwargs, message", [
    ({"grace": 0}, "grace must be a positive number of seconds"),
    ({"mechanism": "poll"}, "mechanism must be 'prctl', 'watchdog' or None"),
])
def test_bad_install_options_are_refused_before_anything_changes(kwargs, message):
    before = {s: signal.getsignal(s) for s in lifetime.STOP_SIGNALS}
    with pytest.raises(ValueError, match=message):
        lifetime.install(force=True, **kwargs)
    assert {s: signal.getsignal(s) for s in lifetime.STOP_SIGNALS} == before
