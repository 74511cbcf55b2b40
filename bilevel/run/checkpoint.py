"""Atomic, pickle-free checkpoints: a kill at any moment leaves the newest complete checkpoint readable, and
loading a checkpoint never executes code.

Format (version 2). A checkpoint is a directory ``<run>/checkpoints/step-XXXXXXXX/`` holding

* ``tensors.safetensors`` and ``state.json``: the payload, stored by :mod:`bilevel.run.serialize` (every
  tensor in safetensors, the rest as JSON; only allowlisted classes can be rebuilt);
* ``manifest.json``: ``{"format": "bilevel-checkpoint", "version": 2, "step": N, "files": {name:
  {"bytes": size, "sha256": digest}}}``, checked on load so that a truncated or altered file is an error
  rather than a silently different state.

Writing: the files go into a temporary directory ``.step-XXXXXXXX.<pid>.tmp`` next to the final one, each is
fsync'ed, then the temporary directory, which is then renamed onto the final name with ``os.replace``
(atomic on POSIX when the target does not exist), and the ``checkpoints`` folder is fsync'ed. A kill leaves at
worst a stray ``.step-*.tmp`` directory, which list/latest ignore and the next save deletes. Only the newest
``keep`` checkpoints up to the one just written are kept (higher-numbered ones, from an earlier run into the
same folder, are left alone).

A checkpoint ``step-s`` holds the params that outer step ``s`` evaluates; it is written before any guard
has seen them. When step ``s`` trips a guard (non-finite or diverging), the runner renames that checkpoint
to ``step-XXXXXXXX.tripped`` (:func:`set_aside_tripped`): it is kept for inspection but never listed,
loaded or resumed, so the newest listed checkpoint is always one that passed the guard.

Version 1 checkpoints (``step-XXXXXXXX.pt``, one ``torch.save`` pickle) are never loaded: unpickling a file
can execute arbitrary code, so a crafted ``.pt`` in a run folder would run on ``--resume``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

from ..errors import BilevelError
from . import serialize

FORMAT = "bilevel-checkpoint"
VERSION = 2
MANIFEST_FILE = "manifest.json"
CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})$")
TRIPPED_PATTERN = re.compile(r"^step-(\d{8})\.tripped$")  # held params that tripped a guard: never loaded
LEGACY_PATTERN = re.compile(r"^step-(\d{8})\.pt$")  # version 1: pickles, refused
TEMPORARY_GLOB = ".step-*.tmp"


class CheckpointError(BilevelError):
    """A checkpoint is missing, unreadable, unsafe, or does not match the run being resumed."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    """The folder holding a run's checkpoints."""
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (``step-XXXXXXXX`` directories) of a run, oldest first.

    Temporaries and version-1 ``.pt`` files are not listed (see :func:`legacy_checkpoints`).
    """
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if CHECKPOINT_PATTERN.match(p.name) and p.is_dir())


def set_aside_tripped(run_dir: str | Path, failed_step: int) -> list[Path]:
    """Rename every checkpoint of step ≥ ``failed_step`` to ``step-XXXXXXXX.tripped`` (atomic renames).

    Called when outer step ``failed_step`` tripped a guard: checkpoint ``step-<failed_step>`` holds the
    params that tripped it, and a higher-numbered one cannot be from this run's good history either.

    Returns:
        The new paths, oldest first.
    """
    moved = []
    for path in list_checkpoints(run_dir):
        if int(CHECKPOINT_PATTERN.match(path.name).group(1)) >= failed_step:
            target = path.with_name(path.name + ".tripped")
            if target.exists():  # from an earlier failed run into this folder: the newer one replaces it
                shutil.rmtree(target)
            os.replace(path, target)
            moved.append(target)
    if moved:
        serialize.fsync_path(checkpoint_dir(run_dir))
    return moved


def legacy_checkpoints(run_dir: str | Path) -> list[Path]:
    """Version-1 pickle checkpoints (``step-XXXXXXXX.pt``) in a run folder; they are never loaded."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if LEGACY_PATTERN.match(p.name))


