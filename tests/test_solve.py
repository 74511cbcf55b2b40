"""bilevel.solve: θ*(φ) as a differentiable value, checked against closed forms and finite differences.

Ridge oracle (tests/oracles.py): w*(λ) = (A + D)⁻¹ Xᵀy/n with A = XᵀX/n, D = diag(e^λ). Differentiating
(A + D) w* = Xᵀy/n in λ gives the Jacobian

    dw*/dλ = −(A + D)⁻¹ diag(e^λ ⊙ w*),      and with damping δ:  −(A + D + δI)⁻¹ diag(e^λ ⊙ w*),

and in the targets y: dw*/dy = (A + D)⁻¹ Xᵀ/n. Every check is float64 with a stated bound.
"""
import warnings

import pytest
import torch
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import bilevel
from bilevel.errors import SpecError, StationarityWarning, StructureError
from bilevel.solve import solve
from oracles import fd_gradient, quadratic, rel_error, ridge, ridge_hypergrad, ridge_solution

CONVERGED = bilevel.InnerLoop(steps=40, lr=0.7)  # ridge: max|1 − 0.7λ(H)| = 0.18 per step, θ_K exact to ~1e-16
CG = "cg:maxiter=50,rtol=1e-13"
IMPLICIT_SPECS = [CG, "exact", "fixedpoint:rtol=1e-13,maxiter=2000", "neumann:terms=400,rtol=1e-11"]


def closed_form_jacobian(outer, inner_batch, damping=0.0):
    """dw*/dλ = −(A + D + δI)⁻¹ diag(e^λ ⊙ w*) (module docstring)."""
    w, H = ridge_solution(outer, inner_batch)
    H = H + damping * torch.eye(H.shape[0], dtype=H.dtype)
    return -torch.linalg.solve(H, torch.diag(torch.exp(outer["log_lambda"]) * w["w"]))


def rel(a, b):
    return float((a - b).norm() / b.norm())


def objective_of(c):
    """An outer objective of w only, unrelated to the problem's F: ‖w‖⁴ + Σ w ⊙ c."""
    return lambda w: (w @ w) ** 2 + (w * c).sum()


@pytest.fixture
def setup():
    problem, inner, outer, ib, ob = ridge()
    gen = torch.Generator().manual_seed(3)
    c = torch.randn(5, generator=gen, dtype=torch.float64)
    v = torch.randn(5, generator=gen, dtype=torch.float64)
    return problem, inner, outer, ib, ob, c, v


@pytest.mark.parametrize("spec", IMPLICIT_SPECS)
def test_backward_applies_the_closed_form_jacobian_to_a_cotangent(setup, spec):
    """Plain autograd: outer leaves with requires_grad, ⟨w*, v⟩.backward() fills λ.grad = (dw*/dλ)ᵀ v."""
    problem, inner, outer, ib, _, _, v = setup
    phi = {"log_lambda": outer["log_lambda"].clone().requires_grad_(True)}
    w = solve(problem, inner, phi, inner_batch=ib, solver=spec, loop=CONVERGED)
    assert rel(w["w"].detach(), ridge_solution(outer, ib)[0]["w"]) < 1e-12
    (w["w"] @ v).backward()
    assert rel(phi["log_lambda"].grad, closed_form_jacobian(outer, ib).T @ v) < 1e-8


def test_vjp_and_grad_of_an_outer_objective_match_closed_form_and_finite_differences(setup):
    problem, inner, outer, ib, _, c, v = setup
    objective = objective_of(c)

    def solution(p):
        return solve(problem, inner, p, inner_batch=ib, solver=CG, loop=CONVERGED)

    w, pullback = vjp(solution, outer)
    assert rel(pullback({"w": v})[0]["log_lambda"], closed_form_jacobian(outer, ib).T @ v) < 1e-8

    def value(p):
        return objective(solution(p)["w"])

    with torch.no_grad():  # each finite difference is a fresh, converged solve at the shifted λ
        fd = fd_gradient(lambda p: float(value(p)), outer, eps=1e-5)
    assert rel_error(grad(value)(outer), fd) < 1e-6
    out, pullback = vjp(value, outer)
    assert rel_error(pullback(torch.ones_like(out))[0], fd) < 1e-6


