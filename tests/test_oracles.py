"""The oracles' closed forms are themselves checked against float64 finite differences."""
import torch

from oracles import (fd_gradient, quadratic, quadratic_hypergrad, quadratic_unrolled_hypergrad, rel_error, ridge,
                     ridge_hypergrad, ridge_solution)


def test_ridge_closed_form_matches_finite_differences():
    problem, inner, outer, ib, ob = ridge()

    def value(phi):
        w, _ = ridge_solution(phi, ib)
        return float(problem.outer(w, phi, ob))

    fd = fd_gradient(value, outer)
    assert rel_error(ridge_hypergrad(outer, ib, ob), fd) < 1e-8


def test_ridge_solution_is_stationary():
    problem, inner, outer, ib, ob = ridge()
    w, _ = ridge_solution(outer, ib)
    g = torch.func.grad(problem.inner)(w, outer, ib)
    assert float(g["w"].norm()) < 1e-12


def test_quadratic_closed_form_matches_finite_differences():
    problem, inner, outer, c = quadratic()

    def value(phi):
        th = torch.linalg.solve(c["A"], c["b"] - c["B"] @ phi["phi"])
        return float(problem.outer({"theta": th}, phi, None))

    assert rel_error(quadratic_hypergrad(outer, c), fd_gradient(value, outer)) < 1e-8


def test_quadratic_unrolled_closed_form_matches_finite_differences():
    problem, inner, outer, c = quadratic()
    steps, lr = 7, 0.1

    def value(phi):
        th = inner["theta"].clone()
        for _ in range(steps):
            th = th - lr * (c["A"] @ th + c["B"] @ phi["phi"] - c["b"])
        return float(problem.outer({"theta": th}, phi, None))

    exact = quadratic_unrolled_hypergrad(outer, inner, c, steps, lr)
    assert rel_error(exact, fd_gradient(value, outer)) < 1e-8
