"""Check a solver's hypergradient on your problem: against central finite differences and another solver.

Every anchor library has shipped a wrong hypergradient at some point; this makes checking one call.
The finite-difference target is the derivative of the K-step loop, φ ↦ L(φ) = F(θ_K(φ), φ), computed in
float64: it is exactly what ``unroll`` and ``forward`` compute, and what the implicit solvers approach
as the inner loop converges.

A check passes on the relative error, not on the cosine alone: a hypergradient that points the right
way but is 90 % too short has cosine 0.996 and is still wrong. The verdict is

    passed  ⇔  ‖g − fd‖/‖fd‖ ≤ rtol  and  cos(g, fd) ≥ min_cosine              (finite differences)
              and the same two bounds against the reference solver (when one is given)
              and the finite differences are accurate enough to certify rtol (see below).

How accurate the finite differences are. The central difference D(h) = [L(φ+hd) − L(φ−hd)]/2h has
D(h) = ⟨∇L, d⟩ + c·h² + r(h): a truncation term c·h² (c = L'''/6 along d) and a rounding term
|r(h)| ≈ u·|L|/h (u = 2.2e-16 in float64). Differencing at h = eps and 2·eps (Richardson's idea) gives

    D(eps) − D(2·eps) = −3·c·eps² + r(eps) − r(2·eps),

so ``fd_error_estimate`` = ‖D(eps) − D(2·eps)‖ / ‖D(eps)‖ over the checked directions over-estimates the
truncation error of D(eps) by 3× and matches its rounding error in order of magnitude (|r(2·eps)| ≈
|r(eps)|/2, independent). On the ridge oracle against the closed form (tests/test_check.py) the ratio
estimate/true error is 3.000 where truncation dominates and 0.65 … 4.7 where rounding does. ``fd`` is D(eps).

Defaults, float64, eps = 1e-6 (near the optimal central step (3u·|L/L'''|)^(1/3) ≈ 1e-5 for unit-scaled
problems): rounding ≈ 2e-10·|L|/‖∇L‖ and truncation ≈ 1e-12 relative; measured estimates are 1e-9 on the
ridge problem and 2e-7 … 5e-7 on the adalfl, metamd and itl SMOKE problems (small ‖∇L‖). ``rtol`` = 1e-4
sits 2½ … 5 orders of magnitude above that noise, so a measured relative error above it is the solver's,
not the reference's; yet it is far below any error that matters for optimisation (a 93 %-short Neumann
series fails by 4 orders of magnitude). The reference must be at least
``FD_ACCURACY_RATIO`` = 10 times more accurate than the tolerance it certifies (the usual 10:1 test
accuracy ratio): when ``fd_error_estimate > rtol / FD_ACCURACY_RATIO`` the check FAILS and says the
finite-difference reference is not accurate enough to certify rtol (never a silent pass, never a silent
widening of rtol); the fix is another ``eps`` or a looser ``rtol`` chosen by the caller.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from . import tree
from .api import hypergrad
from .inner import InnerLoop
from .tree import Params
from .types import Batch, BilevelProblem

DEFAULT_RTOL = 1e-4
"""Default bound on ‖g − g_ref‖/‖g_ref‖: 4 orders of magnitude above float64 FD noise (see the module doc)."""
DEFAULT_MIN_COSINE = 0.99
"""Default lower bound on the cosine between the hypergradient and each reference."""
DEFAULT_EPS = 1e-6
"""Default finite-difference step (float64)."""
FD_ACCURACY_RATIO = 10.0
"""The finite differences must be this many times more accurate than ``rtol`` to certify it."""


@dataclass
class CheckReport:
    """The outcome of :func:`check`: errors, cosines, the reference's own accuracy and the verdict.

    Relative errors are ‖a − b‖/‖b‖ with b the reference; over the checked directions for ``fd_*``
    (the hypergradient projected on them against the difference quotients), over the full vector for
    ``ref_*``. ``ref_*`` is None when no reference solver was run.

    Attributes:
        solver: the checked solver (spec or repr).
        reference: the reference solver, or None.
        directions: number of finite-difference directions.
        fd_rel_error: ‖Pg − fd‖/‖fd‖ (P: the directions as rows).
        fd_cosine: cos(Pg, fd).
        ref_rel_error: ‖g − g_ref‖/‖g_ref‖.
        ref_cosine: cos(g, g_ref).
        hypergrad_norm: ‖g‖.
        fd_norm: ‖fd‖.
        fd_error_estimate: ‖D(eps) − D(2·eps)‖/‖D(eps)‖, the estimated relative error of fd itself.
        ref_fd_rel_error: ‖P g_ref − fd‖/‖fd‖, how well the reference solver itself matches fd.
        eps: the finite-difference step.
        rtol: the bound on the relative errors.
        min_cosine: the bound on the cosines.
        fd_accuracy_bound: rtol / FD_ACCURACY_RATIO, the bound on ``fd_error_estimate``.
        failures: one sentence per criterion that failed (empty when passed).
        passed: True iff every criterion held.
    """

    solver: str
    reference: Optional[str]
    directions: int
    fd_rel_error: float
    fd_cosine: float
    ref_rel_error: Optional[float]
    ref_cosine: Optional[float]
    hypergrad_norm: float
    fd_norm: float = math.nan
    fd_error_estimate: float = math.nan
    ref_fd_rel_error: Optional[float] = None
    eps: float = DEFAULT_EPS
    rtol: float = DEFAULT_RTOL
    min_cosine: float = DEFAULT_MIN_COSINE
    fd_accuracy_bound: float = DEFAULT_RTOL / FD_ACCURACY_RATIO
    failures: tuple[str, ...] = field(default=())
    passed: bool = False

    @property
    def verdict(self) -> str:
        """``"check passed"`` or ``"check FAILED: <each failed criterion>"``."""
        return "check passed" if self.passed else "check FAILED: " + "; ".join(self.failures)

    def __str__(self) -> str:
        lines = [f"solver {self.solver}: |hypergrad| = {self.hypergrad_norm:.6g}",
                 f"  vs central finite differences ({self.directions} directions, float64, eps {self.eps:g}): "
                 f"rel. error {self.fd_rel_error:.3e}, cosine {self.fd_cosine:.8f}",
                 f"  finite-difference error estimate |D(eps) - D(2 eps)|/|D(eps)|: {self.fd_error_estimate:.3e} "
                 f"(|fd| = {self.fd_norm:.6g})"]
        if self.reference is not None:
            lines.append(f"  vs reference solver {self.reference}: rel. error {self.ref_rel_error:.3e}, "
                         f"cosine {self.ref_cosine:.8f} (reference vs finite differences: rel. error "
                         f"{self.ref_fd_rel_error:.3e})")
        lines.append(f"  thresholds: rel. error <= rtol {self.rtol:g}, cosine >= {self.min_cosine:g}, "
                     f"finite-difference error estimate <= rtol/{FD_ACCURACY_RATIO:g} = {self.fd_accuracy_bound:g}")
        lines.append(self.verdict)
        return "\n".join(lines)


def validate_check_options(*, rtol: float, min_cosine: float, eps: float, max_directions: int) -> None:
    """Raise ValueError naming the bad option and its valid range; called before any work is done."""
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not (0 < rtol < math.inf):
        raise ValueError(f"check rtol must be a finite number > 0 (a relative error bound such as "
                         f"{DEFAULT_RTOL:g}), got {rtol!r}")
    if isinstance(min_cosine, bool) or not isinstance(min_cosine, (int, float)) or not (-1 <= min_cosine <= 1):
        raise ValueError(f"check min_cosine must be a number in [-1, 1] (default {DEFAULT_MIN_COSINE}), "
                         f"got {min_cosine!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 < eps < math.inf):
        raise ValueError(f"check eps (the finite-difference step) must be a finite number > 0, e.g. "
                         f"{DEFAULT_EPS:g} in float64, got {eps!r}")
    if isinstance(max_directions, bool) or not isinstance(max_directions, int) or max_directions < 1:
        raise ValueError(f"check max_directions must be an int >= 1 (the number of finite-difference "
                         f"directions), got {max_directions!r}")


def _to64(batch: Batch) -> Batch:
    return pytree.tree_map(lambda x: x.to(torch.float64) if isinstance(x, Tensor) and x.is_floating_point() else x,
                           batch)


def _compare(estimate: Tensor, target: Tensor) -> tuple[float, float]:
    """(‖estimate − target‖/‖target‖, cos(estimate, target)); a zero target gives inf (or nan when equal)."""
    target_norm = float(torch.linalg.norm(target))
    diff = float(torch.linalg.norm(estimate - target))
    rel = diff / target_norm if target_norm > 0 else (math.nan if diff == 0 else math.inf)
    norms = float(torch.linalg.norm(estimate)) * target_norm
    cos = float(torch.dot(estimate, target)) / norms if norms > 0 else math.nan
    return rel, cos


def _loop_value(problem: BilevelProblem, inner: Params, inner_batch: Any, outer_batch: Batch,
                loop: InnerLoop) -> Callable[[Params], float]:
    """φ ↦ L(φ) = F(θ_K(φ), φ), the K-step loop's outer loss, as a Python float."""
    def value(phi: Params) -> float:
        with torch.no_grad():
            theta, _, _ = loop.run(problem, inner, phi, inner_batch)
            return float(problem.outer(theta, phi, outer_batch))
    return value


