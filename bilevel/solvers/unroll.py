"""Reverse-mode differentiation through the unrolled inner loop (iterative differentiation, ITD).

With θ_{k+1} = Φ(θ_k, s_k, φ) the optimiser step (s_k its state) and θ_K the inner params after K steps,
``unroll`` returns the exact derivative of the K-step loop

    d/dφ F(θ_K(φ), φ).

``truncate=T`` differentiates only the last T steps (the first K − T run with φ held constant):
Shaban et al., arXiv:1810.10667. Memory grows linearly with the number of differentiated steps.

``checkpoint=True`` trades compute for memory with a hand-written adjoint pass: only the iterates at
segment boundaries (every ``segment`` steps, default ⌈√T⌉) are kept; each segment is recomputed and
differentiated step by step with ``torch.func.vjp``:

    λ_K = ∇_θ F,   (λ_k, μ_k, g_k) = (∂Φ/∂(θ, s, φ))ᵀ (λ_{k+1}, μ_{k+1}),   dF/dφ = ∇_φ F + Σ_k g_k.

Memory O((T/segment + segment)·|θ|) instead of O(T · activations); about twice the compute.
``torch.utils.checkpoint`` cannot be used: torch.func transforms refuse saved-tensor hooks, which
non-reentrant checkpointing needs, and the reentrant kind cannot serve ``autograd.grad``.
Diagnostics: ``inner_grad_norm`` = ‖∇θG(θ_K, φ)‖ and ``inner_grad_norm_rel`` (divided by ‖∇θG(θ_0, φ)‖),
both on the batch of the last inner step (two extra gradients). The unrolled derivative does not assume
stationarity, so they are reported, never warned about.
Reference for ITD: Maclaurin et al., arXiv:1502.03492; Franceschi et al., arXiv:1703.01785.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import grad, vjp

from .. import tree
from ..autodiff import value_and_grads
from ..inner import batch_at, raise_if_nonfinite
from ..autodiff import is_batched
from ..types import HypergradResult
from .common import (detach_state, last, outer_fn, scalar, split_float_leaves, unrolled_stationarity,
                     warn_if_zero_hypergradient, zeros_like_leaves)


@dataclass(frozen=True)
class Unroll:
    """``unroll``: reverse mode through the last ``truncate`` inner steps (0: all of them).

    Args:
        truncate: number of final steps to differentiate through (0 means all K).
        checkpoint: recompute segments instead of storing activations (see the module docstring).
        segment: checkpoint segment length (0: ⌈√T⌉).
    """

    truncate: int = 0
    checkpoint: bool = False
    segment: int = 0

    def __post_init__(self) -> None:
        if self.truncate < 0 or self.segment < 0:
            raise ValueError("Unroll.truncate and Unroll.segment must be >= 0")

    def init(self, problem, inner, outer) -> Any:
        return None

    def __call__(self, problem, inner, outer, inner_batch, outer_batch, loop, state) -> HypergradResult:
        steps = loop.steps
        differentiated = steps if self.truncate == 0 else min(self.truncate, steps)
        start = steps - differentiated
        phi, theta_0 = tree.detach(outer), tree.detach(inner)
        theta, opt_state, prefix_losses = loop.run(problem, theta_0, phi, inner_batch, steps=start)
        theta, opt_state = tree.detach(theta), detach_state(opt_state)
        if self.checkpoint:
            hypergrad, theta_k, value, losses = self._adjoint(problem, theta, opt_state, phi, inner_batch,
                                                              outer_batch, loop, start, differentiated)
        else:
            def objective(p):
                th, _, ls = loop.run(problem, theta, p, inner_batch, steps=differentiated, opt_state=opt_state,
                                     start=start, check_finite=False)
                value = problem.outer(th, p, outer_batch)
                return value, (value.detach(), tree.detach(th), ls)

            hypergrad, (value, theta_k, losses) = grad(objective, has_aux=True)(phi)
        if losses.numel() and not is_batched(losses):
            raise_if_nonfinite(losses, start, "inner loss", "inner step")
        all_losses = torch.cat([prefix_losses.to(losses), losses]) if prefix_losses.numel() else losses
        diagnostics = {
            "inner_loss": last(all_losses), "outer_loss": scalar(value), "inner_steps": float(steps),
            "differentiated_steps": float(differentiated),
            "hvp_count": float(differentiated),
            "evaluations": float(steps + (differentiated if self.checkpoint else 0) + 2),
            **unrolled_stationarity(problem, theta_0, theta_k, phi, inner_batch, steps),
        }
        hypergrad = tree.detach(hypergrad)
        warn_if_zero_hypergradient(hypergrad, "Unroll")
        return HypergradResult(hypergrad, theta_k, diagnostics, None)

    def _adjoint(self, problem, theta, opt_state, phi, inner_batch, outer_batch, loop, start, count):
        segment = self.segment or max(1, math.ceil(math.sqrt(max(count, 1))))
        boundaries, losses = [], []
        th, st = theta, opt_state
        for s0 in range(0, count, segment):
            boundaries.append((s0, th, st))
            th, st, ls = loop.run(problem, th, phi, inner_batch, steps=min(segment, count - s0), opt_state=st,
                                  start=start + s0, check_finite=False)
            losses.append(ls)
        theta_k = tree.detach(th)
        value, lam_theta, hypergrad = value_and_grads(outer_fn(problem, outer_batch), theta_k, phi)
        lam_state = zeros_like_leaves(split_float_leaves(st)[0]) if st is not None else []
        for s0, th, st in reversed(boundaries):
            n = min(segment, count - s0)
            trajectory = []
            for k in range(n):  # recompute the segment, keeping its iterates (no activations)
                trajectory.append((th, st))
                th, st, _ = loop.step(problem, th, st, phi, batch_at(inner_batch, start + s0 + k))
                th, st = tree.detach(th), detach_state(st)
            for k in reversed(range(n)):
                th_k, st_k = trajectory[k]
                batch = batch_at(inner_batch, start + s0 + k)
                if st_k is None:
                    def step_fn(t, p, _batch=batch):
                        t2, s2, _ = loop.step(problem, t, None, p, _batch)
                        return t2, split_float_leaves(s2)[0]

                    _, vjp_fn = vjp(step_fn, th_k, phi)
                    lam_theta, g_phi = vjp_fn((lam_theta, lam_state))
                    lam_state = []
                else:
                    leaves, rebuild = split_float_leaves(st_k)

                    def step_fn(t, s_leaves, p, _batch=batch, _rebuild=rebuild):
                        t2, s2, _ = loop.step(problem, t, _rebuild(s_leaves), p, _batch)
                        return t2, split_float_leaves(s2)[0]

                    _, vjp_fn = vjp(step_fn, th_k, leaves, phi)
                    lam_theta, lam_state, g_phi = vjp_fn((lam_theta, lam_state))
                hypergrad = tree.add(hypergrad, g_phi)
        return hypergrad, theta_k, value, torch.cat(losses) if losses else torch.zeros(0)
