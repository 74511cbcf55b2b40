"""Hand-written eager autograd computations of every solver's maths: the "plain autograd limit".

What a user would write with ``torch.autograd.grad`` alone, no library and no torch.func: the same losses, data,
inner loop (K steps of (heavy-ball) GD: v ← μv + ∇θG, θ ← θ − lr·v, v₀ = ∇θG), iteration counts and stopping
rules as the library's solvers, so that "ours / hand-written" measures the library's overhead. The torch.func
twins are ``common.hw_*``.

- implicit (cg / neumann / fixedpoint / exact): the loop without a graph, then one ``create_graph`` gradient
  g = ∇θG(θ_K, φ) whose backward passes give H v (``autograd.grad(g, θ, v)``, + δv with damping δ) and the
  mixed term (∂²G/∂φ∂θ)ᵀx = ``autograd.grad(g, φ, x)``; exact builds H with one batched backward
  (``is_grads_batched``) of the identity, nystrom its k sampled columns H[:, K] with one batched backward of
  the k unit vectors and solves by the Woodbury identity (``common.nystrom_solve``);
- unroll: the loop on the tape with ``create_graph=True`` from φ, one ``autograd.grad`` of F (truncated: the first
  K − T steps without a graph);
- checkpointed unroll: the adjoint pass the library runs: the iterates at every ⌈√K⌉-th step stored, each segment
  recomputed without a graph, then per step one ``autograd.grad`` of the recorded step against the adjoint;
- forward: ``torch.autograd.forward_ad``: per basis direction of φ, the loop at the dual point (forward-over-
  reverse: each step a tape gradient of the dual loss, no graph kept);
- onestep: one differentiated step from the warm start; cmaes: one CMA-ES generation scored by the no-graph loop.
- soba: steps on θ from the warm start, then GD steps on v through one ``create_graph`` gradient at the new θ.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch.autograd import forward_ad

from common import ITERATIVE, Problem, f2sa_iterates, hw_iterative_solve, nystrom_indices, nystrom_solve


def _leaves(d: dict) -> dict:
    return {k: v.detach().clone().requires_grad_(True) for k, v in d.items()}


def _step(p: Problem, theta: dict, vel: Optional[dict], phi: dict, create_graph: bool):
    """One (heavy-ball) GD step on the tape; θ must require grad."""
    keys = list(theta)
    loss = p.inner_loss(theta, phi, p.inner_batch)
    g = dict(zip(keys, torch.autograd.grad(loss, [theta[k] for k in keys], create_graph=create_graph)))
    if p.momentum:
        vel = g if vel is None else {k: p.momentum * vel[k] + g[k] for k in keys}
        return {k: theta[k] - p.lr * vel[k] for k in keys}, vel
    return {k: theta[k] - p.lr * g[k] for k in keys}, None


def run(p: Problem, theta: dict, phi: dict, steps: int, vel: Optional[dict] = None, create_graph: bool = False):
    """``steps`` GD steps; without ``create_graph`` every step starts from fresh leaves (nothing recorded)."""
    if create_graph:
        theta = {k: v if v.requires_grad else v.detach().clone().requires_grad_(True) for k, v in theta.items()}
    for _ in range(steps):
        if not create_graph:
            theta = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
            vel = None if vel is None else {k: v.detach() for k, v in vel.items()}
        theta, vel = _step(p, theta, vel, phi, create_graph)
    if not create_graph:
        theta = {k: v.detach() for k, v in theta.items()}
        vel = None if vel is None else {k: v.detach() for k, v in vel.items()}
    return theta, vel


def implicit(p: Problem, method: str, *, maxiter: int = 100, rtol: float = 1e-6, alpha: float = 0.01,
             terms: int = 15, damping: float = 0.0, rank: int = 10, rho: float = 0.01, seed: int = 0) -> dict:
    """K steps, then IFT: ∇φF − (∂²G/∂φ∂θ)ᵀ x with (H + δI) x = ∇θF solved by ``method``."""
    phi0 = {k: v.detach() for k, v in p.outer.items()}
    theta_k, _ = run(p, p.inner, phi0, p.steps)
    theta, phi = _leaves(theta_k), _leaves(phi0)
    tk, pk = list(theta), list(phi)
    with torch.enable_grad():
        out = p.outer_loss(theta, phi, p.outer_batch)
        found = torch.autograd.grad(out, [*theta.values(), *phi.values()], allow_unused=True)
        gt = {k: g if g is not None else torch.zeros_like(theta[k]) for k, g in zip(tk, found[:len(tk)])}
        gp = {k: g if g is not None else torch.zeros_like(phi[k]) for k, g in zip(pk, found[len(tk):])}
        inner = p.inner_loss(theta, phi, p.inner_batch)
        g = torch.autograd.grad(inner, list(theta.values()), create_graph=True)

    def matvec(v):
        hv = torch.autograd.grad(g, list(theta.values()), [v[k] for k in tk], retain_graph=True)
        return {k: h + damping * v[k] for k, h in zip(tk, hv)} if damping else dict(zip(tk, hv))

    if method in ITERATIVE:
        x = hw_iterative_solve(method, matvec, gt, maxiter=maxiter, rtol=rtol, alpha=alpha, terms=terms)
    elif method == "exact":
        sizes, shapes = [v.numel() for v in gt.values()], [v.shape for v in gt.values()]
        n = sum(sizes)
        eye = torch.eye(n, dtype=gt[tk[0]].dtype)
        rows = [c.reshape(n, *s) for c, s in zip(eye.split(sizes, dim=1), shapes)]
        cols = torch.autograd.grad(g, list(theta.values()), rows, retain_graph=True, is_grads_batched=True)
        Hm = torch.cat([c.reshape(n, -1) for c in cols], dim=1) + damping * eye
        flat = torch.linalg.solve(Hm, torch.cat([v.reshape(-1) for v in gt.values()]))
        x = {k: c.reshape(s) for k, c, s in zip(tk, flat.split(sizes), shapes)}
    elif method == "nystrom":  # H[:, K] by one batched backward, then the Woodbury solve (common.nystrom_solve)
        sizes, shapes = [v.numel() for v in gt.values()], [v.shape for v in gt.values()]
        n = sum(sizes)
        index = nystrom_indices(n, rank, seed)
        units = torch.nn.functional.one_hot(index, n).to(gt[tk[0]].dtype)
        rows = [c.reshape(len(index), *s) for c, s in zip(units.split(sizes, dim=1), shapes)]
        cols = torch.autograd.grad(g, list(theta.values()), rows, retain_graph=True, is_grads_batched=True)
        C = torch.cat([c.reshape(len(index), -1) for c in cols], dim=1).T
        flat = nystrom_solve(C, index, torch.cat([v.reshape(-1) for v in gt.values()]), damping + rho)
        x = {k: c.reshape(s) for k, c, s in zip(tk, flat.split(sizes), shapes)}
    else:
        raise ValueError(method)
    mixed = torch.autograd.grad(g, list(phi.values()), [x[k] for k in tk], allow_unused=True)
    return {k: gp[k] - (m if m is not None else 0.0) for k, m in zip(pk, mixed)}


def unroll(p: Problem, truncate: int = 0, steps: Optional[int] = None) -> dict:
    """d/dφ F(θ_K(φ), φ) by reverse mode through the recorded loop (the last ``truncate`` steps; 0: all)."""
    K = p.steps if steps is None else steps
    T = K if truncate == 0 else min(truncate, K)
    phi0 = {k: v.detach() for k, v in p.outer.items()}
    theta, vel = run(p, p.inner, phi0, K - T)
    phi = _leaves(phi0)
    with torch.enable_grad():
        theta, _ = run(p, theta, phi, T, vel, create_graph=True)
        out = p.outer_loss(theta, phi, p.outer_batch)
        return dict(zip(phi, torch.autograd.grad(out, list(phi.values()))))


def checkpoint(p: Problem, segment: int = 0) -> dict:
    """Checkpointed adjoint (the library's ``unroll:checkpoint=true`` maths) on the tape."""
    phi0 = {k: v.detach() for k, v in p.outer.items()}
    K = p.steps
    seg = segment or max(1, math.ceil(math.sqrt(K)))
    bounds, th, v = [], {k: x.detach() for k, x in p.inner.items()}, None
    for s0 in range(0, K, seg):
        bounds.append((s0, th, v))
        th, v = run(p, th, phi0, min(seg, K - s0), v)
    theta, phi = _leaves(th), _leaves(phi0)
    with torch.enable_grad():
        out = p.outer_loss(theta, phi, p.outer_batch)
        found = torch.autograd.grad(out, [*theta.values(), *phi.values()], allow_unused=True)
    tk = list(theta)
    lam = dict(zip(tk, found[:len(tk)]))
    hg = {k: g if g is not None else torch.zeros_like(phi[k]) for k, g in zip(phi, found[len(tk):])}
    lam_v = {k: torch.zeros_like(x) for k, x in lam.items()} if p.momentum else None
    for s0, th, v in reversed(bounds):
        traj = []
        for _ in range(min(seg, K - s0)):
            traj.append((th, v))
            th, v = run(p, th, phi0, 1, v)
        for th_k, v_k in reversed(traj):
            t_leaf, ph = _leaves(th_k), _leaves(phi0)
            v_leaf = _leaves(v_k) if v_k is not None else None
            with torch.enable_grad():
                new_t, new_v = _step(p, t_leaf, v_leaf, ph, create_graph=True)
                outs, cots, ins = list(new_t.values()), [lam[k] for k in tk], [*t_leaf.values()]
                if p.momentum:
                    outs += list(new_v.values())
                    cots += [lam_v[k] for k in tk]
                    if v_leaf is not None:
                        ins += list(v_leaf.values())
                found = torch.autograd.grad(outs, ins + list(ph.values()), cots, allow_unused=True)
            lam = dict(zip(tk, found[:len(tk)]))
            if p.momentum:
                lam_v = dict(zip(tk, found[len(tk):2 * len(tk)])) if v_leaf is not None else lam_v
            for k, gph in zip(ph, found[len(ins):]):
                if gph is not None:
                    hg[k] = hg[k] + gph
    return hg


def _dual_run(p: Problem, phi: dict) -> dict:
    """The loop at dual φ: each step evaluates G at dual leaves (primal leaf + θ's tangent; detaching would drop
    the tangent) and takes a tape gradient with respect to the leaves, which carries the tangent along."""
    theta, vel = {k: v.detach() for k, v in p.inner.items()}, None
    keys = list(theta)
    for _ in range(p.steps):
        leaves, used = {}, {}
        for k, v in theta.items():
            primal, tangent = forward_ad.unpack_dual(v)
            leaves[k] = primal.detach().requires_grad_(True)
            used[k] = forward_ad.make_dual(leaves[k], tangent) if tangent is not None else leaves[k]
        loss = p.inner_loss(used, phi, p.inner_batch)
        g = dict(zip(keys, torch.autograd.grad(loss, [leaves[k] for k in keys])))
        with torch.no_grad():
            if p.momentum:
                vel = g if vel is None else {k: p.momentum * vel[k] + g[k] for k in keys}
                theta = {k: used[k] - p.lr * vel[k] for k in keys}
            else:
                theta = {k: used[k] - p.lr * g[k] for k in keys}
    return theta


def forward(p: Problem) -> dict:
    """Forward mode by ``torch.autograd.forward_ad``, one basis direction of φ per run of the loop."""
    phi0 = {k: v.detach() for k, v in p.outer.items()}
    keys, sizes = list(phi0), [v.numel() for v in phi0.values()]
    n = sum(sizes)
    out = torch.empty(n, dtype=phi0[keys[0]].dtype)
    for i in range(n):
        basis = torch.zeros(n, dtype=out.dtype)
        basis[i] = 1.0
        with forward_ad.dual_level():
            dual = {k: forward_ad.make_dual(phi0[k], t.reshape(phi0[k].shape))
                    for k, t in zip(keys, basis.split(sizes))}
            theta = _dual_run(p, dual)
            with torch.no_grad():
                value = p.outer_loss(theta, dual, p.outer_batch)
            out[i] = forward_ad.unpack_dual(value).tangent
    return {k: c.reshape(phi0[k].shape) for k, c in zip(keys, out.split(sizes))}


def onestep(p: Problem, warm: dict, vel: Optional[dict] = None) -> dict:
    """d/dφ F(θ − lr ∇θG(θ, φ), φ) at the warm start θ."""
    phi = _leaves(p.outer)
    with torch.enable_grad():
        theta, _ = run(p, warm, phi, 1, vel, create_graph=True)
        out = p.outer_loss(theta, phi, p.outer_batch)
        return dict(zip(phi, torch.autograd.grad(out, list(phi.values()))))


def bome(p: Problem, theta: dict, eta: float) -> dict:
    """BOME's φ-part from θ on the tape: θ_T = K (heavy-ball) steps from θ, then three gradients (∇G at θ, ∇φG at
    θ_T, ∇F at θ), λ = max(η − ⟨∇F, ∇q̂⟩/‖∇q̂‖², 0), d_φ = ∇φF + λ(∇φG(θ) − ∇φG(θ_T))."""
    theta_t, _ = run(p, theta, p.outer, p.steps)

    def grads(loss_fn, th, batch):
        t, ph = _leaves(th), _leaves(p.outer)
        with torch.enable_grad():
            found = torch.autograd.grad(loss_fn(t, ph, batch), [*t.values(), *ph.values()], allow_unused=True)
        found = [g if g is not None else torch.zeros_like(v) for g, v in zip(found, [*t.values(), *ph.values()])]
        return dict(zip(t, found[:len(t)])), dict(zip(ph, found[len(t):]))

    g_theta, g_phi = grads(p.inner_loss, theta, p.inner_batch)
    g_phi_t = grads(p.inner_loss, theta_t, p.inner_batch)[1]
    f_theta, f_phi = grads(p.outer_loss, theta, p.outer_batch)
    dq_phi = {k: g_phi[k] - g_phi_t[k] for k in g_phi}
    dot = lambda a, b: sum((a[k] * b[k]).sum() for k in a)  # noqa: E731
    sq = dot(dq_phi, dq_phi) + dot(g_theta, g_theta)
    lam = torch.clamp((eta * sq - dot(f_phi, dq_phi) - dot(f_theta, g_theta)) / sq, min=0.0)
    return {k: f_phi[k] + lam * dq_phi[k] for k in f_phi}


def f2sa(p: Problem, warm: dict, lam: float, steps: int) -> dict:
    """F2SA from the warm start (y = z = θ) on the tape: ``steps`` (heavy-ball) GD steps on z over G and on y over
    G + F/λ, then ∇φF(y) + λ(∇φG(y) − ∇φG(z)); nothing is differentiated twice."""
    phi = {k: v.detach() for k, v in p.outer.items()}

    def grads(loss_fn, theta, batch, wrt_phi=False):
        th, ph = _leaves(theta), (_leaves(phi) if wrt_phi else phi)
        with torch.enable_grad():
            leaves = ph if wrt_phi else th
            found = torch.autograd.grad(loss_fn(th, ph, batch), list(leaves.values()), allow_unused=True)
        return {k: (g if g is not None else torch.zeros_like(leaves[k])) for k, g in zip(leaves, found)}

    y, z = f2sa_iterates(lambda t: grads(p.inner_loss, t, p.inner_batch),
                         lambda t: grads(p.outer_loss, t, p.outer_batch), p, warm, lam, steps)
    gf = grads(p.outer_loss, y, p.outer_batch, wrt_phi=True)
    gy_phi, gz_phi = grads(p.inner_loss, y, p.inner_batch, True), grads(p.inner_loss, z, p.inner_batch, True)
    return {k: gf[k] + lam * (gy_phi[k] - gz_phi[k]) for k in phi}


def soba(p: Problem, warm: dict, inner_steps: int, v_steps: int, v_lr: float) -> dict:
    """SOBA / AmIGO from the warm start and v = 0 on the tape: ``inner_steps`` (heavy-ball) GD steps on θ, then one
    ``create_graph`` gradient g = ∇θG(θ, φ) whose backward passes give H v (``v_steps`` steps v ← v − ρ(Hv − ∇θF))
    and the mixed term (∂²G/∂φ∂θ)ᵀv; returns ∇φF − (∂²G/∂φ∂θ)ᵀv."""
    phi0 = {k: v.detach() for k, v in p.outer.items()}
    theta_k, _ = run(p, warm, phi0, inner_steps)
    theta, phi = _leaves(theta_k), _leaves(phi0)
    with torch.enable_grad():
        f = p.outer_loss(theta, phi, p.outer_batch)
        found = torch.autograd.grad(f, [*theta.values(), *phi.values()], allow_unused=True)
        gt = dict(zip(theta, found[:len(theta)]))
        gp = {k: g if g is not None else torch.zeros_like(phi[k]) for k, g in zip(phi, found[len(theta):])}
        g = torch.autograd.grad(p.inner_loss(theta, phi, p.inner_batch), list(theta.values()), create_graph=True)
        v = {k: v_lr * gt[k] for k in gt}  # the first step from v = 0 needs no product
        for _ in range(v_steps - 1):
            hv = torch.autograd.grad(g, list(theta.values()), [v[k] for k in theta], retain_graph=True)
            v = {k: v[k] - v_lr * (h - gt[k]) for k, h in zip(theta, hv)}
        mixed = torch.autograd.grad(g, list(phi.values()), [v[k] for k in theta], allow_unused=True)
    return {k: (gp[k] - m if m is not None else gp[k]).detach() for k, m in zip(phi, mixed)}


def cmaes(p: Problem, popsize: int = 8, sigma: float = 0.1, seed: int = 1) -> dict:
    """One CMA-ES generation (the ``cma`` package) scored by the no-graph loop; returns m_old − m_new."""
    import cma
    import numpy as np
    phi = {k: v.detach() for k, v in p.outer.items()}
    keys, sizes = list(phi), [v.numel() for v in phi.values()]
    x0 = torch.cat([v.reshape(-1) for v in phi.values()]).double().numpy()
    es = cma.CMAEvolutionStrategy(x0, sigma, {"popsize": popsize, "seed": seed, "verbose": -9, "verb_disp": 0,
                                              "verb_log": 0, "CMA_diagonal": False})
    dtype = phi[keys[0]].dtype

    def to_params(vec):
        t = torch.as_tensor(np.asarray(vec), dtype=dtype)
        return {k: c.reshape(phi[k].shape) for k, c in zip(keys, t.split(sizes))}

    def score(vec):
        ph = to_params(vec)
        theta, _ = run(p, p.inner, ph, p.steps)
        with torch.no_grad():
            return float(p.outer_loss(theta, ph, p.outer_batch))

    m_old = np.array(es.mean, copy=True)
    candidates = es.ask()
    es.tell(candidates, [score(c) for c in candidates])
    m_new = np.array(es.mean, copy=True)
    score(m_new)  # the library evaluates the new mean too (evaluate_mean=True)
    return to_params(m_old - m_new)
