"""``bilevel.Implicit`` (solvers/implicit.py) held to exact values: the hypergradient, the solver state,
every diagnostic, the damping and step-size options, the stationarity warning and the input checks.

The problem is the quadratic oracle G(θ, φ) = ½θᵀAθ + θᵀBφ − bᵀθ, F = ½‖θ − t‖² + ½φᵀCφ, so ∇θG = Aθ + Bφ − b,
H = A, ∂²G/∂φ∂θ = Bᵀ and, at any θ the inner loop reaches, the damped IFT hypergradient is

    Cφ − Bᵀ(A + δI)⁻¹(θ − t),

computed here with a dense solve. The inner loop is plain SGD, θ_{k+1} = θ_k − η(Aθ_k + Bφ − b), which the
tests replay in closed form. Written to kill the mutants ``mutation/run.py implicit`` found alive
(docs/mutation.md).
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import bilevel
from bilevel import linsolve
from bilevel.errors import StationarityWarning
from bilevel.solvers.implicit import POWER_ITERATIONS, Implicit
from oracles import quadratic

F64 = torch.float64


def sgd_path(c, outer, theta0, steps, lr):
    """θ_K and the K inner losses of plain SGD on G, in closed form."""
    A, B, b = c["A"], c["B"], c["b"]
    th, losses = theta0.clone(), []
    for _ in range(steps):
        losses.append(float(0.5 * th @ A @ th + th @ (B @ outer["phi"]) - b @ th))
        th = th - lr * (A @ th + B @ outer["phi"] - b)
    return th, losses


def ift(c, outer, theta, delta=0.0):
    p = c["A"].shape[0]
    x = torch.linalg.solve(c["A"] + delta * torch.eye(p, dtype=F64), theta - c["t"])
    return c["C"] @ outer["phi"] - c["B"].T @ x, x


def call(solver, steps=60, lr=0.3, state=None, warn=False):
    problem, inner, outer, c = quadratic()
    loop = bilevel.InnerLoop(steps=steps, lr=lr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = solver(problem, inner, outer, None, None, loop, state)
    theta, losses = sgd_path(c, outer, inner["theta"], steps, lr)
    return result, c, outer, inner, theta, losses, caught


def grad_norm(c, outer, theta):
    return float(torch.linalg.norm(c["A"] @ theta + c["B"] @ outer["phi"] - c["b"]))


@pytest.mark.parametrize("linear", [linsolve.CG(rtol=1e-13), linsolve.Exact(),
                                    linsolve.FixedPoint(alpha=0.2, rtol=1e-13, maxiter=3000)])
def test_hypergradient_and_every_diagnostic_at_an_unconverged_inner_point(linear):
    """K = 60 SGD steps leave ∇θG ≠ 0: the IFT at θ_K is still the exact formula above (at θ_K)."""
    solver = Implicit(linsolve=linear, warm_start=False, stationarity_rtol=0.0)
    result, c, outer, inner, theta, losses, caught = call(solver)
    expected, x = ift(c, outer, theta)
    assert torch.allclose(result.hypergrad["phi"], expected, rtol=1e-10, atol=1e-12)
    assert torch.allclose(result.inner["theta"], theta, rtol=1e-12, atol=1e-14)
    assert result.state is None  # warm_start=False keeps nothing
    d = result.diagnostics
    assert d["inner_loss"] == pytest.approx(losses[-1], rel=1e-12)
    assert d["outer_loss"] == pytest.approx(float(0.5 * ((theta - c["t"]) ** 2).sum()
                                                  + 0.5 * outer["phi"] @ c["C"] @ outer["phi"]), rel=1e-12)
    assert d["inner_steps"] == 60.0
    assert d["evaluations"] == 60 + 1  # the K steps + the stationarity gradient at θ_0
    assert d["inner_grad_norm"] == pytest.approx(grad_norm(c, outer, theta), rel=1e-10)
    assert d["inner_grad_norm_rel"] == pytest.approx(
        grad_norm(c, outer, theta) / grad_norm(c, outer, inner["theta"]), rel=1e-10)
    assert d["converged"] == 1.0 and d["residual"] <= 1e-13
    assert "damping" not in d and not caught
    if isinstance(linear, linsolve.Exact):
        assert d["iterations"] == 1.0 and d["hvp_count"] == 6 + 1
    if isinstance(linear, linsolve.FixedPoint):
        assert d["alpha"] == 0.2 and "lambda_max" not in d
        assert d["hvp_count"] == d["iterations"]  # a cold fixed-point solve: one product per iteration
    if isinstance(linear, linsolve.CG):
        assert d["hvp_count"] == d["iterations"] + 1 and "alpha" not in d


def test_the_diagnostics_report_the_linear_solve_s_own_numbers():
    """A capped CG (2 iterations, rtol 0) reports exactly CG's own info on H x = ∇θF(θ_K)."""
    solver = Implicit(linsolve=linsolve.CG(maxiter=2, rtol=0.0), warm_start=False, stationarity_rtol=0.0)
    result, c, outer, inner, theta, losses, caught = call(solver)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x, info = linsolve.CG(maxiter=2, rtol=0.0)(lambda v: {"x": c["A"] @ v["x"]}, {"x": theta - c["t"]})
    d = result.diagnostics
    assert d["iterations"] == 2.0 and d["hvp_count"] == 3.0 and d["converged"] == 0.0
    assert d["residual"] == pytest.approx(info.residual, rel=1e-10)
    expected = c["C"] @ outer["phi"] - c["B"].T @ x["x"]
    assert torch.allclose(result.hypergrad["phi"], expected, rtol=1e-10, atol=1e-12)


