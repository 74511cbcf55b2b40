"""Oracle problems with closed-form hypergradients, shared by the tests (each is itself checked
against float64 finite differences in test_oracles.py)."""
from __future__ import annotations

import torch

import bilevel


def ridge(d: int = 5, n: int = 200, m: int = 100, dtype=torch.float64, seed: int = 0, scale_features: bool = True):
    """Ridge regression with per-feature log-penalties φ = λ.

    G(w, λ) = ‖Xw − y‖²/(2n) + ½ Σ_i exp(λ_i) w_i²,   F(w) = ‖X_v w − y_v‖²/(2m).
    w*(λ) = (A + D)⁻¹ Xᵀy/n with A = XᵀX/n, D = diag(exp λ), and
    dF/dλ = −exp(λ) ⊙ w* ⊙ (A + D)⁻¹ ∇_w F(w*).
    """
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64  # draw in float64 and cast, so that float32 and float64 problems are the same problem
    X = torch.randn(n, d, generator=gen, dtype=f64)
    if scale_features:
        X = X / X.std(dim=0, keepdim=True)
    w_true = torch.randn(d, generator=gen, dtype=f64)
    y = X @ w_true + 0.5 * torch.randn(n, generator=gen, dtype=f64)
    Xv = torch.randn(m, d, generator=gen, dtype=f64)
    yv = Xv @ w_true + 0.5 * torch.randn(m, generator=gen, dtype=f64)
    log_lambda = -1.0 + 0.3 * torch.randn(d, generator=gen, dtype=f64)
    X, y, Xv, yv, log_lambda = (t.to(dtype) for t in (X, y, Xv, yv, log_lambda))

    def inner_loss(inner, outer, batch):
        Xb, yb = batch
        r = Xb @ inner["w"] - yb
        return 0.5 * (r * r).mean() + 0.5 * (torch.exp(outer["log_lambda"]) * inner["w"] ** 2).sum()

    def outer_loss(inner, outer, batch):
        Xb, yb = batch
        r = Xb @ inner["w"] - yb
        return 0.5 * (r * r).mean()

    problem = bilevel.BilevelProblem(inner_loss, outer_loss)
    outer = {"log_lambda": log_lambda}
    inner = {"w": torch.full((d,), 0.1, dtype=dtype)}
    return problem, inner, outer, (X, y), (Xv, yv)


def ridge_solution(outer, inner_batch):
    X, y = inner_batch
    n = X.shape[0]
    H = X.T @ X / n + torch.diag(torch.exp(outer["log_lambda"]))
    return {"w": torch.linalg.solve(H, X.T @ y / n)}, H


def ridge_hypergrad(outer, inner_batch, outer_batch, ridge: float = 0.0):
    """Closed-form dF/dλ at w*(λ); with ``ridge`` ρ > 0, (H + ρI)⁻¹ in place of H⁻¹ (what damping δ, or a
    Nyström solve at full rank with ridge ρ, computes at the same w*)."""
    w, H = ridge_solution(outer, inner_batch)
    Xv, yv = outer_batch
    g_w = Xv.T @ (Xv @ w["w"] - yv) / Xv.shape[0]
    H = H + ridge * torch.eye(H.shape[0], dtype=H.dtype)
    return {"log_lambda": -torch.exp(outer["log_lambda"]) * w["w"] * torch.linalg.solve(H, g_w)}


def quadratic(p: int = 6, q: int = 3, dtype=torch.float64, seed: int = 1):
    """A quadratic with a cross term.

    G(θ, φ) = ½ θᵀAθ + θᵀBφ − bᵀθ,   F(θ, φ) = ½‖θ − t‖² + ½ φᵀCφ.
    θ*(φ) = A⁻¹(b − Bφ);  dF/dφ = −Bᵀ A⁻¹ (θ* − t) + Cφ.
    K SGD steps from θ₀ (step η): θ_K = (I − ηA)^K θ₀ + Σ_{j<K} (I − ηA)^j η(b − Bφ), so
    dθ_K/dφ = −η Σ_{j<K} (I − ηA)^j B.
    """
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(p, p, generator=gen, dtype=dtype)
    A = M @ M.T / p + torch.eye(p, dtype=dtype)
    B = torch.randn(p, q, generator=gen, dtype=dtype)
    b = torch.randn(p, generator=gen, dtype=dtype)
    t = torch.randn(p, generator=gen, dtype=dtype)
    C = torch.diag(torch.rand(q, generator=gen, dtype=dtype))
    consts = dict(A=A, B=B, b=b, t=t, C=C)

    def inner_loss(inner, outer, batch):
        th, ph = inner["theta"], outer["phi"]
        return 0.5 * th @ (A @ th) + th @ (B @ ph) - b @ th

    def outer_loss(inner, outer, batch):
        th, ph = inner["theta"], outer["phi"]
        return 0.5 * ((th - t) ** 2).sum() + 0.5 * ph @ (C @ ph)

    problem = bilevel.BilevelProblem(inner_loss, outer_loss)
    inner = {"theta": torch.zeros(p, dtype=dtype)}
    outer = {"phi": torch.randn(q, generator=gen, dtype=dtype)}
    return problem, inner, outer, consts


def quadratic_hypergrad(outer, c, ridge: float = 0.0):
    """Closed-form dF/dφ at θ*(φ); with ``ridge`` ρ > 0, (A + ρI)⁻¹ in place of A⁻¹ in the solve (θ* unchanged)."""
    th = torch.linalg.solve(c["A"], c["b"] - c["B"] @ outer["phi"])
    A = c["A"] + ridge * torch.eye(c["A"].shape[0], dtype=c["A"].dtype)
    return {"phi": -c["B"].T @ torch.linalg.solve(A, th - c["t"]) + c["C"] @ outer["phi"]}


def quadratic_unrolled_hypergrad(outer, inner, c, steps: int, lr: float):
    """Exact derivative of φ ↦ F(θ_K(φ), φ) for K plain-SGD steps (closed form above)."""
    A, B, b = c["A"], c["B"], c["b"]
    p = A.shape[0]
    step = torch.eye(p, dtype=A.dtype) - lr * A
    th = inner["theta"].clone()
    jac = torch.zeros(p, B.shape[1], dtype=A.dtype)
    for _ in range(steps):
        th = step @ th - lr * (B @ outer["phi"] - b)
        jac = step @ jac - lr * B
    return {"phi": jac.T @ (th - c["t"]) + c["C"] @ outer["phi"]}


def rel_error(a: dict, b: dict) -> float:
    fa = torch.cat([a[k].reshape(-1) for k in b]).double()
    fb = torch.cat([b[k].reshape(-1) for k in b]).double()
    return float((fa - fb).norm() / fb.norm())


def cosine(a: dict, b: dict) -> float:
    fa = torch.cat([a[k].reshape(-1) for k in b]).double()
    fb = torch.cat([b[k].reshape(-1) for k in b]).double()
    return float(fa @ fb / (fa.norm() * fb.norm()))


def fd_gradient(fn, outer: dict, eps: float = 1e-6) -> dict:
    """Central finite differences of a scalar function of a params dict, coordinate by coordinate."""
    out = {}
    for k, v in outer.items():
        g = torch.zeros_like(v)
        flat = g.view(-1)
        for i in range(v.numel()):
            e = torch.zeros_like(v).view(-1)
            e[i] = eps
            plus = dict(outer, **{k: v + e.view_as(v)})
            minus = dict(outer, **{k: v - e.view_as(v)})
            flat[i] = (fn(plus) - fn(minus)) / (2 * eps)
        out[k] = g
    return out
