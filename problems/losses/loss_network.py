"""AdaLFL's learned loss: a small network ℓ_φ(y_i, ŷ_i) applied output-wise, with the smooth leaky ReLU.

"Meta-Learning Adaptive Loss Functions" (AdaLFL; Raymond, Chen, Xue, Zhang; arXiv:2301.13247, 2023,
first circulated as "Online Loss Function Learning"; the text used here is the double-blind review version).

    M_φ(y, f_θ(x)) = (1/C) Σ_{i=1..C} ℓ_φ(y_i, f_θ(x)_i)                         (eq. 3 / eq. 14)
    ℓ_φ: 2 → 40 → 40 → 1,  h^(l) = φ_act(W^(l) h^(l−1))                         (eq. 12)
    φ_act(x) = (1/β) log(e^{βx} + 1)(1 − γ) + γx,    γ = 0.01, β = 10          (eq. 4 = eq. 18)
    φ_act'(x) = (e^{βx} + γ)/(e^{βx} + 1) = (1 − γ) sigmoid(βx) + γ            (eq. 25)

Explicit choices (the paper is silent, see the digest's ambiguity list):
- a linear output layer (the paper drops ML³'s Softplus output to avoid flat losses, and names no other);
- no bias terms, as eq. 12 is written (and as in the first author's public loss networks); ``bias=True``
  adds them;
- classification inputs are (one-hot target, softmax probability) per class (Sec. 5.6 speaks of the
  predicted probability approaching 1); regression inputs are (y, ŷ) with C = number of outputs;
- the mean over the C outputs (the formula's 1/C, not the prose's "sum") and then over the batch;
- weights initialised like ``torch.nn.Linear`` (uniform ±1/√fan_in) from a seeded generator.

The network is a pure function of a flat params dict so that ``torch.func`` differentiates through it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from bilevel.tree import Params

GAMMA = 0.01   # leak, App. B.2
BETA = 10.0    # smoothness, App. B.2


def smooth_leaky_relu(x: Tensor, gamma: float = GAMMA, beta: float = BETA) -> Tensor:
    """(1/β) log(e^{βx} + 1)(1 − γ) + γx (eq. 4), via softplus for stability at large βx."""
    return (1.0 - gamma) * F.softplus(x, beta=beta) + gamma * x


def smooth_leaky_relu_derivative(x: Tensor, gamma: float = GAMMA, beta: float = BETA) -> Tensor:
    """(e^{βx} + γ)/(e^{βx} + 1) = (1 − γ) sigmoid(βx) + γ (eq. 25)."""
    return (1.0 - gamma) * torch.sigmoid(beta * x) + gamma


def init_loss_network(hidden: int = 40, layers: int = 2, bias: bool = False, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> Params:
    """Flat params of ℓ_φ: 2 → hidden (× ``layers``) → 1, ``torch.nn.Linear``-style uniform init."""
    if hidden < 1 or layers < 1:
        raise ValueError(f"loss network needs hidden >= 1 and layers >= 1, got hidden={hidden}, layers={layers}")
    g = torch.Generator().manual_seed(seed)
    sizes = [2] + [hidden] * layers + [1]
    params: Params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        bound = 1.0 / math.sqrt(fan_in)
        params[f"w{i}"] = (torch.rand(fan_out, fan_in, generator=g, dtype=torch.float64) * 2 - 1).mul(bound).to(dtype)
        if bias:
            params[f"b{i}"] = (torch.rand(fan_out, generator=g, dtype=torch.float64) * 2 - 1).mul(bound).to(dtype)
    return params


def _num_layers(phi: Params) -> int:
    n = sum(1 for k in phi if k.startswith("w"))
    if n < 2 or any(f"w{i}" not in phi for i in range(n)):
        raise KeyError(f"loss network params must hold w0..w{{L}} (from init_loss_network), got {sorted(phi)}")
    return n


def loss_network(phi: Params, target: Tensor, prediction: Tensor, gamma: float = GAMMA, beta: float = BETA) -> Tensor:
    """ℓ_φ(y_i, ŷ_i) elementwise: ``target`` and ``prediction`` of the same shape, output of that shape."""
    if target.shape != prediction.shape:
        raise ValueError(f"loss_network: target shape {tuple(target.shape)} != prediction shape "
                         f"{tuple(prediction.shape)}; one-hot the labels or reshape the regression target")
    n = _num_layers(phi)
    h = torch.stack([target.to(prediction.dtype), prediction], dim=-1)
    for i in range(n):
        h = h @ phi[f"w{i}"].T
        if f"b{i}" in phi:
            h = h + phi[f"b{i}"]
        if i < n - 1:
            h = smooth_leaky_relu(h, gamma, beta)
    return h.squeeze(-1)


def learned_loss(phi: Params, outputs: Tensor, targets: Tensor, task: str = "classification") -> Tensor:
    """M_φ averaged over outputs and batch (eq. 14).

    Args:
        outputs: logits ``(N, C)`` (classification; softmax is applied here) or predictions ``(N,)``/``(N, C)``.
        targets: int labels ``(N,)`` (classification) or regression targets shaped like ``outputs``.
        task: ``"classification"`` or ``"regression"``.
    """
    if task == "classification":
        if targets.dim() != 1 or targets.dtype not in (torch.int64, torch.int32):
            raise ValueError("learned_loss(task='classification') takes int class labels of shape (N,); got "
                             f"{targets.dtype} {tuple(targets.shape)}")
        if outputs.dim() != 2:
            raise ValueError("learned_loss(task='classification') takes logits of shape (N, C); got shape "
                             f"{tuple(outputs.shape)}: pass a batch, e.g. logits.unsqueeze(0) for one example")
        prediction = outputs.softmax(-1)
        target = F.one_hot(targets.long(), outputs.shape[-1]).to(outputs.dtype)
    elif task == "regression":
        prediction, target = outputs, targets.to(outputs.dtype).reshape(outputs.shape)
    else:
        raise ValueError(f"learned_loss: task must be 'classification' or 'regression', got {task!r}")
    return loss_network(phi, target, prediction).mean()
