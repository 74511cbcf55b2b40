"""The inner loop: a pure, differentiable optimiser over the inner params.

A thin adapter over torchopt's functional (optax-style) optimisers, always with ``inplace=False`` so
that ``torch.func.grad`` (reverse mode), ``torch.func.jvp`` (forward mode) and ``torch.func.vmap`` see
pure tensor code. The optimiser state is initialised lazily from the first gradient rather than from
the params: under ``vmap`` over outer params the gradient is batched while a shared initial θ is not,
and torchopt's in-place moment updates need both to agree.

Each step θ_{k+1}, s_{k+1} = update(∇θG(θ_k, φ; batch_k), s_k, θ_k) runs on one of two paths
(:mod:`bilevel.paths`): torch.func (``grad_and_value``, inside transforms) or the autograd tape
(``torch.autograd.grad``). On the tape the gradient is taken with ``create_graph=True`` only when a
derivative through the step is needed: grad mode is on and something the step depends on requires grad
(θ_k, the optimiser state, φ, a batch tensor, or a tensor the loss closes over), or a caller (unrolled
solvers) asks for it. Otherwise the step records nothing beyond its own gradient and returns plain
tensors. Under a ``torch.autograd.forward_ad`` dual level the tape step carries the tangents along
(forward-over-reverse), which is how the forward-mode solver runs outside torch.func.

With ``compile=True`` the steps that nothing differentiates through (tape path, no graph needed, no dual
level) run compiled by ``torch.compile`` (:mod:`bilevel.compiled`); every other step runs as above.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable, Optional

import torch
import torchopt
from torch import Tensor
from torch.autograd import forward_ad
from torch.func import grad_and_value
from torch.utils import _pytree as pytree

from . import compiled
from .autodiff import is_batched, reaches_other_leaves
from .paths import FUNC, check_path, choose_path, forward_ad_active
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
            ``GradientTransformation`` (then ``lr`` and the other knobs are ignored). A transformation given
            here is used as is: torchopt's momentum keeps a hidden first-call flag per object, so a fresh
            ``torchopt.sgd(momentum=μ)`` resumed from a warm state takes one step with trace + g instead of
            μ·trace + g; the named ``"momentum"`` spends that flag first and resumes exactly.
        lr: learning rate.
        momentum: heavy-ball coefficient for ``"momentum"``.
        betas, eps: Adam's coefficients.
        weight_decay: L2 coefficient added to the gradient (coupled, as in torch.optim.SGD/Adam).
        compile: run the steps that need no derivative through them (the implicit solvers' and CMA-ES's
            inner loop, a truncated unroll's prefix) compiled by ``torch.compile`` (:mod:`bilevel.compiled`):
            the same maths, fewer dispatches; pays a compile (about 20 s cold, a few s from inductor's
            cache) once per process and loss code. Off by default: on CPU it wins only for runs of
            thousands of inner steps (``benchmarks/compiled.py`` measures both).

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
    compile: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"InnerLoop.steps must be a non-negative int, got {self.steps!r}")
        if isinstance(self.optimizer, str) and self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown inner optimizer {self.optimizer!r}; valid: {OPTIMIZERS} "
                             "or a torchopt GradientTransformation")
        if not isinstance(self.optimizer, str) and not hasattr(self.optimizer, "update"):
            raise TypeError(f"InnerLoop.optimizer must be one of {OPTIMIZERS} or a torchopt GradientTransformation, "
                            f"got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"InnerLoop.lr must be > 0, got {self.lr}")
        if not isinstance(self.compile, bool):
            raise TypeError(f"InnerLoop.compile must be True or False, got {self.compile!r}")

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
            return _stateless_first_call(torchopt.sgd(self.lr, momentum=self.momentum, weight_decay=self.weight_decay))
        return torchopt.adam(self.lr, betas=self.betas, eps=self.eps, weight_decay=self.weight_decay)

    def step(self, problem: BilevelProblem, inner: Params, opt_state: Any, outer: Params, batch: Batch, *,
             path: Optional[str] = None, create_graph: Optional[bool] = None) -> tuple[Params, Any, Tensor]:
        """One optimiser step: returns (new inner, new optimiser state, inner loss before the step).

        Args:
            path: ``"autograd"`` or ``"func"``; None chooses (:func:`bilevel.paths.choose_path`).
            create_graph: on the autograd path, whether the step must stay differentiable (None: decided as
                the module docstring says). Ignored on the torch.func path, which is always differentiable.
        """
        new, opt_state, loss, _ = self.step_with_gradient(problem, inner, opt_state, outer, batch, path=path,
                                                          create_graph=create_graph)
        return new, opt_state, loss

    def step_with_gradient(self, problem: BilevelProblem, inner: Params, opt_state: Any, outer: Params, batch: Batch,
                           *, path: Optional[str] = None, create_graph: Optional[bool] = None
                           ) -> tuple[Params, Any, Tensor, Params]:
        """:meth:`step`, also returning the gradient ∇θG(θ, φ) on ``batch`` that the step took (a graph
        node when the step is differentiable), so that a one-step solver need not compute it again for its
        stationarity diagnostic."""
        path = choose_path((*inner.values(), *outer.values())) if path is None else check_path(path)
        if path == FUNC:
            return self._func_step(problem, inner, opt_state, outer, batch)
        new, opt_state, loss, _, grads = self._tape_step(problem, inner, opt_state, outer, batch, create_graph)
        return new, opt_state, loss, grads

    def _func_step(self, problem: BilevelProblem, inner: Params, opt_state: Any, outer: Params, batch: Batch
                   ) -> tuple[Params, Any, Tensor, Params]:
        grads, loss = grad_and_value(problem.inner, argnums=0)(inner, outer, batch)
        new, opt_state = self._update(grads, opt_state, inner)
        return new, opt_state, loss, grads

    def _update(self, grads: Params, opt_state: Any, inner: Params) -> tuple[Params, Any]:
        """The optimiser update from the gradient: (new inner, new state), pure (``inplace=False``)."""
        if opt_state is None:
            opt_state = self.transform.init(grads)
        if self.optimizer == "sgd" and not self.weight_decay:
            # θ − η·g is torchopt.sgd's update bitwise (its state is empty), without its per-step tree
            # machinery (about 40 µs a step, 8 % of a ridge d = 1000 step)
            return {k: v - self.lr * grads[k] for k, v in inner.items()}, opt_state
        updates, opt_state = self.transform.update(grads, opt_state, params=inner, inplace=False)
        return torchopt.apply_updates(inner, updates, inplace=False), opt_state

    def _compiled_step(self, problem: BilevelProblem, inner: Params, opt_state: Any, outer: Params, batch: Batch
                       ) -> tuple[Params, Any, Tensor]:
        """One step without a graph on the compiled path: SGD whole; other optimisers' updates stay eager."""
        if self.optimizer == "sgd" and not self.weight_decay:
            if opt_state is None:
                opt_state = self.transform.init(inner)  # empty for plain SGD; kept for the state's structure
            new, loss = compiled.sgd_step(problem.inner, self.lr, inner, outer, batch)
            return new, opt_state, loss
        grads, loss = compiled.grad_and_value_step(problem.inner, inner, outer, batch)
        with torch.no_grad():
            new, opt_state = self._update(grads, opt_state, inner)
        return new, opt_state, loss

    def _tape_step(self, problem: BilevelProblem, inner: Params, opt_state: Any, outer: Params, batch: Batch,
                   create_graph: Optional[bool]) -> tuple[Params, Any, Tensor, bool, Params]:
        """The step on the autograd tape; also returns whether it recorded a graph (``create_graph``) and the
        gradient it took."""
        grad_mode = torch.is_grad_enabled()
        if create_graph is None and grad_mode and (_tracked(inner.values()) or _tracked(_tensor_leaves(opt_state))):
            create_graph = True
        with torch.enable_grad():
            leaves, used = _step_leaves(inner, keep_tracked=bool(create_graph))
            loss = problem.inner(used, outer, batch)
            if create_graph is None:  # θ and the state are plain: does the loss reach anything else tracked?
                create_graph = grad_mode and reaches_other_leaves(loss, leaves.values())
            found = torch.autograd.grad(loss, list(leaves.values()), create_graph=create_graph, allow_unused=True)
        grads = {k: g if g is not None else torch.zeros_like(v) for (k, v), g in zip(inner.items(), found)}
        # The update is recorded only when the step must stay differentiable; otherwise it is plain arithmetic.
        with torch.set_grad_enabled(create_graph):
            new, opt_state = self._update(grads, opt_state, inner)
        return new, opt_state, (loss if create_graph else loss.detach()), create_graph, grads

    def run(self, problem: BilevelProblem, inner: Params, outer: Params, batches: Batch, *,
            steps: Optional[int] = None, opt_state: Any = None, start: int = 0, check_finite: bool = True,
            path: Optional[str] = None, create_graph: Optional[bool] = None) -> tuple[Params, Any, Tensor]:
        """Run ``steps`` (default ``self.steps``) optimiser steps from ``inner``.

        Returns the inner params reached, the optimiser state, and the inner losses seen (a 1-D tensor,
        one per step). Raises :class:`NonFiniteError` naming the first step whose loss is NaN or Inf
        (checked once at the end, so no per-step host sync; skipped under vmap). ``path`` and
        ``create_graph`` as for :meth:`step` (the path is chosen once, for the whole run).
        """
        n = self.steps if steps is None else steps
        path = choose_path((*inner.values(), *outer.values())) if path is None else check_path(path)
        compile_ok = self.compile and path != FUNC and not forward_ad_active()
        losses = []
        graph = create_graph
        for k in range(start, start + n):
            batch = batch_at(batches, k)
            if path == FUNC:
                inner, opt_state, loss, _ = self._func_step(problem, inner, opt_state, outer, batch)
            else:
                if (graph is False and create_graph is None and callable(batches) and torch.is_grad_enabled()
                        and _tracked(_tensor_leaves(batch))):
                    graph = True  # a later minibatch holds tensors that require grad: differentiate from here on
                if compile_ok and (graph is False or not torch.is_grad_enabled()):
                    # no graph is needed: known once a tape step found nothing tracked (or the caller said so)
                    inner, opt_state, loss = self._compiled_step(problem, inner, opt_state, outer, batch)
                else:
                    inner, opt_state, loss, graph, _ = self._tape_step(problem, inner, opt_state, outer, batch, graph)
            losses.append(loss.detach())
        stacked = torch.stack(losses) if losses else torch.zeros(0)
        if check_finite and losses and not is_batched(stacked):
            raise_if_nonfinite(stacked, start, "inner loss", "inner step")
        return inner, opt_state, stacked


