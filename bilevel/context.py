"""Where an outer loop runs: :class:`RunContext` (device, seed, processes, the work-splitting map).

This module does not import accelerate: :func:`local_context` runs in one plain process (tests,
notebooks); the runner (:mod:`bilevel.run.loop`) passes a context whose :meth:`RunContext.map` splits
work across processes and whose :meth:`RunContext.autocast` applies the run's mixed precision.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class RunContext:
    """Where a problem runs.

    Attributes:
        solver_spec: the run's solver spec (None: the problem's default). Problem files pass it on
            unread (e.g. to a warm-up phase run through the same loop); they never parse it.
        seed: the run's seed.
        device: the device tensors should live on.
        num_processes / process_index: the process layout (1 / 0 in a plain process).
    """

    solver_spec: Optional[str] = None
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    num_processes: int = 1
    process_index: int = 0
    _map: Optional[Callable[[Callable[[Any], Any], Sequence[Any]], list]] = None
    _autocast: Optional[Callable[[], Any]] = None

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
        """
        if self._map is not None:
            return self._map(fn, list(items))
        return [fn(item) for item in items]


def local_context(solver_spec: Optional[str] = None, seed: int = 0, device: str | torch.device = "cpu"
                  ) -> RunContext:
    """A one-process context (tests, notebooks, scripts)."""
    return RunContext(solver_spec=solver_spec, seed=seed, device=torch.device(device))
