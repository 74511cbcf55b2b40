"""A leave-one-domain-out workload for ``benchmarks/parallel.py``: 6 independent inner runs per step.

Each outer step trains, for each of the 6 rotation domains of the 8×8 digits held out in turn, a
logistic regression with learned per-pixel L2 penalties on the other 5 domains, and takes the CG
hypergradient of the held-out cross-entropy; the 6 hypergradients are averaged. The per-domain runs go
through ``ctx.map``, so under ``accelerate launch --num_processes 2`` each process does 3 of them.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import bilevel
from bilevel.problems.data import rotated_digits, to_tensors


@dataclass(frozen=True)
class Config:
    inner_steps: int = 300
    outer_lr: float = 0.1


SMOKE = Config(inner_steps=20)
DEFAULT_SOLVER = "cg:maxiter=50,rtol=1e-4"


def inner_loss(inner, outer, batch):
    x, y = batch
    logits = x @ inner["W"].T + inner["b"]
    penalty = 0.5 * (outer["log_l2"].exp() * (inner["W"] ** 2).sum(0)).sum()
    return F.cross_entropy(logits, y) + penalty + 0.5e-3 * (inner["W"] ** 2).sum()


def outer_loss(inner, outer, batch):
    x, y = batch
    return F.cross_entropy(x @ inner["W"].T + inner["b"], y)


def build(cfg, ctx):
    ds = rotated_digits()
    domains = sorted(set(ds["domain"]), key=float)
    data = {d: tuple(t.flatten(1) if t.dim() > 1 else t for t in to_tensors(ds, [d])) for d in domains}

    def subproblems(info):
        subs = []
        for domain in domains:
            sources = [data[d] for d in domains if d != domain]
            train = (torch.cat([s[0] for s in sources]), torch.cat([s[1] for s in sources]))
            subs.append(bilevel.SubProblem(inner={"W": torch.zeros(10, 64), "b": torch.zeros(10)}, inner_batch=train,
                                           outer_batch=data[domain], key=domain))
        return subs

    return bilevel.Nested(problem=bilevel.BilevelProblem(inner_loss, outer_loss), outer={"log_l2": torch.full((64,), -4.0)},
                          loop=bilevel.InnerLoop(steps=cfg.inner_steps, lr=0.5, optimizer="momentum"),
                          subproblems=subproblems, default_solver=DEFAULT_SOLVER, optimizer="adam", lr=cfg.outer_lr,
                          validate=False)
