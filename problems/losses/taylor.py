"""The Taylor-polynomial loss family shared by ITL and ARL.

ITL: "Loss Function Learning for Domain Generalization by Implicit Gradient", Gao, Gouk, Yang,
Hospedales, ICML 2022 (eqs. 7–10, Table 8). ARL: B. Gao's PhD thesis, ch. 3 (eqs. 3.3–3.5, App. A.3
normalisation eq. A.2, Table A.2). Both follow TaylorGLO (Gonzalez & Miikkulainen, 2021).

The loss is class-wise separable (eq. 8 / 3.4)::

    L_ω(ŷ, y) = (1/C) Σ_{i=1..C} ℓ_ω(ŷ_i, y_i),      ŷ = softmax(logits), y = one-hot(target)

and ℓ_ω is a truncated bivariate Taylor polynomial of order β around a learnable centre (ω0, ω1), with
a = ŷ_i − ω0, b = y_i − ω1, keeping only the monomials a^i b^j with i ≥ 1 (terms in b alone and the
constant pass no gradient to the network)::

    ℓ_ω(ŷ_i, y_i) = Σ_{k} m_k ω_{k+2} a^{i_k} b^{j_k}

For β = 4 the monomial order is exactly eq. 10 / eq. 3.5 (12 parameters)::

    ω2 a + ω3 a² + ω4 a³ + ω5 a⁴ + ω6 ab + ω7 ab² + ω8 a²b + ω9 a³b + ω10 ab³ + ω11 a²b²

For other orders (2, 3, 5; the paper's Fig. 6 ablation) the order is: pure powers a¹..a^β, then the
mixed monomials by total degree, then by ascending power of a; β(β+1)/2 + 2 parameters.

Parameterisations (``TaylorSpec.parameterisation``):
  - ``"itl"``: eq. 10, multipliers m_k = 1 (no factorials; the ITL paper's "expanded definition").
  - ``"arl"``: eq. 3.5, multipliers m_k = 1/(i! j!) (the bivariate Taylor factorials, which give exactly
    the thesis's (1, 1/2, 1/6, 1/24, 1, 1/2, 1/2, 1/6, 1/6, 1/4)), optionally followed by the ARL min–max
    rescaling f̂ = η (f − f_min)/(f_max − f_min) (eq. A.2) when ``TaylorSpec.normalise = η`` is set.

SIGN CONVENTION (digest note E1, arl_metamd E.2). ``taylor_loss`` is the polynomial exactly as printed,
and it is *minimised*. Read that way, the published ITL coefficients (Table 8) make gradient descent lower
the true-class probability for every prediction (a model trains to 0 % accuracy), while their global
negation −ℓ (the TaylorGLO convention L = −(1/n) Σ f) is a sensible loss. The ARL Table A.2 losses split:
AR-A40 is sensible as printed, and DR-A40, AR-S80 and DR-S80 are sensible only negated (each checked by
:func:`descent_raises_true_class` and by training a softmax classifier, tests/test_taylor_loss.py). No
single sign fits all five published losses, so :func:`published_theta` returns each one *oriented*: the
coefficients ω2.. multiplied by the sign in ``PUBLISHED_SIGN`` (ℓ is linear in them, so this is exactly
±ℓ), with ``as_printed=True`` for the raw numbers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Optional

import torch

Parameterisation = Literal["itl", "arl"]


@dataclass(frozen=True)
class TaylorSpec:
    """Which member of the family: parameterisation, order β and (ARL only) the rescaling η.

    Attributes:
        parameterisation: ``"itl"`` (eq. 10, no factorials) or ``"arl"`` (eq. 3.5, factorials 1/(i! j!)).
        order: the polynomial order β, 2..5 (the papers use 4).
        normalise: ARL's η in f̂ = η (f − f_min)/(f_max − f_min) (eq. A.2), or None for no rescaling.
    """

    parameterisation: Parameterisation = "itl"
    order: int = 4
    normalise: Optional[float] = None

    def __post_init__(self):
        if self.parameterisation not in ("itl", "arl"):
            raise ValueError(f"TaylorSpec: parameterisation must be 'itl' or 'arl', got {self.parameterisation!r}")
        if not isinstance(self.order, int) or not 2 <= self.order <= 5:
            raise ValueError(f"TaylorSpec: order must be an int in 2..5 (the papers use 4), got {self.order!r}")
        if self.normalise is not None and not self.normalise > 0:
            raise ValueError(f"TaylorSpec: normalise (η of eq. A.2) must be positive or None, got {self.normalise!r}")

    @property
    def monomials(self) -> tuple[tuple[int, int], ...]:
        """The exponents (i, j) of a^i b^j, in parameter order (ω2, ω3, ...)."""
        return _monomials(self.order)

    @property
    def multipliers(self) -> tuple[float, ...]:
        """m_k: 1 for ITL, 1/(i! j!) for ARL."""
        if self.parameterisation == "itl":
            return tuple(1.0 for _ in self.monomials)
        return tuple(1.0 / (math.factorial(i) * math.factorial(j)) for i, j in self.monomials)

    @property
    def num_params(self) -> int:
        """2 (the centre) + the number of monomials: 5, 8, 12, 17 for orders 2, 3, 4, 5."""
        return 2 + len(self.monomials)


@lru_cache(maxsize=None)
def _monomials(order: int) -> tuple[tuple[int, int], ...]:
    if order == 4:  # eq. 10 / eq. 3.5 order, which the published coefficients follow
        return ((1, 0), (2, 0), (3, 0), (4, 0), (1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (2, 2))
    pure = [(i, 0) for i in range(1, order + 1)]
    mixed = [(i, d - i) for d in range(2, order + 1) for i in range(1, d)]
    return tuple(pure + mixed)


def _check_theta(theta: torch.Tensor, spec: TaylorSpec) -> None:
    if not isinstance(spec, TaylorSpec):
        raise TypeError(f"taylor loss: spec must be a TaylorSpec, got {type(spec).__name__}")
    if theta.dim() != 1 or theta.shape[0] != spec.num_params:
        raise ValueError(f"taylor loss: theta must be a 1-D tensor of {spec.num_params} coefficients for "
                         f"{spec}, got shape {tuple(theta.shape)}")


def taylor_polynomial(p: torch.Tensor, y: torch.Tensor, theta: torch.Tensor, spec: TaylorSpec) -> torch.Tensor:
    """ℓ_ω(p, y) elementwise (eq. 10 / eq. 3.5): p, y broadcastable tensors of probabilities / labels."""
    _check_theta(theta, spec)
    a = p - theta[0]
    b = y - theta[1]
    out = torch.zeros_like(a * b)
    for k, ((i, j), m) in enumerate(zip(spec.monomials, spec.multipliers)):
        out = out + (m * theta[k + 2]) * a ** i * b ** j
    return out


def _per_sample(probs: torch.Tensor, onehot: torch.Tensor, theta: torch.Tensor, spec: TaylorSpec) -> torch.Tensor:
    return taylor_polynomial(probs, onehot, theta, spec).mean(dim=-1)  # (1/C) Σ_i, eq. 8


@lru_cache(maxsize=16)
def _range_points(num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic points of the loss domain {ŷ ∈ simplex, y one-hot} (App. A.3) for f_min / f_max.

    The thesis samples random points; we use a fixed grid (true-class probability t on 101 levels, the
    rest 1 − t spread uniformly, put on one wrong class, or split over two) so the rescaling is
    deterministic and usable under torch.func.vmap (no random ops inside transforms).
    """
    C = num_classes
    rows = []
    for t in torch.linspace(0.0, 1.0, 101, dtype=torch.float64):
        rest = 1.0 - t
        uniform = torch.full((C,), float(rest) / max(C - 1, 1), dtype=torch.float64)
        one = torch.zeros(C, dtype=torch.float64)
        two = torch.zeros(C, dtype=torch.float64)
        if C > 1:
            one[1] = rest
            two[1] = rest / 2
            two[min(2, C - 1)] += rest / 2
        for row in (uniform, one, two):
            row = row.clone()
            row[0] = t
            rows.append(row)
    probs = torch.stack(rows)
    onehot = torch.zeros_like(probs)
    onehot[:, 0] = 1.0
    return probs, onehot


