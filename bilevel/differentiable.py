"""Differentiable hypergradients: ``unroll``, ``forward`` and ``onestep`` computed with nothing detached.

These solvers return the exact derivative of a finite computation,

    h(φ) = d/dφ L(φ),    L(φ) = F(θ_K(φ), φ),    θ_K = K steps of the inner optimiser from θ₀,

(``onestep``: K = 1 from a warm start), so h is itself a differentiable function of φ, θ₀ and the batches,
e.g. ∂h/∂φ = ∇²L(φ), the Hessian of the unrolled objective. The solver classes return h detached (a
hypergradient is usually an outer step, not a node of a graph). When the caller differentiates through
:func:`bilevel.hypergrad` (:mod:`bilevel.transforms` detects it), the same computations run here without
detaching: reverse mode ``torch.func.grad`` of L for ``unroll``, ``torch.func.jvp`` along basis directions
for ``forward``, one differentiable optimiser step for ``onestep``. Their derivatives are then exact to any
order, under torch.func transforms and autograd alike.

What each route computes, for the record (θ₀ and the batches may also be differentiated):

- ``unroll:truncate=T``: h(φ) = ∂/∂ψ F(θ_K(θ_{K−T}(φ), ψ), ψ) at ψ = φ, the last T steps differentiated in
  ψ, the first K − T steps run with φ; its derivative follows φ through both. ``checkpoint=true`` has the
  same value and is differentiated as plain reverse mode (memory O(T) activations, not O(√T)).
- ``forward:chunk_size=c``: the same h as full ``unroll``, by ⌈dim φ/c⌉ vmapped jvps; differentiating it
  stores the loop's activations (the flat memory of forward mode holds for h itself only).
- ``onestep:mode=exact``: h(φ) = d/dφ F(θ'(φ), φ) with θ'(φ) = Φ(θ, s, φ) one optimiser step;
  ``mode=first_order``: h(φ) = ∂₂F(θ'(φ), φ), whose derivative still follows θ'(φ).

These routes run on torch.func throughout (``diagnostics["autodiff_path"] == "func"``): it differentiates to
any order under transforms and autograd alike (:mod:`bilevel.paths`).

Implicit solvers (``cg``, ``neumann``, ``fixedpoint``, ``exact``), ``cmaes``, ``onestep:mode=finite_difference``
and solvers of other classes have no differentiable route: :func:`refusal` explains why.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.func import grad, jvp, vmap

from . import tree
from .autodiff import is_batched, value_and_grads
from .inner import InnerLoop, batch_at, raise_if_nonfinite
from .paths import FUNC
from .solvers import CMAES, Forward, Implicit, OneStep, Unroll, name_of
from .solvers.common import detach_state, last, outer_fn, scalar
from .solvers.forward import _split_rows
from .transforms import DifferentiationRequest
from .tree import Params
from .types import Batch, BilevelProblem, HypergradResult

Route = Callable[..., HypergradResult]
SUPPORTED = ("unroll (every option), forward, onestep:mode=exact and onestep:mode=first_order: exact derivatives "
             "of their hypergradient, to any order, under torch.func.grad/jvp/jacrev/jacfwd/hessian and autograd "
             "(create_graph=True, .backward()), and torch.autograd.forward_ad (except forward)")


def differentiable_route(solver: Any, request: DifferentiationRequest) -> Optional[Route]:
    """The differentiable computation of ``solver``'s hypergradient for ``request``, or None when it has none.

    Only the library's own classes qualify (a subclass may compute something else).
    """
    if type(solver) is Unroll:
        return _unroll
    if type(solver) is Forward:  # forward mode inside a forward_ad dual level is nested forward AD: torch has none
        return _forward if request.kind != "forward_ad" else None
    if type(solver) is OneStep and solver.mode in ("exact", "first_order"):
        return _onestep
    return None


def refusal(solver: Any, request: DifferentiationRequest) -> str:
    """The message of :class:`NotDifferentiableError` for a solver without a differentiable route."""
    label = name_of(solver) or type(solver).__name__
    if type(solver) is Implicit:
        why = ("an implicit (IFT) hypergradient is taken at the inner solution θ*; its derivative needs third "
               "derivatives of G and the sensitivity dθ*/dφ, which are not implemented")
    elif type(solver) is CMAES:
        why = "a zeroth-order CMA-ES pseudo-gradient (a change of the search mean) has no derivative"
    elif type(solver) is Forward:
        why = ("forward computes its hypergradient with forward-mode AD, and torch does not nest forward-mode AD "
               "inside a torch.autograd.forward_ad dual level; use torch.func.jvp around the call, or solver unroll")
    elif type(solver) is OneStep:
        why = "the finite_difference mode is an approximation whose step size depends on the data"
    else:
        why = f"{type(solver).__name__} is not one of the library's unrolled or one-step solvers"
    if request.kind == "autograd":
        head = (f"backward through a bilevel.hypergrad result of solver {label!r} is not supported ({request.reason} "
                "at the call): the hypergradient is a constant for autograd, so this derivative would silently "
                "be zero")
        constant = ("If the hypergradient is meant as a constant, use result.hypergrad[k].detach(), or pass detached "
                    "params (bilevel.tree.detach) or call hypergrad under torch.no_grad()")
    else:
        head = (f"differentiating through bilevel.hypergrad is not supported for solver {label!r} ({request.reason}): "
                "it returns the hypergradient detached, so this derivative would silently be zero")
        constant = "If the hypergradient is meant as a constant, call bilevel.hypergrad outside the transform"
    return (f"{head}; {why}. Differentiable solvers: {SUPPORTED}. torch.func.vmap (over outer params, data or "
            f"tasks) is supported by every solver. {constant}.")


def _unroll(solver: Unroll, problem: BilevelProblem, inner: Params, outer: Params, inner_batch: Any,
            outer_batch: Batch, loop: InnerLoop, state: Any) -> HypergradResult:
    steps = loop.steps
    differentiated = steps if solver.truncate == 0 else min(solver.truncate, steps)
    start = steps - differentiated
    theta, opt_state, prefix_losses = loop.run(problem, inner, outer, inner_batch, steps=start, path=FUNC)

    def objective(p: Params):
        th, _, losses = loop.run(problem, theta, p, inner_batch, steps=differentiated, opt_state=opt_state,
                                 start=start, check_finite=False, path=FUNC)
        value = problem.outer(th, p, outer_batch)
        return value, (value, th, losses)

    hypergrad, (value, theta_k, losses) = grad(objective, has_aux=True)(outer)
    if losses.numel() and not is_batched(losses):
        raise_if_nonfinite(losses, start, "inner loss", "inner step")
    all_losses = torch.cat([prefix_losses.to(losses), losses]) if prefix_losses.numel() else losses
    diagnostics = {"inner_loss": last(all_losses), "outer_loss": scalar(value.detach()), "inner_steps": float(steps),
                   "differentiated_steps": float(differentiated), "hvp_count": float(differentiated),
                   "evaluations": float(steps), "differentiable": 1.0, "autodiff_path": FUNC}
    return HypergradResult(hypergrad, tree.detach(theta_k), diagnostics, None)


def _forward(solver: Forward, problem: BilevelProblem, inner: Params, outer: Params, inner_batch: Any,
             outer_batch: Batch, loop: InnerLoop, state: Any) -> HypergradResult:
    def objective(p: Params):
        th, _, losses = loop.run(problem, inner, p, inner_batch, check_finite=False, path=FUNC)
        return problem.outer(th, p, outer_batch), (th, losses)

    def directional(tangent: Params):
        value, derivative, aux = jvp(objective, (outer,), (tangent,), has_aux=True)
        return derivative, value, aux

    n = tree.numel(outer)
    ref = next(iter(outer.values()))
    flat_grad, first = [], None
    for begin in range(0, n, solver.chunk_size):
        rows = torch.arange(begin, min(n, begin + solver.chunk_size), device=ref.device)
        basis = torch.zeros(len(rows), n, dtype=ref.dtype, device=ref.device)
        basis[torch.arange(len(rows), device=ref.device), rows] = 1.0
        derivative, values, aux = vmap(directional)(_split_rows(basis, outer))
        flat_grad.append(derivative)
        if first is None:  # θ_K and the losses do not depend on the tangent: take the first copy
            first = (values[0], tree.tree_map(lambda x: x[0], aux[0]), aux[1][0])
    value, theta_k, losses = first
    if losses.numel() and not is_batched(losses):
        raise_if_nonfinite(losses, 0, "inner loss", "inner step")
    hypergrad = tree.unflatten(torch.cat(flat_grad), outer)
    diagnostics = {"inner_loss": last(losses), "outer_loss": scalar(value.detach()), "inner_steps": float(loop.steps),
                   "hvp_count": float(loop.steps * n), "evaluations": float(loop.steps * len(flat_grad)),
                   "chunks": float(len(flat_grad)), "differentiable": 1.0, "autodiff_path": FUNC}
    return HypergradResult(hypergrad, tree.detach(theta_k), diagnostics, None)


def _onestep(solver: OneStep, problem: BilevelProblem, inner: Params, outer: Params, inner_batch: Any,
             outer_batch: Batch, loop: InnerLoop, state: Any) -> HypergradResult:
    batch = batch_at(inner_batch, 0)
    if solver.mode == "exact":
        def objective(p: Params):
            th, st, loss = loop.step(problem, inner, state, p, batch, path=FUNC)
            value = problem.outer(th, p, outer_batch)
            return value, (value, th, st, loss)

        hypergrad, (value, theta_new, new_state, loss) = grad(objective, has_aux=True)(outer)
    else:  # first_order: the partial ∇_φF at θ'(φ), which still depends on φ through the step
        theta_new, new_state, loss = loop.step(problem, inner, state, outer, batch, path=FUNC)
        value, _, hypergrad = value_and_grads(outer_fn(problem, outer_batch), theta_new, outer)
    diagnostics = {"inner_loss": scalar(loss.detach()), "outer_loss": scalar(value.detach()), "inner_steps": 1.0,
                   "hvp_count": 1.0 if solver.mode == "exact" else 0.0, "evaluations": 1.0, "differentiable": 1.0,
                   "autodiff_path": FUNC}
    return HypergradResult(hypergrad, tree.detach(theta_new), diagnostics, detach_state(new_state))
