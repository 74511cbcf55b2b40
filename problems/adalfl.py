"""AdaLFL: a loss network meta-learned online, one lookahead meta-step after every base step.

"Meta-Learning Adaptive Loss Functions" (AdaLFL; Raymond, Chen, Xue, Zhang; arXiv:2301.13247, 2023).
The base model f_θ is trained with the learned loss M_φ (``problems.losses.loss_network``, eq. 3/14) and
φ is updated after every base step by differentiating the task loss L_T of the updated model on a
held-out validation batch through that one SGD step (eqs. 6–11, Algorithm 2)::

    θ_{t+1}(φ_t) = θ_t − α ∇_θ M_φt(y, f_θt(X))                       (inner G: the learned loss)
    φ_{t+1}      = φ_t − η ∇_φ L_T(y', f_{θ_{t+1}(φ_t)}(X'))          (outer F: MSE / cross-entropy)

θ is never reset (θ_t is a constant w.r.t. φ_t). This is exactly the registered ``onestep`` solver with
an ``InnerLoop(steps=1, optimizer="sgd", lr=α)``: each outer step returns dF/dφ and the updated θ, which
the task keeps. Before the online phase, φ is initialised offline by ML³ (Algorithm 1: 2,500 meta-steps,
each from a freshly initialised θ, one inner step, Adam lr 1e-3); ``build`` runs it. The online phase
uses Adam with lr 1e-5 (App. C), the runner's outer optimiser.

Comparators in the same harness (``Config.representation`` / ``Config.online``):
  - baseline: ``representation="meta_lr", online=False, init_steps=0`` — SGD on L_T (lr scale fixed at 1);
  - ML³ (offline): ``online=False`` — φ frozen after the offline initialisation;
  - Meta-LR (App. D.1, Algorithms 3–4): ``representation="meta_lr"`` — the inner loss is s·L_T, so the
    effective base learning rate α·s is meta-learned by the same one-step rule.

Explicit choices (the paper is silent): batch 32 for train and validation batches; the MLP has two hidden
layers of 100 ReLU units (Baydin et al.'s MLP has 1000 — too slow here); diabetes features z-scored and
the target min–max scaled to [0, 1] and centred at its mean, with training-split statistics, split 80/20 by seed; digits split
70/30; 10 % of the training split held out as the validation set (App. C).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import bilevel
from bilevel import RunContext, StepOutput
from problems.losses.loss_network import init_loss_network, learned_loss
from problems.noisy_training import minibatch_indices


@dataclass(frozen=True)
class Config:
    dataset: str = "diabetes"             # "diabetes" (Sec. 4.1) | "digits" (MNIST stand-in)
    model: str = "mlp"                    # "mlp" (2 hidden layers) | "logistic"
    hidden: int = 100                     # MLP width (Baydin et al. use 1000; smaller for CPU)
    representation: str = "network"       # "network" (AdaLFL / ML³) | "meta_lr" (App. D.1 / baseline)
    online: bool = True                   # False: φ frozen after the offline init (ML³, baseline)
    meta_objective: str = "validation"    # "validation" (Alg. 2) | "train" (Table 6)
    base_lr: Optional[float] = None       # α: 0.001 regression, 0.01 classification (App. C)
    batch: int = 32                       # not stated
    init_steps: int = 2500                # S_init (Sec. 2.3)
    init_lr: float = 1e-3                 # Adam, offline (App. C)
    meta_lr: float = 1e-5                 # Adam, online (App. C)
    loss_hidden: int = 40                 # loss network: 2 hidden layers of 40 (App. B)
    seed: int = 0                         # base init and data order; identical across methods
    data_seed: int = 0


SMOKE = Config(init_steps=3, hidden=8, loss_hidden=6)
DEFAULT_SOLVER = "onestep"


def load_data(cfg: Config) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train / validation (10 % of train) / test tensors; regression targets shaped (N,)."""
    g = torch.Generator().manual_seed(cfg.data_seed)
    if cfg.dataset == "diabetes":
        from sklearn.datasets import load_diabetes

        x, y = (torch.from_numpy(a.astype(np.float32)) for a in load_diabetes(return_X_y=True))
        test_frac = 0.2
    elif cfg.dataset == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = torch.from_numpy(d.data.astype(np.float32) / 16.0), torch.from_numpy(d.target).long()
        test_frac = 0.3
    else:
        raise ValueError(f"adalfl: dataset must be 'diabetes' or 'digits', got {cfg.dataset!r}")
    perm = torch.randperm(len(y), generator=g)
    n_test = int(test_frac * len(y))
    test, rest = perm[:n_test], perm[n_test:]
    n_val = int(0.1 * len(rest))
    val, train = rest[:n_val], rest[n_val:]
    if cfg.dataset == "diabetes":  # scale with training-split statistics only
        mu, sd = x[train].mean(0), x[train].std(0)
        lo, hi = y[train].min(), y[train].max()
        # centring the [0, 1]-scaled target at its training mean leaves every MSE unchanged but puts a
        # fresh network's predictions (≈ 0) at the mean: without it the one-step offline init learns a
        # degenerate loss that pushes every prediction up, which then diverges online (see docs/adalfl.md)
        y = (y - lo) / (hi - lo)
        x, y = (x - mu) / sd, y - y[train].mean()
    return {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": (x[test], y[test])}


def make_base_model(cfg: Config, in_dim: int, out_dim: int) -> nn.Module:
    if cfg.model == "logistic":
        return nn.Linear(in_dim, out_dim)
    if cfg.model == "mlp":
        return nn.Sequential(nn.Linear(in_dim, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(),
                             nn.Linear(cfg.hidden, out_dim))
    raise ValueError(f"adalfl: model must be 'mlp' or 'logistic', got {cfg.model!r}")


class AdaLFLTask:
    """The online phase; the base model θ and its optimiser state are the task's state."""

    optimizer = "adam"

    def __init__(self, cfg: Config, ctx: RunContext, phi_init: Optional[dict] = None):
        if cfg.representation not in ("network", "meta_lr"):
            raise ValueError(f"adalfl: representation must be 'network' or 'meta_lr', got {cfg.representation!r}")
        if cfg.meta_objective not in ("validation", "train"):
            raise ValueError(f"adalfl: meta_objective must be 'validation' or 'train', got {cfg.meta_objective!r}")
        self.cfg, self.device = cfg, ctx.device
        self.data = {k: tuple(t.to(ctx.device) for t in v) for k, v in load_data(cfg).items()}
        self.kind = "regression" if cfg.dataset == "diabetes" else "classification"
        out_dim = 1 if self.kind == "regression" else 10
        self.model = make_base_model(cfg, self.data["train"][0].shape[1], out_dim)
        self.base_lr = cfg.base_lr or (0.001 if self.kind == "regression" else 0.01)
        self.lr = cfg.meta_lr
        self.loop = bilevel.InnerLoop(steps=1, optimizer="sgd", lr=self.base_lr)
        self.problem = bilevel.BilevelProblem(self.inner_loss, self.outer_loss)
        if cfg.representation == "network":
            phi = init_loss_network(hidden=cfg.loss_hidden, seed=cfg.seed + 7)
        else:
            phi = {"lr_scale": torch.ones(())}
        self.outer = {k: v.to(ctx.device) for k, v in phi.items()}
        if phi_init is not None:  # reuse an offline init (ML³ and AdaLFL share it within a seed)
            self.outer, self.init_curve = {k: v.detach().clone().to(ctx.device) for k, v in phi_init.items()}, []
        else:
            self.init_curve = self.offline_init(ctx) if cfg.init_steps > 0 else []
        self.theta = self.fresh_theta(-1)   # the base model of the online phase: identical across methods
        self.opt_state: Any = None

    # --- the bilevel problem -----------------------------------------------------------------------
    def predict(self, theta, x):
        out = functional_call(self.model, theta, (x,))
        return out.squeeze(-1) if self.kind == "regression" else out

    def task_loss(self, theta, batch):
        x, y = batch
        out = self.predict(theta, x)
        return F.mse_loss(out, y) if self.kind == "regression" else F.cross_entropy(out, y)

    def inner_loss(self, theta, phi, batch):
        """M_φ(y, f_θ(x)) (eq. 14), or s·L_T for the Meta-LR comparator."""
        if "lr_scale" in phi:
            return phi["lr_scale"] * self.task_loss(theta, batch)
        x, y = batch
        return learned_loss(phi, self.predict(theta, x), y, self.kind)

    def outer_loss(self, theta, phi, batch):
        """L_T(y', f_θ(x')) on the meta batch (eq. 8)."""
        return self.task_loss(theta, batch)

    def fresh_theta(self, index: int) -> dict:
        """Base-model init number ``index`` of seed ``cfg.seed`` (−1: the online run's θ₀)."""
        torch.manual_seed(1_000_003 * self.cfg.seed + index + 1)
        for layer in self.model.modules():
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
        return {k: v.detach().clone().to(self.device) for k, v in self.model.named_parameters()}

    def batches(self, step: int, stream: int) -> tuple:
        split = "train" if stream == 0 or self.cfg.meta_objective == "train" else "val"
        x, y = self.data[split]
        idx = minibatch_indices(len(y), self.cfg.batch, step, self.cfg.seed * 7 + stream + 1)
        return x[idx], y[idx]

    def offline_init(self, ctx: RunContext) -> list[float]:
        """ML³ (Algorithm 1): θ reset every meta-step, one inner step, meta-objective on a validation batch."""
        phi = {k: v.detach().clone().requires_grad_(True) for k, v in self.outer.items()}
        opt = torch.optim.Adam(list(phi.values()), lr=self.cfg.init_lr)
        curve = []
        for t in range(self.cfg.init_steps):
            res = bilevel.hypergrad(self.problem, self.fresh_theta(t), {k: v.detach() for k, v in phi.items()},
                                    inner_batch=self.batches(t, 0), outer_batch=self.batches(t, 1),
                                    solver="onestep", loop=self.loop, validate=t == 0)
            for k, p in phi.items():
                p.grad = res.hypergrad[k]
            opt.step()
            curve.append(res.diagnostics["outer_loss"])
        self.outer = {k: v.detach() for k, v in phi.items()}
        return curve

    # --- Task interface ----------------------------------------------------------------------------
    def step(self, outer, ctx: RunContext, step: int) -> StepOutput:
        result = bilevel.hypergrad(self.problem, self.theta, outer, inner_batch=self.batches(step, 0),
                                   outer_batch=self.batches(step, 1), solver=ctx.solver_spec, loop=self.loop,
                                   state=self.opt_state, validate=step == 0)
        self.theta, self.opt_state = result.inner, result.state
        grads = result.hypergrad if self.cfg.online else {k: torch.zeros_like(v) for k, v in outer.items()}
        metrics = dict(result.diagnostics)
        if "lr_scale" in outer:
            metrics["effective_lr"] = float(outer["lr_scale"]) * self.base_lr
        return StepOutput(grads=grads, metrics=metrics)

    def evaluate(self, outer, ctx: RunContext) -> dict[str, float]:
        """Test MSE (regression) or error rate (classification) of the current base model."""
        with torch.no_grad():
            x, y = self.data["test"]
            out = self.predict(self.theta, x)
            if self.kind == "regression":
                metric = {"test_mse": float(F.mse_loss(out, y))}
            else:
                metric = {"test_error": float((out.argmax(-1) != y).float().mean())}
            metric["train_task_loss"] = float(self.task_loss(self.theta, self.data["train"]))
        return metric

    def state_dict(self) -> dict[str, Any]:
        return {"theta": self.theta, "opt_state": self.opt_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.theta, self.opt_state = state["theta"], state["opt_state"]

    def check_instance(self) -> Optional[dict[str, Any]]:
        """The one-step lookahead from the current θ: ``bilevel.check`` with ``solver="onestep"``."""
        return dict(problem=self.problem, inner=self.theta, outer=self.outer, inner_batch=self.batches(0, 0),
                    outer_batch=self.batches(0, 1), loop=self.loop)


def build(cfg: Config, ctx: RunContext, phi_init: Optional[dict] = None) -> AdaLFLTask:
    """The online task; ``phi_init`` skips the offline init and starts from the given φ."""
    return AdaLFLTask(cfg, ctx, phi_init)


def loss_curve(phi: dict, target: float, points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """ℓ_φ(y = target, p) for p on [0, 1] (the paper's learned-loss plots)."""
    from problems.losses.loss_network import loss_network

    p = torch.linspace(0, 1, points)
    with torch.no_grad():
        values = loss_network(phi, torch.full_like(p, target), p)
    return p.numpy(), values.numpy()


__all__ = ["Config", "SMOKE", "DEFAULT_SOLVER", "build", "AdaLFLTask", "load_data", "loss_curve"]
