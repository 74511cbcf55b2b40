"""bilevel: a torch.func toolkit for bilevel optimisation with swappable hypergradient solvers.

    min_φ F(θ*(φ), φ)   s.t.   θ*(φ) ∈ argmin_θ G(θ, φ)

Define a :class:`BilevelProblem` from two pure functions, pick a solver by name, call :func:`hypergrad`.
"""
from . import linsolve, tree
from .api import hypergrad
from .autodiff import hvp, hvp_operator, mixed_vjp
from .check import CheckReport, check
from .errors import (BilevelError, ConvergenceWarning, IndefiniteHessianError, NeumannDivergenceError,
                     NonFiniteError, SpecError,
                     StructureError)
from .inner import InnerLoop
from .linsolve import CG, Exact, FixedPoint, LinearSolveInfo, Neumann
from .solvers import (CMAES, SOLVERS, Forward, Implicit, ImplicitCG, ImplicitExact, ImplicitFixedPoint,
                      ImplicitNeumann, OneStep, Unroll, describe_options, make_solver, solver_options)
from .task import RunContext, StepOutput, Task, TaskDefaults, local_context, make_outer_optimizer, run_locally
from .types import BilevelProblem, HypergradResult, Solver
from .validate import validate_problem

__version__ = "0.1.0"

__all__ = [
    "BilevelProblem", "HypergradResult", "Solver", "InnerLoop", "hypergrad", "check", "CheckReport",
    "SOLVERS", "make_solver", "solver_options", "describe_options",
    "Implicit", "ImplicitCG", "ImplicitNeumann", "ImplicitFixedPoint", "ImplicitExact", "Forward", "Unroll",
    "OneStep", "CMAES",
    "CG", "Neumann", "FixedPoint", "Exact", "LinearSolveInfo",
    "Task", "TaskDefaults", "StepOutput", "RunContext", "local_context", "run_locally", "make_outer_optimizer",
    "hvp", "hvp_operator", "mixed_vjp", "validate_problem", "tree", "linsolve",
    "BilevelError", "SpecError", "NonFiniteError", "NeumannDivergenceError", "IndefiniteHessianError", "StructureError", "ConvergenceWarning",
]
