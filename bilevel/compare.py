"""Swap hypergradient solvers and compare them on one problem instance: error, time, cost, memory.

For a reference hypergradient g_ref (``reference``, ``exact`` by default: the dense IFT solve) and each
solver's g on the same instance (inner start θ₀, outer params φ, batches, inner loop), a row reports

    relative error  ‖g − g_ref‖ / ‖g_ref‖,     cosine  ⟨g, g_ref⟩ / (‖g‖ ‖g_ref‖)      (float64)

with the solver's wall time (median over ``repeats`` calls, after one untimed warm-up call that also
measures peak memory, see :mod:`bilevel.measure`), its gradient/HVP counts and its convergence as it
reports them (``converged`` is its own measured residual test), and every warning it raised. A solver
that raises is reported as failed with the error; one whose kind does not apply to the problem is
reported and not run. Every call starts afresh (no solver state carried in), so rows are comparable.

``compare`` takes a :class:`~bilevel.BilevelProblem` instance; ``compare_problem`` a declared problem
(:class:`~bilevel.Nested`): its first sub-problem of step 0, and with ``steps > 0`` the first sub-problem
at each of ``steps`` outer params visited by the reference solver's own outer loop (:class:`OuterLoop`).
Tables, JSON, CSV and the plot: :mod:`bilevel.run.compare_report`.
"""
from __future__ import annotations

import statistics
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch

from . import tree
from .api import hypergrad
from .context import RunContext, local_context
from .declare import Nested, SingleLevel, StepInfo
from .errors import BilevelError, SpecError
from .inner import InnerLoop, batch_at
from .measure import memory_method, peak_memory, timed
from .solver_list import SolverSpec, check_specs, exact_refusal, solver_label, split_solver_list
from .solvers import make_solver
from .solvers.registry import KINDS
from .tree import Params
from .types import Batch, BilevelProblem
from .validate import check_params, validate_problem

OK, FAILED, NOT_APPLICABLE = "ok", "failed", "not applicable"
NOTES = {
    "zeroth_order": "zeroth-order: a search direction (old − new CMA-ES mean), not a hypergradient estimate",
    "online": "one call from the warm start (the instance's inner params): an online estimate that improves as its "
              "warm start and state are carried across outer steps, not the converged hypergradient",
}
CODE_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)  # passed on, not reported in rows


class CompareError(BilevelError, RuntimeError):
    """The reference hypergradient could not be computed, so nothing can be compared with it."""


@dataclass
class SolverRow:
    """One solver at one outer point. A number is None when the solver did not run or does not report it.

    Attributes:
        spec, name, kind: the spec as given, its registry name and kind (``implicit``, ``unrolled`` ...).
        status: ``ok``, ``failed`` (``error`` says why) or ``not applicable`` (the kind does not apply).
        rel_error, cosine: ‖g − g_ref‖/‖g_ref‖ and ⟨g, g_ref⟩/(‖g‖‖g_ref‖) in float64 (NaN for a zero norm).
        hypergrad_norm: ‖g‖.
        time_s, times_s: the median wall time and every timed call's, in seconds.
        hvp_count, evaluations, inner_steps: the solver's own counts (``diagnostics``).
        converged, residual, iterations: the linear solve's, when the solver has one (True only when its
            measured residual met its tolerance).
        inner_grad_norm_rel: ‖∇θG(θ_K)‖/‖∇θG(θ_0)‖, the stationarity the solver differentiated at.
        peak_memory_bytes: see :mod:`bilevel.measure` (None when not measured).
        warnings: ``"Category: first line"`` of every warning the solver raised (deprecations excepted).
        note: what the row means when that is not obvious (zero-order, online, not applicable).
        diagnostics: every numeric diagnostic of the first timed call; hypergrad: its hypergradient g.
    """

    spec: str
    name: str
    kind: str
    status: str = OK
    rel_error: Optional[float] = None
    cosine: Optional[float] = None
    hypergrad_norm: Optional[float] = None
    time_s: Optional[float] = None
    times_s: list[float] = field(default_factory=list)
    hvp_count: Optional[float] = None
    evaluations: Optional[float] = None
    inner_steps: Optional[float] = None
    converged: Optional[bool] = None
    residual: Optional[float] = None
    iterations: Optional[float] = None
    inner_grad_norm_rel: Optional[float] = None
    peak_memory_bytes: Optional[int] = None
    error: Optional[str] = None
    warnings: list[str] = field(default_factory=list)
    note: str = ""
    diagnostics: dict[str, float] = field(default_factory=dict)
    hypergrad: Optional[Params] = field(default=None, repr=False)


