"""The problems of the peer benchmark (benchmarks/peers.py), their exact hypergradients, and their export to JAX.

Every problem is a :class:`common.Problem` whose ``extra`` holds what the other parts need: ``kind`` (which
JAX twin in benchmarks/jax_peers.py computes the same losses), ``cg_iters`` (the fixed CG iteration count
every implicit method gets, set by :func:`references`), and the data layout. Problems, by key:

- ``ridge``: ridge regression with per-feature log-penalties, optionally tied in ``groups`` (dim φ = groups):
  G(w, φ) = ‖Xw − y‖²/(2n) + ½ Σ_i exp(φ_{i mod g}) w_i²,  F(w) = ‖X_v w − y_v‖²/(2m). Closed-form IFT
  hypergradient (:func:`ridge_exact`): dF/dφ_j = −Σ_{i mod g = j} exp(φ_j) w*_i [(A + D)⁻¹∇_wF(w*)]_i.
- ``mlp``: the 64-32-10 tanh MLP on digits with 64 per-pixel L2 penalties (``common.digits_mlp``), heavy ball.
- ``cnn``: a small CNN on 8×8 digits: conv 3×3 (C channels, padding 1), tanh, 2×2 average pool, linear
  16C → 10; φ = 2C log-penalties: one per conv channel (on its kernel) and one per channel block of the
  linear layer's inputs; + ½·10⁻²‖θ‖²; plain GD, lr 0.5.
- mlp and cnn are nonconvex: their implicit methods solve with damping δ = :data:`DAMPING`.
- ``hyperclean``: data hyper-cleaning (Franceschi et al. 2017): a 64×10 logistic regression on digits whose
  training labels are half corrupted; φ_i weights example i by σ(φ_i):
  G = (1/n) Σ_i σ(φ_i) CE_i + ½·10⁻³‖(W, b)‖², F = CE on clean validation data; 200 GD steps, 40 CG iterations.

Exact values (float64): ``ift`` is the implicit hypergradient at the K-step iterate (the closed form for ridge,
which assumes the inner problem solved; a dense Hessian solve at the float64 K-step iterate otherwise);
``loop`` is the exact derivative of the K-step loop (torch.func through the float64 loop), the value of
unrolled and forward methods; ``nystrom`` the same rank-k Nyström solve (same index set, ρ and δ) at the float64
K-step iterate; ``trunc`` that of the truncated unroll; ``onestep`` the one-step lookahead
derivative from the warm start; ``f2sa`` the same F2SA computation (fixed λ, steps on y and z from the warm
start) in float64. ``soba`` the same SOBA computation (steps on θ and v from the warm start, v = 0) in float64.
``bome`` the φ-part of the same BOME step (K inner steps from p.inner, η = common.BOME_ETA) in float64.
"""
from __future__ import annotations

import math
import os
import sys
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from common import Problem, hw_onestep, hw_run, hw_unroll  # noqa: E402
from common import F2SA_LAMBDA, F2SA_STEPS, hw_f2sa  # noqa: E402

TRUNCATE = 10
"""Steps differentiated by the truncated unroll (all methods of the ``unroll truncate`` family)."""

NYSTROM_RANK = 20
"""Hessian columns sampled by the ``nystrom`` family (every implementation: the same seeded index set)."""

DAMPING = 0.05
"""Tikhonov damping δ of every implicit method on the nonconvex problems (mlp, cnn): the float64 inner Hessian
at the K-step iterate has λ_min ≈ −0.003 (MLP) / −0.007 (CNN), so CG on H alone can break down; every
implementation solves (H + δI)x = ∇θF instead (ours ``damping=δ``, torchopt and jaxopt ``ridge=δ``, the
hand-written code adds δv; betty has no such option and gets none), and the exact value is the same damped
formula. κ(H + δI) ≈ 80 (MLP), 50 (CNN)."""

NETWORK_DENSE = ("a network: the dense Hessian's batched backward holds dim θ copies of the activations (1.8 GB and "
                 "25 s for a 690-parameter CNN)")
"""Why the ``exact`` family (dense Hessian) is left out of the mlp and cnn problems (``extra["dense"]``)."""


