"""Every registered problem with every solver that applies: a 2-outer-step SMOKE run, and for nested
problems the SMOKE instance's hypergradient held to an exact value in float64.

Criteria per solver kind (documented in README, "Solvers"):
- ``forward`` / ``unroll``: the exact derivative of the K-step loop, so against central finite differences
  of that loop (float64): relative error ≤ 1e-5;
- implicit (``cg``, ``neumann``, ``fixedpoint``, ``nystrom`` at rank = dim θ with ρ = 0) against the dense
  ``exact`` solve at the same inner iterate and the same damping: the same linear system, so relative error
  ≤ 1e-5;
- ``unroll:truncate``: the derivative of a truncated loop, biased: cosine with full ``unroll`` ≥ 0.5;
- ``onestep``: the exact derivative of one step of the loop from a trained warm start, so against finite
  differences of a one-step loop: relative error ≤ 1e-4 (``bilevel.check``'s default bound);
- ``soba``: no inner step and 10 v steps from v = 0 is the 10-term Neumann series with α = the loop's lr, so
  against ``neumann`` at the same trained warm start (float64): relative error ≤ 1e-9 (see ``check_soba``);
- ``bome``: the φ-part of its step, ∇φ[F(θ, φ) + λ(G(θ, φ) − G(θ_T, φ))] with θ_T and λ fixed, against finite
  differences of that function at a trained warm start: relative error ≤ 1e-5 (see ``check_bome``);
- ``cmaes``: no derivative to compare; the loop must land the outer params exactly on the new mean
  (φ₁ = φ₀ − g₀ with g₀ = m_old − m_new).
A solver whose kind does not apply is refused with an error that names the solvers that do.
"""
import dataclasses
import math
import warnings

import pytest
import torch

import bilevel
from bilevel.run.problems import load_problem, registered

PROBLEMS = sorted(registered())
# Implicit solvers on the nonconvex SMOKE instances: the same relative damping for solver and reference.
IMPLICIT_CHECK = {"cg": "cg:rtol=1e-13,maxiter=2000", "neumann": "neumann:terms=600",
                  "fixedpoint": "fixedpoint:rtol=1e-13,maxiter=3000",
                  "nystrom": "nystrom:rank=1000000,rho=0"}  # rank capped at dim θ: H_k = H, the damping its ridge
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


def float64_inputs(decl, sub):
    """The sub-problem's inner params, inner batch (or batch function), outer batch and the declaration's outer
    params, in float64."""
    def to64(b):
        return torch.utils._pytree.tree_map(
            lambda x: x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x, b)

    inner_batch = (lambda k: to64(sub.inner_batch(k))) if callable(sub.inner_batch) else to64(sub.inner_batch)
    return to64(sub.inner), inner_batch, to64(sub.outer_batch), to64(decl.outer)


def assert_matches_central_differences(objective, outer, direction, eps=1e-6, bound=1e-5):
    """``direction`` against float64 central differences of the scalar ``objective(φ)`` along ≤ 12 seeded random
    directions: relative error ≤ ``bound``."""
    flat = bilevel.tree.flatten(outer)
    gen = torch.Generator().manual_seed(0)
    directions = torch.randn(min(12, flat.numel()), flat.numel(), generator=gen, dtype=torch.float64)
    fd = torch.tensor([(objective(bilevel.tree.unflatten(flat + eps * d, outer))
                        - objective(bilevel.tree.unflatten(flat - eps * d, outer))) / (2 * eps) for d in directions])
    estimate = directions @ bilevel.tree.flatten(direction)
    assert float((estimate - fd).norm() / fd.norm()) <= bound, (estimate, fd)


def check_f2sa(decl, sub):
    """``f2sa`` returns ∇φL(φ) of the penalty Lagrangian L(φ) = F(y, φ) + λ(G(y, φ) − G(z, φ)) at its own iterates y
    (its state), z (the returned inner params) and λ, with G on the batch of its final gradients, inner_batch(T): held
    to central finite differences of L (float64, eps 1e-6, ≤ 12 random directions): relative error ≤ 1e-5. (Its
    O(1/λ) distance to the true hypergradient needs a strongly convex G and is tested on the oracles, test_f2sa.py.)"""
    inner, inner_batch, outer_batch, outer = float64_inputs(decl, sub)
    result = bilevel.hypergrad(decl.problem, inner, outer, inner_batch=inner_batch, outer_batch=outer_batch,
                               solver="f2sa", loop=decl.loop)
    lam, y, z = result.diagnostics["lambda"], result.state["y"], result.inner
    g_batch = bilevel.inner.batch_at(inner_batch, bilevel.make_solver("f2sa").steps)

    def lagrangian(phi):
        p = decl.problem
        return float(p.outer(y, phi, outer_batch) + lam * (p.inner(y, phi, g_batch) - p.inner(z, phi, g_batch)))

    assert_matches_central_differences(lagrangian, outer, result.hypergrad)
    assert result.diagnostics["hvp_count"] == 0.0


