"""θ*(φ) with its implicit derivative: the ``torch.autograd.Function`` behind :func:`bilevel.solve.solve`.

At a stationary point ∇θG(θ*, φ, z) = 0 of the inner loss (z: the floating tensors of the inner batch),
the implicit function theorem gives, with H = ∂²G/∂θ² and δ ≥ 0 the solver's damping,

    dθ*/dφ = −(H + δI)⁻¹ ∂²G/∂θ∂φ          (and likewise dθ*/dz = −(H + δI)⁻¹ ∂²G/∂θ∂z),

all at (θ*, φ, z). The rules below apply it without ever forming a matrix:

- reverse mode (``vjp``): v ↦ −(∂²G/∂φ∂θ)ᵀ (H + δI)⁻¹ v, one linear solve (H + δI) x = v with the
  :class:`~bilevel.solvers.Implicit` solver's linear solver, then one mixed vjp of φ ↦ ∇θG(θ*, φ) at x;
- forward mode (``jvp``): u ↦ −(H + δI)⁻¹ (∂²G/∂θ∂φ) u, one mixed jvp (forward-over-reverse, or
  reverse-over-reverse for ``hvp=revrev`` and when an operator has no forward derivative), then one solve.

The forward pass runs the inner loop without tracking, so memory does not grow with the number of inner
steps; θ* has derivative zero with respect to the inner start θ₀ (the solution does not depend on where
the loop started). ``generate_vmap_rule`` lets ``torch.func.vmap`` batch all three passes; the linear
solvers then run their full iteration budget (see :mod:`bilevel.linsolve`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp
from torch.utils import _pytree as pytree

from . import linsolve, tree
from .autodiff import _forward_ad_missing, hvp_operator
from .inner import InnerLoop
from .solvers import Implicit
from .solvers.common import hessian_batch
from .tree import Params
from .types import Batch, BilevelProblem


@dataclass(frozen=True)
class SolutionPlan:
    """Everything the rules need besides tensors: the problem, solver, loop and how to unpack the inputs.

    The ``autograd.Function`` takes its tensors flat, in the order outer params (``outer_keys``), inner
    start (``inner_keys``), then the tensor leaves of the inner batch (none for a callable batch).
    """

    problem: BilevelProblem
    solver: Implicit
    loop: InnerLoop
    outer_keys: tuple[str, ...]
    inner_keys: tuple[str, ...]
    batch_fn: Optional[Callable[[int], Batch]]  # a callable inner_batch, captured as a constant
    batch_leaves: tuple  # the batch's non-tensor pytree leaves (None at the tensor slots, filled from the inputs)
    batch_spec: Any
    tensor_slots: tuple[int, ...]

    @staticmethod
    def build(problem: BilevelProblem, solver: Implicit, loop: InnerLoop, inner: Params, outer: Params,
              inner_batch: Batch | Callable[[int], Batch]) -> tuple["SolutionPlan", list[Tensor]]:
        """The plan and the flat tensor inputs of :class:`ImplicitSolution`."""
        if callable(inner_batch):
            leaves, spec, slots, batch_fn = [], None, (), inner_batch
        else:
            leaves, spec = pytree.tree_flatten(inner_batch)
            slots, batch_fn = tuple(i for i, x in enumerate(leaves) if isinstance(x, Tensor)), None
        constants = tuple(None if i in slots else x for i, x in enumerate(leaves))  # tensors travel as inputs
        plan = SolutionPlan(problem, solver, loop, tuple(outer), tuple(inner), batch_fn, constants, spec, slots)
        return plan, [*outer.values(), *inner.values(), *(leaves[i] for i in slots)]

    def split(self, tensors: Sequence[Any]) -> tuple[Params, Params, list[Any]]:
        """(φ, θ₀, batch tensors) from the flat inputs (or from one tangent/cotangent per input)."""
        n_o, n_i = len(self.outer_keys), len(self.inner_keys)
        return (dict(zip(self.outer_keys, tensors[:n_o])), dict(zip(self.inner_keys, tensors[n_o:n_o + n_i])),
                list(tensors[n_o + n_i:]))

    def batches(self, batch_tensors: Sequence[Tensor]) -> Batch | Callable[[int], Batch]:
        """The loop's ``inner_batch``: the captured callable, or the batch rebuilt around ``batch_tensors``."""
        if self.batch_fn is not None:
            return self.batch_fn
        leaves = list(self.batch_leaves)
        for slot, t in zip(self.tensor_slots, batch_tensors):
            leaves[slot] = t
        return pytree.tree_unflatten(leaves, self.batch_spec)

    def hessian_batch(self, batch_tensors: Sequence[Tensor]) -> Batch:
        """The batch H and the mixed term are taken on (as :class:`Implicit` does): inner_batch(K) or the batch."""
        return hessian_batch(self.batches(batch_tensors), self.loop.steps)


