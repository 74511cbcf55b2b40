"""Helpers shared by the hypergradient solvers."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ..inner import batch_at
from ..tree import Params
from ..types import Batch, BilevelProblem


def detach_state(state: Any) -> Any:
    """Detach every tensor leaf of an optimiser state (a pytree of namedtuples)."""
    return pytree.tree_map(lambda x: x.detach() if isinstance(x, Tensor) else x, state)


def hessian_batch(inner_batch: Batch | Callable[[int], Batch], steps: int) -> Batch:
    """The batch on which implicit solvers take the inner Hessian: the fixed batch, or the next one."""
    return batch_at(inner_batch, steps)


def outer_fn(problem: BilevelProblem, batch: Batch) -> Callable[[Params, Params], Tensor]:
    """(θ, φ) ↦ F(θ, φ) on a fixed batch."""
    return lambda theta, phi: problem.outer(theta, phi, batch)


def inner_fn(problem: BilevelProblem, batch: Batch) -> Callable[[Params, Params], Tensor]:
    """(θ, φ) ↦ G(θ, φ) on a fixed batch."""
    return lambda theta, phi: problem.inner(theta, phi, batch)


def scalar(value: Tensor | float) -> float | Tensor:
    """A Python float, or the detached tensor when it cannot be read on the host (under vmap)."""
    from ..autodiff import is_batched

    if isinstance(value, Tensor):
        return value.detach() if is_batched(value) else float(value)
    return float(value)


def last(losses: Tensor) -> float | Tensor:
    """The last entry of a loss trace (NaN when empty)."""
    return scalar(losses[-1]) if losses.numel() else float("nan")


def split_float_leaves(state: Any) -> tuple[list[Tensor], Callable[[list[Tensor]], Any]]:
    """Split a pytree into its floating-point tensor leaves and a function that rebuilds it from them.

    The integer leaves (e.g. Adam's step count) stay fixed; only float leaves are differentiated.
    """
    leaves, spec = pytree.tree_flatten(state)
    float_idx = [i for i, x in enumerate(leaves) if isinstance(x, Tensor) and x.is_floating_point()]

    def rebuild(float_leaves: list[Tensor]) -> Any:
        new = list(leaves)
        for i, x in zip(float_idx, float_leaves):
            new[i] = x
        return pytree.tree_unflatten(new, spec)

    return [leaves[i] for i in float_idx], rebuild


def float_leaves(state: Any) -> list[Tensor]:
    """The floating-point tensor leaves of a pytree, in order."""
    return split_float_leaves(state)[0]


def zeros_like_leaves(leaves: list[Tensor]) -> list[Tensor]:
    """Zeros shaped like each leaf."""
    return [torch.zeros_like(x) for x in leaves]
