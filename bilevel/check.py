"""Check a solver's hypergradient on your problem: against central finite differences and another solver.

Every anchor library has shipped a wrong hypergradient at some point; this makes checking one call.
The finite-difference target is the derivative of the K-step loop, φ ↦ F(θ_K(φ), φ), computed in
float64: it is exactly what ``unroll`` and ``forward`` compute, and what the implicit solvers approach
as the inner loop converges.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from . import tree
from .api import hypergrad
from .inner import InnerLoop
from .tree import Params
from .types import Batch, BilevelProblem


@dataclass
class CheckReport:
    """Relative errors (‖a − b‖/‖b‖ over the checked directions) and cosines.

    ``fd_*`` compare with finite differences, ``ref_*`` with the reference solver (None when not run).
    """

    solver: str
    reference: Optional[str]
    directions: int
    fd_rel_error: float
    fd_cosine: float
    ref_rel_error: Optional[float]
    ref_cosine: Optional[float]
    hypergrad_norm: float

    def __str__(self) -> str:
        lines = [f"solver {self.solver}: |hypergrad| = {self.hypergrad_norm:.6g}",
                 f"  vs central finite differences ({self.directions} directions, float64): "
                 f"rel. error {self.fd_rel_error:.3e}, cosine {self.fd_cosine:.8f}"]
        if self.reference is not None:
            lines.append(f"  vs reference solver {self.reference}: rel. error {self.ref_rel_error:.3e}, "
                         f"cosine {self.ref_cosine:.8f}")
        return "\n".join(lines)


def _to64(batch: Batch) -> Batch:
    return pytree.tree_map(lambda x: x.to(torch.float64) if isinstance(x, Tensor) and x.is_floating_point() else x,
                           batch)


def _compare(estimate: Tensor, target: Tensor) -> tuple[float, float]:
    rel = float(torch.linalg.norm(estimate - target) / torch.clamp(torch.linalg.norm(target), min=1e-300))
    cos = float(torch.dot(estimate, target) / torch.clamp(torch.linalg.norm(estimate) * torch.linalg.norm(target),
                                                          min=1e-300))
    return rel, cos


def finite_difference_directional(problem: BilevelProblem, inner: Params, outer: Params, inner_batch: Any,
                                  outer_batch: Batch, loop: InnerLoop, directions: Tensor, eps: float) -> Tensor:
    """Central differences [L(φ + εd) − L(φ − εd)] / 2ε of L(φ) = F(θ_K(φ), φ) for each row d."""
    def value(phi: Params) -> float:
        with torch.no_grad():
            theta, _, _ = loop.run(problem, inner, phi, inner_batch)
            return float(problem.outer(theta, phi, outer_batch))

    out = []
    for d in directions:
        step = tree.unflatten(eps * d, outer)
        out.append((value(tree.add(outer, step)) - value(tree.sub(outer, step))) / (2 * eps))
    return torch.tensor(out, dtype=torch.float64)


def check(problem: BilevelProblem, inner: Params, outer: Params, *, inner_batch: Batch | Callable[[int], Batch],
          outer_batch: Batch, solver: Any = "cg", reference: Optional[Any] = "unroll",
          loop: Optional[InnerLoop] = None, eps: float = 1e-6, max_directions: int = 32, seed: int = 0,
          verbose: bool = True) -> CheckReport:
    """Compare ``solver``'s hypergradient with finite differences (float64) and with ``reference``.

    With dim(φ) ≤ ``max_directions`` every coordinate is differenced; otherwise ``max_directions``
    random unit directions d (seeded) compare ⟨hypergrad, d⟩ with the directional difference quotient.
    All computations run on float64 copies of params and batches. Prints the report when ``verbose``.
    """
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
    fd = finite_difference_directional(problem, inner64, outer64, ib, ob, loop, directions, eps)
    fd_rel, fd_cos = _compare(directions @ estimate, fd)
    ref_rel = ref_cos = None
    if reference is not None:
        ref = hypergrad(problem, inner64, outer64, inner_batch=ib, outer_batch=ob, solver=reference, loop=loop)
        ref_rel, ref_cos = _compare(estimate, tree.flatten(ref.hypergrad).to(torch.float64))
    report = CheckReport(str(solver), None if reference is None else str(reference), len(directions),
                         fd_rel, fd_cos, ref_rel, ref_cos, float(torch.linalg.norm(estimate)))
    if verbose:
        print(report)
    return report
