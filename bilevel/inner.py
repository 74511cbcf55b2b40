"""The inner loop: a pure, differentiable optimiser over the inner params.

A thin adapter over torchopt's functional (optax-style) optimisers, always with ``inplace=False`` so
that ``torch.func.grad`` (reverse mode), ``torch.func.jvp`` (forward mode) and ``torch.func.vmap`` see
pure tensor code. The optimiser state is initialised lazily from the first gradient rather than from
the params: under ``vmap`` over outer params the gradient is batched while a shared initial θ is not,
and torchopt's in-place moment updates need both to agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Optional

import torch
import torchopt
from torch import Tensor
from torch.func import grad_and_value

from .autodiff import is_batched
from .errors import NonFiniteError
from .tree import Params
from .types import Batch, BilevelProblem

OPTIMIZERS = ("sgd", "momentum", "adam")


def batch_at(batches: Batch | Callable[[int], Batch], step: int) -> Batch:
    """The batch of inner step ``step``: ``batches(step)`` when a callable is given, else ``batches``."""
    return batches(step) if callable(batches) else batches


@dataclass(frozen=True)
class InnerLoop:
    """How the inner problem is run: ``steps`` steps of a torchopt functional optimiser.

    Args:
        steps: number of inner optimiser steps K.
        optimizer: ``"sgd"``, ``"momentum"`` (heavy ball), ``"adam"``, or any torchopt
            ``GradientTransformation`` (then ``lr`` and the other knobs are ignored).
        lr: learning rate.
        momentum: heavy-ball coefficient for ``"momentum"``.
        betas, eps: Adam's coefficients.
        weight_decay: L2 coefficient added to the gradient (coupled, as in torch.optim.SGD/Adam).

    ``inner_batch`` may be one fixed batch (full-batch training) or a callable ``step -> batch`` for
    minibatches; implicit solvers then take the inner Hessian on ``inner_batch(steps)``.
    """

    steps: int = 100
    optimizer: Any = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"InnerLoop.steps must be a non-negative int, got {self.steps!r}")
        if isinstance(self.optimizer, str) and self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown inner optimizer {self.optimizer!r}; valid: {OPTIMIZERS} "
                             "or a torchopt GradientTransformation")
        if not isinstance(self.optimizer, str) and not hasattr(self.optimizer, "update"):
            raise TypeError("InnerLoop.optimizer must be a name or a torchopt GradientTransformation")
        if not self.lr > 0:
            raise ValueError(f"InnerLoop.lr must be > 0, got {self.lr}")

    @cached_property
    def transform(self) -> torchopt.base.GradientTransformation:
        """The torchopt transformation (``init``/``update`` pair)."""
        if not isinstance(self.optimizer, str):
            return self.optimizer
        # moment_requires_grad only matters for the autograd tape; torch.func differentiates through
        # the moments regardless. Never use_accelerated_op (its extension does not load on new torch).
        if self.optimizer == "sgd":
            return torchopt.sgd(self.lr, weight_decay=self.weight_decay)
        if self.optimizer == "momentum":
            return torchopt.sgd(self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return torchopt.adam(self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)

    def step(self, problem: BilevelProblem, inner: Params, opt_state: Any, outer: Params, batch: Batch
             ) -> tuple[Params, Any, Tensor]:
        """One optimiser step: returns (new inner, new optimiser state, inner loss before the step)."""
        grads, loss = grad_and_value(problem.inner, argnums=0)(inner, outer, batch)
        if opt_state is None:
            opt_state = self.transform.init(grads)
        updates, opt_state = self.transform.update(grads, opt_state, params=inner, inplace=False)
        return torchopt.apply_updates(inner, updates, inplace=False), opt_state, loss

    def run(self, problem: BilevelProblem, inner: Params, outer: Params, batches: Batch, *,
            steps: Optional[int] = None, opt_state: Any = None, start: int = 0, check_finite: bool = True
            ) -> tuple[Params, Any, Tensor]:
        """Run ``steps`` (default ``self.steps``) optimiser steps from ``inner``.

        Returns the inner params reached, the optimiser state, and the inner losses seen (a 1-D tensor,
        one per step). Raises :class:`NonFiniteError` naming the first step whose loss is NaN or Inf
        (checked once at the end, so no per-step host sync; skipped under vmap).
        """
        n = self.steps if steps is None else steps
        losses = []
        for k in range(start, start + n):
            inner, opt_state, loss = self.step(problem, inner, opt_state, outer, batch_at(batches, k))
            losses.append(loss.detach())
        stacked = torch.stack(losses) if losses else torch.zeros(0)
        if check_finite and losses and not is_batched(stacked):
            raise_if_nonfinite(stacked, start, "inner loss", "inner step")
        return inner, opt_state, stacked


def raise_if_nonfinite(values: Tensor, start: int, quantity: str, where: str) -> None:
    """Raise :class:`NonFiniteError` naming the first index (offset by ``start``) holding NaN or Inf."""
    finite = torch.isfinite(values)
    if bool(finite.all()):
        return
    first = int((~finite).nonzero()[0, 0]) + start
    value = float(values[first - start])
    raise NonFiniteError(
        f"{quantity} is {value} at {where} {first}; lower the learning rate, check the data for NaN/Inf, "
        "or clip the loss (the last finite value was "
        f"{float(values[first - start - 1]) if first > start else math.nan})")
