"""Hypergradient solvers, registered by name, and the ``"name:key=value,..."`` spec parser."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

from ..errors import SpecError
from .cmaes import CMAES, CMAESState
from .forward import Forward
from .implicit import Implicit, ImplicitCG, ImplicitExact, ImplicitFixedPoint, ImplicitNeumann
from .onestep import OneStep
from .unroll import Unroll

SOLVERS: dict[str, type] = {
    "cg": ImplicitCG,
    "neumann": ImplicitNeumann,
    "fixedpoint": ImplicitFixedPoint,
    "exact": ImplicitExact,
    "forward": Forward,
    "unroll": Unroll,
    "onestep": OneStep,
    "cmaes": CMAES,
}

_PARSERS = {int: int, float: float, str: str}


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def solver_options(name: str) -> list[tuple[str, type, Any]]:
    """The options a registered solver takes from a spec string: (name, type, default)."""
    cls = _lookup(name)
    hints = typing.get_type_hints(cls)
    options = []
    for f in dataclasses.fields(cls):
        kind = hints.get(f.name)
        if kind in (int, float, bool, str):
            options.append((f.name, kind, f.default))
    return options


def describe_options(name: str) -> str:
    """``key: type = default`` for every option of solver ``name``, comma separated."""
    return ", ".join(f"{k}: {t.__name__} = {d!r}" for k, t, d in solver_options(name)) or "(no options)"


def _lookup(name: str) -> type:
    if name not in SOLVERS:
        raise SpecError(f"unknown solver {name!r}; registered solvers: {', '.join(SOLVERS)}")
    return SOLVERS[name]


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"cg:maxiter=50,rtol=1e-8"`` into the name and typed options, checked against the solver."""
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    _lookup(name)
    valid = {k: (t, d) for k, t, d in solver_options(name)}
    options: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq:
            raise SpecError(f"solver option {item!r} in {spec!r} is not key=value; "
                            f"options of {name!r}: {describe_options(name)}")
        if key not in valid:
            raise SpecError(f"unknown option {key!r} for solver {name!r}; valid options: {describe_options(name)}")
        kind = valid[key][0]
        try:
            options[key] = _parse_bool(text) if kind is bool else _PARSERS[kind](text.strip())
        except ValueError:
            raise SpecError(f"option {key!r} of solver {name!r} must be a {kind.__name__}, got {text!r}; "
                            f"valid options: {describe_options(name)}") from None
    return name, options


def make_solver(spec: Any, **overrides: Any) -> Any:
    """A solver from a spec string (``"neumann:alpha=0.05,terms=20"``) or an existing solver object.

    Keyword ``overrides`` are applied on top (e.g. ``map_fn=`` for CMA-ES). Unknown names, unknown
    options and wrong types raise :class:`SpecError` listing the valid options with types and defaults.
    """
    if isinstance(spec, str):
        name, options = parse_spec(spec)
        try:
            solver = SOLVERS[name](**options)
        except (TypeError, ValueError) as err:
            raise SpecError(f"invalid options for solver {name!r}: {err}; valid options: "
                            f"{describe_options(name)}") from None
    elif dataclasses.is_dataclass(spec) and callable(spec) and hasattr(spec, "init"):
        solver = spec
    else:
        raise SpecError(f"solver must be a spec string or a solver object, got {type(spec).__name__}; "
                        f"registered solvers: {', '.join(SOLVERS)}")
    fields = {f.name for f in dataclasses.fields(solver)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise SpecError(f"solver {type(solver).__name__} has no field(s) {', '.join(unknown)} to override; its "
                        f"fields: {', '.join(sorted(fields))}")
    return dataclasses.replace(solver, **overrides) if overrides else solver


__all__ = ["SOLVERS", "make_solver", "parse_spec", "solver_options", "describe_options", "CMAES", "CMAESState",
           "Forward", "Implicit", "ImplicitCG", "ImplicitExact", "ImplicitFixedPoint", "ImplicitNeumann",
           "OneStep", "Unroll"]
