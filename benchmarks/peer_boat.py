"""BOAT (``boat-torch`` 1.1.1) beside ours for the first-order solvers, on the peer benchmark's ridge problem.

Optional peer, like betty: ``benchmarks/peers.py --boat-path FOLDER`` (a folder holding ``boat_torch``, e.g.
``pip install --target /work/boat-site --no-deps boat-torch==1.1.1``; it needs ``higher``, which the project's
``bench`` extra installs). Without it the BOAT section says why it is absent and nothing else changes.

Which BOAT operation matches which of our solvers (read from boat_torch/fo_ol and gm_ol, not from its docs):

- ``bome`` ↔ ``fo_op="VFO"`` (fo_ol/vfo.py). Its docstring cites the value-function interior-point method
  (Liu et al., ICML 2021), but the code is BOME's Algorithm 1 with the *value* control: θ̂ = T steps of
  ``SGD(y_hat_lr, momentum=0.5)`` on G from the incoming θ, q = G(θ) − G(θ̂), ∇q = (∇φG(θ) − ∇φG(θ̂), ∇θG(θ)),
  d = ∇F + relu((u1·q − ⟨∇F, ∇q⟩) / (‖∇q‖² + 1e-8))·∇q. Ours with ``control=value, eta=u1`` and a loop of
  heavy-ball momentum 0.5 is the same formula (ours divides by ‖∇q‖² exactly). What differs per call: VFO first
  runs T steps of ``lower_level_opt`` on θ itself (the point where q and ∇F are taken is then *not* the incoming
  θ, and θ̂ still starts from the incoming θ), and its closing θ step uses d_θ *plus* the last of those steps'
  ∇θG (``update_tensor_grads`` accumulates into a ``.grad`` nobody zeroed). The per-call rows neutralise the
  pre-steps with ``lower_level_opt`` at lr 0 (they are still computed, so BOAT's call costs 2T + 4 gradients,
  ours T + 3) and compare d_φ from the same (φ, θ); the outer runs use VFO as configured in practice.
- ``f2sa`` ↔ ``fo_op="PGDO"`` (fo_ol/pgdo.py, Shen & Chen 2023, ``penalty="difference"``): the φ-gradient is
  min(1, 1/γ)·(∇φF(y) + γ(∇φG(y) − ∇φG(ŷ))), F2SA's direction with λ = γ, with ŷ (F2SA's z) warm-started and
  moved T plain-SGD steps on G per call, but y moved by one step on G + F/γ per call *after* the direction is
  taken (F2SA: T steps on y before it). So from the same (φ, y, z) the two compute different quantities: the
  per-call row is BOAT against the float64 value of *its* formula (γ·grad, to undo the 1/γ scaling), and ours
  f2sa against its own twin is the main table's f2sa row; the outer runs compare what both reach.
- ``soba``: BOAT's closest is ``gm_op=["DM"], na_op=["RAD"]`` (gm_ol/dm.py, the averaged method of multipliers:
  one θ step on G, one step v ← v − η(Hv − ∇θF), φ-gradient ∇φF − (∂²G/∂φ∂θ)ᵀv at the incoming v, i.e. SOBA's
  simultaneous update; its φ and v step sizes are rescaled by BOAT as ul_lr·ll_lr·(k+1)^−τ and
  η₀·ll_lr·(k+1)^−τ/2). It runs through higher's ``innerloop_ctx`` and from v = 0 its first direction is ∇φF
  (= 0 on ridge), so no per-call row compares it; it is not benchmarked here.

Measurement as benchmarks/peers.py: one warm-up call (its value checked against the float64 value of the same
quantity), then interleaved timed rounds, the median time and the median of per-round ratios; outer runs:
N outer steps from the same (φ₀, θ₀), the two runs interleaved step by step, time = median per-step time,
outer loss = F(θ*(φ_N)) at the exact ridge solution (and F at the run's own θ).
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import peer_adapters as pa  # noqa: E402
import peer_problems  # noqa: E402
from common import _dot, hw_run, md_table, rel_error  # noqa: E402

VFO_MOMENTUM = 0.5
"""VFO's θ̂ optimiser is ``torch.optim.SGD(y_hat_lr, momentum=0.5)`` (hard-coded): ours runs its loop with the same."""
BOAT_ETA = 10.0
"""u1 of VFO = η of ours with ``control=value`` (c = η q̂); large enough that λ > 0 at the cold start p.inner on
ridge (η q̂ > ⟨∇F, ∇q̂⟩ needs η > 3.8 there), else d_φ = ∇φF = 0 and the per-call rows compare zeros."""
OUTER_STEPS = {"full": 50, "quick": 30, "tiny": 5}
OUTER_LRS = (0.1, 0.01)
"""ξ (each in turn): the step on φ of every outer run (ours: SGD at ξ; BOAT: ``upper_level_opt`` SGD at ξ, × γ
for PGDO), and for BOME also the step on θ (Algorithm 1: one ξ for both blocks; ours ``theta_lr`` = ``lr``, VFO's
``lower_level_opt`` lr)."""


