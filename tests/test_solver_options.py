"""Every option of the implicit solvers does what it says, held to exact values on the quadratic oracle.

G(θ, φ) = ½θᵀAθ + θᵀBφ − bᵀθ, F = ½‖θ − t‖² + ½φᵀCφ, so H = A, ∂²G/∂φ∂θ = Bᵀ and the damped IFT
hypergradient has the closed form  −Bᵀ(A + δI)⁻¹(θ* − t) + Cφ.
"""
import pytest
import torch

import bilevel
from oracles import quadratic, rel_error

CONVERGED = bilevel.InnerLoop(steps=400, lr=0.3)


def damped_closed_form(outer, c, delta):
    p = c["A"].shape[0]
    theta = torch.linalg.solve(c["A"], c["b"] - c["B"] @ outer["phi"])
    x = torch.linalg.solve(c["A"] + delta * torch.eye(p, dtype=c["A"].dtype), theta - c["t"])
    return {"phi": -c["B"].T @ x + c["C"] @ outer["phi"]}


def run(spec, loop=CONVERGED, state=None):
    problem, inner, outer, c = quadratic()
    result = bilevel.hypergrad(problem, inner, outer, inner_batch=None, outer_batch=None, solver=spec, loop=loop,
                               state=state)
    return result, outer, c


@pytest.mark.parametrize("name", ["cg:rtol=1e-12", "neumann:terms=300", "fixedpoint:rtol=1e-12,maxiter=2000", "exact"])
def test_damping_solves_the_damped_system(name):
    result, outer, c = run(name + ("," if ":" in name else ":") + "damping=0.5")
    assert rel_error(result.hypergrad, damped_closed_form(outer, c, 0.5)) < 1e-9
    assert result.diagnostics["damping"] == 0.5


def test_relative_damping_is_a_multiple_of_the_largest_eigenvalue():
    result, outer, c = run("cg:rtol=1e-12,damping=0.1,relative_damping=true")
    lam = float(torch.linalg.eigvalsh(c["A"]).max())
    # 20 power iterations: the Rayleigh quotient's error shrinks like (λ₂/λ₁)^(2k) = 0.78^40 ≈ 5e-5 here
    assert 0 <= (lam - result.diagnostics["lambda_max"]) / lam < 1e-4
    assert result.diagnostics["damping"] == pytest.approx(0.1 * result.diagnostics["lambda_max"], rel=1e-12)
    exact = damped_closed_form(outer, c, result.diagnostics["damping"])
    assert rel_error(result.hypergrad, exact) < 1e-9
    assert result.diagnostics["hvp_count"] >= 20  # the power iteration is counted


@pytest.mark.parametrize("name", ["neumann:terms=300", "fixedpoint:rtol=1e-12,maxiter=2000"])
def test_alpha_auto_is_one_over_the_estimated_largest_eigenvalue(name):
    result, outer, c = run(name)  # alpha defaults to auto
    lam = float(torch.linalg.eigvalsh(c["A"]).max())
    assert result.diagnostics["alpha"] == pytest.approx(1.0 / result.diagnostics["lambda_max"], rel=1e-12)
    assert 0 <= (lam - result.diagnostics["lambda_max"]) / lam < 1e-4  # a lower bound, as documented
    assert rel_error(result.hypergrad, damped_closed_form(outer, c, 0.0)) < 1e-9


def test_alpha_auto_reuses_the_relative_damping_estimate():
    """With both, λ̂_max(H) is estimated once and α = 1/(λ̂ + δ): λ_max(H + δI) = λ_max(H) + δ exactly."""
    result, outer, c = run("neumann:terms=300,damping=0.2,relative_damping=true")
    lam, delta = result.diagnostics["lambda_max"], result.diagnostics["damping"]
    assert result.diagnostics["alpha"] == pytest.approx(1.0 / (lam + delta), rel=1e-12)
    assert result.diagnostics["hvp_count"] == 20 + 300  # one power iteration, 299 series matvecs + 1 residual
    assert rel_error(result.hypergrad, damped_closed_form(outer, c, delta)) < 1e-9


def test_a_fixed_alpha_is_used_as_given():
    result, _, _ = run("neumann:alpha=0.05,terms=10")
    assert result.diagnostics["alpha"] == 0.05 and "lambda_max" not in result.diagnostics