def save_checkpoint(run_dir: str | Path, step: int, payload: dict[str, Any], keep: int = 2) -> Path:
    """Write ``payload`` atomically as the checkpoint of ``step``; keep the newest ``keep`` checkpoints.

    Returns:
        The checkpoint directory ``<run>/checkpoints/step-XXXXXXXX``.

    Raises:
        TypeError: the payload holds a value that cannot be stored without pickle (the message names it).
    """
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}"
    tmp = folder / f".step-{step:08d}.{os.getpid()}.tmp"
    if tmp.exists():  # left by an earlier process with our pid
        shutil.rmtree(tmp)
    try:
        _write(tmp, step, payload)
        _install(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(run_dir, final, keep)
    for stray in folder.glob(TEMPORARY_GLOB):  # interrupted saves and replaced checkpoints
        shutil.rmtree(stray, ignore_errors=True)
    return final


def _prune(run_dir: str | Path, final: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints up to ``final`` (``keep <= 0``: delete none).

    Never the one just written, nor a higher-numbered one: those come from another run into the same folder,
    and which of them to trust is the caller's decision, not a side effect of pruning.
    """
    if keep <= 0:
        return
    older = [p for p in list_checkpoints(run_dir) if p.name < final.name]  # zero-padded: name order = step order
    for stale in older[:max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(stale, ignore_errors=True)


def _write(tmp: Path, step: int, payload: dict[str, Any]) -> None:
    """The checkpoint's files, each fsync'ed, then the directory itself."""
    serialize.save_tree(tmp, payload, fsync=True)
    files = {name: _digest(tmp / name) for name in (serialize.TENSORS_FILE, serialize.STATE_FILE)}
    manifest = {"format": FORMAT, "version": VERSION, "step": int(step), "files": files}
    with open(tmp / MANIFEST_FILE, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    serialize.fsync_path(tmp)


def _install(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` onto ``final`` and make the rename durable.

    A directory rename is atomic only onto a missing name, so a checkpoint of the same step (a rerun into
    the same folder) is first moved aside to a temporary name, deleted after the new one is in place.
    """
    if final.exists():
        os.replace(final, final.parent / f".{final.name}.{os.getpid()}.replaced.tmp")
    os.replace(tmp, final)
    serialize.fsync_path(final.parent)


def _digest(path: Path) -> dict[str, Any]:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return {"bytes": path.stat().st_size, "sha256": sha.hexdigest()}


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint of a run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _refuse_pickle(paths: list[Path]) -> CheckpointError:
    names = ", ".join(str(p) for p in paths)
    return CheckpointError(
        f"{names}: old-format pickle checkpoint{'s' if len(paths) > 1 else ''} (torch.save .pt). Pickle "
        "checkpoints are never loaded, because loading a pickle can execute arbitrary code. Start a fresh run "
        "(drop --resume, or use a new --out folder); to resume from the step-XXXXXXXX/ checkpoints of this "
        "folder instead, move the .pt files out of it")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint directory; never unpickles anything.

    Raises:
        CheckpointError: ``path`` is a version-1 pickle (refused), or is missing, truncated, altered or not a
            bilevel checkpoint; the message names it and what to do.
    """
    path = Path(path)
    if LEGACY_PATTERN.match(path.name) or (path.is_file() and path.suffix in (".pt", ".pth", ".pkl", ".bin")):
        raise _refuse_pickle([path])
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a checkpoint directory (missing or a file); resume "
                              "from another checkpoint or start a fresh run without --resume")
    try:
        _check_manifest(path)
        payload = serialize.load_tree(path)
    except serialize.UnknownClassError as err:
        raise CheckpointError(f"checkpoint {path} was refused: {err}. Nothing in it was built or executed; a "
                              "checkpoint written by bilevel never names such a class, so the file was crafted or "
                              "comes from other code. Delete it and start a fresh run") from err
    except (serialize.TreeFormatError, OSError) as err:
        raise CheckpointError(f"checkpoint {path} is unreadable ({err}); delete it to resume from the previous "
                              "one, or start a fresh run without --resume") from err
    if not isinstance(payload, dict) or "step" not in payload or "outer" not in payload:
        raise CheckpointError(f"{path} is not a bilevel checkpoint (missing 'step'/'outer')")
    return payload


def _check_manifest(path: Path) -> None:
    """The manifest's format, version and the size and SHA-256 of every file it lists."""
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise serialize.TreeFormatError(f"{manifest_path} is missing")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise serialize.TreeFormatError(f"{manifest_path} is not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise serialize.TreeFormatError(f"{manifest_path} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise serialize.TreeFormatError(f"{manifest_path}: checkpoint version {manifest.get('version')!r}, this "
                                        f"code reads version {VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != {serialize.TENSORS_FILE, serialize.STATE_FILE}:
        raise serialize.TreeFormatError(f"{manifest_path} does not list the checkpoint's files")
    for name, expected in files.items():
        if not (path / name).is_file():
            raise serialize.TreeFormatError(f"{path / name} is missing")
        if _digest(path / name) != expected:
            raise serialize.TreeFormatError(f"{path / name} does not match its size/SHA-256 in the manifest "
                                            "(truncated or altered)")


def find_resume_checkpoint(run_dir: str | Path) -> Path:
    """The newest checkpoint of ``run_dir`` for ``--resume``, or a clear error.

    A folder holding version-1 ``.pt`` pickles is refused outright (even next to new checkpoints): resuming
    from an older checkpoint while a newer-looking pickle sits beside it would silently lose steps.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"--resume: run folder {run_dir} does not exist")
    legacy = legacy_checkpoints(run_dir)
    if legacy:
        raise _refuse_pickle(legacy)
    path = latest_checkpoint(run_dir)
    if path is None:
        folder = checkpoint_dir(run_dir)
        tripped = sorted(p.name for p in folder.iterdir() if TRIPPED_PATTERN.match(p.name)) if folder.is_dir() else []
        why = (f" (only {', '.join(tripped)}, which held params that tripped the divergence/non-finite guard and "
               "are never resumed)" if tripped else "")
        raise CheckpointError(f"--resume: no checkpoint in {folder}{why}; run with --checkpoint-every K to write "
                              "checkpoints, or start fresh (drop --resume; --overwrite to reuse this folder)")
    return path
