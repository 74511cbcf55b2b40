"""Label noise: measured rates match the requested ones, and only the corrupted labels differ."""
import math

import datasets
import pytest
import torch

from bilevel.problems.data import noisy_labels, with_label_noise

N, C = 20000, 10


def clean() -> torch.Tensor:
    return torch.arange(N) % C


def within(measured: float, p: float, n: int, sigmas: float = 4.0) -> bool:
    return abs(measured - p) <= sigmas * math.sqrt(max(p * (1 - p), 1e-12) / n)


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.45, 0.8])
def test_symmetric_rate_and_targets(rate):
    y = clean()
    z = noisy_labels(y, rate, "symmetric", C, seed=1)
    changed = z != y
    assert within(float(changed.float().mean()), rate, N)
    if rate:
        # corrupted labels spread evenly over the other nine classes
        offsets = ((z - y) % C)[changed]
        counts = torch.bincount(offsets, minlength=C)
        assert counts[0] == 0
        n = int(changed.sum())
        assert all(within(float(k) / n, 1 / (C - 1), n) for k in counts[1:])


@pytest.mark.parametrize("rate", [0.1, 0.4])
def test_pairflip_moves_to_the_next_class(rate):
    y = clean()
    z = noisy_labels(y, rate, "pairflip", C, seed=2)
    changed = z != y
    assert within(float(changed.float().mean()), rate, N)
    assert torch.equal(z[changed], (y[changed] + 1) % C)


def test_seed_reproducible_and_dtype():
    y = clean()
    assert torch.equal(noisy_labels(y, 0.3, seed=7), noisy_labels(y, 0.3, seed=7))
    assert not torch.equal(noisy_labels(y, 0.3, seed=7), noisy_labels(y, 0.3, seed=8))
    assert noisy_labels(y.int(), 0.3).dtype == torch.int64
    assert torch.equal(noisy_labels(y, 0.0), y)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan")])
def test_rate_outside_unit_interval_is_an_error(rate):
    with pytest.raises(ValueError, match="outside \\[0, 1\\)"):
        noisy_labels(clean(), rate)


def test_other_bad_inputs():
    with pytest.raises(ValueError, match="unknown noise kind 'flip'"):
        noisy_labels(clean(), 0.1, "flip")
    with pytest.raises(ValueError, match="out of range for num_classes=5"):
        noisy_labels(clean(), 0.1, num_classes=5)
    with pytest.raises(TypeError, match="integer"):
        noisy_labels(torch.zeros(3), 0.1)


def test_with_label_noise_keeps_clean_labels_and_other_columns():
    base = datasets.Dataset.from_dict(
        {"x": [[float(i)] for i in range(N)], "label": clean().tolist(), "domain": ["a", "b"] * (N // 2)}
    ).with_format("torch")
    noisy = with_label_noise(base, 0.3, "symmetric", seed=4)
    assert noisy.column_names[:2] == ["x", "label"] and "clean_label" in noisy.column_names
    assert torch.equal(noisy["clean_label"][:], base["label"][:])
    assert torch.equal(noisy["label"][:], noisy_labels(clean(), 0.3, "symmetric", seed=4))
    assert torch.equal(noisy["x"][:], base["x"][:])
    assert noisy["domain"][:] == base["domain"][:]
    assert noisy.format["type"] == "torch"
    # noise on top of noise keeps the original truth
    twice = with_label_noise(noisy, 0.1, "pairflip", seed=5)
    assert torch.equal(twice["clean_label"][:], base["label"][:])