# --------------------------------------------------------------------------------------------------
# problems
# --------------------------------------------------------------------------------------------------
def ridge(d: int = 1000, groups: Optional[int] = None, steps: int = 100, dtype=torch.float32,
          seed: int = 0) -> Problem:
    """Ridge regression with d features whose log-penalties are tied in ``groups`` (None: one per feature).

    Feature i uses φ_{i mod g}. Data, n = d/2 and m = d/5 as ``common.ridge``; the GD step is 2/(λ_min + λ_max)
    of H at φ (contraction (κ − 1)/(κ + 1) per step).
    """
    base = common.ridge(d=d, steps=steps, dtype=torch.float64, seed=seed)
    g = d if groups is None else int(groups)
    if not 1 <= g <= d:
        raise ValueError(f"ridge groups must be in [1, d={d}], got {g}")
    if g == d:
        base.extra.update(kind="ridge", groups=d)
        return base.to(dtype)
    index = torch.arange(d) % g
    phi = {"log_lambda": 0.3 * torch.randn(g, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64)}
    X, _ = base.inner_batch
    H = X.T @ X / X.shape[0] + torch.diag(phi["log_lambda"][index].exp())
    ev = torch.linalg.eigvalsh(H)

    def inner_loss(inner, outer, batch):
        Xb, yb = batch
        r = Xb @ inner["w"] - yb
        return 0.5 * (r * r).mean() + 0.5 * (torch.exp(outer["log_lambda"][index]) * inner["w"] ** 2).sum()

    p = Problem(f"ridge d={d}, {g} penalty groups", inner_loss, base.outer_loss, base.inner, phi, base.inner_batch,
                base.outer_batch, steps, float(2.0 / (ev[0] + ev[-1])),
                extra=dict(base.extra, kind="ridge", groups=g, group_index=index, lambda_min=float(ev[0]),
                           lambda_max=float(ev[-1])))
    return p.to(dtype)


def ridge_exact(p: Problem) -> dict:
    """Closed-form IFT hypergradient of :func:`ridge` (float64), any number of groups."""
    X, y = (t.double() for t in p.inner_batch)
    Xv, yv = (t.double() for t in p.outer_batch)
    phi = p.outer["log_lambda"].double()
    d = X.shape[1]
    index = p.extra.get("group_index", torch.arange(d))
    lam = phi[index].exp()
    H = X.T @ X / X.shape[0] + torch.diag(lam)
    w = torch.linalg.solve(H, X.T @ y / X.shape[0])
    g_w = Xv.T @ (Xv @ w - yv) / Xv.shape[0]
    per_feature = -lam * w * torch.linalg.solve(H, g_w)
    return {"log_lambda": torch.zeros_like(phi).index_add_(0, index, per_feature)}


def digits_images(seed: int = 0):
    """(train, validation) digits as (N, 1, 8, 8) images in [0, 1] and labels (900 / 450 examples, float64)."""
    (x, y), (xv, yv) = common._digits(seed)
    return (x.reshape(-1, 1, 8, 8), y), (xv.reshape(-1, 1, 8, 8), yv)


def digits_cnn(steps: int = 100, channels: int = 8, train_size: int = 900, dtype=torch.float32,
               seed: int = 0) -> Problem:
    """The small CNN of the module docstring: conv(1→C, 3×3, pad 1) → tanh → 2×2 mean pool → linear(16C → 10),
    trained on the first ``train_size`` of the 900 training digits."""
    (x, y), val = digits_images(seed)
    train = (x[:train_size], y[:train_size])
    gen = torch.Generator().manual_seed(seed + 3)
    C = channels
    f64 = torch.float64
    theta0 = {"K": torch.randn(C, 1, 3, 3, generator=gen, dtype=f64) / 3.0, "c": torch.zeros(C, dtype=f64),
              "W": torch.randn(10, 16 * C, generator=gen, dtype=f64) / math.sqrt(16 * C), "b": torch.zeros(10, dtype=f64)}

    def forward(inner, x):
        h = torch.tanh(F.conv2d(x, inner["K"], inner["c"], padding=1))  # (N, C, 8, 8)
        h = h.reshape(x.shape[0], C, 4, 2, 4, 2).mean(dim=(3, 5))  # 2×2 average pool, as the JAX twin writes it
        return h.reshape(x.shape[0], 16 * C) @ inner["W"].T + inner["b"]

    def inner_loss(inner, outer, batch):
        x, labels = batch
        phi = outer["log_penalty"]
        conv = (torch.exp(phi[:C]) * (inner["K"] ** 2).sum(dim=(1, 2, 3))).sum()
        lin = (torch.exp(phi[C:]) * (inner["W"].reshape(10, C, 16) ** 2).sum(dim=(0, 2))).sum()
        base = 0.5e-2 * sum((v ** 2).sum() for v in inner.values())
        return F.cross_entropy(forward(inner, x), labels) + 0.5 * (conv + lin) + base

    def outer_loss(inner, outer, batch):
        x, labels = batch
        return F.cross_entropy(forward(inner, x), labels)

    p = Problem(f"digits CNN (conv 3×3×{C}, tanh, pool, linear; {2 * C} L2 penalties)", inner_loss, outer_loss,
                theta0, {"log_penalty": torch.full((2 * C,), -4.0, dtype=f64)}, train, val, steps, 0.5,
                extra={"kind": "cnn", "channels": C, "damping": DAMPING, "dense": NETWORK_DENSE})
    return p.to(dtype)


