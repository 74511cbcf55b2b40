"""The README runs as written: every fenced ``bash`` and ``python`` block, command by command.

Each bash line runs with ``bash -c`` in one scratch folder shared by the whole README (so a ``--resume``
line continues the run a line above started), with ``examples/`` linked in and this environment's
``bilevel``, ``python`` and ``accelerate`` first on PATH. Python blocks run as scripts there.

Two rules are built in, because the test runs *inside* the environment the README's setup builds:
- setup steps of an ``&&`` chain (``python3 -m venv``, ``. .venv/bin/activate``, ``pip install``) are not
  rerun; ``.ci/run`` runs them verbatim on a clean clone;
- the test command (``python -m pytest``) is not run from inside the tests.

Everything else is shortened or skipped only by a marker in the README, an HTML comment (invisible when
rendered) on the line before the block's fence:

    <!-- readme-test: replace "--steps 4" "--steps 1" -->      run the block's lines with that text replaced
    <!-- readme-test: skip-line "num_processes 8" needs 8 GPUs -->   do not run lines containing the text
    <!-- readme-test: exit 2 "run erm" -->                      lines containing the text must exit with 2

Inline code in the prose (option names, benchmark commands, which have their own smoke test) is not run.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SETUP = ("python3 -m venv", ". .venv/bin/activate", "pip install")
MARKER = re.compile(r"<!--\s*readme-test:\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass
class Markers:
    replace: list[tuple[str, str]] = field(default_factory=list)
    skip: list[tuple[str, str]] = field(default_factory=list)
    exit: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class Command:
    block: int          # index of the fenced block in the README
    line: int           # README line number (1-based) of the command
    language: str       # "bash" or "python"
    text: str           # what runs (after the built-in rules and the markers)
    expected_exit: int = 0
    skipped: str = ""   # why it does not run, or "" when it runs


def parse_marker(text: str, markers: Markers, where: int) -> None:
    words = shlex.split(text)
    if words[:1] == ["replace"] and len(words) == 3:
        markers.replace.append((words[1], words[2]))
    elif words[:1] == ["skip-line"] and len(words) >= 3:
        markers.skip.append((words[1], " ".join(words[2:])))
    elif words[:1] == ["exit"] and len(words) == 3 and words[1].isdigit():
        markers.exit.append((words[2], int(words[1])))
    else:
        raise ValueError(f"README.md line {where}: unknown readme-test marker {text!r} (see tests/test_readme.py)")


def bash_command(line: str) -> tuple[str, str]:
    """The line without its setup steps, and why it is skipped ("" when it runs)."""
    parts = [p.strip() for p in line.split(" && ")]
    kept = [p for p in parts if not p.startswith(SETUP)]
    command = " && ".join(kept)
    if not kept:
        return line, "setup only (.ci/run runs it on a clean clone)"
    if command.startswith(("python -m pytest", "pytest")):
        return command, "the test command itself (.ci/run runs it)"
    return command, ""


def collect(text: str) -> tuple[list[Command], int]:
    """Every command of every fenced bash/python block, and the number of such blocks."""
    commands, blocks, markers = [], 0, Markers()
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        marker = MARKER.fullmatch(lines[i].strip())
        if marker:
            parse_marker(marker.group(1), markers, i + 1)
            i += 1
            continue
        fence = FENCE.match(lines[i])
        if not fence:
            if lines[i].strip():
                markers = Markers()  # a marker applies to the block right after it only
            i += 1
            continue
        language, start = fence.group(1), i + 1
        end = next(j for j in range(start, len(lines)) if lines[j].startswith("```"))
        body = lines[start:end]
        if language in ("bash", "python"):
            blocks += 1
            if language == "python":
                source = "\n".join(body)
                for old, new in markers.replace:
                    source = source.replace(old, new)
                commands.append(Command(blocks - 1, start + 1, "python", source))
            for k, raw in enumerate(body if language == "bash" else ()):
                if not raw.strip() or raw.lstrip().startswith("#"):
                    continue
                command, skipped = bash_command(raw)
                for old, new in markers.replace:
                    command = command.replace(old, new)
                skipped = skipped or next((why for text_, why in markers.skip if text_ in raw), "")
                code = next((c for text_, c in markers.exit if text_ in raw), 0)
                commands.append(Command(blocks - 1, start + 1 + k, "bash", command, code, skipped))
        markers = Markers()
        i = end + 1
    return commands, blocks


COMMANDS, BLOCKS = collect(README.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("readme")
    (folder / "examples").symlink_to(ROOT / "examples")
    return folder


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


@pytest.mark.parametrize("command", COMMANDS, ids=[f"line{c.line}" for c in COMMANDS])
def test_readme_command_runs_as_written(command: Command, workdir: Path):
    if command.skipped:
        pytest.skip(command.skipped)
    if command.language == "python":
        script = workdir / f"readme_block_{command.block}.py"
        script.write_text(command.text, encoding="utf-8")
        argv = [sys.executable, str(script)]
    else:
        argv = ["bash", "-c", command.text]
    proc = subprocess.run(argv, cwd=workdir, env=environment(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == command.expected_exit, (
        f"README.md line {command.line}: {command.text!r} exited {proc.returncode}, expected "
        f"{command.expected_exit}\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}")
    if command.expected_exit:  # a refusal: one line naming the problem, no traceback
        assert "Traceback" not in proc.stderr and proc.stderr.strip().startswith("bilevel run: error:")


def test_every_block_is_accounted_for():
    """Every fenced bash/python block yields commands; a skip always has a reason; the parser sees the blocks
    the README has (a block the parser missed would silently never run)."""
    text = README.read_text(encoding="utf-8")
    fenced = re.findall(r"^```(bash|python)\s*$", text, flags=re.M)
    assert BLOCKS == len(fenced) and {c.block for c in COMMANDS} == set(range(BLOCKS))
    run = [c for c in COMMANDS if not c.skipped]
    print(f"README: {BLOCKS} blocks, {len(COMMANDS)} commands, {len(run)} run, "
          f"{len(COMMANDS) - len(run)} skipped: " + "; ".join(f"line {c.line}: {c.skipped}" for c in COMMANDS if c.skipped))
    assert len(run) >= 10


def test_markers_are_parsed_and_checked():
    commands, blocks = collect('<!-- readme-test: replace "--steps 4" "--steps 1" -->\n```bash\n'
                               'python3 -m venv .venv && pip install -e . && bilevel run x --steps 4\n'
                               'python -m pytest -q\n```\n\n<!-- readme-test: exit 2 "run y" -->\n'
                               '<!-- readme-test: skip-line "gpu" needs GPUs -->\n```bash\nbilevel run y\n'
                               'run gpu\n```\n```text\nnot run\n```\n')
    assert blocks == 2
    assert [(c.text, c.expected_exit, c.skipped) for c in commands] == [
        ("bilevel run x --steps 1", 0, ""), ("python -m pytest -q", 0, "the test command itself (.ci/run runs it)"),
        ("bilevel run y", 2, ""), ("run gpu", 0, "needs GPUs")]
    with pytest.raises(ValueError, match="line 1: unknown readme-test marker 'frobnicate'"):
        collect("<!-- readme-test: frobnicate -->\n```bash\nx\n```\n")
