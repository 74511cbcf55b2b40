"""Zeroth-order search of the outer params with CMA-ES (the ``cma`` package, ask/tell).

Each call is one CMA-ES generation: ``popsize`` candidates φ_i ~ N(m, σ²C) are each scored by
F(θ_K(φ_i), φ_i) (the inner loop run from the given inner params), and the distribution is updated.
The returned pseudo-gradient is

    g = m_old − m_new,

so that an outer step φ ← φ − 1·g (SGD with lr = 1, the intended pairing) lands on the new mean. No
derivative of F or G is used: this suits non-differentiable outer objectives (accuracy) and rugged
landscapes. Candidates whose score is NaN/Inf (training diverged) are ranked last, scored as the worst
finite score plus one, and counted in ``diagnostics['nonfinite_candidates']``; a generation in which
every candidate is non-finite raises.
Reference: Hansen, "The CMA Evolution Strategy: A Tutorial", arXiv:1604.00772.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import cma
import numpy as np
import torch

from .. import tree
from ..errors import NonFiniteError
from ..types import HypergradResult


@dataclass
class CMAESState:
    """Picklable CMA-ES state: the ``cma.CMAEvolutionStrategy`` object and the generation count."""

    strategy: Any
    generation: int = 0


def sequential_map(fn: Callable[[Any], float], items: list) -> list[float]:
    """Evaluate candidates one after another (the default; the runner swaps in a multi-process map)."""
    return [fn(x) for x in items]


@dataclass(frozen=True)
class CMAES:
    """``cmaes``: one CMA-ES generation per call; pseudo-gradient m_old − m_new.

    Args:
        popsize: candidates per generation.
        sigma: initial step size σ₀ (in units of the outer params).
        seed: CMA-ES sampling seed (>= 1; cma treats 0 as "seed from the clock").
        evaluate_mean: also run the inner loop at the new mean, to report its outer loss and return its
            inner params (one extra inner run per generation).
        map_fn: ``map_fn(fn, candidates) -> scores``; the runner sets a multi-process map.
    """

    popsize: int = 8
    sigma: float = 0.1
    seed: int = 1
    evaluate_mean: bool = True
    map_fn: Optional[Callable] = field(default=None, compare=False, repr=False)
    # The runner replaces a task's outer optimiser by this: SGD with lr = 1 lands φ on the new mean.
    outer_update: ClassVar[tuple[str, float]] = ("sgd", 1.0)

    def __post_init__(self) -> None:
        if self.popsize < 2:
            raise ValueError(f"CMAES.popsize must be >= 2, got {self.popsize}")
        if self.seed < 1:
            raise ValueError(f"CMAES.seed must be >= 1 (cma seeds 0 from the clock), got {self.seed}")
        if not self.sigma > 0:
            raise ValueError(f"CMAES.sigma must be > 0, got {self.sigma}")

    def init(self, problem, inner, outer) -> CMAESState:
        x0 = tree.flatten(tree.detach(outer)).to(torch.float64).cpu().numpy()
        options = {"popsize": self.popsize, "seed": self.seed, "verbose": -9, "verb_disp": 0,
                   "verb_log": 0, "CMA_diagonal": False}
        if x0.size == 1:  # cma needs dimension >= 2; pad with a dummy coordinate that is never read
            x0 = np.concatenate([x0, [0.0]])
        return CMAESState(cma.CMAEvolutionStrategy(x0, self.sigma, options))

    def __call__(self, problem, inner, outer, inner_batch, outer_batch, loop, state) -> HypergradResult:
        if state is None:
            state = self.init(problem, inner, outer)
        theta0, like = tree.detach(inner), tree.detach(outer)
        n = tree.numel(like)
        ref = next(iter(like.values()))

        def to_params(vec) -> dict:
            return tree.unflatten(torch.as_tensor(np.asarray(vec)[:n], dtype=ref.dtype, device=ref.device), like)

        def run(vec):
            phi = to_params(vec)
            with torch.no_grad():
                theta, _, losses = loop.run(problem, theta0, phi, inner_batch, check_finite=False)
                inner_loss = float(losses[-1]) if losses.numel() else math.nan
                return float(problem.outer(theta, phi, outer_batch)), theta, inner_loss

        es = copy.deepcopy(state.strategy)  # tell() updates in place; keep the caller's state untouched
        mean_old = np.array(es.mean, copy=True)
        candidates = es.ask()
        scores = list((self.map_fn or sequential_map)(lambda v: run(v)[0], candidates))
        finite = [s for s in scores if math.isfinite(s)]
        if not finite:
            raise NonFiniteError(f"CMA-ES generation {state.generation}: every candidate's outer loss is "
                                 "NaN/Inf; lower sigma or the inner learning rate")
        worst = max(finite) + 1.0
        es.tell(candidates, [s if math.isfinite(s) else worst for s in scores])
        mean_new = np.array(es.mean, copy=True)
        hypergrad = to_params(mean_old - mean_new)
        best = int(np.argmin([s if math.isfinite(s) else math.inf for s in scores]))
        mean_score, theta, inner_loss = run(mean_new) if self.evaluate_mean else (min(finite), theta0, math.nan)
        diagnostics = {
            "outer_loss": mean_score, "inner_loss": inner_loss, "best_candidate_loss": min(finite),
            "mean_candidate_loss": float(np.mean(finite)), "sigma": float(es.sigma),
            "nonfinite_candidates": float(len(scores) - len(finite)), "best_index": float(best),
            "inner_steps": float(loop.steps), "hvp_count": 0.0,
            "evaluations": float(len(candidates) + int(self.evaluate_mean)),
        }
        if not self.evaluate_mean:  # no inner run at the new mean: report the best candidate, no inner loss
            del diagnostics["inner_loss"]
            diagnostics["outer_loss"] = min(finite)
        new_state = CMAESState(es, state.generation + 1)
        return HypergradResult(hypergrad, tree.detach(theta), diagnostics, new_state)
