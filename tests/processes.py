"""Helpers shared by the tests that launch `bilevel` as a process and check what it left on disk."""
import hashlib
import os
import sys
from pathlib import Path

TESTS = Path(__file__).parent
# 2 CPU processes under accelerate (the combination that gives gloo here, see ENVIRONMENT.md)
LAUNCH_2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", "0"]


def env():
    """The environment of a launched test process: one thread, offline, the tests' helper problems importable."""
    e = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    e["PYTHONPATH"] = os.pathsep.join([str(TESTS), e.get("PYTHONPATH", "")])
    return e


def snapshot(folder: Path) -> dict:
    """Every file (relative path -> sha256 of its bytes, mtime in ns) and every sub-folder under ``folder``."""
    state = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            state[os.path.relpath(os.path.join(root, name), folder) + "/"] = "dir"
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                state[os.path.relpath(path, folder)] = (hashlib.sha256(fh.read()).hexdigest(),
                                                        os.stat(path).st_mtime_ns)
    return state