@dataclass
class ComparePoint:
    """Every solver at one outer point φ (``step``: the outer step of the reference trajectory)."""

    step: int
    outer: Params = field(repr=False)
    reference: SolverRow
    rows: list[SolverRow]


@dataclass
class CompareReport:
    """The comparison: one :class:`ComparePoint` per visited outer point (one unless ``steps > 0``)."""

    problem: str
    reference: str
    repeats: int
    memory_method: str
    points: list[ComparePoint]
    instance: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> list[SolverRow]:
        """The solver rows at the first point."""
        return self.points[0].rows

    def row(self, spec: str, step: int = 0) -> SolverRow:
        """The row of ``spec`` (as given) at trajectory point ``step``."""
        for r in self.points[step].rows:
            if r.spec == spec:
                return r
        raise KeyError(f"no solver {spec!r} in this comparison; solvers: {[r.spec for r in self.points[step].rows]}")

    def __str__(self) -> str:
        from .run.compare_report import format_report
        return format_report(self)


def _to64(params: Params, keys: Sequence[str]) -> torch.Tensor:
    return torch.cat([params[k].detach().reshape(-1).to(torch.float64).cpu() for k in keys])


def _errors(g: Params, g_ref: Params) -> tuple[float, float, float]:
    """(relative error, cosine, ‖g‖) in float64; NaN where a zero norm leaves them undefined."""
    a, b = _to64(g, list(g_ref)), _to64(g_ref, list(g_ref))  # one key order for both
    na, nb = float(a.norm()), float(b.norm())
    rel = float((a - b).norm()) / nb if nb > 0 else float("nan")
    cos = float(a @ b) / (na * nb) if na > 0 and nb > 0 else float("nan")
    return rel, cos, na


def _first_line(text: Any) -> str:
    return (str(text).strip().splitlines() or [""])[0]


@dataclass
class _Instance:
    problem: BilevelProblem
    inner: Params
    outer: Params
    inner_batch: Union[Batch, Callable[[int], Batch]]
    outer_batch: Batch
    loop: InnerLoop

    def call(self, solver: Any):
        """The solver's hypergradient here (inputs validated once beforehand, not in every timed call)."""
        return hypergrad(self.problem, self.inner, self.outer, inner_batch=self.inner_batch,
                         outer_batch=self.outer_batch, solver=solver, loop=self.loop, validate=False)


def _measure(inst: _Instance, spec: SolverSpec, repeats: int, memory: bool) -> SolverRow:
    """Run one solver: a warm-up call (memory), then ``repeats`` timed calls. Raises what the solver raises."""
    label, name, kind = solver_label(spec)
    row = SolverRow(label, name, kind, note=NOTES.get(kind, ""))
    solver = make_solver(spec)
    device = next(iter(inst.outer.values())).device
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if memory:
            _, row.peak_memory_bytes, _ = peak_memory(lambda: inst.call(solver), device)
        else:
            inst.call(solver)
        result = None
        for _ in range(repeats):
            out, seconds = timed(lambda: inst.call(solver), device)
            if result is None:
                result = out
            row.times_s.append(seconds)
    row.warnings = []
    for w in caught:
        if issubclass(w.category, CODE_WARNINGS):  # about code (e.g. torch internals), not this hypergradient
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            continue
        text = f"{w.category.__name__}: {_first_line(w.message)}"
        if text not in row.warnings:
            row.warnings.append(text)
    row.time_s = statistics.median(row.times_s)
    d = {k: float(v) for k, v in result.diagnostics.items() if isinstance(v, (int, float)) or torch.is_tensor(v)}
    row.diagnostics, row.hypergrad = d, result.hypergrad
    row.hvp_count, row.evaluations, row.inner_steps = d.get("hvp_count"), d.get("evaluations"), d.get("inner_steps")
    row.residual, row.iterations = d.get("residual"), d.get("iterations")
    row.inner_grad_norm_rel = d.get("inner_grad_norm_rel")
    conv = d.get("converged")
    row.converged = None if conv is None or conv != conv else bool(conv)
    return row


