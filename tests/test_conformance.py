"""Invariants every registered solver must satisfy. Adding a solver without an entry here fails."""
import copy
import pickle

import pytest
import torch

import bilevel
from oracles import ridge

# One entry per registered solver: its spec and inner loop for the ridge problem.
CONFIGS = {
    "cg": ("cg:maxiter=50", bilevel.InnerLoop(steps=30, lr=0.5)),
    "neumann": ("neumann:alpha=0.3,terms=20", bilevel.InnerLoop(steps=30, lr=0.5)),
    "fixedpoint": ("fixedpoint:alpha=0.3,maxiter=100,rtol=1e-5", bilevel.InnerLoop(steps=30, lr=0.5)),
    "exact": ("exact", bilevel.InnerLoop(steps=30, lr=0.5)),
    "forward": ("forward:chunk_size=2", bilevel.InnerLoop(steps=10, lr=0.3, optimizer="momentum")),
    "unroll": ("unroll:truncate=5", bilevel.InnerLoop(steps=10, lr=0.05, optimizer="adam")),
    "onestep": ("onestep", bilevel.InnerLoop(steps=1, lr=0.1)),
    "cmaes": ("cmaes:popsize=4,sigma=0.2,seed=5", bilevel.InnerLoop(steps=5, lr=0.3)),
}


def test_every_registered_solver_has_a_conformance_config():
    assert set(CONFIGS) == set(bilevel.SOLVERS), f"missing configs for {set(bilevel.SOLVERS) - set(CONFIGS)}"


def _run(name, dtype):
    problem, inner, outer, ib, ob = ridge(dtype=dtype)
    spec, loop = CONFIGS[name]
    return problem, inner, outer, ib, ob, bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob,
                                                            solver=spec, loop=loop)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_solver_invariants(name, dtype):
    problem, inner, outer, ib, ob = ridge(dtype=dtype)
    spec, loop = CONFIGS[name]
    before = copy.deepcopy((inner, outer, ib, ob))
    result = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver=spec, loop=loop)
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
    assert float(torch.linalg.norm(result.hypergrad["log_lambda"])) > 0
    for key in ("inner_loss", "outer_loss", "inner_steps", "hvp_count", "evaluations"):
        assert isinstance(result.diagnostics[key], float), key
    # deterministic: a second call gives bitwise the same answer
    again = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver=spec, loop=loop)
    assert all(torch.equal(result.hypergrad[k], again.hypergrad[k]) for k in outer)
    # the state round-trips through pickle (checkpointing)
    pickle.loads(pickle.dumps(result.state))


def test_float32_agrees_with_float64():
    for name in CONFIGS:
        r32 = _run(name, torch.float32)[-1].hypergrad["log_lambda"].double()
        r64 = _run(name, torch.float64)[-1].hypergrad["log_lambda"]
        assert float((r32 - r64).norm() / r64.norm()) < 1e-3, name


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
