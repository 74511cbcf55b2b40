"""Our hypergradients against the installed peer libraries on tiny float64 problems: values only, never timings.

The peers are driven by the same adapters that benchmarks/peers.py times (so the benchmark's tables compare
equal quantities): torchopt's ``custom_root`` (CG, Neumann), ``MetaSGD`` and functional optimisers differentiated
by autograd, higher's ``innerloop_ctx``, and betty's hypergradient functions. Every method gets the same data,
initial inner params and inner loop (K steps of SGD or heavy-ball SGD, same lr), in float64, so methods that
compute the same quantity must agree to rounding; each is also held to an exact value (the ridge closed form,
or torch.func through the hand-written loop, ``benchmarks/common.py: hw_unroll``). A peer that cannot be
imported is skipped with its name; torchopt is one of our dependencies, higher is in the ``dev`` extra.
"""
import dataclasses
import os
import sys
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import common  # noqa: E402  (benchmarks/common.py: problems, closed forms, hand-written loops)
import peers  # noqa: E402  (benchmarks/peers.py: the peer adapters)
from common import flat, rel_error  # noqa: E402

torch.set_num_threads(1)

AGREE = 1e-12
"""Same quantity, same float64 arithmetic up to operation order: measured 0 … 4e-17 relative."""


def _require(module: str) -> None:
    pytest.importorskip(module, reason=f"peer library '{module}' is not installed: cannot compare against it")


def _quiet(fn):
    with warnings.catch_warnings():  # torchopt's functorch deprecation warnings
        warnings.simplefilter("ignore")
        out = fn()
    return {k: v.detach() for k, v in peers.as_dict(out).items()}


@pytest.fixture(scope="module")
def ridge():
    """d = 8 per-feature log-penalties, n = 50, SGD at lr 2/(λ_min + λ_max): error × 0.34 per step, so 300 steps
    reach the inner solution to rounding and the closed form is the exact implicit hypergradient."""
    return common.ridge(d=8, steps=300, dtype=torch.float64)


def test_cg_agrees_with_torchopt_custom_root_and_the_closed_form(ridge):
    _require("torchopt")
    exact = common.ridge_exact(ridge)
    ours = _quiet(peers.ours(ridge, "cg:maxiter=100,rtol=1e-12"))
    theirs = _quiet(peers.torchopt_implicit(ridge, "cg", maxiter=100, rtol=1e-12))
    assert rel_error(ours, exact) < 1e-10 and rel_error(theirs, exact) < 1e-10  # measured 1.7e-16 each
    assert rel_error(ours, theirs) < AGREE


def test_neumann_agrees_with_torchopt_for_the_same_alpha_and_terms(ridge):
    """A 10-term series α Σ_{j<10} (I − αH)^j b is 4e-5 short of H⁻¹b here, so agreeing to 1e-12 means the
    two compute the same truncated series (same α, same term count), not merely that both converged."""
    _require("torchopt")
    alpha, terms = 1.0 / ridge.extra["lambda_max"], 10
    ours = _quiet(peers.ours(ridge, f"neumann:alpha={alpha},terms={terms}"))
    theirs = _quiet(peers.torchopt_implicit(ridge, "ns", maxiter=terms - 1, alpha=alpha))
    assert rel_error(ours, theirs) < AGREE
    assert rel_error(ours, common.ridge_exact(ridge)) > 1e-6  # measured 3.7e-5: the series is truncated


def _neumann_betty(problem, alpha, terms):
    return peers.betty_hypergrad(problem, "neumann", iterations=terms - 1, alpha=alpha)


def test_neumann_agrees_with_betty(ridge):
    _require("betty")
    alpha, terms = 1.0 / ridge.extra["lambda_max"], 10
    ours = _quiet(peers.ours(ridge, f"neumann:alpha={alpha},terms={terms}"))
    theirs = _quiet(_neumann_betty(ridge, alpha, terms))
    assert rel_error(ours, theirs) < AGREE


UNROLL_PEERS = {  # label: (module to import, adapter)
    "higher innerloop_ctx": ("higher", peers.higher_unroll),
    "torchopt MetaSGD": ("torchopt", peers.torchopt_metasgd),
    "torchopt functional + autograd": ("torchopt", peers.torchopt_functional),
}


def _unroll_problems():
    """20 SGD / heavy-ball steps on the ridge problem; 10 heavy-ball steps of a 64-8-10 tanh MLP on digits."""
    ridge20 = common.ridge(d=8, steps=20, dtype=torch.float64)
    return {"ridge sgd": ridge20, "ridge heavy-ball": dataclasses.replace(ridge20, momentum=0.9),
            "digits mlp heavy-ball": common.digits_mlp(steps=10, hidden=8, dtype=torch.float64)}


@pytest.fixture(scope="module")
def unroll_cases():
    """Each problem with our ``unroll`` and the torch.func derivative of the hand-written loop."""
    cases = {}
    for name, problem in _unroll_problems().items():
        cases[name] = (problem, _quiet(peers.ours(problem, "unroll")), common.hw_unroll(problem))
    return cases


@pytest.mark.parametrize("problem_name", list(_unroll_problems()))
@pytest.mark.parametrize("peer", list(UNROLL_PEERS))
def test_unroll_agrees_with_the_peers(unroll_cases, problem_name, peer):
    module, adapter = UNROLL_PEERS[peer]
    _require(module)
    problem, ours, exact = unroll_cases[problem_name]
    assert rel_error(ours, exact) < AGREE  # ours is the exact derivative of the K-step loop
    theirs = _quiet(adapter(problem))
    assert rel_error(theirs, exact) < AGREE and rel_error(ours, theirs) < AGREE


def test_heavy_ball_reaches_every_method(unroll_cases):
    """The momentum setting changes the hypergradient by far more than the agreement bound, so the heavy-ball
    cases above would fail if any method ignored it."""
    _, sgd, _ = unroll_cases["ridge sgd"]
    _, heavy, _ = unroll_cases["ridge heavy-ball"]
    assert rel_error(heavy, sgd) > 1e-2


def test_onestep_agrees_with_one_higher_step(ridge):
    """``onestep`` = d/dφ F(θ − η∇G(θ, φ), φ) at a warm start θ: one differentiated SGD step of higher from θ."""
    _require("higher")
    problem = dataclasses.replace(ridge, steps=20)
    warm, _ = common.hw_run(problem, problem.inner, problem.outer, problem.steps)
    ours = _quiet(peers.ours(problem, "onestep", warm=warm))
    theirs = _quiet(peers.higher_unroll(dataclasses.replace(problem, inner=warm), steps=1))
    assert float(flat(ours).norm()) > 1e-3
    assert rel_error(ours, theirs) < AGREE
