"""Mutation testing of one core module with mutmut, outside CI (see docs/mutation.md).

    python mutation/run.py linsolve                  # full run of one module (mutmut, 2 workers, nice 10)
    python mutation/run.py linsolve --rerun-survivors  # after adding tests: rerun only the surviving mutants
    python mutation/run.py linsolve --report         # print the score from the last run, no testing
    python mutation/run.py linsolve --show NAME      # the diff of one mutant

Each module has a config ``mutation/<module>.toml``: the files to mutate, the fast test subset that runs
against every mutant (mutmut runs only the tests that reach the mutated function), and the list of
equivalent mutants (each with why it cannot change behaviour), which the score leaves out.

The run happens in a scratch copy (``--workdir``, default ``/tmp/bilevel-mutation/<module>``) so that
neither the checkout nor the other people working in it ever see a mutated file. In the copy, ``problems/``
is placed at ``bilevel/problems/`` (where the editable install maps ``bilevel.problems``), so that the
mutated problem files are the ones the tests import.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Lines that hold nothing but the text of an error or warning message (a string literal continuing a message,
# possibly closing the call). Their mutants only reword a message: the tests check a message's substance
# (what is wrong and the fix), not its wording, so these are left out; every condition that decides WHETHER
# to raise or warn, and every value computed, is still mutated.
MESSAGE_LINES = [r'^\s*[rfRF]{0,2}"[^"]*"\)*[,;]?\s*(#.*)?$']
TIMEOUT_MULTIPLIER = 4.0  # wall-clock limit per mutant: 4 x (its tests' unloaded time + 20 s); see prepare()
TIMEOUT_CONSTANT = 20.0
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          36: "timeout", 37: "type check", None: "not checked", -24: "timeout", 24: "timeout"}


def load_config(module: str) -> dict:
    path = REPO / "mutation" / f"{module}.toml"
    if not path.exists():
        known = sorted(p.stem for p in (REPO / "mutation").glob("*.toml"))
        sys.exit(f"no mutation config {path}; known modules: {', '.join(known)}")
    return tomllib.loads(path.read_text())


def in_copy(path: str) -> str:
    """A repository path as it lies in the scratch copy (problems/ moves under bilevel/)."""
    return "bilevel/" + path if path.startswith("problems/") else path


def prepare(cfg: dict, work: Path, baseline: bool = False) -> None:
    """(Re)build the scratch copy's sources, tests and mutmut config; keeps mutmut's results in mutants/.

    ``baseline``: leave out the tests written against this tool's survivors (``tests/test_exact_*.py``), to
    measure what the rest of the subset kills on its own.
    """
    work.mkdir(parents=True, exist_ok=True)
    patterns = ["__pycache__", "*.pyc", ".pytest_cache"] + (["test_exact_*.py"] if baseline else [])
    ignore = shutil.ignore_patterns(*patterns)
    for src, dst in (("bilevel", "bilevel"), ("problems", "bilevel/problems"), ("tests", "tests")):
        shutil.copytree(REPO / src, work / dst, ignore=ignore, dirs_exist_ok=True)
    if baseline:
        # An empty stand-in keeps the test selection identical between the baseline and the later runs: mutmut
        # throws away every result when its selection changes, but only adds the new tests' coverage when
        # new tests appear in a file it already selects.
        for test in cfg["tests"]:
            if Path(test).name.startswith("test_exact_"):
                (work / test).write_text('"""Left out of the baseline run (mutation/run.py --baseline)."""\n')
    # The tests of the scratch copy are synced into mutants/ by mutmut itself (also_copy of tests/).
    settings = {
        "source_paths": ["bilevel"],
        "only_mutate": [in_copy(f) for f in cfg["files"]],
        # a test file not written yet is left out (the first run measures the tests that exist)
        "pytest_add_cli_args_test_selection": [t for t in cfg["tests"] if (work / t).exists()],
        # ``deselect`` (optional, in the module's toml): tests of the subset that fail on the unmutated code
        # because of work in progress elsewhere (mutmut needs a green subset to start), or that cost a compile
        # or a subprocess per mutant; a deselected test kills nothing (the score says so by being lower, never
        # higher).
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "-x", "-q"]
        + [arg for test in cfg.get("deselect", []) for arg in ("--deselect", test)],
        # A mutant that loops (e.g. a solver that never stops) is stopped and counted as killed (timeout). With
        # process_isolation = "forkserver" mutmut stops a mutant after a WALL-clock time of
        # multiplier x (its tests' time + constant), where "its tests' time" was measured once, unloaded, in the
        # stats pass (the CPU limit is twice that and never binds first). On the shared 2-core machine niced
        # workers run 3-8x slower than in the stats pass, so the former 1 x (time + 10 s) stopped slow but
        # surviving mutants and counted them as killed. 4 x (time + 20 s) leaves room for that slowdown while a
        # mutant that really loops still costs minutes, not mutmut's default half hour.
        "timeout_multiplier": TIMEOUT_MULTIPLIER,
        "timeout_constant": TIMEOUT_CONSTANT,
        "process_isolation": "forkserver",  # torch is not fork-safe once the tests have run in a process
        "use_git_change_detection": False,
        "do_not_mutate_patterns": MESSAGE_LINES,
    }
    lines = ["", "[tool.mutmut]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    (work / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text() + "\n".join(lines) + "\n")


def results(work: Path) -> dict[str, str]:
    """``{mutant name: status}`` from mutmut's result files in ``mutants/``."""
    out = {}
    for meta in (work / "mutants").rglob("*.meta"):
        for name, code in json.loads(meta.read_text()).get("exit_code_by_key", {}).items():
            out[name] = STATUS.get(code, f"exit {code}")
    return out


