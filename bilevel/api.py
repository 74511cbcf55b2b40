"""The one call for users: :func:`hypergrad`."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.utils import _pytree as pytree

from . import tree
from .autodiff import any_batched
from .differentiable import differentiable_route, refusal
from .errors import NonFiniteError
from .inner import InnerLoop, batch_at
from .solvers import make_solver
from .transforms import (NotDifferentiableError, differentiation_request, outside_transforms, refuse_backward,
                         tensor_leaves, unwrap)
from .tree import Params
from .types import Batch, BilevelProblem, HypergradResult
from .validate import check_dtypes_and_devices, check_params, validate_problem


def hypergrad(problem: BilevelProblem, inner: Params, outer: Params, *,
              inner_batch: Batch | Callable[[int], Batch], outer_batch: Batch, solver: Any = "cg",
              loop: Optional[InnerLoop] = None, state: Any = None, validate: bool = True) -> HypergradResult:
    """The hypergradient dF/dφ of ``problem`` at outer params ``outer``.

    Args:
        problem: the :class:`BilevelProblem`.
        inner: the inner params θ₀ the inner loop starts from (a fresh init, or the previous call's
            ``result.inner`` as a warm start). Not modified.
        outer: the outer params φ. Not modified.
        inner_batch: the training batch of the inner loss, or a callable ``step -> batch``.
        outer_batch: the batch of the outer loss.
        solver: a spec string (``"cg"``, ``"neumann:alpha=0.05"``, see ``bilevel.SOLVERS``) or a solver.
        loop: the :class:`InnerLoop` (steps, optimiser, learning rate); default ``InnerLoop()``.
        state: the solver state from the previous call's ``result.state`` (CG warm start, CMA-ES
            distribution, the online model's optimiser state); None on the first call.
        validate: check the inputs first (scalar losses, finite values, outer params used by the inner
            loss). Skipped automatically under ``vmap``; under ``torch.func.grad``/``jvp`` it checks the
            primal values.

    Always checked first, before any loss is evaluated: the params are non-empty dicts of floating tensors,
    and the inner params, the outer params and every floating tensor of the batches (batch 0 of a callable
    ``inner_batch``) share one dtype and one device (integer tensors such as labels are not checked).

    Differentiating through this call (``torch.func.grad``/``jvp``/``jacrev``/``jacfwd``/``hessian`` around
    it, ``torch.autograd.grad`` / ``.backward()`` through the result with inputs that require grad, or a
    ``torch.autograd.forward_ad`` dual input) is exact for ``unroll``, ``forward`` and ``onestep``
    (``mode=exact|first_order``): their hypergradient is computed without detaching
    (:mod:`bilevel.differentiable`). For every other solver it raises :class:`NotDifferentiableError`: at once
    under torch.func and forward AD, at backward time under autograd (the call itself succeeds, so that params
    that merely require grad, e.g. ``dict(model.named_parameters())``, still work). ``torch.func.vmap`` works
    with every solver.

    Returns:
        A :class:`HypergradResult`: ``hypergrad`` (shaped like ``outer``; detached unless the call is being
        differentiated, see above), ``inner`` (detached), ``diagnostics`` and ``state``.

    Raises:
        NonFiniteError: a loss or the hypergradient is NaN/Inf (the message names the step and solver).
        StructureError: params that are not dicts of floating tensors; inputs of mixed dtypes or devices (the
            message names the tensor, both dtypes/devices and the cast or move that fixes it); a solver
            returned a hypergradient whose keys, shapes or dtypes differ from ``outer``.
        NotDifferentiableError: differentiation through a solver without a differentiable route.
        SpecError: unknown solver or option.
    """
    solver_obj = make_solver(solver)
    check_params(inner, "inner")
    check_params(outer, "outer")
    loop = loop if loop is not None else InnerLoop()
    first_batch = batch_at(inner_batch, 0)
    named = tensor_leaves(("outer", outer), ("inner", inner),
                          ("inner_batch(0)" if callable(inner_batch) else "inner_batch", first_batch),
                          ("outer_batch", outer_batch))
    check_dtypes_and_devices(named)
    request = differentiation_request(named)
    route = differentiable_route(solver_obj, request) if request is not None else None
    if request is not None and route is None and request.kind != "autograd":
        raise NotDifferentiableError(refusal(solver_obj, request))
    batched = any_batched([t for _, t in named])
    if validate and not batched:
        _validate(problem, inner, outer, first_batch, outer_batch, under_transform=request is not None
                  and request.kind == "torch.func")
    if state is None:
        state = solver_obj.init(problem, inner, outer)
    if route is not None:
        result = route(solver_obj, problem, inner, outer, inner_batch, outer_batch, loop, state)
    else:
        result = solver_obj(problem, inner, outer, inner_batch, outer_batch, loop, state)
    tree.assert_same_structure(result.hypergrad, outer, f"the hypergradient of solver {type(solver_obj).__name__}")
    if not batched:
        for key, value in result.hypergrad.items():
            if not bool(torch.isfinite(value.detach()).all()):
                raise NonFiniteError(
                    f"solver {type(solver_obj).__name__} returned a non-finite hypergradient for {key!r} "
                    f"(diagnostics: {result.diagnostics}); check the inner loss curvature and the solver options")
    if request is not None and route is None:  # autograd: a backward pass through the result must fail loudly
        result.hypergrad = refuse_backward(result.hypergrad, request.tracked, refusal(solver_obj, request))
    return result


def _validate(problem: BilevelProblem, inner: Params, outer: Params, inner_batch: Batch, outer_batch: Batch,
              under_transform: bool) -> None:
    """:func:`validate_problem`; under a torch.func grad/jvp transform on the primal values and outside the
    transform, since its check for unused outer params needs autograd (``allow_unused``), which torch.func
    refuses inside a transform."""
    if not under_transform:
        validate_problem(problem, inner, outer, inner_batch, outer_batch)
        return
    with outside_transforms():
        validate_problem(problem, *pytree.tree_map(unwrap, (inner, outer, inner_batch, outer_batch)))
