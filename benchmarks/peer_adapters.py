"""Adapters that run each peer library on a benchmark problem (benchmarks/common.py ``Problem``).

Every adapter returns a zero-argument callable computing the hypergradient dict (ours: the ``HypergradResult``;
:func:`as_dict` takes either), given the same data, initial inner params and inner loop (K steps of GD or
heavy-ball GD with the problem's lr) as every other method:

- ours: ``bilevel.hypergrad`` with a solver spec, under the autodiff path set by :func:`set_library_path`
  (``bilevel.autodiff_path``; "auto" = the library's own choice);
- torchopt: ``custom_root`` (``solve_cg`` / ``solve_inv(ns=True)``, ``ridge`` = the damping) around an eager
  autograd inner loop; ``MetaSGD``; its functional optimiser differentiated by autograd;
- higher: ``innerloop_ctx`` with ``torch.optim.SGD``;
- betty: its hypergradient functions (``betty.hypergradient.cg/neumann/darts``, the code its Engine calls)
  with a minimal adapter object exposing the attributes they read, after the same inner loop (its Engine has
  no notion of "K steps from θ₀, then one hypergradient" without its data loaders; this isolates the
  hypergradient code). Betty has no damping option.
"""
from __future__ import annotations

import contextlib

import torch

from common import Problem

LIBRARY_PATH = "auto"
"""The ``bilevel.autodiff_path`` our calls run under (peers.py ``--path``)."""


def set_library_path(path: str) -> None:
    global LIBRARY_PATH
    LIBRARY_PATH = path


def _keys(p):
    return list(p.inner), list(p.outer)


def autograd_inner_loop(p: Problem, phi: dict, create_graph: bool = False, theta=None, steps=None):
    """The same heavy-ball SGD loop with torch.autograd (for the tape-based peers)."""
    theta = {k: v.detach().clone().requires_grad_(True) for k, v in (theta or p.inner).items()}
    vel = None
    keys = list(theta)
    for _ in range(p.steps if steps is None else steps):
        loss = p.inner_loss(theta, phi, p.inner_batch)
        g = torch.autograd.grad(loss, [theta[k] for k in keys], create_graph=create_graph)
        g = dict(zip(keys, g))
        if p.momentum:
            vel = g if vel is None else {k: p.momentum * vel[k] + g[k] for k in keys}
            theta = {k: theta[k] - p.lr * vel[k] for k in keys}
        else:
            theta = {k: theta[k] - p.lr * g[k] for k in keys}
        if not create_graph:
            theta = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
    return theta


def ours(p: Problem, spec: str, warm=None, steps=None, path: str | None = None):
    """``bilevel.hypergrad`` with solver ``spec`` from θ₀ (or ``warm``), under autodiff path ``path``
    (None: :data:`LIBRARY_PATH`)."""
    import bilevel
    bp, loop = p.bilevel_problem(), p.loop(steps)
    start = warm if warm is not None else p.inner
    chosen = path or LIBRARY_PATH

    def call():
        with bilevel.autodiff_path(chosen) if chosen != "auto" else contextlib.nullcontext():
            return bilevel.hypergrad(bp, start, p.outer, inner_batch=p.inner_batch, outer_batch=p.outer_batch,
                                     solver=spec, loop=loop)
    return call


def torchopt_implicit(p: Problem, solver: str, *, maxiter: int, rtol: float = 1e-6, alpha: float = 1.0,
                      ridge: float = 0.0):
    """torchopt ``custom_root``: ``solver`` "cg" (``solve_cg(maxiter, rtol)``) or "ns" (``solve_inv(ns=True,
    maxiter, alpha)``: maxiter + 1 series terms), on H + ridge·I."""
    import torchopt
    ik, ok = _keys(p)
    if len(ok) != 1:
        raise ValueError(f"torchopt_implicit handles one outer tensor, the problem has {ok}")

    def optimality(theta, phi):  # ∇_θG; torchopt differentiates it with functorch.vjp, so torch.func inside
        return torch.func.grad(lambda t: p.inner_loss(dict(zip(ik, t)), {ok[0]: phi}, p.inner_batch))(tuple(theta))

    if solver == "cg":
        solve = torchopt.linear_solve.solve_cg(maxiter=maxiter, rtol=rtol, ridge=ridge or None)
    else:
        solve = torchopt.linear_solve.solve_inv(ns=True, maxiter=maxiter, alpha=alpha, ridge=ridge or None)

    @torchopt.diff.implicit.custom_root(optimality, argnums=1, solve=solve)
    def inner_solve(theta0, phi):
        with torch.enable_grad():
            th = autograd_inner_loop(p, {ok[0]: phi.detach()})
        return tuple(th[k].detach() for k in ik)

    def call():
        phi = p.outer[ok[0]].detach().clone().requires_grad_(True)
        theta = inner_solve(tuple(p.inner[k] for k in ik), phi)
        loss = p.outer_loss(dict(zip(ik, theta)), {ok[0]: phi}, p.outer_batch)
        return {ok[0]: torch.autograd.grad(loss, phi)[0]}
    return call


