"""Invariants and exactness that every registered solver must satisfy (configs in solver_configs.py).

Adding a solver without a line in ``solver_configs.SOLVER_CONFIGS`` fails here.
"""
import copy
import pickle

import pytest
import torch

import bilevel
from oracles import cosine, rel_error, ridge, ridge_hypergrad, ridge_solution
from solver_configs import SOLVER_CONFIGS, VARIANTS


def test_every_registered_solver_has_a_conformance_config():
    missing = set(bilevel.SOLVERS) - set(SOLVER_CONFIGS)
    assert not missing, f"registered solvers without a line in tests/solver_configs.py: {sorted(missing)}"
    assert set(SOLVER_CONFIGS) == set(bilevel.SOLVERS)


def _inputs(config, dtype=torch.float64):
    problem, inner, outer, ib, ob = ridge(dtype=dtype)
    if config.start_at_solution:
        inner = ridge_solution(outer, ib)[0]
    return problem, inner, outer, ib, ob


@pytest.mark.parametrize("name", sorted({**SOLVER_CONFIGS, **VARIANTS}))
def test_solver_meets_its_exactness_criterion(name):
    config = {**SOLVER_CONFIGS, **VARIANTS}[name]
    problem, inner, outer, ib, ob = _inputs(config)
    exact = ridge_hypergrad(outer, ib, ob)
    kind, bound = config.criterion
    if kind == "cmaes":
        cosines = []
        for seed in range(1, 9):
            result = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob,
                                       solver=f"{config.spec},seed={seed}", loop=config.loop)
            cosines.append(cosine(result.hypergrad, exact))
        assert sum(cosines) / len(cosines) >= bound, cosines
        return
    result = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver=config.spec,
                               loop=config.loop)
    if kind == "rel":
        assert rel_error(result.hypergrad, exact) <= bound
    elif kind == "rel_unroll":
        reference = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver="unroll",
                                      loop=config.loop)
        assert rel_error(result.hypergrad, reference.hypergrad) <= bound
    elif kind == "cos":
        assert cosine(result.hypergrad, exact) >= bound
    elif kind == "rel_ridged":
        solver = bilevel.make_solver(config.spec)
        ridged = ridge_hypergrad(outer, ib, ob, ridge=solver.damping + solver.linsolve.rho)
        assert rel_error(result.hypergrad, ridged) <= bound
    elif kind == "bome_outer":
        assert _bome_gap_closed(config, problem, inner, outer, ib, ob) >= bound
    elif kind == "neumann1":
        one_term = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob,
                                     solver=f"neumann:alpha={config.loop.lr},terms=1",
                                     loop=bilevel.InnerLoop(steps=0))
        assert rel_error(result.hypergrad, one_term.hypergrad) <= bound
    else:
        raise AssertionError(f"unknown criterion {kind!r}")


def _bome_gap_closed(config, problem, inner, outer, ib, ob, steps=300):
    """The fraction of warm-started cg's decrease of F(w*(φ)) that ``config``'s outer run achieves (same SGD steps)."""
    from bome_runs import gap_closed, outer_loss_at_solution, sgd_outer_run
    lr = bilevel.make_solver(config.spec).lr
    f = lambda phi: outer_loss_at_solution(lambda p: ridge_solution(p, ib)[0], problem, phi, ob)  # noqa: E731
    bome = sgd_outer_run(problem, inner, outer, ib, ob, config.spec, config.loop, steps, lr)[0]
    cg = sgd_outer_run(problem, inner, outer, ib, ob, "cg:maxiter=50,rtol=1e-10", bilevel.InnerLoop(steps=20, lr=0.5),
                       steps, lr)[0]
    return gap_closed(f(outer), f(bome), f(cg))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(SOLVER_CONFIGS))
def test_solver_invariants(name, dtype):
    config = SOLVER_CONFIGS[name]
    problem, inner, outer, ib, ob = _inputs(config, dtype)
    before = copy.deepcopy((inner, outer, ib, ob))
    result = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver=config.spec,
                               loop=config.quick_loop)
    # inputs not mutated
    for a, b in zip(before, (inner, outer, ib, ob)):
        flat_a = a.values() if isinstance(a, dict) else a
        flat_b = b.values() if isinstance(b, dict) else b
        assert all(torch.equal(x, y) for x, y in zip(flat_a, flat_b))
    # output detached, shaped and typed like the outer params, finite
    assert set(result.hypergrad) == set(outer)
    for k, v in result.hypergrad.items():
        assert v.shape == outer[k].shape and v.dtype == outer[k].dtype
        assert not v.requires_grad and v.grad_fn is None
        assert torch.isfinite(v).all()
    assert set(result.inner) == set(inner)
    assert all(not v.requires_grad and v.dtype == dtype for v in result.inner.values())
    for key in ("inner_loss", "outer_loss", "inner_steps", "hvp_count", "evaluations"):
        assert isinstance(result.diagnostics[key], float), key
    # deterministic: a second call gives bitwise the same answer
    again = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver=config.spec,
                              loop=config.quick_loop)
    assert all(torch.equal(result.hypergrad[k], again.hypergrad[k]) for k in outer)
    # the state round-trips through pickle (in-memory transfer between processes)
    pickle.loads(pickle.dumps(result.state))


def test_float32_agrees_with_float64():
    for name, config in SOLVER_CONFIGS.items():
        results = []
        for dtype in (torch.float32, torch.float64):
            problem, inner, outer, ib, ob = _inputs(config, dtype)
            results.append(bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver=config.spec,
                                             loop=config.quick_loop).hypergrad)
        assert rel_error({k: v.double() for k, v in results[0].items()}, results[1]) < 1e-3, name


def test_solvers_do_not_keep_state_between_calls():
    """Calling with the previous state twice gives the same answer: the state object is not mutated."""
    problem, inner, outer, ib, ob = ridge()
    loop = bilevel.InnerLoop(steps=5, lr=0.3)
    first = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver="cmaes:popsize=4",
                              loop=loop)
    a = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver="cmaes:popsize=4", loop=loop,
                          state=first.state)
    b = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver="cmaes:popsize=4", loop=loop,
                          state=first.state)
    assert torch.equal(a.hypergrad["log_lambda"], b.hypergrad["log_lambda"])
