"""Domain-alignment penalties on the classifier head, one function each, all pure torch.func code.

Inputs: the head θ = (W, b), per-domain features ``zs[e]`` (N_e × h) and labels ``ys[e]``. Outputs a scalar
that the training objective adds with a weight (see ``algorithms.py``). Notation as in Hemati et al.
(ICCV 2023): L_e head loss, g_e = ∇_θ L_e, H_e = ∇²_θ L_e, n = number of domains.

- IRM (IRMv1, Arjovsky et al. 2019):  (1/n) Σ_e ‖∇_{w|w=1} L_e(w · a)‖²  with a the logits.
- V-REx (Krueger et al. 2021):        Var_e(L_e), population variance (DomainBed's ``VREx``).
- CORAL (Sun & Saenko 2016; DomainBed): mean over domain pairs of mean_{jk}(μ_i − μ_j)² + mean_{jk}(C_i − C_j)²,
  C the unbiased feature covariance.
- Fishr (Rame et al. 2022, Eq. 4):    (1/n) Σ_e ‖v_e − v̄‖², v_e the variance over samples of per-sample
  head gradients (vmapped), v̄ = mean_e v_e.
- HGP (Eq. 18–20):                     (1/n) Σ_e [α‖H_e g_e − r_q‖² + β‖g_e − r_g‖²].
- Hutchinson (Eq. 22–23):              (1/n) Σ_e [α‖D̂_e − r_D‖² + β‖g_e − r_g‖²].

Engineering choices for HGP/Hutchinson (the paper's Eq. 18/23 leave the scope of Σ_e unclear):
``reference="mean"`` (default, the paper's Eq. 19–20): r = mean_e of the per-domain quantity, not detached;
``reference="pooled"`` (the authors' code): r = the same quantity of the mean loss L̄ = mean_e L_e, detached
(for HGP H̄ḡ, which differs from mean_e H_e g_e). ``reduction="mean"`` averages the per-domain terms
(the natural reading of Eq. 18), ``"sum"`` sums them (the authors' Colored MNIST scripts).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.func import grad, vjp, vmap

from bilevel import hvp, tree
from bilevel.tree import Params

from .curvature import head_grad, hessian_gradient_product, hutchinson_diagonal
from .model import head_loss, logits, loss_from_logits

REFERENCES = ("mean", "pooled")
REDUCTIONS = ("mean", "sum")


def _sqdist(a: Params, b: Params) -> Tensor:
    d = tree.sub(a, b)
    return tree.dot(d, d)


def _mean(trees: Sequence[Params]) -> Params:
    return {k: torch.stack([t[k] for t in trees]).mean(0) for k in trees[0]}


def _reduce(terms: list[Tensor], reduction: str) -> Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid: {REDUCTIONS}")
    total = torch.stack(terms).sum()
    return total / len(terms) if reduction == "mean" else total


def irm(head: Params, zs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """IRMv1: mean_e ‖∂/∂w L_e(w·a)|_{w=1}‖² (a dummy scalar classifier w on the logits)."""
    terms = []
    for z, y in zip(zs, ys):
        a = logits(head, z)
        dw = grad(lambda w: loss_from_logits(a * w, y))(torch.ones((), dtype=a.dtype, device=a.device))
        terms.append(dw ** 2)
    return torch.stack(terms).mean()


def vrex(head: Params, zs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """V-REx: population variance of the domain losses."""
    losses = torch.stack([head_loss(head, z, y) for z, y in zip(zs, ys)])
    return ((losses - losses.mean()) ** 2).mean()


def coral(zs: Sequence[Tensor]) -> Tensor:
    """CORAL (DomainBed form): mean over pairs of squared mean and covariance differences of features."""
    if len(zs) < 2:
        raise ValueError("CORAL needs at least 2 training domains")
    stats = []
    for z in zs:
        mu = z.mean(0, keepdim=True)
        c = z - mu
        stats.append((mu, c.T @ c / (len(z) - 1)))
    terms = [((stats[i][0] - stats[j][0]) ** 2).mean() + ((stats[i][1] - stats[j][1]) ** 2).mean()
             for i in range(len(zs)) for j in range(i + 1, len(zs))]
    return torch.stack(terms).mean()


def per_sample_head_grads(head: Params, z: Tensor, y: Tensor) -> Params:
    """∇_θ ℓ(h_θ(z_i), y_i) for every sample i (vmap of grad), leading dim N."""
    def one(zi: Tensor, yi: Tensor) -> Params:
        return grad(head_loss)(head, zi[None], yi[None])

    return vmap(one)(z, y)


def fishr(head: Params, zs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """Fishr: mean_e ‖v_e − v̄‖², v_e = Var_i[∇_θ ℓ_i] over the samples of domain e (population variance)."""
    variances = []
    for z, y in zip(zs, ys):
        g = per_sample_head_grads(head, z, y)
        variances.append({k: ((v - v.mean(0)) ** 2).mean(0) for k, v in g.items()})
    vbar = _mean(variances)
    return torch.stack([_sqdist(v, vbar) for v in variances]).mean()


def _mean_loss_head(zs: Sequence[Tensor], ys: Sequence[Tensor]):
    """L̄(θ) = mean_e L_e(θ), the loss whose quantities the authors' code uses as references."""
    def lbar(h: Params) -> Tensor:
        return torch.stack([head_loss(h, z, y) for z, y in zip(zs, ys)]).mean()
    return lbar