def _central(value: Callable[[Params], float], outer: Params, d: Tensor, h: float) -> float:
    step = tree.unflatten(h * d, outer)
    return (value(tree.add(outer, step)) - value(tree.sub(outer, step))) / (2 * h)


def finite_difference_directional(problem: BilevelProblem, inner: Params, outer: Params, inner_batch: Any,
                                  outer_batch: Batch, loop: InnerLoop, directions: Tensor, eps: float) -> Tensor:
    """Central differences [L(φ + εd) − L(φ − εd)] / 2ε of L(φ) = F(θ_K(φ), φ) for each row d."""
    value = _loop_value(problem, inner, inner_batch, outer_batch, loop)
    return torch.tensor([_central(value, outer, d, eps) for d in directions], dtype=torch.float64)


def finite_difference_with_error(problem: BilevelProblem, inner: Params, outer: Params, inner_batch: Any,
                                 outer_batch: Batch, loop: InnerLoop, directions: Tensor, eps: float
                                 ) -> tuple[Tensor, float]:
    """D(eps) for each row d, and its estimated relative error ‖D(eps) − D(2·eps)‖/‖D(eps)‖.

    The estimate is conservative (module docstring): 3× the truncation error, about the rounding error.
    It is inf when D(eps) is exactly zero in every direction (a relative error is then undefined).
    """
    value = _loop_value(problem, inner, inner_batch, outer_batch, loop)
    fine = torch.tensor([_central(value, outer, d, eps) for d in directions], dtype=torch.float64)
    coarse = torch.tensor([_central(value, outer, d, 2 * eps) for d in directions], dtype=torch.float64)
    fine_norm = float(torch.linalg.norm(fine))
    spread = float(torch.linalg.norm(fine - coarse))
    return fine, (spread / fine_norm if fine_norm > 0 else math.inf)


