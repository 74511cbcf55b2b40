"""Hand-designed noise-robust classification losses: the baselines of ARL's Tables 3.1/3.2.

The ARL chapter of B. Gao's PhD thesis (Gao, Gouk, Hospedales, "Searching for Robustness: Loss Learning
for Noisy Classification Tasks", ICCV 2021) compares its learned loss against these plug-in losses.
Every function here has the signature ``loss(logits, targets) -> scalar`` (mean over the batch), where
``logits`` is ``(N, C)`` and ``targets`` is an ``(N,)`` int64 tensor of (possibly noisy) labels, so that
any of them drops into the same training harness as cross-entropy. With p = softmax(z), y the label:

    CE         −log p_y
    MAE        Σ_k |p_k − 1[k=y]| = 2(1 − p_y)                        Ghosh et al., AAAI 2017
    GCE        (1 − p_y^q)/q,  q = 0.7                                 Zhang & Sabuncu, NeurIPS 2018, eq. 6
    SCE        α CE + β RCE,   RCE = −Σ_k p_k log t_k = −A(1 − p_y),  Wang et al., ICCV 2019, eq. 8
               with log 0 clipped to A = −4, α = 0.1, β = 1
    LS         −Σ_k t_k log p_k,  t = (1 − ε) onehot + ε/C, ε = 0.1   Pereyra et al. 2017 / Szegedy et al. 2016
    Bootstrap  −Σ_k (β onehot_k + (1 − β) p_k) log p_k,  β = 0.95    Reed et al. 2015 ("soft" variant)
    NCE+MAE    α (−log p_y)/(−Σ_k log p_k) + β (1 − p_y),  α = β = 1  Ma et al., ICML 2020, eq. 3 + APL
    NFL+MAE    α FL_y/Σ_k FL_k + β (1 − p_y),  FL_k = −(1 − p_k)^γ log p_k, γ = 0.5   Ma et al. 2020
    Huber      Σ_k huber_δ(p_k − onehot_k), δ = 1 on probabilities    (Hastie et al.; used in ARL's tables)

Explicit choices (the papers differ or are silent):
- Bootstrapping keeps the gradient through the (1 − β) p target term: Reed et al. define the soft loss
  as a function of the prediction q alone, so the target is part of the loss, not a constant.
- Inside the active–passive losses (NCE+MAE, NFL+MAE) "MAE" is ``1 − p_y`` as in Ma et al.'s code,
  i.e. half of the stand-alone MAE; scaling only rescales β.
"""
from __future__ import annotations

import inspect
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor, Tensor], Tensor]


def _check(logits: Tensor, targets: Tensor, name: str) -> None:
    if logits.dim() != 2:
        raise ValueError(f"{name}: logits must be (batch, classes), got shape {tuple(logits.shape)}; "
                         "flatten the model output first")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"{name}: targets must be a 1-D tensor of {logits.shape[0]} int labels, got shape "
                         f"{tuple(targets.shape)}; pass class indices, not one-hot vectors")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: targets must be int64 class indices, got {targets.dtype}; use targets.long()")


def _true_class(values: Tensor, targets: Tensor) -> Tensor:
    return values.gather(1, targets.long().unsqueeze(1)).squeeze(1)


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """CE = −log p_y, batch mean."""
    _check(logits, targets, "cross_entropy")
    return F.cross_entropy(logits, targets.long())


def mae(logits: Tensor, targets: Tensor) -> Tensor:
    """MAE = ‖p − onehot(y)‖₁ = 2(1 − p_y) (Ghosh et al. 2017), batch mean."""
    _check(logits, targets, "mae")
    p = logits.softmax(-1)
    return (2.0 * (1.0 - _true_class(p, targets))).mean()


def gce(logits: Tensor, targets: Tensor, q: float = 0.7) -> Tensor:
    """Generalised CE (1 − p_y^q)/q (Zhang & Sabuncu 2018, eq. 6); q → 0 gives CE, q = 1 gives MAE/2."""
    _check(logits, targets, "gce")
    if not 0 < q <= 1:
        raise ValueError(f"gce: q must be in (0, 1], got {q}")
    p_y = _true_class(logits.softmax(-1), targets)
    return ((1.0 - p_y.pow(q)) / q).mean()