def unavailable(path: str | None) -> str | None:
    """None when BOAT (boat_torch and higher) imports, else the reason its rows are absent."""
    if not path:
        return "no --boat-path given (BOAT is an optional peer; install line in benchmarks/peer_boat.py)"
    try:
        import boat_torch.fo_ol  # noqa: F401
        import higher  # noqa: F401
        return None
    except Exception as err:
        return f"BOAT not importable from {path} ({type(err).__name__}: {err})"


# --------------------------------------------------------------------------------------------------
# BOAT side: the problem as BOAT's models and objectives
# --------------------------------------------------------------------------------------------------
class _Vars(torch.nn.Module):
    """A param dict as the nn.Module BOAT expects (``ll_model`` / ``ul_model``)."""

    def __init__(self, tensors: dict):
        super().__init__()
        self.names = list(tensors)
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(v.detach().clone()) for v in tensors.values()])

    def d(self) -> dict:
        return dict(zip(self.names, self.ps))


def _ll(feed, ul, ll):
    p = feed["p"]
    return p.inner_loss(ll.d(), ul.d(), p.inner_batch)


def _ul(feed, ul, ll):
    p = feed["p"]
    return p.outer_loss(ll.d(), ul.d(), p.outer_batch)


def _vfo(p, ll, ul, ll_lr: float, eta: float, steps: int):
    from boat_torch.fo_ol.vfo import VFO
    cfg = {"lower_level_opt": torch.optim.SGD(ll.parameters(), lr=ll_lr), "device": "cpu",
           "VFO": {"y_hat_lr": p.lr, "eta": 0.0, "u1": eta}}
    return VFO(ll_objective=_ll, lower_loop=steps, ul_model=ul, ul_objective=_ul, ll_model=ll,
               ll_var=list(ll.parameters()), ul_var=list(ul.parameters()), solver_config=cfg)


def _pgdo(p, ll, ul, lam: float, steps: int):
    from boat_torch.fo_ol.pgdo import PGDO
    cfg = {"lower_level_opt": torch.optim.SGD(ll.parameters(), lr=p.lr), "device": "cpu",
           "PGDO": {"y_hat_lr": p.lr, "gamma_init": lam, "gamma_max": lam, "gamma_argmax_step": 1,
                    "update_y_ahead": False, "penalty": "difference"}}
    return PGDO(ll_objective=_ll, lower_loop=steps, ul_model=ul, ul_objective=_ul, ll_model=ll,
                ll_var=list(ll.parameters()), ul_var=list(ul.parameters()), solver_config=cfg)


def boat_vfo_direction(p, theta: dict, eta: float = BOAT_ETA):
    """VFO's φ-gradient from (p.outer, θ), its θ pre-steps at lr 0 (module docstring)."""
    def call():
        ll, ul = _Vars(theta), _Vars(p.outer)
        _vfo(p, ll, ul, 0.0, eta, p.steps).optimize({"p": p}, {"p": p}, 0)
        return {k: v.grad.detach().clone() for k, v in ul.d().items()}
    return call


