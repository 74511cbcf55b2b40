"""Paper methods as problem files, and the registry the ``bilevel`` CLI reads.

Each entry maps a name to the module that defines ``Config`` (frozen dataclass, the paper's defaults),
``SMOKE`` (a config that runs in seconds), ``DEFAULT_SOLVER`` (a solver spec) and
``build(cfg, ctx) -> bilevel.Task``. Modules are imported lazily so that ``bilevel list`` stays fast and a
problem with extra data needs does not slow the others. A new problem costs one file and one line here.
"""
from __future__ import annotations

import importlib
from types import ModuleType

PROBLEMS: dict[str, str] = {
    "ridge": "problems.ridge",
}


def load_problem(name: str) -> ModuleType:
    """The problem module registered as ``name``; a clear error lists the registered names."""
    if name not in PROBLEMS:
        raise KeyError(f"unknown problem {name!r}; registered problems: {', '.join(sorted(PROBLEMS))}")
    return importlib.import_module(PROBLEMS[name])
