"""Solver registry entries and spec strings: ``"neumann:alpha=auto,terms=20,damping=0.01"``.

An entry knows its options (name, type, default) and builds the solver object from them. Spec options
are typed: an unknown option, a wrong type or a bad value is a :class:`SpecError` that lists the valid
options with their types and defaults. Options are the solver's own fields; for the implicit solvers
they are :class:`Implicit`'s fields plus the linear solver's (``cg`` → :class:`bilevel.linsolve.CG`).
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Optional

from ..errors import SpecError
from .implicit import Implicit

Option = tuple[str, Any, Any]  # (name, type, default)
# What a solver needs of a problem: a (near-)stationary inner solution (implicit), a differentiable
# inner loop (unrolled), a warm-started online model (online), or only function values (zeroth_order).
KINDS = ("implicit", "unrolled", "online", "zeroth_order")
_SCALARS = (int, float, bool, str)


def _primitive_fields(cls: type, skip: tuple[str, ...] = ()) -> list[Option]:
    """The dataclass fields of ``cls`` whose type is a scalar or a union of scalars (spec options)."""
    return list(_primitive_fields_of(cls, skip))


@functools.lru_cache(maxsize=None)
def _primitive_fields_of(cls: type, skip: tuple[str, ...]) -> tuple[Option, ...]:
    """:func:`_primitive_fields`, computed once per class: ``typing.get_type_hints`` evaluates the annotations
    every time (about 0.1 ms, paid by every ``hypergrad`` call that names its solver by a spec string)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind = hints.get(f.name)
        args = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
        if f.name not in skip and args and all(a in _SCALARS for a in args):
            out.append((f.name, kind, f.default))
    return tuple(out)


class SolverEntry:
    """A registry entry for a solver class whose spec options are its scalar dataclass fields."""

    def __init__(self, cls: type, kind: str):
        if kind not in KINDS:
            raise ValueError(f"solver kind must be one of {KINDS}, got {kind!r}")
        self.cls, self.kind = cls, kind

    def options(self) -> list[Option]:
        return _primitive_fields(self.cls)

    def build(self, **options: Any) -> Any:
        return self.cls(**options)

    def owns(self, solver: Any) -> bool:
        return type(solver) is self.cls


class ImplicitEntry(SolverEntry):
    """A registry entry building :class:`Implicit` with one linear solver class.

    Args:
        linsolve_cls: the :mod:`bilevel.linsolve` class (``CG``, ``Neumann`` ...).
        **defaults: defaults of :class:`Implicit` fields for this name (e.g. ``warm_start=False``).
    """

    def __init__(self, linsolve_cls: type, **defaults: Any):
        super().__init__(Implicit, "implicit")
        self.linsolve_cls, self.defaults = linsolve_cls, defaults
        if not getattr(linsolve_cls, "supports_warm_start", True):
            self.defaults = {**defaults, "warm_start": False}

    def _implicit_options(self) -> list[Option]:
        skip = () if getattr(self.linsolve_cls, "supports_warm_start", True) else ("warm_start",)
        return [(n, t, self.defaults.get(n, d)) for n, t, d in _primitive_fields(Implicit, skip)]

    def options(self) -> list[Option]:
        own, lin = self._implicit_options(), _primitive_fields(self.linsolve_cls)
        clash = {n for n, _, _ in own} & {n for n, _, _ in lin}
        if clash:  # one spec key must mean one thing
            raise ValueError(f"{self.linsolve_cls.__name__} options {sorted(clash)} clash with Implicit's")
        return own + lin

    def build(self, **options: Any) -> Implicit:
        own = {n for n, _, _ in self._implicit_options()}
        lin = self.linsolve_cls(**{k: v for k, v in options.items() if k not in own})
        implicit = {**self.defaults, **{k: v for k, v in options.items() if k in own}}
        return Implicit(linsolve=lin, **implicit)

    def owns(self, solver: Any) -> bool:
        return type(solver) is Implicit and type(solver.linsolve) is self.linsolve_cls


def register(registry: dict[str, SolverEntry], name: str, entry: SolverEntry) -> None:
    """Add ``entry`` under ``name``; names are unique."""
    if name in registry:
        raise ValueError(f"solver {name!r} is already registered")
    registry[name] = entry


