"""Two paths, one maths: which autodiff machinery runs a computation, the autograd tape or torch.func.

torch.func makes composition possible (``vmap`` over tasks, ``grad``/``jvp`` through a hypergradient), but
outside any transform a ``torch.func.grad`` call pays functorch's per-call wrapping: an inner gradient
step costs up to 2× a plain ``torch.autograd.grad`` step on small models. So every computation that can
run on either machinery (the inner loop, Hessian-vector products, the mixed term, unrolling) computes
the same maths on one of two paths:

- ``"autograd"``: plain autograd (``torch.autograd.grad``, ``create_graph`` only where a derivative through
  the step is needed, no in-place updates on tracked tensors, ``torch.autograd.forward_ad`` for forward mode);
- ``"func"``: torch.func (``grad``, ``vjp``, ``jvp``, ``vmap``), the only machinery that runs inside transforms.

The choice is automatic (:func:`choose_path`): ``"func"`` when a torch.func transform is active around
the call (``vmap``, ``grad``, ``vjp``, ``jvp``, ``jacrev``, ``hessian`` ...), when a
``torch.autograd.forward_ad`` dual level is open, or when the params are functorch-wrapped tensors;
``"autograd"`` otherwise. It can be forced for a block of code with :func:`autodiff_path`, and every
solver reports the path it ran as ``diagnostics["autodiff_path"]``. A test holds both paths to the same
numbers (float64, relative difference ≤ 1e-12) for every registered solver on the oracles.

The functorch interpreter stack is a private torch API (``torch._C._functorch``); :func:`transforms_active`
is the one place here that reads it (as :func:`bilevel.transforms.active_transforms` is for detection of
differentiation).
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterable, Iterator, Optional

from torch import Tensor
from torch._C import _functorch
from torch.autograd import forward_ad

from .errors import BilevelError

PATHS = ("auto", "autograd", "func")
AUTOGRAD, FUNC = "autograd", "func"

_FORCED: contextvars.ContextVar[str] = contextvars.ContextVar("bilevel_autodiff_path", default="auto")


class AutodiffPathError(BilevelError, RuntimeError):
    """The forced autodiff path cannot run here (the autograd tape inside a torch.func transform)."""


@contextlib.contextmanager
def autodiff_path(path: str) -> Iterator[None]:
    """Force the autodiff path of every bilevel computation in the block: ``"auto"``, ``"autograd"`` or ``"func"``.

    ``"func"`` runs torch.func everywhere (what the library did before the autograd path existed);
    ``"autograd"`` runs the tape wherever the library has a tape implementation, and raises
    :class:`AutodiffPathError` inside a torch.func transform, where the tape cannot run. ``"auto"``
    (the default) restores the automatic choice. Blocks nest; the setting is per thread / asyncio task.

    Example::

        with bilevel.autodiff_path("func"):
            result = bilevel.hypergrad(problem, inner, outer, inner_batch=b, outer_batch=v, solver="cg")
        assert result.diagnostics["autodiff_path"] == "func"
    """
    if path not in PATHS:
        raise ValueError(f"autodiff_path must be one of {PATHS}, got {path!r}")
    token = _FORCED.set(path)
    try:
        yield
    finally:
        _FORCED.reset(token)


def forced_path() -> str:
    """The path forced by the innermost :func:`autodiff_path` block (``"auto"`` when none is)."""
    return _FORCED.get()


def transforms_active() -> bool:
    """True when a torch.func transform (grad, vjp, jvp, vmap, jacrev, jacfwd, hessian ...) is active."""
    return _functorch.peek_interpreter_stack() is not None


def forward_ad_active() -> bool:
    """True inside a ``torch.autograd.forward_ad.dual_level()`` block."""
    return forward_ad._current_level >= 0


def _wrapped(tensors: Iterable[Tensor]) -> bool:
    return any(_functorch.is_functorch_wrapped_tensor(t) for t in tensors if isinstance(t, Tensor))


def tape_blocker(tensors: Iterable[Tensor] = ()) -> Optional[str]:
    """Why the autograd tape cannot (or, for forward AD, should not) run here, or None when it can."""
    if transforms_active():
        return "a torch.func transform is active around the call"
    if _wrapped(tensors):
        return "the params are torch.func-wrapped (batched or transformed) tensors"
    if forward_ad_active():
        return "a torch.autograd.forward_ad dual level is open"
    return None


def choose_path(tensors: Iterable[Tensor] = (), prefer: str = AUTOGRAD) -> str:
    """``"autograd"`` or ``"func"`` for a computation about to run on ``tensors`` (e.g. the inner and outer params).

    Args:
        tensors: tensors the computation starts from; functorch-wrapped ones mean ``"func"``.
        prefer: the path ``"auto"`` picks where the tape can run (``"func"`` for a solver whose torch.func
            implementation is the faster one there, e.g. forward mode over many tangent directions).

    Raises:
        AutodiffPathError: ``"autograd"`` is forced where the tape cannot run.
    """
    forced = _FORCED.get()
    if forced == FUNC:
        return FUNC
    blocker = tape_blocker(tensors)
    if forced == AUTOGRAD:
        if blocker is not None:
            raise AutodiffPathError(
                f"bilevel.autodiff_path('autograd') is forced, but {blocker}, and the autograd tape cannot run "
                "there (torch.func refuses requires_grad_ and torch.autograd.grad inside its transforms). Leave the "
                "transform out of the forced block, or use autodiff_path('auto') (the default picks torch.func "
                "there) or autodiff_path('func').")
        return AUTOGRAD
    return FUNC if blocker is not None else prefer


def check_path(path: str) -> str:
    """``path`` itself when it is ``"autograd"`` or ``"func"`` (an explicit choice passed down by a solver)."""
    if path not in (AUTOGRAD, FUNC):
        raise ValueError(f"path must be 'autograd' or 'func' (or None for the automatic choice), got {path!r}")
    return path
