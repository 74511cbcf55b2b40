"""Diagnostics that can't lie, each held to an exact value.

- Every linear solve reports the TRUE relative residual ‖b − Hx‖/‖b‖ of the x it returns (checked against
  the dense product), and ``converged`` means exactly "that residual ≤ rtol"; a miss warns once.
- Every nested solve reports ‖∇θG(θ_K, φ)‖ and its ratio to ‖∇θG(θ_0, φ)‖ (checked against the ridge
  gradient in closed form, ∇_w G = Xᵀ(Xw − y)/n + exp(λ) ⊙ w); implicit solvers warn when it is large.
- An exactly-zero hypergradient warns with its likely reason.
"""
import math
import warnings

import pytest
import torch
from torch.func import vmap

import bilevel
from bilevel.errors import StationarityWarning, ZeroHypergradientWarning
from oracles import quadratic, ridge


def _spd(n, cond, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = torch.logspace(0, math.log10(cond), n, dtype=torch.float64)
    return Q @ torch.diag(eig) @ Q.T


def _rhs(n, seed=1):
    return {"x": torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)}


def _matvec(A):
    return lambda v: {"x": A @ v["x"]}


def _dense_residual(A, x, b):
    return float(torch.linalg.norm(A @ x["x"] - b["x"]) / torch.linalg.norm(b["x"]))


