"""bilevel: a torch.func toolkit for bilevel optimisation with swappable hypergradient solvers.

    min_φ F(θ*(φ), φ)   s.t.   θ*(φ) ∈ argmin_θ G(θ, φ)

Define a :class:`BilevelProblem` from two pure functions, pick a solver by name, call :func:`hypergrad`.
To run an outer loop, declare the problem (:class:`Nested` or :class:`SingleLevel`) and hand it to
:class:`OuterLoop` / :func:`run_locally` (or ``bilevel run`` for problem files).
"""
from . import linsolve, tree
from .api import hypergrad
from .autodiff import hvp, hvp_operator, mixed_vjp
from .check import CheckReport, check
from .combine import combine_gradients, conflicts
from .context import RunContext, local_context
from .declare import Declaration, Nested, SingleLevel, StepInfo, SubProblem
from .compare import CompareError, CompareReport, compare, compare_problem, split_solver_list
from .errors import (BilevelError, ConvergenceWarning, DivergenceError, IndefiniteHessianError, NeumannDivergenceError,
                     NonFiniteError, SpecError, StationarityWarning, StructureError, ZeroHypergradientWarning)
from .inner import InnerLoop
from .linsolve import CG, Exact, FixedPoint, LinearSolveInfo, Neumann, Nystrom
from .outer import OuterLoop, make_outer_optimizer, run_locally
from .paths import AutodiffPathError, autodiff_path
from .solvers import (CMAES, SOLVERS, Forward, Implicit, OneStep, Unroll, describe_options, make_solver,
                      normalize_spec, solver_kind, solver_options)
from .transforms import NotDifferentiableError
from .types import BilevelProblem, HypergradResult, Solver
from .solve import solve
from .validate import validate_problem
from .verdict import PairedGap, Verdict, paired_gap, plot_result, verdict_lines

__version__ = "0.1.0"

__all__ = [
    "BilevelProblem", "HypergradResult", "Solver", "InnerLoop", "hypergrad", "solve", "check", "CheckReport",
    "compare", "compare_problem", "CompareReport", "CompareError", "split_solver_list",
    "SOLVERS", "make_solver", "solver_options", "describe_options", "solver_kind", "normalize_spec",
    "Implicit", "Forward", "Unroll", "OneStep", "CMAES",
    "CG", "Neumann", "FixedPoint", "Exact", "Nystrom", "LinearSolveInfo",
    "Nested", "SingleLevel", "SubProblem", "StepInfo", "Declaration",
    "OuterLoop", "run_locally", "make_outer_optimizer", "RunContext", "local_context",
    "combine_gradients", "conflicts", "Verdict", "verdict_lines", "paired_gap", "PairedGap", "plot_result",
    "hvp", "hvp_operator", "mixed_vjp", "autodiff_path", "validate_problem", "tree", "linsolve",
    "BilevelError", "SpecError", "NonFiniteError", "DivergenceError", "NeumannDivergenceError", "IndefiniteHessianError",
    "StructureError", "AutodiffPathError", "ConvergenceWarning", "StationarityWarning", "ZeroHypergradientWarning", "NotDifferentiableError",
]