def report(cfg: dict, work: Path) -> dict:
    res = results(work)
    equivalent = {e["name"]: e["why"] for e in cfg.get("equivalent", [])}
    stale = [n for n in equivalent if res.get(n) != "survived"]
    counts: dict[str, int] = {}
    for status in res.values():
        counts[status] = counts.get(status, 0) + 1
    survivors = sorted(n for n, s in res.items() if s == "survived" and n not in equivalent)
    non_equivalent = len(res) - len(equivalent) + len(stale)
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    score = killed / non_equivalent if non_equivalent else float("nan")
    checked = non_equivalent - counts.get("not checked", 0)  # a partial run: the score of what it reached
    summary = {"total": len(res), **counts, "equivalent": len(equivalent) - len(stale),
               "score": round(score, 4), "score_of_checked": round(killed / checked, 4) if checked else None,
               "survivors": survivors, "stale_equivalent": stale}
    print(json.dumps(summary, indent=1))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("module")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bilevel-mutation"))
    parser.add_argument("--max-children", type=int, default=2)
    parser.add_argument("--fresh", action="store_true", help="delete the scratch copy first")
    parser.add_argument("--baseline", action="store_true",
                        help="run without tests/test_exact_*.py (the 'killed before' column of docs/mutation.md)")
    parser.add_argument("--rerun-survivors", action="store_true")
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--show", metavar="MUTANT")
    args = parser.parse_args()
    cfg = load_config(args.module)
    work = args.workdir / args.module
    mutmut = [sys.executable, "-m", "mutmut"]
    if args.report:
        report(cfg, work)
        return
    if args.show:
        subprocess.run(mutmut + ["show", args.show], cwd=work, check=True)
        return
    if args.fresh and work.exists():
        shutil.rmtree(work)
    prepare(cfg, work, baseline=args.baseline)
    names = []
    if args.rerun_survivors:
        names = [n for n, s in results(work).items() if s in ("survived", "no tests")]
        if not names:
            report(cfg, work)
            return
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = ["nice", "-n", "10"] + mutmut + ["run", "--max-children", str(args.max_children)] + names
    for _ in range(2):
        # When the subset holds tests mutmut has not seen, it re-collects its stats ("Found N new tests,
        # rerunning stats collection") and can stop there without testing a mutant; the next run then tests.
        if not _run_streaming(cmd, work, env):
            break
    report(cfg, work)


def _run_streaming(cmd: list[str], work: Path, env: dict) -> bool:
    """Run mutmut with its output passed through; True when it only re-collected stats (run it again)."""
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        sys.stdout.write(line)
        seen.append(line)
    proc.wait()
    text = "".join(seen)
    return "rerunning stats collection" in text and "Running mutation testing" not in text.split(
        "rerunning stats collection", 1)[1]


if __name__ == "__main__":
    main()
