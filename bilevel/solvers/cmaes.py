"""Zeroth-order search of the outer params with CMA-ES (the ``cma`` package, ask/tell).

Each call is one CMA-ES generation: ``popsize`` candidates φ_i ~ N(m, σ²C) are each scored by
F(θ_K(φ_i), φ_i) (the inner loop run from the given inner params), and the distribution is updated.
The returned pseudo-gradient is

    g = m_old − m_new,

so that an outer step φ ← φ − 1·g (SGD with lr = 1, the intended pairing) lands on the new mean. No
derivative of F or G is used: this suits non-differentiable outer objectives (accuracy) and rugged
landscapes. Candidates whose score is NaN/Inf (training diverged) are ranked last, scored as the worst
finite score plus one (or the next float above it, where +1 rounds away), and counted in ``diagnostics['nonfinite_candidates']``; a generation in which
every candidate is non-finite raises.
Reference: Hansen, "The CMA Evolution Strategy: A Tutorial", arXiv:1604.00772.

State as numbers, rebuilt by replay. A ``cma.CMAEvolutionStrategy`` can only be stored with pickle, and a
checkpoint must never be a pickle, so :class:`CMAESState` holds only numbers: the start mean ``x0``, the
step size ``sigma0``, ``popsize``, ``seed`` and ``fitness``, the (generations × popsize) float64 values told
to cma so far, in ask order (non-finite scores already replaced). The strategy is rebuilt from them by
replaying ask()/tell() from the start; ask() is a deterministic function of the strategy and of its random
source, which is cma's ``randn`` option set to a private ``numpy.random.RandomState(seed)`` (so cma
never reads or reseeds the global ``np.random``: with default options pycma draws random numbers only
through ``randn``; tests/test_cmaes_state.py checks this by trapping ``np.random``). The replayed strategy
is bitwise the one that ran. ``RandomState`` rather than ``numpy.random.Generator`` because its stream is
frozen by numpy's compatibility policy (a checkpoint replays the same after a numpy upgrade) and it is
the stream cma's own ``seed`` option used to draw from the global ``np.random`` (which it reseeded): runs
whose code draws nothing else from ``np.random`` sample the same candidates as before.

The alternative, storing the strategy's numeric internals (mean, σ, C, B, D, evolution paths, its
sampler's and step-size adaptation's state, counters...), depends on pycma's private attributes and
would silently break with a pycma upgrade; replay only uses its public ask/tell.

Replay cost: one ask() + tell() per past generation, no fitness evaluation: O(popsize·N²) for the
sampling and update plus an O(N³) eigendecomposition every few generations. Measured: 0.4 ms per
generation for N = 12, popsize 8 (1000 generations: 0.4 s); 9 ms for N = 100, popsize 16 — small against
the popsize inner-loop runs each generation costs. It is paid once per resume, not per call: the live
strategy is cached in the state (a field that is never stored) and each call advances a copy of it. The
stored history grows by popsize float64 per generation (8 bytes · popsize · generations).
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

# cma options besides popsize and the random source; fixed here (not stored) so that a stored state can only
# supply numbers: cma evaluates string-valued options with eval().
CMA_OPTIONS: dict[str, Any] = {"verbose": -9, "verb_disp": 0, "verb_log": 0, "CMA_diagonal": False}


class SeededRandn:
    """cma's ``randn(lam, N)`` option: standard normals from a private ``RandomState(seed)``.

    The same stream as cma's ``seed`` option with the default ``np.random.randn``, without touching the global
    ``np.random`` state. Picklable (a module-level class), so ``pickle`` / ``copy.deepcopy`` of a strategy
    keep their own copy of the random state.
    """

    def __init__(self, seed: int) -> None:
        self.random_state = np.random.RandomState(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.random_state.standard_normal(shape)


def new_strategy(x0: np.ndarray, sigma0: float, popsize: int, seed: int) -> cma.CMAEvolutionStrategy:
    """A fresh strategy; ``seed`` feeds :class:`SeededRandn` (cma's own ``seed`` option is switched off)."""
    options = dict(CMA_OPTIONS, popsize=popsize, seed=math.nan, randn=SeededRandn(seed))
    return cma.CMAEvolutionStrategy(np.array(x0, dtype=np.float64), sigma0, options)


@dataclass(eq=False)
class CMAESState:
    """CMA-ES state as numbers (storable without pickle); the strategy is rebuilt by replay.

    Attributes:
        x0: float64 (N,) start mean as given to cma (a 1-coordinate search is padded to N = 2).
        sigma0: initial step size.
        popsize: candidates per generation.
        seed: seed of cma's random source (see :class:`SeededRandn`).
        fitness: float64 (generations, popsize): the values told to cma, generation by generation, in the
            order ask() returned the candidates.
    """

    x0: torch.Tensor
    sigma0: float
    popsize: int
    seed: int
    fitness: torch.Tensor
    # The live strategy after the last generation: a cache, never stored (init=False fields are not), and
    # rebuilt by replay when absent. Read only: the solver advances a copy.
    _strategy: Optional[cma.CMAEvolutionStrategy] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # A loaded state is checked before cma sees it: wrong types or shapes are a clear error, not a replay
        # of something else.
        if not (isinstance(self.x0, torch.Tensor) and self.x0.dtype == torch.float64 and self.x0.dim() == 1
                and self.x0.numel() >= 2 and bool(torch.isfinite(self.x0).all())):
            raise ValueError("CMAESState.x0 must be a finite float64 vector with >= 2 entries")
        if type(self.sigma0) is not float or not self.sigma0 > 0 or not math.isfinite(self.sigma0):
            raise ValueError(f"CMAESState.sigma0 must be a finite float > 0, got {self.sigma0!r}")
        if type(self.popsize) is not int or self.popsize < 2:
            raise ValueError(f"CMAESState.popsize must be an int >= 2, got {self.popsize!r}")
        if type(self.seed) is not int or self.seed < 1:
            raise ValueError(f"CMAESState.seed must be an int >= 1, got {self.seed!r}")
        if not (isinstance(self.fitness, torch.Tensor) and self.fitness.dtype == torch.float64
                and self.fitness.dim() == 2 and self.fitness.shape[1] == self.popsize
                and bool(torch.isfinite(self.fitness).all())):
            raise ValueError(f"CMAESState.fitness must be a finite float64 (generations, popsize={self.popsize}) "
                             "tensor")

    @classmethod
    def start(cls, x0: np.ndarray, sigma0: float, popsize: int, seed: int) -> "CMAESState":
        """Generation 0."""
        return cls(torch.as_tensor(np.array(x0, dtype=np.float64)), float(sigma0), int(popsize), int(seed),
                   torch.zeros(0, int(popsize), dtype=torch.float64))

    @property
    def generation(self) -> int:
        """Generations told so far."""
        return int(self.fitness.shape[0])

    @property
    def strategy(self) -> cma.CMAEvolutionStrategy:
        """The strategy after :attr:`generation` generations (cached; replayed on first use). Do not mutate."""
        if self._strategy is None:
            self._strategy = self.replay()
        return self._strategy

    def replay(self) -> cma.CMAEvolutionStrategy:
        """Rebuild the strategy from the numbers: ask()/tell() with the stored fitness, generation by generation."""
        es = new_strategy(self.x0.numpy(), self.sigma0, self.popsize, self.seed)
        for row in self.fitness.tolist():  # Python floats: exactly the float64 values told the first time
            es.tell(es.ask(), row)
        return es

    def advanced(self, strategy: cma.CMAEvolutionStrategy, told: list[float]) -> "CMAESState":
        """The state after one more generation in which ``told`` was told to ``strategy`` (now its cache)."""
        row = torch.tensor([told], dtype=torch.float64)
        new = CMAESState(self.x0, self.sigma0, self.popsize, self.seed, torch.cat([self.fitness, row]))
        new._strategy = strategy
        return new


def sequential_map(fn: Callable[[Any], float], items: list) -> list[float]:
    """Evaluate candidates one after another (the default; the runner swaps in a multi-process map)."""
    return [fn(x) for x in items]


@dataclass(frozen=True)
class CMAES:
    """``cmaes``: one CMA-ES generation per call; pseudo-gradient m_old − m_new.

    Args:
        popsize: candidates per generation.
        sigma: initial step size σ₀ (in units of the outer params).
        seed: CMA-ES sampling seed (>= 1).
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
            raise ValueError(f"CMAES.seed must be >= 1 (0 would mean a clock seed, which cannot be replayed), "
                             f"got {self.seed}")
        if not self.sigma > 0:
            raise ValueError(f"CMAES.sigma must be > 0, got {self.sigma}")

    def init(self, problem, inner, outer) -> CMAESState:
        x0 = tree.flatten(tree.detach(outer)).to(torch.float64).cpu().numpy()
        if x0.size == 1:  # cma needs dimension >= 2; pad with a dummy coordinate that is never read
            x0 = np.concatenate([x0, [0.0]])
        return CMAESState.start(x0, self.sigma, self.popsize, self.seed)

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
        # strictly above every finite score: for scores ≥ 2**53, "+ 1.0" rounds back to max(finite), and pycma's
        # stable sort could then rank a failure that was asked earlier ahead of a finite candidate
        worst = max(max(finite) + 1.0, float(np.nextafter(max(finite), math.inf)))
        if not math.isfinite(worst):
            raise NonFiniteError(f"CMA-ES generation {state.generation}: a finite outer loss reaches the largest "
                                 "float, so the failed candidates cannot be ranked below it; rescale the outer loss")
        told = [float(s) if math.isfinite(s) else worst for s in scores]
        es.tell(candidates, told)
        mean_new = np.array(es.mean, copy=True)
        hypergrad = to_params(mean_old - mean_new)
        best = int(np.argmin([s if math.isfinite(s) else math.inf for s in scores]))
        # through the map too: one process evaluates the mean and all receive its result, so every process keeps
        # the same inner warm start even when processes draw different data (the checkpoint stores one copy)
        mean_score, theta, inner_loss = ((self.map_fn or sequential_map)(run, [mean_new])[0] if self.evaluate_mean
                                         else (min(finite), theta0, math.nan))
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
        return HypergradResult(hypergrad, tree.detach(theta), diagnostics, state.advanced(es, told))
