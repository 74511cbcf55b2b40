"""Every solver against an exact hypergradient (closed form, or the exact derivative of the K-step loop)."""
import pytest
import torch

import bilevel
from oracles import (cosine, fd_gradient, quadratic, quadratic_hypergrad, quadratic_unrolled_hypergrad, rel_error,
                     ridge, ridge_hypergrad, ridge_solution)

IMPLICIT = ["cg:rtol=1e-12,maxiter=200", "neumann:alpha=0.5,terms=400", "fixedpoint:alpha=0.5,maxiter=2000,rtol=1e-12",
            "exact"]


@pytest.mark.parametrize("spec", IMPLICIT)
def test_implicit_matches_ridge_closed_form_from_converged_inner(spec):
    problem, inner, outer, ib, ob = ridge()
    loop = bilevel.InnerLoop(steps=3000, lr=0.5)
    result = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver=spec, loop=loop)
    assert rel_error(result.hypergrad, ridge_hypergrad(outer, ib, ob)) < 1e-6
    assert rel_error(result.inner, ridge_solution(outer, ib)[0]) < 1e-9


@pytest.mark.parametrize("spec", IMPLICIT)
def test_implicit_matches_quadratic_closed_form(spec):
    problem, inner, outer, c = quadratic()
    lam_max = float(torch.linalg.eigvalsh(c["A"]).max())
    spec = spec.replace("alpha=0.5", f"alpha={1.0 / lam_max}")
    loop = bilevel.InnerLoop(steps=2000, lr=1.0 / lam_max, optimizer="momentum", momentum=0.5)
    result = bilevel.hypergrad(problem, inner, outer, inner_batch=None, outer_batch=None, solver=spec, loop=loop)
    assert rel_error(result.hypergrad, quadratic_hypergrad(outer, c)) < 1e-6


@pytest.mark.parametrize("spec", ["unroll", "unroll:checkpoint=true", "unroll:checkpoint=true,segment=3", "forward",
                                  "forward:chunk_size=2"])
def test_unrolled_matches_closed_form_of_k_step_loop(spec):
    problem, inner, outer, c = quadratic()
    steps, lr = 25, 0.1
    loop = bilevel.InnerLoop(steps=steps, lr=lr)
    result = bilevel.hypergrad(problem, inner, outer, inner_batch=None, outer_batch=None, solver=spec, loop=loop)
    assert rel_error(result.hypergrad, quadratic_unrolled_hypergrad(outer, inner, c, steps, lr)) < 1e-10


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("spec", ["unroll", "unroll:checkpoint=true", "forward"])
def test_unrolled_matches_finite_differences_of_loop_on_ridge(spec, optimizer):
    problem, inner, outer, ib, ob = ridge()
    loop = bilevel.InnerLoop(steps=20, lr=0.05 if optimizer == "adam" else 0.3, optimizer=optimizer)

    def value(phi):
        theta, _, _ = loop.run(problem, inner, phi, ib)
        return float(problem.outer(theta, phi, ob))

    result = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver=spec, loop=loop)
    assert rel_error(result.hypergrad, fd_gradient(value, outer)) < 1e-6


def test_truncated_unroll_is_exact_derivative_of_truncated_loop():
    """truncate=T: the first K−T steps see φ as a constant; compare with that function's FD derivative."""
    problem, inner, outer, ib, ob = ridge()
    loop = bilevel.InnerLoop(steps=20, lr=0.3, optimizer="momentum")
    fixed = {k: v.clone() for k, v in outer.items()}

    def value(phi):
        theta, state, _ = loop.run(problem, inner, fixed, ib, steps=12)
        theta, _, _ = loop.run(problem, theta, phi, ib, steps=8, opt_state=state, start=12)
        return float(problem.outer(theta, phi, ob))

    for spec in ("unroll:truncate=8", "unroll:truncate=8,checkpoint=true,segment=3"):
        result = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver=spec, loop=loop)
        assert rel_error(result.hypergrad, fd_gradient(value, outer)) < 1e-6
    full = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver="unroll", loop=loop)
    assert rel_error(result.hypergrad, full.hypergrad) > 1e-3  # truncation really changes the answer


def test_minibatch_callable_batches_are_used_per_step():
    problem, inner, outer, (X, y), ob = ridge(n=200)
    batches = lambda k: (X[(k % 4) * 50:(k % 4 + 1) * 50], y[(k % 4) * 50:(k % 4 + 1) * 50])
    loop = bilevel.InnerLoop(steps=12, lr=0.3)

    def value(phi):
        theta, _, _ = loop.run(problem, inner, phi, batches)
        return float(problem.outer(theta, phi, ob))

    for spec in ("unroll", "forward", "unroll:checkpoint=true"):
        result = bilevel.hypergrad(problem, inner, outer, inner_batch=batches, outer_batch=ob, solver=spec, loop=loop)
        assert rel_error(result.hypergrad, fd_gradient(value, outer)) < 1e-6


