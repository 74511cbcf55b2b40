"""Forward-mode differentiation through the unrolled inner loop.

For each basis direction e_i of the outer params, ``torch.func.jvp`` pushes the tangent dθ_k/dφ · e_i
forward with the iterates, giving the exact derivative of the K-step loop

    ∂/∂φ_i F(θ_K(φ), φ)      for every i,

with memory independent of K (no trajectory is stored) and cost growing with dim(φ): the loop is rerun
once per chunk of ``chunk_size`` directions, the directions of a chunk vmapped together.
Diagnostics: ``inner_grad_norm`` = ‖∇θG(θ_K, φ)‖ and ``inner_grad_norm_rel`` (divided by ‖∇θG(θ_0, φ)‖),
both on the batch of the last inner step (two extra gradients); reported, not warned about, since the
derivative of the K-step loop does not assume stationarity.
Reference: Franceschi et al., "Forward and Reverse Gradient-Based Hyperparameter Optimization",
arXiv:1703.01785.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.func import jvp, vmap

from .. import tree
from ..autodiff import is_batched
from ..inner import raise_if_nonfinite
from ..types import HypergradResult
from .common import last, scalar, unrolled_stationarity, warn_if_zero_hypergradient


@dataclass(frozen=True)
class Forward:
    """``forward``: jvp through the unrolled loop, ``chunk_size`` tangent directions per vmapped pass.

    Memory: O(chunk_size · (|θ| + |φ|)) on top of one inner step, flat in the number of inner steps.
    Time: ⌈dim(φ)/chunk_size⌉ vmapped runs of the inner loop.
    """

    chunk_size: int = 32

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"Forward.chunk_size must be >= 1, got {self.chunk_size}")

    def init(self, problem, inner, outer) -> Any:
        return None

    def __call__(self, problem, inner, outer, inner_batch, outer_batch, loop, state) -> HypergradResult:
        theta0, phi = tree.detach(inner), tree.detach(outer)

        def objective(p):
            th, _, losses = loop.run(problem, theta0, p, inner_batch, check_finite=False)
            return problem.outer(th, p, outer_batch), (tree.detach(th), losses)

        def directional(tangent):
            value, derivative, aux = jvp(objective, (phi,), (tangent,), has_aux=True)
            return derivative, value.detach(), aux

        n = tree.numel(phi)
        ref = next(iter(phi.values()))
        flat_grad, aux, value = [], None, None
        for begin in range(0, n, self.chunk_size):
            rows = torch.arange(begin, min(n, begin + self.chunk_size), device=ref.device)
            basis = torch.zeros(len(rows), n, dtype=ref.dtype, device=ref.device)
            basis[torch.arange(len(rows), device=ref.device), rows] = 1.0
            tangents = {k: v for k, v in _split_rows(basis, phi).items()}
            derivative, values, aux_chunk = vmap(directional)(tangents)
            flat_grad.append(derivative)
            if aux is None:
                value, aux = values[0], (tree.tree_map(lambda x: x[0], aux_chunk[0]), aux_chunk[1][0])
        theta_k, losses = aux
        if losses.numel() and not is_batched(losses):
            raise_if_nonfinite(losses, 0, "inner loss", "inner step")
        hypergrad = tree.unflatten(torch.cat(flat_grad), phi)
        chunks = len(flat_grad)
        diagnostics = {
            "inner_loss": last(losses), "outer_loss": scalar(value), "inner_steps": float(loop.steps),
            "hvp_count": float(loop.steps * n), "evaluations": float(loop.steps * chunks + 2),
            "chunks": float(chunks), **unrolled_stationarity(problem, theta0, theta_k, phi, inner_batch, loop.steps),
        }
        warn_if_zero_hypergradient(hypergrad, "Forward")
        return HypergradResult(hypergrad, theta_k, diagnostics, None)


def _split_rows(basis: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cut each row of ``basis`` (shape (c, n)) into a params dict: leaves of shape (c, *leaf.shape)."""
    out, start = {}, 0
    for k, v in like.items():
        out[k] = basis[:, start:start + v.numel()].reshape(basis.shape[0], *v.shape)
        start += v.numel()
    return out