def check_soba(decl, sub):
    """``soba`` with no inner step and N = 10 v steps from v = 0 returns ∇φF − (∂²G/∂φ∂θ)ᵀ v_N with v_N = ρ Σ_{j<N}
    (I − ρH)^j ∇θF, the truncated Neumann series with α = ρ (the loop's lr) and N terms: held to ``neumann`` with those
    options at the same trained warm start (the loop's K steps), both on batch 0, in float64: relative error ≤ 1e-9.
    An identity of the two algorithms that needs no positive-definite H (the SMOKE networks need not have one); that
    the amortised iteration reaches the IFT value when H ≻ 0 is tested on the oracles (test_soba.py)."""
    inner, inner_batch, outer_batch, outer = float64_inputs(decl, sub)
    warm, _, _ = decl.loop.run(decl.problem, inner, outer, inner_batch)
    results = []
    for spec in (f"soba:inner_steps=0,v_steps=10,v_lr={decl.loop.lr}", f"neumann:alpha={decl.loop.lr},terms=10"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ten terms need not meet Neumann's tolerance: the identity is the point
            results.append(bilevel.hypergrad(decl.problem, warm, outer, inner_batch=inner_batch, outer_batch=outer_batch,
                                             solver=spec, loop=dataclasses.replace(decl.loop, steps=0)).hypergrad)
    soba, neumann = (bilevel.tree.flatten(r) for r in results)
    assert float((soba - neumann).norm() / neumann.norm()) <= 1e-9, (soba, neumann)


def check_bome(decl, sub):
    """``bome`` returns d_φ = ∇φL(φ) for L(φ) = F(θ, φ) + λ(G(θ, φ) − G(θ_T, φ)) at its start θ, with θ_T (the loop's T
    steps from θ at fixed φ, not differentiated) and λ (its diagnostic) held fixed, G on the batch inner_batch(T): held
    to central finite differences of L (float64, eps 1e-6, ≤ 12 random directions) at a trained warm start: relative
    error ≤ 1e-5; and its q̂ to G(θ) − G(θ_T) (to 1e-12 |G|, the rounding of G's values). (A step on the joint
    variable, not a hypergradient estimate: its λ and its outer runs are tested on the oracles and hyper-cleaning,
    test_bome.py.)"""
    inner, inner_batch, outer_batch, outer = float64_inputs(decl, sub)
    p = decl.problem
    theta, _, _ = decl.loop.run(p, inner, outer, inner_batch)
    result = bilevel.hypergrad(p, theta, outer, inner_batch=inner_batch, outer_batch=outer_batch, solver="bome",
                               loop=decl.loop)
    theta_t, _, _ = decl.loop.run(p, theta, outer, inner_batch)
    lam, g_batch = result.diagnostics["lambda"], bilevel.inner.batch_at(inner_batch, decl.loop.steps)

    def lagrangian(phi):
        gap = p.inner(theta, phi, g_batch) - p.inner(theta_t, phi, g_batch)
        return float(p.outer(theta, phi, outer_batch) + lam * gap)

    assert_matches_central_differences(lagrangian, outer, result.hypergrad)
    g_value = float(p.inner(theta, outer, g_batch))
    q = g_value - float(p.inner(theta_t, outer, g_batch))
    assert abs(result.diagnostics["q"] - q) <= 1e-12 * abs(g_value), (result.diagnostics["q"], q)  # rounding of G
    assert result.diagnostics["hvp_count"] == 0.0


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
    if solver == "f2sa":  # online, but not the derivative of a one-step loop: see check_f2sa
        check_f2sa(decl, sub)
        return
    if solver == "bome":  # online, but a step on (φ, θ), not the derivative of a one-step loop: see check_bome
        check_bome(decl, sub)
        return
    if solver == "soba":  # online, but an amortised implicit solve, not a one-step loop: see check_soba
        check_soba(decl, sub)
        return
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
