"""AdaLFL's loss network: the smooth leaky ReLU and its derivative against closed forms, the network
against a hand-written forward pass, and FD gradients in float64."""
import math

import pytest
import torch
from torch.func import grad

from bilevel.problems.losses.loss_network import (init_loss_network, learned_loss, loss_network, smooth_leaky_relu,
                                          smooth_leaky_relu_derivative)

torch.set_num_threads(1)


@pytest.mark.parametrize("gamma,beta", [(0.01, 10.0), (0.25, 2.0)])
def test_smooth_leaky_relu_closed_form(gamma, beta):
    xs = [-3.0, -0.7, -0.05, 0.0, 0.05, 0.4, 2.5]
    x = torch.tensor(xs, dtype=torch.float64)
    expected = [(1 / beta) * math.log(math.exp(beta * v) + 1) * (1 - gamma) + gamma * v for v in xs]   # eq. 4
    d_expected = [(math.exp(beta * v) + gamma) / (math.exp(beta * v) + 1) for v in xs]                  # eq. 25
    assert torch.allclose(smooth_leaky_relu(x, gamma, beta), torch.tensor(expected, dtype=torch.float64), atol=1e-14)
    assert torch.allclose(smooth_leaky_relu_derivative(x, gamma, beta), torch.tensor(d_expected, dtype=torch.float64),
                          atol=1e-14)
    autodiff = torch.func.vmap(grad(lambda v: smooth_leaky_relu(v, gamma, beta)))(x)
    assert torch.allclose(autodiff, torch.tensor(d_expected, dtype=torch.float64), atol=1e-14)


def test_smooth_leaky_relu_asymptotes():
    """Linear asymptotes: slope γ for x → −∞, slope 1 for x → +∞ (no saturation, no overflow)."""
    x = torch.tensor([-1e4, 1e4], dtype=torch.float64)
    y = smooth_leaky_relu(x)
    assert torch.isfinite(y).all()
    assert float(y[0]) == pytest.approx(0.01 * -1e4)
    assert float(y[1]) == pytest.approx(1e4)


@pytest.mark.parametrize("bias", [False, True])
def test_network_matches_hand_forward(bias):
    phi = init_loss_network(hidden=5, layers=2, bias=bias, seed=3, dtype=torch.float64)
    y, p = 1.0, 0.3
    h = [y, p]
    for i in range(3):
        w = phi[f"w{i}"].tolist()
        h = [sum(w[r][c] * h[c] for c in range(len(h))) + (float(phi[f"b{i}"][r]) if bias else 0.0)
             for r in range(len(w))]
        if i < 2:
            h = [(1 / 10) * math.log(math.exp(10 * v) + 1) * 0.99 + 0.01 * v for v in h]
    got = loss_network(phi, torch.tensor([y], dtype=torch.float64), torch.tensor([p], dtype=torch.float64))
    assert float(got[0]) == pytest.approx(h[0], rel=1e-12)


def test_learned_loss_reduction_and_fd_gradients():
    phi = init_loss_network(hidden=6, seed=1, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 2, 1, 2])
    # mean over classes and batch of ℓ(onehot, softmax) (eq. 14)
    p = logits.softmax(-1)
    onehot = torch.nn.functional.one_hot(labels, 3).double()
    manual = torch.stack([loss_network(phi, onehot[i, k:k + 1], p[i, k:k + 1]) for i in range(4) for k in range(3)])
    assert float(learned_loss(phi, logits.detach(), labels)) == pytest.approx(float(manual.mean().detach()), rel=1e-12)
    assert torch.autograd.gradcheck(lambda z: learned_loss(phi, z, labels), (logits,))
    w = phi["w1"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m: learned_loss({**phi, "w1": m}, logits.detach(), labels), (w,))
    pred = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: learned_loss(phi, z, target, task="regression"), (pred,))


def test_bad_input():
    phi = init_loss_network()
    with pytest.raises(ValueError, match="int class labels"):
        learned_loss(phi, torch.randn(3, 4), torch.rand(3, 4))
    with pytest.raises(ValueError, match="task"):
        learned_loss(phi, torch.randn(3), torch.randn(3), task="ranking")
    with pytest.raises(KeyError, match="init_loss_network"):
        loss_network({"w0": torch.zeros(1, 2)}, torch.zeros(3), torch.zeros(3))