def _failures(fd_rel: float, fd_cos: float, ref_rel: Optional[float], ref_cos: Optional[float],
              fd_err: float, fd_norm: float, reference: Optional[str], directions: int, *, rtol: float,
              min_cosine: float, eps: float) -> list[str]:
    """One sentence per failed criterion. Written as ``not (x <= bound)`` so that NaN fails too."""
    out = []
    bound = rtol / FD_ACCURACY_RATIO
    if fd_norm == 0:
        out.append(f"finite-difference reference is zero in all {directions} directions, so no relative error "
                   "can be measured: check at outer params where the hypergradient is non-zero, or with a "
                   "larger eps if L(phi) does not change at this step size")
    elif not fd_err <= bound:
        out.append(f"finite-difference reference not accurate enough: its estimated relative error "
                   f"{fd_err:.3e} (|D(eps) - D(2 eps)|/|D(eps)|, eps {eps:g}) exceeds rtol/{FD_ACCURACY_RATIO:g} "
                   f"= {bound:.3e}, so it cannot certify rtol {rtol:g}; choose another eps (smaller when "
                   "truncation dominates, larger when rounding does; ~1e-6 suits float64) or loosen rtol to at "
                   f"least {FD_ACCURACY_RATIO:g}x the estimate")
    if not fd_rel <= rtol:
        out.append(f"relative error vs finite differences {fd_rel:.3e} > rtol {rtol:g}")
    if not fd_cos >= min_cosine:
        out.append(f"cosine vs finite differences {fd_cos:.6f} < min_cosine {min_cosine:g}")
    if reference is not None:
        if not ref_rel <= rtol:
            out.append(f"relative error vs reference solver {reference} {ref_rel:.3e} > rtol {rtol:g}")
        if not ref_cos >= min_cosine:
            out.append(f"cosine vs reference solver {reference} {ref_cos:.6f} < min_cosine {min_cosine:g}")
    return out


