"""A list of solver specs to compare: splitting a comma-separated list, checking every spec before any work.

In ``cg,neumann:alpha=auto,terms=20,unroll`` the comma separates both the specs and a spec's options. A
solver name never contains ``=``, so a piece whose text before its first ``:`` holds an ``=`` is an option
of the preceding spec, and any other piece starts a new spec (:func:`split_solver_list`).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from . import tree
from .errors import SpecError
from .linsolve import Exact
from .solvers import SOLVERS, make_solver, name_of, parse_spec, solver_kind
from .tree import Params

SolverSpec = Union[str, Any]  # a spec string, or a solver object (labelled by its repr)


def split_solver_list(text: str) -> list[str]:
    """``"cg,neumann:alpha=auto,terms=20,unroll"`` → ``["cg", "neumann:alpha=auto,terms=20", "unroll"]``.

    Only the split is done here; the options themselves are checked by :func:`check_specs`.

    Raises:
        SpecError: an empty item, an option before any solver or after a solver without ``:``, or a piece
            that is neither a registered solver nor ``key=value``.
    """
    if not isinstance(text, str):
        raise SpecError(f"the solver list must be a comma-separated string, got {type(text).__name__}")
    specs: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            raise SpecError(f"empty item in the solver list {text!r}: remove the doubled or trailing comma")
        name = piece.partition(":")[0].strip()
        if "=" not in name:
            if name not in SOLVERS:
                follows_options = specs and ":" in specs[-1]
                hint = f"; if it is an option of {specs[-1]!r}, write it as key=value" if follows_options else ""
                raise SpecError(f"{name!r} in the solver list {text!r} is not a registered solver "
                                f"({', '.join(SOLVERS)}){hint}")
            specs.append(piece)
        elif not specs:
            raise SpecError(f"option {piece!r} comes before any solver name in {text!r}; write name:{piece}")
        elif ":" not in specs[-1]:
            raise SpecError(f"option {piece!r} follows {specs[-1]!r}, which has no ':'; write "
                            f"{specs[-1]}:{piece} to give {specs[-1]} that option")
        else:
            specs[-1] += "," + piece
    return specs


def solver_label(spec: SolverSpec) -> tuple[str, str, str]:
    """``(label, registry name, kind)``; a spec string is parsed (unknown names/options fail here)."""
    if isinstance(spec, str):
        name = parse_spec(spec)[0]
        make_solver(spec)  # bad option values fail before any work
        return spec.strip(), name, solver_kind(name)
    name = name_of(make_solver(spec))
    return repr(spec), name or type(spec).__name__, solver_kind(name) if name else "unregistered"


def check_specs(solvers: Union[str, Sequence[SolverSpec]], reference: SolverSpec) -> list[SolverSpec]:
    """The solver list (split when a string), each spec and the reference checked before any work.

    Raises:
        SpecError: an empty or duplicated list, an unknown solver or option, a missing or zeroth-order reference.
    """
    specs = split_solver_list(solvers) if isinstance(solvers, str) else list(solvers)
    if not specs:
        raise SpecError("no solver to compare: give at least one spec, e.g. solvers=['cg', 'unroll']")
    labels = [solver_label(s)[0] for s in specs]
    repeated = sorted({lab for lab in labels if labels.count(lab) > 1})
    if repeated:
        raise SpecError(f"solver(s) {', '.join(repeated)} listed twice; list each spec once")
    if reference is None:
        raise SpecError("a comparison needs a reference solver, e.g. reference='exact' (dense solve, small "
                        "problems) or reference='cg:rtol=1e-10,maxiter=1000'")
    ref_label, _, ref_kind = solver_label(reference)
    if ref_kind == "zeroth_order":
        raise SpecError(f"reference {ref_label!r} is zeroth-order: a CMA-ES generation is a search move, not a "
                        "hypergradient to measure others against; use reference='exact' or a converged 'cg'")
    return specs


def exact_refusal(spec: SolverSpec, inner: Params) -> Optional[str]:
    """Why the dense ``exact`` solve would refuse this instance, or None."""
    if not isinstance(spec, str) or parse_spec(spec)[0] != "exact":
        return None
    max_size = parse_spec(spec)[1].get("max_size", Exact.max_size)
    n = tree.numel(inner)
    if n <= max_size:
        return None
    return (f"{n} inner scalars > max_size={max_size}: exact builds the dense {n}×{n} inner Hessian")


__all__ = ["split_solver_list", "check_specs", "solver_label", "exact_refusal", "SolverSpec"]
