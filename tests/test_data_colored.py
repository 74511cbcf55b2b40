"""Colored MNIST (IRM protocol): the correlations measured on the built data match the protocol."""
import math

import pytest
import torch

from bilevel.problems.data import colored_mnist, domains_of, to_tensors
from bilevel.problems.data.mnist import mnist_5k


@pytest.fixture(scope="module")
def cmnist():
    return colored_mnist(seed=0, cache_dir=False)


def columns(ds, domain):
    sub = ds.select(torch.nonzero(torch.tensor([d == domain for d in ds.with_format(None)["domain"][:]]))[:, 0].tolist())
    return {k: sub[k][:] for k in ("image", "label", "clean_label", "color", "digit")}


def within(measured: float, p: float, n: int, sigmas: float = 4.0) -> bool:
    return abs(measured - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def test_domains_and_shapes(cmnist):
    assert domains_of(cmnist) == ["+90%", "+80%", "-90%"]
    assert len(cmnist) == 5000
    X, y = to_tensors(cmnist)
    assert X.shape == (5000, 2, 14, 14) and X.dtype == torch.float32
    assert set(y.tolist()) == {0, 1}
    assert float(X.min()) >= 0.0 and float(X.max()) <= 1.0


@pytest.mark.parametrize("domain,e", [("+90%", 0.1), ("+80%", 0.2), ("-90%", 0.9)])
def test_correlations_match_the_protocol(cmnist, domain, e):
    c = columns(cmnist, domain)
    n = len(c["label"])
    assert n in (1666, 1667)
    # the clean binary label is exactly "digit < 5"
    assert torch.equal(c["clean_label"], (c["digit"] < 5).long())
    # 25% label noise
    assert within(float((c["label"] != c["clean_label"]).float().mean()), 0.25, n)
    # colour agrees with the noisy label with probability 1 - e
    assert within(float((c["color"] == c["label"]).float().mean()), 1 - e, n)
    # the clean label and the colour agree with probability 0.75(1-e) + 0.25 e
    assert within(float((c["color"] == c["clean_label"]).float().mean()), 0.75 * (1 - e) + 0.25 * e, n)
    # the binary label is balanced (half the digits are < 5)
    assert within(float(c["label"].float().mean()), 0.5, n)


def test_colour_is_the_channel_that_keeps_the_digit(cmnist):
    c = columns(cmnist, "+80%")
    images, digits = mnist_5k()
    small = images[:, ::2, ::2].float() / 255.0
    rows = torch.arange(len(c["color"]))
    kept = c["image"][rows, c["color"]]
    dropped = c["image"][rows, 1 - c["color"]]
    assert float(dropped.abs().max()) == 0.0
    assert float(kept.sum()) > 0
    # every kept channel is one of the subsampled MNIST digits with that digit label
    lookup = {small[i].numpy().tobytes(): int(digits[i]) for i in range(len(small))}
    assert all(lookup[k.numpy().tobytes()] == int(d) for k, d in zip(kept, c["digit"]))


def test_seeds_and_options():
    a = to_tensors(colored_mnist(seed=3, cache_dir=False))
    b = to_tensors(colored_mnist(seed=3, cache_dir=False))
    c = to_tensors(colored_mnist(seed=4, cache_dir=False))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    full = colored_mnist(downsample=28, environments=(0.1, 0.5), label_noise=0.0, cache_dir=False)
    assert domains_of(full) == ["+90%", "+50%"] and full[0]["image"].shape == (2, 28, 28)
    assert torch.equal(full["label"][:], full["clean_label"][:])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"label_noise": 1.0}, "label_noise 1.0"),
        ({"environments": (0.1, 1.2)}, "1.2"),
        ({"environments": (0.1, 0.1)}, "repeated"),
        ({"downsample": 10}, "divisor of 28"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        colored_mnist(cache_dir=False, **kwargs)