def test_jvp_applies_the_closed_form_jacobian_to_a_tangent(setup):
    problem, inner, outer, ib, _, _, _ = setup
    u = torch.linspace(-1.0, 2.0, 5, dtype=torch.float64)
    exact = closed_form_jacobian(outer, ib) @ u
    for spec in (CG, "cg:maxiter=50,rtol=1e-13,hvp=revrev"):  # forward-over-reverse and reverse-over-reverse
        w, tangent = jvp(lambda p: solve(problem, inner, p, inner_batch=ib, solver=spec, loop=CONVERGED),
                         (outer,), ({"log_lambda": u},))
        assert rel(tangent["w"], exact) < 1e-8
    with torch.autograd.forward_ad.dual_level():  # the same rule through torch.autograd.forward_ad
        dual = {"log_lambda": torch.autograd.forward_ad.make_dual(outer["log_lambda"], u)}
        w = solve(problem, inner, dual, inner_batch=ib, solver=CG, loop=CONVERGED)
        assert rel(torch.autograd.forward_ad.unpack_dual(w["w"]).tangent, exact) < 1e-8


def test_vmap_over_four_outer_params_matches_each_closed_form(setup):
    problem, inner, outer, ib, _, c, _ = setup
    objective = objective_of(c)
    batch = {"log_lambda": outer["log_lambda"] + torch.linspace(-1, 1, 4, dtype=torch.float64)[:, None]}
    loop = bilevel.InnerLoop(steps=80, lr=0.5)  # max|1 − 0.5λ(H)| ≤ 0.52 over the four λ

    def solution(p):
        return solve(problem, inner, p, inner_batch=ib, solver=CG, loop=loop)["w"]

    values = vmap(solution)(batch)
    jacobians = vmap(jacrev(solution))(batch)
    grads = vmap(grad(lambda p: objective(solution(p))))(batch)
    for i in range(4):
        phi = {"log_lambda": batch["log_lambda"][i]}
        w_exact = ridge_solution(phi, ib)[0]["w"]
        assert rel(values[i], w_exact) < 1e-12
        assert rel(jacobians["log_lambda"][i], closed_form_jacobian(phi, ib)) < 1e-8
        # chain rule with the closed-form Jacobian: (dw*/dλ)ᵀ ∇_w objective(w*)
        exact = closed_form_jacobian(phi, ib).T @ grad(objective)(w_exact)
        assert rel(grads["log_lambda"][i], exact) < 1e-8


def test_autograd_and_torch_func_routes_agree(setup):
    problem, inner, outer, ib, _, c, _ = setup
    objective = objective_of(c)
    phi = {"log_lambda": outer["log_lambda"].clone().requires_grad_(True)}
    objective(solve(problem, inner, phi, inner_batch=ib, solver=CG, loop=CONVERGED)["w"]).backward()
    functional = grad(lambda p: objective(solve(problem, inner, p, inner_batch=ib, solver=CG, loop=CONVERGED)["w"]))
    assert rel(phi["log_lambda"].grad, functional(outer)["log_lambda"]) < 1e-12


@pytest.mark.parametrize("spec", IMPLICIT_SPECS)
def test_hypergradient_through_solve_equals_bilevel_hypergrad(setup, spec):
    """d/dφ F(θ*(φ), φ) through solve is the IFT hypergradient bilevel.hypergrad computes with the same solver."""
    problem, inner, outer, ib, ob, _, _ = setup
    through_solve = grad(lambda p: problem.outer(solve(problem, inner, p, inner_batch=ib, solver=spec,
                                                       loop=CONVERGED), p, ob))(outer)
    reference = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver=spec,
                                  loop=CONVERGED).hypergrad
    assert rel_error(through_solve, reference) < 1e-10


def test_damping_gives_the_damped_formula(setup):
    problem, inner, outer, ib, ob, _, v = setup
    delta = 0.3
    spec = f"cg:maxiter=50,rtol=1e-13,damping={delta}"

    def solution(p):
        return solve(problem, inner, p, inner_batch=ib, solver=spec, loop=CONVERGED)

    damped = closed_form_jacobian(outer, ib, damping=delta)
    assert rel(jacrev(lambda p: solution(p)["w"])(outer)["log_lambda"], damped) < 1e-8
    assert rel(damped, closed_form_jacobian(outer, ib)) > 1e-2  # the damping is visible at this bound
    through_solve = grad(lambda p: problem.outer(solution(p), p, ob))(outer)
    reference = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver=spec,
                                  loop=CONVERGED).hypergrad
    assert rel_error(through_solve, reference) < 1e-10
    relative = "cg:maxiter=50,rtol=1e-13,damping=0.1,relative_damping=true"  # δ = 0.1·λ̂_max, same power iteration
    through_solve = grad(lambda p: problem.outer(solve(problem, inner, p, inner_batch=ib, solver=relative,
                                                       loop=CONVERGED), p, ob))(outer)
    reference = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver=relative,
                                  loop=CONVERGED).hypergrad
    assert rel_error(through_solve, reference) < 1e-10


