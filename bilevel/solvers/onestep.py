"""One-step online lookahead (DARTS / ML3 / AdaLFL style).

From a warm start θ (the model being trained online, never reset) take one differentiable inner step
θ'(φ) = Φ(θ, s, φ) with the loop's optimiser and return

    exact:             d/dφ F(θ'(φ), φ)                   (differentiates through the optimiser update)
    finite_difference: ∇_φF(θ', φ) − η [∇_φG(θ⁺, φ) − ∇_φG(θ⁻, φ)] / (2ε),  θ± = θ ± ε∇_θF(θ', φ)
                       (DARTS eq. 8; plain SGD only; ε = fd_epsilon / ‖∇_θF‖)
    first_order:       ∇_φF(θ', φ)                        (drops dθ'/dφ; zero when φ enters G only)

The returned ``inner`` is θ', and the state carries the inner optimiser state, so repeated calls train the
model online. Outside torch.func transforms the step and its derivative run on the autograd tape (one
``create_graph`` gradient, one backward pass), under transforms on torch.func (:mod:`bilevel.paths`; the
path is reported as ``diagnostics["autodiff_path"]``). Cost: one inner gradient plus one backward
through it (exact), or two extra mixed gradients (finite_difference), plus one inner gradient for the
diagnostics ``inner_grad_norm`` = ‖∇θG(θ', φ)‖ and ``inner_grad_norm_rel`` = ‖∇θG(θ', φ)‖ / ‖∇θG(θ, φ)‖,
both on the step's batch (‖∇θG(θ, φ)‖ is the step's own gradient; under autocast, where that gradient is
in reduced precision, a second full-precision gradient is spent on it).

dθ'/dφ = −η ∂²G/∂φ∂θ(θ) depends on θ: under a multiplicative penalty such as exp(φ)·θ², it vanishes at
θ = 0, and a one-step lookahead from all-zero weights returns an exactly zero hypergradient. The
differentiating solvers (implicit, unroll, forward, onestep) warn with
:class:`~bilevel.errors.ZeroHypergradientWarning` and the likely reason when they return an exact zero.

References: Liu et al. (DARTS), arXiv:1806.09055; Bechtle et al. (ML3), arXiv:1906.05374; Raymond et al.
(AdaLFL), arXiv:2301.13247.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.func import grad

from .. import tree
from ..autodiff import is_batched, tape_value_and_grad, value_and_grads
from ..inner import batch_at
from ..paths import AUTOGRAD
from ..types import HypergradResult
from .common import (detach_state, full_precision, inner_fn, outer_fn, scalar, solver_path, tape_objective_grad,
                     unrolled_stationarity, warn_if_zero_hypergradient)

MODES = ("exact", "finite_difference", "first_order")
ZERO_REASONS = {
    "exact": "the outer params reach F only through the inner step, and dθ'/dφ = −η ∂²G/∂φ∂θ vanishes at these "
             "inner params (e.g. all-zero weights under a multiplicative penalty such as exp(φ)·w²): start from "
             "a warm, trained θ",
    "first_order": "mode=first_order drops dθ'/dφ and returns ∇φF(θ', φ) alone, which is zero when the outer "
                   "params enter only the inner loss: use mode=exact",
}
ZERO_REASONS["finite_difference"] = ZERO_REASONS["exact"]


@dataclass(frozen=True)
class OneStep:
    """``onestep``: one-step lookahead from a warm start; ``mode`` in exact | finite_difference | first_order."""

    mode: str = "exact"
    fd_epsilon: float = 0.01

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"OneStep.mode must be one of {MODES}, got {self.mode!r}")

    def init(self, problem, inner, outer) -> Any:
        return None  # the inner optimiser state, created on the first step

    def __call__(self, problem, inner, outer, inner_batch, outer_batch, loop, state) -> HypergradResult:
        path = solver_path(inner, outer)
        theta, phi, batch = tree.detach(inner), tree.detach(outer), batch_at(inner_batch, 0)
        if self.mode == "exact":
            def objective(p):
                th, st, loss, g0 = loop.step_with_gradient(problem, theta, state, p, batch, path=path,
                                                           create_graph=True)
                value = problem.outer(th, p, outer_batch)
                return value, (value.detach(), tree.detach(th), st, loss.detach(), tree.detach(g0))

            if path == AUTOGRAD:
                hypergrad, value, (_, theta_new, new_state, loss, gradient_0) = tape_objective_grad(objective, phi)
            else:
                hypergrad, (value, theta_new, new_state, loss, gradient_0) = grad(objective, has_aux=True)(phi)
        else:
            theta_new, new_state, loss, gradient_0 = loop.step_with_gradient(problem, theta, state, phi, batch,
                                                                             path=path, create_graph=False)
            value, g_theta, hypergrad = value_and_grads(outer_fn(problem, outer_batch), theta_new, phi, path)
            if self.mode == "finite_difference":
                hypergrad = tree.sub(hypergrad, self._second_order(problem, theta, phi, batch, g_theta, loop, path))
        theta_new = tree.detach(theta_new)
        # ‖∇θG(θ)‖ is read from the step's own gradient (same point, same batch): one diagnostic gradient,
        # at θ', not two; under autocast the step's gradient is rounded, and a full-precision one is taken
        gradient_0 = gradient_0 if full_precision(theta) else None
        diagnostics = {"inner_loss": scalar(loss), "outer_loss": scalar(value), "inner_steps": 1.0,
                       "hvp_count": 1.0 if self.mode == "exact" else 0.0,
                       "evaluations": ((3.0 if self.mode == "finite_difference" else 1.0)
                                       + (1.0 if gradient_0 is not None else 2.0)),
                       **unrolled_stationarity(problem, theta, theta_new, phi, inner_batch, 1, path,
                                               gradient_0=gradient_0),
                       "autodiff_path": path}
        hypergrad = tree.detach(hypergrad)
        warn_if_zero_hypergradient(hypergrad, f"OneStep(mode={self.mode!r})", ZERO_REASONS[self.mode])
        return HypergradResult(hypergrad, theta_new, diagnostics, detach_state(new_state))

    def _second_order(self, problem, theta, phi, batch, v, loop, path):
        """η (∂²G/∂φ∂θ)ᵀ v by central differences of ∇_φ G along v (DARTS eq. 8)."""
        if loop.optimizer != "sgd":
            raise ValueError("OneStep(mode='finite_difference') assumes a plain SGD inner step "
                             f"(θ' = θ − η∇G); the loop uses {loop.optimizer!r}. Use mode='exact'.")
        norm = tree.norm(v)  # under vmap a batched tensor, which cannot be read on the host
        eps = self.fd_epsilon / (torch.clamp(norm, min=1e-12) if is_batched(norm) else max(float(norm), 1e-12))
        g_inner = inner_fn(problem, batch)
        if path == AUTOGRAD:
            g_fn = lambda th, ph: tape_value_and_grad(lambda p: g_inner(th, p), ph)[1]
        else:
            g_fn = grad(g_inner, argnums=1)
        g_plus = g_fn(tree.axpy(eps, v, theta), phi)
        g_minus = g_fn(tree.axpy(-eps, v, theta), phi)
        return tree.scale(tree.sub(g_plus, g_minus), loop.lr / (2 * eps))
