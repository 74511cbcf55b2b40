"""Hypergradient solvers, registered by name, and the ``"name:key=value,..."`` spec parser.

A new solver is one file in this package (a frozen dataclass with ``init`` and ``__call__``, see
:class:`bilevel.types.Solver`), one line in :data:`SOLVERS` and one line in the test configurations
(``tests/solver_configs.py``); a new linear solver is one class in :mod:`bilevel.linsolve` and one
``implicit(...)`` line here.
"""
from __future__ import annotations

from .. import linsolve
from .bome import BOME
from .cmaes import CMAES, CMAESState
from .f2sa import F2SA
from .forward import Forward
from .implicit import Implicit
from .onestep import OneStep
from .soba import SOBA
from .registry import (KINDS, ImplicitEntry, SolverEntry, describe_options, make_solver, name_of, normalize_spec,
                       parse_spec, register, solver_kind, solver_options)
from .unroll import Unroll

SOLVERS: dict[str, SolverEntry] = {}
register(SOLVERS, "cg", ImplicitEntry(linsolve.CG))
register(SOLVERS, "neumann", ImplicitEntry(linsolve.Neumann, warm_start=False))  # the cheap fixed series, from 0
register(SOLVERS, "fixedpoint", ImplicitEntry(linsolve.FixedPoint))
register(SOLVERS, "exact", ImplicitEntry(linsolve.Exact))
register(SOLVERS, "nystrom", ImplicitEntry(linsolve.Nystrom))  # rank-k sketch of H + ridge, by Woodbury
register(SOLVERS, "forward", SolverEntry(Forward, "unrolled"))
register(SOLVERS, "unroll", SolverEntry(Unroll, "unrolled"))
register(SOLVERS, "onestep", SolverEntry(OneStep, "online"))
register(SOLVERS, "cmaes", SolverEntry(CMAES, "zeroth_order"))
register(SOLVERS, "soba", SolverEntry(SOBA, "online"))  # warm-started single-loop IFT (SOBA / AmIGO)
register(SOLVERS, "bome", SolverEntry(BOME, "online"))
register(SOLVERS, "f2sa", SolverEntry(F2SA, "online"))

__all__ = ["SOLVERS", "make_solver", "parse_spec", "normalize_spec", "solver_options", "describe_options",
           "solver_kind", "name_of", "KINDS", "CMAES", "CMAESState", "Forward", "Implicit", "OneStep", "Unroll"]
