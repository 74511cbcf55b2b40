"""The algorithm registry and the regularised training objective shared by all algorithms.

    R(φ, t) = (1/n) Σ_e L_e(φ) + λ(t) · P(θ_head, {g(X_e)}, {Y_e}) + ρ Σ_W ‖W‖²            (DomainBed / IRM form)
    λ(t) = λ_warm for t < t_anneal, λ for t ≥ t_anneal;  R ← R / λ(t) after annealing if λ > 1 (the IRM trick)

φ are all network parameters, P the algorithm's penalty (``penalties.py``, on the head only), ρ an explicit L2
weight on the weight matrices (the IRM Colored MNIST code; the runner's optimiser has no weight decay). For
HGP and Hutchinson the paper's α and β multiply the two parts of P and λ(t) multiplies both, so the IRM
protocol "α = β jump from 1 to 91257.18 at step 190" is α = β = 1 with λ_warm = 1, λ = 91257.18.
The gradient ∇_φ R is taken with ``torch.func.grad`` over the whole parameter dict: the penalty gradient
reaches the featurizer through the features (paper Sec. 4, authors' code).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from bilevel.tree import Params

from . import penalties
from .curvature import rademacher_probes
from .model import DGNet, accuracy, features, logits, loss_from_logits, split


@dataclass(frozen=True)
class Algorithm:
    """One entry of the registry: a name, a penalty builder and whether it needs Hutchinson probes."""

    name: str
    penalty: Optional[Callable[..., Tensor]]   # (head, zs, ys, hp, probes) -> scalar; None for ERM
    needs_probes: bool = False
    doc: str = ""


def _irm(head, zs, ys, hp, probes):
    return penalties.irm(head, zs, ys)


def _vrex(head, zs, ys, hp, probes):
    return penalties.vrex(head, zs, ys)


def _coral(head, zs, ys, hp, probes):
    return penalties.coral(zs)


def _fishr(head, zs, ys, hp, probes):
    return penalties.fishr(head, zs, ys)


def _hgp(head, zs, ys, hp, probes):
    return penalties.hgp(head, zs, ys, alpha=hp["alpha"], beta=hp["beta"], mode=hp["hgp_mode"],
                         reference=hp["reference"], reduction=hp["reduction"])


def _hutchinson(head, zs, ys, hp, probes):
    per_domain, ref = probes
    return penalties.hutchinson(head, zs, ys, alpha=hp["alpha"], beta=hp["beta"], probes=per_domain,
                                reference=hp["reference"], reduction=hp["reduction"], reference_probes=ref)


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("erm", None, doc="empirical risk minimisation (mean of domain losses)"),
    Algorithm("irm", _irm, doc="IRMv1 gradient penalty on a dummy logit scale"),
    Algorithm("vrex", _vrex, doc="variance of domain risks"),
    Algorithm("coral", _coral, doc="feature mean and covariance matching"),
    Algorithm("fishr", _fishr, doc="variance of per-sample head gradients matched across domains"),
    Algorithm("hgp", _hgp, doc="Hessian-gradient product + gradient alignment (Eq. 18)"),
    Algorithm("hutchinson", _hutchinson, needs_probes=True, doc="Hutchinson Hessian-diagonal + gradient alignment (Eq. 23)"),
)}


def get_algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise KeyError(f"unknown domain-generalisation algorithm {name!r}; valid: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def penalty_weight(step: int, hp: dict[str, Any]) -> float:
    """λ(t): ``warmup_weight`` before ``anneal_step``, ``penalty_weight`` from it on."""
    return hp["penalty_weight"] if step >= hp["anneal_step"] else hp["warmup_weight"]


def draw_probes(algorithm: Algorithm, head: Params, num_domains: int, hp: dict[str, Any],
                generator: torch.Generator):
    """Rademacher probes for Hutchinson: one set of S per domain (+ one for a pooled reference)."""
    if not algorithm.needs_probes:
        return None
    per_domain = [rademacher_probes(head, hp["probes"], generator) for _ in range(num_domains)]
    ref = rademacher_probes(head, hp["probes"], generator) if hp["reference"] == "pooled" else None
    return per_domain, ref


def objective(params: Params, net: DGNet, batches: Sequence[tuple[Tensor, Tensor]], algorithm: Algorithm,
              hp: dict[str, Any], step: int, probes=None) -> tuple[Tensor, dict[str, Tensor]]:
    """R(φ, t) of the module docstring, and detached metrics (nll, penalty, train accuracy)."""
    feat, head = split(params)
    zs = [features(net, feat, x) for x, _ in batches]
    ys = [y for _, y in batches]
    nlls, accs = [], []
    for z, y in zip(zs, ys):
        a = logits(head, z)
        nlls.append(loss_from_logits(a, y))
        accs.append(accuracy(a, y))
    nll = torch.stack(nlls).mean()
    weight = penalty_weight(step, hp)
    loss = nll
    pen = torch.zeros((), dtype=nll.dtype, device=nll.device)
    if algorithm.penalty is not None and weight != 0:
        pen = algorithm.penalty(head, zs, ys, hp, probes)
        loss = loss + weight * pen
    if hp["l2_weight"]:
        loss = loss + hp["l2_weight"] * sum((v ** 2).sum() for k, v in params.items() if k.endswith("weight"))
    if hp["rescale_after_anneal"] and weight > 1.0:
        loss = loss / weight
    metrics = {"nll": nll.detach(), "penalty": pen.detach(), "train_acc": torch.stack(accs).mean().detach()}
    return loss, metrics
