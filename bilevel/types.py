"""Core types: the problem definition, the solver protocol and the solver result.

A bilevel problem is

    min_φ  F(θ*(φ), φ)    s.t.   θ*(φ) ∈ argmin_θ G(θ, φ, batch)

with G = ``inner_loss`` (the training loss) and F = ``outer_loss`` (the validation / meta loss). θ
(inner) and φ (outer) are flat ``dict[str, Tensor]`` params, typically from ``named_parameters()`` and
used through ``torch.func.functional_call``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

from torch import Tensor

from .tree import Params

Batch = Any
LossFn = Callable[[Params, Params, Batch], Tensor]


def require_scalar(value: Any, name: str) -> Tensor:
    """Return ``value`` if it is a 0-dim tensor, else raise a ValueError that says how to fix it."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must return a scalar torch.Tensor, got {type(value).__name__}")
    if value.dim() != 0:
        raise ValueError(
            f"{name} must return a scalar (0-dim) tensor, got shape {tuple(value.shape)}. "
            "Reduce it, e.g. with .mean() or .sum(), before returning."
        )
    if not value.is_floating_point():
        raise TypeError(f"{name} must return a floating-point tensor, got dtype {value.dtype}")
    return value


@dataclass(frozen=True)
class BilevelProblem:
    """A bilevel problem given by two pure functions.

    Args:
        inner_loss: ``G(inner, outer, batch) -> scalar``, minimised over ``inner``.
        outer_loss: ``F(inner, outer, batch) -> scalar``, minimised over ``outer`` at the inner solution.

    Both must be pure (no hidden state, no in-place changes to their arguments) so that torch.func can
    transform them.
    """

    inner_loss: LossFn
    outer_loss: LossFn

    def __post_init__(self) -> None:
        for name in ("inner_loss", "outer_loss"):
            if not callable(getattr(self, name)):
                raise TypeError(f"BilevelProblem.{name} must be callable f(inner, outer, batch) -> scalar")

    def inner(self, inner: Params, outer: Params, batch: Batch) -> Tensor:
        """G(θ, φ) on ``batch``, checked to be a scalar."""
        return require_scalar(self.inner_loss(inner, outer, batch), "inner_loss")

    def outer(self, inner: Params, outer: Params, batch: Batch) -> Tensor:
        """F(θ, φ) on ``batch``, checked to be a scalar."""
        return require_scalar(self.outer_loss(inner, outer, batch), "outer_loss")


@dataclass
class HypergradResult:
    """What a hypergradient solver returns.

    Attributes:
        hypergrad: dF/dφ (or the solver's estimate of it), detached, keys/shapes/dtypes of the outer params.
        inner: the inner params reached (a warm start for the next call), detached.
        diagnostics: floats: ``inner_loss``, ``outer_loss``, ``inner_steps``, ``hvp_count``,
            ``evaluations`` and solver-specific entries (``residual``, ``iterations``, ``sigma`` ...).
        state: the solver's state after this call; pass it back on the next call.
    """

    hypergrad: Params
    inner: Params
    diagnostics: dict[str, float] = field(default_factory=dict)
    state: Any = None


@runtime_checkable
class Solver(Protocol):
    """A hypergradient solver: a frozen dataclass of options with explicit state.

    ``init`` builds the state (or None); ``__call__`` computes a :class:`HypergradResult` whose
    ``state`` field holds the updated state.
    """

    def init(self, problem: BilevelProblem, inner: Params, outer: Params) -> Any: ...

    def __call__(self, problem: BilevelProblem, inner: Params, outer: Params, inner_batch: Batch,
                 outer_batch: Batch, loop: Any, state: Any) -> HypergradResult: ...
