"""What the runner needs from a problem: a :class:`Task`, and the :class:`RunContext` it runs in.

A problem file (``problems/<name>.py``) defines a frozen ``Config`` with the paper's defaults, a tiny
``SMOKE`` config and ``build(cfg, ctx) -> Task``. The runner (``bilevel run``, one process or many under
``accelerate launch``) owns the outer parameters and the outer optimiser; each outer step it calls
``task.step(outer, ctx, step)``, which returns the gradient for the outer params (a hypergradient, a
CMA-ES pseudo-gradient, or a plain gradient for regularised-risk methods) and metrics.

This module does not import accelerate: a :class:`LocalContext` runs a task in one plain process (tests,
notebooks); the runner passes a context whose :meth:`RunContext.map` splits work across processes.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence, TypeVar, runtime_checkable

import torch

from .solvers import make_solver
from .tree import Params

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class StepOutput:
    """The result of one outer step.

    Attributes:
        grads: the gradient for the outer params (same keys, shapes and dtypes). The runner averages it
            across processes, so a task whose processes each computed the full value (e.g. through
            :meth:`RunContext.map`) gives identical copies and the mean changes nothing, while a task
            that computed one shard per process gets the data-parallel mean.
        metrics: floats to log (``outer_loss`` by convention, solver diagnostics, accuracies ...).
    """

    grads: Params
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    """A problem ready to run. Attributes and methods the runner uses:

    - ``outer``: the initial outer params (the runner copies them to its device and owns them after).
    - ``optimizer``: name of the outer ``torch.optim`` optimiser (``"sgd"``, ``"adam"``, ``"adamw"``).
    - ``lr``: its learning rate.
    - ``step(outer, ctx, step) -> StepOutput``.
    - ``state_dict() / load_state_dict(d)``: everything besides the outer params that a resumed run needs
      (inner warm start, solver state, data-order RNG ...); must be picklable by ``torch.save``.
    - ``evaluate(outer, ctx) -> dict[str, float]``: metrics at the end of the run (may be empty).
    - ``check_instance() -> dict | None``: keyword arguments for :func:`bilevel.check`
      (``problem, inner, outer, inner_batch, outer_batch, loop``) for ``bilevel check``; None if the
      problem has no single nested hypergradient to check.
    """

    outer: Params
    optimizer: str
    lr: float

    def step(self, outer: Params, ctx: "RunContext", step: int) -> StepOutput: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def evaluate(self, outer: Params, ctx: "RunContext") -> dict[str, float]: ...

    def check_instance(self) -> Optional[dict[str, Any]]: ...


class TaskDefaults:
    """Defaults for the optional parts of a :class:`Task`: no final evaluation, no state besides the outer
    params (a resumed run rebuilds the task from its Config), nothing for ``bilevel check``."""

    def evaluate(self, outer: Params, ctx: "RunContext") -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but the checkpoint holds {sorted(state)}")

    def check_instance(self) -> Optional[dict[str, Any]]:
        return None


@dataclass
class RunContext:
    """Where a task runs: device, processes, the chosen solver, the seed.

    Attributes:
        solver_spec: the solver spec string given on the command line (or the problem's default).
        seed: the run's seed.
        device: the device tensors should live on.
        num_processes / process_index: the process layout (1 / 0 in a plain process).
    """

    solver_spec: str
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    num_processes: int = 1
    process_index: int = 0
    _map: Optional[Callable[[Callable[[Any], Any], Sequence[Any]], list]] = None
    _autocast: Optional[Callable[[], Any]] = None

    @property
    def solver(self):
        """The solver object built from ``solver_spec``; a solver with a ``map_fn`` option (``cmaes``)
        gets this context's :meth:`map`, so its candidates are split across processes."""
        solver = make_solver(self.solver_spec)
        if any(f.name == "map_fn" for f in dataclasses.fields(solver)):
            solver = dataclasses.replace(solver, map_fn=self.map)
        return solver

    def autocast(self):
        """Context manager for forward passes under the run's mixed precision (``--mixed-precision``).

        Policy: only forward passes of models may run in reduced precision; the library's Hessian-vector
        products and linear solves always run in float32 (they disable autocast themselves).
        """
        return self._autocast() if self._autocast is not None else contextlib.nullcontext()

    @property
    def is_main(self) -> bool:
        return self.process_index == 0

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``[fn(x) for x in items]``, with the items split across processes and gathered back in order.

        Every process gets the full list of results. ``fn`` must be deterministic given its item (seed
        inside it from the item, not from a global RNG) so that the split does not change the result.
        Results should be tensors or picklable objects; tensors come back on CPU.
        """
        if self._map is not None:
            return self._map(fn, list(items))
        return [fn(item) for item in items]


def local_context(solver_spec: str, seed: int = 0, device: str | torch.device = "cpu") -> RunContext:
    """A one-process context for running a task without the runner (tests, notebooks)."""
    return RunContext(solver_spec=solver_spec, seed=seed, device=torch.device(device))


OUTER_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def make_outer_optimizer(name: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """The outer ``torch.optim`` optimiser named by a task (``sgd``, ``adam``, ``adamw``)."""
    if name not in OUTER_OPTIMIZERS:
        raise ValueError(f"unknown outer optimizer {name!r}; valid: {', '.join(OUTER_OPTIMIZERS)}")
    return OUTER_OPTIMIZERS[name](params, lr=lr)


def outer_optimizer_for(task: Task, ctx: RunContext, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """The task's outer optimiser, unless the solver prescribes its own update (``cmaes``: SGD, lr = 1)."""
    name, lr = getattr(ctx.solver, "outer_update", (task.optimizer, task.lr))
    return make_outer_optimizer(name, params, lr)


def run_locally(task: Task, ctx: RunContext, steps: int) -> tuple[Params, list[dict[str, float]]]:
    """Run ``steps`` outer steps of ``task`` in this process (no accelerate): tests and notebooks.

    Returns the final outer params (detached copies) and the per-step metrics. The ``bilevel run``
    command does the same with process-parallelism, logging, guards and checkpoints.
    """
    outer = {k: v.detach().clone().to(ctx.device).requires_grad_(True) for k, v in task.outer.items()}
    optimizer = outer_optimizer_for(task, ctx, list(outer.values()))
    history = []
    for step in range(steps):
        out = task.step({k: v.detach() for k, v in outer.items()}, ctx, step)
        for key, param in outer.items():
            param.grad = out.grads[key].to(param.dtype)
        optimizer.step()
        history.append(dict(out.metrics))
    return {k: v.detach() for k, v in outer.items()}, history
