"""The divergence guard: stop an outer loop whose loss or gradient norm explodes while still finite.

:meth:`bilevel.OuterLoop.guard` stops a run at the first NaN/Inf; this guard stops it during the climb
before that (a loss growing geometrically to 1e27 under too large an outer learning rate is finite at
every step), so that the climbing state is never applied, logged as good, or checkpointed.

Running reference. For each guarded quantity the guard holds its values at the last ``window``
*accepted* steps: steps that passed every guard and were applied (a step dropped by ``skip_nonfinite``
is not accepted). The reference is the **median** of the held values: isolated spikes (minibatch noise,
a poor CMA-ES generation) do not move a median, and since the first steps are part of the window, a
large early transient can only raise the reference (a more lenient guard), never cause a trip. A step is
judged only once at least ``min(WARMUP, window)`` values are held, so the first steps of a run are never
judged against one or two values.

Rules, with ``f = factor`` and every median taken over the held values:

- **gradient norm** ``g`` (the ``outer_grad_norm`` metric: the combined (hyper)gradient, before
  clipping): the step trips when ``g_t > f · median(g)``.
- **outer loss** ``L`` (the ``outer_loss`` metric, when the step reports one). A loss may be negative or
  cross zero, so the rule measures the *rise* of the loss in units of its typical magnitude: the step
  trips when ``L_t − median(L) > f · median(|L|)``. For a positive loss this reads
  ``L_t > (1 + f) · median(L)``; a loss that falls, however far below zero, never trips it (an unbounded
  descent shows up in the gradient norm instead).
- a reference of 0 (the quantity was exactly 0 at most held steps) carries no scale: no verdict.

Limit: a quantity growing by a factor ρ per step is followed by its median, which lags ``window / 2``
steps behind, so the guard trips on such a climb only when ``ρ^(window/2) > f``: with the defaults
(``f = 1e3``, ``window = 50``) a growth faster than about 1.32× per step. Slower drifts are left to the
NaN/Inf guard.

The held values are part of :meth:`bilevel.OuterLoop.state_dict` (two lists of floats), so a resumed run
trips at the step where the uninterrupted run would.
"""
from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any, Callable, Mapping, Optional, Union

from .errors import DivergenceError

DEFAULT_FACTOR = 1e3
DEFAULT_WINDOW = 50
WARMUP = 5
LOSS, GRAD_NORM = "outer_loss", "outer_grad_norm"   # the metrics the guard reads
STATE_KEYS = ("loss", "grad_norm")


def check_divergence_options(factor: Optional[float], window: int) -> Optional[float]:
    """Validate the guard's options; return the factor, or None when the guard is switched off (0/None).

    Raises:
        ValueError: a factor that is not a finite number > 1 (or 0/None), or a window that is not an int ≥ 1.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"divergence_window must be an int >= 1 (the number of accepted steps whose median is "
                         f"the reference), got {window!r}; the default is {DEFAULT_WINDOW}")
    if factor is None or (not isinstance(factor, bool) and isinstance(factor, (int, float)) and factor == 0):
        return None
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 1:
        raise ValueError(f"divergence_factor must be a finite number > 1 (a step trips when it exceeds factor × "
                         f"its running reference), or 0/None to switch the divergence guard off; got {factor!r}. "
                         f"The default is {DEFAULT_FACTOR:g}")
    return float(factor)


class DivergenceGuard:
    """The held values of the last ``window`` accepted steps and the rules in the module docstring.

    Args:
        factor: how many times its running reference a quantity may reach (0 or None: never trip; values
            are still held, so the guard can be switched on at a resume).
        window: how many accepted steps the reference is the median of.
    """

    def __init__(self, factor: Optional[float] = DEFAULT_FACTOR, window: int = DEFAULT_WINDOW):
        self.factor = check_divergence_options(factor, window)
        self.window = window
        self.loss: deque[float] = deque(maxlen=window)
        self.grad_norm: deque[float] = deque(maxlen=window)

    @property
    def warmup(self) -> int:
        return min(WARMUP, self.window)

    def verdict(self, metrics: Mapping[str, float]) -> Optional[str]:
        """Why this step diverged (quantity, value, reference, factor), or None when it passes."""
        if self.factor is None or metrics.get("skipped"):
            return None
        f, reasons = self.factor, []
        norm = metrics.get(GRAD_NORM)
        if norm is not None and math.isfinite(norm) and len(self.grad_norm) >= self.warmup:
            reference = statistics.median(self.grad_norm)
            if reference > 0 and norm > f * reference:
                reasons.append(f"the outer gradient norm {norm:.6g} is {norm / reference:.3g} times its running "
                               f"reference {reference:.6g} (the median over the last {len(self.grad_norm)} "
                               f"accepted steps), more than divergence_factor {f:g}")
        loss = metrics.get(LOSS)
        if loss is not None and math.isfinite(loss) and len(self.loss) >= self.warmup:
            level = statistics.median(self.loss)
            scale = statistics.median([abs(v) for v in self.loss])
            if scale > 0 and loss - level > f * scale:
                reasons.append(f"the outer loss {loss:.6g} rose above its running median {level:.6g} by "
                               f"{(loss - level) / scale:.3g} times its running reference {scale:.6g} (the median "
                               f"|outer loss| over the last {len(self.loss)} accepted steps), more than "
                               f"divergence_factor {f:g}")
        return "; and ".join(reasons) or None

    def check(self, step: int, metrics: Mapping[str, float], label: str,
              hint: Union[str, Callable[[], str]] = "") -> None:
        """Raise :class:`DivergenceError` when ``metrics`` (of a step not yet applied) diverged; ``label`` names
        the solver, ``hint`` (text, or a callable evaluated only then) is appended to the message."""
        why = self.verdict(metrics)
        if why is not None:
            hint = hint() if callable(hint) else hint
            raise DivergenceError(
                f"outer step {step}, {label}: diverging: {why}; the outer params were not updated (they are those "
                f"outer step {step} evaluated){'; ' + hint if hint else ''}. Lower the outer learning rate or clip "
                f"the gradient (clip_norm); if such growth is expected, raise divergence_factor (bilevel run "
                f"--divergence-factor) or set it to 0 to switch this guard off.")

    def accept(self, metrics: Mapping[str, float]) -> None:
        """Hold an applied step's values (skipped steps and non-finite values are not held)."""
        if metrics.get("skipped"):
            return
        for name, held in ((LOSS, self.loss), (GRAD_NORM, self.grad_norm)):
            value = metrics.get(name)
            if value is not None and math.isfinite(value):
                held.append(float(value))

    def state_dict(self) -> dict[str, list[float]]:
        return {"loss": list(self.loss), "grad_norm": list(self.grad_norm)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore held values; with a smaller window only the newest ``window`` are kept."""
        if not isinstance(state, Mapping) or set(state) != set(STATE_KEYS):
            raise ValueError(f"the divergence-guard state must hold exactly {list(STATE_KEYS)}, got "
                             f"{sorted(state) if isinstance(state, Mapping) else type(state).__name__}")
        for name in STATE_KEYS:
            values = [float(v) for v in state[name]]
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"the divergence-guard state {name!r} holds a non-finite value: {values}; the checkpoint "
                                 "was altered or damaged: resume from an older one, or start over with --overwrite")
            setattr(self, name, deque(values, maxlen=self.window))
