"""Combining the hypergradients of an outer step's sub-problems: the plain mean, or PCGrad gradient surgery.

PCGrad: "Gradient Surgery for Multi-Task Learning", Yu, Kumar, Gupta, Levine, Hausman, Finn,
NeurIPS 2020 (arXiv:2001.06782), Algorithm 1. ITL (Gao et al., ICML 2022, Sec. 3.3) combines its
leave-one-domain-out hypergradients with it.

For each gradient g_i, in turn, and for each other gradient g_j taken in a random order::

    if g_i^PC · g_j < 0:   g_i^PC ← g_i^PC − (g_i^PC · g_j / ‖g_j‖²) g_j

(g_j is the *original* gradient, as in Algorithm 1), then the projected gradients are combined. Yu et al.
sum them; we take the **mean** by default (``reduction="mean"``) so PCGrad and plain averaging differ only
by the projections and share the outer learning rate. When no pair conflicts, PCGrad equals the mean.
Gradients are flat dicts ``{name: Tensor}`` (one per domain); the surgery acts on the concatenation of
all their entries, i.e. on the whole gradient vector.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import tree
from .tree import Params

METHODS = ("mean", "pcgrad")


def _check(grads: Sequence[Params]) -> None:
    if len(grads) == 0:
        raise ValueError("gradient surgery needs at least one gradient, got an empty list")
    for i, g in enumerate(grads[1:], start=1):
        tree.assert_same_structure(g, grads[0], f"gradient {i} (every gradient must have the keys and shapes of gradient 0)")


def pcgrad_vectors(vectors: torch.Tensor, generator: Optional[torch.Generator] = None,
                   reduction: str = "mean") -> torch.Tensor:
    """PCGrad on the rows of ``vectors`` (n, d): projected rows combined by ``reduction`` ("mean" or "sum")."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"pcgrad: reduction must be 'mean' or 'sum', got {reduction!r}")
    n = vectors.shape[0]
    projected = vectors.clone()
    sq_norms = (vectors * vectors).sum(-1)
    for i in range(n):
        others = [j for j in torch.randperm(n, generator=generator).tolist() if j != i]
        for j in others:
            dot = projected[i] @ vectors[j]
            if dot < 0 and sq_norms[j] > 0:  # a conflict: remove the component along g_j
                projected[i] = projected[i] - dot / sq_norms[j] * vectors[j]
    return projected.mean(0) if reduction == "mean" else projected.sum(0)


def combine_gradients(grads: Sequence[Params], method: str = "pcgrad", seed: int = 0,
                      reduction: str = "mean") -> Params:
    """Combine per-domain gradients by PCGrad (random projection order from ``seed``) or their mean.

    Args:
        grads: gradients with identical keys and shapes.
        method: ``"pcgrad"`` or ``"mean"``.
        seed: seeds the projection order (use e.g. the outer step so a resumed run repeats it).
        reduction: PCGrad's final combination, ``"mean"`` (default) or ``"sum"`` (Yu et al.).
    """
    if method not in METHODS:
        raise ValueError(f"combine_gradients: method must be one of {METHODS}, got {method!r}")
    _check(grads)
    if method == "mean":  # leaf by leaf (no flattening), so a single tensor's mean is torch's own
        return {k: torch.stack([g[k] for g in grads]).mean(0) for k in grads[0]}
    stacked = torch.stack([tree.flatten(g) for g in grads])
    return tree.unflatten(pcgrad_vectors(stacked, torch.Generator().manual_seed(seed), reduction), grads[0])


def conflicts(grads: Sequence[Params]) -> int:
    """How many unordered pairs of gradients conflict (negative inner product): a diagnostic."""
    _check(grads)
    stacked = torch.stack([tree.flatten(g) for g in grads])
    gram = stacked @ stacked.T
    return int((torch.triu(gram, diagonal=1) < 0).sum())