def test_derivative_in_the_batch_targets_matches_closed_form(setup):
    """The inner batch is an input too: dw*/dy = (A + D)⁻¹ Xᵀ/n, in reverse and forward mode."""
    problem, inner, outer, (X, y), _, _, _ = setup
    _, H = ridge_solution(outer, (X, y))
    exact = torch.linalg.solve(H, X.T / X.shape[0])

    def solution(targets):
        return solve(problem, inner, outer, inner_batch=(X, targets), solver=CG, loop=CONVERGED)["w"]

    assert rel(jacrev(solution)(y), exact) < 1e-8
    assert rel(jacfwd(solution)(y), exact) < 1e-8


def test_vmap_over_training_sets_matches_each_closed_form(setup):
    """One solve per training set (e.g. one per domain) in one vmapped call, values and dw*/dλ."""
    problem, inner, outer, _, _, _, _ = setup
    sets = [ridge(seed=s)[3] for s in range(3)]
    X, y = torch.stack([s[0] for s in sets]), torch.stack([s[1] for s in sets])

    def solution(p, Xi, yi):
        return solve(problem, inner, p, inner_batch=(Xi, yi), solver=CG, loop=CONVERGED)["w"]

    values = vmap(solution, in_dims=(None, 0, 0))(outer, X, y)
    jacobians = vmap(jacrev(solution), in_dims=(None, 0, 0))(outer, X, y)
    for i in range(3):
        assert rel(values[i], ridge_solution(outer, (X[i], y[i]))[0]["w"]) < 1e-12
        assert rel(jacobians["log_lambda"][i], closed_form_jacobian(outer, (X[i], y[i]))) < 1e-8


def test_second_derivative_of_an_outer_objective_matches_closed_form(setup):
    """torch.func.hessian through solve (the rules are differentiated again, through θ* and the CG solve)."""
    problem, inner, outer, ib, _, c, _ = setup
    objective = objective_of(c)
    through_solve = hessian(lambda p: objective(solve(problem, inner, p, inner_batch=ib, solver=CG,
                                                      loop=CONVERGED)["w"]))(outer)
    exact = hessian(lambda p: objective(ridge_solution(p, ib)[0]["w"]))(outer)  # autograd through linalg.solve
    assert rel(through_solve["log_lambda"]["log_lambda"], exact["log_lambda"]["log_lambda"]) < 1e-8


@pytest.mark.parametrize("spec", ["unroll", "forward", "unroll:truncate=2"])
def test_unrolled_solvers_give_the_derivative_of_the_k_step_loop(setup, spec):
    """F(θ_K(φ)) differentiated through solve equals bilevel.hypergrad's unrolled hypergradient (K = 4, far
    from converged, so the loop's derivative differs from the IFT one by 6 %)."""
    problem, inner, outer, ib, ob, _, _ = setup
    loop = bilevel.InnerLoop(steps=4, lr=0.5)

    def outer_objective(p):
        return problem.outer(solve(problem, inner, p, inner_batch=ib, solver=spec, loop=loop), p, ob)

    reverse, forward = grad(outer_objective)(outer), jacfwd(outer_objective)(outer)
    reference = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver=spec,
                                  loop=loop).hypergrad
    assert rel_error(reverse, reference) < 1e-10
    assert rel_error(forward, reference) < 1e-10
    assert rel_error(reverse, ridge_hypergrad(outer, ib, ob)) > 1e-2  # not the IFT hypergradient


