"""A differentiable inner solution θ*(φ): :func:`solve`, the primitive users compose.

:func:`bilevel.hypergrad` answers one question, dF/dφ for one fixed outer loss F. :func:`solve` returns
θ*(φ) itself, the inner params reached by the inner loop, as a differentiable function of the outer params
φ, so any outer objective, any number of them, Jacobians, Jacobian-vector products and batches over φ are
ordinary torch code: ``loss(solve(...)).backward()``, ``torch.func.grad``, ``vjp``, ``jvp``, ``jacrev``,
``jacfwd`` and ``vmap``. Its derivative is the solver's (jaxopt's ``custom_root``, optimistix's
``root_find(..., adjoint=ImplicitAdjoint())``, torchopt's ``custom_root``, which breaks under torch.func):

- implicit solvers (``cg``, ``neumann``, ``fixedpoint``, ``exact``, ``nystrom``, or an
  :class:`~bilevel.solvers.Implicit`):
  dθ*/dφ = −(H + δI)⁻¹ ∂²G/∂θ∂φ at (θ_K, φ), H = ∂²G/∂θ², δ = ``damping``; a vjp costs one linear solve
  and one mixed vjp, a jvp one mixed jvp and one solve (:mod:`bilevel.implicit_solution`). Memory does not
  grow with the number of inner steps;
- ``unroll`` (and ``forward``): the derivative of the K-step loop θ_K(φ) itself, the loop run
  differentiably. Whether it is taken in reverse or forward mode is the caller's choice (``backward``/
  ``grad``/``vjp`` or ``jvp``/``jacfwd``), so the two names give the same function; ``unroll:truncate=T``
  differentiates only the last T steps (the first K − T run with φ held constant, as in ``hypergrad``).

So ``torch.func.grad(lambda p: F(solve(problem, θ₀, p, ...), p))(φ)`` is the hypergradient that
``bilevel.hypergrad(..., solver=same)`` returns for F.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Optional

from . import tree
from .autodiff import any_batched
from .errors import SpecError, StationarityWarning
from .implicit_solution import ImplicitSolution, SolutionPlan
from .inner import InnerLoop, batch_at
from .solvers import SOLVERS, Forward, Implicit, Unroll, make_solver, name_of, solver_kind
from .solvers.common import detach_state, hessian_batch, inner_gradient_norm
from .transforms import tensor_leaves
from .tree import Params
from .types import Batch, BilevelProblem
from .validate import check_dtypes_and_devices, check_params

SUPPORTED_CLASSES = (Implicit, Unroll, Forward)


def supported_solvers() -> list[str]:
    """The registered solver names :func:`solve` accepts: those building an implicit or unrolled solver."""
    return [name for name, entry in SOLVERS.items() if entry.cls in SUPPORTED_CLASSES]


def solve(problem: BilevelProblem, inner: Params, outer: Params, *, inner_batch: Batch | Callable[[int], Batch],
          solver: Any = "cg", loop: Optional[InnerLoop] = None) -> Params:
    """θ*(φ): the inner params reached by ``loop`` from ``inner``, differentiable in ``outer`` (and the batch).

    Args:
        problem: the :class:`BilevelProblem` (only its inner loss is used).
        inner: the inner start θ₀. Implicit solvers: θ* does not depend on it (derivative zero, the IFT's
            premise). Unrolled solvers: θ_K is differentiated through θ₀ too (e.g. MAML's initialisation).
        outer: the outer params φ, e.g. leaves with ``requires_grad=True`` or the inputs of a torch.func
            transform. Not modified.
        inner_batch: the training batch, or a callable ``step -> batch``. A batch given as a pytree of tensors
            is an input like φ: its floating tensors can be differentiated (dθ*/dz = −(H + δI)⁻¹ ∂²G/∂θ∂z)
            and vmapped over; a callable is a constant.
        solver: a spec (``"cg:maxiter=50,rtol=1e-10"``, ``"neumann:damping=0.1"``, ``"unroll:truncate=20"``,
            ``"forward"``) or a solver object of those classes. Implicit options that concern one call's
            bookkeeping have no effect: ``warm_start`` (every vjp/jvp solves from zero). ``forward``'s
            ``chunk_size`` has no effect (the caller's transform chooses the tangents).
        loop: the :class:`InnerLoop`; default ``InnerLoop()``.

    Returns:
        θ* as a dict shaped like ``inner``, carrying the solver's derivative.

    Raises:
        SpecError: a solver with no differentiable solution (``onestep``, ``cmaes``, other classes), or
            ``unroll:checkpoint=true``; unknown solver names or options.
        StructureError: params that are not non-empty dicts of floating tensors; mixed dtypes or devices.
        ValueError: an implicit solver with ``InnerLoop.weight_decay`` (the loop's fixed point is not
            a stationary point of ``inner_loss``).
    """
    solver_obj = make_solver(solver)
    if type(solver_obj) not in SUPPORTED_CLASSES:
        raise SpecError(_refusal(solver_obj))
    check_params(inner, "inner")
    check_params(outer, "outer")
    loop = loop if loop is not None else InnerLoop()
    check_dtypes_and_devices(tensor_leaves(
        ("outer", outer), ("inner", inner),
        ("inner_batch(0)" if callable(inner_batch) else "inner_batch", batch_at(inner_batch, 0))))
    if type(solver_obj) is Implicit:
        return _implicit(problem, solver_obj, inner, outer, inner_batch, loop)
    return _unrolled(problem, solver_obj, inner, outer, inner_batch, loop)


def _implicit(problem: BilevelProblem, solver: Implicit, inner: Params, outer: Params,
              inner_batch: Batch | Callable[[int], Batch], loop: InnerLoop) -> Params:
    if loop.weight_decay:
        raise ValueError(
            f"bilevel.solve with an implicit solver differentiates the stationarity of inner_loss, but "
            f"InnerLoop.weight_decay={loop.weight_decay} moves the loop's fixed point away from it; put the L2 "
            "term in inner_loss (or use solver='unroll').")
    plan, tensors = SolutionPlan.build(problem, solver, loop, inner, outer, inner_batch)
    theta = dict(zip(plan.inner_keys, ImplicitSolution.apply(plan, *tensors)))
    _warn_if_not_stationary(problem, solver, loop, inner, theta, outer, inner_batch)
    return theta


def _warn_if_not_stationary(problem: BilevelProblem, solver: Implicit, loop: InnerLoop, theta_0: Params,
                            theta: Params, phi: Params, inner_batch: Batch | Callable[[int], Batch]) -> None:
    """Warn like :class:`Implicit` when ‖∇θG(θ_K)‖ / ‖∇θG(θ₀)‖ on the Hessian batch > stationarity_rtol.

    Two gradients, on detached values; skipped under vmap, where the norms cannot be read on the host.
    """
    batch = hessian_batch(inner_batch, loop.steps)
    theta_0, theta, phi = tree.detach(theta_0), tree.detach(theta), tree.detach(phi)
    rtol = solver.stationarity_rtol
    if not rtol or any_batched([t for _, t in tensor_leaves(("theta", theta), ("phi", phi), ("batch", batch))]):
        return
    norm_k = float(inner_gradient_norm(problem, theta, phi, batch))
    norm_0 = float(inner_gradient_norm(problem, theta_0, phi, batch))
    ratio = norm_k / norm_0 if norm_0 > 0 else (0.0 if norm_k == 0 else math.inf)
    if ratio > rtol:
        warnings.warn(
            f"bilevel.solve: implicit differentiation at a non-stationary inner point: after {loop.steps} inner "
            f"steps ‖∇θG(θ_K)‖ = {norm_k:.3g}, {ratio:.3g} of its start value, > stationarity_rtol={rtol:g}. "
            "dθ*/dφ assumes ∇θG(θ_K) = 0, so it is biased: run more inner steps (or raise the inner lr), or use "
            "solver='unroll', which differentiates the K-step loop as it is; stationarity_rtol=0 switches this "
            "warning off.", StationarityWarning, stacklevel=4)


def _unrolled(problem: BilevelProblem, solver: Unroll | Forward, inner: Params, outer: Params,
              inner_batch: Batch | Callable[[int], Batch], loop: InnerLoop) -> Params:
    """θ_K(φ) run differentiably; with ``truncate=T`` the first K − T steps see φ (and θ₀) as constants."""
    if isinstance(solver, Unroll) and solver.checkpoint:
        raise SpecError(
            "bilevel.solve: unroll:checkpoint=true is not supported: solve returns θ_K for the caller's own "
            "backward pass, which stores every step's activations, so the checkpointed adjoint's memory saving "
            "cannot be kept. Use 'unroll' (memory grows with the steps) or an implicit solver such as 'cg' "
            "(memory independent of the steps).")
    steps = loop.steps
    truncate = solver.truncate if isinstance(solver, Unroll) else 0
    differentiated = steps if truncate == 0 else min(truncate, steps)
    start = steps - differentiated
    theta, opt_state = inner, None
    if start:
        theta, opt_state, _ = loop.run(problem, tree.detach(inner), tree.detach(outer), inner_batch, steps=start)
        theta, opt_state = tree.detach(theta), detach_state(opt_state)
    theta, _, _ = loop.run(problem, theta, outer, inner_batch, steps=differentiated, opt_state=opt_state,
                           start=start)
    return dict(theta)


def _refusal(solver: Any) -> str:
    """The message for a solver with no differentiable solution θ*(φ)."""
    label = name_of(solver) or type(solver).__name__
    kind = solver_kind(label) if label in SOLVERS else None
    if kind == "online":
        why = ("it is an online solver (a few steps from a warm start, its state carried across outer steps), a "
               "hypergradient estimate rather than a solution of the inner problem")
    elif kind == "zeroth_order":
        why = "it is a zeroth-order search over φ that never differentiates the inner solution"
    else:
        why = f"{type(solver).__name__} is not one of the library's implicit or unrolled solver classes"
    return (f"bilevel.solve has no differentiable solution θ*(φ) for solver {label!r}: {why}. Supported solvers: "
            f"{', '.join(supported_solvers())} (implicit ones give dθ*/dφ = −(H + δI)⁻¹ ∂²G/∂θ∂φ; unroll and "
            f"forward the derivative of the K-step loop). For a hypergradient with {label!r}, call "
            f"bilevel.hypergrad(..., solver={label!r}).")
