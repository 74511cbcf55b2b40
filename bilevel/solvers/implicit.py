"""Implicit differentiation (IFT) at the inner solution.

At a stationary point ∇_θ G(θ*, φ) = 0 the implicit function theorem gives

    dF/dφ = ∇_φ F − (∂²G/∂φ∂θ)ᵀ H⁻¹ ∇_θ F,      H = ∂²G/∂θ²,

all evaluated at (θ*, φ). The inner loop approximates θ*; a linear solver approximates H⁻¹ ∇_θ F with
Hessian-vector products. Cost: the inner loop, one outer gradient, one HVP per linear-solver matvec and
one mixed vjp. Memory: independent of the number of inner steps.
References: Pedregosa, arXiv:1602.02355 (CG); Lorraine et al., arXiv:1911.02590 (Neumann);
Grazzi et al., arXiv:2006.16218 (fixed point).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import linsolve, tree
from ..autodiff import HVP_MODES, hvp_operator, mixed_vjp, value_and_grads
from ..types import HypergradResult
from .common import hessian_batch, inner_fn, last, outer_fn, scalar


@dataclass(frozen=True)
class Implicit:
    """IFT hypergradient with any linear solver (object API; the registry has one subclass per solver).

    Args:
        linear_solver: a :mod:`bilevel.linsolve` solver for H x = ∇_θ F.
        hvp: ``auto`` (reverse-over-reverse with the gradient linearised once), ``revrev`` or ``fwdrev``.
        warm_start: start the linear solve from the previous call's solution (kept in the state).
    """

    linear_solver: Any = linsolve.CG()
    hvp: str = "auto"
    warm_start: bool = True

    def __post_init__(self) -> None:
        if self.hvp not in HVP_MODES:
            raise ValueError(f"hvp must be one of {HVP_MODES}, got {self.hvp!r}")

    def make_linear_solver(self) -> Any:
        return self.linear_solver

    def init(self, problem, inner, outer) -> Any:
        return None

    def __call__(self, problem, inner, outer, inner_batch, outer_batch, loop, state) -> HypergradResult:
        if loop.weight_decay:
            raise ValueError(
                f"implicit solvers differentiate the stationarity of inner_loss, but InnerLoop.weight_decay="
                f"{loop.weight_decay} moves the loop's fixed point away from it; put the L2 term in inner_loss.")
        phi = tree.detach(outer)
        theta, _, losses = loop.run(problem, tree.detach(inner), phi, inner_batch)
        theta = tree.detach(theta)
        # Mixed-precision policy: the inner loop may run under autocast, but the gradients at the solution,
        # the Hessian-vector products and the linear solve run in full precision (a bf16 HVP has ~3
        # significant digits, too few for CG/Neumann to converge).
        device_type = next(iter(theta.values())).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            g_fn = inner_fn(problem, hessian_batch(inner_batch, loop.steps))
            f_value, g_theta, g_phi = value_and_grads(outer_fn(problem, outer_batch), theta, phi)
            matvec = hvp_operator(lambda t: g_fn(t, phi), theta, self.hvp)
            x0 = state if (self.warm_start and state is not None) else None
            x, info = self.make_linear_solver()(matvec, g_theta, x0)
            hypergrad = tree.sub(g_phi, mixed_vjp(g_fn, theta, phi, x))
        diagnostics = {
            "inner_loss": last(losses), "outer_loss": scalar(f_value), "inner_steps": float(loop.steps),
            "hvp_count": float(info.matvecs), "evaluations": float(loop.steps),
            "residual": info.residual, "iterations": float(info.iterations), "converged": float(info.converged),
        }
        return HypergradResult(tree.detach(hypergrad), theta, diagnostics,
                               tree.detach(x) if self.warm_start else None)


@dataclass(frozen=True)
class ImplicitCG(Implicit):
    """``cg``: IFT with conjugate gradient (``maxiter`` HVPs at most, stops at ``rtol``/``atol``)."""

    linear_solver: Any = None
    maxiter: int = 100
    rtol: float = 1e-6
    atol: float = 0.0

    def make_linear_solver(self) -> linsolve.CG:
        return linsolve.CG(maxiter=self.maxiter, rtol=self.rtol, atol=self.atol)


@dataclass(frozen=True)
class ImplicitNeumann(Implicit):
    """``neumann``: IFT with the truncated Neumann series α Σ_{j<terms} (I − αH)^j (``terms − 1`` HVPs).

    The default of 15 terms follows the ITL paper (Gao et al., ICML 2022); choose ``alpha`` below
    2/λ_max(H). No warm start: the series always starts from b.
    """

    linear_solver: Any = None
    alpha: float = 0.01
    terms: int = 15
    warm_start: bool = False

    def make_linear_solver(self) -> linsolve.Neumann:
        return linsolve.Neumann(alpha=self.alpha, terms=self.terms)


@dataclass(frozen=True)
class ImplicitFixedPoint(Implicit):
    """``fixedpoint``: IFT with Richardson iteration x ← x + α(∇_θF − Hx), warm-started, stops at ``rtol``."""

    linear_solver: Any = None
    alpha: float = 0.01
    maxiter: int = 200
    rtol: float = 1e-6

    def make_linear_solver(self) -> linsolve.FixedPoint:
        return linsolve.FixedPoint(alpha=self.alpha, maxiter=self.maxiter, rtol=self.rtol)


@dataclass(frozen=True)
class ImplicitExact(Implicit):
    """``exact``: IFT with a dense direct solve of H (tiny problems and tests; n HVPs, O(n³))."""

    linear_solver: Any = None
    warm_start: bool = False

    def make_linear_solver(self) -> linsolve.Exact:
        return linsolve.Exact()