def sce(logits: Tensor, targets: Tensor, alpha: float = 0.1, beta: float = 1.0, log_zero: float = -4.0) -> Tensor:
    """Symmetric CE α CE + β RCE (Wang et al. 2019, eq. 8); RCE = −A(1 − p_y) with log 0 := A = −4."""
    _check(logits, targets, "sce")
    p_y = _true_class(logits.softmax(-1), targets)
    rce = -log_zero * (1.0 - p_y)
    return alpha * F.cross_entropy(logits, targets.long()) + beta * rce.mean()


def label_smoothing(logits: Tensor, targets: Tensor, epsilon: float = 0.1) -> Tensor:
    """CE against t = (1 − ε) onehot + ε/C."""
    _check(logits, targets, "label_smoothing")
    c = logits.shape[1]
    t = (1 - epsilon) * F.one_hot(targets.long(), c).to(logits.dtype) + epsilon / c
    return -(t * logits.log_softmax(-1)).sum(-1).mean()


def bootstrap(logits: Tensor, targets: Tensor, beta: float = 0.95) -> Tensor:
    """Soft bootstrapping −Σ_k (β onehot_k + (1 − β) p_k) log p_k (Reed et al. 2015); p not detached."""
    _check(logits, targets, "bootstrap")
    log_p = logits.log_softmax(-1)
    t = beta * F.one_hot(targets.long(), logits.shape[1]).to(logits.dtype) + (1 - beta) * log_p.exp()
    return -(t * log_p).sum(-1).mean()


def nce_mae(logits: Tensor, targets: Tensor, alpha: float = 1.0, beta: float = 1.0) -> Tensor:
    """Active–passive NCE+MAE: α (−log p_y)/(−Σ_k log p_k) + β (1 − p_y) (Ma et al. 2020)."""
    _check(logits, targets, "nce_mae")
    log_p = logits.log_softmax(-1)
    nce = _true_class(log_p, targets) / log_p.sum(-1)  # ratio of two negatives
    return (alpha * nce + beta * (1.0 - _true_class(log_p.exp(), targets))).mean()


def nfl_mae(logits: Tensor, targets: Tensor, alpha: float = 1.0, beta: float = 1.0, gamma: float = 0.5) -> Tensor:
    """Active–passive NFL+MAE: α FL_y/Σ_k FL_k + β (1 − p_y), FL_k = −(1 − p_k)^γ log p_k (Ma et al. 2020)."""
    _check(logits, targets, "nfl_mae")
    log_p = logits.log_softmax(-1)
    p = log_p.exp()
    fl = -(1.0 - p).clamp_min(0).pow(gamma) * log_p
    nfl = _true_class(fl, targets) / fl.sum(-1)
    return (alpha * nfl + beta * (1.0 - _true_class(p, targets))).mean()


def huber(logits: Tensor, targets: Tensor, delta: float = 1.0) -> Tensor:
    """Σ_k huber_δ(p_k − onehot_k) on probabilities; every |p_k − onehot_k| ≤ 1, so δ = 1 gives ½‖·‖²."""
    _check(logits, targets, "huber")
    p = logits.softmax(-1)
    t = F.one_hot(targets.long(), logits.shape[1]).to(logits.dtype)
    return F.huber_loss(p, t, reduction="none", delta=delta).sum(-1).mean()


LOSSES: dict[str, LossFn] = {
    "ce": cross_entropy, "mae": mae, "gce": gce, "sce": sce, "label_smoothing": label_smoothing,
    "bootstrap": bootstrap, "nce_mae": nce_mae, "nfl_mae": nfl_mae, "huber": huber,
}


def make_loss(spec: str) -> LossFn:
    """A baseline loss by name, with optional keyword overrides: ``"gce:q=0.5"``, ``"sce:alpha=1,beta=1"``."""
    name, _, opts = spec.partition(":")
    if name not in LOSSES:
        raise KeyError(f"unknown robust loss {name!r}; valid: {', '.join(LOSSES)}")
    # the options each loss takes: its keyword parameters after (logits, labels)
    valid = [p for p in inspect.signature(LOSSES[name]).parameters][2:]
    kwargs = {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in valid:
            fix = f"valid: {', '.join(valid)} (e.g. {name}:{valid[0]}=...)" if valid else f"it takes none: use {name!r}"
            raise ValueError(f"robust loss {name!r} has no option {key!r}; {fix}")
        try:
            kwargs[key] = float(value)
        except ValueError:
            raise ValueError(f"robust loss {name!r}: option {key}={value!r} is not a number; give a float, "
                             f"e.g. {name}:{key}=0.5") from None
    return partial(LOSSES[name], **kwargs) if kwargs else LOSSES[name]
