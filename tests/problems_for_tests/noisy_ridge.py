"""Ridge regression with learned per-feature penalties on minibatches drawn from the GLOBAL torch RNG.

The kill/resume tests use it because its numbers depend on the random state a resumed run restores: every
outer step, ``subproblems(info)`` draws each sub-problem's train and validation minibatch indices with
``torch.randint`` from the global torch generator (not from a private one seeded by the step, as a real
problem should, see :mod:`bilevel.declare`). A resume that did not restore the RNG states, or that loaded
another checkpoint than the one it claims, therefore draws other minibatches and ends elsewhere.

    inner  G(w, φ) = ½‖X_B w − y_B‖²/|B| + ½ Σ_j exp(φ_j) w_j²        (B: the step's train minibatch)
    outer  F(w)    = ½‖X_V w − y_V‖²/|V|                             (V: the step's validation minibatch)

    w*(φ) = (X_BᵀX_B/|B| + diag e^φ)⁻¹ X_Bᵀy_B/|B|,
    dF/dφ = −e^φ ⊙ w* ⊙ (X_BᵀX_B/|B| + diag e^φ)⁻¹ X_Vᵀ(X_V w* − y_V)/|V|

``subproblems`` sub-problems per step (keys ``"0"``, ``"1"``, ...; default 2), warm-started, so that with 2
processes each process solves one of them (with 1, a zeroth-order solver's single-problem path runs).
With ``process_streams`` (default) process p discards p numbers from its global stream when the problem is
built, so the two processes draw different minibatches: a 2-process run then depends on *each* process's
RNG state, and a resume that restored process 0's state on every process diverges. (This deliberately
breaks the usual "2 processes end where 1 does"; ``process_streams=false`` restores it.)
``step_delay`` sleeps that many seconds per outer step: wall time only, so that a test can kill a run
between two checkpoints however fast its solver is.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

import bilevel
# the same losses and closed form as the ridge problem, here on minibatches (closed form: at the exact
# inner solution of the drawn train batch)
from bilevel.problems.ridge import closed_form_hypergrad, inner_loss, outer_loss  # noqa: F401


@dataclass(frozen=True)
class Config:
    features: int = 8
    pool_size: int = 128        # train and validation pools, drawn once from data_seed
    batch_size: int = 32        # minibatch drawn from each pool per sub-problem per outer step
    inner_steps: int = 40
    inner_lr: float = 0.5
    inner_optimizer: str = "sgd"        # "momentum": a non-empty optimiser state, which onestep carries over
    inner_momentum: float = 0.5
    outer_lr: float = 0.05
    init_log_penalty: float = -2.0
    noise: float = 0.5
    data_seed: int = 0
    subproblems: int = 2
    process_streams: bool = True
    step_delay: float = 0.0     # seconds of sleep per outer step (changes no number)


SMOKE = Config()
DEFAULT_SOLVER = "cg:rtol=1e-6"


def make_pools(cfg: Config) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train and validation pools from y = X w_true + noise (a private generator: independent of the RNG)."""
    g = torch.Generator().manual_seed(cfg.data_seed)
    w_true = torch.randn(cfg.features, generator=g)
    w_true[cfg.features // 2:] = 0.0
    pools = {}
    for split in ("train", "val"):
        x = torch.randn(cfg.pool_size, cfg.features, generator=g)
        pools[split] = (x, x @ w_true + cfg.noise * torch.randn(cfg.pool_size, generator=g))
    return pools


def draw(pool: tuple[torch.Tensor, torch.Tensor], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A minibatch of ``size`` rows of ``pool``, indices from the global torch RNG (on purpose, see above)."""
    index = torch.randint(len(pool[1]), (size,))
    return pool[0][index], pool[1][index]


def build(cfg: Config, ctx: bilevel.RunContext) -> bilevel.Nested:
    if cfg.subproblems < 1 or cfg.step_delay < 0:
        raise ValueError(f"noisy_ridge needs subproblems >= 1 and step_delay >= 0, got subproblems="
                         f"{cfg.subproblems}, step_delay={cfg.step_delay}; pass --set subproblems=1 or more")
    keys = [str(i) for i in range(cfg.subproblems)]
    pools = make_pools(cfg)
    # a non-zero start: dθ'/dφ ∝ w vanishes at w = 0, which would make a one-step lookahead exactly zero
    w0 = 0.1 * torch.randn(cfg.features, generator=torch.Generator().manual_seed(cfg.data_seed + 1))
    if cfg.process_streams and ctx.process_index:
        torch.rand(ctx.process_index)  # offset this process's global stream (see the module docstring)

    def subproblems(info: bilevel.StepInfo) -> list[bilevel.SubProblem]:
        time.sleep(cfg.step_delay)
        subs = []
        for key in keys:
            train, val = draw(pools["train"], cfg.batch_size), draw(pools["val"], cfg.batch_size)
            subs.append(bilevel.SubProblem(inner={"w": w0.to(ctx.device)},
                                           inner_batch=tuple(t.to(ctx.device) for t in train),
                                           outer_batch=tuple(t.to(ctx.device) for t in val), key=key))
        return subs

    def metrics(sub, result, outer) -> dict[str, float]:
        """The hypergradient's relative error against the closed form on this step's minibatches."""
        exact = closed_form_hypergrad(outer, sub.inner_batch, sub.outer_batch)
        g = result.hypergrad["log_penalty"].double()
        return {"rel_error_vs_closed_form": float((g - exact).norm() / exact.norm().clamp_min(1e-30))}

    def evaluate(outer, inners) -> dict[str, float]:
        x, y = pools["val"]
        return {f"val_loss_{k}": float(outer_loss(inners[k], outer, (x, y))) for k in keys if k in inners}

    return bilevel.Nested(
        problem=bilevel.BilevelProblem(inner_loss, outer_loss),
        outer={"log_penalty": torch.full((cfg.features,), cfg.init_log_penalty, device=ctx.device)},
        loop=bilevel.InnerLoop(steps=cfg.inner_steps, lr=cfg.inner_lr, optimizer=cfg.inner_optimizer,
                              momentum=cfg.inner_momentum),
        subproblems=subproblems, default_solver=DEFAULT_SOLVER, optimizer="adam", lr=cfg.outer_lr,
        warm_start=True, metrics=metrics, evaluate=evaluate)