def _tensor_leaves(tree: Any) -> list[Tensor]:
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, Tensor)]


def _tracked(tensors: Any) -> bool:
    return any(t.requires_grad for t in tensors)


def _step_leaves(inner: Params, keep_tracked: bool) -> tuple[Params, Params]:
    """(leaves, used): what the step differentiates with respect to, and what it evaluates the loss at.

    Plain θ gets fresh leaves. With ``keep_tracked`` a θ that requires grad is used itself, so the gradient
    taken with ``create_graph`` stays connected to θ's own history. Under a forward-AD dual level the loss is
    evaluated at the leaf carrying θ's tangent (detaching drops tangents), so tangents flow through the step.
    """
    dual = forward_ad_active()
    if not dual and not keep_tracked:  # the common case, kept short: it runs once per inner step
        leaves = {k: v.detach().requires_grad_(True) for k, v in inner.items()}
        return leaves, leaves
    leaves, used = {}, {}
    for k, v in inner.items():
        if keep_tracked and v.requires_grad:
            leaves[k] = used[k] = v
            continue
        tangent = forward_ad.unpack_dual(v).tangent if dual else None
        primal = forward_ad.unpack_dual(v).primal if tangent is not None else v
        leaves[k] = primal.detach().requires_grad_(True)
        used[k] = forward_ad.make_dual(leaves[k], tangent) if tangent is not None else leaves[k]
    return leaves, used


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


def _stateless_first_call(transform: torchopt.base.GradientTransformation) -> torchopt.base.GradientTransformation:
    """``transform`` after one throwaway update, so that its updates depend on the state passed in only.

    torchopt's momentum ``trace`` keeps a hidden ``first_call`` flag per transform object and computes
    trace ← trace + g on the first update it ever makes, μ·trace + g after. From the zero trace of ``init`` the
    two agree, but a warm state (a resumed run, a new ``InnerLoop`` given a previous optimiser state) would lose
    the factor μ for one step. Spending the flag on a probe here makes every update trace ← μ·trace + g.
    """
    probe = {"probe": torch.zeros(())}
    transform.update(probe, transform.init(probe), params=probe, inplace=False)
    return transform
