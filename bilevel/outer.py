"""The one outer loop: every problem, every solver, one process or many.

``bilevel run`` (through :mod:`bilevel.run.loop`, which adds Accelerate, logging and checkpoints),
:func:`run_locally`, the reproductions and the examples all drive :class:`OuterLoop`. It alone

- builds the solver from the run's spec and refuses one that does not apply to the problem;
- keeps the warm starts (inner params per sub-problem key) and the solver state across outer steps;
- splits an outer step's sub-problems across processes (``ctx.map``) and combines their hypergradients;
- owns the outer params and the outer optimiser (the CMA-ES update replaces it only when the solver is
  zeroth-order on a nested problem), clips, guards against non-finite values and against divergence (a
  finite loss or gradient norm exploding, :mod:`bilevel.divergence`) before the update, and says what goes
  into a checkpoint (:meth:`OuterLoop.state_dict`).

A zeroth-order solver scores a candidate φ by the mean outer loss over all of a step's sub-problems, so
they are solved as one joint problem (their inner params are disjoint and their inner losses add up, so
each trains exactly as it would alone).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch.func import grad_and_value

from . import tree
from .api import hypergrad
from .combine import combine_gradients, conflicts
from .declare import Declaration, Nested, SingleLevel, StepInfo, SubProblem
from .divergence import DEFAULT_FACTOR, DEFAULT_WINDOW, DivergenceGuard
from .errors import NonFiniteError, SpecError
from .inner import batch_at
from .solvers import make_solver, solver_kind
from .solvers.registry import parse_spec
from .context import RunContext, local_context
from .tree import Params
from .types import BilevelProblem

OUTER_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
JOINT = "joint"


def make_outer_optimizer(name: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """The outer ``torch.optim`` optimiser named ``name`` (``sgd``, ``adam``, ``adamw``)."""
    if name not in OUTER_OPTIMIZERS:
        raise ValueError(f"unknown outer optimizer {name!r}; valid: {', '.join(OUTER_OPTIMIZERS)}")
    return OUTER_OPTIMIZERS[name](params, lr=lr)


def resolve_solver(declaration: Declaration, spec: Optional[str], name: str = "this problem") -> Optional[str]:
    """The solver spec a run uses: ``spec`` or the problem's default; None for a single-level objective.

    Raises :class:`SpecError` when a solver is asked of a single-level problem, or when the solver's kind
    does not apply to the problem (naming the solvers that do).
    """
    if isinstance(declaration, SingleLevel):
        if spec is not None:
            raise SpecError(f"{name} is a single-level objective ({declaration.kind}): its gradient needs no "
                            f"hypergradient solver, so --solver {spec} would do nothing; drop --solver")
        return None
    spec = spec if spec is not None else declaration.default_solver
    solver_name = parse_spec(spec)[0]
    kind = solver_kind(solver_name)
    if kind not in declaration.solvers:
        from .solvers import SOLVERS
        fits = [n for n in SOLVERS if solver_kind(n) in declaration.solvers]
        note = f" ({declaration.solver_note})" if declaration.solver_note else ""
        raise SpecError(f"solver {solver_name!r} ({kind}) does not apply to {name}{note}; solvers that apply: "
                        f"{', '.join(fits)}")
    make_solver(spec)  # unknown options and bad values fail here, before any work
    return spec


def joint_subproblem(problem: BilevelProblem, subs: list[SubProblem]) -> tuple[BilevelProblem, SubProblem]:
    """Several sub-problems as one: inner params ``"{i}/{name}"``, G = Σ_i G_i, F = mean_i F_i.

    The inner losses separate, so each block of θ follows exactly its own inner loop (for optimisers
    that act elementwise: SGD, momentum, Adam).
    """
    n = len(subs)

    def block(theta: Params, i: int) -> Params:
        prefix = f"{i}/"
        return {k[len(prefix):]: v for k, v in theta.items() if k.startswith(prefix)}

    def inner_loss(theta, outer, batches):
        return sum(problem.inner(block(theta, i), outer, batches[i]) for i in range(n))

    def outer_loss(theta, outer, batches):
        return sum(problem.outer(block(theta, i), outer, batches[i]) for i in range(n)) / n

    inner = {f"{i}/{k}": v for i, sub in enumerate(subs) for k, v in sub.inner.items()}
    inner_batch = lambda k: [batch_at(sub.inner_batch, k) for sub in subs]  # noqa: E731
    joint = SubProblem(inner, inner_batch, [sub.outer_batch for sub in subs], key=JOINT)
    return BilevelProblem(inner_loss, outer_loss), joint


def split_joint(theta: Params, subs: list[SubProblem]) -> dict[str, Params]:
    """The inverse of :func:`joint_subproblem` for the inner params: ``{sub.key: θ_i}``."""
    return {sub.key: {k.split("/", 1)[1]: v for k, v in theta.items() if k.split("/", 1)[0] == str(i)}
            for i, sub in enumerate(subs)}


def _numeric(values: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in values.items():
        if isinstance(v, (int, float, bool)) or (torch.is_tensor(v) and v.numel() == 1):
            out[k] = float(v)
    return out


class OuterLoop:
    """The outer loop of one run of a declared problem.

    Args:
        declaration: what ``build(cfg, ctx)`` returned (:class:`Nested` or :class:`SingleLevel`).
        solver: a solver spec, or None for the problem's default (must be None for single-level problems).
        ctx: where it runs (device, seed, processes, the map that splits work, autocast).
        name: how errors name the problem.
        reduce: ``grads -> grads`` averaged over processes (identity in one process).
        gather_metrics: ``metrics -> metrics`` averaged over processes (identity in one process).
        divergence_factor: stop (:class:`~bilevel.errors.DivergenceError`, before the update) when the outer
            gradient norm exceeds this many times its running reference, or the outer loss rises above its
            running median by this many times its typical magnitude (rules in :mod:`bilevel.divergence`).
            Default 1e3; 0 or None switches the divergence guard off (NaN/Inf still stop the run).
        divergence_window: the running reference is the median over this many last accepted steps
            (default 50); the guard judges a step once min(5, window) values are held.
    """

    def __init__(self, declaration: Declaration, solver: Optional[str], ctx: RunContext, *,
                 name: str = "this problem", reduce: Optional[Callable[[Params], Params]] = None,
                 gather_metrics: Optional[Callable[[dict], dict]] = None,
                 divergence_factor: Optional[float] = DEFAULT_FACTOR, divergence_window: int = DEFAULT_WINDOW):
        if not isinstance(declaration, (Nested, SingleLevel)):
            raise TypeError(f"build() must return bilevel.Nested or bilevel.SingleLevel, got "
                            f"{type(declaration).__name__}")
        self.divergence = DivergenceGuard(divergence_factor, divergence_window)  # bad options fail before any work
        self.declaration, self.ctx, self.name = declaration, ctx, name
        self.solver_spec = resolve_solver(declaration, solver, name)
        self.solver = None
        if self.solver_spec is not None:
            self.solver = make_solver(self.solver_spec)
            if any(f == "map_fn" for f in getattr(self.solver, "__dataclass_fields__", {})):
                self.solver = make_solver(self.solver, map_fn=ctx.map)  # CMA-ES candidates across processes
        start = declaration.outer if isinstance(declaration, Nested) else declaration.params
        self.outer = {k: v.detach().clone().to(ctx.device).requires_grad_(True) for k, v in start.items()}
        optimizer, lr = getattr(self.solver, "outer_update", (declaration.optimizer, declaration.lr))
        self.optimizer = make_outer_optimizer(optimizer, list(self.outer.values()), lr)
        self.inner: dict[str, Params] = {}
        self.solver_state: dict[str, Any] = {}
        self.step = 0
        self._first_step = 0
        self._reduce = reduce or (lambda g: g)
        self._gather = gather_metrics or (lambda m: m)

    @property
    def _solver_label(self) -> str:
        return f"solver {self.solver_spec!r}" if self.solver_spec is not None else "single-level objective"

    @property
    def zeroth_order(self) -> bool:
        return self.solver_spec is not None and solver_kind(parse_spec(self.solver_spec)[0]) == "zeroth_order"

    # ---- one outer step -------------------------------------------------------------------------------
    def gradient(self, step: int) -> tuple[Params, dict[str, float]]:
        """The (combined, clipped) gradient for the outer params at ``step`` and the step's metrics."""
        info = StepInfo(step, self.ctx.seed, self.ctx.process_index, self.ctx.num_processes)
        outer = tree.detach(self.outer)
        decl = self.declaration
        if isinstance(decl, SingleLevel):
            if decl.objective is not None:
                grads, (loss, aux) = grad_and_value(decl.objective, has_aux=True)(outer, info)
                metrics = {**_numeric(aux), "outer_loss": float(loss)}
            else:
                grads, metrics = decl.gradient(outer, info)
                metrics = _numeric(metrics)
            return self._postprocess(tree.detach(grads), metrics)
        subs = list(decl.subproblems(info))
        if not subs:
            raise ValueError(f"{self.name}: subproblems() returned no sub-problem at step {step}")
        if self.zeroth_order:  # every process runs the search; the solver splits its candidates instead
            return self._zeroth_order_step(subs, outer, step)
        outs = self.ctx.map(lambda sub: self._solve(decl.problem, sub, outer, step), subs)
        for sub, out in zip(subs, outs):
            if decl.warm_start:
                self.inner[sub.key] = out["inner"]
                self.solver_state[sub.key] = out["state"]
        grads = [{k: g.to(outer[k].device) for k, g in out["grad"].items()} for out in outs]
        metrics = self._merge_metrics(subs, outs)
        if len(grads) == 1:
            combined = grads[0]
        else:
            seed = (self.ctx.seed * 1_000_003 + step) % 2**31
            combined = decl.combine(grads, seed) if callable(decl.combine) else \
                combine_gradients(grads, decl.combine, seed=seed)
            metrics["conflicting_pairs"] = float(conflicts(grads))
        return self._postprocess(combined, metrics)

    def _zeroth_order_step(self, subs: list[SubProblem], outer: Params, step: int
                           ) -> tuple[Params, dict[str, float]]:
        """One search generation over all of the step's sub-problems at once (a joint problem when several):
        a candidate φ is scored by the mean outer loss over them. The search distribution is the state."""
        decl = self.declaration
        problem, joint = joint_subproblem(decl.problem, subs) if len(subs) > 1 else (decl.problem, subs[0])
        if decl.warm_start:
            joint = dataclasses.replace(joint, inner=self._joint_start(subs, joint))
        result = self._hypergrad(problem, joint, outer, step, self.solver_state.get(joint.key))
        self.solver_state[joint.key] = result.state
        inners = split_joint(result.inner, subs) if len(subs) > 1 else {subs[0].key: result.inner}
        if decl.warm_start:
            self.inner.update(inners)
        metrics = _numeric(result.diagnostics)
        if decl.metrics is not None:  # the problem's own metrics, per original sub-problem
            outs = [{"metrics": {}, "extra": _numeric(decl.metrics(sub, dataclasses.replace(result, inner=inners[sub.key]),
                                                                    outer))} for sub in subs]
            metrics.update(self._merge_metrics(subs, outs))
        return self._postprocess(result.hypergrad, metrics)

    def _joint_start(self, subs: list[SubProblem], joint: SubProblem) -> Params:
        if len(subs) == 1:
            return self.inner.get(subs[0].key, subs[0].inner)
        return {f"{i}/{k}": v for i, sub in enumerate(subs) for k, v in self.inner.get(sub.key, sub.inner).items()}

    def _hypergrad(self, problem: BilevelProblem, sub: SubProblem, outer: Params, step: int, state: Any):
        decl = self.declaration
        inner0 = {k: v.to(self.ctx.device) for k, v in sub.inner.items()}
        with self.ctx.autocast():  # --mixed-precision: forward passes only; the IFT part stays float32
            return hypergrad(problem, inner0, outer, inner_batch=sub.inner_batch, outer_batch=sub.outer_batch,
                             solver=self.solver, loop=decl.loop, state=state,
                             validate=decl.validate and step == self._first_step)

    def _solve(self, problem: BilevelProblem, sub: SubProblem, outer: Params, step: int) -> dict[str, Any]:
        """One sub-problem's hypergradient. With warm starts the inner loop continues where this key ended
        and the solver continues from its state (e.g. CG from its last solution); without, both start
        afresh: a linear-solve warm start from another network's solution would be a stale guess."""
        decl = self.declaration
        if decl.warm_start:
            sub = dataclasses.replace(sub, inner=self.inner.get(sub.key, sub.inner))
        result = self._hypergrad(problem, sub, outer, step, self.solver_state.get(sub.key) if decl.warm_start else None)
        extra = _numeric(decl.metrics(sub, result, outer)) if decl.metrics is not None else {}
        return {"grad": result.hypergrad, "inner": result.inner if decl.warm_start else None,
                "state": result.state if decl.warm_start else None, "metrics": _numeric(result.diagnostics),
                "extra": extra}

    def _merge_metrics(self, subs: list[SubProblem], outs: list[dict]) -> dict[str, float]:
        """Mean over sub-problems of every metric; the problem's own metrics also per key."""
        merged: dict[str, float] = {}
        for part in ("metrics", "extra"):
            keys = set.intersection(*(set(o[part]) for o in outs))
            for k in sorted(keys):
                values = [o[part][k] for o in outs]
                # equal values (e.g. a fixed alpha) are logged as given, not perturbed by the rounding of a mean
                merged[k] = values[0] if all(v == values[0] for v in values) else sum(values) / len(values)
            if part == "extra" and len(outs) > 1:
                for sub, o in zip(subs, outs):
                    merged.update({f"{k}/{sub.key}": v for k, v in o[part].items()})
        return merged

    def _postprocess(self, grads: Params, metrics: dict[str, float]) -> tuple[Params, dict[str, float]]:
        decl = self.declaration
        norm = float(tree.norm({k: g.double() for k, g in grads.items()}))
        metrics["outer_grad_norm"] = norm
        if not math.isfinite(norm):
            if decl.skip_nonfinite:
                metrics["skipped"] = 1.0
                return tree.zeros_like(grads), metrics
        elif decl.clip_norm and norm > decl.clip_norm:
            grads = tree.scale(grads, decl.clip_norm / norm)
            metrics["clipped"] = 1.0
        if decl.skip_nonfinite:
            metrics.setdefault("skipped", 0.0)
        return grads, metrics

    def apply(self, grads: Params) -> None:
        """One outer optimiser step with ``grads``."""
        for key, param in self.outer.items():
            param.grad = grads[key].detach().to(param.device, param.dtype)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def guard(self, step: int, grads: Params, metrics: Mapping[str, float],
              hint: Union[str, Callable[[], str]] = "") -> None:
        """Stop before the update of ``step`` when it is unsafe, with an error naming the step, the solver and
        the quantity: :class:`NonFiniteError` when something is NaN/Inf, :class:`DivergenceError` when the
        outer loss or gradient norm exceeds ``divergence_factor`` times its running reference.

        ``hint`` (text, or a callable evaluated only when the guard trips) is appended to the message.
        """
        what = "hypergradient" if self.solver_spec is not None else "gradient"
        bad = [f"{what}[{k!r}]" for k, g in grads.items() if not bool(torch.isfinite(g).all())]
        if not metrics.get("skipped"):  # a skipped step (skip_nonfinite) is expected to have a non-finite loss
            bad += [f"metric {k!r} = {v}" for k, v in metrics.items() if "loss" in k and not math.isfinite(v)]
        if bad:
            hint = hint() if callable(hint) else hint
            raise NonFiniteError(f"outer step {step}, {self._solver_label}: non-finite {', '.join(bad)}; "
                                 f"the outer params were not updated{'; ' + hint if hint else ''}. Lower the "
                                 "outer/inner learning rate or check the solver options.")
        self.divergence.check(step, metrics, self._solver_label, hint)

    def run(self, steps: int, on_step: Optional[Callable[[int, dict[str, float]], None]] = None,
            error_hint: Callable[[], str] = lambda: "") -> list[dict[str, float]]:
        """Run outer steps ``self.step .. steps − 1``; ``on_step(step, metrics)`` after each update.

        A step that trips a guard raises before its update, so ``on_step`` (where the runner checkpoints)
        never sees it. ``error_hint()`` is called only then, while ``self.step`` is still the failing step:
        a checkpoint of step ``s`` holds the params that step ``s`` evaluates, so the last good one is the
        newest of a step below ``self.step``.
        """
        history = []
        self._first_step = self.step
        for step in range(self.step, steps):
            try:
                grads, metrics = self.gradient(step)
            except NonFiniteError as err:
                hint = error_hint()
                raise NonFiniteError(f"outer step {step}, {self._solver_label}: {err}; the outer params "
                                     f"were not updated{'; ' + hint if hint else ''}") from err
            grads = self._reduce(grads)
            metrics = self._gather(metrics)
            self.guard(step, grads, metrics, error_hint)
            self.apply(grads)
            self.divergence.accept(metrics)  # before on_step: a checkpoint holds the reference including this step
            self.step = step + 1
            history.append(metrics)
            if on_step is not None:
                on_step(step, metrics)
        return history

    def evaluate(self) -> dict[str, float]:
        """The problem's final evaluation at the current outer params (empty when it declares none)."""
        if self.declaration.evaluate is None:
            return {}
        return dict(self.declaration.evaluate(tree.detach(self.outer), dict(self.inner)))

    # ---- what a checkpoint holds ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Outer params, optimiser state, warm starts, solver state, the divergence guard's held values
        (``divergence_guard``: lists of floats) and the next step."""
        return {"step": self.step, "outer": {k: v.detach().cpu() for k, v in self.outer.items()},
                "optimizer": self.optimizer.state_dict(), "inner": dict(self.inner),
                "solver_state": dict(self.solver_state), "divergence_guard": self.divergence.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if set(state["outer"]) != set(self.outer):
            raise ValueError(f"the saved outer params {sorted(state['outer'])} differ from the problem's "
                             f"{sorted(self.outer)}")
        if "divergence_guard" not in state and self.divergence.factor is not None:
            # its reference would restart from nothing: the resumed run could trip at another step, or not at all
            raise ValueError("the saved state holds no divergence-guard reference (it was written before the guard "
                             "kept one), so a resumed run could not stop where an uninterrupted one would; resume "
                             "with the divergence guard off (divergence_factor=0) or start a fresh run")
        if "divergence_guard" in state:
            self.divergence.load_state_dict(state["divergence_guard"])
        with torch.no_grad():
            for key, param in self.outer.items():
                param.copy_(state["outer"][key].to(param.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.inner = dict(state["inner"])
        self.solver_state = dict(state["solver_state"])
        self.step = int(state["step"])


def run_locally(declaration: Declaration, steps: int, solver: Optional[str] = None, *, seed: int = 0,
                device: str | torch.device = "cpu", ctx: Optional[RunContext] = None,
                divergence_factor: Optional[float] = DEFAULT_FACTOR, divergence_window: int = DEFAULT_WINDOW
                ) -> tuple[Params, list[dict[str, float]], OuterLoop]:
    """Run ``steps`` outer steps of a declared problem in this process (no accelerate, no run folder).

    Returns the final outer params (detached), the per-step metrics and the :class:`OuterLoop` (for
    ``.evaluate()``, warm starts and state). ``bilevel run`` drives the same loop with processes,
    logging, guards and checkpoints. ``divergence_factor`` / ``divergence_window``: see :class:`OuterLoop`.
    """
    ctx = ctx if ctx is not None else local_context(seed=seed, device=device)
    loop = OuterLoop(declaration, solver, ctx, divergence_factor=divergence_factor,
                     divergence_window=divergence_window)
    history = loop.run(steps)
    return tree.detach(loop.outer), history, loop


__all__ = ["OuterLoop", "run_locally", "resolve_solver", "make_outer_optimizer", "joint_subproblem"]