def boat_pgdo_direction(p, theta: dict, lam: float):
    """PGDO's φ-gradient from (p.outer, y = ŷ = θ), × γ (= λ ≥ 1) to undo its min(1, 1/γ) scaling."""
    def call():
        ll, ul = _Vars(theta), _Vars(p.outer)
        _pgdo(p, ll, ul, lam, p.steps).optimize({"p": p}, {"p": p}, 0)
        return {k: lam * v.grad.detach() for k, v in ul.d().items()}
    return call


# --------------------------------------------------------------------------------------------------
# float64 twins of the BOAT formulas (torch.func, no library)
# --------------------------------------------------------------------------------------------------
def hw_bome(p, theta: dict, eta: float, control: str = "value", eps: float = 0.0) -> dict:
    """BOME's d_φ from θ (common.hw_bome with either control; ``eps`` added to ‖∇q̂‖², BOAT's 1e-8)."""
    phi = {k: v.detach() for k, v in p.outer.items()}
    theta_t, _ = hw_run(p, theta, phi, p.steps)
    g_val, (g_theta, g_phi) = (p.inner_loss(theta, phi, p.inner_batch),
                               torch.func.grad(p.inner_loss, argnums=(0, 1))(theta, phi, p.inner_batch))
    q = g_val - p.inner_loss(theta_t, phi, p.inner_batch)
    g_phi_t = torch.func.grad(p.inner_loss, argnums=1)(theta_t, phi, p.inner_batch)
    f_theta, f_phi = torch.func.grad(p.outer_loss, argnums=(0, 1))(theta, phi, p.outer_batch)
    dq_phi = {k: g_phi[k] - g_phi_t[k] for k in phi}
    sq = _dot(dq_phi, dq_phi) + _dot(g_theta, g_theta)
    c = eta * (q if control == "value" else sq)
    lam = torch.clamp((c - _dot(f_phi, dq_phi) - _dot(f_theta, g_theta)) / (sq + eps), min=0.0)
    return {k: f_phi[k] + lam * dq_phi[k] for k in phi}


def hw_pgdo(p, y: dict, lam: float) -> dict:
    """PGDO's direction × γ from y = ŷ: ŷ ← T plain GD steps on G, ∇φF(y) + γ(∇φG(y) − ∇φG(ŷ))."""
    phi = {k: v.detach() for k, v in p.outer.items()}
    z, _ = hw_run(dataclasses.replace(p, momentum=0.0), y, phi, p.steps)
    g_phi = torch.func.grad(p.inner_loss, argnums=1)
    gf = torch.func.grad(p.outer_loss, argnums=1)(y, phi, p.outer_batch)
    gy, gz = g_phi(y, phi, p.inner_batch), g_phi(z, phi, p.inner_batch)
    return {k: gf[k] + lam * (gy[k] - gz[k]) for k in phi}


def ridge_solution(p, phi: dict) -> dict:
    """θ*(φ) of :func:`peer_problems.ridge` in float64 (closed form)."""
    X, y = (t.double() for t in p.inner_batch)
    d = X.shape[1]
    index = p.extra.get("group_index", torch.arange(d))
    H = X.T @ X / X.shape[0] + torch.diag(phi["log_lambda"].double()[index].exp())
    return {"w": torch.linalg.solve(H, X.T @ y / X.shape[0])}


def _F(p, theta, phi) -> float:
    p64 = p.to(torch.float64)
    return float(p64.outer_loss({k: v.double() for k, v in theta.items()}, {k: v.double() for k, v in phi.items()},
                                p64.outer_batch))


