"""AdaLFL: a loss network meta-learned online, one lookahead meta-step after every base step.

"Meta-Learning Adaptive Loss Functions" (AdaLFL; Raymond, Chen, Xue, Zhang; arXiv:2301.13247, 2023).
The base model f_θ is trained with the learned loss M_φ (``losses.loss_network``, eq. 3/14) and φ is
updated after every base step by differentiating the task loss L_T of the updated model on a held-out
validation batch through that one SGD step (eqs. 6–11, Algorithm 2)::

    θ_{t+1}(φ_t) = θ_t − α ∇_θ M_φt(y, f_θt(X))                       (inner G: the learned loss)
    φ_{t+1}      = φ_t − η ∇_φ L_T(y', f_{θ_{t+1}(φ_t)}(X'))          (outer F: MSE / cross-entropy)

θ is never reset (θ_t is a constant w.r.t. φ_t). ``build`` declares exactly that: a ``bilevel.Nested``
with one warm-started sub-problem (key ``"0"``, started from the online run's θ₀), an
``InnerLoop(steps=1, optimizer="sgd", lr=α)`` and the ``onestep`` solver; the outer loop keeps θ and its
optimiser state between steps and steps φ with Adam, lr 1e-5 (App. C). Before the online phase, φ is
initialised offline by ML³ (Algorithm 1: 2,500 meta-steps, each from a freshly initialised θ, one inner
step, Adam lr 1e-3). That is an outer loop too: ``build`` declares it (:func:`offline_init_declaration`,
not warm-started) and runs it through ``bilevel.run_locally`` with the run's solver spec.

Solvers: ``onestep`` (default) and the unrolled ones (``unroll``, ``forward``: with one inner step they
differentiate the same lookahead). The implicit solvers are refused (one SGD step from a warm start is not a
stationary point) and so is ``cmaes`` (a search over φ per base step is not the method).

Comparators in the same harness (``Config.representation`` / ``Config.online``):
  - baseline: ``representation="meta_lr", online=False, init_steps=0`` — SGD on L_T (lr scale fixed at 1);
    :func:`build_baseline` is the same SGD as a single-level objective, without the meta-gradient;
  - ML³ (offline): ``online=False`` — φ frozen after the offline initialisation (the outer optimiser is
    SGD with lr 0; the meta-gradient is still computed, since ``onestep`` also takes the base step);
  - Meta-LR (App. D.1, Algorithms 3–4): ``representation="meta_lr"`` — the inner loss is s·L_T, so the
    effective base learning rate α·s is meta-learned by the same one-step rule (logged as ``effective_lr``).

Explicit choices (the paper is silent): batch 32 for train and validation batches; the MLP has two hidden
layers of 100 ReLU units (Baydin et al.'s MLP has 1000 — too slow here); diabetes features z-scored and
the target min–max scaled to [0, 1] and centred at its mean, with training-split statistics, split 80/20 by
seed; digits split 70/30; 10 % of the training split held out as the validation set (App. C).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

import bilevel
from bilevel import RunContext
from .losses.loss_network import init_loss_network, learned_loss
from .noisy_training import minibatch_indices

Params = dict[str, torch.Tensor]


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
SOLVERS = ("online", "unrolled")
SOLVER_NOTE = ("AdaLFL differentiates one SGD step from a warm-started θ: implicit solvers differentiate at a "
               "stationary point of the learned loss, which one online step is not, and a zeroth-order search "
               "over φ per base step is not the method")


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


@dataclass(frozen=True)
class Parts:
    """The data, base model and losses of one config: what the offline init and the online phase share.

    Every method is a pure function of its arguments (the model is only a template for
    ``functional_call``), so the declarations built from it hold no mutable state.
    """

    cfg: Config
    data: dict
    model: nn.Module
    kind: str                             # "regression" | "classification"
    base_lr: float                        # α
    device: torch.device

    @property
    def problem(self) -> bilevel.BilevelProblem:
        return bilevel.BilevelProblem(self.inner_loss, self.outer_loss)

    @property
    def loop(self) -> bilevel.InnerLoop:
        """One plain SGD step with the base learning rate α (eq. 6)."""
        return bilevel.InnerLoop(steps=1, optimizer="sgd", lr=self.base_lr)

    def predict(self, theta: Params, x: torch.Tensor) -> torch.Tensor:
        out = functional_call(self.model, theta, (x,))
        return out.squeeze(-1) if self.kind == "regression" else out

    def task_loss(self, theta: Params, batch) -> torch.Tensor:
        """L_T: MSE (regression) or cross-entropy (classification)."""
        x, y = batch
        out = self.predict(theta, x)
        return F.mse_loss(out, y) if self.kind == "regression" else F.cross_entropy(out, y)

    def inner_loss(self, theta: Params, phi: Params, batch) -> torch.Tensor:
        """M_φ(y, f_θ(x)) (eq. 14), or s·L_T for the Meta-LR comparator."""
        if "lr_scale" in phi:
            return phi["lr_scale"] * self.task_loss(theta, batch)
        x, y = batch
        return learned_loss(phi, self.predict(theta, x), y, self.kind)

    def outer_loss(self, theta: Params, phi: Params, batch) -> torch.Tensor:
        """L_T(y', f_θ(x')) on the meta batch (eq. 8)."""
        return self.task_loss(theta, batch)

    def fresh_theta(self, index: int) -> Params:
        """Base-model init number ``index`` of seed ``cfg.seed`` (−1: the online run's θ₀).

        ``nn.Linear``'s init draws from the global CPU generator; it is seeded from (seed, index) inside
        ``fork_rng`` so that the init is a function of its index and the caller's generator is untouched.
        The model is built on the CPU, so only the CPU generator is seeded: ``torch.manual_seed`` would also
        seed every accelerator's generators, about 0.2 ms a call, once per outer step of the offline init.
        """
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(1_000_003 * self.cfg.seed + index + 1)
            model = make_base_model(self.cfg, *self._dims)
        return {k: v.detach().clone().to(self.device) for k, v in model.named_parameters()}

    @property
    def _dims(self) -> tuple[int, int]:
        return self.data["train"][0].shape[1], 1 if self.kind == "regression" else 10

    def batches(self, step: int, stream: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Minibatch ``step`` of the base (``stream`` 0: train) or meta (1: validation, or train) stream."""
        split = "train" if stream == 0 or self.cfg.meta_objective == "train" else "val"
        x, y = self.data[split]
        idx = minibatch_indices(len(y), self.cfg.batch, step, self.cfg.seed * 7 + stream + 1)
        return x[idx], y[idx]


def make_parts(cfg: Config, ctx: RunContext) -> Parts:
    """Check the config, load the data onto ``ctx.device`` and pick α."""
    if cfg.representation not in ("network", "meta_lr"):
        raise ValueError(f"adalfl: representation must be 'network' or 'meta_lr', got {cfg.representation!r}")
    if cfg.meta_objective not in ("validation", "train"):
        raise ValueError(f"adalfl: meta_objective must be 'validation' or 'train', got {cfg.meta_objective!r}")
    data = {k: tuple(t.to(ctx.device) for t in v) for k, v in load_data(cfg).items()}
    kind = "regression" if cfg.dataset == "diabetes" else "classification"
    model = make_base_model(cfg, data["train"][0].shape[1], 1 if kind == "regression" else 10)
    base_lr = cfg.base_lr or (0.001 if kind == "regression" else 0.01)
    return Parts(cfg, data, model, kind, base_lr, ctx.device)


def evaluate_base_model(parts: Parts, theta: Params, split: str = "test") -> dict[str, float]:
    """MSE (regression) or error rate (classification) of the base model θ on ``split`` ("test" or "val";
    keyed ``<split>_mse`` / ``<split>_error``), and L_T on the train split."""
    if split not in ("test", "val"):
        raise ValueError(f"adalfl: split must be 'test' or 'val', got {split!r}")
    with torch.no_grad():
        x, y = parts.data[split]
        out = parts.predict(theta, x)
        if parts.kind == "regression":
            metric = {f"{split}_mse": float(F.mse_loss(out, y))}
        else:
            metric = {f"{split}_error": float((out.argmax(-1) != y).float().mean())}
        metric["train_task_loss"] = float(parts.task_loss(theta, parts.data["train"]))
    return metric


def initial_phi(cfg: Config, ctx: RunContext) -> Params:
    """φ₀ before any meta-learning: a seeded loss network, or the Meta-LR scale s = 1."""
    if cfg.representation == "network":
        phi = init_loss_network(hidden=cfg.loss_hidden, seed=cfg.seed + 7)
    else:
        phi = {"lr_scale": torch.ones(())}
    return {k: v.to(ctx.device) for k, v in phi.items()}


def offline_init_declaration(parts: Parts, phi0: Params) -> bilevel.Nested:
    """ML³ (Algorithm 1): outer step t starts from the fresh θ number t, takes one inner SGD step on
    train batch t and scores it on meta batch t; Adam with lr ``cfg.init_lr``. Not warm-started."""

    def subproblems(info: bilevel.StepInfo) -> list[bilevel.SubProblem]:
        return [bilevel.SubProblem(inner=parts.fresh_theta(info.step), inner_batch=parts.batches(info.step, 0),
                                   outer_batch=parts.batches(info.step, 1))]

    return bilevel.Nested(problem=parts.problem, outer=phi0, loop=parts.loop, subproblems=subproblems,
                          default_solver=DEFAULT_SOLVER, optimizer="adam", lr=parts.cfg.init_lr, warm_start=False,
                          solvers=SOLVERS, solver_note=SOLVER_NOTE)


def offline_init(cfg: Config, ctx: RunContext, parts: Optional[Parts] = None
                 ) -> tuple[Params, list[dict[str, float]]]:
    """Run the ML³ initialisation (``cfg.init_steps`` outer steps, the run's solver spec) in this process.

    Returns φ after the init and the per-step metrics (``outer_loss`` is Algorithm 1's meta-objective).
    """
    parts = parts or make_parts(cfg, ctx)
    phi, history, _ = bilevel.run_locally(offline_init_declaration(parts, initial_phi(cfg, ctx)), cfg.init_steps,
                                          solver=ctx.solver_spec, seed=ctx.seed, device=ctx.device)
    return phi, history


def build(cfg: Config, ctx: RunContext, phi_init: Optional[Params] = None) -> bilevel.Nested:
    """The online phase (Algorithm 2), starting from the offline init's φ (or from ``phi_init``, which
    skips the init: ML³ and AdaLFL share one within a seed)."""
    parts = make_parts(cfg, ctx)
    if phi_init is not None:
        phi = {k: v.detach().clone().to(ctx.device) for k, v in phi_init.items()}
    elif cfg.init_steps > 0:
        phi, _ = offline_init(cfg, ctx, parts)
    else:
        phi = initial_phi(cfg, ctx)
    theta0 = parts.fresh_theta(-1)  # the base model of the online phase: identical across methods

    def subproblems(info: bilevel.StepInfo) -> list[bilevel.SubProblem]:
        # warm-started: θ₀ is used only at the first step; afterwards the loop continues from its own θ
        return [bilevel.SubProblem(inner=theta0, inner_batch=parts.batches(info.step, 0),
                                   outer_batch=parts.batches(info.step, 1))]

    def effective_lr(sub, result, outer) -> dict[str, float]:
        """Meta-LR's learned base rate α·s at this step's φ."""
        return {"effective_lr": float(outer["lr_scale"]) * parts.base_lr}

    def evaluate(outer: Params, inners: Mapping[str, Params]) -> dict[str, float]:
        return evaluate_base_model(parts, inners.get("0", theta0))  # θ₀ when no step has run

    return bilevel.Nested(
        problem=parts.problem, outer=phi, loop=parts.loop, subproblems=subproblems, default_solver=DEFAULT_SOLVER,
        # online=False (ML³, baseline): φ must not move, so the outer optimiser is SGD with lr 0; the
        # meta-gradient is still computed and logged (onestep takes the base step in the same pass)
        optimizer="adam" if cfg.online else "sgd", lr=cfg.meta_lr if cfg.online else 0.0,
        warm_start=True, solvers=SOLVERS, solver_note=SOLVER_NOTE,
        metrics=effective_lr if cfg.representation == "meta_lr" else None, evaluate=evaluate)


def build_baseline(cfg: Config, ctx: RunContext) -> bilevel.SingleLevel:
    """The paper's baseline as a single-level objective: plain SGD (lr α) on L_T from the online θ₀ with
    the online phase's train batches, no meta-gradient (for run-time ratios)."""
    parts = make_parts(cfg, ctx)

    def objective(theta: Params, info: bilevel.StepInfo):
        return parts.task_loss(theta, parts.batches(info.step, 0)), {}

    return bilevel.SingleLevel(params=parts.fresh_theta(-1), objective=objective, optimizer="sgd", lr=parts.base_lr,
                               evaluate=lambda theta, inners: evaluate_base_model(parts, theta),
                               kind="plain SGD on the task loss (AdaLFL's baseline)")


def loss_curve(phi: dict, target: float, points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """ℓ_φ(y = target, p) for p on [0, 1] (the paper's learned-loss plots)."""
    from .losses.loss_network import loss_network

    p = torch.linspace(0, 1, points)
    with torch.no_grad():
        values = loss_network(phi, torch.full_like(p, target), p)
    return p.numpy(), values.numpy()


__all__ = ["Config", "SMOKE", "DEFAULT_SOLVER", "build", "build_baseline", "offline_init",
           "offline_init_declaration", "make_parts", "Parts", "initial_phi", "evaluate_base_model", "load_data",
           "loss_curve"]
