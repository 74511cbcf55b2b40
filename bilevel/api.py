"""The one call for users: :func:`hypergrad`."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.utils import _pytree as pytree

from . import tree
from .autodiff import any_batched
from .errors import NonFiniteError
from .inner import InnerLoop, batch_at
from .solvers import make_solver
from .tree import Params
from .types import Batch, BilevelProblem, HypergradResult
from .validate import check_params, validate_problem


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
            loss). Skipped automatically under ``vmap``.

    Returns:
        A :class:`HypergradResult`: ``hypergrad`` (detached, shaped like ``outer``), ``inner``,
        ``diagnostics`` and ``state``.

    Raises:
        NonFiniteError: a loss or the hypergradient is NaN/Inf (the message names the step and solver).
        StructureError: a solver returned a hypergradient whose keys, shapes or dtypes differ from ``outer``.
        SpecError: unknown solver or option.
    """
    solver_obj = make_solver(solver)
    check_params(inner, "inner")
    check_params(outer, "outer")
    loop = loop if loop is not None else InnerLoop()
    batch_leaves = [x for x in pytree.tree_leaves((None if callable(inner_batch) else inner_batch, outer_batch))
                    if isinstance(x, torch.Tensor)]
    batched = any_batched(list(outer.values()) + list(inner.values()) + batch_leaves)
    if validate and not batched:
        validate_problem(problem, inner, outer, batch_at(inner_batch, 0), outer_batch)
    if state is None:
        state = solver_obj.init(problem, inner, outer)
    result = solver_obj(problem, inner, outer, inner_batch, outer_batch, loop, state)
    tree.assert_same_structure(result.hypergrad, outer, f"the hypergradient of solver {type(solver_obj).__name__}")
    if not batched:
        for key, value in result.hypergrad.items():
            if not bool(torch.isfinite(value).all()):
                raise NonFiniteError(
                    f"solver {type(solver_obj).__name__} returned a non-finite hypergradient for {key!r} "
                    f"(diagnostics: {result.diagnostics}); check the inner loss curvature and the solver options")
    return result
