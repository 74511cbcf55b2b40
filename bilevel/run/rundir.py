"""One run per folder: the run's arguments, its lock, and what a new, resumed or overwritten run may do there.

A run folder holds exactly one run. Before anything is written (and before Accelerate is started), the
main process

1. takes an OS lock on ``<out>/.lock`` (``filelock``: ``flock`` on POSIX, released by the kernel when the
   process dies, so a killed run never leaves a stale lock) and holds it for the whole run; a second run
   into a held folder is refused;
2. decides what the run may do with what is already there:

   * a new run into a folder holding a previous run's files (:data:`RUN_FILES`, ``checkpoints/``) is
     refused, unless ``--overwrite`` (those files, and only those, are deleted once the run has been
     built and is about to write) or ``--resume``;
   * ``--resume`` takes the newest checkpoint and refuses it when the settings that shape the result
     differ from the checkpoint's (:func:`settings_differences`: problem, solver up to equivalent specs,
     seed, process count, mixed precision, every config key) or when the checkpoint already reached
     ``--steps``; raising ``--steps`` is the one change allowed.

Every refusal leaves the folder exactly as it was: a lock file or folder this command created is removed
again (:meth:`RunFolder.close` before :meth:`RunFolder.commit`).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..errors import BilevelError, SpecError
from ..solvers import normalize_spec
from .checkpoint import (CHECKPOINT_PATTERN, LEGACY_PATTERN, TRIPPED_PATTERN, CheckpointError, checkpoint_dir,
                         find_resume_checkpoint, latest_checkpoint, load_checkpoint)

LOCK_FILE = ".lock"
CHECKPOINTS = "checkpoints"
RUN_FILES = ("config.json", "metrics.jsonl", "metrics.csv", "outer.safetensors", "final.json", "curves.png")
# tracker name -> (importable modules that provide it, the pip package to install)
TRACKER_PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow"),
}
SEED_LIMIT = 2 ** 32  # numpy's seeds are 32-bit


class RunArgumentError(BilevelError, ValueError):
    """A run argument (steps, seed, trackers, the run folder's path, ...) is invalid."""


class RunFolderError(BilevelError):
    """The run folder is held by another run, holds a previous run, or cannot be created or locked."""


# ---- arguments ----------------------------------------------------------------------------------------------
def check_run_arguments(*, steps: int, checkpoint_every: int, seed: int, out: str | os.PathLike,
                        resume: bool = False, overwrite: bool = False, log_with: Sequence[str] = (),
                        keep_checkpoints: int = 2) -> None:
    """Check a run's arguments before any work; each error names the argument, the problem and the fix.

    Raises:
        RunArgumentError: on the first invalid argument.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise RunArgumentError(f"--steps {steps}: a run needs at least one outer step; pass --steps N with N >= 1")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise RunArgumentError(f"--checkpoint-every {checkpoint_every}: must be 0 (no checkpoints) or a positive "
                               "number of steps K; pass --checkpoint-every K with K >= 0")
    check_seed(seed)
    if isinstance(keep_checkpoints, bool) or not isinstance(keep_checkpoints, int):
        raise RunArgumentError(f"keep_checkpoints={keep_checkpoints!r}: must be an int (<= 0 keeps every "
                               "checkpoint); pass an int")
    if resume and overwrite:
        raise RunArgumentError("--resume and --overwrite contradict each other (continue the run in --out, or "
                               "delete it and start over); pass only one of them")
    for name in log_with:
        check_tracker(name)
    check_out_path(out)


def check_seed(seed: int) -> None:
    """``0 <= seed < 2**32`` (torch, numpy and python RNGs are all seeded from it)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise RunArgumentError(f"--seed {seed}: a seed must be an int in [0, 2**32 - 1] (numpy's RNG takes no "
                               "other); pass --seed N with N >= 0")


def check_tracker(name: str) -> None:
    """``name`` is a known tracker whose package is importable (accelerate would silently skip it)."""
    if name not in TRACKER_PACKAGES:
        raise RunArgumentError(f"--log-with {name!r} is not a tracker this runner knows; valid trackers: "
                               f"{', '.join(TRACKER_PACKAGES)} (metrics.jsonl is always written)")
    modules, package = TRACKER_PACKAGES[name]
    if not any(importlib.util.find_spec(module) is not None for module in modules):
        raise RunArgumentError(f"--log-with {name}: the {package} package is not installed, so nothing would be "
                               f"logged there; pip install {package}, or drop --log-with {name} "
                               "(metrics.jsonl is always written)")


def check_out_path(out: str | os.PathLike) -> None:
    """``out`` can be a run folder: not empty, not a file, not inside a file, and writable.

    Writability is asked of the folder itself when it exists, else of its nearest existing parent (the one
    the missing folders will be created in).
    """
    if not str(out).strip():
        raise RunArgumentError("--out is empty; name a run folder, e.g. --out runs/ridge")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise RunArgumentError(f"--out {path} is an existing file, not a folder; pass a folder path (new or "
                               "existing) for the run")
    if path.is_symlink() and not path.exists():
        raise RunArgumentError(f"--out {path} is a symbolic link to a missing target; pass a folder path")
    nearest = Path(os.path.abspath(path))
    while not nearest.exists():
        nearest = nearest.parent
    if not nearest.is_dir():
        raise RunArgumentError(f"--out {path} is inside {nearest}, which is a file, not a folder; pass a folder "
                               "path whose parents are folders")
    if not os.access(nearest, os.W_OK | os.X_OK):
        where = "the folder itself" if nearest == Path(os.path.abspath(path)) else f"its parent {nearest}"
        raise RunArgumentError(f"--out {path}: {where} is not writable by this user, so the run could not write "
                               "its results; pass a folder you can write to, or fix the permissions")


def launch_layout() -> tuple[int, int]:
    """``(process_index, num_processes)`` of this process as the launcher set them, before Accelerate starts.

    ``accelerate launch`` (through torch.distributed's launcher) sets ``RANK`` and ``WORLD_SIZE``; a plain
    ``bilevel run`` is process 0 of 1.
    """
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


# ---- the settings a checkpoint must match -------------------------------------------------------------------
class _Unknown:
    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN = _Unknown()  # a solver not resolvable before the problem is built (no --solver, no DEFAULT_SOLVER)


@dataclass(frozen=True)
class RunSettings:
    """What shapes a run's result besides its length: a resumed run must match the checkpoint in all of it."""

    problem: str
    solver: Any  # Optional[str], or UNKNOWN
    seed: int
    processes: int
    mixed_precision: str
    config: Mapping[str, Any] = field(default_factory=dict)


def _plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples become lists), so saved and current values compare equal."""
    return json.loads(json.dumps(value, default=str))


def _same_solver(saved: Optional[str], now: Optional[str]) -> bool:
    """Equal specs, or specs equal once defaults are dropped (``cg`` and ``cg:maxiter=100``)."""
    if saved == now:
        return True
    if saved is None or now is None:
        return False
    try:
        return normalize_spec(saved) == normalize_spec(now)
    except SpecError:  # a spec this code no longer parses cannot be shown to be the same solver
        return False


def settings_differences(saved: Mapping[str, Any], now: RunSettings) -> list[str]:
    """Every setting in which the checkpoint ``saved`` differs from ``now``, as ``"key: saved → now"``.

    A setting the checkpoint does not record counts as different: it cannot be shown to be the same.
    """
    missing = object()
    differ = []
    if now.solver is not UNKNOWN and not _same_solver(saved.get("solver", missing), now.solver):
        differ.append(f"solver: {_shown(saved.get('solver', missing))} → {now.solver!r}")
    for key, saved_key, value in (("problem", "problem", now.problem), ("seed", "seed", now.seed),
                                  ("processes", "num_processes", now.processes),
                                  ("mixed_precision", "mixed_precision", now.mixed_precision)):
        old = saved.get(saved_key, missing)
        if old is missing or old != value:
            differ.append(f"{key}: {_shown(old)} → {value!r}")
    old_config = _plain(dict(saved.get("config") or {}))
    new_config = _plain(dict(now.config))
    for key in sorted(set(old_config) | set(new_config)):
        old, new = old_config.get(key, missing), new_config.get(key, missing)
        if old != new:
            differ.append(f"config {key}: {_shown(old)} → {_shown(new)}")
    return differ


def _shown(value: Any) -> str:
    return "(not recorded)" if not isinstance(value, (str, int, float, bool, list, dict, type(None))) else repr(value)


def check_resume(payload: Mapping[str, Any], path: Path, settings: RunSettings, steps: int) -> None:
    """Refuse to resume from the checkpoint ``path`` with other settings, or when it already reached ``steps``.

    Raises:
        CheckpointError: listing every setting that differs, or saying how many steps the run already has.
    """
    differ = settings_differences(payload, settings)
    if differ:
        raise CheckpointError(f"--resume: checkpoint {path} was written with other settings ({'; '.join(differ)}); "
                              "resume with the settings the run was started with (raising --steps is allowed), "
                              "or start over with --overwrite, or run in another --out")
    done = int(payload["step"])
    if done >= steps:
        raise CheckpointError(f"--resume: the run in {path.parent.parent} already has {done} steps (checkpoint "
                              f"{path.name}) and --steps {steps} asks for no more; pass a larger --steps (e.g. "
                              f"--steps {2 * done}) to continue it")


# ---- what a folder holds ------------------------------------------------------------------------------------
def previous_run_files(run_dir: str | Path) -> list[str]:
    """The files of a previous run in ``run_dir`` (``checkpoints/`` included), by name; [] for a new folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [name for name in RUN_FILES if _is_file_or_link(run_dir / name)]
    if os.path.lexists(run_dir / CHECKPOINTS):
        found.append(CHECKPOINTS + "/")
    return found


