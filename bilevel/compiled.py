"""The compiled path: inner steps that need no derivative through them, compiled with ``torch.compile``.

Eager PyTorch pays a few microseconds of dispatch per operation; a small inner step is dozens of small
operations, so on small models the inner loop is dispatch-bound (ENVIRONMENT.md measured 280 µs per step of
which XLA needs 13 µs). ``torch.compile`` (inductor) fuses one step into a few kernels. What is compiled:

    θ_{k+1} = θ_k − η ∇θG(θ_k, φ; batch_k)      (``sgd`` without weight decay: gradient and update in one graph)
    g_k, G_k = ∇θG(θ_k, φ; batch_k), G(θ_k, φ; batch_k)   (other optimisers: the update stays eager torchopt)

with the gradient taken by ``torch.func.grad_and_value`` inside the compiled function, which dynamo traces
(``torch.autograd.grad`` would break the graph). Only steps that nothing differentiates through run here:
the implicit solvers' inner loop, CMA-ES candidates' training, the undifferentiated prefix of a truncated
unroll. Steps recorded for a derivative (unrolling, forward mode, anything under a torch.func transform)
stay on the eager paths of :mod:`bilevel.paths`: a compiled graph cannot be differentiated again by
``create_graph`` on the autograd tape, and forward-mode dual tensors are not traced.

Guards and recompiles. One compiled function serves every problem: the loss function is an argument, and
dynamo guards on its code and closure contents, not its identity, so a problem file that builds a new
closure each outer step does not recompile; new φ values, θ values and minibatches of the same shapes do
not either. A different batch shape (a smaller last minibatch) recompiles once and then runs with dynamic
shapes; a float closed over by the loss that changes value recompiles each time, until dynamo's recompile
limit, after which dynamo runs the step eagerly (same numbers, no speed-up). :func:`compile_stats` reports the
graphs compiled and the time spent compiling, so a run can report compile time apart from step time.

What is not compiled, measured (hyper-cleaning, 900 examples, one thread): a Hessian-vector product on the
tape (one backward pass through the ∇θG graph that the implicit solver records once) took 1.04 ms; compiled
products took 1.10 ms (reverse-over-reverse) and 1.89 ms (forward-over-reverse), because a compiled product
recomputes ∇θG each time, so the linear solve keeps the tape's products.

What dynamo cannot trace, and stays eager: torchopt's ``momentum``/``adam`` updates (the update is a chain of
pytree-mapped closures with a hidden ``first_call`` flag; see ``bilevel.inner._stateless_first_call``) and
the loop's data-dependent stopping and NaN check (host decisions on tensor values; they stay once per run).
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import Tensor
from torch.func import grad_and_value

from .tree import Params
from .types import Batch

_STATS = {"calls": 0, "compile_seconds": 0.0, "graphs": 0}


def _sgd_step(loss_fn: Callable, lr: float, theta: Params, phi: Params, batch: Batch) -> tuple[Params, Tensor]:
    """θ − η ∇θG(θ, φ; batch) and G(θ, φ; batch), as one traced graph."""
    grads, loss = grad_and_value(loss_fn)(theta, phi, batch)
    return {k: v - lr * grads[k] for k, v in theta.items()}, loss


def _grad_and_value(loss_fn: Callable, theta: Params, phi: Params, batch: Batch) -> tuple[Params, Tensor]:
    """∇θG(θ, φ; batch) and G(θ, φ; batch), as one traced graph."""
    return grad_and_value(loss_fn)(theta, phi, batch)


BACKEND = "inductor"
"""``torch.compile`` backend. Tests that check tracing and guards (not generated code) set ``"aot_eager"``."""

_COMPILED: dict[tuple[str, str], Callable] = {}


def _compiled(name: str) -> Callable:
    """The process-wide compiled version of ``_sgd_step`` or ``_grad_and_value`` (compiled at its first call)."""
    key = (name, BACKEND)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile({"sgd_step": _sgd_step, "grad_and_value": _grad_and_value}[name],
                                       backend=BACKEND)
    return _COMPILED[key]


def _timed(name: str, *args: Any) -> Any:
    """Call a compiled function; a call that compiled a new graph adds its wall time to the compile time.

    The clock starts before the first call imports dynamo and wraps the function (about 3 s cold), which is
    part of the compile cost a run pays.
    """
    start = time.perf_counter()
    fn = _compiled(name)
    before = _graph_count()
    out = fn(*args)
    after = _graph_count()
    _STATS["calls"] += 1
    if after > before:
        _STATS["graphs"] += after - before
        _STATS["compile_seconds"] += time.perf_counter() - start
    return out


def _graph_count() -> int:
    """Graphs dynamo has compiled so far in this process (its own counter)."""
    from torch._dynamo.utils import counters  # dynamo's bookkeeping; imported late, it is heavy

    return int(counters["stats"]["unique_graphs"])


def sgd_step(loss_fn: Callable, lr: float, theta: Params, phi: Params, batch: Batch) -> tuple[Params, Tensor]:
    """One compiled plain-SGD step without a graph: (θ − η∇θG, G), both plain tensors."""
    with torch.no_grad():  # nothing differentiates through this step; the gradient is torch.func's own
        return _timed("sgd_step", loss_fn, lr, theta, phi, batch)


def grad_and_value_step(loss_fn: Callable, theta: Params, phi: Params, batch: Batch) -> tuple[Params, Tensor]:
    """The compiled gradient and loss of one step without a graph (for optimisers whose update stays eager)."""
    with torch.no_grad():
        return _timed("grad_and_value", loss_fn, theta, phi, batch)


def compile_stats() -> dict[str, float]:
    """``{"calls", "graphs", "compile_seconds"}`` of the compiled path in this process so far.

    ``compile_seconds`` is the wall time of the calls that compiled a graph (cold: inductor's code generation;
    warm: loading from inductor's on-disk cache), so a run's step time can be reported without it.
    """
    return {k: float(v) for k, v in _STATS.items()}
