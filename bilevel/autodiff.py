"""Second-order building blocks on torch.func (no tape, no ``.backward()``).

Notation: G(θ, φ) is the inner loss, H = ∂²G/∂θ² its Hessian in θ, and the mixed second derivative
∂²G/∂φ∂θ maps a θ-shaped vector v to the φ-shaped vector (∂²G/∂φ∂θ)ᵀ v = ∇_φ ⟨∇_θ G(θ, φ), v⟩.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor
from torch._C import _functorch
from torch.func import grad, jvp, vjp

from .tree import Params

HVP_MODES = ("auto", "fwdrev", "revrev")


def is_batched(t: Tensor) -> bool:
    """True when ``t`` is (or wraps) a tensor batched by ``torch.func.vmap``.

    Under vmap, data-dependent Python control flow (``if residual < tol``) is impossible, so iterative
    solvers run their full iteration budget and skip host-side checks.
    """
    while _functorch.is_functorch_wrapped_tensor(t):
        if _functorch.is_batchedtensor(t):
            return True
        t = _functorch.get_unwrapped(t)
    return False


def any_batched(tensors: Iterable[Tensor]) -> bool:
    """True when any tensor in ``tensors`` is vmap-batched."""
    return any(is_batched(t) for t in tensors)


def _forward_ad_missing(err: Exception) -> bool:
    msg = str(err).lower()
    return "forward" in msg and ("not implemented" in msg or "not supported" in msg or "jvp" in msg)


def hvp(f: Callable[[Params], Tensor], theta: Params, v: Params, mode: str = "auto") -> Params:
    """Hessian-vector product H v of the scalar function ``f`` at ``theta``.

    ``fwdrev`` is forward-over-reverse (``jvp`` of ``grad``); ``revrev`` is reverse-over-reverse
    (``vjp`` of ``grad``, using the symmetry of H); ``auto`` tries forward-over-reverse and falls back to
    reverse-over-reverse when an operator has no forward-mode derivative.
    """
    if mode not in HVP_MODES:
        raise ValueError(f"unknown hvp mode {mode!r}; valid: {HVP_MODES}")
    if mode in ("auto", "fwdrev"):
        try:
            return jvp(grad(f), (theta,), (v,))[1]
        except (RuntimeError, NotImplementedError) as err:
            if mode == "fwdrev" or not _forward_ad_missing(err):
                raise
    _, vjp_fn = vjp(grad(f), theta)
    return vjp_fn(v)[0]


def hvp_operator(f: Callable[[Params], Tensor], theta: Params, mode: str = "auto") -> Callable[[Params], Params]:
    """A matvec ``v -> H v`` at fixed ``theta`` for repeated use by a linear solver.

    ``revrev`` (and ``auto``) linearise ∇f once with ``vjp`` and reuse that graph for every product, so
    each product costs one backward pass of the gradient computation (no repeated forward pass).
    ``fwdrev`` recomputes ``jvp(grad(f))`` per product (lower memory, useful when the stored graph is
    too large).
    """
    if mode not in HVP_MODES:
        raise ValueError(f"unknown hvp mode {mode!r}; valid: {HVP_MODES}")
    if mode == "fwdrev":
        grad_f = grad(f)
        return lambda v: jvp(grad_f, (theta,), (v,))[1]
    _, vjp_fn = vjp(grad(f), theta)
    return lambda v: vjp_fn(v)[0]


def mixed_vjp(inner_loss: Callable[[Params, Params], Tensor], theta: Params, phi: Params, v: Params) -> Params:
    """(∂²G/∂φ∂θ)ᵀ v: the vjp of φ ↦ ∇_θ G(θ, φ) applied to v."""
    _, vjp_fn = vjp(lambda p: grad(inner_loss, argnums=0)(theta, p), phi)
    return vjp_fn(v)[0]




def value_and_grads(f: Callable[[Params, Params], Tensor], theta: Params, phi: Params
                    ) -> tuple[Tensor, Params, Params]:
    """F(θ, φ), ∇_θ F and ∇_φ F in one reverse pass."""
    (g_theta, g_phi), value = torch.func.grad_and_value(f, argnums=(0, 1))(theta, phi)
    return value, g_theta, g_phi