def _is_file_or_link(path: Path) -> bool:
    return path.is_symlink() or path.is_file()


def _describe(run_dir: Path, names: list[str]) -> str:
    last = latest_checkpoint(run_dir)
    return ", ".join(f"{n} (newest {last.name})" if n == CHECKPOINTS + "/" and last else n for n in names)


def _ours_in_checkpoints(name: str) -> bool:
    return bool(CHECKPOINT_PATTERN.match(name) or LEGACY_PATTERN.match(name) or TRIPPED_PATTERN.match(name)
                or (name.startswith(".step-") and name.endswith(".tmp")))


def delete_previous_run(run_dir: str | Path) -> tuple[list[str], list[str]]:
    """Delete a previous run's files from ``run_dir`` (``--overwrite``); never a file the runner did not write.

    Returns:
        ``(deleted, kept)``: names relative to ``run_dir``; ``kept`` lists the other files, left in place.
    """
    run_dir = Path(run_dir)
    deleted = []
    for name in RUN_FILES:
        if _is_file_or_link(run_dir / name):
            (run_dir / name).unlink()
            deleted.append(name)
    folder = checkpoint_dir(run_dir)
    if folder.is_symlink():
        folder.unlink()
        deleted.append(CHECKPOINTS + "/")
    elif folder.is_dir():
        for entry in sorted(folder.iterdir()):
            if _ours_in_checkpoints(entry.name):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                deleted.append(f"{CHECKPOINTS}/{entry.name}")
        if not any(folder.iterdir()):
            folder.rmdir()
    others = [p for p in run_dir.iterdir() if p.name not in (LOCK_FILE, CHECKPOINTS)]
    others += list(folder.iterdir()) if folder.is_dir() else []
    kept = sorted(p.relative_to(run_dir).as_posix() + ("/" if p.is_dir() else "") for p in others)
    return deleted, kept


