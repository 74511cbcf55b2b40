"""Implicit differentiation (IFT) at the inner solution, with a pluggable linear solver.

At a stationary point ∇_θ G(θ*, φ) = 0 the implicit function theorem gives

    dF/dφ = ∇_φ F − (∂²G/∂φ∂θ)ᵀ (H + δI)⁻¹ ∇_θ F,      H = ∂²G/∂θ²,

all evaluated at (θ*, φ), with δ = 0 the exact IFT. The inner loop approximates θ*; a linear solver from
:mod:`bilevel.linsolve` (CG, Neumann, fixed point, dense, Nyström) approximates (H + δI)⁻¹ ∇_θ F
with Hessian-vector products (Nyström: a rank-k sketch of H solved with the ridge δ + ρ, so biased by
design). ``damping`` δ > 0 is Tikhonov damping (equivalently a proximal term ½δ‖θ − θ*‖² added to G:
same stationary point and mixed term, Hessian H + δI); it makes the solve well-posed when H at a trained
network is slightly indefinite, at the price of a biased hypergradient (bias O(δ/λ_min) on each
eigen-direction). ``relative_damping=true`` reads δ as a multiple of the
power-iteration estimate of λ_max(H), which makes one setting work across loss scales.
Cost: the inner loop, one outer gradient, one HVP per matvec of the linear solver (including the one
that measures the true residual), one mixed vjp (+ ``power_iterations`` HVPs for relative damping or
``alpha=auto``), and one inner gradient at θ_0 for the stationarity diagnostic (two with ``hvp=fwdrev``).
Memory: independent of the number of inner steps.

Two paths (:mod:`bilevel.paths`, reported as ``diagnostics["autodiff_path"]``): outside torch.func
transforms the inner loop runs on the autograd tape without recording a graph (nothing differentiates
through it), and ∇θG(θ_K, φ) is recorded once with ``create_graph``; every HVP and the mixed vjp are
backward passes through that one graph (:class:`~bilevel.autodiff.TapeHessian`), so the mixed term costs
no gradient of its own (one inner-loss evaluation fewer than on torch.func, which linearises ∇θG for the
HVPs and again for the mixed vjp). Under ``vmap`` the same maths runs on torch.func.

Diagnostics never lie: besides the linear solve's true ``residual`` (batched under vmap) and ``converged``
(NaN under vmap, where no host-side decision can be made), every call reports the stationarity it differentiated at,
``inner_grad_norm`` = ‖∇θG(θ_K, φ)‖ and ``inner_grad_norm_rel`` = ‖∇θG(θ_K, φ)‖ / ‖∇θG(θ_0, φ)‖, both on
the Hessian batch ``inner_batch(K)``, and warns (:class:`~bilevel.errors.StationarityWarning`) when the
ratio exceeds ``stationarity_rtol``: the IFT's premise ∇θG = 0 does not hold there. With a warm-started
θ_0 the ratio is taken against an already small start gradient, so it reads higher than from a fresh start.

References: Pedregosa, arXiv:1602.02355 (CG); Lorraine et al., arXiv:1911.02590 (Neumann); Grazzi et al.,
arXiv:2006.16218 (fixed point); Hataya & Yamada, arXiv:2302.09726 (Nyström).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.func import grad, vjp

from .. import linsolve, tree
from ..autodiff import (HVP_MODES, TapeForwardOverReverse, TapeHessian, hvp_operator, is_batched, mixed_vjp,
                        tape_value_and_grad, value_and_grads)
from ..errors import StationarityWarning
from ..paths import AUTOGRAD, FUNC
from ..tree import Params
from ..types import HypergradResult
from .common import (hessian_batch, inner_fn, inner_gradient_norm, last, outer_fn, scalar, solver_path, stationarity,
                     warn_if_zero_hypergradient)

POWER_ITERATIONS = 20


@dataclass(frozen=True)
class Implicit:
    """IFT hypergradient with any linear solver: ``Implicit(linsolve=bilevel.CG(maxiter=50))``.

    The registry's ``cg``, ``neumann``, ``fixedpoint``, ``exact`` and ``nystrom`` build this class with the
    named linear solver; their spec options are the union of these fields and the linear solver's.

    Args:
        linsolve: a :mod:`bilevel.linsolve` solver ``(matvec, b, x0) -> (x, info)`` for (H + δI) x = ∇_θ F.
        hvp: ``auto`` (reverse-over-reverse with the gradient linearised once), ``revrev`` or ``fwdrev``.
        warm_start: start the linear solve from the previous call's solution (kept in the state); only
            for linear solvers that take a starting point.
        damping: δ ≥ 0 added to the Hessian (see the module docstring).
        relative_damping: read ``damping`` as a multiple of λ̂_max(H), estimated with the linear solver's
            ``power_iterations`` (or :data:`POWER_ITERATIONS` for solvers without that option) HVPs.
        stationarity_rtol: warn with :class:`~bilevel.errors.StationarityWarning` when
            ‖∇θG(θ_K, φ)‖ / ‖∇θG(θ_0, φ)‖ on the Hessian batch exceeds it (0: never warn; nor with
            ``InnerLoop(steps=0)``, where the ratio is 1 by construction). The default 1e-3 asks the inner
            loop to have removed 99.9 % of the initial gradient norm.
    """

    linsolve: Any = linsolve.CG()
    hvp: str = "auto"
    warm_start: bool = True
    damping: float = 0.0
    relative_damping: bool = False
    stationarity_rtol: float = 1e-3

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
        check_damping = getattr(self.linsolve, "check_damping", None)  # a solver that needs δ > 0 in some setting
        if check_damping is not None:
            check_damping(self.damping)
        if not self.stationarity_rtol >= 0:
            raise ValueError(f"stationarity_rtol must be >= 0 (0 switches the stationarity warning off), "
                             f"got {self.stationarity_rtol}")

    def init(self, problem, inner, outer) -> Any:
        return None

    def __call__(self, problem, inner, outer, inner_batch, outer_batch, loop, state) -> HypergradResult:
        if loop.weight_decay:
            raise ValueError(
                f"implicit solvers differentiate the stationarity of inner_loss, but InnerLoop.weight_decay="
                f"{loop.weight_decay} moves the loop's fixed point away from it; put the L2 term in inner_loss.")
        path = solver_path(inner, outer)
        phi, theta_0 = tree.detach(outer), tree.detach(inner)
        # Nothing differentiates through the inner loop: on the tape it records no graph.
        theta, _, losses = loop.run(problem, theta_0, phi, inner_batch, path=path, create_graph=False)
        theta = tree.detach(theta)
        # Mixed-precision policy: the inner loop may run under autocast, but the gradients at the solution,
        # the Hessian-vector products and the linear solve run in full precision (a bf16 HVP has ~3
        # significant digits, too few for CG/Neumann to converge).
        device_type = next(iter(theta.values())).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            g_fn = inner_fn(problem, hessian_batch(inner_batch, loop.steps))
            f_value, g_theta, g_phi = value_and_grads(outer_fn(problem, outer_batch), theta, phi, path)
            hessian, grad_k, gradients, mixed = self._linearise(g_fn, theta, phi, path)
            norm_0 = inner_gradient_norm(problem, theta_0, phi, hessian_batch(inner_batch, loop.steps), path)
            solver, delta, lam, extra_hvps = self._damped(hessian, g_theta)
            # test the option, not δ: under vmap a relative δ is a batched tensor, which has no truth value
            matvec = linsolve.Damped(hessian, delta) if self.damping else hessian
            x0 = state if (self.warm_start and state is not None) else None
            x, info = solver(matvec, g_theta, x0)
            hypergrad = tree.sub(g_phi, mixed(x))
        diagnostics = {
            "inner_loss": last(losses), "outer_loss": scalar(f_value), "inner_steps": float(loop.steps),
            "hvp_count": float(info.matvecs + extra_hvps), "evaluations": float(loop.steps + 1 + gradients),
            "residual": info.residual, "iterations": float(info.iterations),
            "converged": float("nan") if info.converged is None else float(info.converged),
            **stationarity(tree.norm(grad_k).detach(), norm_0), "autodiff_path": path,
        }
        if self.damping:
            diagnostics["damping"] = scalar(delta)
        if info.alpha is not None:
            diagnostics["alpha"] = scalar(info.alpha)
        if lam is not None or info.lambda_max is not None:
            diagnostics["lambda_max"] = scalar(lam if lam is not None else info.lambda_max)
        self._warn_if_not_stationary(diagnostics, loop.steps)
        hypergrad = tree.detach(hypergrad)
        warn_if_zero_hypergradient(hypergrad, f"Implicit({type(self.linsolve).__name__})")
        return HypergradResult(hypergrad, theta, diagnostics, tree.detach(x) if self.warm_start else None)

    def _linearise(self, g_fn: Callable[[Params, Params], torch.Tensor], theta: Params, phi: Params, path: str
                   ) -> tuple[Callable[[Params], Params], Params, int, Callable[[Params], Params]]:
        """At (θ_K, φ): the matvec v ↦ Hv, the gradient ∇θG(θ_K), how many extra gradients that cost, and the
        mixed term v ↦ (∂²G/∂φ∂θ)ᵀ v.

        ``auto``/``revrev`` linearise ∇G once (``vjp`` on torch.func, as
        :func:`~bilevel.autodiff.hvp_operator` does; a ``create_graph`` gradient on the tape, whose graph
        also serves the mixed term); the linearisation's primal output is ∇θG(θ_K) itself, so the
        stationarity check costs nothing there. ``fwdrev`` keeps no linearisation and spends one gradient.
        """
        g = lambda t: g_fn(t, phi)
        if path == AUTOGRAD:
            if self.hvp == "fwdrev":
                return (TapeForwardOverReverse(g, theta), tape_value_and_grad(g, theta)[1], 1,
                        lambda v: TapeHessian(g_fn, theta, phi).mixed_vjp(v))
            linearisation = TapeHessian(g_fn, theta, phi)
            return linearisation, linearisation.gradient, 0, linearisation.mixed_vjp
        mixed = lambda v: mixed_vjp(g_fn, theta, phi, v, path=FUNC)
        if self.hvp == "fwdrev":
            return hvp_operator(g, theta, "fwdrev", path=FUNC), grad(g)(theta), 1, mixed
        gradient, vjp_fn = vjp(grad(g), theta)
        return (lambda v: vjp_fn(v)[0]), tree.detach(gradient), 0, mixed

    def _warn_if_not_stationary(self, diagnostics: dict, steps: int) -> None:
        """Warn when ‖∇θG(θ_K)‖ / ‖∇θG(θ_0)‖ > stationarity_rtol (outside vmap, where it can be read).

        With no inner step θ_K = θ_0 and the ratio is 1 by construction: it says nothing (the caller chose
        the point, e.g. a known solution), so only ``inner_grad_norm`` is reported then.
        """
        rel, norm = diagnostics["inner_grad_norm_rel"], diagnostics["inner_grad_norm"]
        if (not isinstance(rel, float) or not steps or not self.stationarity_rtol
                or not rel > self.stationarity_rtol):
            return
        warnings.warn(
            f"implicit differentiation at a non-stationary inner point: after {steps} inner steps "
            f"‖∇θG(θ_K)‖ = {norm:.3g}, {rel:.3g} of its start value, > stationarity_rtol={self.stationarity_rtol:g} "
            "(on the Hessian batch). The implicit function theorem assumes ∇θG(θ_K) = 0, so this hypergradient "
            "is biased: run more inner steps (or raise the inner lr, or warm-start the inner params), or use an "
            "unrolled solver (unroll, forward), which differentiates the K-step loop as it is; "
            "stationarity_rtol=0 switches this warning off.", StationarityWarning, stacklevel=4)

    def _damped(self, hessian, like):
        """The linear solver to use, δ, λ̂_max(H) (or None) and the HVPs spent estimating it.

        With relative damping λ̂_max(H) is estimated once; ``alpha=auto`` then reuses it, since
        λ_max(H + δI) = λ_max(H) + δ exactly.
        """
        if not (self.damping and self.relative_damping):
            return self.linsolve, self.damping, None, 0
        iterations = getattr(self.linsolve, "power_iterations", POWER_ITERATIONS)
        lam = linsolve.power_iteration(hessian, like, iterations)
        lam_value = lam if is_batched(lam) else float(lam)
        delta = self.damping * abs(lam_value)
        solver = self.linsolve
        if getattr(solver, "alpha", None) == linsolve.AUTO:
            solver = dataclasses.replace(solver, alpha=1.0 / (abs(lam_value) + delta))
        return solver, delta, lam_value, iterations
