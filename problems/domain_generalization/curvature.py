"""Head gradients and curvature without forming the Hessian (Hemati et al., ICCV 2023, Sec. 4).

For a domain e with features Z_e and labels Y_e, L_e(θ) is the head loss (Eq. 1), g_e = ∇_θ L_e and
H_e = ∇²_θ L_e, θ = (W, b) the linear head.

- HGP, Eq. 21:  H_e g_e = ‖g_e‖ ∇_θ ‖g_e‖, since ∇_θ‖g‖ = H g / ‖g‖. Two backward passes, no H.
  We use n(θ) = sqrt(‖g‖² + ε²) instead of ‖g‖: then ∇n = H g / n and n ∇n = H g *exactly* for any ε,
  while n stays differentiable at g = 0 (the authors add 1e-16 to the norm, which is not exact).
- HGP by a direct HVP: ``bilevel.hvp(L_e, θ, g_e)`` (forward-over-reverse), with g_e not detached so
  that the outer gradient also flows through the vector.
- Hutchinson, Eq. 22: diag(H_e) = E_r[r ⊙ H_e r], r Rademacher; the sample mean over S probes, the
  S products vmapped over one linearisation of ∇L_e.

Every function is written with torch.func, so it can sit inside ``torch.func.grad`` of the training
objective: the penalty gradient then reaches both the head (third derivatives) and the featurizer (via Z).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, hessian, vjp, vmap

import bilevel
from bilevel import tree
from bilevel.tree import Params

from .model import head_loss

HGP_MODES = ("identity", "hvp")


def head_grad(head: Params, z: Tensor, y: Tensor) -> Params:
    """g_e = ∇_θ L_e(θ) (kept differentiable)."""
    return grad(head_loss)(head, z, y)


def hgp_identity(head: Params, z: Tensor, y: Tensor, eps: float = 1e-12) -> Params:
    """H_e g_e = n ∇_θ n with n = sqrt(‖g_e‖² + ε²) (Eq. 21; exact for every ε, see module doc)."""
    def smooth_norm(h: Params) -> Tensor:
        g = grad(head_loss)(h, z, y)
        return torch.sqrt(tree.dot(g, g) + eps ** 2)

    dn, n = grad_and_value(smooth_norm)(head)
    return tree.scale(dn, n)


def hgp_hvp(head: Params, z: Tensor, y: Tensor) -> Params:
    """H_e g_e by one Hessian-vector product (``bilevel.hvp``) with v = g_e."""
    g = head_grad(head, z, y)
    return bilevel.hvp(lambda h: head_loss(h, z, y), head, g)


def hessian_gradient_product(head: Params, z: Tensor, y: Tensor, mode: str = "identity") -> Params:
    """H_e g_e by ``mode`` ('identity' = Eq. 21, 'hvp' = direct HVP)."""
    if mode == "identity":
        return hgp_identity(head, z, y)
    if mode == "hvp":
        return hgp_hvp(head, z, y)
    raise ValueError(f"unknown HGP mode {mode!r}; valid: {HGP_MODES}")


def rademacher_probes(like: Params, num: int, generator: torch.Generator) -> Params:
    """``num`` Rademacher vectors shaped like ``like`` (leading dim ``num``), entries ±1 with prob ½."""
    if num < 1:
        raise ValueError(f"Hutchinson needs at least 1 probe, got probes={num}")
    return {k: (2 * torch.randint(0, 2, (num, *v.shape), generator=generator) - 1).to(v.dtype).to(v.device)
            for k, v in like.items()}


def hutchinson_diagonal(head: Params, z: Tensor, y: Tensor, probes: Params) -> Params:
    """D̂_e = (1/S) Σ_s r_s ⊙ H_e r_s (Eq. 22). ∇L_e is linearised once (``vjp``) and the S
    reverse-over-reverse products H r_s = vjp(r_s) are vmapped (H symmetric)."""
    _, vjp_fn = vjp(grad(lambda h: head_loss(h, z, y)), head)
    hr = vmap(lambda r: vjp_fn(r)[0])(probes)
    return {k: (probes[k] * hr[k]).mean(0) for k in head}


def exact_head_hessian(head: Params, z: Tensor, y: Tensor) -> Tensor:
    """The dense head Hessian H_e (dim θ × dim θ, in ``tree.flatten`` order): tests and dynamics plots."""
    flat = tree.flatten(head)

    def f(v: Tensor) -> Tensor:
        return head_loss(tree.unflatten(v, head), z, y)

    return hessian(f)(flat)


def binary_head_hessian(head: Params, z: Tensor) -> Tensor:
    """Closed-form Hessian of the BCE head loss for a single-logit head (Prop. 4's sigmoid case):
    H = (1/N) Σ_i σ'(a_i) [z_i; 1][z_i; 1]ᵀ, in ``tree.flatten`` order (weight, then bias). Labels drop out.
    Used for the Hessian-distance dynamics (Figs. 3-4), where forming H by autodiff each step is too slow."""
    if head["weight"].shape[0] != 1:
        raise ValueError(f"binary_head_hessian needs a single-logit head, got {head['weight'].shape[0]} outputs")
    a = z @ head["weight"][0] + head["bias"][0]
    s = torch.sigmoid(a) * torch.sigmoid(-a)
    za = torch.cat([z, torch.ones_like(z[:, :1])], 1)
    return (za * s[:, None]).T @ za / len(z)