def _registry() -> dict[str, SolverEntry]:
    from . import SOLVERS
    return SOLVERS


def _lookup(name: str) -> SolverEntry:
    registry = _registry()
    if name not in registry:
        raise SpecError(f"unknown solver {name!r}; registered solvers: {', '.join(registry)}")
    return registry[name]


def _type_name(kind: Any) -> str:
    args = typing.get_args(kind)
    if args:
        return " | ".join("'auto'" if a is str else a.__name__ for a in args)
    return kind.__name__


def solver_options(name: str) -> list[Option]:
    """The options a registered solver takes from a spec string: (name, type, default)."""
    return _lookup(name).options()


def solver_kind(name: str) -> str:
    """``implicit``, ``unrolled``, ``online`` or ``zeroth_order``: what the solver needs of a problem."""
    return _lookup(name).kind


def describe_options(name: str) -> str:
    """``key: type = default`` for every option of solver ``name``, comma separated."""
    return ", ".join(f"{k}: {_type_name(t)} = {d!r}" for k, t, d in solver_options(name)) or "(no options)"


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _parse_value(kind: Any, text: str) -> Any:
    text = text.strip()
    args = typing.get_args(kind) or (kind,)
    for arg in sorted(args, key=lambda a: a is str):  # numbers first; str ('auto') last
        try:
            return _parse_bool(text) if arg is bool else arg(text)
        except ValueError:
            continue
    raise ValueError(text)


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"cg:maxiter=50,rtol=1e-8"`` into the name and typed options, checked against the solver."""
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    _lookup(name)
    valid = {k: t for k, t, _ in solver_options(name)}
    options: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq:
            raise SpecError(f"solver option {item!r} in {spec!r} is not key=value; "
                            f"options of {name!r}: {describe_options(name)}")
        if key not in valid:
            raise SpecError(f"unknown option {key!r} for solver {name!r}; valid options: {describe_options(name)}")
        if key in options:
            raise SpecError(f"option {key!r} is given twice in {spec!r}")
        try:
            options[key] = _parse_value(valid[key], text)
        except ValueError:
            raise SpecError(f"option {key!r} of solver {name!r} must be {_type_name(valid[key])}, got {text!r}; "
                            f"valid options: {describe_options(name)}") from None
    return name, options


def normalize_spec(spec: str) -> str:
    """The canonical form of a spec: the name and every option whose value differs from its default,
    sorted (``"cg:maxiter=100"`` and ``"cg"`` both give ``"cg"``)."""
    name, options = parse_spec(spec)
    defaults = {k: d for k, _, d in solver_options(name)}
    changed = sorted((k, v) for k, v in options.items() if v != defaults[k])
    return name + (":" + ",".join(f"{k}={v}" for k, v in changed) if changed else "")


def make_solver(spec: Any, **overrides: Any) -> Any:
    """A solver from a spec string (``"neumann:alpha=0.05,terms=20"``) or an existing solver object.

    Keyword ``overrides`` are applied on top (e.g. ``map_fn=`` for CMA-ES). Unknown names, unknown
    options and wrong types raise :class:`SpecError` listing the valid options with types and defaults.
    """
    if isinstance(spec, str):
        name, options = parse_spec(spec)
        try:
            solver = _lookup(name).build(**options)
        except (TypeError, ValueError) as err:
            raise SpecError(f"invalid options for solver {name!r}: {err}; valid options: "
                            f"{describe_options(name)}") from None
    elif dataclasses.is_dataclass(spec) and callable(spec) and hasattr(spec, "init"):
        solver = spec
    else:
        raise SpecError(f"solver must be a spec string or a solver object, got {type(spec).__name__}; "
                        f"registered solvers: {', '.join(_registry())}")
    fields = {f.name for f in dataclasses.fields(solver)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise SpecError(f"solver {type(solver).__name__} has no field(s) {', '.join(unknown)} to override; its "
                        f"fields: {', '.join(sorted(fields))}")
    return dataclasses.replace(solver, **overrides) if overrides else solver


def name_of(solver: Any) -> Optional[str]:
    """The registry name whose entry builds ``solver``'s class (None for an unregistered class)."""
    for name, entry in _registry().items():
        if entry.owns(solver):
            return name
    return None

