"""A problem file of your own: per-feature L2 penalties of a linear model on scikit-learn's diabetes data.

    G(w, φ) = mean((X w − y)²) + Σ_j exp(φ_j) w_j²     (training half)
    F(w)    = mean((X_v w − y_v)²)                       (validation half)

Run it by path: ``bilevel compare examples/my_problem.py --solvers cg,unroll --reference exact``,
``bilevel run examples/my_problem.py --steps 50 --out runs/mine`` (README, "Your own problem").
"""
from dataclasses import dataclass

import torch
from sklearn.datasets import load_diabetes

import bilevel


@dataclass(frozen=True)
class Config:
    inner_steps: int = 300      # full-batch gradient steps, warm-started across outer steps
    inner_lr: float = 0.1       # stable while λ_max(2XᵀX/n + 2 diag e^φ) < 20
    outer_lr: float = 0.05      # Adam on φ


SMOKE = Config(inner_steps=20)
DEFAULT_SOLVER = "cg"


def build(cfg: Config, ctx: bilevel.RunContext) -> bilevel.Nested:
    x, y = (torch.tensor(a, dtype=torch.float32) for a in load_diabetes(return_X_y=True))
    x, y = ((x - x.mean(0)) / x.std(0)).to(ctx.device), ((y - y.mean()) / y.std()).to(ctx.device)
    train, val = (x[:221], y[:221]), (x[221:], y[221:])

    def inner_loss(inner, outer, batch):
        xb, yb = batch
        return ((xb @ inner["w"] - yb) ** 2).mean() + (outer["log_l2"].exp() * inner["w"] ** 2).sum()

    def outer_loss(inner, outer, batch):
        xb, yb = batch
        return ((xb @ inner["w"] - yb) ** 2).mean()

    return bilevel.Nested(
        problem=bilevel.BilevelProblem(inner_loss, outer_loss),
        outer={"log_l2": torch.full((10,), -3.0, device=ctx.device)},
        loop=bilevel.InnerLoop(steps=cfg.inner_steps, lr=cfg.inner_lr, optimizer="sgd"),
        subproblems=lambda info: [bilevel.SubProblem(inner={"w": torch.zeros(10, device=ctx.device)},
                                                     inner_batch=train, outer_batch=val)],
        default_solver=DEFAULT_SOLVER, optimizer="adam", lr=cfg.outer_lr, warm_start=True,
        evaluate=lambda outer, inners: {"val_mse": float(outer_loss(inners["0"], outer, val))})