def test_warm_start_keeps_the_solution_and_starts_the_next_solve_from_it():
    solver = Implicit(linsolve=linsolve.CG(rtol=1e-12), stationarity_rtol=0.0)
    first, c, outer, inner, theta, _, _ = call(solver)
    _, x = ift(c, outer, theta)
    assert torch.allclose(first.state["theta"], x, rtol=1e-10, atol=1e-12)
    assert not first.state["theta"].requires_grad
    again, *_ = call(solver, state=first.state)
    assert again.diagnostics["iterations"] == 0.0 and again.diagnostics["hvp_count"] == 1.0  # only H x0
    # a state is ignored without warm_start
    cold, *_ = call(Implicit(linsolve=linsolve.CG(rtol=1e-12), warm_start=False, stationarity_rtol=0.0),
                    state=first.state)
    assert cold.diagnostics["iterations"] > 0


@pytest.mark.parametrize("delta", [0.5, 2.0])
def test_damping_solves_the_damped_system_and_is_reported(delta):
    solver = Implicit(linsolve=linsolve.CG(rtol=1e-13), warm_start=False, damping=delta, stationarity_rtol=0.0)
    result, c, outer, inner, theta, _, _ = call(solver)
    expected, _ = ift(c, outer, theta, delta)
    assert torch.allclose(result.hypergrad["phi"], expected, rtol=1e-10, atol=1e-12)
    assert result.diagnostics["damping"] == delta and "lambda_max" not in result.diagnostics


def test_relative_damping_with_cg_uses_the_default_power_iterations():
    """CG has no power_iterations option: λ̂ comes from POWER_ITERATIONS = 20 products, δ = damping·λ̂."""
    solver = Implicit(linsolve=linsolve.CG(rtol=1e-13), warm_start=False, damping=0.1, relative_damping=True,
                      stationarity_rtol=0.0)
    result, c, outer, inner, theta, _, _ = call(solver)
    g = {"theta": theta - c["t"]}
    lam = float(linsolve.power_iteration(lambda v: {"theta": c["A"] @ v["theta"]}, g, POWER_ITERATIONS))
    d = result.diagnostics
    assert POWER_ITERATIONS == 20
    assert d["lambda_max"] == pytest.approx(lam, rel=1e-12) and d["damping"] == pytest.approx(0.1 * lam, rel=1e-12)
    expected, _ = ift(c, outer, theta, 0.1 * lam)
    assert torch.allclose(result.hypergrad["phi"], expected, rtol=1e-10, atol=1e-12)
    assert d["hvp_count"] == d["iterations"] + 1 + 20