def hgp(head: Params, zs: Sequence[Tensor], ys: Sequence[Tensor], alpha: float, beta: float,
        mode: str = "identity", reference: str = "mean", reduction: str = "mean") -> Tensor:
    """HGP penalty (Eq. 18): α‖H_e g_e − r_q‖² + β‖g_e − r_g‖², reduced over domains."""
    gs = [head_grad(head, z, y) for z, y in zip(zs, ys)]
    qs = [hessian_gradient_product(head, z, y, mode) if alpha != 0 else None for z, y in zip(zs, ys)]
    if reference == "mean":
        g_ref = _mean(gs)
        q_ref = _mean(qs) if alpha != 0 else None
    elif reference == "pooled":
        lbar = _mean_loss_head(zs, ys)
        g_ref = tree.detach(grad(lbar)(head))
        q_ref = tree.detach(_pooled_hgp(lbar, head)) if alpha != 0 else None
    else:
        raise ValueError(f"unknown reference {reference!r}; valid: {REFERENCES}")
    return _alignment(gs, g_ref, qs, q_ref, alpha, beta, reduction)


def _pooled_hgp(lbar, head: Params) -> Params:
    return hvp(lbar, head, grad(lbar)(head))


def hutchinson(head: Params, zs: Sequence[Tensor], ys: Sequence[Tensor], alpha: float, beta: float,
               probes: Sequence[Params], reference: str = "mean", reduction: str = "mean",
               reference_probes: Optional[Params] = None) -> Tensor:
    """Hutchinson penalty (Eq. 23): α‖D̂_e − r_D‖² + β‖g_e − r_g‖², D̂_e from ``probes[e]`` (S Rademacher
    vectors per domain); with ``reference="pooled"`` r_D is the estimate for L̄ from ``reference_probes``."""
    if len(probes) != len(zs):
        raise ValueError(f"Hutchinson needs one probe set per domain: {len(probes)} sets for {len(zs)} domains")
    gs = [head_grad(head, z, y) for z, y in zip(zs, ys)]
    ds = [hutchinson_diagonal(head, z, y, p) if alpha != 0 else None for z, y, p in zip(zs, ys, probes)]
    if reference == "mean":
        g_ref = _mean(gs)
        d_ref = _mean(ds) if alpha != 0 else None
    elif reference == "pooled":
        if alpha != 0 and reference_probes is None:
            raise ValueError("reference='pooled' needs reference_probes for the mean-loss diagonal")
        lbar = _mean_loss_head(zs, ys)
        g_ref = tree.detach(grad(lbar)(head))
        d_ref = tree.detach(_pooled_diag(lbar, head, reference_probes)) if alpha != 0 else None
    else:
        raise ValueError(f"unknown reference {reference!r}; valid: {REFERENCES}")
    return _alignment(gs, g_ref, ds, d_ref, alpha, beta, reduction)


def _alignment(gs, g_ref, curvatures, curvature_ref, alpha: float, beta: float, reduction: str) -> Tensor:
    """Σ_e (or mean over e) of β‖g_e − g_ref‖² + α‖c_e − c_ref‖², c = Hg (HGP) or diag H (Hutchinson)."""
    terms = []
    for g, c in zip(gs, curvatures):
        t = beta * _sqdist(g, g_ref)
        if alpha != 0:
            t = t + alpha * _sqdist(c, curvature_ref)
        terms.append(t)
    return _reduce(terms, reduction)


def _pooled_diag(lbar, head: Params, probes: Params) -> Params:
    _, vjp_fn = vjp(grad(lbar), head)
    hr = vmap(lambda r: vjp_fn(r)[0])(probes)
    return {k: (probes[k] * hr[k]).mean(0) for k in head}