def _compare_at(inst: _Instance, specs: Sequence[SolverSpec], reference: SolverSpec, repeats: int, memory: bool,
                kinds: Sequence[str], kinds_note: str, validate: bool, where: str = ""
                ) -> tuple[SolverRow, list[SolverRow]]:
    """The reference row and every solver's row on one instance (``where`` names the point in errors).

    With ``validate`` the problem's inputs are checked first (:func:`validate_problem`), so that a bad
    problem gets its own error rather than a reference failure; the solver calls then skip the check.
    """
    if validate:
        validate_problem(inst.problem, inst.inner, inst.outer, batch_at(inst.inner_batch, 0), inst.outer_batch)
    why = exact_refusal(reference, inst.inner)
    if why:
        raise SpecError(f"reference {reference!r} refused: {why}; use reference='cg:rtol=1e-10,maxiter=1000' "
                        "(or 'unroll' for a short inner loop), or raise exact:max_size=... if that matrix fits "
                        "in memory")
    try:
        ref = _measure(inst, reference, repeats, memory)
    except Exception as err:  # noqa: BLE001 - wrapped with what to do; the original is chained
        raise CompareError(f"reference solver {solver_label(reference)[0]!r} failed{where}: {type(err).__name__}: "
                           f"{_first_line(err)}; nothing can be compared without it: fix what the message names, "
                           "or choose another reference (e.g. reference='cg:rtol=1e-10,maxiter=1000' or 'unroll')"
                           ) from err
    ref.rel_error, ref.cosine, ref.hypergrad_norm = _errors(ref.hypergrad, ref.hypergrad)
    ref.note = "reference" + ("; its hypergradient is zero: relative errors are undefined (NaN)"
                              if not ref.hypergrad_norm else "")
    rows = []
    for spec in specs:
        label, name, kind = solver_label(spec)
        if kind not in kinds and kind != "unregistered":
            note = f"{kind} solvers do not apply to this problem" + (f" ({kinds_note})" if kinds_note else "")
            rows.append(SolverRow(label, name, kind, status=NOT_APPLICABLE, note=note))
            continue
        why = exact_refusal(spec, inst.inner)
        if why:
            rows.append(SolverRow(label, name, kind, status=FAILED, error=f"not run: {why}",
                                  note="use cg for this size"))
            continue
        try:
            row = _measure(inst, spec, repeats, memory)
        except Exception as err:  # noqa: BLE001 - a failing solver is a result of the comparison
            rows.append(SolverRow(label, name, kind, status=FAILED, note=NOTES.get(kind, ""),
                                  error=f"{type(err).__name__}: {_first_line(err)}"))
            continue
        row.rel_error, row.cosine, row.hypergrad_norm = _errors(row.hypergrad, ref.hypergrad)
        rows.append(row)
    return ref, rows


