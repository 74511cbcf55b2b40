"""One line per registered solver: how the conformance tests run it on the ridge oracle, and how close to the
exact hypergradient it must come. A solver registered without a line here fails ``test_conformance.py``.

Criteria (each documented by what the solver computes):
- ``("rel", b)``: relative error to the closed-form IFT hypergradient ≤ b (implicit solvers, and the exact
  derivative of a converged K-step loop for forward / full unroll);
- ``("rel_unroll", b)``: relative error to full ``unroll`` with the same loop ≤ b (both are the exact
  derivative of the same K-step loop);
- ``("cos", b)``: cosine with the closed form ≥ b (truncated unroll: a biased but descent direction);
- ``("neumann1", b)``: one-step lookahead from the inner solution θ* equals ``neumann:alpha=η,terms=1``
  (d/dφ F(θ* − η∇G) = −η (∂²G/∂φ∂θ)ᵀ∇θF) to relative error ≤ b;
- ``("cmaes", b)``: zeroth-order: the mean cosine of the pseudo-gradient with the closed form over 8 search
  seeds is ≥ b (a descent direction on average, nothing more).
"""
from __future__ import annotations

from dataclasses import dataclass

import bilevel

CONVERGED = bilevel.InnerLoop(steps=300, lr=0.5)  # contraction ≤ 0.8 per step on the ridge oracle
QUICK = bilevel.InnerLoop(steps=20, lr=0.5)       # for the invariants, which need no convergence


@dataclass(frozen=True)
class SolverConfig:
    spec: str
    loop: bilevel.InnerLoop
    criterion: tuple
    start_at_solution: bool = False  # online solvers step from a warm start: give them θ*

    @property
    def quick_loop(self) -> bilevel.InnerLoop:
        return self.loop if self.loop.steps <= QUICK.steps else QUICK


SOLVER_CONFIGS = {
    "cg": SolverConfig("cg:maxiter=50,rtol=1e-12", CONVERGED, ("rel", 1e-8)),
    "neumann": SolverConfig("neumann:terms=150", CONVERGED, ("rel", 1e-8)),
    "fixedpoint": SolverConfig("fixedpoint:rtol=1e-12,maxiter=500", CONVERGED, ("rel", 1e-8)),
    "exact": SolverConfig("exact", CONVERGED, ("rel", 1e-10)),
    "forward": SolverConfig("forward:chunk_size=5", CONVERGED, ("rel", 1e-8)),
    "unroll": SolverConfig("unroll", CONVERGED, ("rel", 1e-8)),
    "onestep": SolverConfig("onestep", bilevel.InnerLoop(steps=1, lr=0.4), ("neumann1", 1e-10), True),
    "cmaes": SolverConfig("cmaes:popsize=8,sigma=0.2", bilevel.InnerLoop(steps=100, lr=0.5), ("cmaes", 0.2)),
}

# Variants of registered solvers that the conformance tests also hold to a criterion.
VARIANTS = {
    "forward:chunk_size=2": SolverConfig("forward:chunk_size=2", QUICK, ("rel_unroll", 1e-10)),
    "unroll:truncate=20": SolverConfig("unroll:truncate=20", bilevel.InnerLoop(steps=60, lr=0.5), ("cos", 0.9)),
    "unroll:checkpoint=true": SolverConfig("unroll:checkpoint=true", CONVERGED, ("rel", 1e-8)),
    "cg:hvp=fwdrev": SolverConfig("cg:hvp=fwdrev,rtol=1e-12", CONVERGED, ("rel", 1e-8)),
    "neumann:warm_start=true": SolverConfig("neumann:terms=150,warm_start=true", CONVERGED, ("rel", 1e-8)),
}
