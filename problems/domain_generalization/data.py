"""Per-domain tensors for the harness: the data layer's datasets (``problems.data``) and a tiny synthetic
correlation-shift set for smoke tests.

``load_domains(name, seed, ...) -> {domain: (X, y)}``. Datasets:
- ``colored_mnist``: the IRM protocol (domains "+90%", "+80%" train, "-90%" test), binary labels.
- ``colored_mnist_imbalanced``: the same, but training domain i keeps all digits of its majority class
  (domain 0: digit < 5, domain 1: digit ≥ 5) and only ``minority`` of the other (paper Sec. 5.3: 95% / 5%).
  The split is on the digit class, before label noise (as in the authors' code); the test domain is untouched.
- ``colored_fashion_mnist``: the same IRM protocol on Fashion-MNIST's 70,000 images, 6,000 per environment
  (``problems.data.colored_fashion_mnist``; the idx files from the Debian package's folder or
  ``BILEVEL_FASHION_MNIST``): the scale at which Table 2's differences can show.
- ``rotated_mnist`` / ``rotated_digits``: rotation domains, 10 classes (leave-one-domain-out experiments).
- ``synthetic``: Colored-MNIST in miniature from Gaussians (an invariant block that agrees with the clean
  label, noisy labels at 25%, and a spurious "colour" block agreeing with the noisy label at 90% / 80% / 10%):
  no files, builds in milliseconds.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

DATASETS = ("colored_mnist", "colored_mnist_imbalanced", "colored_fashion_mnist", "rotated_mnist", "rotated_digits",
            "synthetic")
SYNTHETIC_ENVS = {"+90%": 0.1, "+80%": 0.2, "-90%": 0.9}


def synthetic(seed: int, per_domain: int = 200, dim: int = 3) -> dict[str, tuple[Tensor, Tensor]]:
    """The miniature correlation-shift set (see module doc); inputs (N, 2·dim), binary labels."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, e in SYNTHETIC_ENVS.items():
        clean = torch.randint(0, 2, (per_domain,), generator=g)
        label = clean ^ (torch.rand(per_domain, generator=g) < 0.25).long()
        color = label ^ (torch.rand(per_domain, generator=g) < e).long()
        inv = (2 * clean[:, None] - 1).float() + 0.7 * torch.randn(per_domain, dim, generator=g)
        spur = (2 * color[:, None] - 1).float() + 0.3 * torch.randn(per_domain, dim, generator=g)
        out[name] = (torch.cat([inv, spur], 1), label)
    return out


def _column(ds, name: str) -> list:
    """One column as a list, read from Arrow in one piece (``ds[name]`` iterates the rows one by one through
    the dataset's formatter: about 0.2 s for 5,000 rows, once per harness built)."""
    return ds.select_columns([name]).to_dict()[name]


def _imbalance(ds, seed: int, minority: float, train_domains: list[str]):
    """Row indices of the imbalanced variant (see module doc)."""
    import numpy as np
    rng = np.random.RandomState(seed)
    domains = np.asarray(_column(ds, "domain"))
    digits = np.asarray(ds.with_format("numpy")["digit"])
    keep = []
    for name in np.unique(domains):
        rows = np.flatnonzero(domains == name)
        if name in train_domains:
            i = train_domains.index(name)
            major = (digits[rows] < 5) if i % 2 == 0 else (digits[rows] >= 5)
            maj, mino = rows[major], rows[~major]
            n_min = int(round(minority / (1 - minority) * len(maj)))
            rows = np.sort(np.concatenate([maj, rng.choice(mino, size=min(n_min, len(mino)), replace=False)]))
        keep.append(rows)
    return np.concatenate(keep)


def load_domains(name: str, seed: int, cache_dir: Optional[str] = None, minority: float = 0.05,
                 device: torch.device | str = "cpu", synthetic_size: int = 200,
                 per_env: Optional[int] = None) -> dict[str, tuple[Tensor, Tensor]]:
    """``{domain: (X, y)}`` for dataset ``name`` (see module doc), tensors on ``device``; ``per_env`` images per
    environment of ``colored_fashion_mnist`` (None: the data layer's 6,000)."""
    if name == "synthetic":
        return {k: (x.to(device), y.to(device)) for k, (x, y) in synthetic(seed, synthetic_size).items()}
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    from .. import data as D  # the data layer; imported lazily (it pulls `datasets`)
    if name.startswith("colored_mnist"):
        ds = D.colored_mnist(seed=seed, cache_dir=cache_dir)
        if name == "colored_mnist_imbalanced":
            if not 0.0 < minority < 0.5:
                raise ValueError(f"minority must be in (0, 0.5), got {minority}")
            ds = ds.select(_imbalance(ds, seed, minority, ["+90%", "+80%"]))
    elif name == "colored_fashion_mnist":
        ds = D.colored_fashion_mnist(seed=seed, cache_dir=cache_dir, **({} if per_env is None else {"per_env": per_env}))
    elif name == "rotated_mnist":
        ds = D.rotated_mnist(seed=seed, cache_dir=cache_dir)
    else:
        ds = D.rotated_digits(seed=seed, cache_dir=cache_dir)
    names = list(dict.fromkeys(_column(ds, "domain")))
    return {d: tuple(t.to(device) for t in D.to_tensors(ds, d)) for d in names}