def test_relative_damping_with_auto_alpha_sets_alpha_to_one_over_lambda_plus_delta():
    solver = Implicit(linsolve=linsolve.Neumann(terms=7, power_iterations=11), warm_start=False, damping=0.3,
                      relative_damping=True, stationarity_rtol=0.0)
    result, c, outer, inner, theta, _, _ = call(solver)
    g = {"theta": theta - c["t"]}
    lam = float(linsolve.power_iteration(lambda v: {"theta": c["A"] @ v["theta"]}, g, 11))
    d = result.diagnostics
    delta = 0.3 * lam
    assert d["lambda_max"] == pytest.approx(lam, rel=1e-12) and d["damping"] == pytest.approx(delta, rel=1e-12)
    assert d["alpha"] == pytest.approx(1.0 / (lam + delta), rel=1e-12)
    assert d["hvp_count"] == 11 + 7  # the power iteration once, then terms − 1 products + the residual
    # the 7-term series on A + δI with that alpha, in closed form
    Ad = c["A"] + delta * torch.eye(6, dtype=F64)
    step = torch.eye(6, dtype=F64) - d["alpha"] * Ad
    x = d["alpha"] * sum(torch.linalg.matrix_power(step, j) for j in range(7)) @ (theta - c["t"])
    assert torch.allclose(result.hypergrad["phi"], c["C"] @ outer["phi"] - c["B"].T @ x, rtol=1e-10, atol=1e-12)


def test_relative_damping_keeps_a_fixed_alpha():
    solver = Implicit(linsolve=linsolve.Neumann(alpha=0.1, terms=7), warm_start=False, damping=0.3,
                      relative_damping=True, stationarity_rtol=0.0)
    result, *_ = call(solver)
    assert result.diagnostics["alpha"] == 0.1


def test_relative_damping_without_damping_does_nothing():
    solver = Implicit(linsolve=linsolve.CG(rtol=1e-13), warm_start=False, relative_damping=True,
                      stationarity_rtol=0.0)
    result, c, outer, inner, theta, _, _ = call(solver)
    assert "lambda_max" not in result.diagnostics and "damping" not in result.diagnostics
    assert result.diagnostics["hvp_count"] == result.diagnostics["iterations"] + 1


def test_auto_alpha_reports_the_linear_solver_s_lambda_max():
    solver = Implicit(linsolve=linsolve.Neumann(terms=5, power_iterations=9), warm_start=False, stationarity_rtol=0.0)
    result, c, outer, inner, theta, _, _ = call(solver)
    lam = float(linsolve.power_iteration(lambda v: {"theta": c["A"] @ v["theta"]}, {"theta": theta - c["t"]}, 9))
    assert result.diagnostics["lambda_max"] == pytest.approx(lam, rel=1e-12)
    assert result.diagnostics["alpha"] == pytest.approx(1 / lam, rel=1e-12)


def test_fwdrev_spends_one_more_gradient_and_gives_the_same_numbers():
    auto = Implicit(linsolve=linsolve.CG(rtol=1e-13), warm_start=False, stationarity_rtol=0.0)
    fwd = Implicit(linsolve=linsolve.CG(rtol=1e-13), hvp="fwdrev", warm_start=False, stationarity_rtol=0.0)
    a, c, outer, inner, theta, _, _ = call(auto)
    f, *_ = call(fwd)
    assert f.diagnostics["evaluations"] == a.diagnostics["evaluations"] + 1 == 62
    assert f.diagnostics["inner_grad_norm"] == pytest.approx(grad_norm(c, outer, theta), rel=1e-10)
    assert torch.allclose(f.hypergrad["phi"], a.hypergrad["phi"], rtol=1e-12, atol=1e-14)


