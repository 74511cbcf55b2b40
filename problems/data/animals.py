"""Rotated animal silhouettes: a second, unseen image dataset for transfer experiments.

The animal-mnist package (0.4) carries 10,000 28x28 grayscale animal silhouettes, 1,000 per class, as a
gzipped pickle of a uint8 array in ``animal_mnist/data/Animal_MNIST/``. Its metadata declares
tensorflow (its loader also fetches Keras MNIST), so it is installed without dependencies and only the
data files are read: ``pip install --no-deps animal-mnist==0.4``.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import pickle
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import torch

from .cache import CacheDir, cached_build
from .images import rotated_domains
from .mnist import DEFAULT_ANGLES

INSTALL = "pip install --no-deps animal-mnist==0.4"
# The package description lists the classes in this (alphabetical) order; it does not state the index
# of each, so treat the names as a best reading, checked by eye on the contact sheet.
ANIMAL_CLASSES = ("bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra")
_VERSION = 1


def animal_mnist_dir() -> Path:
    """Folder of animal-mnist's data files, found without importing the package (it imports tensorflow)."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the animal silhouettes come from the animal-mnist package; install it with `{INSTALL}`")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"
    for name in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"animal-mnist is installed but {folder / name} is missing; reinstall with `{INSTALL}`")
    return folder


@functools.lru_cache(maxsize=1)
def _animals() -> tuple[np.ndarray, np.ndarray]:
    folder = animal_mnist_dir()
    # pickle runs code from the file: acceptable only because the file comes from an installed package
    with gzip.open(folder / "animal_data_version_3.gz", "rb") as f:
        images = np.asarray(pickle.load(f))
    with gzip.open(folder / "animal_label_version_3.gz", "rb") as f:
        labels = np.asarray(pickle.load(f))
    if images.shape != (10000, 28, 28) or labels.shape != (10000,):
        raise ValueError(f"animal-mnist data in {folder} has shapes {images.shape}, {labels.shape}; expected (10000, 28, 28), (10000,)")
    return images.astype(np.uint8), labels.astype(np.int64)


def animal_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """The 10,000 silhouettes: uint8 images ``(10000, 28, 28)`` and int64 labels 0-9 (1,000 per class)."""
    images, labels = _animals()
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())


def rotated_animals(
    angles: Sequence[float] = DEFAULT_ANGLES,
    per_domain: int | None = None,
    seed: int = 0,
    cache_dir: CacheDir = None,
) -> datasets.Dataset:
    """Rotated animal silhouettes: the Rotated MNIST protocol (DomainBed, arXiv:2007.01434) on the
    animal-mnist images. Shuffled with ``seed``, dealt into one disjoint chunk per angle (1,667 or 1,666
    images for six domains), each rotated counter-clockwise by its angle.

    Returns:
        Dataset in torch format: ``image`` float32 1x28x28 in [0, 1], ``label`` int64 0-9 (names in
        ``ANIMAL_CLASSES``), ``domain`` str (the angle).
    """
    args = {"angles": [float(a) for a in angles], "per_domain": per_domain, "seed": seed, "v": _VERSION}

    def build() -> datasets.Dataset:
        images, labels = animal_mnist()
        return rotated_domains(images[:, None].float() / 255.0, labels, angles, per_domain, seed)

    return cached_build("rotated_animals", args, build, cache_dir)
