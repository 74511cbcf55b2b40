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
``torch.utils.checkpoint`` is not used: torch.func transforms refuse saved-tensor hooks, which
non-reentrant checkpointing needs, and the reentrant kind cannot serve ``autograd.grad``; the
hand-written adjoint is the same maths on both paths.

Two paths (:mod:`bilevel.paths`, reported as ``diagnostics["autodiff_path"]``): outside torch.func
transforms the K-step loop is recorded on the autograd tape (each step's gradient with ``create_graph``,
no in-place updates) and dF/dφ is one ``torch.autograd.grad`` of F, as higher does; each adjoint step of
the checkpointed variant is one ``torch.autograd.grad`` through the recorded step. The undifferentiated
prefix (truncation) and the checkpointed forward passes record nothing. Under ``vmap`` (or a transform)
the same maths runs on torch.func (``grad`` of the loop, ``vjp`` per adjoint step).
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
from ..autodiff import is_batched, tape_leaves, value_and_grads
from ..inner import batch_at, raise_if_nonfinite
from ..paths import AUTOGRAD, FUNC
from ..types import HypergradResult
from .common import (detach_state, last, outer_fn, scalar, solver_path, split_float_leaves, tape_objective_grad,
                     unrolled_stationarity, warn_if_zero_hypergradient, zeros_like_leaves)


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
        path = solver_path(inner, outer)
        steps = loop.steps
        differentiated = steps if self.truncate == 0 else min(self.truncate, steps)
        start = steps - differentiated
        phi, theta_0 = tree.detach(outer), tree.detach(inner)
        theta, opt_state, prefix_losses = loop.run(problem, theta_0, phi, inner_batch, steps=start, path=path,
                                                   create_graph=False)
        theta, opt_state = tree.detach(theta), detach_state(opt_state)
        if self.checkpoint:
            hypergrad, theta_k, value, losses = self._adjoint(problem, theta, opt_state, phi, inner_batch,
                                                              outer_batch, loop, start, differentiated, path)
        else:
            def objective(p):
                th, _, ls = loop.run(problem, theta, p, inner_batch, steps=differentiated, opt_state=opt_state,
                                     start=start, check_finite=False, path=path, create_graph=True)
                value = problem.outer(th, p, outer_batch)
                return value, (value.detach(), tree.detach(th), ls)

            if path == AUTOGRAD:  # the K-step graph on the tape (create_graph), then one backward pass of F
                hypergrad, value, (_, theta_k, losses) = tape_objective_grad(objective, phi)
            else:
                hypergrad, (value, theta_k, losses) = grad(objective, has_aux=True)(phi)
        if losses.numel() and not is_batched(losses):
            raise_if_nonfinite(losses, start, "inner loss", "inner step")
        all_losses = torch.cat([prefix_losses.to(losses), losses]) if prefix_losses.numel() else losses
        diagnostics = {
            "inner_loss": last(all_losses), "outer_loss": scalar(value), "inner_steps": float(steps),
            "differentiated_steps": float(differentiated),
            "hvp_count": float(differentiated),
            "evaluations": float(steps + (differentiated if self.checkpoint else 0) + 2),
            **unrolled_stationarity(problem, theta_0, theta_k, phi, inner_batch, steps, path),
            "autodiff_path": path,
        }
        hypergrad = tree.detach(hypergrad)
        warn_if_zero_hypergradient(hypergrad, "Unroll")
        return HypergradResult(hypergrad, theta_k, diagnostics, None)

    def _adjoint(self, problem, theta, opt_state, phi, inner_batch, outer_batch, loop, start, count, path):
        segment = self.segment or max(1, math.ceil(math.sqrt(max(count, 1))))
        boundaries, losses = [], []
        th, st = theta, opt_state
        for s0 in range(0, count, segment):
            boundaries.append((s0, th, st))
            th, st, ls = loop.run(problem, th, phi, inner_batch, steps=min(segment, count - s0), opt_state=st,
                                  start=start + s0, check_finite=False, path=path, create_graph=False)
            losses.append(ls)
        theta_k = tree.detach(th)
        value, lam_theta, hypergrad = value_and_grads(outer_fn(problem, outer_batch), theta_k, phi, path)
        lam_state = zeros_like_leaves(split_float_leaves(st)[0]) if st is not None else []
        step_vjp = _tape_step_vjp if path == AUTOGRAD else _func_step_vjp
        for s0, th, st in reversed(boundaries):
            n = min(segment, count - s0)
            trajectory = []
            for k in range(n):  # recompute the segment, keeping its iterates (no activations)
                trajectory.append((th, st))
                th, st, _ = loop.step(problem, th, st, phi, batch_at(inner_batch, start + s0 + k), path=path,
                                      create_graph=False)
                th, st = tree.detach(th), detach_state(st)
            for k in reversed(range(n)):
                th_k, st_k = trajectory[k]
                batch = batch_at(inner_batch, start + s0 + k)
                lam_theta, lam_state, g_phi = step_vjp(loop, problem, th_k, st_k, phi, batch, lam_theta, lam_state)
                hypergrad = tree.add(hypergrad, g_phi)
        return hypergrad, theta_k, value, torch.cat(losses) if losses else torch.zeros(0)


