"""A small nonconvex MLP (no closed form): the solvers agree with each other once the inner loop converges."""
import pytest
import torch
from torch.func import functional_call

import bilevel
from oracles import cosine, rel_error


def mlp_problem(dtype=torch.float64):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(dtype)
    X = torch.randn(64, 3, dtype=dtype)
    y = torch.sin(X.sum(1, keepdim=True))
    Xv = torch.randn(32, 3, dtype=dtype)
    yv = torch.sin(Xv.sum(1, keepdim=True))

    def inner_loss(inner, outer, batch):
        Xb, yb = batch
        fit = ((functional_call(net, inner, (Xb,)) - yb) ** 2).mean()
        penalty = sum(torch.exp(outer[k.replace(".", "_")]) * (v ** 2).sum() for k, v in inner.items())
        return fit + 0.5 * penalty

    def outer_loss(inner, outer, batch):
        Xb, yb = batch
        return ((functional_call(net, inner, (Xb,)) - yb) ** 2).mean()

    inner = {k: v.detach().clone() for k, v in net.named_parameters()}
    outer = {k.replace(".", "_"): torch.tensor(-3.0, dtype=dtype) for k in inner}
    return bilevel.BilevelProblem(inner_loss, outer_loss), inner, outer, (X, y), (Xv, yv)


def test_implicit_solvers_agree_on_converged_mlp():
    problem, inner, outer, ib, ob = mlp_problem()
    loop = bilevel.InnerLoop(steps=3000, lr=0.2, optimizer="momentum", momentum=0.9)
    theta, _, losses = loop.run(problem, inner, outer, ib)
    grad_norm = float(bilevel.tree.norm(torch.func.grad(problem.inner)(theta, outer, ib)))
    assert grad_norm < 1e-8  # the inner loop converged
    short = bilevel.InnerLoop(steps=10, lr=0.2)  # restart from θ*: the solvers see the same point
    reference = bilevel.hypergrad(problem, theta, outer, inner_batch=ib, outer_batch=ob, solver="exact",
                                  loop=short).hypergrad
    for spec in ("cg:rtol=1e-12,maxiter=500", "fixedpoint:alpha=0.5,maxiter=20000,rtol=1e-11"):
        result = bilevel.hypergrad(problem, theta, outer, inner_batch=ib, outer_batch=ob, solver=spec, loop=short)
        assert rel_error(result.hypergrad, reference) < 1e-6, spec


def test_long_unroll_and_forward_approach_the_implicit_hypergradient():
    """From a point near θ*, the K-step loop derivative tends to the IFT value as K grows."""
    problem, inner, outer, ib, ob = mlp_problem()
    loop = bilevel.InnerLoop(steps=3000, lr=0.2, optimizer="momentum", momentum=0.9)
    theta, _, _ = loop.run(problem, inner, outer, ib)
    implicit = bilevel.hypergrad(problem, theta, outer, inner_batch=ib, outer_batch=ob, solver="exact",
                                 loop=bilevel.InnerLoop(steps=0)).hypergrad
    long_loop = bilevel.InnerLoop(steps=400, lr=0.2, optimizer="momentum", momentum=0.9)
    for spec in ("unroll", "forward:chunk_size=8", "unroll:checkpoint=true"):
        result = bilevel.hypergrad(problem, theta, outer, inner_batch=ib, outer_batch=ob, solver=spec, loop=long_loop)
        assert rel_error(result.hypergrad, implicit) < 1e-3, spec
    unroll = bilevel.hypergrad(problem, theta, outer, inner_batch=ib, outer_batch=ob, solver="unroll",
                               loop=long_loop).hypergrad
    forward = bilevel.hypergrad(problem, theta, outer, inner_batch=ib, outer_batch=ob, solver="forward",
                                loop=long_loop).hypergrad
    assert rel_error(forward, unroll) < 1e-9  # both are the exact derivative of the same loop


def test_onestep_matches_its_closed_form_on_the_mlp():
    """SGD one-step: dF(θ − η∇G(θ, φ), φ)/dφ = ∇_φF(θ') − η (∂²G/∂φ∂θ)ᵀ ∇_θF(θ').

    (At θ* the one-step direction need not align with the IFT one on an ill-conditioned MLP: it uses
    η·I in place of H⁻¹. Its alignment is tested on the well-conditioned ridge oracle.)
    """
    problem, inner, outer, ib, ob = mlp_problem()
    eta = 0.2
    result = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver="onestep",
                               loop=bilevel.InnerLoop(steps=1, lr=eta)).hypergrad
    g = torch.func.grad(problem.inner)(inner, outer, ib)
    theta_new = {k: inner[k] - eta * g[k] for k in inner}
    g_theta, g_phi = torch.func.grad(problem.outer, argnums=(0, 1))(theta_new, outer, ob)
    mixed = bilevel.mixed_vjp(lambda t, p: problem.inner(t, p, ib), inner, outer, g_theta)
    expected = {k: g_phi[k] - eta * mixed[k] for k in outer}
    assert rel_error(result, expected) < 1e-10
