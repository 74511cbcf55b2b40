"""Input checks run before a hypergradient: they turn silent wrong answers into clear errors."""
from __future__ import annotations

import warnings

import torch

from torch import Tensor

from .errors import NonFiniteError, StructureError
from .tree import Params
from .types import Batch, BilevelProblem


def check_params(params: Params, name: str) -> None:
    """Raise unless ``params`` is a non-empty dict of floating-point tensors (no host sync: safe under vmap)."""
    if not isinstance(params, dict) or not params:
        raise StructureError(f"{name} must be a non-empty dict[str, Tensor] (e.g. dict(model.named_parameters())), "
                             f"got {type(params).__name__}")
    for key, value in params.items():
        if not isinstance(value, torch.Tensor):
            raise StructureError(f"{name}[{key!r}] must be a Tensor, got {type(value).__name__}")
        if not value.is_floating_point():
            raise StructureError(f"{name}[{key!r}] must be floating point, got {value.dtype}; cast it with .float() "
                                 "(or .double())")


def check_dtypes_and_devices(named: list[tuple[str, Tensor]]) -> None:
    """Raise unless every floating-point tensor in ``named`` has the dtype and device of the first one.

    ``named`` lists ``(path, tensor)`` for the outer params, the inner params and every tensor leaf of the
    batches (integer tensors such as labels are skipped), e.g. ``("outer['log_lambda']", t)``. Mixed
    dtypes would otherwise be promoted silently inside the losses (a float64 batch turns float32 params'
    gradients float64, a float32 batch rounds float64 params' losses to 7 digits) or fail deep inside a
    solver; mixed devices fail deep inside torch. Reads only metadata: no host sync, safe under vmap.
    """
    floating = [(path, t) for path, t in named if isinstance(t, Tensor) and t.is_floating_point()]
    if not floating:
        return
    ref_path, ref = floating[0]
    for path, t in floating[1:]:
        if t.dtype != ref.dtype:
            raise StructureError(
                f"{path} has dtype {t.dtype} but {ref_path} has dtype {ref.dtype}: the inner params, the outer "
                "params and every floating-point batch tensor must share one dtype (for mixed precision use "
                f"torch.autocast, not mixed inputs). Fix: {_cast_hint(path, ref.dtype)} (or cast everything to "
                f"{t.dtype} instead).")
        if t.device != ref.device:
            raise StructureError(
                f"{path} is on device {t.device} but {ref_path} is on device {ref.device}: the params and the "
                f"floating-point batch tensors must live on one device. Fix: {_move_hint(path, ref.device)}.")


def _root(path: str) -> str:
    return path.split("[", 1)[0].split("(", 1)[0]


def _cast_hint(path: str, dtype: torch.dtype) -> str:
    root = _root(path)
    if root in ("inner", "outer"):
        return f"cast the params with bilevel.tree.cast({root}, {dtype})"
    return f"cast that batch tensor with .to({dtype})"


def _move_hint(path: str, device: torch.device) -> str:
    root = _root(path)
    if root in ("inner", "outer"):
        return f"move the params with {{k: v.to({str(device)!r}) for k, v in {root}.items()}}"
    return f"move that batch tensor with .to({str(device)!r})"


def _check_finite(params: Params, name: str) -> None:
    for key, value in params.items():
        if not bool(torch.isfinite(value).all()):
            raise NonFiniteError(f"{name}[{key!r}] holds NaN or Inf before any step")


def validate_problem(problem: BilevelProblem, inner: Params, outer: Params, inner_batch: Batch,
                     outer_batch: Batch) -> None:
    """Check params, scalar and finite losses, and that every outer param reaches the inner loss.

    Outer params used by neither loss raise; outer params used by the outer loss only get a warning
    (their hypergradient is just ∇_φ F, with no path through the inner problem). Uses one autograd pass
    with ``allow_unused`` (torch.func would report unused inputs as zeros, indistinguishable from a
    zero gradient).
    """
    for params, name in ((inner, "inner"), (outer, "outer")):
        check_params(params, name)
        _check_finite(params, name)
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in outer.items()}
    theta = {k: v.detach() for k, v in inner.items()}
    with torch.enable_grad():
        g_value = problem.inner(theta, leaves, inner_batch)
        f_value = problem.outer(theta, leaves, outer_batch)
    for name, value in (("inner_loss", g_value), ("outer_loss", f_value)):
        if not bool(torch.isfinite(value)):
            raise NonFiniteError(f"{name} is {float(value.detach())} at the initial params (before inner step 0); check "
                                 "the batches and the initial inner/outer params for NaN/Inf, and the loss for log(0) "
                                 "or division by zero")
    keys = list(leaves)
    used_inner = _used(g_value, [leaves[k] for k in keys])
    used_outer = _used(f_value, [leaves[k] for k in keys])
    unused = [k for k, a, b in zip(keys, used_inner, used_outer) if not a and not b]
    if unused:
        raise StructureError(f"outer params {unused} are used by neither inner_loss nor outer_loss: their "
                             "hypergradient would be zero. Remove them from the outer params or use them.")
    outer_only = [k for k, a, b in zip(keys, used_inner, used_outer) if not a and b]
    if outer_only:
        warnings.warn(f"outer params {outer_only} are not used by inner_loss: their hypergradient is only the "
                      "direct term ∇_φF (no path through the inner problem). If they should shape the inner "
                      "problem, use them in inner_loss.", stacklevel=3)


def _used(value: torch.Tensor, leaves: list[torch.Tensor]) -> list[bool]:
    if not value.requires_grad:
        return [False] * len(leaves)
    grads = torch.autograd.grad(value, leaves, allow_unused=True, retain_graph=True)
    return [g is not None for g in grads]