def hyperclean(steps: int = 200, corrupt: float = 0.5, dtype=torch.float32, seed: int = 0) -> Problem:
    """Data hyper-cleaning on digits (module docstring): 900 example weights σ(φ_i), 64×10 logistic model."""
    (x, y), val = common._digits(seed)
    gen = torch.Generator().manual_seed(seed + 2)
    n = len(y)
    flip = torch.randperm(n, generator=gen)[: int(corrupt * n)]
    noisy = y.clone()
    noisy[flip] = (y[flip] + torch.randint(1, 10, (len(flip),), generator=gen)) % 10  # a different label
    f64 = torch.float64

    def inner_loss(inner, outer, batch):
        xb, labels = batch
        ce = F.cross_entropy(xb @ inner["W"].T + inner["b"], labels, reduction="none")
        reg = 0.5e-3 * ((inner["W"] ** 2).sum() + (inner["b"] ** 2).sum())
        return (torch.sigmoid(outer["logit_weight"]) * ce).mean() + reg

    def outer_loss(inner, outer, batch):
        xb, labels = batch
        return F.cross_entropy(xb @ inner["W"].T + inner["b"], labels)

    p = Problem("data hyper-cleaning, digits, 64×10 logistic (900 example weights)", inner_loss, outer_loss,
                {"W": torch.zeros(10, 64, dtype=f64), "b": torch.zeros(10, dtype=f64)},
                {"logit_weight": torch.zeros(n, dtype=f64)}, (x, noisy), val, steps, 1.0,
                extra={"kind": "hyperclean", "cg_iters": 40, "corrupted": len(flip)})
    return p.to(dtype)


def mlp(steps: int = 200, hidden: int = 32, dtype=torch.float32) -> Problem:
    """``common.digits_mlp`` (heavy ball, lr 0.3, momentum 0.9) with the damping of the module docstring."""
    p = common.digits_mlp(steps=steps, hidden=hidden, dtype=dtype)
    p.extra.update(kind="mlp", hidden=hidden, damping=DAMPING, dense=NETWORK_DENSE)
    return p


def build(spec: dict) -> Problem:
    """The problem an instance spec names, e.g. ``{"problem": "ridge", "d": 1000, "groups": 10, "steps": 100}``."""
    kw = {k: v for k, v in spec.items() if k not in ("problem", "label")}
    fn = {"ridge": ridge, "mlp": mlp, "cnn": digits_cnn, "hyperclean": hyperclean}[spec["problem"]]
    return fn(**kw)


# --------------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------------
def dense_hessian(p: Problem, theta: dict) -> torch.Tensor:
    """Dense inner Hessian at ``theta`` (float64, chunked vmap of HVPs)."""
    keys, shapes, sizes = list(theta), [v.shape for v in theta.values()], [v.numel() for v in theta.values()]
    gfn = torch.func.grad(p.inner_loss)
    _, vjp_fn = torch.func.vjp(lambda th: gfn(th, p.outer, p.inner_batch), theta)

    def column(e):
        v = {k: t.reshape(s) for k, t, s in zip(keys, e.split(sizes), shapes)}
        return torch.cat([x.reshape(-1) for x in vjp_fn(v)[0].values()])

    n = sum(sizes)
    return torch.func.vmap(column, chunk_size=64)(torch.eye(n, dtype=torch.float64))


def _cg_iterations(H: torch.Tensor, b: torch.Tensor, rtol: float = 1e-6, cap: int = 500) -> int:
    """CG iterations a float64 solve H x = b needs to reach ‖r‖ ≤ rtol‖b‖ (from x = 0)."""
    x, r = torch.zeros_like(b), b.clone()
    d, rs, tol = r.clone(), float(r @ r), rtol * float(b.norm())
    for it in range(cap):
        if math.sqrt(rs) <= tol:
            return it
        hd = H @ d
        a = rs / float(d @ hd)
        x, r = x + a * d, r - a * hd
        rs_new = float(r @ r)
        d, rs = r + (rs_new / rs) * d, rs_new
    return cap


