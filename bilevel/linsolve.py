"""Linear solvers ``(matvec, b, x0) -> (x, LinearSolveInfo)`` for H x = b on parameter dicts.

H is the inner Hessian at the inner solution: symmetric, and positive definite when the inner problem
is strongly convex there. Every solver is a frozen dataclass of options.

Every solver reports the TRUE relative residual ‖b − Hx‖ / ‖b‖ of the x it returns, measured with a matvec
of that x (counted in ``matvecs``), never a recursively updated estimate, and ``converged`` means exactly
"that residual is ≤ the solver's ``rtol``". A solve that misses its tolerance warns once with
:class:`ConvergenceWarning`, naming the residual, the tolerance and what to change.

Under ``torch.func.vmap`` the iterative solvers cannot stop early (that would be data-dependent control
flow), so they run their full iteration budget, the host-side checks (tolerance, divergence, NaN) are
skipped, ``residual`` is a batched tensor and ``converged`` is ``None`` (not known; the implicit solvers
log it as NaN). The direct solvers (:class:`Exact`, :class:`Nystrom`) do the same work either way.

The matvec is the operator of the system: H, or ``Damped(H, δ)`` for H + δI. Solvers that only multiply
treat both alike; :class:`Nystrom` unwraps a :class:`Damped` to sketch H alone and keep δ exact.
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
from .transforms import outside_transforms
from .errors import IndefiniteHessianError, ConvergenceWarning, NeumannDivergenceError, NonFiniteError
from .tree import Params

MatVec = Callable[[Params], Params]


class Damped:
    """The matvec v ↦ (H + δI) v of a matvec ``hessian`` and a damping δ ≥ 0.

    Keeps the batched product ``matmat`` of ``hessian`` when it has one (see :class:`Exact`).
    """

    def __init__(self, hessian: MatVec, delta: float | Tensor) -> None:
        self.hessian, self.delta = hessian, delta
        if hasattr(hessian, "matmat"):
            self.matmat = lambda vectors: tree.axpy(delta, vectors, hessian.matmat(vectors))

    def __call__(self, v: Params) -> Params:
        return tree.axpy(self.delta, v, self.hessian(v))


@dataclass
class LinearSolveInfo:
    """Diagnostics of one linear solve.

    ``residual`` is the true ‖b − Hx‖ / ‖b‖ of the returned x (a tensor under vmap). ``converged`` is
    ``residual ≤ rtol`` (for CG: ‖b − Hx‖ ≤ max(rtol‖b‖, atol)), or ``None`` under vmap, where it cannot
    be read on the host. ``matvecs`` counts every product with H, including the one that measured the
    residual. ``alpha`` is the step size a stationary iteration used and ``lambda_max`` the power-iteration
    estimate of λ_max(H) behind ``alpha="auto"`` (None when not applicable / not estimated).
    """

    iterations: int
    matvecs: int
    residual: float | Tensor
    converged: Optional[bool]
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
    specs = [(k, p.shape, p.dtype, p.device) for k, p in like.items()]
    with outside_transforms():  # vmap refuses random draws; the seeded start is the same for every row anyway
        v = {k: torch.randn(shape, generator=gen, dtype=dtype).to(device) for k, shape, dtype, device in specs}
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


def _alpha_advice(option: float | str, alpha: float | Tensor) -> str:
    """The part of a not-converged message about the step size (read only outside vmap)."""
    if option == AUTO:
        return ""  # α = 1/λ̂_max is already the largest safe step
    value = float(alpha) if not (isinstance(alpha, Tensor) and any_batched([alpha])) else float("nan")
    # a fixed alpha may come from the user or from Implicit's relative damping (then it is 1/(λ̂_max + δ))
    return f", keep alpha near 1/λ_max, the fastest safe step (alpha=auto sets it; now alpha={value:.3g})"


def _check_alpha(name: str, alpha: float | str) -> None:
    if isinstance(alpha, str):
        if alpha != AUTO:
            raise ValueError(f"{name}.alpha must be a positive float or 'auto', got {alpha!r}")
    elif isinstance(alpha, Tensor) and any_batched([alpha]):
        return  # under vmap (α = 1/(λ̂_max + δ) from relative damping): no host check is possible
    elif not alpha > 0:
        raise ValueError(f"{name}.alpha must be > 0 (or 'auto'), got {alpha}")


def _relative(r_norm: Tensor, b_norm: Tensor) -> Tensor:
    """‖r‖ / ‖b‖, with ‖b‖ = 0 read as the smallest positive float (so r = b = 0 gives 0)."""
    return r_norm / torch.clamp(b_norm, min=torch.finfo(b_norm.dtype).tiny)


def _as_float(t: Tensor, batched: bool) -> float | Tensor:
    return t.detach() if batched else float(t)


def _verdict(name: str, r_norm: Tensor, b_norm: Tensor, tol: float, rtol: float, batched: bool, fix: str
             ) -> tuple[float | Tensor, Optional[bool]]:
    """``(relative residual, converged)`` from the true residual norm ‖b − Hx‖; warns when not converged.

    ``tol`` is the absolute tolerance on ‖b − Hx‖ (rtol·‖b‖, or CG's max(rtol·‖b‖, atol)); ``rtol`` is only
    named in the warning. Under vmap: the batched residual and ``None`` (no host read is possible).
    """
    residual = _relative(r_norm, b_norm)
    if batched:
        return residual.detach(), None
    value = float(residual)
    if not math.isfinite(value):
        raise NonFiniteError(f"{name}: the linear solve's residual ‖b − Hx‖/‖b‖ is {value}; the inner Hessian "
                             "or ∇θF holds NaN/Inf (check the inner loss at the inner solution)")
    converged = float(r_norm) <= tol
    if not converged:
        # stacklevel 3: the caller of the solver (the user, or Implicit inside hypergrad)
        warnings.warn(f"{name} did not converge: true relative residual ‖b − Hx‖/‖b‖ = {value:.3g} > "
                      f"rtol={rtol:g} (reported as converged=False; the hypergradient is only as accurate as that "
                      f"solve); {fix}", ConvergenceWarning, stacklevel=3)
    return value, converged


@dataclass(frozen=True)
class CG:
    """Conjugate gradient for symmetric positive-definite H.

    Iterates until the recursively updated residual r satisfies ‖r‖ ≤ tol = max(rtol·‖b‖, atol), or for
    ``maxiter`` iterations (one matvec each); then measures the true residual b − Hx with one more matvec
    (none when no iteration ran: r is then b − Hx0 itself). In floating point the recursive r drifts from
    b − Hx, so when the recursion claims the tolerance but the true residual misses it, CG restarts from
    the true residual (residual replacement: at most :attr:`RESTARTS` times, within ``maxiter``, and only
    while each restart at least halves the true residual).
    ``converged`` is ‖b − Hx‖ ≤ tol; otherwise it warns with :class:`ConvergenceWarning`. Warm start with
    ``x0`` (e.g. the previous outer step's solution).
    Reference: Hestenes & Stiefel (1952); used for hypergradients by Pedregosa, arXiv:1602.02355;
    residual replacement: van der Vorst & Ye, SIAM J. Sci. Comput. 22 (2000).
    """

    maxiter: int = 100
    rtol: float = 1e-6
    atol: float = 0.0
    supports_warm_start: ClassVar[bool] = True
    RESTARTS: ClassVar[int] = 3

    def __call__(self, matvec: MatVec, b: Params, x0: Optional[Params] = None) -> tuple[Params, LinearSolveInfo]:
        batched = any_batched(b.values())
        b_norm = tree.norm(b)
        tol = max(self.rtol * float(b_norm), self.atol) if not batched else None
        # CG's recursion squares residual norms (rs = ‖r‖²), which underflow in float32 for ‖b‖ below ~1e-19
        # (a tiny b would read as solved at x = 0) and overflow above ~1e19. H is linear, so CG solves
        # H y = b/s with s = ‖b‖ and returns x = s·y; s = 1 when b = 0 or b is not finite.
        s = torch.where((b_norm > 0) & torch.isfinite(b_norm), b_norm, torch.ones_like(b_norm)).detach()
        b = tree.scale(b, 1 / s)
        tol_scaled = tol / float(s) if tol is not None else None
        if x0 is None:
            x, r, matvecs = tree.zeros_like(b), dict(b), 0
        else:
            x, matvecs = tree.scale(x0, 1 / s), 1
            r = tree.sub(b, matvec(x))
        iterations, restarts, previous = 0, 0, math.inf
        while True:
            x, r, done = self._iterate(matvec, x, r, tol_scaled, self.maxiter - iterations, batched, iterations)
            iterations += done
            matvecs += done
            if done:  # r was updated recursively: measure the true residual of x
                r = tree.sub(b, matvec(x))
                matvecs += 1
            r_norm = tree.norm(r)
            if batched or not done or iterations >= self.maxiter or restarts >= self.RESTARTS:
                break
            true_norm = float(r_norm)  # of the scaled system
            # Stop when the tolerance is met, or when a restart no longer halves the true residual: CG has
            # then reached its attainable accuracy (about machine epsilon times the condition number).
            if true_norm <= tol_scaled or true_norm > 0.5 * previous:
                break
            previous, restarts = true_norm, restarts + 1  # restart from the true residual
        if iterations < self.maxiter:
            fix = (f"CG stalled after {iterations} of maxiter={self.maxiter} iterations at the accuracy floating point "
                   "allows (about machine epsilon × cond(H)): loosen rtol, add damping=... (e.g. "
                   "damping=0.01,relative_damping=true) to improve the conditioning, or compute in float64.")
        else:
            fix = (f"CG stopped at maxiter={self.maxiter} before reaching it: raise maxiter, add damping=... (e.g. "
                   "damping=0.01,relative_damping=true) to improve the conditioning, or check that the inner Hessian "
                   "is positive definite (run the inner loop longer).")
        residual, converged = _verdict("CG", r_norm * s, b_norm, tol, self.rtol, batched, fix)
        return tree.scale(x, s), LinearSolveInfo(iterations, matvecs, residual, converged)

    def _iterate(self, matvec: MatVec, x: Params, r: Params, tol: Optional[float], budget: int, batched: bool,
                 offset: int) -> tuple[Params, Params, int]:
        """Up to ``budget`` CG iterations from (x, r = b − Hx), stopping when ‖r‖ ≤ tol (outside vmap).

        Returns the new x, the recursively updated r and the number of iterations (= matvecs) taken.
        """
        p = r
        rs = tree.dot(r, r)
        tiny = torch.finfo(rs.dtype).tiny
        done = 0
        for _ in range(budget):
            if not batched and math.sqrt(float(rs)) <= tol:
                break
            hp = matvec(p)
            curvature = tree.dot(p, hp)
            if not batched and not float(curvature) > 0:
                raise IndefiniteHessianError(
                    f"CG: pᵀHp/pᵀp = {float(curvature / tree.dot(p, p)):.3g} <= 0 at iteration {offset + done}: the "
                    "inner Hessian is not positive definite (a saddle or an unconverged inner loop), and CG needs "
                    "H ≻ 0. Add an L2 term to inner_loss, run the inner loop closer to a minimum, or use "
                    "neumann/fixedpoint with alpha < 2/λ_max (they tolerate small negative eigenvalues for a few "
                    "terms).")
            # Under vmap no host check is possible; guard the step against zero curvature (then r = 0 already).
            alpha = rs / (curvature + tiny) if batched else rs / curvature
            x = tree.axpy(alpha, p, x)
            r = tree.axpy(-alpha, hp, r)
            rs_new = tree.dot(r, r)
            p = tree.axpy(rs_new / (rs + tiny), p, r)
            rs = rs_new
            done += 1
        return x, r, done


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

    The leading α matters (forgetting it is a classic bug, e.g. the ITL paper's pseudocode drops it).
    Converges for 0 < α < 2/λ_max(H) when H is positive definite, with error max_λ |1 − αλ|^terms (slowest
    along λ_min); ``terms − 1`` matvecs, plus one that measures the true residual ‖b − Hx‖/‖b‖.
    ``alpha="auto"`` sets α = 1/λ̂_max from ``power_iterations`` power-method matvecs. With a warm start x0
    the series solves for the correction: x = x0 + α Σ_j (I − αH)^j (b − H x0) (one more matvec), which is
    exact in the limit and no worse than x0 when x0 is already close.

    The number of terms is fixed, so the series always spends its budget; ``converged`` says whether the
    result met ``rtol`` (default 1e-6, as CG's), and a miss warns with :class:`ConvergenceWarning` (a fixed
    short series used as a cheap, biased approximation, as in ITL, is then reported as what it is).
    Divergence (a term growing beyond ``growth_limit`` times its start, or a non-finite term) raises
    :class:`NeumannDivergenceError` with an estimate of λ_max and a suggested alpha.
    Reference: Lorraine, Vicol & Duvenaud, arXiv:1911.02590.
    """

    alpha: float | str = AUTO
    terms: int = 15
    rtol: float = 1e-6
    power_iterations: int = 20
    growth_limit: float = 10.0
    supports_warm_start: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _check_alpha("Neumann", self.alpha)
        if self.terms < 1:
            raise ValueError(f"Neumann needs terms >= 1, got {self.terms}")
        if not self.rtol >= 0:
            raise ValueError(f"Neumann.rtol must be >= 0, got {self.rtol}")

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
        b_norm = tree.norm(b)
        true_r = tree.norm(tree.sub(b, matvec(x)))
        matvecs += self.terms  # terms − 1 series products and the residual's
        fix = (f"raise terms (now {self.terms}; the error shrinks like max|1 − αλ|^terms, slowest along "
               f"λ_min(H)){_alpha_advice(self.alpha, alpha)}, add or raise damping (e.g. "
               "damping=0.1,relative_damping=true bounds the condition number, at the price of bias), or use cg.")
        if not batched:
            last = float(tree.norm(term))
            if r_norm and last > r_norm * (1 + 1e-6):
                fix = (f"the series terms did not shrink (last/first norm {last / r_norm:.3g}): lower alpha "
                       "below 2/λ_max (alpha=auto), or check that the inner loop reached a minimum (H ≻ 0).")
        residual, converged = _verdict("Neumann", true_r, b_norm, self.rtol * float(b_norm) if not batched else 0.0,
                                       self.rtol, batched, fix)
        return x, LinearSolveInfo(self.terms - 1, matvecs, residual, converged, alpha, lam)

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
    by stopping on ``rtol``. Each iteration computes the residual b − Hx afresh (one matvec), so the
    reported residual is the true one of the returned x with no extra product; ``converged`` is
    ‖b − Hx‖ ≤ rtol·‖b‖, and a miss at ``maxiter`` warns with :class:`ConvergenceWarning`.
    Reference: Grazzi et al., arXiv:2006.16218.
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
        residual, converged = _verdict(
            "FixedPoint", tree.norm(r), b_norm, self.rtol * float(b_norm) if not batched else 0.0, self.rtol, batched,
            f"raise maxiter (now {self.maxiter}){_alpha_advice(self.alpha, alpha)}, add or raise damping (e.g. "
            "damping=0.01,relative_damping=true, at the price of bias), or use cg.")
        return x, LinearSolveInfo(iterations, matvecs, residual, converged, alpha, lam)


@dataclass(frozen=True)
class Exact:
    """Dense direct solve: builds H column by column (n matvecs, vmapped) and calls ``torch.linalg.solve``.

    A matvec with a ``matmat(vectors)`` method (a batch of products in one call, each leaf of shape
    (n, *leaf.shape); the autograd path's :class:`~bilevel.autodiff.TapeHessian` has one) builds the columns
    with it instead of ``vmap``; either way they count as n matvecs.

    For tiny problems and tests only: O(n²) memory and O(n³) time in the number n of inner scalars. The
    residual ‖b − Hx‖/‖b‖ is measured with one more matvec (not from the assembled matrix); a direct solve
    misses ``rtol`` only when H is (nearly) singular, which it then reports like the iterative solvers.
    """

    max_size: int = 5000
    rtol: float = 1e-6
    supports_warm_start: ClassVar[bool] = False  # a direct solve has no use for a starting point

    def __post_init__(self) -> None:
        if not self.rtol >= 0:
            raise ValueError(f"Exact.rtol must be >= 0, got {self.rtol}")

    def __call__(self, matvec: MatVec, b: Params, x0: Optional[Params] = None) -> tuple[Params, LinearSolveInfo]:
        n = tree.numel(b)
        if n > self.max_size:
            raise ValueError(f"Exact solve refused: {n} inner scalars > max_size={self.max_size}; use CG.")
        batched = any_batched(b.values())
        flat_b = tree.flatten(b)
        eye = torch.eye(n, dtype=flat_b.dtype, device=flat_b.device)
        if hasattr(matvec, "matmat") and not batched:
            products = matvec.matmat(_split_columns(eye, b))
            columns = torch.cat([products[k].reshape(n, -1) for k in b], dim=1)
        else:
            columns = vmap(lambda e: tree.flatten(matvec(tree.unflatten(e, b))))(eye)
        hessian = columns.T  # column i is H e_i; H is symmetric, the transpose is for clarity
        x = tree.unflatten(torch.linalg.solve(hessian, flat_b), b)
        b_norm = tree.norm(b)
        residual, converged = _verdict(
            "Exact", tree.norm(tree.sub(b, matvec(x))), b_norm, self.rtol * float(b_norm) if not batched else 0.0,
            self.rtol, batched,
            "the inner Hessian is (nearly) singular, so its direct solve is inaccurate: add damping=... (e.g. "
            "damping=0.01,relative_damping=true), run the inner loop closer to a strict minimum, or use float64.")
        return x, LinearSolveInfo(1, n + 1, residual, converged)


@dataclass(frozen=True)
class Nystrom:
    """Rank-k Nyström approximation of H, solved in closed form by the Woodbury identity.

    From k = ``rank`` Hessian-vector products with unit vectors it builds the columns H[:, K] of H at a random
    index set K of k of the n inner scalars (drawn uniformly without replacement, as the reference code's
    ``torch.randperm(n)[:k]``), and approximates H by H_k = H[:, K] H[K, K]⁺ H[K, :]. It returns the exact
    solution of the ridged system (H_k + ρI) x = b, ρ = ``rho``, by the Woodbury identity: with
    H[K, K] = V S Vᵀ (eigenvalues |s| ≤ k·eps·max|s| dropped: the pseudo-inverse) and B = H[:, K] V |S|^(−1/2),
    H_k = B D Bᵀ (D = sign S) and x = (b − B (ρD + BᵀB)⁻¹ Bᵀ b) / ρ, a k × k solve. No iteration, so
    nothing stops early and the same code runs under vmap.

    What the matvec is: the operator A of the linear system, which the true residual ‖b − Ax‖/‖b‖ is
    measured with. :class:`Implicit` passes H itself, or with ``damping`` δ a :class:`Damped` matvec,
    A = H + δI. A damped matvec is unwrapped: the columns are taken of H (the same HVPs) and δ joins the
    ridge, so the solve is (H_k + (δ + ρ)I) x = b. Sketching δI itself would lose it: the Nyström
    approximation of H + δI carries δ only on the span of the k sampled columns, and the rest of the
    space would be regularised by ρ alone. Any other matvec is approximated as it is.

    Accuracy: rank ≥ n (rank is capped at n) makes H_k = H, so x solves (A + ρI) x = b exactly up to
    rounding; its true residual is then ‖ρx‖/‖b‖ (about ρ/(λ + ρ) along an eigenvalue λ), which the ridge
    costs. With rank < n the residual also holds (H − H_k)x, which vanishes on the sampled columns and
    shrinks as k grows: with the same ``seed`` the index sets are nested (K for rank k is the first k
    entries of one permutation), so H_k grows monotonically towards H for positive semi-definite H. The
    Woodbury form divides by δ + ρ: its rounding error is about eps·λ_max/(δ + ρ) relative, so a tiny
    ridge in float32 costs accuracy. ``rho`` may be 0 only when the matvec is damped (δ + ρ > 0).
    ``converged`` is exactly residual ≤ ``rtol`` (default 1e-6, as CG's), so a cheap low-rank approximation
    is reported as what it is; the :class:`ConvergenceWarning` of a miss says how much of the residual the
    ridge (ρx) and the low-rank approximation ((H − H_k)x) each account for, and what to change.

    Cost: k HVPs for the columns (one vmapped call, or one ``matmat`` call as in :class:`Exact`) and one
    for the residual, so ``matvecs`` = k + 1; O(nk) memory and O(nk² + k³) time.
    An indefinite H (an unconverged or nonconvex inner problem) is not refused: negative eigenvalues of
    H[K, K] enter H_k with their sign; damping keeps H + δI positive definite (relative_damping=true).
    Differentiating through the solve (second derivatives of :func:`bilevel.solve`) goes through the
    eigendecomposition of H[K, K], whose derivative is undefined where two of its eigenvalues coincide.

    ``seed`` fixes K, the same at every call (and for every row under vmap); ``resample=true`` draws a
    fresh K at every call from torch's default generator instead (``seed`` is then unused), as the reference
    code does (reproducible with ``torch.manual_seed``). A direct solve takes no starting point (``supports_warm_start`` False).
    Under vmap the residual is a batched tensor and ``converged`` is None, as for the other solvers.
    Reference: Hataya & Yamada, "Nyström Method for Accurate and Scalable Implicit Differentiation",
    AISTATS 2023, arXiv:2302.09726 (code: github.com/moskomule/hypergrad, ``approximate_ihvp.nystrom``).
    """

    rank: int = 10
    rho: float = 0.01
    seed: int = 0
    resample: bool = False
    rtol: float = 1e-6
    supports_warm_start: ClassVar[bool] = False  # a direct solve has no use for a starting point

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"Nystrom.rank must be an integer >= 1 (the number of sampled Hessian columns), "
                             f"got {self.rank!r}")
        if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) or not 0 <= self.rho < math.inf:
            raise ValueError(f"Nystrom.rho must be a finite float >= 0 (the ridge added to the low-rank Hessian; "
                             f"0 only with damping > 0), got {self.rho!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"Nystrom.seed must be an integer, got {self.seed!r}")
        if isinstance(self.rtol, bool) or not isinstance(self.rtol, (int, float)) or not self.rtol >= 0:
            raise ValueError(f"Nystrom.rtol must be >= 0, got {self.rtol!r}")

    def check_damping(self, damping: float) -> None:
        """Refuse rho = 0 without damping before any work (:class:`Implicit` calls it with its ``damping``)."""
        if not self.rho and not damping > 0:
            raise ValueError("Nystrom with rho=0 needs damping > 0: the Woodbury solve divides by rho + damping; "
                             "set rho > 0 (e.g. rho=0.01) or damping > 0")

    def indices(self, n: int) -> Tensor:
        """The sampled coordinates K (int64, on the CPU): the first min(rank, n) entries of a permutation of n."""
        with outside_transforms():  # vmap refuses random draws; K is the same for every row anyway
            if self.resample:
                permutation = torch.randperm(n)
            else:
                permutation = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        return permutation[:min(self.rank, n)]

    def __call__(self, matvec: MatVec, b: Params, x0: Optional[Params] = None) -> tuple[Params, LinearSolveInfo]:
        batched = any_batched(b.values())
        hessian, delta = (matvec.hessian, matvec.delta) if isinstance(matvec, Damped) else (matvec, 0.0)
        shift = delta + self.rho  # the ridge of the Woodbury solve: (H_k + (δ + ρ)I) x = b
        if not (isinstance(shift, Tensor) and any_batched([shift])) and not float(shift) > 0:
            raise ValueError(f"Nystrom needs rho + damping > 0 (the Woodbury identity divides by it), got rho="
                             f"{self.rho:g} and damping {float(delta):g}: set rho > 0")
        n = tree.numel(b)
        flat_b = tree.flatten(b)
        index = self.indices(n).to(flat_b.device)
        k = index.numel()
        units = torch.nn.functional.one_hot(index, n).to(flat_b.dtype)  # rows e_iᵀ, i ∈ K (k × n, never n × n)
        if hasattr(hessian, "matmat") and not batched:
            products = hessian.matmat(_split_columns(units, b))
            rows = torch.cat([products[key].reshape(k, -1) for key in b], dim=1)
        else:
            rows = vmap(lambda e: tree.flatten(hessian(tree.unflatten(e, b))))(units)
        if not batched and not bool(torch.isfinite(rows).all()):
            raise NonFiniteError("Nystrom: the sampled Hessian columns H[:, K] hold NaN/Inf; the inner Hessian is not "
                                 "finite (check the inner loss at the inner solution)")
        columns = rows.T  # H[:, K] (row i of ``rows`` is H e_i; H is symmetric)
        core = columns.index_select(0, index)  # H[K, K]
        s, v = torch.linalg.eigh(0.5 * (core + core.T))
        magnitude = s.abs()
        keep = magnitude > k * torch.finfo(s.dtype).eps * magnitude.amax()  # the pseudo-inverse's cut-off
        inv_sqrt = torch.where(keep, magnitude, torch.ones_like(s)).rsqrt() * keep.to(s.dtype)
        sign = torch.where(s < 0, -torch.ones_like(s), torch.ones_like(s))
        factor = (columns @ v) * inv_sqrt  # B: H_k = B diag(sign) Bᵀ; dropped directions are zero columns
        small = torch.diag(sign) * shift + factor.T @ factor  # (δ + ρ)D + BᵀB (k × k)
        try:
            y = torch.linalg.solve(small, factor.T @ flat_b)
        except torch.linalg.LinAlgError:
            raise IndefiniteHessianError(
                f"Nystrom: H_k + (damping + rho)·I is singular: the sampled block H[K, K] has negative eigenvalues "
                f"(min {float(s.min()):.3g}), so the inner Hessian is indefinite at the inner solution. Add "
                "damping=... (e.g. damping=0.1,relative_damping=true), raise rho, or run the inner loop closer to "
                "a minimum.") from None
        x = tree.unflatten((flat_b - factor @ y) / shift, b)
        b_norm = tree.norm(b)
        r = tree.sub(b, matvec(x))
        fix = "" if batched else self._advice(r, x, b_norm, k, n)
        residual, converged = _verdict("Nystrom", tree.norm(r), b_norm,
                                       self.rtol * float(b_norm) if not batched else 0.0, self.rtol, batched, fix)
        return x, LinearSolveInfo(1, k + 1, residual, converged)

    def _advice(self, r: Params, x: Params, b_norm: Tensor, k: int, n: int) -> str:
        """What to change, from the two parts of the residual r = b − Ax = (H_k − H)x + ρx (outside vmap)."""
        ridge = float(_relative(self.rho * tree.norm(x), b_norm))
        low_rank = float(_relative(tree.norm(tree.axpy(-self.rho, x, r)), b_norm))
        parts = (f"of it the ridge ρx accounts for ‖ρx‖/‖b‖ = {ridge:.3g} and the rank-{k} approximation (H − H_k)x "
                 f"for {low_rank:.3g}")
        lower_rho = f"lower rho (now {self.rho:g})"
        if k == n:
            return f"{parts}: {lower_rho} (rank already samples all {n} coordinates, so H_k = H), or use cg or exact."
        raise_rank = f"raise rank (now {k} of dim θ = {n}; rank = dim θ makes H_k = H)"
        first, second = (raise_rank, lower_rho) if low_rank >= ridge else (lower_rho, raise_rank)
        return f"{parts}: {first}, {second}, or use cg or exact for an accurate solve."


def _split_columns(rows: Tensor, like: Params) -> Params:
    """Rows of shape (m, n) cut into a batch of params dicts: leaves of shape (m, *leaf.shape)."""
    out, start = {}, 0
    for k, v in like.items():
        out[k] = rows[:, start:start + v.numel()].reshape(rows.shape[0], *v.shape)
        start += v.numel()
    return out


LinearSolver = CG | Neumann | FixedPoint | Exact | Nystrom