def _hessian_solve(plan: SolutionPlan, theta: Params, phi: Params, batch: Batch, rhs: Params) -> Params:
    """(H + δI)⁻¹ rhs at (θ*, φ) with the solver's linear solver, HVP mode and damping (absolute or relative)."""
    hessian = hvp_operator(lambda t: plan.problem.inner(t, phi, batch), theta, plan.solver.hvp)
    linear, delta, _, _ = plan.solver._damped(hessian, rhs)
    matvec = hessian if not delta else linsolve.Damped(hessian, delta)  # Nystrom keeps δ out of its sketch
    with warnings.catch_warnings():
        # Under torch.func.vjp (and create_graph) the right-hand side requires grad; the solvers read its norm
        # on the host only to stop, which is what torch warns about. The solve itself stays differentiable.
        warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")
        x, _ = linear(matvec, rhs, None)
    return x


def _differentiable_slots(plan: SolutionPlan, batch_tensors: list[Tensor], wanted: Sequence[bool]) -> list[int]:
    """Indices of the floating batch tensors to differentiate (the Hessian batch must be the given batch)."""
    if plan.batch_fn is not None:
        return []
    return [i for i, (t, w) in enumerate(zip(batch_tensors, wanted)) if w and t.is_floating_point()]


def _inner_grad_fn(plan: SolutionPlan, theta: Params, batch_tensors: list[Tensor], slots: list[int]
                   ) -> Callable[[Params, list[Tensor]], Params]:
    """(φ, chosen batch tensors) ↦ ∇θG(θ*, φ, z), the map whose derivative is the mixed term."""
    def grad_theta(phi: Params, chosen: list[Tensor]) -> Params:
        tensors = list(batch_tensors)
        for i, t in zip(slots, chosen):
            tensors[i] = t
        batch = plan.hessian_batch(tensors)
        return grad(lambda t: plan.problem.inner(t, phi, batch))(theta)
    return grad_theta


