"""What a problem file declares: a plain record of what the problem *is*. The outer loop does the rest.

A problem file's ``build(cfg, ctx)`` returns one of two frozen records:

- :class:`Nested`: a bilevel problem ``min_φ F(θ*(φ), φ)`` — the :class:`~bilevel.BilevelProblem`, the
  initial outer params, the :class:`~bilevel.InnerLoop`, a function that makes each outer step's
  :class:`SubProblem` s (fresh or warm-started inner params and batches), how their hypergradients are
  combined (``"mean"``, ``"pcgrad"``), the outer optimiser, which kinds of solver apply, and what to
  evaluate at the end. The solver is *not* part of it: the outer loop builds it from the run's spec.
- :class:`SingleLevel`: a regularised-risk method (ERM, IRM, V-REx, CORAL, Fishr, HGP, Hutchinson ...),
  ``min_φ R(φ)``, whose gradient needs no hypergradient solver; asking one of them for a solver is an
  error.

Neither record holds mutable state: warm starts, solver state and the outer optimiser live in the one
outer loop (:class:`bilevel.OuterLoop`), which also checkpoints them. Everything random in a step must be
drawn from the :class:`StepInfo` (seed, step, process), so a resumed or multi-process run repeats a
one-process run exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from torch import Tensor

from .inner import InnerLoop
from .solvers.registry import KINDS
from .tree import Params
from .types import Batch, BilevelProblem, HypergradResult
from .verdict import Verdict

Metrics = dict[str, float]
# An evaluation: numbers, and per-seed lists (paired across methods by seed) that a Verdict compares.
Evaluation = dict[str, Union[float, list[float]]]


@dataclass(frozen=True)
class StepInfo:
    """Where an outer step runs: its index, the run's seed and the process layout."""

    step: int
    seed: int = 0
    process_index: int = 0
    num_processes: int = 1


@dataclass(frozen=True)
class SubProblem:
    """One nested problem of an outer step (e.g. one held-out domain, one task of a meta-batch).

    Attributes:
        inner: the inner params θ₀ the inner loop starts from. With ``Nested.warm_start`` the loop
            starts instead from the θ this sub-problem (same ``key``) reached at the previous outer step.
        inner_batch: the batch of the inner loss, or ``k -> batch`` for minibatches (implicit solvers
            take the Hessian on ``inner_batch(loop.steps)``).
        outer_batch: the batch of the outer loss.
        key: identifies the sub-problem across outer steps (warm starts and solver state are kept per key).
    """

    inner: Params
    inner_batch: Union[Batch, Callable[[int], Batch]]
    outer_batch: Batch
    key: str = "0"


SubProblems = Callable[[StepInfo], Sequence[SubProblem]]
Evaluate = Callable[[Params, Mapping[str, Params]], Evaluation]
SubMetrics = Callable[[SubProblem, HypergradResult, Params], Metrics]
# Extra pictures of a run: (final φ, final evaluation, run folder) -> the files written.
Plot = Callable[[Params, Evaluation, Path], Sequence[Path]]


def _check_common(name: str, optimizer: str, lr: float, clip_norm: float) -> None:
    from .outer import OUTER_OPTIMIZERS
    if optimizer not in OUTER_OPTIMIZERS:
        raise ValueError(f"{name}.optimizer must be one of {', '.join(OUTER_OPTIMIZERS)}, got {optimizer!r}")
    if not lr >= 0:
        raise ValueError(f"{name}.lr must be >= 0, got {lr}")
    if not clip_norm >= 0:
        raise ValueError(f"{name}.clip_norm must be >= 0 (0: no clipping), got {clip_norm}")