def test_onestep_aligns_with_true_hypergradient_at_the_optimum():
    problem, inner, outer, ib, ob = ridge(n=2000)
    w_star, _ = ridge_solution(outer, ib)
    exact = ridge_hypergrad(outer, ib, ob)
    loop = bilevel.InnerLoop(steps=1, lr=0.1)
    for mode in ("exact", "finite_difference"):
        result = bilevel.hypergrad(problem, w_star, outer, inner_batch=ib, outer_batch=ob,
                                   solver=f"onestep:mode={mode}", loop=loop)
        assert cosine(result.hypergrad, exact) > 0.95, mode


def test_onestep_exact_is_the_derivative_of_one_step():
    """From a warm optimiser state (Adam's first step is sign-like, its derivative ~0), one step vs FD."""
    problem, inner, outer, ib, ob = ridge()
    theta0 = {"w": torch.randn(5, dtype=torch.float64)}
    for optimizer in ("sgd", "momentum", "adam"):
        loop = bilevel.InnerLoop(steps=1, lr=0.1, optimizer=optimizer)
        theta1, state1, _ = loop.run(problem, theta0, outer, ib, steps=3)

        def value(phi):
            theta, _, _ = loop.run(problem, theta1, phi, ib, steps=1, opt_state=state1)
            return float(problem.outer(theta, phi, ob))

        result = bilevel.hypergrad(problem, theta1, outer, inner_batch=ib, outer_batch=ob, solver="onestep",
                                   loop=loop, state=state1)
        fd = fd_gradient(value, outer)
        assert float(torch.linalg.norm(fd["log_lambda"])) > 1e-3
        assert rel_error(result.hypergrad, fd) < 1e-6, optimizer


def test_onestep_finite_difference_matches_exact_for_sgd():
    problem, inner, outer, ib, ob = ridge()
    theta0 = {"w": torch.randn(5, dtype=torch.float64)}
    loop = bilevel.InnerLoop(steps=1, lr=0.1)
    exact = bilevel.hypergrad(problem, theta0, outer, inner_batch=ib, outer_batch=ob, solver="onestep", loop=loop)
    fd = bilevel.hypergrad(problem, theta0, outer, inner_batch=ib, outer_batch=ob,
                           solver="onestep:mode=finite_difference,fd_epsilon=1e-4", loop=loop)
    assert rel_error(fd.hypergrad, exact.hypergrad) < 1e-6


def test_onestep_online_state_carries_the_optimizer():
    """Two onestep calls with the returned state equal two optimiser steps of the inner loop."""
    problem, inner, outer, ib, ob = ridge()
    loop = bilevel.InnerLoop(steps=2, lr=0.1, optimizer="adam")
    r1 = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver="onestep", loop=loop)
    r2 = bilevel.hypergrad(problem, r1.inner, outer, inner_batch=ib, outer_batch=ob, solver="onestep", loop=loop,
                           state=r1.state)
    expected, _, _ = loop.run(problem, inner, outer, ib)
    assert torch.allclose(r2.inner["w"], expected["w"], atol=1e-12)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_cmaes_pseudo_gradient_points_downhill(seed):
    problem, inner, outer, ib, ob = ridge()
    loop = bilevel.InnerLoop(steps=200, lr=0.5)
    exact = ridge_hypergrad(outer, ib, ob)
    result = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob,
                               solver=f"cmaes:popsize=16,sigma=0.3,seed={seed}", loop=loop)
    assert float((result.hypergrad["log_lambda"] * exact["log_lambda"]).sum()) > 0


def test_cmaes_outer_loss_falls_over_50_steps():
    problem, inner, outer, ib, ob = ridge()
    loop = bilevel.InnerLoop(steps=100, lr=0.5)
    solver = bilevel.make_solver("cmaes:popsize=8,sigma=0.3,seed=3")
    phi, state, losses = dict(outer), None, []
    for _ in range(50):
        result = bilevel.hypergrad(problem, inner, phi, inner_batch=ib, outer_batch=ob, solver=solver, loop=loop,
                                   state=state)
        state = result.state
        phi = {k: v - result.hypergrad[k] for k, v in phi.items()}  # SGD with lr = 1: onto the new mean
        losses.append(result.diagnostics["outer_loss"])
    start = float(problem.outer(ridge_solution(outer, ib)[0], outer, ob))
    assert losses[-1] < start - 1e-3
    assert min(losses[-10:]) < min(losses[:10])