def test_neumann_warm_start_solves_for_the_correction():
    """From the exact solution the correction series adds nothing; from a cold start's x, five more terms
    shrink the error by max|1 − αλ|⁵ = 0.8⁵ ≈ 0.33 again."""
    matrix = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64))
    b = {"x": torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)}
    exact = {"x": torch.linalg.solve(matrix, b["x"])}
    matvec = lambda v: {"x": matrix @ v["x"]}  # noqa: E731
    solver = bilevel.Neumann(alpha=0.2, terms=5)
    x, info = solver(matvec, b, exact)
    assert torch.allclose(x["x"], exact["x"], rtol=0, atol=1e-15) and info.matvecs == 5 + 1
    cold, cold_info = solver(matvec, b)
    warm, warm_info = solver(matvec, b, cold)
    assert float(warm_info.residual) < 0.4 * float(cold_info.residual)


def test_neumann_warm_start_through_the_solver_state():
    first, _, _ = run("neumann:terms=5,warm_start=true", loop=bilevel.InnerLoop(steps=200, lr=0.3))
    second, outer, c = run("neumann:terms=5,warm_start=true", loop=bilevel.InnerLoop(steps=200, lr=0.3),
                           state=first.state)
    exact = damped_closed_form(outer, c, 0.0)
    assert first.state is not None
    assert rel_error(second.hypergrad, exact) < 0.5 * rel_error(first.hypergrad, exact)
    cold, _, _ = run("neumann:terms=5", loop=bilevel.InnerLoop(steps=200, lr=0.3))
    assert cold.state is None  # warm_start=false (the default) keeps nothing


def test_cg_warm_start_through_the_solver_state_saves_iterations():
    first, _, _ = run("cg:rtol=1e-10")
    again, _, _ = run("cg:rtol=1e-10", state=first.state)
    cold, _, _ = run("cg:rtol=1e-10,warm_start=false", state=first.state)
    assert again.diagnostics["iterations"] == 0 < cold.diagnostics["iterations"]


def test_fwdrev_hvp_gives_the_same_hypergradient():
    auto, _, _ = run("cg:rtol=1e-12")
    fwdrev, _, _ = run("cg:rtol=1e-12,hvp=fwdrev")
    assert rel_error(fwdrev.hypergrad, auto.hypergrad) < 1e-12


def test_iteration_caps_and_tolerances_bind():
    capped, _, _ = run("cg:maxiter=2,rtol=1e-12")
    assert capped.diagnostics["iterations"] == 2 and capped.diagnostics["converged"] == 0.0
    loose, _, _ = run("fixedpoint:rtol=1e-2,maxiter=2000")
    tight, _, _ = run("fixedpoint:rtol=1e-10,maxiter=2000")
    assert loose.diagnostics["iterations"] < tight.diagnostics["iterations"]
    few, _, _ = run("neumann:power_iterations=1,terms=3")
    many, _, _ = run("neumann:power_iterations=30,terms=3")
    assert few.diagnostics["lambda_max"] < many.diagnostics["lambda_max"]  # the power method climbs to λ_max


def test_growth_limit_and_max_size_refuse():
    with pytest.raises(bilevel.NeumannDivergenceError):
        run("neumann:alpha=0.05,growth_limit=0.5")  # the first term has norm ‖b‖ > 0.5 ‖b‖
    with pytest.raises(ValueError, match="Exact solve refused: 6 inner scalars > max_size=2; use CG"):
        run("exact:max_size=2")


def test_exact_takes_no_warm_start_option():
    with pytest.raises(bilevel.SpecError, match="unknown option 'warm_start' for solver 'exact'"):
        bilevel.make_solver("exact:warm_start=true")


def test_an_implicit_solver_is_one_class_with_a_pluggable_linear_solver():
    solver = bilevel.make_solver("neumann:alpha=0.05,terms=20,damping=0.1")
    assert solver == bilevel.Implicit(linsolve=bilevel.Neumann(alpha=0.05, terms=20), warm_start=False, damping=0.1)
    problem, inner, outer, c = quadratic()
    custom = bilevel.Implicit(linsolve=bilevel.CG(rtol=1e-12), damping=0.5)
    result = bilevel.hypergrad(problem, inner, outer, inner_batch=None, outer_batch=None, solver=custom, loop=CONVERGED)
    assert rel_error(result.hypergrad, damped_closed_form(outer, c, 0.5)) < 1e-9
