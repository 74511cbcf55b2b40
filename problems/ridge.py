"""Ridge regression with learned per-feature penalties: the closed-form problem of the core tests.

    inner  G(w, φ) = ½‖Xw − y‖²/n + ½ Σ_j exp(φ_j) w_j²          (training set)
    outer  F(w)    = ½‖X_v w − y_v‖²/n_v                         (validation set)

    w*(φ) = (XᵀX/n + diag e^φ)⁻¹ Xᵀy/n,
    dF/dφ = −e^φ ⊙ w* ⊙ (XᵀX/n + diag e^φ)⁻¹ X_vᵀ(X_v w* − y_v)/n_v

The inner loop runs gradient descent on the scaled weights u = w ⊙ √(1 + e^φ) (``inner["u"]``), not on w:

    G̃(u, φ) = G(u ⊙ s, φ),   F̃(u, φ) = F(u ⊙ s),   s = (1 + e^φ)^(−1/2)

The minimiser, and so F(w*(φ)) and its total derivative dF/dφ, are the same (u* = w* ⊙ √(1 + e^φ)); what
changes is the Hessian GD sees, ∇²_u G̃ = S(XᵀX/n)S + diag(e^φ/(1 + e^φ)) with S = diag(s) ≤ I, whose
largest eigenvalue stays below L = λ_max(XᵀX/n) + 1 however large the penalties grow. On w, ∇²_w G =
XᵀX/n + diag e^φ grows with the learned penalties: the penalties of irrelevant features rise without bound,
so any fixed inner step size eventually exceeds 2/λ_max and the inner loop (then the run) diverges (on w
with step 0.5, ``bilevel run ridge --steps 50`` diverged near outer step 29). The default inner
step size is 1.5/L, computed from the training data.

Synthetic data from a sparse ground truth, so learned penalties should grow on the irrelevant features.
Runs in seconds; every solver applies. This file is also the template for a problem: a frozen
``Config``, a ``SMOKE`` config, ``DEFAULT_SOLVER`` and ``build(cfg, ctx) -> bilevel.Nested``, a plain
record of what the problem is; the outer loop builds the solver, keeps the warm starts and steps φ.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch

import bilevel
from bilevel import RunContext


@dataclass(frozen=True)
class Config:
    features: int = 50          # d
    relevant: int = 10          # features with a non-zero true weight
    train_size: int = 100
    val_size: int = 200
    noise: float = 0.5
    inner_steps: int = 200      # full-batch inner steps (warm-started across outer steps)
    inner_lr: float = 0.0       # 0: 1.5/L, L = λ_max(XᵀX/n) + 1 bounds the inner Hessian (module docstring)
    outer_lr: float = 0.1
    init_log_penalty: float = -2.0
    data_seed: int = 0


SMOKE = Config(features=10, relevant=3, train_size=40, val_size=40, inner_steps=50)
DEFAULT_SOLVER = "cg:maxiter=100,rtol=1e-6"  # float32: CG stalls near 1e-7 (machine epsilon × cond(H))


def make_data(cfg: Config) -> dict[str, torch.Tensor]:
    """Train/validation/test sets from y = X w_true + noise, w_true non-zero on the first ``relevant``."""
    g = torch.Generator().manual_seed(cfg.data_seed)
    w_true = torch.zeros(cfg.features)
    w_true[: cfg.relevant] = torch.randn(cfg.relevant, generator=g)
    out = {}
    for split, n in (("train", cfg.train_size), ("val", cfg.val_size), ("test", cfg.val_size)):
        x = torch.randn(n, cfg.features, generator=g)
        out[split] = (x, x @ w_true + cfg.noise * torch.randn(n, generator=g))
    return out


def inner_loss(inner, outer, batch):
    x, y = batch
    return 0.5 * ((x @ inner["w"] - y) ** 2).mean() + 0.5 * (outer["log_penalty"].exp() * inner["w"] ** 2).sum()


def outer_loss(inner, outer, batch):
    x, y = batch
    return 0.5 * ((x @ inner["w"] - y) ** 2).mean()


def scale(outer) -> torch.Tensor:
    """s = (1 + e^φ)^(−1/2): the weights are w = u ⊙ s (module docstring)."""
    return (1 + outer["log_penalty"].exp()).rsqrt()


def weights(inner, outer) -> dict[str, torch.Tensor]:
    """The ridge weights w = u ⊙ s of the scaled inner params ``{"u": u}``."""
    return {"w": inner["u"] * scale(outer)}


def scaled_inner_loss(inner, outer, batch):
    """G̃(u, φ) = G(u ⊙ s, φ): the inner loss in the coordinates the inner loop runs in."""
    return inner_loss(weights(inner, outer), outer, batch)


def scaled_outer_loss(inner, outer, batch):
    """F̃(u, φ) = F(u ⊙ s): the validation loss of the weights the scaled params stand for."""
    return outer_loss(weights(inner, outer), outer, batch)


def inner_step_size(cfg: Config, train) -> float:
    """``cfg.inner_lr``, or 1.5/L with L = λ_max(XᵀX/n) + 1 ≥ λ_max(∇²_u G̃) when it is 0: GD on a quadratic is
    stable below 2/λ_max, and 1.5/L contracts every direction by at most max(1 − 1.5 λ_min/L, 0.5) per step."""
    if cfg.inner_lr < 0:
        raise ValueError(f"ridge: inner_lr must be > 0, or 0 for 1.5/L, got {cfg.inner_lr}")
    if cfg.inner_lr:
        return cfg.inner_lr
    x = train[0].double()
    return 1.5 / (float(torch.linalg.eigvalsh(x.T @ x / len(x)).max()) + 1.0)


def closed_form_hypergrad(outer: dict, train, val) -> torch.Tensor:
    """dF/dφ by the formula in the module docstring (float64)."""
    x, y = (t.double() for t in train)
    xv, yv = (t.double() for t in val)
    lam = outer["log_penalty"].double().exp()
    a = x.T @ x / len(y) + torch.diag(lam)
    w = torch.linalg.solve(a, x.T @ y / len(y))
    v = torch.linalg.solve(a, xv.T @ (xv @ w - yv) / len(yv))
    return -lam * w * v


def build(cfg: Config, ctx: RunContext) -> bilevel.Nested:
    """One sub-problem per outer step, warm-started: the inner weights continue from the previous step."""
    data = {k: tuple(t.to(ctx.device) for t in v) for k, v in make_data(cfg).items()}
    train, val, test = data["train"], data["val"], data["test"]

    def subproblems(info: bilevel.StepInfo) -> list[bilevel.SubProblem]:
        return [bilevel.SubProblem(inner={"u": torch.zeros(cfg.features, device=ctx.device)}, inner_batch=train,
                                   outer_batch=val)]

    def metrics(sub, result, outer) -> dict[str, float]:
        """The hypergradient's relative error against the closed form at this step's φ."""
        exact = closed_form_hypergrad(outer, train, val)
        g = result.hypergrad["log_penalty"].double()
        return {"rel_error_vs_closed_form": float((g - exact).norm() / exact.norm().clamp_min(1e-30))}

    def evaluate(outer, inners) -> dict[str, float]:
        w = weights(inners["0"], outer)
        return {"val_loss": float(outer_loss(w, outer, val)),
                "test_loss": float(outer_loss(w, outer, test)),
                "mean_log_penalty_relevant": float(outer["log_penalty"][: cfg.relevant].mean()),
                "mean_log_penalty_irrelevant": float(outer["log_penalty"][cfg.relevant:].mean())}

    return bilevel.Nested(
        problem=bilevel.BilevelProblem(scaled_inner_loss, scaled_outer_loss),
        outer={"log_penalty": torch.full((cfg.features,), cfg.init_log_penalty, device=ctx.device)},
        loop=bilevel.InnerLoop(steps=cfg.inner_steps, lr=inner_step_size(cfg, train), optimizer="sgd"),
        subproblems=subproblems, default_solver=DEFAULT_SOLVER, optimizer="adam", lr=cfg.outer_lr,
        warm_start=True, metrics=metrics, evaluate=evaluate)
