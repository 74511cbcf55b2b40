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
from bilevel import StepOutput, TaskDefaults
from problems.data import rotated_digits, to_tensors


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


class LODOTask(TaskDefaults):
    optimizer = "adam"

    def __init__(self, cfg, ctx):
        self.lr = cfg.outer_lr
        ds = rotated_digits()
        self.domains = sorted(set(ds["domain"]), key=float)
        self.data = {d: tuple(t.flatten(1) if t.dim() > 1 else t for t in to_tensors(ds, [d])) for d in self.domains}
        self.problem = bilevel.BilevelProblem(inner_loss, outer_loss)
        self.loop = bilevel.InnerLoop(steps=cfg.inner_steps, lr=0.5, optimizer="momentum")
        self.outer = {"log_l2": torch.full((64,), -4.0)}

    def step(self, outer, ctx, step):
        def held_out(domain):
            sources = [self.data[d] for d in self.domains if d != domain]
            train = (torch.cat([s[0] for s in sources]), torch.cat([s[1] for s in sources]))
            inner0 = {"W": torch.zeros(10, 64), "b": torch.zeros(10)}
            r = bilevel.hypergrad(self.problem, inner0, outer, inner_batch=train, outer_batch=self.data[domain],
                                  solver=ctx.solver, loop=self.loop, validate=False)
            return r.hypergrad["log_l2"], r.diagnostics["outer_loss"]

        results = ctx.map(held_out, self.domains)
        grad = torch.stack([g for g, _ in results]).mean(0)
        return StepOutput({"log_l2": grad}, {"outer_loss": sum(l for _, l in results) / len(results)})


def build(cfg, ctx):
    return LODOTask(cfg, ctx)
