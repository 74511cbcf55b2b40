"""Implicit differentiation (IFT) at the inner solution, with a pluggable linear solver.

At a stationary point ∇_θ G(θ*, φ) = 0 the implicit function theorem gives

    dF/dφ = ∇_φ F − (∂²G/∂φ∂θ)ᵀ (H + δI)⁻¹ ∇_θ F,      H = ∂²G/∂θ²,

all evaluated at (θ*, φ), with δ = 0 the exact IFT. The inner loop approximates θ*; a linear solver from
:mod:`bilevel.linsolve` (CG, Neumann, fixed point, dense) approximates (H + δI)⁻¹ ∇_θ F with
Hessian-vector products. ``damping`` δ > 0 is Tikhonov damping (equivalently a proximal term
½δ‖θ − θ*‖² added to G: same stationary point and mixed term, Hessian H + δI); it makes the solve
well-posed when H at a trained network is slightly indefinite, at the price of a biased hypergradient
(bias O(δ/λ_min) on each eigen-direction). ``relative_damping=true`` reads δ as a multiple of the
power-iteration estimate of λ_max(H), which makes one setting work across loss scales.
Cost: the inner loop, one outer gradient, one HVP per matvec of the linear solver, one mixed vjp
(+ ``power_iterations`` HVPs for relative damping or ``alpha=auto``). Memory: independent of the number
of inner steps. References: Pedregosa, arXiv:1602.02355 (CG); Lorraine et al., arXiv:1911.02590
(Neumann); Grazzi et al., arXiv:2006.16218 (fixed point).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from .. import linsolve, tree
from ..autodiff import HVP_MODES, hvp_operator, mixed_vjp, value_and_grads
from ..types import HypergradResult
from .common import hessian_batch, inner_fn, last, outer_fn, scalar

POWER_ITERATIONS = 20


@dataclass(frozen=True)
class Implicit:
    """IFT hypergradient with any linear solver: ``Implicit(linsolve=bilevel.CG(maxiter=50))``.

    The registry's ``cg``, ``neumann``, ``fixedpoint`` and ``exact`` build this class with the named
    linear solver; their spec options are the union of these fields and the linear solver's.

    Args:
        linsolve: a :mod:`bilevel.linsolve` solver ``(matvec, b, x0) -> (x, info)`` for (H + δI) x = ∇_θ F.
        hvp: ``auto`` (reverse-over-reverse with the gradient linearised once), ``revrev`` or ``fwdrev``.
        warm_start: start the linear solve from the previous call's solution (kept in the state); only
            for linear solvers that take a starting point.
        damping: δ ≥ 0 added to the Hessian (see the module docstring).
        relative_damping: read ``damping`` as a multiple of λ̂_max(H), estimated with the linear solver's
            ``power_iterations`` (or :data:`POWER_ITERATIONS` for solvers without that option) HVPs.
    """

    linsolve: Any = linsolve.CG()
    hvp: str = "auto"
    warm_start: bool = True
    damping: float = 0.0
    relative_damping: bool = False

    def __post_init__(self) -> None:
        if self.hvp not in HVP_MODES:
            raise ValueError(f"hvp must be one of {HVP_MODES}, got {self.hvp!r}")
        if not callable(self.linsolve):
            raise TypeError(f"Implicit.linsolve must be a linear solver from bilevel.linsolve, got {self.linsolve!r}")
        if self.warm_start and not getattr(self.linsolve, "supports_warm_start", True):
            raise ValueError(f"warm_start=True, but {type(self.linsolve).__name__} takes no starting point; "
                             "use warm_start=false")
        if not self.damping >= 0:
            raise ValueError(f"damping must be >= 0, got {self.damping}")

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
            hessian = hvp_operator(lambda t: g_fn(t, phi), theta, self.hvp)
            solver, delta, lam, extra_hvps = self._damped(hessian, g_theta)
            matvec = hessian if not delta else (lambda v: tree.axpy(delta, v, hessian(v)))
            x0 = state if (self.warm_start and state is not None) else None
            x, info = solver(matvec, g_theta, x0)
            hypergrad = tree.sub(g_phi, mixed_vjp(g_fn, theta, phi, x))
        diagnostics = {
            "inner_loss": last(losses), "outer_loss": scalar(f_value), "inner_steps": float(loop.steps),
            "hvp_count": float(info.matvecs + extra_hvps), "evaluations": float(loop.steps),
            "residual": info.residual, "iterations": float(info.iterations), "converged": float(info.converged),
        }
        if delta:
            diagnostics["damping"] = scalar(delta)
        if info.alpha is not None:
            diagnostics["alpha"] = scalar(info.alpha)
        if lam is not None or info.lambda_max is not None:
            diagnostics["lambda_max"] = scalar(lam if lam is not None else info.lambda_max)
        return HypergradResult(tree.detach(hypergrad), theta, diagnostics,
                               tree.detach(x) if self.warm_start else None)

    def _damped(self, hessian, like):
        """The linear solver to use, δ, λ̂_max(H) (or None) and the HVPs spent estimating it.

        With relative damping λ̂_max(H) is estimated once; ``alpha=auto`` then reuses it, since
        λ_max(H + δI) = λ_max(H) + δ exactly.
        """
        if not (self.damping and self.relative_damping):
            return self.linsolve, self.damping, None, 0
        iterations = getattr(self.linsolve, "power_iterations", POWER_ITERATIONS)
        lam = linsolve.power_iteration(hessian, like, iterations)
        lam_value = lam if torch.is_tensor(lam) and not _host_readable(lam) else float(lam)
        delta = self.damping * abs(lam_value)
        solver = self.linsolve
        if getattr(solver, "alpha", None) == linsolve.AUTO:
            solver = dataclasses.replace(solver, alpha=1.0 / (abs(lam_value) + delta))
        return solver, delta, lam_value, iterations


def _host_readable(t: torch.Tensor) -> bool:
    from ..autodiff import is_batched
    return not is_batched(t)