# --------------------------------------------------------------------------------------------------
# runs
# --------------------------------------------------------------------------------------------------
def per_call(p, rounds: int, interleaved_rounds) -> list[list]:
    """Per-call directions from the same (φ, θ = p.inner): ours, BOAT, float64 twins; time and relative error.
    "ours / X": BOAT VFO against ours bome (the same formula), BOAT PGDO against ours f2sa (the same cost class,
    not the same quantity: module docstring)."""
    lam, T = common.F2SA_LAMBDA, common.F2SA_STEPS
    pm = dataclasses.replace(p, momentum=VFO_MOMENTUM)
    pf = dataclasses.replace(p, steps=T)  # the f2sa family's T steps on y and z (PGDO: on ŷ)
    p64m, p64f = pm.to(torch.float64), pf.to(torch.float64)
    ob, bv, of, bp = ("ours bome (control=value, η=u1, loop momentum 0.5)", "BOAT VFO (pre-steps at lr 0)",
                      "ours f2sa (from p.inner)", "BOAT PGDO ×γ (γ = λ fixed)")
    fns = {ob: pa.ours(pm, f"bome:eta={BOAT_ETA},control=value"), bv: boat_vfo_direction(p, p.inner),
           of: pa.ours(pf, f"f2sa:steps={T},lambda0={lam},lambda_power=0,lambda_max={lam}"),
           bp: boat_pgdo_direction(pf, p.inner, lam)}
    ref_bome = hw_bome(p64m, p64m.inner, BOAT_ETA)
    refs = {ob: ref_bome, bv: ref_bome, of: common.hw_f2sa(p64f, p64f.inner, lam, T), bp: hw_pgdo(p64f, p64f.inner, lam)}
    pair = {bv: ob, bp: of}
    S = p.steps
    grads = {ob: f"T+3 = {S + 3}", bv: f"2T+4 = {2 * S + 4}", of: f"3T+3 = {3 * T + 3}", bp: f"T+3 = {T + 3}"}
    values = {k: {kk: t.detach() for kk, t in pa.as_dict(f()).items()} for k, f in fns.items()}
    times = interleaved_rounds(fns, rounds) if rounds > 0 else {}
    rows = []
    for label, v in values.items():
        t = times.get(label) or [float("nan")]
        ours = pair.get(label)
        ratio = statistics.median(a / b for a, b in zip(times[ours], t)) if times and ours else float("nan")
        diff = rel_error(v, values[ours]) if label == bv else float("nan")
        rows.append([label, grads[label], f"{statistics.median(t) * 1e3:.2f}", f"{ratio:.2f}" if ours and times else "—",
                     f"{rel_error(v, refs[label]):.1e}", f"{diff:.1e}" if label == bv else "—"])
    return rows


def outer_runs(p, n_steps: int, xi: float) -> list[list]:
    """N outer steps of ours and BOAT from the same (φ₀, θ₀ = p.inner), interleaved step by step."""
    import bilevel
    bp, lam, T = p.bilevel_problem(), common.F2SA_LAMBDA, common.F2SA_STEPS
    pm = dataclasses.replace(p, momentum=VFO_MOMENTUM)
    specs = {"bome": (f"bome:eta={BOAT_ETA},control=value,lr={xi}", pm.loop()),
             "f2sa": (f"f2sa:steps={T},lambda0={lam},lambda_power=0,lambda_max={lam}", p.loop(T))}
    f_start = _F(p, ridge_solution(p, p.outer), p.outer)
    rows = []
    for family, (spec, loop) in specs.items():
        theta, phi, state = dict(p.inner), dict(p.outer), None
        ll, ul = _Vars(p.inner), _Vars(p.outer)
        op = _vfo(p, ll, ul, xi, BOAT_ETA, p.steps) if family == "bome" else _pgdo(p, ll, ul, lam, T)
        ul_opt = torch.optim.SGD(ul.parameters(), lr=xi if family == "bome" else xi * lam)
        t_ours, t_boat = [], []
        for k in range(n_steps):
            t0 = time.perf_counter()
            r = bilevel.hypergrad(bp, theta, phi, inner_batch=p.inner_batch, outer_batch=p.outer_batch, solver=spec,
                                  loop=loop, state=state, validate=False)
            theta, state = r.inner, r.state
            phi = {kk: v - xi * r.hypergrad[kk] for kk, v in phi.items()}
            t1 = time.perf_counter()
            op.optimize({"p": p}, {"p": p}, k)  # what boat_opt.Problem.run_iter does for an fo_op,
            ul_opt.step()                        # minus its per-iteration loss logging (a JSON file write)
            ul_opt.zero_grad()
            t2 = time.perf_counter()
            t_ours.append(t1 - t0)
            t_boat.append(t2 - t1)
        phi_b = {kk: v.detach() for kk, v in ul.d().items()}
        theta_b = {kk: v.detach() for kk, v in ll.d().items()}
        ratio = statistics.median(a / b for a, b in zip(t_ours, t_boat))
        for who, ph, th, ts in (("ours", phi, theta, t_ours), ("BOAT", phi_b, theta_b, t_boat)):
            name = {"bome": "bome" if who == "ours" else "VFO", "f2sa": "f2sa" if who == "ours" else "PGDO"}[family]
            g = {"ours bome": f"T+3 = {p.steps + 3}", "BOAT VFO": f"2T+4 = {2 * p.steps + 4}",
                 "ours f2sa": f"3T+3 = {3 * T + 3}", "BOAT PGDO": f"T+3 = {T + 3}"}[f"{who} {name}"]
            rows.append([f"{who} {name}", xi, g, f"{statistics.median(ts) * 1e3:.2f}",
                         f"{ratio:.2f}" if who == "BOAT" else "—",
                         f"{_F(p, ridge_solution(p, ph), ph):.5f}", f"{_F(p, th, ph):.5f}"])
    # the reference: SGD at ξ on the exact hypergradient (closed form)
    phi = {k: v.double() for k, v in p.outer.items()}
    p64 = p.to(torch.float64)
    for _ in range(n_steps):
        g = peer_problems.ridge_exact(dataclasses.replace(p64, outer=phi))
        phi = {k: v - xi * g[k] for k, v in phi.items()}
    rows.append(["reference: exact hypergradient, SGD at ξ", xi, "—", "—", "—", f"{_F(p, ridge_solution(p, phi), phi):.5f}", "—"])
    rows.insert(0, ["start (φ₀)", xi, "—", "—", "—", f"{f_start:.5f}", f"{_F(p, p.inner, p.outer):.5f}"])
    return rows