def check_counts(repeats: int, steps: int = 0) -> None:
    """Raise :class:`SpecError` unless ``repeats >= 1`` and ``steps >= 0`` are ints."""
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise SpecError(f"repeats must be an int >= 1 (timed calls per solver), got {repeats!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise SpecError(f"steps must be an int >= 0 (outer points along the reference trajectory), got {steps!r}")


def compare(problem: BilevelProblem, inner: Params, outer: Params, *,
            inner_batch: Union[Batch, Callable[[int], Batch]], outer_batch: Batch, loop: InnerLoop,
            solvers: Union[str, Sequence[SolverSpec]], reference: SolverSpec = "exact", repeats: int = 1,
            memory: bool = True, kinds: Sequence[str] = KINDS, kinds_note: str = "",
            label: str = "problem") -> CompareReport:
    """Compare ``solvers`` with ``reference`` on one instance of ``problem`` (arguments as in :func:`hypergrad`).

    Args:
        solvers: spec strings (or solver objects), or one comma-separated string (:func:`split_solver_list`).
        reference: the spec the others are measured against (default ``exact``: small problems only).
        repeats: timed calls per solver; the reported time is their median.
        memory: measure peak tensor memory in the warm-up call (:mod:`bilevel.measure`).
        kinds: the solver kinds that apply; other solvers are reported as not applicable, not run.
        kinds_note: why the other kinds do not apply (shown in their rows).
        label: how the report names the problem.

    Raises:
        SpecError: a bad solver list, spec, reference or count, or ``exact`` on too many inner scalars.
        CompareError: the reference solver raised.
    """
    check_params(inner, "inner")
    check_params(outer, "outer")
    specs = check_specs(solvers, reference)
    check_counts(repeats)
    if not isinstance(loop, InnerLoop):
        raise SpecError(f"loop must be a bilevel.InnerLoop, got {type(loop).__name__}")
    inst = _Instance(problem, tree.clone(inner), tree.clone(outer), inner_batch, outer_batch, loop)
    ref, rows = _compare_at(inst, specs, reference, repeats, memory, kinds, kinds_note, validate=True)
    device = next(iter(outer.values())).device
    return CompareReport(label, ref.spec, repeats, memory_method(device) if memory else "not measured",
                         [ComparePoint(0, inst.outer, ref, rows)], _describe(inst))


def _describe(inst: _Instance) -> dict[str, Any]:
    return {"inner_scalars": tree.numel(inst.inner), "outer_scalars": tree.numel(inst.outer),
            "inner_steps": inst.loop.steps, "inner_optimizer": str(inst.loop.optimizer), "inner_lr": inst.loop.lr,
            "device": str(next(iter(inst.outer.values())).device),
            "dtype": str(next(iter(inst.outer.values())).dtype).replace("torch.", "")}


def compare_problem(declaration: Any, solvers: Union[str, Sequence[SolverSpec]], reference: SolverSpec = "exact",
                    steps: int = 0, *, repeats: int = 1, seed: int = 0, memory: bool = True,
                    name: str = "this problem", ctx: Optional[RunContext] = None) -> CompareReport:
    """Compare solvers on a declared problem (what a problem file's ``build`` returns).

    The instance is the first :class:`SubProblem` of outer step 0 at the declared outer params and inner
    loop, the same for every solver. With ``steps > 0`` the reference solver's :class:`OuterLoop` takes
    ``steps − 1`` outer steps and every solver is compared at each of the ``steps`` outer params it visits
    (φ₀ first, so point 0 is the ``steps=0`` comparison), on that step's first sub-problem, starting from
    the inner params the loop would use there (its warm start when the problem declares ``warm_start``).

    Raises:
        SpecError: a single-level problem, a solver list/spec/count error, a reference whose kind does not
            apply, or ``exact`` on too many inner scalars.
        CompareError: the reference solver raised.
    """
    from .outer import OuterLoop, resolve_solver  # outer imports this package's api; keep the import lazy

    if isinstance(declaration, SingleLevel):
        raise SpecError(f"{name} is a single-level objective ({declaration.kind}): it has no hypergradient, so "
                        "there are no solvers to compare")
    if not isinstance(declaration, Nested):
        raise SpecError(f"compare_problem needs a bilevel.Nested declaration, got {type(declaration).__name__}")
    check_params(declaration.outer, "the declaration's outer params")
    if not isinstance(reference, str):
        raise SpecError(f"the reference of a declared problem must be a spec string (its outer loop builds it), "
                        f"got {type(reference).__name__}; e.g. reference='exact'")
    specs = check_specs(solvers, reference)
    check_counts(repeats, steps)
    if set(declaration.solvers) <= {"zeroth_order"}:
        note = f" ({declaration.solver_note})" if declaration.solver_note else ""
        raise SpecError(f"{name} admits only zeroth-order solvers{note}: there is no hypergradient to hold a "
                        "search direction against, so there is nothing to compare")
    resolve_solver(declaration, reference, name)  # the reference's kind must apply
    device = next(iter(declaration.outer.values())).device
    ctx = ctx if ctx is not None else local_context(reference, seed, device)
    outer_loop = OuterLoop(declaration, reference, ctx, name=name) if steps > 1 else None
    points, instance = [], {}
    for step in range(max(steps, 1)):
        subs = list(declaration.subproblems(StepInfo(step, ctx.seed, ctx.process_index, ctx.num_processes)))
        if not subs:
            raise SpecError(f"{name}: subproblems() returned no sub-problem at step {step}")
        sub = subs[0]
        start = outer_loop.inner.get(sub.key, sub.inner) if outer_loop and declaration.warm_start else sub.inner
        outer = outer_loop.outer if outer_loop else declaration.outer  # cloned: the outer loop updates in place
        inst = _Instance(declaration.problem, {k: v.detach().to(ctx.device).clone() for k, v in start.items()},
                         {k: v.detach().to(ctx.device).clone() for k, v in outer.items()}, sub.inner_batch,
                         sub.outer_batch, declaration.loop)
        ref, rows = _compare_at(inst, specs, reference, repeats, memory, declaration.solvers,
                                declaration.solver_note, validate=declaration.validate and step == 0,
                                where=f" at outer step {step}" if step else "")
        points.append(ComparePoint(step, inst.outer, ref, rows))
        if step == 0:
            instance = {**_describe(inst), "subproblems_at_step_0": len(subs), "subproblem_key": sub.key,
                        "warm_start": declaration.warm_start}
        if outer_loop and step < steps - 1:
            outer_loop.run(step + 1)
    return CompareReport(name, points[0].reference.spec, repeats,
                         memory_method(ctx.device) if memory else "not measured", points, instance)


__all__ = ["compare", "compare_problem", "split_solver_list", "check_specs", "check_counts", "CompareReport",
           "ComparePoint", "SolverRow", "CompareError"]
