"""Linear solvers ``(matvec, b, x0) -> (x, LinearSolveInfo)`` for H x = b on parameter dicts.

H is the inner Hessian at the inner solution: symmetric, and positive definite when the inner problem
is strongly convex there. Every solver is a frozen dataclass of options. Under ``torch.func.vmap`` the
iterative solvers cannot stop early (that would be data-dependent control flow), so they run their full
iteration budget and their host-side checks are skipped.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
from torch import Tensor
from torch.func import vmap

from . import tree
from .autodiff import any_batched
from .errors import IndefiniteHessianError, ConvergenceWarning, NeumannDivergenceError, NonFiniteError
from .tree import Params

MatVec = Callable[[Params], Params]


@dataclass
class LinearSolveInfo:
    """Diagnostics of one linear solve. ``residual`` is ‖b − Hx‖ / ‖b‖ (a tensor under vmap).

    ``alpha`` is the step size a stationary iteration used and ``lambda_max`` the power-iteration
    estimate of λ_max(H) behind ``alpha="auto"`` (None when not applicable / not estimated).
    """

    iterations: int
    matvecs: int
    residual: float | Tensor
    converged: bool
    alpha: Optional[float | Tensor] = None
    lambda_max: Optional[float | Tensor] = None


AUTO = "auto"


def power_iteration(matvec: MatVec, like: Params, iterations: int, seed: int = 0) -> Tensor:
    """Estimate λ_max(H) by ``iterations`` steps of the power method from a seeded random start.

    Returns the Rayleigh quotient vᵀHv of the last normalised iterate: a lower bound on λ_max for
    symmetric H that approaches it geometrically in λ₂/λ₁. Costs ``iterations`` matvecs; runs under
    vmap (no host reads).
    """
    if iterations < 1:
        raise ValueError(f"power iteration needs iterations >= 1, got {iterations}")
    gen = torch.Generator().manual_seed(seed)
    v = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for k, p in like.items()}
    estimate = torch.zeros((), dtype=next(iter(like.values())).dtype)
    for _ in range(iterations):
        v = tree.scale(v, 1.0 / torch.clamp(tree.norm(v), min=torch.finfo(estimate.dtype).tiny))
        hv = matvec(v)
        estimate = tree.dot(v, hv)
        v = hv
    return estimate


def resolve_alpha(alpha: float | str, matvec: MatVec, like: Params, iterations: int
                  ) -> tuple[float | Tensor, Optional[float | Tensor], int]:
    """``(alpha, lambda_max, matvecs)``: a fixed alpha as given, or ``auto``: α = 1/λ̂_max.

    λ̂_max comes from :func:`power_iteration`; it underestimates λ_max slightly, so α lands a little above
    1/λ_max but far below the divergence bound 2/λ_max.
    """
    if alpha != AUTO:
        return alpha, None, 0
    lam = power_iteration(matvec, like, iterations)
    batched = any_batched([lam])
    if not batched and not float(lam) > 0:
        raise IndefiniteHessianError(
            f"alpha=auto: the power iteration's estimate of λ_max(H) is {float(lam):.3g} <= 0, so no step size "
            "makes the series converge; the inner Hessian is not positive definite at the inner solution "
            "(run the inner loop closer to a minimum, or add damping=...)")
    return (1.0 / lam if batched else 1.0 / float(lam)), _as_float(lam, batched), iterations


def _check_alpha(name: str, alpha: float | str) -> None:
    if isinstance(alpha, str):
        if alpha != AUTO:
            raise ValueError(f"{name}.alpha must be a positive float or 'auto', got {alpha!r}")
    elif not alpha > 0:
        raise ValueError(f"{name}.alpha must be > 0 (or 'auto'), got {alpha}")


def _relative_residual(matvec: MatVec, b: Params, x: Params) -> Tensor:
    b_norm = tree.norm(b)
    r = tree.sub(b, matvec(x))
    return tree.norm(r) / torch.clamp(b_norm, min=torch.finfo(b_norm.dtype).tiny)


def _as_float(t: Tensor, batched: bool) -> float | Tensor:
    return t.detach() if batched else float(t)


@dataclass(frozen=True)
class CG:
    """Conjugate gradient for symmetric positive-definite H.

    Stops when ‖r‖ ≤ max(rtol·‖b‖, atol) or after ``maxiter`` iterations (one matvec each). Warm start
    with ``x0`` (e.g. the previous outer step's solution). When it stops at ``maxiter`` without reaching
    the tolerance it warns with :class:`ConvergenceWarning` and reports ``converged=False``.
    Reference: Hestenes & Stiefel (1952); used for hypergradients by Pedregosa, arXiv:1602.02355.
    """

    maxiter: int = 100
    rtol: float = 1e-6
    atol: float = 0.0
    supports_warm_start: ClassVar[bool] = True

    def __call__(self, matvec: MatVec, b: Params, x0: Optional[Params] = None) -> tuple[Params, LinearSolveInfo]:
        batched = any_batched(b.values())
        b_norm = tree.norm(b)
        tol = torch.clamp(self.rtol * b_norm, min=self.atol) if not batched else None
        if x0 is None:
            x, r, matvecs = tree.zeros_like(b), dict(b), 0
        else:
            x, matvecs = x0, 1
            r = tree.sub(b, matvec(x0))
        p = r
        rs = tree.dot(r, r)
        iterations = 0
        tiny = torch.finfo(rs.dtype).tiny
        for _ in range(self.maxiter):
            if not batched and math.sqrt(float(rs)) <= float(tol):
                break
            hp = matvec(p)
            matvecs += 1
            curvature = tree.dot(p, hp)
            if not batched and not float(curvature) > 0:
                raise IndefiniteHessianError(
                    f"CG: pᵀHp = {float(curvature):.3g} <= 0 at iteration {iterations}: the inner Hessian is not "
                    "positive definite (a saddle or an unconverged inner loop), and CG needs H ≻ 0. Add an L2 "
                    "term to inner_loss, run the inner loop closer to a minimum, or use neumann/fixedpoint with "
                    "alpha < 2/λ_max (they tolerate small negative eigenvalues for a few terms).")
            # Under vmap no host check is possible; guard the step against zero curvature (then r = 0 already).
            alpha = rs / (curvature + tiny) if batched else rs / curvature
            x = tree.axpy(alpha, p, x)
            r = tree.axpy(-alpha, hp, r)
            rs_new = tree.dot(r, r)
            p = tree.axpy(rs_new / (rs + tiny), p, r)
            rs = rs_new
            iterations += 1
        residual = torch.sqrt(rs) / torch.clamp(b_norm, min=tiny)
        converged = True
        if not batched:
            if not math.isfinite(float(residual)):
                raise NonFiniteError(f"CG produced a non-finite residual at iteration {iterations}")
            converged = math.sqrt(float(rs)) <= float(tol)
            if not converged:
                warnings.warn(
                    f"CG stopped at maxiter={self.maxiter} with relative residual {float(residual):.3g} "
                    f"> rtol={self.rtol}; raise maxiter, loosen rtol, or check that the inner Hessian is "
                    "positive definite (the inner loop may not have converged).",
                    ConvergenceWarning, stacklevel=3)
        return x, LinearSolveInfo(iterations, matvecs, _as_float(residual, batched), converged)


def _divergence_message(name: str, step: int, growth: float, alpha: float, curvature: float) -> str:
    if curvature <= 0:
        hint = (f"the estimated curvature along the growing direction is {curvature:.3g} <= 0: the inner "
                "Hessian is not positive definite at the inner solution (inner loop not converged, or a "
                "nonconvex inner problem); use more inner steps, a damped problem, or the 'cg' solver.")
    else:
        hint = (f"alpha={alpha:g} is too large: the series converges only for alpha < 2/λ_max(H), and the "
                f"estimated λ_max is about {curvature:.3g}; try alpha={0.5 / curvature:.3g} or smaller.")
    return f"{name} series diverged at term {step}: the term norm grew to {growth:.3g} x ‖b‖; {hint}"


@dataclass(frozen=True)
class Neumann:
    """Truncated Neumann series H⁻¹ b ≈ α Σ_{j=0}^{terms−1} (I − αH)^j b.

    The leading α matters (forgetting it is a classic bug, e.g. the ITL paper's pseudocode). Converges
    for 0 < α < 2/λ_max(H) when H is positive definite; ``terms − 1`` matvecs. ``alpha="auto"`` sets
    α = 1/λ̂_max from ``power_iterations`` power-method matvecs. With a warm start x0 the series solves
    for the correction: x = x0 + α Σ_j (I − αH)^j (b − H x0) (one more matvec), which is exact in the
    limit and no worse than x0 when x0 is already close. Divergence (a term growing beyond
    ``growth_limit`` times its start, or a non-finite term) raises :class:`NeumannDivergenceError` with an
    estimate of λ_max and a suggested alpha.
    Reference: Lorraine, Vicol & Duvenaud, arXiv:1911.02590.
    """

    alpha: float | str = AUTO
    terms: int = 15
    power_iterations: int = 20
    growth_limit: float = 10.0
    supports_warm_start: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_alpha("Neumann", self.alpha)
        if self.terms < 1:
            raise ValueError(f"Neumann needs terms >= 1, got {self.terms}")

    def __call__(self, matvec: MatVec, b: Params, x0: Optional[Params] = None) -> tuple[Params, LinearSolveInfo]:
        batched = any_batched(b.values())
        alpha, lam, matvecs = resolve_alpha(self.alpha, matvec, b, self.power_iterations)
        rhs = b if x0 is None else tree.sub(b, matvec(x0))
        matvecs += x0 is not None
        r_norm = float(tree.norm(rhs)) if not batched else None
        term, total = rhs, rhs
        for j in range(1, self.terms):
            h_term = matvec(term)
            if not batched:
                self._check(term, h_term, r_norm, j, alpha)
            term = tree.axpy(-alpha, h_term, term)
            total = tree.add(total, term)
        x = tree.scale(total, alpha)
        if x0 is not None:
            x = tree.add(x0, x)
        if not batched:
            last = float(tree.norm(term))
            if r_norm and last > r_norm * (1 + 1e-6):
                warnings.warn(f"Neumann terms did not shrink (last/first norm {last / r_norm:.3g}); "
                              "the series is not converging: lower alpha or check the inner solution.",
                              ConvergenceWarning, stacklevel=3)
        residual = _relative_residual(matvec, b, x) if not batched else torch.full((), float("nan"))
        return x, LinearSolveInfo(self.terms - 1, matvecs + self.terms, _as_float(residual, batched), True,
                                  alpha, lam)

    def _check(self, term: Params, h_term: Params, r_norm: float, j: int, alpha: float) -> None:
        norm = float(tree.norm(term))
        if not math.isfinite(norm) or (r_norm > 0 and norm > self.growth_limit * r_norm):
            curvature = float(tree.dot(term, h_term) / max(norm**2, 1e-300)) if math.isfinite(norm) else float("inf")
            raise NeumannDivergenceError(
                _divergence_message("Neumann", j, norm / max(r_norm, 1e-300), alpha, curvature))


@dataclass(frozen=True)
class FixedPoint:
    """Richardson fixed-point iteration x ← x + α (b − Hx), with warm start and a residual tolerance.

    Its iterates from x0 = 0 are the partial sums of the Neumann series; it differs from :class:`Neumann`
    by stopping on ``rtol`` and accepting a warm start. Reference: Grazzi et al., arXiv:2006.16218.
    """

    alpha: float | str = AUTO
    maxiter: int = 200
    rtol: float = 1e-6
    power_iterations: int = 20
    growth_limit: float = 10.0
    supports_warm_start: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_alpha("FixedPoint", self.alpha)

    def __call__(self, matvec: MatVec, b: Params, x0: Optional[Params] = None) -> tuple[Params, LinearSolveInfo]:
        batched = any_batched(b.values())
        b_norm = tree.norm(b)
        alpha, lam, matvecs = resolve_alpha(self.alpha, matvec, b, self.power_iterations)
        x = x0 if x0 is not None else tree.zeros_like(b)
        iterations = 0
        r = tree.sub(b, matvec(x)) if x0 is not None else dict(b)
        matvecs += x0 is not None
        r0 = float(tree.norm(r)) if not batched else None
        for _ in range(self.maxiter):
            if not batched:
                rn = float(tree.norm(r))
                if not math.isfinite(rn) or (r0 and rn > self.growth_limit * r0):
                    hr = matvec(r)
                    curvature = float(tree.dot(r, hr) / max(rn**2, 1e-300)) if math.isfinite(rn) else float("inf")
                    raise NeumannDivergenceError(
                        _divergence_message("Fixed-point", iterations, rn / max(r0, 1e-300), alpha, curvature))
                if rn <= self.rtol * float(b_norm):
                    break
            x = tree.axpy(alpha, r, x)
            r = tree.sub(b, matvec(x))
            matvecs += 1
            iterations += 1
        residual = tree.norm(r) / torch.clamp(b_norm, min=torch.finfo(b_norm.dtype).tiny)
        converged = True
        if not batched:
            converged = float(residual) <= self.rtol
            if not converged:
                warnings.warn(f"fixed-point iteration stopped at maxiter={self.maxiter} with relative residual "
                              f"{float(residual):.3g} > rtol={self.rtol}; raise maxiter or alpha (below 2/λ_max).",
                              ConvergenceWarning, stacklevel=3)
        return x, LinearSolveInfo(iterations, matvecs, _as_float(residual, batched), converged, alpha, lam)


@dataclass(frozen=True)
class Exact:
    """Dense direct solve: builds H column by column (n matvecs, vmapped) and calls ``torch.linalg.solve``.

    For tiny problems and tests only: O(n²) memory and O(n³) time in the number n of inner scalars.
    """

    max_size: int = 5000
    supports_warm_start: ClassVar[bool] = False  # a direct solve has no use for a starting point

    def __call__(self, matvec: MatVec, b: Params, x0: Optional[Params] = None) -> tuple[Params, LinearSolveInfo]:
        n = tree.numel(b)
        if n > self.max_size:
            raise ValueError(f"Exact solve refused: {n} inner scalars > max_size={self.max_size}; use CG.")
        flat_b = tree.flatten(b)
        eye = torch.eye(n, dtype=flat_b.dtype, device=flat_b.device)
        columns = vmap(lambda e: tree.flatten(matvec(tree.unflatten(e, b))))(eye)
        hessian = columns.T  # column i is H e_i; H is symmetric, the transpose is for clarity
        flat_x = torch.linalg.solve(hessian, flat_b)
        x = tree.unflatten(flat_x, b)
        residual = torch.linalg.norm(hessian @ flat_x - flat_b) / torch.clamp(
            torch.linalg.norm(flat_b), min=torch.finfo(flat_b.dtype).tiny)
        batched = any_batched(b.values())
        return x, LinearSolveInfo(1, n, _as_float(residual, batched), True)


LinearSolver = CG | Neumann | FixedPoint | Exact