def test_stationarity_warning_names_the_numbers_and_respects_its_bound():
    """After 5 steps ‖∇θG‖ is far above 1e-3 of its start: a StationarityWarning with the measured ratio."""
    result, c, outer, inner, theta, _, caught = call(Implicit(linsolve=linsolve.Exact(), warm_start=False), steps=5)
    rel = grad_norm(c, outer, theta) / grad_norm(c, outer, inner["theta"])
    stationarity = [w for w in caught if issubclass(w.category, StationarityWarning)]
    assert len(stationarity) == 1
    message = str(stationarity[0].message)
    assert f"after 5 inner steps ‖∇θG(θ_K)‖ = {grad_norm(c, outer, theta):.3g}, {rel:.3g} of its start" in message
    assert "stationarity_rtol=0.001" in message
    # a bound just above the measured ratio is met: no warning; just below: a warning
    _, *_, caught = call(Implicit(linsolve=linsolve.Exact(), warm_start=False, stationarity_rtol=rel * 1.001),
                         steps=5)
    assert not [w for w in caught if issubclass(w.category, StationarityWarning)]
    _, *_, caught = call(Implicit(linsolve=linsolve.Exact(), warm_start=False, stationarity_rtol=rel * 0.999),
                         steps=5)
    assert len([w for w in caught if issubclass(w.category, StationarityWarning)]) == 1
    # 0 switches it off; so does K = 0 (the ratio is 1 by construction)
    _, *_, caught = call(Implicit(linsolve=linsolve.Exact(), warm_start=False, stationarity_rtol=0.0), steps=5)
    assert not [w for w in caught if issubclass(w.category, StationarityWarning)]
    zero, *_, caught = call(Implicit(linsolve=linsolve.Exact(), warm_start=False), steps=0)
    assert not [w for w in caught if issubclass(w.category, StationarityWarning)]
    assert zero.diagnostics["inner_grad_norm_rel"] == 1.0 and math.isnan(zero.diagnostics["inner_loss"])


def test_weight_decay_is_refused_with_the_fix():
    problem, inner, outer, c = quadratic()
    with pytest.raises(ValueError, match=r"InnerLoop.weight_decay=0.01 moves the loop's fixed point.*put the L2 "
                                         r"term in inner_loss"):
        Implicit()(problem, inner, outer, None, None, bilevel.InnerLoop(steps=3, weight_decay=0.01), None)


def test_options_are_validated():
    with pytest.raises(ValueError, match=r"hvp must be one of \('auto', 'fwdrev', 'revrev'\), got 'rev'"):
        Implicit(hvp="rev")
    with pytest.raises(TypeError, match="Implicit.linsolve must be a linear solver from bilevel.linsolve, got 3"):
        Implicit(linsolve=3)
    with pytest.raises(ValueError, match="warm_start=True, but Exact takes no starting point; use warm_start=false"):
        Implicit(linsolve=linsolve.Exact())
    Implicit(linsolve=linsolve.Exact(), warm_start=False)
    Implicit(linsolve=lambda matvec, b, x0: (b, None))  # a plain callable may take a start
    with pytest.raises(ValueError, match="damping must be >= 0, got -0.1"):
        Implicit(damping=-0.1)
    with pytest.raises(ValueError, match=r"stationarity_rtol must be >= 0 \(0 switches the stationarity warning "
                                         r"off\), got -1"):
        Implicit(stationarity_rtol=-1.0)
    Implicit(damping=0.0, stationarity_rtol=0.0)  # the bounds are valid
    assert Implicit().init(None, None, None) is None
    assert Implicit() == Implicit(linsolve=linsolve.CG(), hvp="auto", warm_start=True, damping=0.0,
                                  relative_damping=False, stationarity_rtol=1e-3)