def loss_range(theta: torch.Tensor, spec: TaylorSpec, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(f_min, f_max) of the per-sample loss L_ω over the domain grid (eq. A.2), differentiable in θ."""
    probs, onehot = _range_points(num_classes)
    values = _per_sample(probs.to(theta), onehot.to(theta), theta, spec)
    return values.min(), values.max()


def taylor_loss(logits: torch.Tensor, targets: torch.Tensor, theta: torch.Tensor, spec: TaylorSpec) -> torch.Tensor:
    """The batch loss: mean over samples of (1/C) Σ_i ℓ_ω(softmax(logits)_i, onehot(targets)_i) (eq. 8–10).

    With ``spec.normalise = η`` (ARL, eq. A.2) the result is η (L − f_min)/(f_max − f_min), f_min / f_max
    from :func:`loss_range`. Differentiable in ``logits`` and ``theta``; works under torch.func grad/vmap.

    Args:
        logits: (N, C) scores.
        targets: (N,) integer class indices in [0, C).
        theta: (spec.num_params,) coefficients ω0..ω_{K+1}.
        spec: the family member.
    """
    _check_theta(theta, spec)
    if logits.dim() != 2:
        raise ValueError(f"taylor_loss: logits must be (N, C), got shape {tuple(logits.shape)}")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(f"taylor_loss: targets must be (N,) matching logits' N={logits.shape[0]}, "
                         f"got shape {tuple(targets.shape)}")
    if targets.is_floating_point():
        raise ValueError("taylor_loss: targets must be integer class indices (use .long()), got floats")
    probs = torch.softmax(logits, dim=-1)
    onehot = torch.nn.functional.one_hot(targets, logits.shape[-1]).to(probs.dtype)
    loss = _per_sample(probs, onehot, theta, spec).mean()
    if spec.normalise is not None:
        f_min, f_max = loss_range(theta, spec, logits.shape[-1])
        loss = spec.normalise * (loss - f_min) / (f_max - f_min)
    return loss


def initial_theta(spec: TaylorSpec, fit: str = "cross_entropy", dtype: torch.dtype = torch.float32,
                  scale: float = 1.0) -> torch.Tensor:
    """A proper-loss initialisation (the papers give none; digest note E3).

    - ``"brier"``: the exact Brier score (ŷ − y)² = a² − 2ab (+ b², which carries no gradient), centre
      (0, 0): ω3 = 1, ω6 = −2 for ITL (ARL's factorials make it θ3 = 2, θ6 = −2).
    - ``"cross_entropy"``: centre (0, 0) and the minimum-norm least-squares fit of ℓ(p, 1) ≈ −log p and
      ℓ(p, 0) ≈ 0 (per-class cross-entropy) on 200 points p ∈ [0.02, 1], each label with a free constant
      offset (the family has no pure-y terms, so constants are not representable and do not matter).
      The fit is joint: both branches share the a^β coefficient (there is no a^β b term, digest E3).
      L_ω then ≈ CE / C (eq. 8 averages over classes).

    ``scale`` multiplies the coefficients ω2.. (the loss): ``scale=C`` makes the CE fit ≈ CE itself, so
    an inner learning rate tuned for CE applies.
    """
    coeffs = torch.zeros(spec.num_params, dtype=torch.float64)
    mult = torch.tensor(spec.multipliers, dtype=torch.float64)
    if fit == "brier":
        for k, ij in enumerate(spec.monomials):
            if ij == (2, 0):
                coeffs[k + 2] = 1.0 / mult[k]
            elif ij == (1, 1):
                coeffs[k + 2] = -2.0 / mult[k]
        coeffs[2:] *= scale
        return coeffs.to(dtype)
    if fit != "cross_entropy":
        raise ValueError(f"initial_theta: fit must be 'cross_entropy' or 'brier', got {fit!r}")
    p = torch.linspace(0.02, 1.0, 200, dtype=torch.float64)
    cols, target = [], []
    for y in (0.0, 1.0):
        cols.append(torch.stack([m * p ** i * y ** j for (i, j), m in zip(spec.monomials, mult)]
                                + [torch.full_like(p, float(y == 0.0)), torch.full_like(p, float(y == 1.0))], dim=1))
        target.append(-torch.log(p) if y == 1.0 else torch.zeros_like(p))
    A, t = torch.cat(cols), torch.cat(target)
    sol = torch.linalg.pinv(A) @ t  # minimum norm: the family over-parameterises (note E3)
    coeffs[2:] = scale * sol[:-2]
    return coeffs.to(dtype)


# ITL Table 8 (header typo "ω0, ω2, ..., ω11": 12 numbers = ω0..ω11) and ARL Table A.2, as printed.
_PRINTED = {
    "itl": (-2.0193, -1.2234, 0.1363, 0.1269, -0.4566, -0.1016, -0.2545, 1.0971, -0.9203, 0.2368, 0.4795, 0.9975),
    "arl_ar_a40": (0.4397, 0.9187, -0.4554, 6.0881, -0.5869, 1.6765, -2.8526, 0.5748, -4.2756, 1.3126, -0.3326, 1.7649),
    "arl_dr_a40": (1.3754, 25.9954, 8.7507, 3.6501, 9.1560, -2.8144, -5.4006, -7.9342, -8.3143, 6.5751, 3.6237, -2.3279),
    "arl_ar_s80": (0.7043, -0.4858, -0.0541, -1.8132, 2.2370, 2.4009, 1.4415, 6.4514, -2.7152, -2.6928, -3.2049, -0.5511),
    "arl_dr_s80": (2.7187, 25.0616, -23.2701, 17.0804, -21.4348, 44.8821, -13.6956, 27.6005, -17.3943, 43.7386,
                   7.2981, -17.5286),
}
PUBLISHED = tuple(_PRINTED)
# The orientation that passes the sign check (module docstring): −1 means the printed loss is negated.
PUBLISHED_SIGN = {"itl": -1.0, "arl_ar_a40": 1.0, "arl_dr_a40": -1.0, "arl_ar_s80": -1.0, "arl_dr_s80": -1.0}
PUBLISHED_SPECS = {"itl": TaylorSpec("itl", 4), **{k: TaylorSpec("arl", 4) for k in _PRINTED if k != "itl"}}


def published_theta(name: str, as_printed: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Published coefficients, oriented by the adopted sign convention (module docstring).

    ``"itl"``: ITL Table 8 (ω0..ω11) with ω2..ω11 negated, for ``TaylorSpec("itl", 4)``.
    ``"arl_ar_a40"`` (as printed), ``"arl_dr_a40" | "arl_ar_s80" | "arl_dr_s80"`` (ω2.. negated): ARL
    Table A.2, for ``TaylorSpec("arl", 4)`` (``PUBLISHED_SPECS[name]``); the DR losses (θ1 ≈ 25) need the
    eq. A.2 rescaling (``normalise``) to train at ordinary learning rates. ``as_printed=True`` returns the
    raw table numbers.
    """
    if name not in _PRINTED:
        raise KeyError(f"published_theta: unknown name {name!r}; valid: {', '.join(PUBLISHED)}")
    theta = torch.tensor(_PRINTED[name], dtype=dtype)
    if not as_printed:
        theta[2:] = PUBLISHED_SIGN[name] * theta[2:]
    return theta


def true_class_rate(theta: torch.Tensor, spec: TaylorSpec, num_classes: int = 10, num_points: int = 4000,
                    seed: int = 0) -> float:
    """Fraction of predictions at which a gradient-descent step on the logits raises the true-class
    probability: −∇_z p_t · ∇_z L > 0, at Dirichlet(1) points of the simplex plus the uniform prediction.

    For cross-entropy ∇_z p_t · ∇_z L = −p_t ‖e_t − p‖² < 0 everywhere, so the rate is 1.
    """
    gen = torch.Generator().manual_seed(seed)
    # Dirichlet(1) = normalised Exp(1) draws; drawn with a local generator so the check is reproducible
    expo = -torch.rand(num_points, num_classes, generator=gen, dtype=torch.float64).clamp_min(1e-300).log()
    probs = torch.cat([torch.full((1, num_classes), 1.0 / num_classes, dtype=torch.float64),
                       expo / expo.sum(-1, keepdim=True)])
    logits = probs.clamp_min(1e-12).log().requires_grad_(True)
    targets = torch.zeros(len(probs), dtype=torch.long)  # class 0 is the true class (the family is symmetric)
    theta64 = theta.detach().to(torch.float64)
    # per-sample loss gradients: sum of per-sample losses (N * mean)
    loss = taylor_loss(logits, targets, theta64, spec) * len(probs)
    (g_loss,) = torch.autograd.grad(loss, logits)
    p_t = torch.softmax(logits, -1)[:, 0]
    (g_pt,) = torch.autograd.grad(p_t.sum(), logits)
    rises = -(g_pt * g_loss).sum(-1) > 0
    return float(rises.double().mean())


def descent_raises_true_class(theta: torch.Tensor, spec: TaylorSpec, num_classes: int = 10,
                              num_points: int = 4000, min_fraction: float = 0.9, seed: int = 0) -> bool:
    """The sign sanity check: gradient descent on the loss raises the true-class probability.

    True iff it does at the uniform prediction (1/C each, where training starts) and at no less than
    ``min_fraction`` of Dirichlet(1)-random predictions. The fraction is not 1 for losses with a soft
    minimum inside (0, 1) (ARL's claim), which push an over-confident true class back down.
    """
    uniform_ok = true_class_rate(theta, spec, num_classes, num_points=0, seed=seed) == 1.0
    return uniform_ok and true_class_rate(theta, spec, num_classes, num_points, seed) >= min_fraction


class TaylorLoss(torch.nn.Module):
    """A frozen Taylor loss as a drop-in ``loss_fn(logits, targets)`` (e.g. ERM with a learned ITL loss)."""

    def __init__(self, theta: torch.Tensor, spec: TaylorSpec = TaylorSpec()):
        super().__init__()
        _check_theta(torch.as_tensor(theta), spec)
        self.spec = spec
        self.register_buffer("theta", torch.as_tensor(theta).detach().clone())

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return taylor_loss(logits, targets, self.theta.to(logits.dtype), self.spec)

    def save(self, path) -> None:
        """Write the coefficients and the spec (``torch.save``; loadable with ``weights_only=True``)."""
        torch.save({"theta": self.theta.detach().cpu(), "parameterisation": self.spec.parameterisation,
                    "order": self.spec.order, "normalise": self.spec.normalise}, path)

    @classmethod
    def load(cls, path) -> "TaylorLoss":
        d = torch.load(path, map_location="cpu", weights_only=True)
        missing = {"theta", "parameterisation", "order"} - set(d)
        if missing:
            raise ValueError(f"TaylorLoss.load: {path} is not a saved TaylorLoss (missing {sorted(missing)})")
        return cls(d["theta"], TaylorSpec(d["parameterisation"], int(d["order"]), d.get("normalise")))

    def extra_repr(self) -> str:
        return f"spec={self.spec}"
