"""Atomic checkpoints: a kill at any moment leaves the newest complete checkpoint readable.

A checkpoint is one ``torch.save`` file ``step-XXXXXXXX.pt`` in ``<run>/checkpoints/``. It is written to a
temporary name in the same folder, flushed and fsync'ed, then renamed over the final name with
``os.replace`` (atomic on POSIX), and the folder is fsync'ed. A kill during the write leaves at worst a
stray ``.tmp`` file, which is ignored and cleaned up by the next save.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import BilevelError

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})\.pt$")


class CheckpointError(BilevelError):
    """A checkpoint is missing, unreadable or does not match the run being resumed."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if CHECKPOINT_PATTERN.match(p.name))


def save_checkpoint(run_dir: str | Path, step: int, payload: dict[str, Any], keep: int = 2) -> Path:
    """Write ``payload`` atomically as the checkpoint of ``step``; keep the newest ``keep`` checkpoints."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:08d}.pt"
    tmp = folder / f".step-{step:08d}.pt.{os.getpid()}.tmp"
    with open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for stale in list_checkpoints(run_dir)[:-keep]:
        stale.unlink(missing_ok=True)
    for stray in folder.glob(".step-*.tmp"):
        if stray != tmp:
            stray.unlink(missing_ok=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint; a truncated or foreign file is a :class:`CheckpointError` naming it."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises several types for truncated / foreign files
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err}); delete it to "
                              "resume from the previous one, or start a fresh run without --resume") from err
    if not isinstance(payload, dict) or "step" not in payload or "outer" not in payload:
        raise CheckpointError(f"{path} is not a bilevel checkpoint (missing 'step'/'outer')")
    return payload


def find_resume_checkpoint(run_dir: str | Path) -> Path:
    """The newest checkpoint of ``run_dir`` for ``--resume``, or a clear error."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"--resume: run folder {run_dir} does not exist")
    path = latest_checkpoint(run_dir)
    if path is None:
        raise CheckpointError(f"--resume: no checkpoint in {checkpoint_dir(run_dir)}; run with "
                              "--checkpoint-every K to write checkpoints, or drop --resume to start fresh")
    return path
