"""Finding problem files: the ``bilevel.problems`` entry-point group, or a module path.

A problem file is a module (registered, importable by module path, or a ``.py`` file path) defining
``Config`` (a frozen dataclass), ``SMOKE`` (a ``Config`` that runs in seconds) and ``build(cfg, ctx) -> bilevel.Nested | bilevel.SingleLevel`` (``DEFAULT_SOLVER``, a spec
string, is shown by ``bilevel list`` when defined). Any installed distribution can add problems without
editing this repository, with one line in its ``pyproject.toml``::

    [project.entry-points."bilevel.problems"]
    my_problem = "mypkg.my_problem"

The paper methods of this repository register themselves the same way (``bilevel.problems.*``).
Modules are imported only when a problem is used, so ``bilevel list`` stays fast.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

GROUP = "bilevel.problems"
REQUIRED = ("Config", "SMOKE", "build")


class ProblemNotFound(KeyError):
    """No problem of that name is registered and it is not an importable problem module."""

    def __str__(self) -> str:  # KeyError would print the repr of its message
        return str(self.args[0]) if self.args else ""


def registered() -> dict[str, str]:
    """``{name: module path}`` of every problem registered in the entry-point group."""
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def load_problem(name: str) -> ModuleType:
    """The problem module registered as ``name``, an importable module path (``mypkg.my_problem``) or a
    ``.py`` file (``examples/my_problem.py``) that defines the problem names; a clear error lists the
    registered problems otherwise."""
    known = registered()
    if name in known:
        module = importlib.import_module(known[name].split(":")[0])
    elif name.endswith(".py"):
        module = _from_file(Path(name))
    elif "." in name:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            raise ProblemNotFound(f"problem module {name!r} cannot be imported ({err})") from err
    else:
        raise ProblemNotFound(f"unknown problem {name!r}; registered problems: {', '.join(sorted(known))} "
                              "(or give a module path such as mypkg.my_problem, or a file such as my_problem.py)")
    missing = [attr for attr in REQUIRED if not hasattr(module, attr)]
    if missing:
        raise ProblemNotFound(f"module {module.__name__!r} is not a problem file: it lacks {', '.join(missing)}")
    return module


def _from_file(path: Path) -> ModuleType:
    """The problem file at ``path`` imported as a module named after its stem (as ``python path`` would run it,
    but without ``__main__``), registered in ``sys.modules`` so that its dataclasses and pickling work."""
    if not path.is_file():
        raise ProblemNotFound(f"problem file {str(path)!r} does not exist; give the path of a .py file that defines "
                              f"{', '.join(REQUIRED)}")
    name = f"bilevel_problem_file_{path.stem}"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path.resolve()):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path.resolve())
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
