"""The domain-generalisation harness: regularised risk minimisation over domains, declared single-level.

These methods are not nested: ``build_task`` returns a :class:`bilevel.SingleLevel` whose params are the
network params φ and whose objective is R(φ, t) (``algorithms.objective``); the outer loop differentiates
it. Data parallelism: with minibatches each process draws its own per-domain minibatches from a generator
seeded by (run seed, step, process index), so the runner's process-mean of the gradients is data-parallel
averaging; with full batches (``batch_size=None``, the IRM protocol) every process computes the same
gradient and the mean changes nothing. Asking one of these problems for a hypergradient solver is an error.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.func import functional_call

import bilevel
from bilevel import RunContext
from bilevel.tree import Params

from .algorithms import draw_probes, get_algorithm, objective
from .data import load_domains
from .hparams import IRM_CMNIST, default_hparams, random_hparams
from .model import accuracy, make_network, split

HP_KEYS = ("alpha", "beta", "hgp_mode", "reference", "reduction", "probes", "penalty_weight", "anneal_step",
           "warmup_weight", "rescale_after_anneal", "l2_weight")


@dataclass(frozen=True)
class DGConfig:
    """Defaults: the IRM Colored MNIST protocol the paper reuses (Sec. 5.2, 5.9; IRM code values)."""

    algorithm: str = "erm"
    dataset: str = "colored_mnist"              # see data.DATASETS
    test_domains: tuple[str, ...] = ("-90%",)   # held out from training
    network: str = "mlp"                         # IRM MLP: 2 ReLU layers of `hidden`, linear head
    hidden: int = IRM_CMNIST["hidden"]          # 390 (IRM code)
    optimizer: str = "adam"                      # IRM code
    lr: float = IRM_CMNIST["lr"]
    l2_weight: float = IRM_CMNIST["l2_weight"]  # ρ Σ‖W‖² on weight matrices (IRM code)
    batch_size: Optional[int] = None            # None: full batch per domain (IRM protocol)
    penalty_weight: float = IRM_CMNIST["penalty_weight"]   # λ after annealing (Sec. 5.2: 91257.18)
    anneal_step: int = IRM_CMNIST["anneal_step"]           # 190 (Sec. 5.2)
    warmup_weight: float = 1.0                   # λ before annealing (Sec. 5.2: "from 1")
    rescale_after_anneal: bool = True            # divide R by λ once λ > 1 (IRM code)
    alpha: float = 1.0                           # Hessian term (Eq. 18/23); α = β (Sec. 5.9)
    beta: float = 1.0                            # gradient term
    hgp_mode: str = "identity"                   # Eq. 21 identity, or "hvp"
    probes: int = 100                            # Hutchinson samples per domain (Sec. 4.2: 100)
    reference: str = "mean"                      # "mean" (Eq. 19-20) or "pooled" (authors' code)
    reduction: str = "mean"                      # mean over domains (Eq. 18 read) or "sum" (authors' CMNIST code)
    holdout: float = 0.0                         # DomainBed: 0.2 of each domain held out for validation
    minority: float = 0.05                       # colored_mnist_imbalanced: minority-class share (Sec. 5.3)
    synthetic_size: int = 200                    # dataset="synthetic": samples per domain
    per_env: Optional[int] = None                # colored_fashion_mnist: images per environment (None: 6,000)
    data_seed: Optional[int] = None              # None: the run seed (IRM redraws the colours per restart)
    hparam_trial: Optional[int] = None           # None: these values; k >= 0: DomainBed random-search trial k
    cache_dir: Optional[str] = None


def resolve(cfg: DGConfig) -> DGConfig:
    """Apply a DomainBed random-search draw (``hparam_trial``) and validate the fields."""
    get_algorithm(cfg.algorithm)
    if cfg.hparam_trial is not None:
        draw = random_hparams(cfg.algorithm, cfg.hparam_trial) if cfg.hparam_trial > 0 else \
            default_hparams(cfg.algorithm)
        cfg = dataclasses.replace(cfg, hparam_trial=None, **draw)
    if cfg.batch_size is not None and cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None (full batch), got {cfg.batch_size}")
    if not 0.0 <= cfg.holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {cfg.holdout}")
    if cfg.per_env is not None and cfg.dataset != "colored_fashion_mnist":
        raise ValueError(f"per_env sets the size of colored_fashion_mnist's environments; dataset {cfg.dataset!r} "
                         "has fixed sizes: drop per_env or use dataset=colored_fashion_mnist")
    return cfg


class DGTask:
    """The data, network and hyperparameters of one DG run; :meth:`declaration` is its
    :class:`bilevel.SingleLevel` record (holding :meth:`objective` and :meth:`evaluate`). Stateless across
    steps: batches and probes come from (seed, step, process) alone, the data from the seed."""

    def __init__(self, cfg: DGConfig, ctx: RunContext):
        self.cfg = cfg = resolve(cfg)
        self.algorithm = get_algorithm(cfg.algorithm)
        seed = ctx.seed if cfg.data_seed is None else cfg.data_seed
        domains = load_domains(cfg.dataset, seed, cfg.cache_dir, cfg.minority, ctx.device, cfg.synthetic_size,
                               cfg.per_env)
        unknown = [d for d in cfg.test_domains if d not in domains]
        if unknown:
            raise ValueError(f"test_domains {unknown} not in dataset {cfg.dataset!r}; its domains: {list(domains)}")
        self.train_names = [d for d in domains if d not in cfg.test_domains]
        if len(self.train_names) < 2:
            raise ValueError(f"need >= 2 training domains, got {self.train_names}; hold out fewer test_domains")
        self.splits = self._split(domains, seed)
        x0, y0 = domains[self.train_names[0]]
        num_classes = int(max(int(y.max()) for _, y in domains.values())) + 1
        outputs = 1 if num_classes == 2 else num_classes   # binary: one logit + BCE (IRM code)
        self.net = make_network(cfg.network, tuple(x0.shape[1:]), outputs, cfg.hidden, ctx.seed).to(ctx.device)
        self.params = {k: v.detach().clone() for k, v in self.net.named_parameters()}
        self.hp = {k: getattr(cfg, k) for k in HP_KEYS}

    def _split(self, domains, seed: int) -> dict[str, dict[str, tuple]]:
        """{domain: {"in": (X, y), "out": (X, y)}}: a seeded holdout per domain (DomainBed in/out splits)."""
        out = {}
        for i, (name, (x, y)) in enumerate(domains.items()):
            n_out = int(round(self.cfg.holdout * len(y)))
            perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed * 1000 + i)).to(y.device)
            out[name] = {"in": (x[perm[n_out:]], y[perm[n_out:]]), "out": (x[perm[:n_out]], y[perm[:n_out]])}
        return out

    def batches(self, generator: torch.Generator) -> list[tuple]:
        """Per-domain batches: the full training split, or a minibatch per domain and process."""
        out = []
        for name in self.train_names:
            x, y = self.splits[name]["in"]
            if self.cfg.batch_size is not None and self.cfg.batch_size < len(y):
                idx = torch.randperm(len(y), generator=generator)[: self.cfg.batch_size].to(y.device)
                x, y = x[idx], y[idx]
            out.append((x, y))
        return out

    def objective(self, params: Params, info: bilevel.StepInfo) -> tuple[torch.Tensor, dict]:
        """R(φ) at outer step ``info.step`` on this process's batches and Hutchinson probes."""
        gen = torch.Generator().manual_seed(((info.seed * 1_000_003) + info.step) * 1009 + info.process_index)
        batches = self.batches(gen)
        probes = draw_probes(self.algorithm, split(params)[1], len(batches), self.hp, gen)
        return objective(params, self.net, batches, self.algorithm, self.hp, info.step, probes)

    @torch.no_grad()
    def evaluate(self, outer: Params, inners: Any = None) -> dict[str, float]:
        """Accuracy on every domain's in/out split; ``test_acc`` = mean over test domains (all rows),
        ``train_acc`` = mean over training domains' in-splits, ``val_acc`` over their out-splits; and the
        algorithm's name, its training risk and penalty at these params (:meth:`objective_parts`)."""
        out: dict[str, float] = {}
        for name, parts in self.splits.items():
            for part, (x, y) in parts.items():
                if len(y):
                    out[f"acc/{name}/{part}"] = float(accuracy(functional_call(self.net, outer, (x,)), y))
        def mean(keys):
            vals = [out[k] for k in keys if k in out]
            return sum(vals) / len(vals) if vals else float("nan")
        out["train_acc"] = mean([f"acc/{d}/in" for d in self.train_names])
        if self.cfg.holdout > 0:
            out["val_acc"] = mean([f"acc/{d}/out" for d in self.train_names])
        test = []
        for d in self.cfg.test_domains:
            (xi, yi), (xo, yo) = self.splits[d]["in"], self.splits[d]["out"]
            test.append(float(accuracy(functional_call(self.net, outer, (torch.cat([xi, xo]),)), torch.cat([yi, yo]))))
        out["test_acc"] = sum(test) / len(test) if test else float("nan")
        out.update(self.objective_parts(outer))
        return out

    def objective_parts(self, outer: Params) -> dict:
        """What sets the methods apart at the final params, on the training domains' in-splits: the mean
        domain risk and this algorithm's own penalty P (unweighted; Hutchinson with fixed probes, seed 0)."""
        batches = [self.splits[d]["in"] for d in self.train_names]
        with torch.enable_grad():  # the penalties differentiate the head (torch.func transforms)
            _, metrics = objective(outer, self.net, batches, self.algorithm, {**self.hp, "anneal_step": 0,
                                   "penalty_weight": 1.0, "rescale_after_anneal": False}, 0,
                                   draw_probes(self.algorithm, split(outer)[1], len(batches), self.hp,
                                               torch.Generator().manual_seed(0)))
        out = {"algorithm": f"{self.algorithm.name}: {self.algorithm.doc}", "train_risk": float(metrics["nll"])}
        if self.algorithm.penalty is not None:
            out[f"penalty_{self.algorithm.name}"] = float(metrics["penalty"])
        return out

    def declaration(self) -> bilevel.SingleLevel:
        """The single-level record: the network params, R(φ) (:meth:`objective`), the optimiser, evaluation."""
        return bilevel.SingleLevel(params=self.params, objective=self.objective, optimizer=self.cfg.optimizer,
                                   lr=self.cfg.lr, evaluate=self.evaluate,
                                   kind=f"{self.cfg.algorithm}, regularised risk minimisation")


def build_task(cfg: DGConfig, ctx: RunContext) -> bilevel.SingleLevel:
    """The :class:`bilevel.SingleLevel` record of one DG algorithm (``DGTask(cfg, ctx).declaration()``).

    Scripts that also need the data or the network (e.g. the Hessian-distance dynamics of
    ``reproductions/colored_mnist.py``) build the :class:`DGTask` and call :meth:`DGTask.declaration`.
    """
    return DGTask(cfg, ctx).declaration()
