"""Wall time and peak tensor memory of one call, as :func:`bilevel.compare` reports them.

Peak memory is the largest amount of tensor memory that was live during the call *above* what was live
when it started, in bytes:

- CUDA: ``torch.cuda.max_memory_allocated − torch.cuda.memory_allocated`` at the start, after
  ``reset_peak_memory_stats`` (the caching allocator's own accounting; exact for tensors on that device).
- CPU: every allocation and free of a CPU tensor during the call, as recorded by the autograd profiler
  (``profile_memory=True``), replayed in time order; the peak of the running sum. This counts the bytes
  torch's CPU allocator hands out (tensors, including temporaries inside torch.func transforms), not
  Python objects and not the process's resident set size, which is monotone (``ru_maxrss``) and hides
  reuse of freed memory. The profiler slows the call down, so it is measured in a separate, untimed call.

Both measurements pause Python's cyclic garbage collector, as ``timeit`` does.
- other devices: not measured (``None``), and said so.
"""
from __future__ import annotations

import contextlib
import gc
import os
import time
from typing import Any, Callable, Iterator, Optional

import torch

CPU_METHOD = ("peak live CPU tensor bytes above the call's start (torch profiler memory events, "
              "in an untimed warm-up call)")
CUDA_METHOD = ("torch.cuda.max_memory_allocated − memory_allocated at the call's start "
               "(in an untimed warm-up call)")


def memory_method(device: torch.device) -> str:
    """How :func:`peak_memory` measures on ``device`` (shown with every report)."""
    if device.type == "cuda":
        return CUDA_METHOD
    if device.type == "cpu":
        return CPU_METHOD
    return f"not measured on {device.type} (torch exposes no allocator statistics for it here)"


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that a wall-clock interval covers the work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector (as ``timeit`` does), so that a collection of earlier garbage
    neither lands inside a measured interval nor frees blocks from before a memory measurement."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """``fn()`` and its wall time in seconds (``time.perf_counter``, device synchronised on both ends, the
    cyclic garbage collector paused)."""
    with gc_paused():
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        return out, time.perf_counter() - start


def peak_memory(fn: Callable[[], Any], device: torch.device) -> tuple[Any, Optional[int], str]:
    """``fn()``, its peak tensor memory above the start in bytes (None when not measurable) and the method.

    Exceptions raised by ``fn`` propagate unchanged.
    """
    with gc_paused():
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            out = fn()
            synchronize(device)
            return out, max(0, torch.cuda.max_memory_allocated(device) - base), CUDA_METHOD
        if device.type != "cpu":
            return fn(), None, memory_method(device)
        return _cpu_peak(fn)


def _cpu_peak(fn: Callable[[], Any]) -> tuple[Any, Optional[int], str]:
    # Without this, kineto prints two "USDT ... profiler_start/stop" lines to stderr per profiled call.
    # setdefault: a level the user chose is kept. It is read when the profiler starts, not at import.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    profiler = torch.autograd.profiler.profile(profile_memory=True, use_kineto=False)
    try:
        profiler.__enter__()
    except RuntimeError as err:  # e.g. the caller is already profiling: measure nothing rather than guess
        return fn(), None, f"not measured (the torch profiler could not start: {err})"
    try:
        out = fn()
    finally:
        profiler.__exit__(None, None, None)
    try:
        events = profiler.kineto_results.events()
    except AttributeError:
        return out, None, "not measured (this torch version's profiler exposes no memory events)"
    allocations = sorted(((e.start_ns(), e.nbytes()) for e in events
                          if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                         key=lambda pair: pair[0])
    live = peak = 0
    # Frees are negative. A block allocated before the call and freed during it has no event (torch warns
    # once), so it never lowers `live`: the peak is exact for the call's own allocations.
    for _, nbytes in allocations:
        live += nbytes
        peak = max(peak, live)
    return out, peak, CPU_METHOD
