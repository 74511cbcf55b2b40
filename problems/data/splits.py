"""DomainBed's data splits: per-domain train/validation, and leave-one-domain-out iteration.

Gulrajani & Lopez-Paz, "In Search of Lost Domain Generalization", ICLR 2021, arXiv:2007.01434, Sec. 3:
every domain is split into a training part and a held-out part (``holdout_fraction = 0.2``); models
train on the training parts of the source domains, and the held-out parts serve model selection.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence

import datasets
import numpy as np
import pyarrow as pa
import torch
from datasets.table import InMemoryTable

from .tensors import domain_rows, domains_of


def split_domains(
    ds: datasets.Dataset, holdout: float = 0.2, seed: int = 0
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split every domain of ``ds`` at random into training and validation rows (DomainBed 80/20).

    Within each domain, ``floor(holdout * n)`` rows (DomainBed's ``int(len(env) * holdout_fraction)``)
    drawn with a generator seeded from ``(seed, domain index)`` go to validation, the rest to training.
    Both parts keep the stored order and are materialised (:func:`take_rows`) so that
    :func:`~problems.data.to_tensors` reads each domain as one contiguous slice.

    Returns:
        ``(train, val)`` with the same columns and format as ``ds``.
    """
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout fraction {holdout!r} is outside [0, 1)")
    train_rows, val_rows = [], []
    for i, name in enumerate(domains_of(ds)):
        rows = domain_rows(ds, name)
        n_val = int(math.floor(holdout * len(rows)))
        gen = torch.Generator().manual_seed(_mix(seed, i))
        perm = torch.randperm(len(rows), generator=gen).numpy()
        val_rows.append(np.sort(rows[perm[:n_val]]))
        train_rows.append(np.sort(rows[perm[n_val:]]))
    fmt = ds.format
    parts = []
    for rows in (np.concatenate(train_rows), np.concatenate(val_rows)):
        part = take_rows(ds, rows)
        parts.append(part.with_format(fmt["type"], columns=fmt["columns"], output_all_columns=fmt["output_all_columns"]))
    return parts[0], parts[1]


def take_rows(ds: datasets.Dataset, rows: np.ndarray) -> datasets.Dataset:
    """The ``rows`` of ``ds`` as a new in-memory dataset stored as one contiguous Arrow chunk.

    ``ds.select(rows).flatten_indices()`` does the same through a batched ``map`` (about 10x slower, and
    ``select`` alone leaves an index mapping that makes every later read a row-by-row gather).
    """
    indices = getattr(ds, "_indices", None)  # after a select/shuffle: logical rows -> physical rows
    if indices is not None:
        rows = np.asarray(indices.column(0).to_numpy())[rows]
    table = ds.data.table.take(pa.array(np.asarray(rows, dtype=np.int64))).combine_chunks()
    # an explicit fingerprint: otherwise datasets hashes the whole new table (pickling every image)
    fingerprint = hashlib.sha256(ds._fingerprint.encode() + np.asarray(rows, np.int64).tobytes()).hexdigest()[:16]
    return datasets.Dataset(InMemoryTable(table), info=ds.info.copy(), fingerprint=fingerprint)


def _mix(seed: int, index: int) -> int:
    """A per-domain seed (DomainBed hashes ``(trial_seed, env_index)`` the same way)."""
    return (seed * 1_000_003 + index * 7_919 + 12_345) % (2**63 - 1)


def leave_one_domain_out(
    domains: Sequence[str] | datasets.Dataset,
) -> Iterator[tuple[str, tuple[str, ...]]]:
    """Yield ``(held_out, sources)`` for each domain: train on ``sources``, evaluate on ``held_out``.

    ``domains`` is a list of names or a dataset (its domains in stored order). This is the outer loop of
    DomainBed's evaluation (each domain is the test domain once) and of ITL's meta-training step
    (Gao et al. 2022, Sec. 3.3: one inner run per held-out domain).
    """
    names = domains_of(domains) if isinstance(domains, datasets.Dataset) else list(domains)
    if len(names) < 2:
        raise ValueError(f"leave-one-domain-out needs at least 2 domains, got {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"domain names repeat: {names}")
    for held_out in names:
        yield held_out, tuple(d for d in names if d != held_out)
