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
    "itl": "problems.itl",
    "arl": "problems.arl",
    "adalfl": "problems.adalfl",
    "metamd": "problems.metamd",
    "erm": "problems.erm",
    "irm": "problems.irm",
    "vrex": "problems.vrex",
    "coral": "problems.coral",
    "fishr": "problems.fishr",
    "hgp": "problems.hgp",
    "hutchinson": "problems.hutchinson",
}


def load_problem(name: str) -> ModuleType:
    """The problem module registered as ``name``, or any importable module path (``mypkg.my_problem``)
    that defines the same four names; a clear error lists the registered names."""
    if name in PROBLEMS:
        return importlib.import_module(PROBLEMS[name])
    if "." in name:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            raise KeyError(f"problem module {name!r} cannot be imported ({err})") from err
        missing = [attr for attr in ("Config", "SMOKE", "DEFAULT_SOLVER", "build") if not hasattr(module, attr)]
        if missing:
            raise KeyError(f"module {name!r} is not a problem file: it lacks {', '.join(missing)}")
        return module
    raise KeyError(f"unknown problem {name!r}; registered problems: {', '.join(sorted(PROBLEMS))} "
                   "(or give a module path such as mypkg.my_problem)")