# ---- the folder of one run ----------------------------------------------------------------------------------
@dataclass
class Opening:
    """What the main process decided for the folder: the checkpoint to resume from (and its payload)."""

    resume_path: Optional[Path] = None
    payload: Optional[dict[str, Any]] = None
    previous: list[str] = field(default_factory=list)  # a previous run's files, deleted on commit (--overwrite)


class RunFolder:
    """A run folder held by this process for one run (main process only).

    :meth:`open` locks it and decides what the run may do; :meth:`commit` marks the point from which the
    run writes; :meth:`close` releases the lock and, when the run never committed, removes again the lock
    file and folders this command created, so that a refused or failed start changes nothing on disk.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.committed = False
        self._lock: Any = None
        self._created_dirs: list[Path] = []
        self._created_lock = False

    def open(self, *, resume: bool, overwrite: bool, settings: RunSettings, steps: int) -> Opening:
        """Lock the folder and decide: resume its newest checkpoint, overwrite its previous run, or start anew.

        Raises:
            RunFolderError: another run holds the folder, it holds a previous run (and neither ``resume`` nor
                ``overwrite`` was asked), or it cannot be created or locked.
            CheckpointError: ``resume`` and there is no usable checkpoint, or it does not match (see
                :func:`check_resume`).
        """
        if resume and not self.path.is_dir():
            raise CheckpointError(f"--resume: run folder {self.path} does not exist; drop --resume to start a new "
                                  "run there, or pass the --out of the run to continue")
        self._lock_folder()
        try:
            if resume:
                path = find_resume_checkpoint(self.path)
                payload = load_checkpoint(path)
                check_resume(payload, path, settings, steps)
                return Opening(resume_path=path, payload=payload)
            previous = previous_run_files(self.path)
            if previous and not overwrite:
                raise RunFolderError(f"run folder {self.path} already holds a run ({_describe(self.path, previous)}); "
                                     "continue it with --resume, start over with --overwrite (deletes that run's "
                                     "files, keeps any others), or choose another --out")
            return Opening(previous=previous)
        except BaseException:
            self.close()
            raise

    def commit(self) -> None:
        """From here on the run writes: what this command created stays."""
        self.committed = True

    def close(self) -> None:
        """Release the lock; before :meth:`commit`, also remove the lock file and folders this command made."""
        if not self.committed:
            if self._created_lock:
                try:
                    (self.path / LOCK_FILE).unlink()
                except FileNotFoundError:
                    pass
            for folder in reversed(self._created_dirs):
                try:
                    folder.rmdir()
                except OSError:  # not empty: something else wrote there; leave it
                    break
        if self._lock is not None:
            self._lock.release()
        self._lock, self._created_lock, self._created_dirs = None, False, []

    def _lock_folder(self) -> None:
        """Create the folder if needed (remembering what was created) and take its lock without waiting."""
        from filelock import FileLock, Timeout

        target = Path(os.path.abspath(self.path))
        missing = []
        while not target.exists():
            missing.append(target)
            target = target.parent
        try:
            for folder in reversed(missing):
                try:
                    folder.mkdir()
                except FileExistsError:  # made meanwhile by another run: not ours to remove again
                    if not folder.is_dir():
                        raise
                    continue
                self._created_dirs.append(folder)
        except OSError as err:
            self.close()
            raise RunFolderError(f"cannot create run folder {self.path} ({err.strerror or err}); pass a folder you "
                                 "can write to as --out") from err
        lock_path = self.path / LOCK_FILE
        existed = os.path.lexists(lock_path)
        lock = FileLock(str(lock_path), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            self.close()
            raise RunFolderError(f"run folder {self.path} is in use: another run holds its lock {lock_path}; wait "
                                 "for that run to finish (or stop it), or choose another --out") from None
        except OSError as err:
            self.close()
            raise RunFolderError(f"cannot lock run folder {self.path} ({err.strerror or err}); pass a folder on a "
                                 "writable file system as --out") from err
        self._lock, self._created_lock = lock, not existed