def _func_step_vjp(loop, problem, th_k, st_k, phi, batch, lam_theta, lam_state):
    """(λ_k, μ_k, g_k) = (∂Φ/∂(θ, s, φ))ᵀ (λ_{k+1}, μ_{k+1}) for the step at (θ_k, s_k), with ``torch.func.vjp``."""
    if st_k is None:
        def step_fn(t, p):
            t2, s2, _ = loop.step(problem, t, None, p, batch, path=FUNC)
            return t2, split_float_leaves(s2)[0]

        _, vjp_fn = vjp(step_fn, th_k, phi)
        lam_theta, g_phi = vjp_fn((lam_theta, lam_state))
        return lam_theta, [], g_phi
    leaves, rebuild = split_float_leaves(st_k)

    def step_fn(t, s_leaves, p):
        t2, s2, _ = loop.step(problem, t, rebuild(s_leaves), p, batch, path=FUNC)
        return t2, split_float_leaves(s2)[0]

    _, vjp_fn = vjp(step_fn, th_k, leaves, phi)
    return vjp_fn((lam_theta, lam_state))


def _tape_step_vjp(loop, problem, th_k, st_k, phi, batch, lam_theta, lam_state):
    """:func:`_func_step_vjp` on the tape: the step recorded with ``create_graph`` from fresh leaves (θ_k, the
    float leaves of s_k, φ), then one ``torch.autograd.grad`` with the cotangents (λ_{k+1}, μ_{k+1})."""
    with torch.enable_grad():
        t, p = tape_leaves(th_k), tape_leaves(phi)
        if st_k is None:
            s_leaves, state = [], None
        else:
            float_state, rebuild = split_float_leaves(st_k)
            s_leaves = [x.detach().requires_grad_(True) for x in float_state]
            state = rebuild(s_leaves)
        t2, s2, _ = loop.step(problem, t, state, p, batch, path=AUTOGRAD, create_graph=True)
        outputs = [*t2.values(), *split_float_leaves(s2)[0]]
        cotangents = [*lam_theta.values(), *lam_state]
        pairs = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]  # outputs constant in the inputs
        inputs = [*t.values(), *s_leaves, *p.values()]
        found = torch.autograd.grad([o for o, _ in pairs], inputs, [c for _, c in pairs], allow_unused=True) \
            if pairs else [None] * len(inputs)
    found = [g if g is not None else torch.zeros_like(x) for g, x in zip(found, inputs)]
    n_t, n_s = len(t), len(s_leaves)
    return (dict(zip(th_k, found[:n_t])), found[n_t:n_t + n_s],
            dict(zip(phi, found[n_t + n_s:])))