def references(p: Problem, with_loop: bool = True) -> dict:
    """float64 exact values (module docstring), λ_min/λ_max of H at θ_K (undamped), the fixed CG iteration count
    (``p.extra["cg_iters"]`` if set, else what float64 CG on H + δI needs for rtol 1e-6), the damping δ and the
    float32 warm start."""
    p64 = p.to(torch.float64)
    theta_k, _ = hw_run(p64, p64.inner, p64.outer, p64.steps)
    H = dense_hessian(p64, theta_k)
    H = 0.5 * (H + H.T)
    ev = torch.linalg.eigvalsh(H)
    H = H + p.extra.get("damping", 0.0) * torch.eye(H.shape[0], dtype=H.dtype)
    gt, gp = torch.func.grad(lambda th, ph: p64.outer_loss(th, ph, p64.outer_batch), argnums=(0, 1))(theta_k, p64.outer)
    b = torch.cat([v.reshape(-1) for v in gt.values()])
    if p.extra.get("kind") == "ridge":
        ift = ridge_exact(p64)
    else:
        keys, shapes, sizes = list(gt), [v.shape for v in gt.values()], [v.numel() for v in gt.values()]
        x = torch.linalg.solve(H, b)
        x = {k: t.reshape(s) for k, t, s in zip(keys, x.split(sizes), shapes)}
        gfn = torch.func.grad(p64.inner_loss)
        _, mixed = torch.func.vjp(lambda ph: gfn(theta_k, ph, p64.inner_batch), p64.outer)
        m = mixed(x)[0]
        ift = {k: gp[k] - m[k] for k in gp}
    warm32, _ = hw_run(p, p.inner, p.outer, p.steps)
    refs = {"ift": ift, "warm": warm32, "lambda_min": float(ev[0]), "lambda_max": float(ev[-1]),
            "damping": float(p.extra.get("damping", 0.0)),
            "cg_iters": int(p.extra.get("cg_iters") or max(5, _cg_iterations(H, b)))}
    s = solver_settings(refs)  # the nystrom target: the same Nyström solve in float64 (same K, ρ and δ)
    refs["nystrom"] = common.hw_implicit(p64, "nystrom", rank=s["rank"], rho=s["rho"], damping=refs["damping"])
    if with_loop:
        warm64 = {k: v.double() for k, v in warm32.items()}
        refs.update(loop=hw_unroll(p64), trunc=hw_unroll(p64, TRUNCATE), onestep=hw_onestep(p64, warm64))
        refs["f2sa"] = hw_f2sa(p64, warm64, F2SA_LAMBDA, F2SA_STEPS)  # the same F2SA computation in float64
        refs["soba"] = common.hw_soba(p64, warm64, v_lr=s["alpha"])  # the same SOBA computation in float64
        refs["bome"] = common.hw_bome(p64, p64.inner)  # the same BOME step from p.inner in float64
    return refs


def solver_settings(refs: dict) -> dict:
    """The iteration settings every implementation of a solver family shares (JSON-serialisable); nystrom: rank
    :data:`NYSTROM_RANK` and ridge ρ = 0.01 λ_max(H) (on top of the damping δ)."""
    lam_max = refs["lambda_max"] + refs["damping"]
    return {"cg_iters": refs["cg_iters"], "damping": refs["damping"], "alpha": float(f"{1.0 / lam_max:.4g}"),
            "rank": NYSTROM_RANK, "rho": float(f"{0.01 * refs['lambda_max']:.3g}"),
            "terms": 50,
            "fp_iters": 50, "truncate": TRUNCATE, "chunk": 32, "popsize": 8, "sigma": 0.1}


# --------------------------------------------------------------------------------------------------
# export for the JAX twin (benchmarks/jax_peers.py)
# --------------------------------------------------------------------------------------------------
def export_npz(p: Problem, path: str, meta: dict) -> None:
    """Write the problem's data, initial params and settings to ``path`` (float32 arrays, int64 labels).

    Array names: ``inner/<name>``, ``outer/<name>``, ``inner_batch/<i>``, ``outer_batch/<i>``, ``group_index``;
    ``meta`` (JSON text) holds the kind, names in order, steps, lr, momentum, channels and the solver settings.
    """
    import json
    arrays = {}
    for k, v in p.inner.items():
        arrays[f"inner/{k}"] = v.detach().numpy()
    for k, v in p.outer.items():
        arrays[f"outer/{k}"] = v.detach().numpy()
    for name, batch in (("inner_batch", p.inner_batch), ("outer_batch", p.outer_batch)):
        for i, t in enumerate(batch):
            arrays[f"{name}/{i}"] = t.detach().numpy()
    if "group_index" in p.extra:
        arrays["group_index"] = p.extra["group_index"].numpy()
    info = {"kind": p.extra["kind"], "inner_names": list(p.inner), "outer_names": list(p.outer), "steps": p.steps,
            "lr": p.lr, "momentum": p.momentum, "channels": p.extra.get("channels", 0), **meta}
    arrays["meta"] = np.array(json.dumps(info))
    np.savez(path, **arrays)
