"""ERM baseline in the domain-generalisation harness.

Vapnik, 1999 (as run by DomainBed, Gulrajani & Lopez-Paz, ICLR 2021).

    R = (1/n) Σ_e L_e (+ the IRM protocol's L2 term).

Not a nested problem: the Task's outer params are the network params and ``step`` returns ∇R (see
``problems/domain_generalization/harness.py``). Defaults are the IRM Colored MNIST protocol the Hessian
alignment paper reuses (Sec. 5.2: full batch, Adam, 501 steps, penalty 1 → 91257.18 at step 190);
``hparam_trial=k`` switches to DomainBed's defaults (k = 0) or random-search trial k.
"""
from __future__ import annotations

from dataclasses import dataclass

from bilevel import RunContext
from problems.domain_generalization.harness import DGConfig, DGTask, build_task

NAME = "erm"


@dataclass(frozen=True)
class Config(DGConfig):
    algorithm: str = NAME


SMOKE = Config(dataset="synthetic", hidden=16, anneal_step=2, penalty_weight=10.0)
DEFAULT_SOLVER = "cg"   # unused: regularised risk minimisation has no hypergradient to solve for


def build(cfg: Config, ctx: RunContext) -> DGTask:
    if cfg.algorithm != NAME:
        raise ValueError(f"problems.erm builds algorithm {NAME!r}, got algorithm={cfg.algorithm!r}; "
                         f"use the problem module of that algorithm")
    return build_task(cfg, ctx)
