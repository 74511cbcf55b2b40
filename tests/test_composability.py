"""Implicit and unrolled hypergradients inside torch.func.vmap over a batch of independent problems."""
import pytest
import torch
from torch.func import vmap

import bilevel
from oracles import rel_error, ridge, ridge_hypergrad


@pytest.mark.parametrize("spec", ["cg:maxiter=30,rtol=1e-13", "neumann:alpha=0.3,terms=60", "exact", "unroll",
                                  "unroll:checkpoint=true", "forward", "onestep"])
def test_vmap_over_outer_params_matches_a_python_loop(spec):
    problem, inner, outer, ib, ob = ridge()
    loop = bilevel.InnerLoop(steps=200 if spec.split(":")[0] in ("cg", "neumann", "exact") else 15, lr=0.5)
    batch_outer = {"log_lambda": outer["log_lambda"] + torch.linspace(-1, 1, 4, dtype=torch.float64)[:, None]}

    def one(phi):
        return bilevel.hypergrad(problem, inner, phi, inner_batch=ib, outer_batch=ob, solver=spec, loop=loop).hypergrad

    batched = vmap(one)(batch_outer)
    for i in range(4):
        single = one({"log_lambda": batch_outer["log_lambda"][i]})
        assert rel_error({"log_lambda": batched["log_lambda"][i]}, single) < 1e-9


def test_vmap_over_datasets_matches_closed_form():
    """Different training sets per vmapped problem (e.g. one per domain)."""
    problems = [ridge(seed=s) for s in range(3)]
    problem, inner, outer, _, ob = problems[0]
    X = torch.stack([p[3][0] for p in problems])
    y = torch.stack([p[3][1] for p in problems])
    loop = bilevel.InnerLoop(steps=1500, lr=0.5)

    def one(Xi, yi):
        return bilevel.hypergrad(problem, inner, outer, inner_batch=(Xi, yi), outer_batch=ob,
                                 solver="cg:maxiter=40", loop=loop).hypergrad

    out = vmap(one)(X, y)
    for i in range(3):
        exact = ridge_hypergrad(outer, (X[i], y[i]), ob)
        assert rel_error({"log_lambda": out["log_lambda"][i]}, exact) < 1e-6