def check(problem: BilevelProblem, inner: Params, outer: Params, *, inner_batch: Batch | Callable[[int], Batch],
          outer_batch: Batch, solver: Any = "cg", reference: Optional[Any] = "unroll",
          loop: Optional[InnerLoop] = None, eps: float = DEFAULT_EPS, max_directions: int = 32, seed: int = 0,
          verbose: bool = True, rtol: float = DEFAULT_RTOL, min_cosine: float = DEFAULT_MIN_COSINE) -> CheckReport:
    """Compare ``solver``'s hypergradient with finite differences (float64) and with ``reference``.

    With dim(φ) ≤ ``max_directions`` every coordinate is differenced; otherwise ``max_directions``
    random unit directions d (seeded) compare ⟨hypergrad, d⟩ with the directional difference quotient.
    All computations run on float64 copies of params and batches.

    Args:
        problem, inner, outer, inner_batch, outer_batch, loop: as in :func:`bilevel.hypergrad`.
        solver: the solver to check (spec or object).
        reference: a second solver to compare with (e.g. ``"unroll"``, ``"exact"``), or None.
        eps: the finite-difference step; differences are also taken at 2·eps to estimate their error.
        max_directions: the most finite-difference directions.
        seed: seeds the random directions.
        verbose: print the report (with its verdict).
        rtol: pass only if every relative error is ≤ rtol (default 1e-4: justified in the module doc).
        min_cosine: pass only if every cosine is ≥ min_cosine (default 0.99).

    Returns:
        A :class:`CheckReport`; ``report.passed`` is the verdict and ``report.failures`` says why not.
        The check never raises because the hypergradient is wrong: it reports it.

    Raises:
        ValueError: rtol, min_cosine, eps or max_directions is out of range (before any work).
    """
    validate_check_options(rtol=rtol, min_cosine=min_cosine, eps=eps, max_directions=max_directions)
    loop = loop or InnerLoop()
    inner64, outer64 = tree.cast(tree.clone(inner), torch.float64), tree.cast(tree.clone(outer), torch.float64)
    ib = (lambda k: _to64(inner_batch(k))) if callable(inner_batch) else _to64(inner_batch)
    ob = _to64(outer_batch)
    result = hypergrad(problem, inner64, outer64, inner_batch=ib, outer_batch=ob, solver=solver, loop=loop)
    estimate = tree.flatten(result.hypergrad).to(torch.float64)
    n = estimate.numel()
    if n <= max_directions:
        directions = torch.eye(n, dtype=torch.float64)
    else:
        gen = torch.Generator().manual_seed(seed)
        directions = torch.randn(max_directions, n, generator=gen, dtype=torch.float64)
        directions = directions / directions.norm(dim=1, keepdim=True)
    fd, fd_err = finite_difference_with_error(problem, inner64, outer64, ib, ob, loop, directions, eps)
    fd_rel, fd_cos = _compare(directions @ estimate, fd)
    ref_rel = ref_cos = ref_fd_rel = None
    reference_name = None if reference is None else str(reference)
    if reference is not None:
        ref = tree.flatten(hypergrad(problem, inner64, outer64, inner_batch=ib, outer_batch=ob, solver=reference,
                                     loop=loop).hypergrad).to(torch.float64)
        ref_rel, ref_cos = _compare(estimate, ref)
        ref_fd_rel, _ = _compare(directions @ ref, fd)
    fd_norm = float(torch.linalg.norm(fd))
    failures = _failures(fd_rel, fd_cos, ref_rel, ref_cos, fd_err, fd_norm, reference_name, len(directions),
                         rtol=rtol, min_cosine=min_cosine, eps=eps)
    report = CheckReport(str(solver), reference_name, len(directions), fd_rel, fd_cos, ref_rel, ref_cos,
                         float(torch.linalg.norm(estimate)), fd_norm=fd_norm, fd_error_estimate=fd_err,
                         ref_fd_rel_error=ref_fd_rel, eps=eps, rtol=rtol, min_cosine=min_cosine,
                         fd_accuracy_bound=rtol / FD_ACCURACY_RATIO, failures=tuple(failures),
                         passed=not failures)
    if verbose:
        print(report)
    return report
