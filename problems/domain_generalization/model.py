"""Networks split into a featurizer g and a linear classifier head h_θ (the paper's Sec. 2 split).

All penalties of the Hessian-alignment paper act on the head parameters θ only; the featurizer is reached
through the features z = g(x). The module is only a template: parameters live in a flat dict and are used
through ``torch.func.functional_call`` (house style), so nested ``grad``/``vmap`` compose.

Head convention: a ``Linear(h, C)``; ``C == 1`` means a binary task with a single logit and
binary cross-entropy (the IRM Colored MNIST code), ``C > 1`` softmax cross-entropy (Prop. 4).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from bilevel.tree import Params

HEAD_PREFIX = "head."


class DGNet(nn.Module):
    """``featurizer`` (any module mapping inputs to an (N, h) feature matrix) followed by ``head``."""

    def __init__(self, featurizer: nn.Module, feature_dim: int, num_outputs: int):
        super().__init__()
        self.featurizer = featurizer
        self.head = nn.Linear(feature_dim, num_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.featurizer(x))


def mlp_featurizer(input_dim: int, hidden: int) -> nn.Sequential:
    """The IRM Colored MNIST MLP body: flatten, two ReLU layers of width ``hidden`` (IRM code: 390)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(input_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())


def cnn_featurizer(channels: int, width: int = 32) -> nn.Sequential:
    """A small CNN (GroupNorm, no running statistics, so torch.func transforms apply) for Rotated MNIST."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.GroupNorm(8, width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.GroupNorm(8, 2 * width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten())


def make_network(kind: str, input_shape: tuple[int, ...], num_outputs: int, hidden: int, seed: int) -> DGNet:
    """Build and initialise a network; Xavier-uniform weights and zero biases as in the IRM code.
    The initialisation depends on ``seed`` only (the global RNG is left untouched), so every process of a
    multi-process run starts from the same weights."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _make_network(kind, input_shape, num_outputs, hidden)


def _make_network(kind: str, input_shape: tuple[int, ...], num_outputs: int, hidden: int) -> DGNet:
    if kind == "mlp":
        net = DGNet(mlp_featurizer(math.prod(input_shape), hidden), hidden, num_outputs)
        for m in net.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
    elif kind == "cnn":
        if len(input_shape) != 3:
            raise ValueError(f"network 'cnn' needs C×H×W inputs, got shape {input_shape}; use network='mlp'")
        net = DGNet(cnn_featurizer(input_shape[0], hidden), 2 * hidden, num_outputs)
    else:
        raise ValueError(f"unknown network {kind!r}; valid: 'mlp', 'cnn'")
    return net


def split(params: Params) -> tuple[Params, Params]:
    """(featurizer params, head params), with the module prefixes stripped."""
    feat = {k[len("featurizer."):]: v for k, v in params.items() if k.startswith("featurizer.")}
    head = {k[len(HEAD_PREFIX):]: v for k, v in params.items() if k.startswith(HEAD_PREFIX)}
    if not head or set(head) != {"weight", "bias"}:
        raise KeyError(f"params need 'head.weight' and 'head.bias' (a linear head); got keys {sorted(params)}")
    return feat, head


def features(net: DGNet, feat_params: Params, x: Tensor) -> Tensor:
    """z = g(x) through ``functional_call``."""
    return functional_call(net.featurizer, feat_params, (x,))


def logits(head: Params, z: Tensor) -> Tensor:
    """a = W z + b, shape (N, C)."""
    return z @ head["weight"].T + head["bias"]


def loss_from_logits(a: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy: BCE-with-logits for a single logit (y in {0,1}), softmax CE otherwise."""
    if a.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(a[..., 0], y.to(a.dtype))
    return F.cross_entropy(a, y.long())


def head_loss(head: Params, z: Tensor, y: Tensor) -> Tensor:
    """L_e(θ) = E_{(z,y)∈e} ℓ(h_θ(z), y) (Eq. 1) as a function of the head only."""
    return loss_from_logits(logits(head, z), y)


def accuracy(a: Tensor, y: Tensor) -> Tensor:
    """Fraction correct: sign of the single logit, or argmax."""
    pred = (a[..., 0] > 0).long() if a.shape[-1] == 1 else a.argmax(-1)
    return (pred == y.long()).float().mean()
