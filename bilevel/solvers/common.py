"""Helpers shared by the hypergradient solvers."""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.func import grad
from torch.utils import _pytree as pytree

from .. import tree
from ..autodiff import any_batched, fill_none, tape_leaves, tape_value_and_grad
from ..errors import ZeroHypergradientWarning
from ..inner import batch_at
from ..paths import AUTOGRAD, FUNC, choose_path
from ..tree import Params
from ..types import Batch, BilevelProblem

GENERIC_ZERO_REASON = "the outer params do not influence the outer loss through the inner problem at this point"


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


def inner_gradient_norm(problem: BilevelProblem, theta: Params, phi: Params, batch: Batch, path: str = FUNC
                        ) -> Tensor:
    """‖∇θG(θ, φ)‖ on ``batch`` (one gradient, on ``path``), in full precision even under autocast."""
    device_type = next(iter(theta.values())).device.type
    with torch.autocast(device_type=device_type, enabled=False):
        if path == AUTOGRAD:
            return tree.norm(tape_value_and_grad(lambda t: problem.inner(t, phi, batch), tree.detach(theta))[1])
        return tree.norm(grad(problem.inner)(theta, phi, batch)).detach()


def stationarity(norm_k: Tensor, norm_0: Tensor) -> dict[str, float | Tensor]:
    """The inner stationarity a solver differentiated at, as diagnostics.

    ``inner_grad_norm`` = ‖∇θG(θ_K, φ)‖ and ``inner_grad_norm_rel`` = ‖∇θG(θ_K, φ)‖ / ‖∇θG(θ_0, φ)‖, both
    on the same batch (θ_0: the inner params the call started from). A start that is already stationary
    (‖∇θG(θ_0)‖ = 0) gives 0 when θ_K is stationary too.
    """
    rel = norm_k / torch.clamp(norm_0, min=torch.finfo(norm_0.dtype).tiny)
    return {"inner_grad_norm": scalar(norm_k), "inner_grad_norm_rel": scalar(rel)}


def full_precision(params: Params) -> bool:
    """Whether gradients taken now at ``params`` are in full precision (no autocast on their device), so that a
    step's own gradient can serve a diagnostic that must be taken in full precision."""
    return not torch.is_autocast_enabled(next(iter(params.values())).device.type)


def unrolled_stationarity(problem: BilevelProblem, theta_0: Params, theta_k: Params, phi: Params,
                          inner_batch: Batch | Callable[[int], Batch], steps: int, path: str = FUNC,
                          gradient_0: Optional[Params] = None) -> dict[str, float | Tensor]:
    """:func:`stationarity` of a solver that differentiates the K-step loop itself (unroll, forward, onestep).

    Both gradients are taken on the batch of the last inner step, ``inner_batch(K − 1)`` (the only batch
    for full-batch training): the loop's own objective at its end. Costs two gradients (on ``path``), or
    one when the caller passes ``gradient_0`` = ∇θG(θ_0, φ) on that batch in full precision (a one-step
    solver has it from its step; see :func:`full_precision`).
    """
    batch = batch_at(inner_batch, max(steps - 1, 0))
    norm_0 = (tree.norm(tree.detach(gradient_0)) if gradient_0 is not None
              else inner_gradient_norm(problem, theta_0, phi, batch, path))
    return stationarity(inner_gradient_norm(problem, theta_k, phi, batch, path), norm_0)


def solver_path(inner: Params, outer: Params, prefer: str = AUTOGRAD) -> str:
    """The autodiff path of one solver call (:func:`bilevel.paths.choose_path` on its params), chosen once at
    its start and reported as ``diagnostics["autodiff_path"]``."""
    return choose_path((*inner.values(), *outer.values()), prefer)


def tape_objective_grad(objective: Callable[[Params], tuple[Tensor, Any]], phi: Params) -> tuple[Params, Tensor, Any]:
    """d/dφ of a scalar ``objective(φ) -> (value, aux)`` recorded on the tape (the reverse pass of the unrolled and
    one-step solvers): the objective runs at fresh leaves holding φ, then one ``torch.autograd.grad``.
    Returns the derivative and the value, both detached, and ``aux`` as the objective returned it."""
    with torch.enable_grad():
        leaves = tape_leaves(phi)
        value, aux = objective(leaves)
        # a value that reaches no leaf (K = 0 and an F that does not read φ) has derivative 0, not an error
        found = (torch.autograd.grad(value, list(leaves.values()), allow_unused=True) if value.requires_grad
                 else [None] * len(leaves))
    return fill_none(found, phi), value.detach(), aux


def warn_if_zero_hypergradient(hypergrad: Params, solver: str, reason: str = GENERIC_ZERO_REASON) -> None:
    """Warn with :class:`ZeroHypergradientWarning` when every entry of ``hypergrad`` is exactly 0.

    A true hypergradient is essentially never exactly zero in floating point; an exact zero means the outer
    params had no path to the outer loss at this point (``reason`` says the likely one). Skipped under vmap
    (no host read) and for empty outer params.
    """
    values = list(hypergrad.values())
    if not values or any_batched(values) or sum(v.numel() for v in values) == 0:
        return
    if all(bool((v == 0).all()) for v in values):
        warnings.warn(f"solver {solver} returned a hypergradient that is exactly zero in every entry: {reason}.",
                      ZeroHypergradientWarning, stacklevel=4)