class ImplicitSolution(torch.autograd.Function):
    """θ* = inner_loop(θ₀, φ, z), differentiated by the implicit function theorem (module docstring)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(plan: SolutionPlan, *tensors: Tensor) -> tuple[Tensor, ...]:
        phi, theta_0, batch_tensors = plan.split([t.detach() for t in tensors])
        theta, _, _ = plan.loop.run(plan.problem, theta_0, phi, plan.batches(batch_tensors))
        # With zero inner steps the loop returns θ₀ itself; an output must not alias an input.
        return tuple(theta[k].clone() if theta[k] is theta_0[k] else theta[k] for k in plan.inner_keys)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        plan, *tensors = inputs
        phi, _, batch_tensors = plan.split(tensors)
        ctx.plan = plan
        saved = (*phi.values(), *batch_tensors, *output)
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    @staticmethod
    def _saved(ctx: Any) -> tuple[Params, list[Tensor], Params]:
        plan: SolutionPlan = ctx.plan
        saved = list(ctx.saved_tensors)
        n_o, n_i = len(plan.outer_keys), len(plan.inner_keys)
        phi = dict(zip(plan.outer_keys, saved[:n_o]))
        theta = dict(zip(plan.inner_keys, saved[len(saved) - n_i:]))
        return phi, saved[n_o:len(saved) - n_i], theta

    @staticmethod
    def backward(ctx: Any, *cotangents: Tensor) -> tuple[Optional[Tensor], ...]:
        plan: SolutionPlan = ctx.plan
        phi, batch_tensors, theta = ImplicitSolution._saved(ctx)
        n_o, n_i = len(plan.outer_keys), len(plan.inner_keys)
        slots = _differentiable_slots(plan, batch_tensors, ctx.needs_input_grad[1 + n_o + n_i:])
        device_type = next(iter(theta.values())).device.type
        with torch.autocast(device_type=device_type, enabled=False):  # HVPs and solves in full precision
            v = {k: g if g is not None else torch.zeros_like(theta[k]) for k, g in zip(plan.inner_keys, cotangents)}
            x = _hessian_solve(plan, theta, phi, plan.hessian_batch(batch_tensors), v)
            _, mixed = vjp(_inner_grad_fn(plan, theta, batch_tensors, slots), phi, [batch_tensors[i] for i in slots])
            g_phi, g_batch = mixed(x)
        batch_grads: list[Optional[Tensor]] = [None] * len(batch_tensors)
        for i, g in zip(slots, g_batch):
            batch_grads[i] = -g
        return (None, *(-g_phi[k] for k in plan.outer_keys), *([None] * n_i), *batch_grads)

    @staticmethod
    def jvp(ctx: Any, _plan_tangent: Any, *tangents: Optional[Tensor]) -> tuple[Tensor, ...]:
        plan: SolutionPlan = ctx.plan
        phi, batch_tensors, theta = ImplicitSolution._saved(ctx)
        u_phi, _, u_batch = plan.split(tangents)  # θ₀'s tangent has no effect: dθ*/dθ₀ = 0
        u_phi = {k: u if u is not None else torch.zeros_like(phi[k]) for k, u in u_phi.items()}
        slots = _differentiable_slots(plan, batch_tensors, [u is not None for u in u_batch])
        device_type = next(iter(theta.values())).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            fn = _inner_grad_fn(plan, theta, batch_tensors, slots)
            primals = (phi, [batch_tensors[i] for i in slots])
            rhs = _mixed_jvp(fn, primals, (u_phi, [u_batch[i] for i in slots]), plan.solver.hvp)
            x = _hessian_solve(plan, theta, phi, plan.hessian_batch(batch_tensors), rhs)
        return tuple(-x[k] for k in plan.inner_keys)


def _mixed_jvp(fn: Callable[[Params, list[Tensor]], Params], primals: tuple, tangents: tuple, mode: str) -> Params:
    """(∂²G/∂θ∂(φ, z)) u: forward-over-reverse, or by symmetry ∇θ⟨∇_(φ,z) G, u⟩ as a vjp of ``fn`` (revrev).

    ``auto`` tries forward mode and falls back to reverse mode when an operator has no forward derivative,
    as :func:`bilevel.autodiff.hvp` does.
    """
    if mode != "revrev":
        try:
            return jvp(fn, primals, tangents)[1]
        except (RuntimeError, NotImplementedError) as err:
            if mode == "fwdrev" or not _forward_ad_missing(err):
                raise
    # The mixed block is the transpose of the one a vjp of fn gives: (∂²G/∂θ∂φ) u = ∇θ ⟨∇φG(θ, φ), u⟩,
    # computed as the vjp of the cotangent map w ↦ (∂²G/∂φ∂θ)ᵀ w, which is linear in w.
    out, theta_vjp = vjp(fn, *primals)
    _, transpose = vjp(theta_vjp, tree.zeros_like(out))
    return transpose(tangents)[0]
