"""ARL (Automated Robust Loss): a label-noise-robust Taylor loss searched by CMA-ES.

B. Gao, PhD thesis ch. 3 (Gao, Gouk, Hospedales, "Searching for Robustness: Loss Learning for Noisy
Classification Tasks", ICCV 2021). θ = the 12 coefficients of the order-4 Taylor loss (eq. 3.4–3.5, with
the min–max rescaling of App. A.3, eq. A.2), ω = network weights (the thesis's Ch. 3 notation):

    max_θ  E_{D,f} [ M(f_{ω*_D}, D^val) ]   s.t.  ω*_D = argmin_ω L_θ(f_ω, D^train)      (3.1)
    E_{D,f}[M] ≈ (1/N) Σ_j M(f^(j)_{ω_j}, D_j^val)                                        (3.2)

D^train carries synthetic label noise (80 % symmetric or 40 % pair-flip), D^val is clean, M is accuracy.
Algorithm 6: each generation samples candidate losses from N(µ, σ²C), trains every
(architecture, dataset) pair from scratch with each candidate, and moves the search distribution with
CMA-ES towards the candidates with the highest mean clean-validation accuracy. Two meta-training
conditions: architecture randomisation (AR: several networks, one dataset) and dataset randomisation
(DR: one network, several datasets).

Here: the registered ``cmaes`` solver (one generation per outer step, pseudo-gradient m_old − m_new,
outer SGD with lr = 1 so the outer params are the CMA-ES mean), candidates scored through ``ctx.map``
(split across Accelerate processes). The bilevel problem trains all the condition's networks at once:
the inner params are the union of the networks' params (keys ``"{k}.{name}"``) and the inner loss is the
sum of each network's Taylor loss on its own noisy minibatch, so the networks train independently.
The outer loss is 1 − mean clean-validation accuracy (NaN for a diverged network: ranked last).

Explicit choices (the thesis is silent): 8×8 data (``problems.noisy_training``), η = 10 in eq. A.2, the
Brier score as the initial mean (a proper loss of O(1) coefficients, so one σ suits every coordinate),
σ₀ = 0.5, popsize 8, a fixed budget of inner steps ("trained to convergence" is unaffordable here), and
fresh network initialisations every generation, drawn from (seed, generation) so a resumed run repeats
the uninterrupted one. The learned loss is the final CMA-ES mean (the thesis does not say mean or best).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
from torch.func import functional_call

import bilevel
from bilevel import RunContext, StepOutput
from problems.losses.taylor import (TaylorLoss, TaylorSpec, descent_raises_true_class, initial_theta,
                                   taylor_loss)
from problems.noisy_training import accuracy, load_split, make_model, minibatch_indices


@dataclass(frozen=True)
class Config:
    condition: str = "ar"                               # "ar" | "dr" (Sec. 3.4.2)
    noise: str = "symmetric"                            # "symmetric" (80 %) | "pairflip" (40 %), Sec. 3.5.1
    rate: float = 0.8
    architectures: tuple[str, ...] = ("mlp2", "mlp3", "cnn")   # AR pool (Table A.1 analogues)
    datasets: tuple[str, ...] = ("digits",)                     # AR: one dataset (MNIST in the thesis)
    dr_architecture: str = "mlp2"                       # DR: one network (the thesis's CNN; an MLP is cheaper)
    dr_datasets: tuple[str, ...] = ("digits", "digits_rot90", "digits_inverted")  # DR pool (MNIST/KMNIST/CIFAR-10)
    inner_steps: int = 600                              # "trained to convergence": a fixed budget here
    batch: int = 64                                     # not stated in the thesis
    inner_lr: float = 0.01                              # SGD lr 0.01, momentum 0.9 (Sec. 3.5.1)
    momentum: float = 0.9
    eta: float = 10.0                                   # η of eq. A.2 (not stated)
    init: str = "brier"                                 # initial CMA-ES mean (not stated)
    popsize: int = 8                                    # not stated (pycma's default for 12-d is 11)
    sigma: float = 0.5                                  # not stated
    data_seed: int = 0


SMOKE = Config(architectures=("linear", "mlp2"), inner_steps=5, popsize=4, batch=32)
DEFAULT_SOLVER = "cmaes:popsize=8,sigma=0.5,seed=1"


def pairs(cfg: Config) -> list[tuple[str, str]]:
    """The (architecture, dataset) pairs every candidate is trained on: F × D of Algorithm 6."""
    if cfg.condition == "ar":
        return [(a, d) for a in cfg.architectures for d in cfg.datasets]
    if cfg.condition == "dr":
        return [(cfg.dr_architecture, d) for d in cfg.dr_datasets]
    raise ValueError(f"arl: condition must be 'ar' (architecture randomisation) or 'dr' (dataset "
                     f"randomisation), got {cfg.condition!r}")


class ARLTask:
    """One CMA-ES generation per outer step; state = the CMA-ES distribution (picklable ``cma`` object)."""

    optimizer = "sgd"
    lr = 1.0  # the cmaes pseudo-gradient is m_old − m_new: SGD with lr 1 lands on the new mean

    def __init__(self, cfg: Config, ctx: RunContext):
        if cfg.noise not in ("symmetric", "pairflip") or not 0 <= cfg.rate < 1:
            raise ValueError(f"arl: noise must be 'symmetric' or 'pairflip' with rate in [0, 1), got "
                             f"{cfg.noise!r} at {cfg.rate}")
        self.cfg, self.device = cfg, ctx.device
        self.spec = TaylorSpec("arl", 4, normalise=cfg.eta)
        self.pairs = pairs(cfg)
        self.data = {d: load_split(d, cfg.noise, cfg.rate, cfg.data_seed) for d in {d for _, d in self.pairs}}
        self.models = [make_model(a, self.data[d].in_shape) for a, d in self.pairs]
        self.outer = {"theta": initial_theta(self.spec, cfg.init).to(ctx.device)}
        self.problem = bilevel.BilevelProblem(self.inner_loss, self.outer_loss)
        self.loop = bilevel.InnerLoop(steps=cfg.inner_steps, optimizer="momentum", lr=cfg.inner_lr,
                                      momentum=cfg.momentum)
        self.outer_batch = tuple((self.data[d].x_val, self.data[d].y_val) for _, d in self.pairs)
        self.solver_state: Any = None
        self.history: list[dict[str, float]] = []

    # --- the bilevel problem -----------------------------------------------------------------------
    def _split(self, inner: dict) -> list[dict]:
        return [{k.split(".", 1)[1]: v for k, v in inner.items() if k.split(".", 1)[0] == str(i)}
                for i in range(len(self.models))]

    def inner_loss(self, inner, outer, batch):
        """Σ_k L̂_θ(f_k(x_k), ỹ_k): each network's normalised Taylor loss (eq. 3.4–3.5, A.2) on its own
        noisy minibatch."""
        total = 0.0
        for model, params, (x, y) in zip(self.models, self._split(inner), batch):
            total = total + taylor_loss(functional_call(model, params, (x,)), y, outer["theta"], self.spec)
        return total

    def outer_loss(self, inner, outer, batch):
        """1 − mean clean-validation accuracy (eq. 3.2); NaN if any network diverged."""
        accs = [accuracy(functional_call(m, p, (x,)), y) for m, p, (x, y) in zip(self.models, self._split(inner), batch)]
        return torch.tensor(1.0 - sum(accs) / len(accs), dtype=outer["theta"].dtype)

    def inner_batch(self, step: int):
        out = []
        for k, (_, d) in enumerate(self.pairs):
            s = self.data[d]
            idx = minibatch_indices(len(s.y_train), self.cfg.batch, step, self.cfg.data_seed * 131 + k)
            out.append((s.x_train[idx], s.y_train[idx]))
        return tuple(out)

    def init_inner(self, generation: int) -> dict:
        """Fresh networks for generation ``generation``, seeded from (data_seed, generation)."""
        torch.manual_seed(10_007 * self.cfg.data_seed + generation)
        inner = {}
        for k, model in enumerate(self.models):
            for layer in model.modules():
                if hasattr(layer, "reset_parameters"):
                    layer.reset_parameters()
            inner.update({f"{k}.{n}": p.detach().clone().to(self.device) for n, p in model.named_parameters()})
        return inner

    # --- Task interface ----------------------------------------------------------------------------
    def step(self, outer, ctx: RunContext, step: int) -> StepOutput:
        solver = bilevel.make_solver(ctx.solver_spec)
        if not isinstance(solver, bilevel.CMAES):
            raise ValueError(f"arl searches a non-differentiable fitness (accuracy): use the 'cmaes' solver, "
                             f"got {ctx.solver_spec!r}")
        solver = bilevel.make_solver(solver, map_fn=ctx.map)  # candidates split across processes
        result = bilevel.hypergrad(self.problem, self.init_inner(step), outer, inner_batch=self.inner_batch,
                                   outer_batch=self.outer_batch, solver=solver, loop=self.loop,
                                   state=self.solver_state, validate=False)
        self.solver_state = result.state
        metrics = dict(result.diagnostics)
        metrics["clean_val_acc_mean"] = 1.0 - metrics["outer_loss"]
        metrics["clean_val_acc_best_candidate"] = 1.0 - metrics["best_candidate_loss"]
        self.history.append(metrics)
        return StepOutput(grads=result.hypergrad, metrics=metrics)

    def evaluate(self, outer, ctx: RunContext) -> dict[str, float]:
        """Clean validation accuracy of the meta-training pairs trained with the mean loss, and its sign check."""
        theta = outer["theta"].detach()
        with torch.no_grad():
            inner, _, _ = self.loop.run(self.problem, self.init_inner(10**6), {"theta": theta}, self.inner_batch,
                                        check_finite=False)
            acc = 1.0 - float(self.outer_loss(inner, {"theta": theta}, self.outer_batch))
        return {"clean_val_acc": acc, "descent_raises_true_class": float(descent_raises_true_class(theta.cpu(), self.spec))}

    def learned_loss(self, outer) -> TaylorLoss:
        """The learned loss as a drop-in ``loss_fn(logits, targets)`` (``.save(path)`` / ``TaylorLoss.load``)."""
        return TaylorLoss(outer["theta"].detach().cpu(), self.spec)

    def state_dict(self) -> dict[str, Any]:
        return {"solver_state": self.solver_state, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.solver_state, self.history = state["solver_state"], list(state["history"])

    def check_instance(self) -> Optional[dict[str, Any]]:
        return None  # zeroth-order search of a non-differentiable fitness: no hypergradient to check


def build(cfg: Config, ctx: RunContext) -> ARLTask:
    return ARLTask(cfg, ctx)


def with_condition(cfg: Config, condition: str, noise: str, rate: float) -> Config:
    """``cfg`` with another meta-training condition / noise (for scripts)."""
    return replace(cfg, condition=condition, noise=noise, rate=rate)
