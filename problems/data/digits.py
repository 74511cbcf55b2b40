"""Small data bundled with scikit-learn: rotated 8x8 digits (fast stand-in for Rotated MNIST) and the
diabetes regression set (one of the AdaLFL paper's datasets)."""
from __future__ import annotations

from collections.abc import Sequence

import datasets
import numpy as np
import torch

from .cache import CacheDir, cached_build
from .images import rotated_domains
from .mnist import DEFAULT_ANGLES

_DIGITS_VERSION = 1


def rotated_digits(
    angles: Sequence[float] = DEFAULT_ANGLES,
    seed: int = 0,
    cache_dir: CacheDir = None,
    per_domain: int | None = None,
) -> datasets.Dataset:
    """Rotated digits: the Rotated MNIST protocol (DomainBed, arXiv:2007.01434) on scikit-learn's 1,797
    real 8x8 digits (``load_digits``, pixel values 0-16 scaled to [0, 1]).

    The digits, shuffled with ``seed``, are dealt into one disjoint chunk per angle (about 300 images for
    six domains) and rotated counter-clockwise by it. At 8x8 a rotation by 45 degrees cuts off the corners
    of the grid; the digits sit in the middle, so little ink is lost.

    Returns:
        Dataset in torch format: ``image`` float32 1x8x8 in [0, 1], ``label`` int64 0-9, ``domain`` str.
    """
    args = {"angles": [float(a) for a in angles], "per_domain": per_domain, "seed": seed, "v": _DIGITS_VERSION}

    def build() -> datasets.Dataset:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0)[:, None]
        return rotated_domains(images, torch.from_numpy(bunch.target), angles, per_domain, seed)

    return cached_build("rotated_digits", args, build, cache_dir)


def diabetes(seed: int = 0, standardize: bool = False) -> datasets.Dataset:
    """scikit-learn's diabetes regression set (Efron et al. 2004): 442 patients, 10 baseline features,
    target a measure of disease progression one year later. Used by AdaLFL (Raymond et al. 2023,
    arXiv:2209.08907) as a regression benchmark.

    Rows are shuffled with ``seed``. The features are scikit-learn's (each column mean-centred and scaled
    to unit L2 norm); the target is raw (25 to 346). ``standardize=True`` z-scores the features and the
    target over the whole set instead (fine for a demo; a careful study fits the scaling on the training split).

    Returns:
        Dataset in torch format: ``x`` float32 10-vector, ``y`` float32 scalar. Not cached (it builds in ms).
    """
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    if standardize:
        x = (x - x.mean(0)) / x.std(0)
        y = (y - y.mean()) / y.std()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)).numpy()
    feats = datasets.Features(
        {"x": datasets.List(datasets.Value("float32"), length=10), "y": datasets.Value("float32")}
    )
    ds = datasets.Dataset.from_dict({"x": x[perm].astype(np.float32), "y": y[perm].astype(np.float32)}, features=feats)
    return ds.with_format("torch")
