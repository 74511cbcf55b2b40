"""Hyperparameters: the IRM Colored MNIST protocol, DomainBed defaults, and DomainBed's seeded random search.

DomainBed (Gulrajani & Lopez-Paz, ICLR 2021, ``hparams_registry.py``) gives each hyperparameter a default and
a distribution; a sweep draws trial ``k`` from a generator seeded by ``k`` (here ``numpy.random.RandomState`` seeded
by ``[k, algorithm index]``, no Python ``hash``, so a draw is the same in every process and Python run).
Small-image values are used (our datasets are MNIST-sized). HGP ranges are the paper's and the authors' code's;
for Hutchinson the paper's ranges are used (α ~ 10^U(−3,−1), β ~ 10^U(−4,−2)); the authors' active code draws
α ~ 10^U(1,4), β ~ 10^U(2,6) instead (digest §12 C2). DomainBed resets Adam when IRM's penalty is annealed; the
runner owns the optimiser, so this harness does not (a documented deviation). The annealing keys map DomainBed's ``*_penalty_anneal_iters`` and
``*_lambda`` onto this harness's ``anneal_step`` and ``penalty_weight``.
"""
from __future__ import annotations

import numpy as np

# Every key a DGConfig field; value = (default, sampler(rng) -> value).
_COMMON = {
    "lr": (1e-3, lambda r: float(10 ** r.uniform(-4.5, -2.5))),
    "batch_size": (64, lambda r: int(2 ** r.uniform(3, 9))),
    "l2_weight": (0.0, lambda r: 0.0),                     # DomainBed: weight decay 0 for small images
}
_PER_ALGORITHM = {
    "erm": {},
    "irm": {"penalty_weight": (1e2, lambda r: float(10 ** r.uniform(-1, 5))),
            "anneal_step": (500, lambda r: int(10 ** r.uniform(0, 4)))},
    "vrex": {"penalty_weight": (1e1, lambda r: float(10 ** r.uniform(-1, 5))),
             "anneal_step": (500, lambda r: int(10 ** r.uniform(0, 4)))},
    "coral": {"penalty_weight": (1.0, lambda r: float(10 ** r.uniform(-1, 1))), "anneal_step": (0, lambda r: 0)},
    "fishr": {"penalty_weight": (1e3, lambda r: float(10 ** r.uniform(1, 4))),
              "anneal_step": (1500, lambda r: int(r.uniform(0, 5000)))},
    "hgp": {"alpha": (1e-4, lambda r: float(10 ** r.uniform(-5, -3))),
            "beta": (5e-3, lambda r: float(10 ** r.uniform(-3, -1))),
            "penalty_weight": (1.0, lambda r: 1.0), "anneal_step": (0, lambda r: 0)},
    "hutchinson": {"alpha": (1e-3, lambda r: float(10 ** r.uniform(-3, -1))),
                   "beta": (5e-3, lambda r: float(10 ** r.uniform(-4, -2))),
                   "penalty_weight": (1.0, lambda r: 1.0), "anneal_step": (0, lambda r: 0)},
}

# The IRM Colored MNIST protocol (Arjovsky et al. 2019 code, reused verbatim by the paper, Sec. 5.2):
# full batch, Adam, 501 steps, penalty 1 -> 91257.18 at step 190, loss divided by the weight afterwards.
IRM_CMNIST = dict(lr=0.0004898536566546834, l2_weight=0.00110794568, batch_size=None, hidden=390,
                  penalty_weight=91257.18613115903, anneal_step=190, warmup_weight=1.0, rescale_after_anneal=True,
                  alpha=1.0, beta=1.0)


def _table(algorithm: str) -> dict:
    if algorithm not in _PER_ALGORITHM:
        raise KeyError(f"no hyperparameters for algorithm {algorithm!r}; valid: {', '.join(_PER_ALGORITHM)}")
    return {**_COMMON, **_PER_ALGORITHM[algorithm]}


def default_hparams(algorithm: str) -> dict:
    """DomainBed defaults for ``algorithm`` (small images), as DGConfig field overrides."""
    out = {k: v[0] for k, v in _table(algorithm).items()}
    out.setdefault("warmup_weight", 1.0 if algorithm in ("irm", "vrex") else 0.0)
    out["rescale_after_anneal"] = False
    return out


def random_hparams(algorithm: str, trial_seed: int) -> dict:
    """Trial ``trial_seed`` of DomainBed's random search: every hyperparameter drawn from its distribution
    with a generator seeded only by (trial_seed, algorithm index), so draws are reproducible."""
    if trial_seed < 0:
        raise ValueError(f"trial_seed must be >= 0, got {trial_seed}")
    rng = np.random.RandomState([trial_seed, sorted(_PER_ALGORITHM).index(algorithm)])
    out = default_hparams(algorithm)
    for key, (_, sampler) in sorted(_table(algorithm).items()):
        out[key] = sampler(rng)
    return out
