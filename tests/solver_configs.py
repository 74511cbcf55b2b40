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
- ``("rel_ridged", b)``: relative error ≤ b to the closed form with (H + (δ + ρ)I)⁻¹ in place of H⁻¹, δ and ρ
  the spec's ``damping`` and ``rho`` (``nystrom`` with rank = dim θ: H_k = H, so exactly its ridged solve).
- ``("bome_outer", b)``: BOME's per-call direction is the φ-part of a step on the joint variable (φ, θ), not a
  hypergradient estimate (its λ∇φq term acts only through θ's distance to θ_T), so it is judged by its outer
  run: N plain-SGD outer steps with θ warm-started by the solver (Algorithm 1), against the same run with a
  warm-started ``cg``; the run must achieve at least b of cg's decrease of F(θ*(φ), φ) (tests/bome_runs.py).
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
    # nystrom with rank capped at dim θ (5 on the ridge oracle, 6 on the quadratic): the dense solve of (H + ρI),
    # measured 2e-14 from the ridged closed form on ridge; its true residual ‖ρx‖/‖b‖ = 0.0074 there meets
    # rtol=1e-2 (≤ ρ/(λ_min + ρ) < 0.01 on the quadratic, λ_min ≥ 1); ρ = 0.01: float32 agrees with float64 to 1e-5
    "nystrom": SolverConfig("nystrom:rank=100,rho=0.01,rtol=1e-2", CONVERGED, ("rel_ridged", 1e-10)),
    "forward": SolverConfig("forward:chunk_size=5", CONVERGED, ("rel", 1e-8)),
    "unroll": SolverConfig("unroll", CONVERGED, ("rel", 1e-8)),
    "onestep": SolverConfig("onestep", bilevel.InnerLoop(steps=1, lr=0.4), ("neumann1", 1e-10), True),
    "cmaes": SolverConfig("cmaes:popsize=8,sigma=0.2", bilevel.InnerLoop(steps=100, lr=0.5), ("cmaes", 0.2)),
    # bome: 300 SGD outer steps at ξ = 1 (η = 1, T = 10) close 0.993 of the decrease of F(w*(φ)) that warm-started
    # cg's run with the same steps achieves on the ridge oracle (0.998 after 1000 steps); bound 0.97
    "bome": SolverConfig("bome:eta=1.0,lr=1.0", bilevel.InnerLoop(steps=10, lr=0.5), ("bome_outer", 0.97)),
    # soba from θ*: its 5 inner steps stay at θ*, and 100 v steps from v = 0 (ρ = 0.4, contraction 1 − ρλ_min ≤ 0.6
    # on both oracles) leave the residual of H v = ∇θF below 1e-20: the IFT closed form to rounding
    "soba": SolverConfig("soba:inner_steps=5,v_steps=100", bilevel.InnerLoop(steps=1, lr=0.4), ("rel", 1e-10), True),
    # f2sa from θ* at a fixed λ = 1000: z stays at θ*, 100 steps (contraction ≤ 0.8) take y to y*_λ to 1e-10 of
    # ‖y*_λ − θ*‖, so what remains is the penalty's O(1/λ) bias C/λ, measured C = 0.58 (ridge) and 0.92 (quadratic
    # oracle, tests/test_two_paths.py holds it to the same bound): ("rel", 2/λ) = ("rel", 2e-3); loop.steps unused
    "f2sa": SolverConfig("f2sa:steps=100,lambda0=1000,lambda_power=0,lambda_max=1000",
                         bilevel.InnerLoop(steps=1, lr=0.5), ("rel", 2e-3), True),
}

# Variants of registered solvers that the conformance tests also hold to a criterion.
VARIANTS = {
    "forward:chunk_size=2": SolverConfig("forward:chunk_size=2", QUICK, ("rel_unroll", 1e-10)),
    "unroll:truncate=20": SolverConfig("unroll:truncate=20", bilevel.InnerLoop(steps=60, lr=0.5), ("cos", 0.9)),
    "unroll:checkpoint=true": SolverConfig("unroll:checkpoint=true", CONVERGED, ("rel", 1e-8)),
    "cg:hvp=fwdrev": SolverConfig("cg:hvp=fwdrev,rtol=1e-12", CONVERGED, ("rel", 1e-8)),
    "neumann:warm_start=true": SolverConfig("neumann:terms=150,warm_start=true", CONVERGED, ("rel", 1e-8)),
}
