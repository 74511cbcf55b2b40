"""Second-order building blocks, each on two paths: torch.func and the plain autograd tape.

Notation: G(θ, φ) is the inner loss, H = ∂²G/∂θ² its Hessian in θ, and the mixed second derivative
∂²G/∂φ∂θ maps a θ-shaped vector v to the φ-shaped vector (∂²G/∂φ∂θ)ᵀ v = ∇_φ ⟨∇_θ G(θ, φ), v⟩.

The same products are computed on either path (:mod:`bilevel.paths`):

- torch.func: H v = ``jvp(grad(G))`` (forward-over-reverse) or ``vjp(grad(G))`` (reverse-over-reverse), the
  mixed term the ``vjp`` of φ ↦ ∇θG(θ, φ). The only path that runs inside ``vmap``/``grad``/``jvp``.
- autograd (:class:`TapeHessian`): ∇θG is recorded once with ``create_graph=True``; each H v and each
  (∂²G/∂φ∂θ)ᵀ v is one ``torch.autograd.grad`` through that graph (``retain_graph``), which is
  reverse-over-reverse with the gradient linearised once, like ``vjp(grad(G))``, without functorch's
  per-call wrapping. Forward-over-reverse uses ``torch.autograd.forward_ad``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor
from torch._C import _functorch
from torch.autograd import forward_ad
from torch.func import grad, jvp, vjp, vmap

from .paths import AUTOGRAD, FUNC, check_path, choose_path, forced_path, transforms_active
from .tree import Params
from .tree import detach as tree_detach

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
    """Whether ``err`` says an operator has no forward-mode derivative (torch words it several ways, e.g. "Trying
    to use forward AD with grid_sampler_2d that does not support it because it has not been implemented yet")."""
    msg = str(err).lower()
    return "forward" in msg and any(phrase in msg for phrase in (
        "not implemented", "not supported", "jvp", "not been implemented", "does not support"))


def _check_mode(mode: str) -> None:
    if mode not in HVP_MODES:
        raise ValueError(f"unknown hvp mode {mode!r}; valid: {HVP_MODES}")


# ---- the autograd tape ------------------------------------------------------------------------------------

def tape_leaves(params: Params, keep_tracked: bool = False) -> Params:
    """Tensors to differentiate with respect to on the tape: fresh leaves that require grad, holding ``params``'
    values; with ``keep_tracked`` a tensor that already requires grad is kept itself (so that a derivative
    taken with ``create_graph`` also flows back through its own history)."""
    return {k: v if keep_tracked and v.requires_grad else v.detach().requires_grad_(True) for k, v in params.items()}


def fill_none(found: Iterable[Optional[Tensor]], like: Params) -> Params:
    """``autograd.grad(..., allow_unused=True)`` results as a params dict, zeros where an input was unused."""
    return {k: g if g is not None else torch.zeros_like(v) for (k, v), g in zip(like.items(), found)}


def tape_value_and_grad(f: Callable[[Params], Tensor], theta: Params) -> tuple[Tensor, Params]:
    """f(θ) and ∇f(θ) on the tape, both detached (nothing differentiates through them)."""
    with torch.enable_grad():
        leaves = tape_leaves(theta)
        value = f(leaves)
        found = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
    return value.detach(), fill_none(found, theta)


def reaches_other_leaves(loss: Tensor, own: Any) -> bool:
    """True when ``loss``'s graph reaches a tensor that requires grad other than the ``own`` leaves.

    A walk over the recorded graph (a few µs for a small model), done when nothing the step was given
    requires grad: a tensor that the loss closes over may still do so, and must then be differentiated.
    """
    own_ids = {id(t) for t in own}
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf that requires grad
        if variable is not None and id(variable) not in own_ids:
            return True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


class TapeHessian:
    """H v and (∂²G/∂φ∂θ)ᵀ v at (θ, φ) on the autograd tape, with ∇θG(θ, φ) recorded once.

    Building it costs one gradient with ``create_graph=True`` (whose value, :attr:`gradient`, is ∇θG(θ, φ)
    itself); each :meth:`hvp` / :meth:`mixed_vjp` is one backward pass through that graph. :meth:`matmat`
    (many vectors at once, for a dense solve) and calls inside a torch.func transform use torch.func.

    Args:
        inner_loss: (θ, φ) ↦ G(θ, φ).
        theta, phi: the point; ``phi`` may be empty when only H is wanted.
        differentiable: grad mode is on for the caller: keep the products differentiable (``create_graph`` on
            every product, θ and φ that already require grad used themselves) when θ, φ, a vector or a tensor
            that G closes over requires grad; otherwise everything returned is detached.
    """

    def __init__(self, inner_loss: Callable[[Params, Params], Tensor], theta: Params, phi: Optional[Params] = None,
                 differentiable: bool = False) -> None:
        self.theta, self._may_differentiate = theta, differentiable
        self._inner_loss, self._phi, self._func = inner_loss, phi or {}, {}
        with torch.enable_grad():
            self.theta_leaves = tape_leaves(theta, keep_tracked=differentiable)
            self.phi_leaves = tape_leaves(phi or {}, keep_tracked=differentiable)
            value = inner_loss(self.theta_leaves, self.phi_leaves)
            # differentiable only where something outside requires grad (else the products are constants)
            own = [*self.theta_leaves.values(), *self.phi_leaves.values()]
            self.differentiable = differentiable = differentiable and (
                any(x.requires_grad for x in (*theta.values(), *(phi or {}).values()))
                or reaches_other_leaves(value, [x for x in own if x.is_leaf]))
            found = torch.autograd.grad(value, list(self.theta_leaves.values()), create_graph=True, allow_unused=True)
        grads = fill_none(found, theta)
        self.gradient = grads if differentiable else {k: g.detach() for k, g in grads.items()}
        # entries of ∇θG that depend on neither θ nor φ (G linear in a leaf, or the leaf unused) carry no graph
        # and contribute nothing to any second derivative
        self._keys = [k for k, g in grads.items() if g.requires_grad]
        self._outputs = [grads[k] for k in self._keys]

    def _backward(self, inputs: Params, v: Params) -> Params:
        if not self._outputs or not inputs:
            return {k: torch.zeros_like(x) for k, x in inputs.items()}
        # a vector that requires grad makes the product differentiable too (it is linear in v)
        graph = self.differentiable or (self._may_differentiate and any(x.requires_grad for x in v.values()))
        with torch.enable_grad():
            found = torch.autograd.grad(self._outputs, list(inputs.values()), grad_outputs=[v[k] for k in self._keys],
                                        retain_graph=True, create_graph=graph, allow_unused=True)
        out = {}
        for (k, x), g in zip(inputs.items(), found):
            g = g if g is not None else torch.zeros_like(x)
            out[k] = g if graph else g.detach()
        return out

    def hvp(self, v: Params) -> Params:
        """H v (inside a torch.func transform, e.g. a caller's ``vmap`` over vectors, by torch.func instead)."""
        if transforms_active():
            return self._func_vjp("theta")(v)[0]
        return self._backward(self.theta_leaves, v)

    __call__ = hvp

    def matmat(self, vectors: Params) -> Params:
        """H v for a batch of vectors (each leaf of shape (m, *leaf.shape)), by ``vmap`` over a torch.func
        linearisation of ∇θG (built once, one more gradient). A batched backward pass through the tape graph
        (``autograd.grad(is_grads_batched=True)``) gives the same numbers but expands every unbatched saved
        matrix across the batch: 2.5 s instead of 0.06 s for the 1000 columns of ridge d = 1000.

        Never differentiable, even with ``differentiable=True``: the linearisation is taken at detached θ and φ
        (its only users, the dense ``Exact`` solve and ``Nystrom``'s sampled columns, run where no derivative through
        the solve is taken)."""
        vjp_theta = self._func_vjp("theta")  # built outside the vmap, reused by every column
        return vmap(lambda v: vjp_theta(v)[0])(vectors)

    def mixed_vjp(self, v: Params) -> Params:
        """(∂²G/∂φ∂θ)ᵀ v = ∇_φ ⟨∇_θ G(θ, φ), v⟩."""
        if transforms_active():
            return self._func_vjp("phi")(v)[0]
        return self._backward(self.phi_leaves, v)

    def _func_vjp(self, wrt: str) -> Callable[[Params], tuple[Params]]:
        """The torch.func vjp of θ ↦ ∇θG(θ, φ) (``wrt="theta"``) or φ ↦ ∇θG(θ, φ) (``"phi"``) at the same point:
        the same maths where the tape cannot run (inside a transform) or is slow (batches of products). One more
        gradient; kept for reuse when built outside any transform (a linearisation made inside one is tied to it)."""
        if wrt in self._func:
            return self._func[wrt]
        theta, phi = tree_detach(self.theta), tree_detach(self._phi)
        grad_theta = grad(self._inner_loss, argnums=0)
        if wrt == "theta":
            linearised = vjp(lambda t: grad_theta(t, phi), theta)[1]
        else:
            linearised = vjp(lambda p: grad_theta(theta, p), phi)[1]
        if not transforms_active():
            self._func[wrt] = linearised
        return linearised


class TapeForwardOverReverse:
    """H v by forward-over-reverse on the tape (:func:`tape_hvp_fwdrev`), nothing kept between products; ``matmat``
    (a batch of vectors, for a dense solve) vmaps torch.func's ``jvp`` of ``grad`` instead (forward AD on the tape
    carries one tangent at a time)."""

    def __init__(self, f: Callable[[Params], Tensor], theta: Params) -> None:
        self.f, self.theta = f, theta

    def __call__(self, v: Params) -> Params:
        if transforms_active():
            return jvp(grad(self.f), (self.theta,), (v,))[1]
        return tape_hvp_fwdrev(self.f, self.theta, v)

    def matmat(self, vectors: Params) -> Params:
        grad_f, theta = grad(self.f), tree_detach(self.theta)
        return vmap(lambda v: jvp(grad_f, (theta,), (v,))[1])(vectors)


def tape_hvp_fwdrev(f: Callable[[Params], Tensor], theta: Params, v: Params) -> Params:
    """H v by forward-over-reverse on the tape: ∇f at the dual point θ + εv (``torch.autograd.forward_ad``);
    the tangent of the gradient is H v. One forward and one backward pass per product, nothing kept."""
    with forward_ad.dual_level(), torch.enable_grad():
        leaves = tape_leaves(theta)
        duals = {k: forward_ad.make_dual(x, v[k]) for k, x in leaves.items()}
        found = torch.autograd.grad(f(duals), list(leaves.values()), allow_unused=True)
        tangents = [None if g is None else forward_ad.unpack_dual(g).tangent for g in found]
    return {k: t.detach() if t is not None else torch.zeros_like(x) for (k, x), t in zip(theta.items(), tangents)}


# ---- public building blocks (both paths) ------------------------------------------------------------------

def _public_path(path: Optional[str], tensors: Iterable[Tensor]) -> str:
    """The path of a public building block: an explicit one, else :func:`~bilevel.paths.choose_path`, where
    ``auto`` runs the tape only under ``torch.no_grad()`` (with grad mode on, the product may be differentiated
    further, to any order, which torch.func does without recording graphs of products nobody uses)."""
    if path is not None:
        return check_path(path)
    chosen = choose_path(tensors)
    if chosen == AUTOGRAD and forced_path() == "auto" and torch.is_grad_enabled():
        return FUNC
    return chosen


def hvp(f: Callable[[Params], Tensor], theta: Params, v: Params, mode: str = "auto",
        path: Optional[str] = None) -> Params:
    """Hessian-vector product H v of the scalar function ``f`` at ``theta``.

    ``fwdrev`` is forward-over-reverse (``jvp`` of ``grad``); ``revrev`` is reverse-over-reverse
    (``vjp`` of ``grad``, using the symmetry of H); ``auto`` tries forward-over-reverse and falls back to
    reverse-over-reverse when an operator has no forward-mode derivative. ``path`` (None: automatic, see
    :func:`_public_path`) selects torch.func or the autograd tape; on the tape ``auto`` is reverse-over-reverse.
    """
    _check_mode(mode)
    if _public_path(path, [*theta.values(), *v.values()]) == AUTOGRAD:
        if mode == "fwdrev":
            return tape_hvp_fwdrev(f, theta, v)
        return TapeHessian(lambda t, _: f(t), theta, differentiable=torch.is_grad_enabled()).hvp(v)
    if mode in ("auto", "fwdrev"):
        try:
            return jvp(grad(f), (theta,), (v,))[1]
        except (RuntimeError, NotImplementedError) as err:
            if mode == "fwdrev" or not _forward_ad_missing(err):
                raise
    _, vjp_fn = vjp(grad(f), theta)
    return vjp_fn(v)[0]


def hvp_operator(f: Callable[[Params], Tensor], theta: Params, mode: str = "auto",
                 path: Optional[str] = None) -> Callable[[Params], Params]:
    """A matvec ``v -> H v`` at fixed ``theta`` for repeated use by a linear solver.

    ``revrev`` (and ``auto``) linearise ∇f once (``vjp`` on torch.func, a ``create_graph`` gradient on the
    tape) and reuse it for every product, so each product costs one backward pass of the gradient
    computation (no repeated forward pass). ``fwdrev`` recomputes the gradient per product (lower memory,
    useful when the stored graph is too large). The path is chosen once, when the operator is built.
    """
    _check_mode(mode)
    if _public_path(path, theta.values()) == AUTOGRAD:
        if mode == "fwdrev":
            return TapeForwardOverReverse(f, theta)
        return TapeHessian(lambda t, _: f(t), theta, differentiable=torch.is_grad_enabled())
    if mode == "fwdrev":
        grad_f = grad(f)
        return lambda v: jvp(grad_f, (theta,), (v,))[1]
    _, vjp_fn = vjp(grad(f), theta)
    return lambda v: vjp_fn(v)[0]


def mixed_vjp(inner_loss: Callable[[Params, Params], Tensor], theta: Params, phi: Params, v: Params,
              path: Optional[str] = None) -> Params:
    """(∂²G/∂φ∂θ)ᵀ v: the vjp of φ ↦ ∇_θ G(θ, φ) applied to v (``path`` as for :func:`hvp`)."""
    if _public_path(path, [*theta.values(), *phi.values(), *v.values()]) == AUTOGRAD:
        return TapeHessian(inner_loss, theta, phi, differentiable=torch.is_grad_enabled()).mixed_vjp(v)
    _, vjp_fn = vjp(lambda p: grad(inner_loss, argnums=0)(theta, p), phi)
    return vjp_fn(v)[0]


def value_and_grads(f: Callable[[Params, Params], Tensor], theta: Params, phi: Params, path: str = FUNC
                    ) -> tuple[Tensor, Params, Params]:
    """F(θ, φ), ∇_θ F and ∇_φ F in one reverse pass (on the tape: detached, nothing differentiates through them)."""
    if check_path(path) == AUTOGRAD:
        with torch.enable_grad():
            t, p = tape_leaves(theta), tape_leaves(phi)
            value = f(t, p)
            found = torch.autograd.grad(value, [*t.values(), *p.values()], allow_unused=True)
        return value.detach(), fill_none(found[:len(t)], theta), fill_none(found[len(t):], phi)
    (g_theta, g_phi), value = torch.func.grad_and_value(f, argnums=(0, 1))(theta, phi)
    return value, g_theta, g_phi
