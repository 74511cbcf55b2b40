"""Theorem 3 (Hessian alignment bound) made computable (Hemati et al., ICCV 2023, Sec. 3.1).

Transfer measure (Def. 2, Eq. 2), Γ = argmin(L_S, δ_S) the δ_S-sublevel set of the source loss:

    T_Γ(S‖T) = sup_{θ∈Γ} [L_T(θ) − L_T*] − [L_S(θ) − L_S*]

Theorem 3: if L_S, L_T are μ-strongly convex and share the minimiser θ*, then
T_Γ ≤ ½ δ² ‖H_T − H_S‖₂ + o(δ²). The proof puts Γ inside the ball ‖θ − θ*‖ ≤ r with
(μ/2) r² = δ_S, i.e. **r = √(2δ_S/μ)**; the paper prints δ = 2δ_S/μ, which is not the radius and makes the
bound false for small δ_S (``tests/test_hessian_alignment.py`` shows both). We use δ := r = √(2δ_S/μ).

``transfer_measure_ball`` is the estimate of Zhang et al. (2021) used in the paper's Sec. 5.1: projected
gradient ascent of L_T − L_S over the ball (restarts from random boundary points), an upper bound of T_Γ when
θ* minimises both losses.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

Loss = Callable[[Tensor], Tensor]


def radius(delta_s: float, mu: float) -> float:
    """r = √(2 δ_S / μ): the ball around θ* containing the δ_S-sublevel set of a μ-strongly convex loss."""
    if delta_s <= 0 or mu <= 0:
        raise ValueError(f"need delta_s > 0 and mu > 0, got delta_s={delta_s}, mu={mu}")
    return math.sqrt(2 * delta_s / mu)


def hessian_bound(h_source: Tensor, h_target: Tensor, r: float) -> float:
    """½ r² ‖H_T − H_S‖₂ (spectral norm), the leading term of Theorem 3."""
    return 0.5 * r ** 2 * float(torch.linalg.matrix_norm(h_target - h_source, ord=2))


def transfer_measure_ball(loss_s: Loss, loss_t: Loss, theta_star: Tensor, r: float, steps: int = 300,
                          restarts: int = 8, lr: float = 0.1, seed: int = 0) -> float:
    """sup_{‖θ−θ*‖≤r} [L_T(θ) − L_T(θ*)] − [L_S(θ) − L_S(θ*)] by projected gradient ascent (Zhang et al. 2021).

    ``lr`` is relative: each step moves by lr·r along the normalised ascent direction, so the search scale
    follows the ball; the best value over ``restarts`` random starts on the sphere is returned.
    """
    gap0 = loss_t(theta_star) - loss_s(theta_star)

    def gap(th: Tensor) -> Tensor:
        return loss_t(th) - loss_s(th) - gap0

    g = torch.Generator().manual_seed(seed)
    best = -math.inf
    for _ in range(restarts):
        d = torch.randn(theta_star.shape, generator=g, dtype=theta_star.dtype)
        th = theta_star + r * d / d.norm()
        for _ in range(steps):
            # plain autograd: this loop is outside any transform, and torch.func.grad's per-call overhead
            # dominates on a 2-dimensional problem
            th = th.detach().requires_grad_(True)
            step = torch.autograd.grad(gap(th), th)[0]
            th = th.detach() + lr * r * step / step.norm().clamp_min(1e-300)
            delta = th - theta_star
            if delta.norm() > r:
                th = theta_star + r * delta / delta.norm()
        best = max(best, float(gap(th.detach())))
    return best