def run(spec: dict, mode: str, rounds: int, interleaved_rounds) -> str:
    """The BOAT section of the report (Markdown) for the ridge instance ``spec``."""
    t0 = time.perf_counter()
    p = peer_problems.build(spec)
    n, lam, T = OUTER_STEPS[mode], common.F2SA_LAMBDA, common.F2SA_STEPS
    calls = per_call(p, rounds, interleaved_rounds)
    runs = [r for xi in OUTER_LRS for r in outer_runs(p, n, xi)]
    lines = [f"Problem: {p.name}, T = {p.steps} inner steps, lr {p.lr:.4g}; BOAT {_boat_version()}. "
             "Matching and differences: benchmarks/peer_boat.py docstring.", "",
             f"Per call, from the same (φ₀, θ₀ = p.inner), {rounds} interleaved rounds (ms = median; ours/X = median "
             f"of per-round ratios). VFO u1 = η = {BOAT_ETA}, T = {p.steps}; PGDO γ = λ = {lam}, T = {T} (the f2sa "
             "rows' λ and steps). rel. error: to the float64 value of the same formula (VFO's 1e-8 in the "
             "denominator left out).", "",
             md_table(["method", "loss gradients", "ms / call", "ours / X", "rel. error (float64 twin)",
                       "rel. diff. to ours"], calls), "",
             f"Outer runs: {n} outer steps from the same (φ₀, θ₀), outer step ξ (PGDO: upper lr ξγ, undoing its 1/γ; "
             f"bome/VFO: T = {p.steps}, θ step ξ; f2sa/PGDO: T = {T}, λ = γ = {lam}); ms = median per outer step; "
             "F(θ*(φ_N)) = outer loss at the exact inner solution; F(θ_N) = at the run's own θ (ours: the "
             "warm-started θ / z; BOAT: ll_model); nan: the run diverged.", "",
             md_table(["run", "ξ", "loss gradients / step", "ms / outer step", "ours / BOAT", "F(θ*(φ_N))",
                       "F(θ_N, φ_N)"], runs), "",
             f"({time.perf_counter() - t0:.0f} s)"]
    return "\n".join(lines)


def _boat_version() -> str:
    try:
        from importlib.metadata import version
        return version("boat-torch")
    except Exception:
        return "(version unknown)"
