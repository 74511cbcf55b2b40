"""HVP, mixed vjp, tree arithmetic and linear solvers against dense exact values."""
import warnings

import pytest
import torch

import bilevel
from bilevel import tree


def _spd(n, cond=10.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    return Q @ torch.diag(eig) @ Q.T


def _matvec(A):
    return lambda v: {"x": A @ v["x"]}


def test_hvp_modes_match_dense_hessian():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    f = lambda p: torch.sum(torch.tanh(W @ p["a"]) ** 2) + (p["b"] ** 3).sum() * p["a"].sum()
    theta = {"a": torch.randn(3, generator=gen, dtype=torch.float64), "b": torch.randn(2, generator=gen,
                                                                                      dtype=torch.float64)}
    v = {"a": torch.randn(3, generator=gen, dtype=torch.float64), "b": torch.randn(2, generator=gen,
                                                                                  dtype=torch.float64)}
    flat = lambda x: tree.unflatten(x, theta)
    H = torch.autograd.functional.hessian(lambda x: f(flat(x)), tree.flatten(theta))
    expected = H @ tree.flatten(v)
    for mode in ("auto", "fwdrev", "revrev"):
        assert torch.allclose(tree.flatten(bilevel.hvp(f, theta, v, mode)), expected, atol=1e-12)
        assert torch.allclose(tree.flatten(bilevel.hvp_operator(f, theta, mode)(v)), expected, atol=1e-12)


def test_mixed_vjp_matches_dense_cross_derivative():
    gen = torch.Generator().manual_seed(1)
    M = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    G = lambda th, ph: torch.sum(torch.sin(th["t"]) * (M @ ph["p"])) + (th["t"] ** 2).sum() * ph["p"].sum()
    th = {"t": torch.randn(3, generator=gen, dtype=torch.float64)}
    ph = {"p": torch.randn(2, generator=gen, dtype=torch.float64)}
    v = {"t": torch.randn(3, generator=gen, dtype=torch.float64)}
    # J[i, j] = ∂/∂φ_j ∂G/∂θ_i
    J = torch.autograd.functional.jacobian(lambda p: torch.func.grad(G)(th, {"p": p})["t"], ph["p"])
    assert torch.allclose(bilevel.mixed_vjp(G, th, ph, v)["p"], J.T @ v["t"], atol=1e-12)


def test_tree_arithmetic():
    a = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor(3.0)}
    b = {"x": torch.tensor([0.5, -1.0]), "y": torch.tensor(2.0)}
    assert float(tree.dot(a, b)) == 1.0 * 0.5 - 2.0 + 6.0
    assert torch.equal(tree.axpy(2.0, a, b)["x"], torch.tensor([2.5, 3.0]))
    assert float(tree.norm(a)) == pytest.approx(14 ** 0.5)
    assert torch.equal(tree.unflatten(tree.flatten(a), a)["y"], a["y"])
    with pytest.raises(bilevel.StructureError, match="missing"):
        tree.assert_same_structure({"x": a["x"]}, a, "grad")
    with pytest.raises(bilevel.StructureError, match="shape"):
        tree.assert_same_structure({"x": a["x"][:1], "y": a["y"]}, a, "grad")


@pytest.mark.parametrize("solver", [bilevel.CG(maxiter=100, rtol=1e-13), bilevel.Neumann(alpha=0.09, terms=800),
                                    bilevel.FixedPoint(alpha=0.09, maxiter=2000, rtol=1e-13), bilevel.Exact()])
def test_linear_solvers_match_dense_solve(solver):
    A = _spd(12, cond=10.0)
    b = {"x": torch.randn(12, dtype=torch.float64)}
    x, info = solver(_matvec(A), b)
    assert torch.allclose(x["x"], torch.linalg.solve(A, b["x"]), rtol=1e-9, atol=1e-10)


def test_neumann_includes_the_leading_alpha():
    """With one term the series is alpha * b (the ITL paper's pseudocode drops alpha)."""
    b = {"x": torch.ones(3, dtype=torch.float64)}
    x, _ = bilevel.Neumann(alpha=0.25, terms=1)(_matvec(torch.eye(3, dtype=torch.float64)), b)
    assert torch.equal(x["x"], 0.25 * b["x"])


def test_cg_warm_start_from_solution_takes_no_iterations():
    A = _spd(8)
    b = {"x": torch.randn(8, dtype=torch.float64)}
    x, _ = bilevel.CG(rtol=1e-12)(_matvec(A), b)
    _, info = bilevel.CG(rtol=1e-10)(_matvec(A), b, x0=x)
    assert info.iterations == 0 and info.converged


def test_cg_not_converged_warns_and_reports():
    A = _spd(30, cond=1e4)
    b = {"x": torch.randn(30, dtype=torch.float64)}
    with pytest.warns(bilevel.ConvergenceWarning, match="maxiter=3"):
        _, info = bilevel.CG(maxiter=3, rtol=1e-10)(_matvec(A), b)
    assert not info.converged and info.residual > 1e-10 and info.iterations == 3


def test_neumann_divergence_raises_with_alpha_hint():
    A = _spd(10, cond=10.0)  # λ_max = 10: alpha must be < 0.2
    b = {"x": torch.randn(10, dtype=torch.float64)}
    with pytest.raises(bilevel.NeumannDivergenceError, match=r"alpha=0.5 is too large.*λ_max is about"):
        bilevel.Neumann(alpha=0.5, terms=50)(_matvec(A), b)
    with pytest.raises(bilevel.NeumannDivergenceError, match="alpha"):
        bilevel.FixedPoint(alpha=0.5, maxiter=50)(_matvec(A), b)


def test_neumann_on_indefinite_hessian_says_so():
    A = torch.diag(torch.tensor([1.0, -2.0], dtype=torch.float64))
    b = {"x": torch.ones(2, dtype=torch.float64)}
    with pytest.raises(bilevel.NeumannDivergenceError, match="not positive definite"):
        bilevel.Neumann(alpha=0.4, terms=60)(_matvec(A), b)
