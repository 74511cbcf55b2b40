"""Synthetic label noise, symmetric and pair-flip, reproducible from a seed, keeping the clean labels.

Both kinds follow the noise models of Co-teaching (Han et al. 2018, arXiv:1804.06872, Sec. 4) as its
``noisify`` code draws them: each label is corrupted independently with probability ``rate``;

* ``"symmetric"``: a corrupted label moves to one of the *other* ``C - 1`` classes, uniformly (transition
  matrix ``1 - rate`` on the diagonal, ``rate / (C - 1)`` off it), so the measured noise rate is ``rate``;
* ``"pairflip"``: a corrupted label ``c`` moves to ``(c + 1) mod C`` (the asymmetric "pair" noise).
"""
from __future__ import annotations

import datasets
import numpy as np
import torch

NOISE_KINDS = ("symmetric", "pairflip")


def noisy_labels(
    labels: torch.Tensor,
    rate: float,
    kind: str = "symmetric",
    num_classes: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Corrupt int labels with noise of ``kind`` at ``rate`` (see the module docstring).

    Args:
        labels: int tensor of class indices in ``[0, num_classes)``.
        rate: probability that a label is corrupted, in [0, 1).
        kind: ``"symmetric"`` or ``"pairflip"``.
        num_classes: number of classes; ``None`` takes ``labels.max() + 1``.
        seed: the draws depend only on the seed and the number of labels.

    Returns:
        A new int64 tensor; positions that were not drawn for corruption keep their label, and every
        drawn position differs from its clean label.
    """
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor of class indices, got dtype {labels.dtype}")
    if not (isinstance(rate, (int, float)) and 0.0 <= rate < 1.0):
        raise ValueError(f"noise rate {rate!r} is outside [0, 1); give the probability of corrupting a label")
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; choose one of {NOISE_KINDS}")
    labels = labels.long().cpu()
    if labels.numel() and labels.min() < 0:
        raise ValueError(f"labels must be >= 0, found {int(labels.min())}")
    observed = int(labels.max()) + 1 if labels.numel() else 0
    classes = observed if num_classes is None else int(num_classes)
    if classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got num_classes={classes}")
    if observed > classes:
        raise ValueError(f"label {observed - 1} is out of range for num_classes={classes}")
    gen = torch.Generator().manual_seed(seed)
    flip = torch.rand(labels.shape, generator=gen) < rate
    if kind == "symmetric":
        # a uniform draw among the C - 1 other classes: add an offset in 1..C-1 modulo C
        offset = torch.randint(1, classes, labels.shape, generator=gen)
    else:
        offset = torch.ones_like(labels)
    return torch.where(flip, (labels + offset) % classes, labels)


def with_label_noise(
    ds: datasets.Dataset,
    rate: float,
    kind: str = "symmetric",
    num_classes: int | None = None,
    seed: int = 0,
) -> datasets.Dataset:
    """``ds`` with ``label`` replaced by :func:`noisy_labels` and the original kept as ``clean_label``.

    If ``ds`` already has a ``clean_label`` column (Colored MNIST, or noise applied twice) it is kept: it
    is still the ground truth, and the new noise is applied on top of the current ``label``. The noise is
    drawn over the rows in their stored order, so the same dataset and seed give the same labels.
    """
    if "label" not in ds.column_names:
        raise ValueError(f"dataset has no 'label' column (columns: {ds.column_names})")
    fmt = ds.format
    plain = ds.with_format("numpy")
    labels = torch.from_numpy(np.asarray(plain["label"][:]))
    noisy = noisy_labels(labels, rate, kind, num_classes, seed).numpy()
    if "clean_label" not in ds.column_names:
        plain = plain.add_column("clean_label", labels.numpy(), feature=datasets.Value("int64"))
    plain = plain.remove_columns("label").add_column("label", noisy, feature=datasets.Value("int64"))
    order = ["image", "x", "label", "domain", "clean_label"]
    first = [c for c in order if c in plain.column_names]
    plain = plain.select_columns(first + [c for c in plain.column_names if c not in first])
    return plain.with_format(fmt["type"])