def _solve(solver, A, b, x0=None):
    """Run ``solver`` and return (x, info, the ConvergenceWarnings it raised)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x, info = solver(_matvec(A), b, x0)
    return x, info, [w for w in caught if issubclass(w.category, bilevel.ConvergenceWarning)]


# ---- linear solves: the true residual, and converged == (residual <= rtol) ----------------------------------

def test_neumann_with_too_few_terms_reports_not_converged_with_the_true_residual():
    A, b = _spd(12, cond=10.0), _rhs(12)  # λ ∈ [1, 10]; alpha = 0.09 contracts by max|1 − αλ| = 0.91 per term
    x, info, caught = _solve(bilevel.Neumann(alpha=0.09, terms=5), A, b)
    dense = _dense_residual(A, x, b)
    assert dense > 0.1  # 0.91⁵ ≈ 0.62 along λ_min: far from 1e-6
    assert info.converged is False and info.residual == pytest.approx(dense, rel=1e-12)
    assert info.matvecs == 5  # 4 series products + the one that measured the residual
    assert len(caught) == 1
    message = str(caught[0].message)
    for part in ("Neumann did not converge", f"{info.residual:.3g}", "rtol=1e-06", "raise terms (now 5",
                 "alpha=auto sets it; now alpha=0.09", "damping"):
        assert part in message, part


def test_neumann_with_enough_terms_reports_converged():
    A, b = _spd(12, cond=10.0), _rhs(12)
    x, info, caught = _solve(bilevel.Neumann(alpha=0.09, terms=400), A, b)  # 0.91⁴⁰⁰ ≈ 4e-17
    dense = _dense_residual(A, x, b)
    assert dense <= 1e-6 and info.converged is True and not caught
    assert abs(info.residual - dense) <= 1e-15  # both are rounding-level here: compare absolutely
    assert info.matvecs == 400


def test_the_issue_case_a_tiny_alpha_no_longer_reports_converged():
    """The issue: Neumann said converged = 1 at relative residual ≈ 0.95. Rebuilt through ``hypergrad`` on the
    quadratic oracle (H = A): alpha = 1e-3, 5 terms barely move x off α·b, so the residual stays near 1."""
    problem, inner, outer, c = quadratic()
    loop = bilevel.InnerLoop(steps=400, lr=0.3)
    with pytest.warns(bilevel.ConvergenceWarning, match=r"Neumann did not converge.*rtol=1e-06.*raise terms"):
        result = bilevel.hypergrad(problem, inner, outer, inner_batch=None, outer_batch=None, loop=loop,
                                   solver="neumann:alpha=0.001,terms=5,warm_start=true")
    x = result.state  # the solve's x (kept for the warm start); b = ∇θF(θ_K) = θ_K − t
    b = result.inner["theta"] - c["t"]
    dense = float(torch.linalg.norm(c["A"] @ x["theta"] - b) / torch.linalg.norm(b))
    assert 0.9 < dense < 1.0
    assert result.diagnostics["converged"] == 0.0
    assert result.diagnostics["residual"] == pytest.approx(dense, rel=1e-12)


def test_the_default_itl_solver_reports_honestly_when_15_terms_are_not_enough():
    """ITL's default ``neumann:terms=15,alpha=auto,damping=0.1,relative_damping=true`` solves (H + δI)x = b
    with 15 terms: on the quadratic oracle that leaves a residual far above rtol = 1e-6, and it says so."""
    problem, inner, outer, c = quadratic()
    loop = bilevel.InnerLoop(steps=400, lr=0.3)
    with pytest.warns(bilevel.ConvergenceWarning, match="Neumann did not converge"):
        result = bilevel.hypergrad(problem, inner, outer, inner_batch=None, outer_batch=None, loop=loop,
                                   solver="neumann:terms=15,alpha=auto,damping=0.1,relative_damping=true,"
                                          "warm_start=true")
    delta, x = result.diagnostics["damping"], result.state["theta"]
    b = result.inner["theta"] - c["t"]
    damped = c["A"] + delta * torch.eye(len(b), dtype=b.dtype)
    dense = float(torch.linalg.norm(damped @ x - b) / torch.linalg.norm(b))
    assert dense > 1e-6 and result.diagnostics["converged"] == 0.0
    assert result.diagnostics["residual"] == pytest.approx(dense, rel=1e-10)


def test_cg_reports_the_true_residual_not_the_recursive_one():
    """On cond(H) = 1e6 the recursively updated CG residual drifts below 1e-12 while the true one stays near
    1e-11 (the old code reported 3.9e-13 and converged = True). The reported residual is the true one."""
    A, b = _spd(40, cond=1e6), _rhs(40)
    x, info, caught = _solve(bilevel.CG(maxiter=500, rtol=1e-12), A, b)
    dense = _dense_residual(A, x, b)
    assert info.residual == pytest.approx(dense, rel=1e-12)
    assert dense > 1e-12 and info.converged is False and len(caught) == 1
    assert "stalled" in str(caught[0].message) and "loosen rtol" in str(caught[0].message)


@pytest.mark.parametrize("maxiter, converged", [(5, False), (100, True)])
def test_cg_residual_and_matvec_count(maxiter, converged):
    A, b = _spd(30, cond=100.0), _rhs(30)
    x, info, caught = _solve(bilevel.CG(maxiter=maxiter, rtol=1e-8), A, b)
    dense = _dense_residual(A, x, b)
    assert info.residual == pytest.approx(dense, rel=1e-12)
    assert info.converged is converged and (dense <= 1e-8) is converged and len(caught) == (not converged)
    assert info.matvecs == info.iterations + 1  # one product per iteration + the true residual's
    if not converged:
        assert "CG stopped at maxiter=5" in str(caught[0].message)


def test_cg_warm_started_at_the_solution_spends_one_matvec_and_no_iteration():
    A, b = _spd(8, cond=10.0), _rhs(8)
    x, _, _ = _solve(bilevel.CG(rtol=1e-12), A, b)
    x2, info, caught = _solve(bilevel.CG(rtol=1e-10), A, b, x0=x)
    assert info.iterations == 0 and info.matvecs == 1 and info.converged and not caught  # r = b − Hx0 is true
    assert info.residual == pytest.approx(_dense_residual(A, x, b), rel=1e-12)


@pytest.mark.parametrize("maxiter, converged", [(10, False), (2000, True)])
def test_fixedpoint_residual_is_the_true_one(maxiter, converged):
    A, b = _spd(12, cond=10.0), _rhs(12)
    x, info, caught = _solve(bilevel.FixedPoint(alpha=0.09, maxiter=maxiter, rtol=1e-10), A, b)
    dense = _dense_residual(A, x, b)
    assert info.residual == pytest.approx(dense, rel=1e-9, abs=1e-16)
    assert info.converged is converged and (dense <= 1e-10) is converged and len(caught) == (not converged)
    assert info.matvecs == info.iterations  # each iteration's product is b − Hx afresh: no extra one


def test_exact_reports_a_nearly_singular_solve():
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    singular = Q @ torch.diag(torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1e-18], dtype=torch.float64)) @ Q.T
    b = _rhs(6)
    x, info, caught = _solve(bilevel.Exact(), singular, b)
    dense = _dense_residual(singular, x, b)
    assert info.residual == pytest.approx(dense, rel=1e-12) and dense > 1e-6
    assert info.converged is False and len(caught) == 1 and "nearly) singular" in str(caught[0].message)
    A = _spd(6, cond=10.0)
    x, info, caught = _solve(bilevel.Exact(), A, b)
    assert info.converged is True and not caught and info.matvecs == 7  # 6 columns + the residual
    assert abs(info.residual - _dense_residual(A, x, b)) <= 1e-15


def test_under_vmap_the_residual_is_batched_and_converged_is_not_known():
    """Inside vmap no host check is possible: the full budget runs, the residual comes back as a tensor
    (equal to the unbatched call's) and converged is NaN, never a claimed 1."""
    problem, inner, outer, ib, ob = ridge()
    loop = bilevel.InnerLoop(steps=200, lr=0.5)
    spec = "cg:maxiter=2,rtol=1e-12"
    phis = outer["log_lambda"] + torch.linspace(-1, 1, 3, dtype=torch.float64)[:, None]
    seen = []

    def one(phi):
        result = bilevel.hypergrad(problem, inner, {"log_lambda": phi}, inner_batch=ib, outer_batch=ob,
                                   solver=spec, loop=loop)
        seen.append(result.diagnostics["converged"])
        return result.diagnostics["residual"]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        residuals = vmap(one)(phis)
    assert not [w for w in caught if issubclass(w.category, bilevel.ConvergenceWarning)]
    assert len(seen) == 1 and math.isnan(seen[0])
    for i in range(3):
        with pytest.warns(bilevel.ConvergenceWarning):
            single = bilevel.hypergrad(problem, inner, {"log_lambda": phis[i]}, inner_batch=ib, outer_batch=ob,
                                       solver=spec, loop=loop)
        assert single.diagnostics["converged"] == 0.0
        assert float(residuals[i]) == pytest.approx(single.diagnostics["residual"], rel=1e-9)


def test_neumann_rtol_is_a_spec_option_and_is_checked():
    assert ("rtol", float, 1e-6) in bilevel.solver_options("neumann")
    with pytest.raises(bilevel.SpecError, match="Neumann.rtol must be >= 0, got -1"):
        bilevel.make_solver("neumann:rtol=-1")
    with pytest.raises(bilevel.SpecError, match="Exact.rtol must be >= 0, got -1"):
        bilevel.make_solver("exact:rtol=-1")
    with pytest.raises(bilevel.SpecError, match="stationarity_rtol must be >= 0 .*0 switches the stationarity"):
        bilevel.make_solver("cg:stationarity_rtol=-1")


# ---- inner stationarity: ‖∇θG(θ_K, φ)‖ and its ratio to the start -------------------------------------------

def _ridge_grad_norm(w, outer, batch):
    """‖∇_w G‖ in closed form for the ridge oracle: Xᵀ(Xw − y)/n + exp(λ) ⊙ w."""
    X, y = batch
    return float(torch.linalg.norm(X.T @ (X @ w - y) / X.shape[0] + torch.exp(outer["log_lambda"]) * w))


NESTED = ["cg:maxiter=50,rtol=1e-10", "neumann:terms=200", "fixedpoint:rtol=1e-10,maxiter=500", "exact",
          "cg:hvp=fwdrev,rtol=1e-10", "unroll", "unroll:checkpoint=true", "unroll:truncate=3", "forward:chunk_size=2",
          "onestep", "onestep:mode=first_order", "onestep:mode=finite_difference"]


@pytest.mark.parametrize("spec", NESTED)
def test_inner_grad_norm_is_the_gradient_norm_at_the_returned_inner_params(spec):
    """With minibatches, implicit solvers measure on the Hessian batch inner_batch(K) and the unrolled and
    online ones on the last step's batch inner_batch(K − 1); both norms (θ_K and θ_0) on that one batch."""
    problem, inner, outer, (X, y), ob = ridge(n=200)
    name = spec.split(":")[0]
    steps = 1 if name == "onestep" else 8  # few steps: far from stationary, so the norms are not rounding noise
    loop = bilevel.InnerLoop(steps=steps, lr=0.3)
    def batches(k):  # a different batch of 100 rows per step
        rows = (torch.arange(100) + 20 * k) % len(y)
        return X[rows], y[rows]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the implicit solvers rightly warn about this unconverged loop
        result = bilevel.hypergrad(problem, inner, outer, inner_batch=batches, outer_batch=ob, solver=spec, loop=loop)
    batch = batches(steps if name in ("cg", "neumann", "fixedpoint", "exact") else steps - 1)
    at_k = _ridge_grad_norm(result.inner["w"], outer, batch)
    at_0 = _ridge_grad_norm(inner["w"], outer, batch)
    assert result.diagnostics["inner_grad_norm"] == pytest.approx(at_k, rel=1e-12)
    assert result.diagnostics["inner_grad_norm_rel"] == pytest.approx(at_k / at_0, rel=1e-12)
    assert 1e-3 < result.diagnostics["inner_grad_norm_rel"] < 1  # the loop moved, and not to a stationary point


def test_implicit_warns_at_an_unconverged_inner_loop_and_not_at_a_converged_one():
    problem, inner, outer, ib, ob = ridge()
    run = lambda steps, spec="cg:rtol=1e-10": bilevel.hypergrad(  # noqa: E731
        problem, inner, outer, inner_batch=ib, outer_batch=ob, solver=spec,
        loop=bilevel.InnerLoop(steps=steps, lr=0.5))
    with pytest.warns(StationarityWarning) as caught:
        short = run(5)
    message = str([w for w in caught if w.category is StationarityWarning][0].message)
    rel = short.diagnostics["inner_grad_norm_rel"]
    assert rel == pytest.approx(_ridge_grad_norm(short.inner["w"], outer, ib) / _ridge_grad_norm(inner["w"], outer, ib),
                                rel=1e-12)
    for part in ("after 5 inner steps", f"{rel:.3g} of its start value", "stationarity_rtol=0.001",
                 "run more inner steps", "unroll", "stationarity_rtol=0 switches"):
        assert part in message, part
    assert issubclass(StationarityWarning, bilevel.ConvergenceWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning of any kind
        converged = run(300)
        silenced = run(5, "cg:rtol=1e-10,stationarity_rtol=0")
    assert converged.diagnostics["inner_grad_norm_rel"] < 1e-10
    assert silenced.diagnostics["inner_grad_norm_rel"] == rel  # reported all the same


# ---- exactly-zero hypergradients --------------------------------------------------------------------------

def _quickstart(dtype=torch.float64):
    """The README quickstart's problem: ridge with per-feature penalties exp(φ)·w², from w = 0, φ = 0."""
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(100, 5, generator=gen, dtype=dtype), torch.randn(100, generator=gen, dtype=dtype)
    Xv, yv = torch.randn(50, 5, generator=gen, dtype=dtype), torch.randn(50, generator=gen, dtype=dtype)

    def inner_loss(inner, outer, batch):
        x, t = batch
        return ((x @ inner["w"] - t) ** 2).mean() + (outer["log_l2"].exp() * inner["w"] ** 2).sum()

    def outer_loss(inner, outer, batch):
        x, t = batch
        return ((x @ inner["w"] - t) ** 2).mean()

    problem = bilevel.BilevelProblem(inner_loss, outer_loss)
    return problem, {"w": torch.zeros(5, dtype=dtype)}, {"log_l2": torch.zeros(5, dtype=dtype)}, (X, y), (Xv, yv)


def _onestep_closed_form(w, phi, batch, outer_batch, lr):
    """d/dφ F(w − η∇G(w, φ)) = −η · 2exp(φ) ⊙ w ⊙ ∇_w F(w'): zero wherever w is."""
    X, t = batch
    Xv, tv = outer_batch
    w_new = w - lr * (2 * X.T @ (X @ w - t) / len(t) + 2 * torch.exp(phi) * w)
    return -lr * 2 * torch.exp(phi) * w * (2 * Xv.T @ (Xv @ w_new - tv) / len(tv))


def test_onestep_from_zero_inner_params_warns_with_the_reason():
    problem, inner, outer, ib, ob = _quickstart()
    loop = bilevel.InnerLoop(steps=1, lr=0.1)
    with pytest.warns(ZeroHypergradientWarning, match=r"OneStep\(mode='exact'\).*exactly zero.*dθ'/dφ .*vanishes "
                                                      r"at these inner params.*start from a warm, trained θ"):
        result = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver="onestep", loop=loop)
    assert torch.equal(result.hypergrad["log_l2"], torch.zeros(5, dtype=torch.float64))  # the closed form is 0 here


def test_onestep_from_trained_inner_params_does_not_warn():
    problem, inner, outer, ib, ob = _quickstart()
    trained, _, _ = bilevel.InnerLoop(steps=200, lr=0.1).run(problem, inner, outer, ib)
    loop = bilevel.InnerLoop(steps=1, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = bilevel.hypergrad(problem, trained, outer, inner_batch=ib, outer_batch=ob, solver="onestep",
                                   loop=loop)
    expected = _onestep_closed_form(trained["w"], outer["log_l2"], ib, ob, 0.1)
    torch.testing.assert_close(result.hypergrad["log_l2"], expected, rtol=1e-10, atol=0)


def test_first_order_onestep_names_its_own_reason():
    problem, inner, outer, ib, ob = _quickstart()
    trained, _, _ = bilevel.InnerLoop(steps=200, lr=0.1).run(problem, inner, outer, ib)
    with pytest.warns(ZeroHypergradientWarning, match="mode=first_order drops dθ'/dφ.*use mode=exact"):
        bilevel.hypergrad(problem, trained, outer, inner_batch=ib, outer_batch=ob, solver="onestep:mode=first_order",
                          loop=bilevel.InnerLoop(steps=1, lr=0.1))


def test_a_zero_hypergradient_from_another_solver_gets_the_generic_reason():
    """φ enters G only as a constant offset, so θ*(φ) does not depend on it: dF/dφ is exactly 0."""
    def inner_loss(inner, outer, batch):
        return ((inner["w"] - 1.0) ** 2).sum() + outer["c"].sum() ** 2

    def outer_loss(inner, outer, batch):
        return (inner["w"] ** 2).sum()

    problem = bilevel.BilevelProblem(inner_loss, outer_loss)
    for spec in ("cg", "unroll", "forward"):
        with pytest.warns(ZeroHypergradientWarning, match="do not influence the outer loss through the inner problem"):
            result = bilevel.hypergrad(problem, {"w": torch.zeros(3, dtype=torch.float64)},
                                       {"c": torch.ones(2, dtype=torch.float64)}, inner_batch=None, outer_batch=None,
                                       solver=spec, loop=bilevel.InnerLoop(steps=100, lr=0.3), validate=False)
        assert torch.equal(result.hypergrad["c"], torch.zeros(2, dtype=torch.float64)), spec
