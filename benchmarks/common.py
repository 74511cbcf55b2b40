"""Shared pieces of the benchmarks: problems with exact references, timing, peak-memory measurement.

Peak memory is the process's peak resident set size (RSS) increase during one hypergradient call:
VmHWM after resetting it (``/proc/self/clear_refs`` = 5) minus VmRSS before the call, read from
``/proc/self/status``. tracemalloc does not see torch's CPU allocations reliably, so it is not used.
Every (problem, method) is measured in a fresh subprocess after one warm-up call, with glibc's mmap
threshold fixed at 4 KiB (``mallopt``) so that freed tensors go back to the OS and a previous call's
heap does not hide the next call's peak. Numbers are MiB and include everything the call allocates
(activations, stored trajectories, temporaries of the linear solve); a few hundred KiB is noise.
"""
from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")


# --------------------------------------------------------------------------------------------------
# process set-up and memory
# --------------------------------------------------------------------------------------------------
def setup_process(threads: int = 1) -> None:
    """One intra-op thread (2 shared cores: more threads are noisier), quiet torchopt warnings."""
    torch.set_num_threads(threads)
    import warnings
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*functorch.*")


def fix_malloc() -> None:
    """Make glibc return freed large blocks to the OS (fixed mmap threshold 4 KiB, no dynamic raise)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 4 * 1024)  # M_MMAP_THRESHOLD: every tensor of 4 KiB or more gets its own mapping
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except OSError:
        pass


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_rss_increase_mib(fn: Callable[[], Any]) -> float:
    """Peak RSS increase (MiB) while ``fn()`` runs: VmHWM (reset first) minus VmRSS before."""
    gc.collect()
    try:  # give free heap pages back to the OS, so that reusing them during fn() shows up in the RSS
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _status_kib("VmRSS")
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    return max(0.0, (peak - base) / 1024.0)


def memory_in_subprocess(script: str, args: list[str], timeout: float = 900) -> dict:
    """Run ``script --_memory args...`` in a fresh interpreter; it prints one JSON line with MiB values."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, script, "--_memory", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": tail[:200]}


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------
def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, budget: float = 20.0,
                     min_repeats: int = 3) -> dict[str, dict]:
    """Time several callables interleaved (a, b, a, b, ...) after one warm-up call each.

    Returns per name: median seconds, all times, and for every name the median of the per-round ratios
    to the first callable (paired ratios are robust to the machine's load drifting between rounds).
    The number of rounds is cut so that the whole measurement stays near ``budget`` seconds.
    """
    names = list(fns)
    first = {}
    for n in names:  # warm-up (also the first timing estimate)
        t0 = time.perf_counter()
        fns[n]()
        first[n] = time.perf_counter() - t0
    per_round = sum(first.values())
    rounds = int(max(min_repeats, min(repeats, budget // max(per_round, 1e-9)))) if repeats > 0 else 0
    times = {n: [] for n in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else list(reversed(names))
        for n in order:
            gc.collect()
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    if rounds == 0:  # smoke runs: the warm-up call is the only timing
        times = {n: [first[n]] for n in names}
    out = {}
    for n in names:
        ratios = [a / b for a, b in zip(times[n], times[names[0]])]
        out[n] = {"median": statistics.median(times[n]), "times": times[n],
                  "ratio_to_first": statistics.median(ratios), "rounds": rounds}
    return out


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
def flat(d: dict) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in d.values()]).double()


def rel_error(a: dict, ref: dict) -> float:
    fa, fb = flat({k: a[k] for k in ref}), flat(ref)
    return float((fa - fb).norm() / fb.norm())


def cosine(a: dict, ref: dict) -> float:
    fa, fb = flat({k: a[k] for k in ref}), flat(ref)
    return float(fa @ fb / (fa.norm() * fb.norm()).clamp_min(1e-300))


# --------------------------------------------------------------------------------------------------
# problems
# --------------------------------------------------------------------------------------------------
@dataclass
class Problem:
    """A benchmark problem: losses, data, initial params and the inner-loop settings shared by all methods."""

    name: str
    inner_loss: Callable
    outer_loss: Callable
    inner: dict
    outer: dict
    inner_batch: Any
    outer_batch: Any
    steps: int
    lr: float
    momentum: float = 0.0  # 0: plain SGD; > 0: heavy ball (torchopt.sgd(lr, momentum))
    extra: dict = field(default_factory=dict)

    @property
    def optimizer(self) -> str:
        return "momentum" if self.momentum else "sgd"

    def loop(self, steps: Optional[int] = None):
        import bilevel
        return bilevel.InnerLoop(steps=self.steps if steps is None else steps, lr=self.lr,
                                 optimizer=self.optimizer, momentum=self.momentum or 0.9)

    def bilevel_problem(self):
        import bilevel
        return bilevel.BilevelProblem(self.inner_loss, self.outer_loss)

    def to(self, dtype) -> "Problem":
        cast = lambda t: t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t
        tmap = lambda x: tuple(cast(t) for t in x) if isinstance(x, tuple) else cast(x)
        return Problem(self.name, self.inner_loss, self.outer_loss, {k: cast(v) for k, v in self.inner.items()},
                       {k: cast(v) for k, v in self.outer.items()}, tmap(self.inner_batch), tmap(self.outer_batch),
                       self.steps, self.lr, self.momentum, dict(self.extra))


def _ridge_losses():
    def inner_loss(inner, outer, batch):
        X, y = batch
        r = X @ inner["w"] - y
        return 0.5 * (r * r).mean() + 0.5 * (torch.exp(outer["log_lambda"]) * inner["w"] ** 2).sum()

    def outer_loss(inner, outer, batch):
        X, y = batch
        r = X @ inner["w"] - y
        return 0.5 * (r * r).mean()

    return inner_loss, outer_loss


def ridge(d: int = 1000, n: Optional[int] = None, m: Optional[int] = None, steps: int = 100,
          dtype=torch.float32, seed: int = 0) -> Problem:
    """Ridge regression with d per-feature log-penalties (the tests' oracle, benchmark-sized).

    G(w, λ) = ‖Xw − y‖²/(2n) + ½ Σ exp(λ_i) w_i²,  F(w) = ‖X_v w − y_v‖²/(2m); λ_i ≈ 0 ± 0.3, n = d/2.
    Closed form: w* = (A + D)⁻¹Xᵀy/n, dF/dλ = −exp(λ) ⊙ w* ⊙ (A + D)⁻¹∇_wF(w*) (``ridge_exact``).
    The SGD learning rate is 2/(λ_min + λ_max) of H (computed): each step contracts the error by (κ−1)/(κ+1).
    """
    n = n or max(50, d // 2)
    m = m or max(50, d // 5)
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    X = torch.randn(n, d, generator=gen, dtype=f64)
    X = X / X.std(dim=0, keepdim=True)
    w_true = torch.randn(d, generator=gen, dtype=f64)
    y = X @ w_true + 0.5 * torch.randn(n, generator=gen, dtype=f64)
    Xv = torch.randn(m, d, generator=gen, dtype=f64)
    yv = Xv @ w_true + 0.5 * torch.randn(m, generator=gen, dtype=f64)
    log_lambda = 0.3 * torch.randn(d, generator=gen, dtype=f64)
    H = X.T @ X / n + torch.diag(log_lambda.exp())
    ev = torch.linalg.eigvalsh(H)
    lr = float(2.0 / (ev[0] + ev[-1]))  # the optimal constant step: contraction (κ − 1)/(κ + 1) per step
    inner_loss, outer_loss = _ridge_losses()
    p = Problem(f"ridge d={d}", inner_loss, outer_loss, {"w": torch.zeros(d, dtype=f64)},
                {"log_lambda": log_lambda}, (X, y), (Xv, yv), steps, lr,
                extra={"lambda_min": float(ev[0]), "lambda_max": float(ev[-1]), "n": n, "m": m, "d": d})
    return p.to(dtype)


def ridge_exact(p: Problem) -> dict:
    """Closed-form IFT hypergradient of :func:`ridge` (float64)."""
    X, y = (t.double() for t in p.inner_batch)
    Xv, yv = (t.double() for t in p.outer_batch)
    lam = p.outer["log_lambda"].double()
    n = X.shape[0]
    H = X.T @ X / n + torch.diag(lam.exp())
    w = torch.linalg.solve(H, X.T @ y / n)
    g_w = Xv.T @ (Xv @ w - yv) / Xv.shape[0]
    return {"log_lambda": -lam.exp() * w * torch.linalg.solve(H, g_w)}


def _digits(seed: int = 0):
    from sklearn.datasets import load_digits
    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float64) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, va = perm[:900], perm[900:1350]
    return (X[tr], y[tr]), (X[va], y[va])


def digits_logreg(steps: int = 200, dtype=torch.float32, seed: int = 0) -> Problem:
    """L2-penalty tuning of a logistic regression on digits: 64 per-pixel penalties (as the example).

    G = CE(train) + ½ Σ_j exp(φ_j)‖W[:, j]‖² + ½·10⁻³‖(W, b)‖² (strongly convex), F = CE(validation).
    Plain SGD (lr 1.0) so that every peer runs the identical inner loop.
    """
    train, val = _digits(seed)

    def inner_loss(inner, outer, batch):
        x, labels = batch
        logits = x @ inner["W"].T + inner["b"]
        penalty = 0.5 * (torch.exp(outer["log_penalty"]) * (inner["W"] ** 2).sum(0)).sum()
        base = 0.5e-3 * ((inner["W"] ** 2).sum() + (inner["b"] ** 2).sum())
        return F.cross_entropy(logits, labels) + penalty + base

    def outer_loss(inner, outer, batch):
        x, labels = batch
        return F.cross_entropy(x @ inner["W"].T + inner["b"], labels)

    f64 = torch.float64
    p = Problem("digits logreg (64 L2 penalties)", inner_loss, outer_loss,
                {"W": torch.zeros(10, 64, dtype=f64), "b": torch.zeros(10, dtype=f64)},
                {"log_penalty": torch.full((64,), -4.0, dtype=f64)}, train, val, steps, 1.0)
    return p.to(dtype)


def digits_mlp(steps: int = 200, hidden: int = 32, dtype=torch.float32, seed: int = 0) -> Problem:
    """A small nonconvex MLP (64-32-10, tanh) on digits with 64 per-input-pixel L2 penalties on layer 1.

    G = CE(train) + ½ Σ_j exp(φ_j)‖W1[:, j]‖² + ½·10⁻²‖θ‖², F = CE(validation); heavy-ball SGD (lr 0.3,
    momentum 0.9). H is indefinite at θ_K (λ_min ≈ −2.7·10⁻³ at K = 200 in float64, −2·10⁻⁴ at K = 2000), so
    implicit solvers need damping (benchmarks/peer_problems.py uses δ = 0.05). No closed form: references are
    float64 computations (see solvers.py).
    """
    train, val = _digits(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    f64 = torch.float64
    theta0 = {"W1": torch.randn(hidden, 64, generator=gen, dtype=f64) / 8.0, "b1": torch.zeros(hidden, dtype=f64),
              "W2": torch.randn(10, hidden, generator=gen, dtype=f64) / math.sqrt(hidden),
              "b2": torch.zeros(10, dtype=f64)}

    def forward(inner, x):
        return torch.tanh(x @ inner["W1"].T + inner["b1"]) @ inner["W2"].T + inner["b2"]

    def inner_loss(inner, outer, batch):
        x, labels = batch
        penalty = 0.5 * (torch.exp(outer["log_penalty"]) * (inner["W1"] ** 2).sum(0)).sum()
        base = 0.5e-2 * sum((v ** 2).sum() for v in inner.values())
        return F.cross_entropy(forward(inner, x), labels) + penalty + base

    def outer_loss(inner, outer, batch):
        x, labels = batch
        return F.cross_entropy(forward(inner, x), labels)

    p = Problem(f"digits MLP 64-{hidden}-10 (64 L2 penalties)", inner_loss, outer_loss, theta0,
                {"log_penalty": torch.full((64,), -4.0, dtype=f64)}, train, val, steps, 0.3, momentum=0.9)
    return p.to(dtype)


# --------------------------------------------------------------------------------------------------
# hand-written torch.func computations ("the plain-PyTorch limit"): the same maths, no library
# --------------------------------------------------------------------------------------------------
def hw_run(p: Problem, theta: dict, phi: dict, steps: int, vel: Optional[dict] = None):
    """``steps`` (heavy-ball) SGD steps with torch.func.grad: θ ← θ − lr·v, v ← μv + ∇G."""
    g_fn = torch.func.grad(p.inner_loss)
    lr, mu = p.lr, p.momentum
    for _ in range(steps):
        g = g_fn(theta, phi, p.inner_batch)
        if mu:
            vel = g if vel is None else {k: mu * vel[k] + g[k] for k in g}
            theta = {k: theta[k] - lr * vel[k] for k in theta}
        else:
            theta = {k: theta[k] - lr * g[k] for k in theta}
    return theta, vel


def _dot(a, b):
    return sum((a[k] * b[k]).sum() for k in a)


ITERATIVE = ("cg", "neumann", "fixedpoint")


def hw_iterative_solve(method: str, matvec: Callable[[dict], dict], b: dict, *, maxiter: int, rtol: float,
                       alpha: float, terms: int) -> dict:
    """x ≈ A⁻¹b by the textbook iteration ``method`` (cg, neumann, fixedpoint) on dicts of tensors, as minimal as
    the hand-written baselines should be: CG stops when ‖r‖ ≤ rtol‖b‖ or after ``maxiter`` steps; Neumann is
    α Σ_{j<terms} (I − αA)^j b; fixed point x ← x + α(b − Ax) from 0."""
    if method == "cg":
        x = {k: torch.zeros_like(v) for k, v in b.items()}
        r = dict(b)
        d, rs = r, _dot(r, r)
        tol = rtol * math.sqrt(float(rs))
        for _ in range(maxiter):
            if math.sqrt(float(rs)) <= tol:
                break
            hd = matvec(d)
            a = rs / _dot(d, hd)
            x = {k: x[k] + a * d[k] for k in x}
            r = {k: r[k] - a * hd[k] for k in r}
            rs_new = _dot(r, r)
            d = {k: r[k] + (rs_new / rs) * d[k] for k in r}
            rs = rs_new
        return x
    if method == "neumann":
        term, total = b, b
        for _ in range(terms - 1):
            h = matvec(term)
            term = {k: term[k] - alpha * h[k] for k in term}
            total = {k: total[k] + term[k] for k in total}
        return {k: alpha * v for k, v in total.items()}
    if method == "fixedpoint":
        x = {k: torch.zeros_like(v) for k, v in b.items()}
        r = dict(b)
        bn = math.sqrt(float(_dot(b, b)))
        for _ in range(maxiter):
            if math.sqrt(float(_dot(r, r))) <= rtol * bn:
                break
            x = {k: x[k] + alpha * r[k] for k in x}
            hx = matvec(x)
            r = {k: b[k] - hx[k] for k in b}
        return x
    raise ValueError(f"hw_iterative_solve: unknown method {method!r}; choose from {ITERATIVE}")


def nystrom_indices(n: int, rank: int, seed: int) -> torch.Tensor:
    """The Nyström index set K: the first min(rank, n) entries of a permutation of n seeded with ``seed``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:min(rank, n)]


def nystrom_solve(columns: torch.Tensor, index: torch.Tensor, b: torch.Tensor, sigma: float) -> torch.Tensor:
    """x = (C W⁻¹ Cᵀ + σI)⁻¹ b for C = H[:, K], W = H[K, K] by the Woodbury identity in the form of the Nyström
    paper's reference code (Hataya & Yamada, arXiv:2302.09726): x = (b − C (σW + CᵀC)⁻¹ Cᵀ b) / σ."""
    W = columns[index]
    return (b - columns @ torch.linalg.solve(sigma * W + columns.T @ columns, columns.T @ b)) / sigma


def hw_implicit(p: Problem, method: str, *, maxiter: int = 100, rtol: float = 1e-6, alpha: float = 0.01,
                terms: int = 15, damping: float = 0.0, rank: int = 10, rho: float = 0.01, seed: int = 0) -> dict:
    """K steps, then IFT with a hand-written linear solve (cg / neumann / fixedpoint / exact / nystrom) of
    (H + δI)x = ∇θF, δ = ``damping``; nystrom solves (H_k + (δ + ρ)I)x = ∇θF with the rank-``rank`` Nyström
    approximation H_k of H at the seeded index set (:func:`nystrom_indices`), as ``nystrom:rank=,rho=,seed=``."""
    phi = {k: v.detach() for k, v in p.outer.items()}
    theta, _ = hw_run(p, p.inner, phi, p.steps)
    f = lambda th, ph: p.outer_loss(th, ph, p.outer_batch)
    (gt, gp) = torch.func.grad(f, argnums=(0, 1))(theta, phi)
    grad_theta = torch.func.grad(p.inner_loss)
    _, hvp_vjp = torch.func.vjp(lambda th: grad_theta(th, phi, p.inner_batch), theta)
    if damping:
        matvec = lambda v: {k: h + damping * v[k] for k, h in hvp_vjp(v)[0].items()}
    else:
        matvec = lambda v: hvp_vjp(v)[0]
    if method in ITERATIVE:
        x = hw_iterative_solve(method, matvec, gt, maxiter=maxiter, rtol=rtol, alpha=alpha, terms=terms)
    elif method in ("exact", "nystrom"):
        keys, shapes = list(gt), [v.shape for v in gt.values()]
        sizes = [v.numel() for v in gt.values()]
        flat_b = torch.cat([v.reshape(-1) for v in gt.values()])

        def unflat(vec):
            return {k: t.reshape(s) for k, t, s in zip(keys, vec.split(sizes), shapes)}

        if method == "exact":
            eye = torch.eye(flat_b.numel(), dtype=flat_b.dtype)
            Hm = torch.func.vmap(lambda e: torch.cat([v.reshape(-1) for v in matvec(unflat(e)).values()]))(eye)
            x = unflat(torch.linalg.solve(Hm.T, flat_b))
        else:  # the columns of H itself (δ joins the ridge)
            index = nystrom_indices(flat_b.numel(), rank, seed)
            rows = torch.func.vmap(lambda e: torch.cat([v.reshape(-1) for v in hvp_vjp(unflat(e))[0].values()]))(
                torch.nn.functional.one_hot(index, flat_b.numel()).to(flat_b.dtype))
            x = unflat(nystrom_solve(rows.T, index, flat_b, damping + rho))
    else:
        raise ValueError(method)
    _, mixed = torch.func.vjp(lambda ph: grad_theta(theta, ph, p.inner_batch), phi)
    m = mixed(x)[0]
    return {k: gp[k] - m[k] for k in gp}


def hw_unroll(p: Problem, truncate: int = 0) -> dict:
    """torch.func.grad through the hand-written loop (the last ``truncate`` steps; 0: all)."""
    phi = {k: v.detach() for k, v in p.outer.items()}
    T = p.steps if truncate == 0 else min(truncate, p.steps)
    theta, vel = hw_run(p, p.inner, phi, p.steps - T)

    def objective(ph):
        th, _ = hw_run(p, theta, ph, T, vel)
        return p.outer_loss(th, ph, p.outer_batch)

    return torch.func.grad(objective)(phi)


def hw_checkpoint(p: Problem, segment: int = 0) -> dict:
    """Hand-written checkpointed adjoint: store every ``segment``-th iterate, recompute, vjp per step."""
    phi = {k: v.detach() for k, v in p.outer.items()}
    K = p.steps
    seg = segment or max(1, math.ceil(math.sqrt(K)))
    mu, lr = p.momentum, p.lr
    g_fn = torch.func.grad(p.inner_loss)

    def step(th, v, ph):
        g = g_fn(th, ph, p.inner_batch)
        if mu:
            v = g if v is None else {k: mu * v[k] + g[k] for k in g}
            return {k: th[k] - lr * v[k] for k in th}, v
        return {k: th[k] - lr * g[k] for k in th}, None

    bounds, th, v = [], p.inner, None
    for s0 in range(0, K, seg):
        bounds.append((s0, th, v))
        for _ in range(min(seg, K - s0)):
            th, v = step(th, v, phi)
    (lam, hg) = torch.func.grad(lambda t, ph: p.outer_loss(t, ph, p.outer_batch), argnums=(0, 1))(th, phi)
    lam_v = {k: torch.zeros_like(x) for k, x in th.items()} if mu else None
    for s0, th, v in reversed(bounds):
        traj = []
        for _ in range(min(seg, K - s0)):
            traj.append((th, v))
            th, v = step(th, v, phi)
        for th_k, v_k in reversed(traj):
            if mu and v_k is not None:
                _, fn = torch.func.vjp(step, th_k, v_k, phi)
                lam, lam_v, gph = fn((lam, lam_v))
            elif mu:  # the first step creates the velocity from the gradient
                _, fn = torch.func.vjp(lambda t, ph: step(t, None, ph), th_k, phi)
                lam, gph = fn((lam, lam_v))
            else:
                _, fn = torch.func.vjp(lambda t, ph: step(t, None, ph)[0], th_k, phi)
                lam, gph = fn(lam)
            hg = {k: hg[k] + gph[k] for k in hg}
    return hg


def hw_forward(p: Problem, chunk_size: int = 32) -> dict:
    """jvp through the hand-written loop, vmapped over chunks of basis tangents."""
    phi = {k: v.detach() for k, v in p.outer.items()}
    keys = list(phi)
    sizes = [v.numel() for v in phi.values()]
    n = sum(sizes)

    def objective(ph):
        th, _ = hw_run(p, p.inner, ph, p.steps)
        return p.outer_loss(th, ph, p.outer_batch)

    def directional(t):
        return torch.func.jvp(objective, (phi,), (t,))[1]

    out = []
    for b in range(0, n, chunk_size):
        rows = torch.arange(b, min(n, b + chunk_size))
        basis = torch.zeros(len(rows), n, dtype=phi[keys[0]].dtype)
        basis[torch.arange(len(rows)), rows] = 1
        tang = {k: c.reshape(len(rows), *phi[k].shape) for k, c in zip(keys, basis.split(sizes, dim=1))}
        out.append(torch.func.vmap(directional)(tang))
    g = torch.cat(out)
    return {k: c.reshape(phi[k].shape) for k, c in zip(keys, g.split(sizes))}


def hw_onestep(p: Problem, theta: dict, vel: Optional[dict] = None) -> dict:
    """torch.func.grad through one (heavy-ball) step from a warm start."""
    phi = {k: v.detach() for k, v in p.outer.items()}

    def objective(ph):
        th, _ = hw_run(p, theta, ph, 1, vel)
        return p.outer_loss(th, ph, p.outer_batch)

    return torch.func.grad(objective)(phi)


F2SA_LAMBDA, F2SA_STEPS = 10.0, 10
"""The f2sa rows of the benchmarks: a fixed λ and this many steps on y and z from the warm start (its O(1/λ) bias
shows in ``cos vs IFT``; the target is the same computation in float64)."""


def f2sa_iterates(grad_inner, grad_outer, p: Problem, theta: dict, lam: float, steps: int) -> tuple[dict, dict]:
    """F2SA's y and z after ``steps`` (heavy-ball) GD steps from y = z = θ: z over G, y over G + F/λ.
    ``grad_inner(t)`` / ``grad_outer(t)`` give ∇θG / ∇θF at t (torch.func or the tape: the two twins)."""
    y, z, vy, vz = dict(theta), dict(theta), None, None
    for _ in range(steps):
        gz = grad_inner(z)
        gi, go = grad_inner(y), grad_outer(y)
        gy = {k: gi[k] + go[k] / lam for k in y}
        if p.momentum:
            vz = gz if vz is None else {k: p.momentum * vz[k] + gz[k] for k in z}
            vy = gy if vy is None else {k: p.momentum * vy[k] + gy[k] for k in y}
            gz, gy = vz, vy
        z = {k: z[k] - p.lr * gz[k] for k in z}
        y = {k: y[k] - p.lr * gy[k] for k in y}
    return y, z


def hw_f2sa(p: Problem, theta: dict, lam: float, steps: int) -> dict:
    """F2SA from the warm start θ (y = z = θ), torch.func: ``steps`` (heavy-ball) GD steps on z over G and on y over
    G + F/λ, then ∇φF(y) + λ(∇φG(y) − ∇φG(z)) (bilevel/solvers/f2sa.py)."""
    phi = {k: v.detach() for k, v in p.outer.items()}
    g_in, g_out = torch.func.grad(p.inner_loss), torch.func.grad(p.outer_loss)
    y, z = f2sa_iterates(lambda t: g_in(t, phi, p.inner_batch), lambda t: g_out(t, phi, p.outer_batch),
                         p, theta, lam, steps)
    g_phi = torch.func.grad(p.inner_loss, argnums=1)
    gf = torch.func.grad(p.outer_loss, argnums=1)(y, phi, p.outer_batch)
    gy_phi, gz_phi = g_phi(y, phi, p.inner_batch), g_phi(z, phi, p.inner_batch)
    return {k: gf[k] + lam * (gy_phi[k] - gz_phi[k]) for k in phi}


BOME_ETA = 5.0
"""The bome rows of the benchmarks: η of the gradient control, large enough that the barrier is active (λ > 0) at
the cold start p.inner, where the rows start (at η = 0.5 λ = 0 on ridge, whose F does not read φ: d_φ = 0)."""


def hw_bome(p: Problem, theta: dict, eta: float = BOME_ETA) -> dict:
    """BOME's φ-part from θ, torch.func (bilevel/solvers/bome.py): θ_T = K (heavy-ball) steps from θ, ∇q̂ =
    (∇φG(θ) − ∇φG(θ_T), ∇θG(θ)), λ = max(η − ⟨∇F, ∇q̂⟩/‖∇q̂‖², 0), d_φ = ∇φF(θ) + λ∇φq̂."""
    phi = {k: v.detach() for k, v in p.outer.items()}
    theta_t, _ = hw_run(p, theta, phi, p.steps)
    g_theta, g_phi = torch.func.grad(p.inner_loss, argnums=(0, 1))(theta, phi, p.inner_batch)
    g_phi_t = torch.func.grad(p.inner_loss, argnums=1)(theta_t, phi, p.inner_batch)
    f_theta, f_phi = torch.func.grad(p.outer_loss, argnums=(0, 1))(theta, phi, p.outer_batch)
    dq_phi = {k: g_phi[k] - g_phi_t[k] for k in phi}
    sq = _dot(dq_phi, dq_phi) + _dot(g_theta, g_theta)
    lam = torch.clamp((eta * sq - _dot(f_phi, dq_phi) - _dot(f_theta, g_theta)) / sq, min=0.0)
    return {k: f_phi[k] + lam * dq_phi[k] for k in phi}


SOBA_INNER, SOBA_V = 1, 10
"""The soba rows of the benchmarks: from the warm start and v = 0, this many (heavy-ball) steps on θ and GD steps on v
(ρ = the problem's lr); the target is the same computation in float64."""


def hw_soba(p: Problem, theta: dict, inner_steps: int = SOBA_INNER, v_steps: int = SOBA_V,
            v_lr: Optional[float] = None) -> dict:
    """SOBA / AmIGO from the warm start θ and v = 0, torch.func: ``inner_steps`` (heavy-ball) GD steps on θ, then
    v ← v − ρ (H v − ∇θF) ``v_steps`` times at the new θ (ρ = ``v_lr``, default the problem's lr), then
    ∇φF − (∂²G/∂φ∂θ)ᵀ v (bilevel/solvers/soba.py)."""
    rho = p.lr if v_lr is None else v_lr
    phi = {k: v.detach() for k, v in p.outer.items()}
    theta, _ = hw_run(p, theta, phi, inner_steps)
    g_in = torch.func.grad(p.inner_loss)
    gt, gp = torch.func.grad(p.outer_loss, argnums=(0, 1))(theta, phi, p.outer_batch)
    _, hvp = torch.func.vjp(lambda th: g_in(th, phi, p.inner_batch), theta)
    v = {k: rho * gt[k] for k in gt}  # the first step from v = 0 needs no product
    for _ in range(v_steps - 1):
        hv = hvp(v)[0]
        v = {k: v[k] - rho * (hv[k] - gt[k]) for k in v}
    _, mixed = torch.func.vjp(lambda ph: g_in(theta, ph, p.inner_batch), phi)
    m = mixed(v)[0]
    return {k: gp[k] - m[k] for k in gp}


def hw_cmaes(p: Problem, popsize: int = 8, sigma: float = 0.1, seed: int = 1) -> dict:
    """One CMA-ES generation with the cma package and the no-grad hand-written loop; m_old − m_new."""
    import cma
    import numpy as np
    phi = {k: v.detach() for k, v in p.outer.items()}
    keys, sizes = list(phi), [v.numel() for v in phi.values()]
    x0 = torch.cat([v.reshape(-1) for v in phi.values()]).double().numpy()
    es = cma.CMAEvolutionStrategy(x0, sigma, {"popsize": popsize, "seed": seed, "verbose": -9,
                                              "verb_disp": 0, "verb_log": 0, "CMA_diagonal": False})
    dtype = phi[keys[0]].dtype

    def to_params(vec):
        t = torch.as_tensor(np.asarray(vec), dtype=dtype)
        return {k: c.reshape(phi[k].shape) for k, c in zip(keys, t.split(sizes))}

    def score(vec):
        ph = to_params(vec)
        with torch.no_grad():
            th, _ = hw_run(p, p.inner, ph, p.steps)
            return float(p.outer_loss(th, ph, p.outer_batch))

    m_old = np.array(es.mean, copy=True)
    cands = es.ask()
    es.tell(cands, [score(c) for c in cands])
    m_new = np.array(es.mean, copy=True)
    score(m_new)  # the library evaluates the new mean too (evaluate_mean=True)
    return to_params(m_old - m_new)


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------
def md_table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(x):
        if isinstance(x, float):
            if math.isnan(x):
                return "—"
            if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e5):
                return f"{x:.2e}"
            return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
        return str(x)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def machine_line() -> str:
    import platform
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores (shared with other jobs), torch {torch.__version__}, "
            f"Python {platform.python_version()}, 1 intra-op thread")
