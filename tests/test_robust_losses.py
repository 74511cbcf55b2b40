"""Baseline robust losses against their formulas written out element by element, and FD gradients."""
import math

import pytest
import torch

from bilevel.problems.losses import robust

torch.set_num_threads(1)


def _data(n=5, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g, dtype=torch.float64) * 2, torch.randint(0, c, (n,), generator=g)


def _softmax_row(row):
    m = max(row)
    e = [math.exp(v - m) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _per_example(name, p, y, c):
    """Each loss for one example, from the paper's formula, in plain Python floats."""
    py = p[y]
    onehot = [1.0 if k == y else 0.0 for k in range(c)]
    if name == "ce":
        return -math.log(py)
    if name == "mae":
        return sum(abs(p[k] - onehot[k]) for k in range(c))
    if name == "gce":
        return (1 - py ** 0.7) / 0.7
    if name == "sce":
        rce = -sum(p[k] * (math.log(onehot[k]) if onehot[k] > 0 else -4.0) for k in range(c))
        return 0.1 * -math.log(py) + 1.0 * rce
    if name == "label_smoothing":
        return -sum(((0.9 * onehot[k]) + 0.1 / c) * math.log(p[k]) for k in range(c))
    if name == "bootstrap":
        return -sum((0.95 * onehot[k] + 0.05 * p[k]) * math.log(p[k]) for k in range(c))
    if name == "nce_mae":
        return -math.log(py) / -sum(math.log(p[k]) for k in range(c)) + (1 - py)
    if name == "nfl_mae":
        fl = [-(1 - p[k]) ** 0.5 * math.log(p[k]) for k in range(c)]
        return fl[y] / sum(fl) + (1 - py)
    if name == "huber":
        return sum(0.5 * (p[k] - onehot[k]) ** 2 for k in range(c))
    raise KeyError(name)


@pytest.mark.parametrize("name", sorted(robust.LOSSES))
def test_loss_matches_formula(name):
    logits, y = _data()
    expected = sum(_per_example(name, _softmax_row(row.tolist()), int(t), logits.shape[1])
                   for row, t in zip(logits, y)) / len(y)
    got = float(robust.LOSSES[name](logits, y))
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("name", sorted(robust.LOSSES))
def test_loss_gradient_matches_finite_differences(name):
    logits, y = _data(n=3, c=3, seed=1)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: robust.LOSSES[name](z, y), (logits,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(robust.LOSSES))
def test_descent_raises_true_class_probability(name):
    """Every baseline is a proper loss: a gradient step on the logits raises p_y."""
    logits, y = _data(n=16, c=5, seed=2)
    logits.requires_grad_(True)
    loss = robust.LOSSES[name](logits, y)
    (g,) = torch.autograd.grad(loss, logits)
    before = logits.softmax(-1).gather(1, y[:, None]).mean()
    after = (logits - 0.5 * g).softmax(-1).gather(1, y[:, None]).mean()
    assert after > before


def test_limits_and_options():
    logits, y = _data()
    ce = robust.cross_entropy(logits, y)
    assert float(robust.gce(logits, y, q=1e-6)) == pytest.approx(float(ce), rel=1e-4)
    assert float(robust.gce(logits, y, q=1.0)) == pytest.approx(float(robust.mae(logits, y)) / 2, rel=1e-12)
    assert float(robust.label_smoothing(logits, y, epsilon=0.0)) == pytest.approx(float(ce), rel=1e-12)
    assert float(robust.bootstrap(logits, y, beta=1.0)) == pytest.approx(float(ce), rel=1e-12)
    assert float(robust.make_loss("gce:q=1")(logits, y)) == pytest.approx(float(robust.gce(logits, y, q=1.0)))


def test_bad_input_is_named():
    logits, y = _data()
    with pytest.raises(ValueError, match="one-hot"):
        robust.cross_entropy(logits, torch.nn.functional.one_hot(y, 4))
    with pytest.raises(TypeError, match="long"):
        robust.gce(logits, y.double())
    with pytest.raises(KeyError, match="valid"):
        robust.make_loss("focal")