def test_unrolled_jacobians_match_the_closed_form_of_k_sgd_steps():
    """Quadratic oracle: θ_K = (I − ηA)^K θ₀ + Σ_j (I − ηA)^j η(b − Bφ), so dθ_K/dφ = −η Σ_{j<K} (I − ηA)^j B
    and dθ_K/dθ₀ = (I − ηA)^K; the implicit solution has dθ*/dφ = −A⁻¹B and dθ*/dθ₀ = 0."""
    problem, inner, outer, c = quadratic()
    steps, lr = 12, 0.2
    loop = bilevel.InnerLoop(steps=steps, lr=lr)
    step = torch.eye(6, dtype=torch.float64) - lr * c["A"]
    d_phi = -lr * sum(torch.linalg.matrix_power(step, j) for j in range(steps)) @ c["B"]
    d_theta0 = torch.linalg.matrix_power(step, steps)
    for spec, jac in (("unroll", jacrev), ("forward", jacfwd)):
        jac_phi = jac(lambda p: solve(problem, inner, p, inner_batch=None, solver=spec, loop=loop)["theta"])(outer)
        jac_theta0 = jac(lambda t: solve(problem, t, outer, inner_batch=None, solver=spec, loop=loop)["theta"])(inner)
        assert rel(jac_phi["phi"], d_phi) < 1e-12
        assert rel(jac_theta0["theta"], d_theta0) < 1e-12
    long_loop = bilevel.InnerLoop(steps=2000, lr=lr)
    theta0 = {"theta": inner["theta"].clone().requires_grad_(True)}
    phi = {"phi": outer["phi"].clone().requires_grad_(True)}
    theta = solve(problem, theta0, phi, inner_batch=None, solver=CG, loop=long_loop)["theta"]
    theta.sum().backward()
    assert rel(phi["phi"].grad, (-torch.linalg.solve(c["A"], c["B"])).T @ torch.ones(6, dtype=torch.float64)) < 1e-10
    assert theta0["theta"].grad is None  # the solution does not depend on where the loop started


def test_float32_stays_float32():
    """The dtype of the params is kept (the same ridge problem drawn in float64 and cast)."""
    problem, inner, outer, ib, _ = ridge(dtype=torch.float32)
    phi = {"log_lambda": outer["log_lambda"].clone().requires_grad_(True)}
    w = solve(problem, inner, phi, inner_batch=ib, solver="cg:maxiter=50,rtol=1e-5", loop=CONVERGED)
    assert w["w"].dtype == torch.float32
    v = torch.ones(5)
    (w["w"] @ v).backward()
    assert phi["log_lambda"].grad.dtype == torch.float32
    exact = closed_form_jacobian(bilevel.tree.cast(outer, torch.float64), tuple(t.double() for t in ib)).T @ v.double()
    assert rel(phi["log_lambda"].grad.double(), exact) < 1e-4


def test_unconverged_inner_loop_warns_for_implicit_solvers(setup):
    problem, inner, outer, ib, _, _, _ = setup
    with pytest.warns(StationarityWarning, match=r"non-stationary inner point.*run more inner steps"):
        solve(problem, inner, outer, inner_batch=ib, solver=CG, loop=bilevel.InnerLoop(steps=3, lr=0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error", StationarityWarning)
        solve(problem, inner, outer, inner_batch=ib, solver=CG, loop=CONVERGED)


def _untouchable_problem():
    """A problem whose losses fail when evaluated: an error raised before any work never reaches them."""
    def never(*_):
        raise AssertionError("the loss was evaluated although the input was refused")
    return bilevel.BilevelProblem(never, never)


@pytest.mark.parametrize("spec, what", [
    ("onestep", "online solver"),
    ("f2sa", "online solver"),
    ("soba", "online solver"),
    ("cmaes", "zeroth-order search"),
])
def test_solvers_without_a_solution_are_refused_before_any_work(setup, spec, what):
    _, inner, outer, ib, _, _, _ = setup
    with pytest.raises(SpecError, match=rf"no differentiable solution θ\*\(φ\) for solver '{spec}'.*{what}.*"
                                        r"Supported solvers: cg, neumann, fixedpoint, exact, nystrom, "
                                        r"forward, unroll.*"
                                        rf"bilevel.hypergrad\(\.\.\., solver='{spec}'\)"):
        solve(_untouchable_problem(), inner, outer, inner_batch=ib, solver=spec)


def test_checkpointed_unroll_and_weight_decay_are_refused_before_any_work(setup):
    _, inner, outer, ib, _, _, _ = setup
    with pytest.raises(SpecError, match=r"checkpoint=true is not supported.*Use 'unroll'.*or an implicit solver"):
        solve(_untouchable_problem(), inner, outer, inner_batch=ib, solver="unroll:checkpoint=true")
    with pytest.raises(ValueError, match=r"weight_decay=0.1 moves the loop's fixed point.*put the L2 term in "
                                         r"inner_loss"):
        solve(_untouchable_problem(), inner, outer, inner_batch=ib, solver="cg",
              loop=bilevel.InnerLoop(steps=5, weight_decay=0.1))


def test_mixed_dtypes_are_refused_before_any_work(setup):
    _, inner, outer, (X, y), _, _, _ = setup
    with pytest.raises(StructureError, match=r"inner_batch\[0\] has dtype torch.float32.*cast that batch tensor"):
        solve(_untouchable_problem(), inner, outer, inner_batch=(X.float(), y), solver="cg")
