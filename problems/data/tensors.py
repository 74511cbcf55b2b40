"""From a ``datasets.Dataset`` to the stacked tensors that full-batch torch.func code wants."""
from __future__ import annotations

from collections.abc import Sequence

import datasets
import numpy as np
import torch

# Beyond this many separate row runs, one gather (``select``) beats slicing run by run.
_MAX_RUNS = 64


def domains_of(ds: datasets.Dataset) -> list[str]:
    """The distinct values of the ``domain`` column, in order of first appearance."""
    if "domain" not in ds.column_names:
        raise ValueError(f"dataset has no 'domain' column (columns: {ds.column_names})")
    return list(dict.fromkeys(ds.with_format(None)["domain"][:]))


def domain_rows(ds: datasets.Dataset, domains: str | Sequence[str]) -> np.ndarray:
    """Row indices of ``ds`` whose domain is one of ``domains``, in stored order.

    Raises:
        ValueError: naming any requested domain the dataset does not have, and the ones it has.
    """
    wanted = [domains] if isinstance(domains, str) else list(domains)
    column = np.asarray(ds.with_format(None)["domain"][:], dtype=object)
    present = list(dict.fromkeys(column.tolist()))
    missing = [d for d in wanted if d not in present]
    if missing:
        raise ValueError(f"unknown domain(s) {missing}; the dataset has domains {present}")
    return np.flatnonzero(np.isin(column, wanted))


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of consecutive indices as ``(start, stop)`` pairs."""
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(rows)]])
    return [(int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, stops)]


def to_tensors(
    ds: datasets.Dataset,
    domains: str | Sequence[str] | None = None,
    device: torch.device | str | None = None,
    x: str | None = None,
    y: str = "label",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked inputs and labels of the rows of ``domains`` (all rows if ``None``).

    The builders store each domain as a contiguous block, so the rows are read as one or a few slices
    of the Arrow table and converted once (no per-row Python). Row order is the stored order.

    Args:
        ds: a dataset from :mod:`problems.data`.
        domains: one domain name, several, or ``None`` for all rows.
        device: where to put the tensors (default CPU).
        x: input column; default ``"image"`` if present, else ``"x"``.
        y: label column, e.g. ``"clean_label"`` to evaluate against the clean labels.

    Returns:
        ``(X, y)``: ``X`` float32 ``(N, C, H, W)`` (or ``(N, D)``), ``y`` int64 ``(N,)`` (float for ``"y"``).
    """
    if x is None:
        x = "image" if "image" in ds.column_names else "x"
    for col in (x, y):
        if col not in ds.column_names:
            raise ValueError(f"dataset has no {col!r} column (columns: {ds.column_names})")
    plain = ds.with_format("numpy", columns=[x, y])
    if domains is None:
        parts = [plain[:]]
    else:
        runs = _runs(domain_rows(ds, domains))
        if len(runs) <= _MAX_RUNS:
            parts = [plain[a:b] for a, b in runs]
        else:
            parts = [plain.select(domain_rows(ds, domains))[:]]
    if not parts:
        raise ValueError(f"domains={domains!r} selects no rows; give at least one domain name, or None for all")
    xs = np.concatenate([p[x] for p in parts]) if len(parts) > 1 else parts[0][x]
    ys = np.concatenate([p[y] for p in parts]) if len(parts) > 1 else parts[0][y]
    X = torch.from_numpy(np.ascontiguousarray(xs))
    Y = torch.from_numpy(np.ascontiguousarray(ys))
    return X.to(device) if device is not None else X, Y.to(device) if device is not None else Y