class _BettyConfig:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class _BettyProblem:
    """The attributes betty's hypergradient functions read from a problem (betty 0.2.1)."""

    def __init__(self, params, config=None, loss_fn=None, strategy="default"):
        self._params = params
        self.config = config
        self._loss_fn = loss_fn
        self.paths = []
        self.cur_batch = None
        self._strategy = strategy

    def training_step_exec(self, batch):
        return self._loss_fn()

    def trainable_parameters(self):
        return self._params

    def parameters(self):
        return self._params

    def meta_trainable_parameters(self):
        return self._params


def betty_hypergrad(p: Problem, kind: str, *, iterations: int = 10, alpha: float = 1.0, warm=None,
                    darts_alpha: float = 0.01):
    """Betty's cg / neumann / darts: v = ∇_θF, then its jvp function for the implicit part, + ∇_φF."""
    from betty.hypergradient import cg, darts, neumann
    ik, ok = _keys(p)

    def call():
        if warm is None:
            with torch.enable_grad():
                th = autograd_inner_loop(p, {k: v.detach() for k, v in p.outer.items()})
        else:
            th = {k: v.detach().clone() for k, v in warm.items()}
        theta = [th[k].detach().clone().requires_grad_(True) for k in ik]
        phi = [p.outer[k].detach().clone().requires_grad_(True) for k in ok]
        inner_loss = lambda: p.inner_loss(dict(zip(ik, theta)), dict(zip(ok, phi)), p.inner_batch)
        outer_loss = p.outer_loss(dict(zip(ik, theta)), dict(zip(ok, phi)), p.outer_batch)
        gt_gp = torch.autograd.grad(outer_loss, theta + phi, allow_unused=True)
        v = list(gt_gp[:len(theta)])
        direct = [g if g is not None else torch.zeros_like(x) for g, x in zip(gt_gp[len(theta):], phi)]
        cfg = _BettyConfig(type=kind, cg_iterations=iterations, cg_alpha=alpha, neumann_iterations=iterations,
                           neumann_alpha=alpha, darts_alpha=darts_alpha, darts_multitask=False)
        curr = _BettyProblem(theta, cfg, inner_loss)
        prev = _BettyProblem(phi)
        fn = {"cg": cg, "neumann": neumann, "darts": darts}[kind]
        implicit = fn(v, curr, prev, sync=False)
        return {k: (d + i).detach() for k, d, i in zip(ok, direct, implicit)}
    return call


def higher_unroll(p: Problem, steps=None):
    import higher
    ik, ok = _keys(p)
    K = p.steps if steps is None else steps

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ps = torch.nn.ParameterList([torch.nn.Parameter(p.inner[k].detach().clone()) for k in ik])

    def call():
        model = Holder()
        opt = torch.optim.SGD(model.parameters(), lr=p.lr, momentum=p.momentum)
        phi = {k: v.detach().clone().requires_grad_(True) for k, v in p.outer.items()}
        with higher.innerloop_ctx(model, opt, copy_initial_weights=True) as (fmodel, diffopt):
            for _ in range(K):
                th = dict(zip(ik, fmodel.parameters()))
                diffopt.step(p.inner_loss(th, phi, p.inner_batch))
            th = dict(zip(ik, fmodel.parameters()))
            loss = p.outer_loss(th, phi, p.outer_batch)
            g = torch.autograd.grad(loss, list(phi.values()))
        return dict(zip(ok, g))
    return call


def torchopt_metasgd(p: Problem):
    import torchopt
    ik, ok = _keys(p)

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for i, k in enumerate(ik):
                self.register_parameter(f"p{i}", torch.nn.Parameter(p.inner[k].detach().clone()))

    def call():
        model = Holder()
        opt = torchopt.MetaSGD(model, lr=p.lr, momentum=p.momentum, moment_requires_grad=True)
        phi = {k: v.detach().clone().requires_grad_(True) for k, v in p.outer.items()}
        for _ in range(p.steps):
            th = {k: getattr(model, f"p{i}") for i, k in enumerate(ik)}
            opt.step(p.inner_loss(th, phi, p.inner_batch))
        th = {k: getattr(model, f"p{i}") for i, k in enumerate(ik)}
        g = torch.autograd.grad(p.outer_loss(th, phi, p.outer_batch), list(phi.values()))
        return dict(zip(ok, g))
    return call


def torchopt_functional(p: Problem):
    import torchopt
    ik, ok = _keys(p)

    def call():
        opt = torchopt.sgd(p.lr, momentum=p.momentum, moment_requires_grad=True)
        phi = {k: v.detach().clone().requires_grad_(True) for k, v in p.outer.items()}
        params = tuple(p.inner[k].detach().clone().requires_grad_(True) for k in ik)
        state = opt.init(params)
        for _ in range(p.steps):
            loss = p.inner_loss(dict(zip(ik, params)), phi, p.inner_batch)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            updates, state = opt.update(grads, state, inplace=False)
            params = torchopt.apply_updates(params, updates, inplace=False)
        g = torch.autograd.grad(p.outer_loss(dict(zip(ik, params)), phi, p.outer_batch), list(phi.values()))
        return dict(zip(ok, g))
    return call


def as_dict(out):
    return out.hypergrad if hasattr(out, "hypergrad") else out


# --------------------------------------------------------------------------------------------------