@dataclass(frozen=True)
class Nested:
    """A bilevel problem as a problem file declares it.

    Attributes:
        problem: G and F.
        outer: the initial outer params φ₀.
        loop: how each sub-problem's inner problem is run.
        subproblems: ``StepInfo -> [SubProblem, ...]``: the nested problems of one outer step. Their
            hypergradients are computed independently (split across processes) and combined.
        default_solver: the solver spec used when the run names none.
        optimizer, lr: the outer ``torch.optim`` optimiser (``sgd``, ``adam``, ``adamw``) and its rate.
            A zeroth-order solver (``cmaes``) replaces it by its own update (SGD, lr 1).
        combine: ``"mean"`` or ``"pcgrad"`` (:mod:`bilevel.combine`), or ``fn(grads, seed) -> grad``.
        warm_start: start each sub-problem's inner loop where the same key ended at the previous step
            (online methods, warm-started hyperparameter optimisation); the solver's state (a linear-solve
            warm start, an online optimiser state) then carries over too. Without it both start afresh
            every step, except a zeroth-order search's distribution, which is the method's own state.
        solvers: the solver kinds that apply (``implicit``, ``unrolled``, ``online``, ``zeroth_order``).
        solver_note: why some kinds do not apply (shown in the error when one is asked for).
        evaluate: ``(φ, warm inner params by key) -> evaluation`` at the end of a run: numbers, and
            per-seed lists (the same seeds for every method) under the keys ``verdict`` names.
        verdict: which per-seed lists of the evaluation are the method, the baseline and the controls
            (:class:`bilevel.Verdict`): the run ends with a paired comparison line and ``result.png``.
        plot: ``(φ, evaluation, run folder) -> [paths]``: the pictures this problem's users look at (e.g. a
            learned loss's shape), drawn by ``bilevel run`` at the end beside ``curves.png``.
        metrics: ``(sub-problem, its result, φ) -> metrics`` logged each step (mean over sub-problems,
            and per key when there are several).
        clip_norm: rescale the combined hypergradient to this norm when larger (0: never).
        skip_nonfinite: replace a non-finite combined hypergradient by zero (logged as ``skipped``)
            instead of stopping the run.
        validate: check the problem (scalar, finite losses; outer params reach the inner loss) at the
            first step.
    """

    problem: BilevelProblem
    outer: Params
    loop: InnerLoop
    subproblems: SubProblems
    default_solver: str
    optimizer: str = "adam"
    lr: float = 1e-3
    combine: Union[str, Callable[[list[Params], int], Params]] = "mean"
    warm_start: bool = False
    solvers: tuple[str, ...] = KINDS
    solver_note: str = ""
    evaluate: Optional[Evaluate] = None
    verdict: Optional[Verdict] = None
    plot: Optional[Plot] = None
    metrics: Optional[SubMetrics] = None
    clip_norm: float = 0.0
    skip_nonfinite: bool = False
    validate: bool = True

    def __post_init__(self) -> None:
        _check_common("Nested", self.optimizer, self.lr, self.clip_norm)
        unknown = [k for k in self.solvers if k not in KINDS]
        if unknown or not self.solvers:
            raise ValueError(f"Nested.solvers must be a non-empty tuple of {KINDS}, got {self.solvers!r}")
        if isinstance(self.combine, str):
            from .combine import METHODS
            if self.combine not in METHODS:
                raise ValueError(f"Nested.combine must be one of {METHODS} or a function, got {self.combine!r}")

    def first_subproblem(self, seed: int = 0) -> SubProblem:
        """The first sub-problem of outer step 0 (what ``bilevel check`` differentiates)."""
        subs = list(self.subproblems(StepInfo(0, seed)))
        if not subs:
            raise ValueError("Nested.subproblems returned no sub-problem for step 0")
        return subs[0]


@dataclass(frozen=True)
class SingleLevel:
    """A single-level objective ``min_φ R(φ)`` (regularised risk): no inner problem, no hypergradient.

    Give exactly one of:
        objective: ``(φ, StepInfo) -> (loss, metrics)``; the loop differentiates it with torch.func.
        gradient: ``(φ, StepInfo) -> (gradient, metrics)``, for a method whose gradient is computed in
            closed form (metrics should hold ``outer_loss``).

    Per-process minibatches drawn from ``StepInfo.process_index`` make the runner's process mean a
    data-parallel average. ``kind`` names the method family in the error shown when a solver is asked for.
    """

    params: Params
    objective: Optional[Callable[[Params, StepInfo], tuple[Tensor, Mapping[str, Any]]]] = None
    gradient: Optional[Callable[[Params, StepInfo], tuple[Params, Metrics]]] = None
    optimizer: str = "adam"
    lr: float = 1e-3
    evaluate: Optional[Evaluate] = None
    verdict: Optional[Verdict] = None
    plot: Optional[Plot] = None
    clip_norm: float = 0.0
    skip_nonfinite: bool = False
    kind: str = "regularised risk minimisation"

    def __post_init__(self) -> None:
        _check_common("SingleLevel", self.optimizer, self.lr, self.clip_norm)
        if (self.objective is None) == (self.gradient is None):
            raise ValueError("SingleLevel needs exactly one of objective= or gradient=")


Declaration = Union[Nested, SingleLevel]
