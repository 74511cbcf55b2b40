"""Is someone differentiating through this call? Detection of torch.func transforms and autograd tracking.

A hypergradient solver detaches its inputs and its result. If a caller differentiates through
:func:`bilevel.hypergrad` anyway (``torch.func.grad``/``jvp``/``jacrev``/``hessian`` around the call,
``torch.autograd.grad(..., create_graph=True)`` or ``.backward()`` through the result, a forward-AD dual
tensor), that derivative would silently be zero. This module tells :func:`bilevel.hypergrad` when that is
happening, so that it can either take a differentiable route (:mod:`bilevel.differentiable`) or refuse
with :class:`NotDifferentiableError`. ``torch.func.vmap`` is not differentiation: it is supported by
every solver and needs neither.

The functorch interpreter stack is a private torch API (``torch._C._functorch``); it is read in one place,
:func:`active_transforms`, so a torch upgrade that moves it breaks one function and its tests.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import Tensor
from torch._C import _functorch
from torch.autograd import forward_ad
from torch.utils import _pytree as pytree

from .errors import BilevelError

# interpreter levels that differentiate, and the public transforms that create them
DIFFERENTIATING_TRANSFORMS = {"grad": "grad/vjp/jacrev/hessian", "jvp": "jvp/jacfwd/linearize/hessian"}


class NotDifferentiableError(BilevelError, NotImplementedError):
    """Differentiation through :func:`bilevel.hypergrad` was requested for a solver that does not support it."""


@dataclass
class DifferentiationRequest:
    """Why the caller differentiates through a hypergradient call.

    Attributes:
        kind: ``"torch.func"`` (a grad/jvp transform is active around the call), ``"forward_ad"`` (an input
            is a ``torch.autograd.forward_ad`` dual tensor) or ``"autograd"`` (grad mode is on and an input
            requires grad).
        reason: a human-readable account, e.g. ``"torch.func.grad is active around the call"``.
        tracked: for ``"autograd"``, the input tensors that require grad (what a backward pass would reach).
    """

    kind: str
    reason: str
    tracked: list[Tensor] = field(default_factory=list)


def active_transforms() -> list[str]:
    """The torch.func transforms active around the caller, outermost first: ``"grad"``, ``"jvp"``, ``"vmap"``.

    ``jacrev``/``vjp``/``hessian`` show up as ``"grad"`` levels and ``jacfwd``/``linearize`` as ``"jvp"``.
    """
    stack = _functorch.get_interpreter_stack() or []
    return [str(interpreter.key()).rsplit(".", 1)[-1].lower() for interpreter in stack]


def tensor_leaves(*trees: Any) -> list[tuple[str, Tensor]]:
    """``(path, tensor)`` for every tensor leaf of the pytrees, the path as in ``inner['w']`` or ``outer_batch[0]``.

    Each tree is given as ``(name, tree)``.
    """
    out = []
    for name, tree in trees:
        leaves, _ = pytree.tree_flatten_with_path(tree)
        for path, leaf in leaves:
            if isinstance(leaf, Tensor):
                out.append((name + pytree.keystr(path), leaf))
    return out


def differentiation_request(named_tensors: list[tuple[str, Tensor]]) -> Optional[DifferentiationRequest]:
    """How (if at all) the caller differentiates through a call taking ``named_tensors`` as inputs.

    Args:
        named_tensors: ``(path, tensor)`` of the params and the floating batch tensors.

    Returns:
        None when nothing differentiates through the call (plain calls, ``vmap`` only, ``torch.no_grad``).
    """
    transforms = [t for t in active_transforms() if t in DIFFERENTIATING_TRANSFORMS]
    if transforms:
        names = " and ".join(f"torch.func.{DIFFERENTIATING_TRANSFORMS[t]}" for t in dict.fromkeys(transforms))
        return DifferentiationRequest("torch.func", f"a differentiating transform is active around the call: {names}")
    floating = [(path, t) for path, t in named_tensors if t.is_floating_point()]
    # under vmap the wrappers hide the base tensor's autograd and forward-AD state: read the base's
    duals = [path for path, t in floating if forward_ad.unpack_dual(unwrap(t)).tangent is not None]
    if duals:
        return DifferentiationRequest("forward_ad", f"{duals[0]} is a torch.autograd.forward_ad dual tensor")
    if torch.is_grad_enabled():
        tracked = [(path, t) for path, t in floating if unwrap(t).requires_grad]
        if tracked:
            paths = ", ".join(path for path, _ in tracked[:3]) + (" ..." if len(tracked) > 3 else "")
            verb = "requires" if len(tracked) == 1 else "require"
            return DifferentiationRequest("autograd", f"grad mode is on and {paths} {verb} grad",
                                          [t for _, t in tracked])
    return None


def unwrap(tensor: Any) -> Any:
    """The plain tensor under every functorch wrapper (the primal value); non-tensors unchanged."""
    if not isinstance(tensor, Tensor):
        return tensor
    while _functorch.is_functorch_wrapped_tensor(tensor):
        tensor = _functorch.get_unwrapped(tensor)
    return tensor


@contextlib.contextmanager
def outside_transforms() -> Iterator[None]:
    """Run a block as if no torch.func transform were active (for host-side input validation on primal values)."""
    popped = []
    try:
        while _functorch.peek_interpreter_stack() is not None:
            popped.append(_functorch.pop_dynamic_layer_stack())
        yield
    finally:
        while popped:
            _functorch.push_dynamic_layer_stack(popped.pop())


class _RefuseBackward(torch.autograd.Function):
    """Identity on the hypergradient leaves, whose backward raises :class:`NotDifferentiableError`.

    The extra inputs are the caller's tensors that require grad: they connect the result to the caller's
    graph, so that a backward pass through it fails loudly instead of treating it as a constant.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(message: str, count: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.clone() for t in tensors[:count])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        ctx.message = inputs[0]

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple:
        raise NotDifferentiableError(ctx.message)

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> tuple:
        raise NotDifferentiableError(ctx.message)


def refuse_backward(values: dict[str, Tensor], tracked: list[Tensor], message: str) -> dict[str, Tensor]:
    """``values`` connected to ``tracked`` so that any backward pass through them raises with ``message``."""
    keys = list(values)
    outputs = _RefuseBackward.apply(message, len(keys), *(values[k] for k in keys), *tracked)
    return dict(zip(keys, outputs))
