"""Every registered problem with every solver that applies: a 2-outer-step SMOKE run, and for nested
problems the SMOKE instance's hypergradient held to an exact value in float64.

Criteria per solver kind (documented in README, "Solvers"):
- ``forward`` / ``unroll``: the exact derivative of the K-step loop, so against central finite differences
  of that loop (float64): relative error ≤ 1e-5;
- implicit (``cg``, ``neumann``, ``fixedpoint``) against the dense ``exact`` solve at the same inner
  iterate and the same damping: the same linear system, so relative error ≤ 1e-5;
- ``unroll:truncate``: the derivative of a truncated loop, biased: cosine with full ``unroll`` ≥ 0.5;
- ``onestep``: the exact derivative of one step of the loop from a trained warm start, so against finite
  differences of a one-step loop: relative error ≤ 1e-4 (``bilevel.check``'s default bound);
- ``cmaes``: no derivative to compare; the loop must land the outer params exactly on the new mean
  (φ₁ = φ₀ − g₀ with g₀ = m_old − m_new).
A solver whose kind does not apply is refused with an error that names the solvers that do.
"""
import dataclasses
import math

import pytest
import torch

import bilevel
from bilevel.run.problems import load_problem, registered

PROBLEMS = sorted(registered())
# Implicit solvers on the nonconvex SMOKE instances: the same relative damping for solver and reference.
IMPLICIT_CHECK = {"cg": "cg:rtol=1e-13,maxiter=2000", "neumann": "neumann:terms=600",
                  "fixedpoint": "fixedpoint:rtol=1e-13,maxiter=3000"}
DAMPING = "damping=0.1,relative_damping=true"


def declaration(name):
    module = load_problem(name)
    return module, module.build(module.SMOKE, bilevel.local_context(seed=0))


def applicable(decl):
    return [n for n in bilevel.SOLVERS if bilevel.solver_kind(n) in decl.solvers]


def smoke_spec(name):
    """The spec of the 2-step runs: small CMA-ES populations; implicit solvers damped relative to λ̂_max,
    since the SMOKE networks are trained for a few steps only and their Hessians can be indefinite."""
    if name == "cmaes":
        return "cmaes:popsize=4,sigma=0.2"
    return f"{name}:{DAMPING}" if bilevel.solver_kind(name) == "implicit" else name


@pytest.mark.parametrize("problem", PROBLEMS)
def test_two_smoke_steps_with_every_solver_that_applies(problem):
    module, decl = declaration(problem)
    if isinstance(decl, bilevel.SingleLevel):
        outer, history, _ = bilevel.run_locally(decl, 2)
        assert len(history) == 2 and all(math.isfinite(m["outer_loss"]) for m in history)
        assert any(not torch.equal(outer[k], decl.params[k]) for k in outer)
        with pytest.raises(bilevel.SpecError, match="single-level objective"):
            bilevel.OuterLoop(decl, "cg", bilevel.local_context())
        return
    for solver in applicable(decl):
        outer, history, _ = bilevel.run_locally(decl, 2, solver=smoke_spec(solver))
        assert len(history) == 2, solver
        assert all(math.isfinite(v) for m in history for k, v in m.items() if "loss" in k), (solver, history)
    refused = [n for n in bilevel.SOLVERS if n not in applicable(decl)]
    for solver in refused:
        with pytest.raises(bilevel.SpecError, match="does not apply.*solvers that apply: " +
                           ", ".join(applicable(decl))):
            bilevel.OuterLoop(decl, solver, bilevel.local_context())


def nested_cases():
    for problem in PROBLEMS:
        _, decl = declaration(problem)
        if isinstance(decl, bilevel.Nested):
            for solver in applicable(decl):
                yield problem, solver


@pytest.mark.parametrize("problem, solver", list(nested_cases()))
def test_smoke_hypergradient_against_an_exact_value(problem, solver):
    _, decl = declaration(problem)
    sub = decl.first_subproblem(0)
    args = dict(inner_batch=sub.inner_batch, outer_batch=sub.outer_batch, loop=decl.loop, verbose=False,
                max_directions=12)
    kind = bilevel.solver_kind(solver)
    if solver in ("forward", "unroll") or kind == "online":
        start = sub.inner
        if kind == "online":  # one step from a warm, trained θ: the derivative of a one-step loop
            start, _, _ = decl.loop.run(decl.problem, sub.inner, decl.outer, sub.inner_batch)
            args["loop"] = dataclasses.replace(decl.loop, steps=1)
        report = bilevel.check(decl.problem, start, decl.outer, solver=solver, reference=None, **args)
        # one step from a trained θ: the step's own scale is ~η·‖∇G‖, so central differences of it carry
        # relatively more round-off than those of a K-step loop; 1e-4 is check's default, itself held to be
        # 10x above the finite differences' estimated error
        assert report.fd_rel_error <= (1e-4 if kind == "online" else 1e-5), report
        if solver == "unroll" and decl.loop.steps >= 4:
            truncated = bilevel.check(decl.problem, sub.inner, decl.outer, solver=f"unroll:truncate="
                                      f"{decl.loop.steps // 2}", reference="unroll", **args)
            assert truncated.ref_cosine >= 0.5, truncated
    elif kind == "implicit":
        spec = IMPLICIT_CHECK.get(solver, solver) + "," + DAMPING
        if solver == "exact":
            spec = "exact:" + DAMPING
        report = bilevel.check(decl.problem, sub.inner, decl.outer, solver=spec, reference="exact:" + DAMPING,
                               **args)
        assert report.ref_rel_error <= 1e-5, report
    elif kind == "zeroth_order":
        loop = bilevel.OuterLoop(decl, "cmaes:popsize=4,sigma=0.2", bilevel.local_context())
        before = bilevel.tree.detach(bilevel.tree.clone(loop.outer))
        grads, _ = loop.gradient(0)
        loop.apply(grads)
        for k in before:
            assert torch.allclose(loop.outer[k], before[k] - grads[k], rtol=0, atol=1e-6), k
    else:
        raise AssertionError(f"no criterion for solver {solver!r} of kind {kind!r}")
