"""Our hypergradients against the peer libraries (torchopt, higher, betty) on identical problems.

    pip install -c constraints-cpu.txt -e ".[dev,bench]"      # peers: torchopt (a dependency), higher,
    pip install --ignore-requires-python --no-deps betty-ml==0.2.1   # matplotlib; betty declares py<3.11
    python benchmarks/peers.py --quick     # a few minutes
    python benchmarks/peers.py             # the full run (ridge d up to 5,000, T up to 1,000)

What is compared (every method gets the same data, the same initial inner params, the same inner loop:
K steps of SGD / heavy-ball SGD with the same lr, and the same iteration counts):
- implicit: ours ``cg`` / ``neumann`` vs torchopt ``custom_root`` (``solve_cg`` / ``solve_inv(ns=True)``)
  and betty's ``cg`` / ``neumann`` hypergradient functions. CG runs to rtol 1e-6 (ours, torchopt); betty's
  CG has only a fixed iteration count, given the number of iterations our CG used. Neumann: identical
  alpha and number of terms everywhere. Betty is driven through its hypergradient functions
  (``betty.hypergradient.cg/neumann/darts``, the code its Engine calls) with a minimal adapter object
  exposing the attributes they read, after the same inner loop (its Engine has no notion of "K steps
  from θ₀, then one hypergradient" without its data loaders, and this isolates the hypergradient code).
- unroll: ours ``unroll`` vs higher ``innerloop_ctx`` (torch.optim.SGD), torchopt ``MetaSGD`` and the
  torchopt functional optimiser differentiated by autograd.
- onestep: ours ``onestep`` (exact lookahead) vs betty ``darts`` (finite differences, DARTS eq. 8 as
  betty implements it: no inner learning-rate factor, at the current iterate), from the same warm start.
- zeroth order: ours ``cmaes`` vs torchopt's zero-order estimators (``naive``, ``antithetic``, ``forward``)
  with the same outer SGD/Adam loop: function evaluations (inner-loop runs) to reach a target outer loss.
- forward: ours ``forward`` vs ours ``unroll`` (no PyTorch peer has forward mode).
- scaling in the number of inner steps T (10, 50, 200, 1,000): time and memory of unroll, truncated
  unroll (last 10 steps), checkpointed unroll, forward, cg (implicit) and higher.

Errors are against float64 references: the closed form (ridge), or a converged CG (rtol 1e-10) at the
float64 K-step iterate (digits, Taylor MLP) for implicit methods; the float64 derivative of the K-step
loop for unroll/forward. Peak memory: peak RSS increase of one call (benchmarks/common.py), in a fresh
subprocess per (problem, method) in the full run, in-process (fixed malloc threshold) with ``--quick``.
A peer that fails has its error message in the table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import common  # noqa: E402
from common import Problem, cosine, hw_run, hw_unroll, md_table, rel_error  # noqa: E402

THIS = os.path.abspath(__file__)


# --------------------------------------------------------------------------------------------------
# problems
# --------------------------------------------------------------------------------------------------
def taylor_problem(steps: int = 100, hidden: int = 32) -> Problem:
    """One ITL-style Taylor-loss learning step: an MLP trained on digits rotated by 30° with the Taylor
    loss L_ω (12 coefficients ω, ITL parameterisation, CE-fit initialisation scaled by C = 10) plus
    ½·10⁻³‖θ‖²; outer loss = cross-entropy on digits rotated by 60°. Needs problems/losses/taylor.py."""
    from bilevel.problems.data.images import rotate
    from bilevel.problems.losses.taylor import TaylorSpec, initial_theta, taylor_loss
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, va = perm[:900], perm[900:1350]
    Xtr = rotate(X[tr], 30.0).reshape(len(tr), 64)
    Xva = rotate(X[va], 60.0).reshape(len(va), 64)
    spec = TaylorSpec("itl", 4)
    gen = torch.Generator().manual_seed(1)
    theta0 = {"W1": torch.randn(hidden, 64, generator=gen) / 8.0, "b1": torch.zeros(hidden),
              "W2": torch.randn(10, hidden, generator=gen) / math.sqrt(hidden), "b2": torch.zeros(10)}

    def forward(inner, x):
        return torch.tanh(x @ inner["W1"].T + inner["b1"]) @ inner["W2"].T + inner["b2"]

    def inner_loss(inner, outer, batch):
        x, t = batch
        base = 0.5e-3 * sum((v ** 2).sum() for v in inner.values())
        return taylor_loss(forward(inner, x), t, outer["omega"], spec) + base

    def outer_loss(inner, outer, batch):
        x, t = batch
        return F.cross_entropy(forward(inner, x), t)

    omega = initial_theta(spec, "cross_entropy", scale=10.0)
    return Problem("Taylor-loss MLP, rotated digits (12 loss coefficients)", inner_loss, outer_loss, theta0,
                   {"omega": omega}, (Xtr, y[tr]), (Xva, y[va]), steps, 0.5, momentum=0.9)


def build(key: str, quick: bool) -> Problem:
    if key.startswith("ridge"):
        d = int(key.split("-")[1])
        return common.ridge(d=d, steps=100)
    if key == "digits":
        return common.digits_logreg(steps=100 if quick else 200)
    if key == "taylor":
        return taylor_problem(steps=50 if quick else 100)
    raise KeyError(key)


def problem_keys(quick: bool) -> list[str]:
    keys = ["ridge-500"] if quick else ["ridge-100", "ridge-1000", "ridge-5000"]
    keys.append("digits")
    try:
        import bilevel.problems.losses.taylor  # noqa: F401
        keys.append("taylor")
    except Exception:
        pass
    return keys


def with_steps(p: Problem, steps: int) -> Problem:
    q = Problem(p.name, p.inner_loss, p.outer_loss, p.inner, p.outer, p.inner_batch, p.outer_batch, steps, p.lr,
                p.momentum, p.extra)
    return q


# --------------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------------
def references(key: str, p: Problem) -> dict:
    """float64: IFT (closed form, or CG to rtol 1e-10 at the float64 K-step iterate), K-step loop derivative,
    the warm start for one-step methods, the spectrum estimate (power iteration) for alpha."""
    import bilevel
    p64 = p.to(torch.float64)
    theta_k, _ = hw_run(p64, p64.inner, p64.outer, p64.steps)
    bp = p64.bilevel_problem()
    gfn = torch.func.grad(p64.inner_loss)
    _, vjp_fn = torch.func.vjp(lambda th: gfn(th, p64.outer, p64.inner_batch), theta_k)
    v = {k: torch.randn_like(x) for k, x in theta_k.items()}
    lam = 0.0
    for _ in range(50):  # power iteration for λ_max(H)
        nv = math.sqrt(sum(float((x * x).sum()) for x in v.values()))
        v = {k: x / nv for k, x in v.items()}
        hv = vjp_fn(v)[0]
        lam = sum(float((hv[k] * v[k]).sum()) for k in v)
        v = hv
    if key.startswith("ridge"):
        ift = common.ridge_exact(p64)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ift = bilevel.hypergrad(bp, theta_k, p64.outer, inner_batch=p64.inner_batch, outer_batch=p64.outer_batch,
                                        solver="cg:maxiter=3000,rtol=1e-10", loop=bilevel.InnerLoop(steps=0, lr=p.lr)
                                        ).hypergrad
            except Exception as err:  # H indefinite at θ_K (nonconvex): no IFT reference; use the loop's
                print(f"[{key}] no IFT reference ({type(err).__name__}: {err}); using the K-step loop derivative")
                ift = None
    warm, _ = hw_run(p, p.inner, p.outer, p.steps)
    loop_ref = hw_unroll(p64)
    return {"ift": ift if ift is not None else loop_ref, "ift_missing": ift is None, "loop": loop_ref, "warm": warm,
            "lambda_max": lam}


# --------------------------------------------------------------------------------------------------
# peer adapters: every function returns a zero-argument callable computing the hypergradient dict
# --------------------------------------------------------------------------------------------------
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


def ours(p: Problem, spec: str, warm=None, steps=None):
    import bilevel
    bp, loop = p.bilevel_problem(), p.loop(steps)
    start = warm if warm is not None else p.inner
    return lambda: bilevel.hypergrad(bp, start, p.outer, inner_batch=p.inner_batch, outer_batch=p.outer_batch,
                                     solver=spec, loop=loop)


def torchopt_implicit(p: Problem, solver: str, *, maxiter: int, rtol: float = 1e-6, alpha: float = 1.0):
    import torchopt
    ik, ok = _keys(p)

    def optimality(theta, phi):  # ∇_θG; torchopt differentiates it with functorch.vjp, so torch.func inside
        return torch.func.grad(lambda t: p.inner_loss(dict(zip(ik, t)), {ok[0]: phi}, p.inner_batch))(tuple(theta))

    if solver == "cg":
        solve = torchopt.linear_solve.solve_cg(maxiter=maxiter, rtol=rtol)
    else:
        solve = torchopt.linear_solve.solve_inv(ns=True, maxiter=maxiter, alpha=alpha)

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
# the method table of one problem
# --------------------------------------------------------------------------------------------------
def cg_iterations_used(p: Problem, rtol: float) -> int:
    try:
        r = ours(p, f"cg:maxiter=500,rtol={rtol}")()
    except Exception:  # CG breaks down (indefinite Hessian): give betty a fixed budget; ours' row records the error
        return 50
    return int(r.diagnostics["iterations"])


def method_table(key: str, p: Problem, refs: dict, quick: bool) -> list[tuple[str, str, str, object]]:
    """(group, label, target, callable-factory) for one problem."""
    alpha = float(f"{1.0 / refs['lambda_max']:.4g}")
    terms = 20 if key == "taylor" else 50
    rtol = 1e-6
    it = cg_iterations_used(p, rtol)
    m = [
        ("implicit", "ours cg", "ift", lambda: ours(p, f"cg:maxiter=500,rtol={rtol}")),
        ("implicit", "torchopt custom_root CG", "ift", lambda: torchopt_implicit(p, "cg", maxiter=500, rtol=rtol)),
        ("implicit", f"betty cg ({it} it.)", "ift", lambda: betty_hypergrad(p, "cg", iterations=it)),
        ("implicit", f"betty cg ({it} it., cg_alpha={alpha})", "ift",
         lambda: betty_hypergrad(p, "cg", iterations=it, alpha=alpha)),
        ("implicit", f"ours neumann ({terms} terms)", "ift", lambda: ours(p, f"neumann:alpha={alpha},terms={terms}")),
        ("implicit", "torchopt custom_root Neumann", "ift",
         lambda: torchopt_implicit(p, "ns", maxiter=terms - 1, alpha=alpha)),
        ("implicit", "betty neumann", "ift", lambda: betty_hypergrad(p, "neumann", iterations=terms - 1, alpha=alpha)),
        ("unroll", "ours unroll", "loop", lambda: ours(p, "unroll")),
        ("unroll", "higher innerloop_ctx", "loop", lambda: higher_unroll(p)),
        ("unroll", "torchopt MetaSGD", "loop", lambda: torchopt_metasgd(p)),
        ("unroll", "torchopt functional (autograd)", "loop", lambda: torchopt_functional(p)),
        ("onestep", "ours onestep", "ift", lambda: ours(p, "onestep", warm=refs["warm"])),
        ("onestep", "betty darts", "ift", lambda: betty_hypergrad(p, "darts", warm=refs["warm"])),
    ]
    n_outer = sum(v.numel() for v in p.outer.values())
    if n_outer <= (128 if quick else 1000):
        chunk = min(n_outer, 128)
        m.append(("forward", f"ours forward (chunk {chunk})", "loop", lambda: ours(p, f"forward:chunk_size={chunk}")))
    return m


# --------------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------------
def measure_memory(key: str, label: str, quick: bool, T: int = 0) -> dict:
    return common.memory_in_subprocess(THIS, [key, label, str(T) + ("q" if quick else "")], timeout=1200)


def memory_child(key: str, label: str, tq: str) -> None:
    common.fix_malloc()
    common.setup_process()
    quick = tq.endswith("q")
    T = int(tq.rstrip("q"))
    p = build(key, quick)
    if T:
        fn = scaling_methods(with_steps(p, T), T)[label]()
    else:
        refs = references(key, p)
        fn = dict((lab, f) for _, lab, _, f in method_table(key, p, refs, quick))[label]()
        del refs
    fn()
    print(json.dumps({"mem": common.peak_rss_increase_mib(fn)}))


def scaling_methods(p: Problem, T: int) -> dict:
    return {
        "unroll": lambda: ours(p, "unroll"),
        "unroll truncate=10": lambda: ours(p, "unroll:truncate=10"),
        "unroll checkpoint": lambda: ours(p, "unroll:checkpoint=true"),
        "forward": lambda: ours(p, "forward:chunk_size=64"),
        "cg (implicit)": lambda: ours(p, "cg:maxiter=200,rtol=1e-6"),
        "higher unroll": lambda: higher_unroll(p),
    }


def run_problem(key: str, quick: bool, budget: float, in_process_memory: bool) -> tuple[list, list]:
    p = build(key, quick)
    refs = references(key, p)
    rows, recs = [], []
    table = method_table(key, p, refs, quick)
    fns, errors = {}, {}
    for group, label, target, factory in table:
        try:
            fn = factory()
            fns[label] = fn
        except Exception as err:
            errors[label] = f"{type(err).__name__}: {err}"
    # correctness and a first call of each (errors recorded, never raised)
    results = {}
    for label, fn in list(fns.items()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results[label] = {k: v.detach() for k, v in as_dict(fn()).items()}
        except Exception as err:
            errors[label] = f"{type(err).__name__}: {str(err).splitlines()[0][:150]}"
            fns.pop(label)
    # timing: per group, interleaved
    timings = {}
    for group in dict.fromkeys(g for g, *_ in table):
        members = {lab: fns[lab] for g, lab, *_ in table if g == group and lab in fns}
        if members:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                timings.update(common.time_interleaved(members, 0 if budget == 0 else 15, budget=budget,
                                                       min_repeats=3 if not quick else 2))
    for group, label, target, _ in table:
        rec = {"problem": key, "group": group, "method": label, "target": target, "ift_missing": refs["ift_missing"]}
        if label in errors:
            rec["error"] = errors[label]
            rows.append([group, label, f"**failed**: {errors[label][:120]}", "", "", "", "", ""])
            recs.append(rec)
            continue
        g = results[label]
        ref = refs[target]
        rec.update(rel_error=rel_error(g, ref), cosine=cosine(g, ref), cos_ift=cosine(g, refs["ift"]),
                   time=timings[label]["median"], ratio_first=timings[label]["ratio_to_first"])
        if budget == 0:  # --tiny: correctness only
            rec["mem"] = math.nan
        elif in_process_memory:
            common.fix_malloc()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rec["mem"] = common.peak_rss_increase_mib(fns[label])
        else:
            rec["mem"] = measure_memory(key, label, quick).get("mem", math.nan)
        rows.append([group, label, target, rec["rel_error"], rec["cosine"], rec["cos_ift"], 1e3 * rec["time"],
                     rec["mem"]])
        recs.append(rec)
        print(f"[{key}] {label:40s} err {rec['rel_error']:.2e} cos {rec['cosine']:+.4f} "
              f"{1e3 * rec['time']:9.1f} ms {rec['mem']:7.1f} MiB", flush=True)
    return rows, recs


def zero_order(quick: bool) -> tuple[str, list]:
    """Function evaluations (inner-loop runs) to reach a target outer loss on digits (64 penalties).

    Target: F0 − 0.5 (F0 − F_cg), F_cg = the outer loss after 10 Adam steps (lr 0.1) on our cg
    hypergradient. Ours cmaes (popsize 8, σ 0.3, SGD lr 1 on its pseudo-gradient: popsize + 1 evaluations
    per generation) vs torchopt zero_order (naive / antithetic / forward; Normal(0, 1) perturbations,
    σ 0.1, 8 samples; Adam lr 0.1; evaluations per step = num_samples (+1 for forward/naive's base value
    (naive uses none), antithetic 2 per sample)."""
    import bilevel
    import torchopt
    p = common.digits_logreg(steps=20 if quick else 100)
    bp, loop = p.bilevel_problem(), p.loop()
    ik, ok = _keys(p)
    cap = 200 if quick else 600

    def outer_value(phi_t):
        with torch.no_grad():
            th, _ = hw_run(p, p.inner, {ok[0]: phi_t}, p.steps)
            return float(p.outer_loss(th, {ok[0]: phi_t}, p.outer_batch))

    phi0 = p.outer[ok[0]].clone()
    F0 = outer_value(phi0)
    phi = phi0.clone().requires_grad_(True)
    opt = torch.optim.Adam([phi], lr=0.1)
    for _ in range(10):
        r = bilevel.hypergrad(bp, p.inner, {ok[0]: phi.detach()}, inner_batch=p.inner_batch,
                              outer_batch=p.outer_batch, solver="cg:maxiter=200,rtol=1e-6", loop=loop)
        phi.grad = r.hypergrad[ok[0]]
        opt.step()
    F_cg = outer_value(phi.detach())
    target = F0 - 0.5 * (F0 - F_cg)
    rows = []

    # ours: cmaes
    t0 = time.perf_counter()
    state, phi_c, evals, reached = None, phi0.clone(), 0, None
    while evals < cap:
        r = bilevel.hypergrad(bp, p.inner, {ok[0]: phi_c}, inner_batch=p.inner_batch, outer_batch=p.outer_batch,
                              solver="cmaes:popsize=8,sigma=0.3,seed=1", loop=loop, state=state)
        state = r.state
        phi_c = phi_c - r.hypergrad[ok[0]]
        evals += int(r.diagnostics["evaluations"])
        if r.diagnostics["outer_loss"] <= target:
            reached = evals
            break
    rows.append(["ours cmaes (popsize 8, σ 0.3)", reached if reached else f"> {cap}", round(outer_value(phi_c), 4),
                 time.perf_counter() - t0])

    # torchopt zero-order
    for method in ("naive", "antithetic", "forward"):
        t0 = time.perf_counter()
        try:
            # a scalar distribution: torchopt draws sample(sample_shape=param.shape)
            dist = torch.distributions.Normal(torch.tensor(0.0), torch.tensor(1.0))
            per = {"naive": 8, "antithetic": 16, "forward": 9}[method]

            @torchopt.diff.zero_order(distribution=dist, method=method, argnums=0, num_samples=8, sigma=0.1)
            def objective(phi_t):
                with torch.no_grad():
                    th, _ = hw_run(p, p.inner, {ok[0]: phi_t}, p.steps)
                    return p.outer_loss(th, {ok[0]: phi_t}, p.outer_batch)

            torch.manual_seed(0)
            phi_z = phi0.clone().requires_grad_(True)
            opt = torch.optim.Adam([phi_z], lr=0.1)
            evals, reached = 0, None
            while evals < cap:
                loss = objective(phi_z)
                opt.zero_grad()
                loss.backward()
                opt.step()
                evals += per + 1  # its samples + the forward value
                if outer_value(phi_z.detach()) <= target:
                    reached = evals
                    break
            rows.append([f"torchopt zero_order '{method}' (8 samples, σ 0.1)", reached if reached else f"> {cap}",
                         round(outer_value(phi_z.detach()), 4), time.perf_counter() - t0])
        except Exception as err:
            rows.append([f"torchopt zero_order '{method}'", f"failed: {type(err).__name__}: {err}"[:120], "", ""])

    # the σ² scaling of torchopt's 'forward' estimator, measured on a quadratic with known gradient
    bias = []
    for method in ("naive", "antithetic", "forward"):
        for sigma in (0.1, 0.5):
            torch.manual_seed(0)
            a = torch.linspace(0.5, 2.0, 8, dtype=torch.float64)
            dist = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))

            @torchopt.diff.zero_order(distribution=dist, method=method, argnums=0, num_samples=4000, sigma=sigma)
            def quad(x):
                return (a * x * x).sum() * 0.5 + x.sum()

            x = torch.ones(8, dtype=torch.float64, requires_grad=True)
            quad(x).backward()
            true = a * 1.0 + 1.0
            bias.append([method, sigma, float(x.grad.norm() / true.norm()), cosine({"x": x.grad}, {"x": true})])
    text = "\n".join([
        f"Digits, 64 L2 penalties, K = {p.steps} SGD steps. F0 = {F0:.4f}; after 10 Adam steps on our cg "
        f"hypergradient F = {F_cg:.4f}; target F ≤ {target:.4f} (half of that decrease). Evaluations = "
        "inner-loop runs (each a full K-step training); capped at " + str(cap) + ".",
        "",
        md_table(["method", "evaluations to target", "final outer loss", "seconds"], rows),
        "",
        "torchopt zero-order estimators on f(x) = ½ Σ a_i x_i² + Σ x_i at x = 1 (exact gradient known), "
        "4,000 samples: ‖estimate‖/‖true‖ (1 = unbiased scale) and cosine.",
        "",
        md_table(["method", "σ", "norm ratio", "cosine"], bias),
    ])
    return text, rows + bias


def scaling(quick: bool, in_process_memory: bool, budget: float) -> tuple[str, list]:
    base = common.digits_logreg()
    Ts = (10, 50, 200) if quick else (10, 50, 200, 1000)
    recs = []
    for T in Ts:
        p = with_steps(base, T)
        fns = {}
        for name, f in scaling_methods(p, T).items():
            fns[name] = f()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = common.time_interleaved(fns, 5, budget=budget, min_repeats=1 if T >= 1000 else 2)
        for name, fn in fns.items():
            if in_process_memory:
                common.fix_malloc()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    mem = common.peak_rss_increase_mib(fn)
            else:
                mem = common.memory_in_subprocess(THIS, [
                    "digits", name, str(T) + ("q" if quick else "")], timeout=1200).get("mem", math.nan)
            recs.append({"T": T, "method": name, "time": t[name]["median"], "mem": mem})
            print(f"[scaling T={T}] {name:20s} {1e3 * t[name]['median']:9.1f} ms {mem:8.1f} MiB", flush=True)
    names = list(scaling_methods(base, 1))
    rows = []
    for name in names:
        row = [name]
        for T in Ts:
            r = next(x for x in recs if x["T"] == T and x["method"] == name)
            row += [1e3 * r["time"], r["mem"]]
        first = next(x for x in recs if x["T"] == Ts[0] and x["method"] == name)["mem"]
        last = next(x for x in recs if x["T"] == Ts[-1] and x["method"] == name)["mem"]
        row.append(last / first if first > 0 else math.nan)
        rows.append(row)
    header = ["method"] + [h for T in Ts for h in (f"T={T} ms", f"T={T} MiB")] + [f"memory T={Ts[-1]}/T={Ts[0]}"]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for name in names:
            xs = [r["T"] for r in recs if r["method"] == name]
            axes[0].plot(xs, [r["time"] for r in recs if r["method"] == name], "o-", label=name)
            axes[1].plot(xs, [max(r["mem"], 0.05) for r in recs if r["method"] == name], "o-", label=name)
        for ax, lab in zip(axes, ("seconds per hypergradient", "peak RSS increase (MiB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("inner steps T")
            ax.set_ylabel(lab)
        axes[0].legend(fontsize=7)
        fig.suptitle("digits, 64 L2 penalties: cost vs number of inner steps")
        fig.tight_layout()
        fig.savefig(os.path.join(common.RESULTS, "peers_scaling.png"), dpi=110)
        plt.close(fig)
    except Exception as err:  # matplotlib missing: table only
        print("no plot:", err)
    return md_table(header, rows), recs


def plot_problems(recs: list) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    probs = list(dict.fromkeys(r["problem"] for r in recs))
    fig, axes = plt.subplots(1, len(probs), figsize=(4.2 * len(probs), 4), squeeze=False)
    for ax, prob in zip(axes[0], probs):
        for r in recs:
            if r["problem"] != prob or "error" in r:
                continue
            marker = {"implicit": "o", "unroll": "s", "onestep": "^", "forward": "D"}[r["group"]]
            ax.scatter(r["time"], max(r["rel_error"], 1e-9), marker=marker)
            ax.annotate(r["method"], (r["time"], max(r["rel_error"], 1e-9)), fontsize=6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("seconds per hypergradient")
        ax.set_ylabel("relative error vs target")
        ax.set_title(prob, fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(common.RESULTS, "peers_accuracy_time.png"), dpi=110)
    plt.close(fig)


def versions() -> str:
    out = [f"torch {torch.__version__}"]
    for mod in ("torchopt", "higher", "betty"):
        try:
            __import__(mod)
            import importlib.metadata as md
            v = md.version({"betty": "betty-ml"}.get(mod, mod))
            out.append(f"{mod} {v}")
        except Exception as err:
            out.append(f"{mod} not importable ({type(err).__name__})")
    return ", ".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="correctness only (the smoke test): ridge d=100, one "
                        "call per method, no memory, no zero-order/scaling parts")
    parser.add_argument("--out", default=os.path.join(common.RESULTS, "peers.md"))
    parser.add_argument("--skip", default="", help="comma list of parts to skip: problems,zero,scaling")
    parser.add_argument("--no-taylor", action="store_true", help="leave out the Taylor-loss MLP problem")
    parser.add_argument("--_memory", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args._memory:
        memory_child(*args._memory)
        return
    common.setup_process()
    started = time.perf_counter()
    os.makedirs(common.RESULTS, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    quick = args.quick or args.tiny
    in_process = quick
    budget = 0.0 if args.tiny else (2.0 if args.quick else 6.0)
    keys = ["ridge-100"] if args.tiny else problem_keys(quick)
    if args.no_taylor:
        keys = [k for k in keys if k != "taylor"]
    sections, all_recs = [], []
    if "problems" not in skip:
        for key in keys:
            rows, recs = run_problem(key, quick, budget, in_process)
            all_recs += recs
            p = build(key, quick)
            note = (" **No IFT reference**: CG on the float64 K-step iterate broke down (the inner Hessian is "
                    "indefinite there); `ift` rows are compared with the K-step loop derivative instead."
                    if recs and recs[0].get("ift_missing") else "")
            sections.append(f"### {p.name}\n\n{note}K = {p.steps} {'heavy-ball (momentum ' + str(p.momentum) + ')' if p.momentum else 'plain'} "
                            f"SGD steps, lr {p.lr:.4g}, {p.inner_batch[0].dtype}.\n\n" + md_table(
                                ["group", "method", "target", "rel. error", "cosine", "cosine vs IFT", "time (ms)",
                                 "peak RSS (MiB)"], rows))
        plot_problems(all_recs)
    if "taylor" not in keys and not args.tiny:
        sections.append("### Taylor-loss MLP on rotated digits\n\nSkipped (" + ("--no-taylor" if args.no_taylor else
                        "problems/losses/taylor.py is not importable") + ").")
    zero_text = scaling_text = ""
    zero_recs = scaling_recs = []
    if "zero" not in skip and not args.tiny:
        zero_text, zero_recs = zero_order(quick)
    if "scaling" not in skip and not args.tiny:
        scaling_text, scaling_recs = scaling(quick, in_process, budget)
    summary = targets_summary(all_recs, scaling_recs)
    elapsed = time.perf_counter() - started
    mode = " --tiny" if args.tiny else (" --quick" if args.quick else "")
    text = "\n".join([
        "# Peer benchmark: ours vs torchopt, higher, betty",
        "",
        f"Command: `python benchmarks/peers.py{mode}` ({elapsed:.0f} s). Machine: {common.machine_line()}. "
        f"Versions: {versions()}.",
        "",
        "Every method of a problem gets the same data, initial inner params, inner loop (K steps of the "
        "same SGD), and the same iteration counts (CG to rtol 1e-6 for ours and torchopt; betty's CG has no "
        "tolerance and gets the iteration count ours used; Neumann: same alpha = 1/λ_max(H) and terms). "
        "Time: median seconds per hypergradient, interleaved repeats within a group. Peak memory: peak RSS "
        "increase of one call (" + ("in-process, glibc mmap threshold fixed" if in_process else
                                    "fresh subprocess per method") + "; benchmarks/common.py). Errors: "
        "relative error / cosine against the float64 target (`ift`: closed form or CG to 1e-10 at the "
        "K-step iterate; `loop`: exact derivative of the K-step loop); `cosine vs IFT` for every method. "
        "onestep/darts are one-step estimators: only their cosine matters (betty's darts omits the inner "
        "learning-rate factor, so its scale differs by 1/lr).",
        "",
        "## Targets (issue 9)",
        "",
        *summary,
        "",
        "## Per problem",
        "",
        *[s + "\n" for s in sections],
        "![accuracy vs time](peers_accuracy_time.png)" if all_recs else "",
        "",
        "## Zeroth order: evaluations to a target outer loss",
        "",
        zero_text or "(skipped)",
        "",
        "## Scaling in the number of inner steps T (digits, 64 penalties)",
        "",
        scaling_text or "(skipped)",
        "",
        "![scaling](peers_scaling.png)" if scaling_text else "",
        "",
    ])
    with open(args.out, "w") as fh:
        fh.write(text)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
        json.dump({"problems": all_recs, "zero_order": zero_recs, "scaling": scaling_recs}, fh, indent=1, default=str)
    print(text)


def targets_summary(recs: list, scaling_recs: list) -> list[str]:
    out = []
    by = {}
    for r in recs:
        by.setdefault(r["problem"], {})[r["method"]] = r
    for prob, ms in by.items():
        ok = lambda r: r and "error" not in r
        ours_cg = ms.get("ours cg")
        peers = [r for name, r in ms.items() if r["group"] == "implicit" and not name.startswith("ours") and ok(r)
                 and r["rel_error"] <= 10 * max(ours_cg["rel_error"] if ok(ours_cg) else 1.0, 1e-6)]
        if ok(ours_cg) and peers:
            fastest = min(peers, key=lambda r: r["time"])
            ours_best = min((r for n, r in ms.items() if n.startswith("ours") and r["group"] == "implicit" and ok(r)
                             and r["rel_error"] <= 10 * max(ours_cg["rel_error"], 1e-6)), key=lambda r: r["time"])
            sp = fastest["time"] / ours_best["time"]
            out.append(f"- {prob}: implicit speed-up of our fastest accurate solver ({ours_best['method']}, "
                       f"{1e3 * ours_best['time']:.1f} ms) over the fastest peer of comparable accuracy "
                       f"({fastest['method']}, {1e3 * fastest['time']:.1f} ms): {sp:.2f}x "
                       f"(target ≥ 1.3x: {'met' if sp >= 1.3 else 'missed'}).")
        ou, hi = ms.get("ours unroll"), ms.get("higher innerloop_ctx")
        if ok(ou) and ok(hi):
            tr = ou["time"] / hi["time"]
            mem_ok = ou["mem"] <= hi["mem"] or ou["mem"] - hi["mem"] < 0.5
            mtxt = (f"ours/higher {ou['mem'] / hi['mem']:.2f}" if hi["mem"] >= 0.5 else "both below 0.5 MiB")
            out.append(f"- {prob}: unroll time ours/higher {tr:.2f} (target ≤ 0.8: {'met' if tr <= 0.8 else 'missed'}); "
                       f"peak memory {ou['mem']:.1f} vs {hi['mem']:.1f} MiB, {mtxt} (target: no more than higher: "
                       f"{'met' if mem_ok else 'missed'}).")
    if scaling_recs:
        Ts = sorted({r["T"] for r in scaling_recs})
        get = lambda m, T: next(r for r in scaling_recs if r["method"] == m and r["T"] == T)["mem"]
        for m in ("forward", "cg (implicit)"):
            a, b = get(m, Ts[0]), get(m, Ts[-1])
            out.append(f"- memory of {m}: {a:.1f} MiB at T={Ts[0]}, {b:.1f} MiB at T={Ts[-1]} (ratio "
                       f"{b / a if a > 0 else float('nan'):.2f}; target ≤ 1.2: "
                       f"{'met' if b <= 1.2 * a or b - a < 1.0 else 'missed'}).")
        u0, u1 = get("unroll", Ts[0]), get("unroll", Ts[-1])
        c0, c1 = get("unroll checkpoint", Ts[0]), get("unroll checkpoint", Ts[-1])
        out.append(f"- checkpointed unroll memory {c0:.1f} → {c1:.1f} MiB from T={Ts[0]} to T={Ts[-1]} "
                   f"(×{c1 / c0 if c0 > 0 else float('nan'):.1f}, vs ×{Ts[-1] / Ts[0]:.0f} for linear and "
                   f"×{u1 / u0 if u0 > 0 else float('nan'):.1f} for plain unroll: "
                   f"{'sublinear' if c1 / max(c0, 1e-9) < 0.5 * Ts[-1] / Ts[0] else 'NOT clearly sublinear'}).")
    return out


if __name__ == "__main__":
    main()
