"""The unrolled, online and zeroth-order solvers, their shared helpers and the registry, against exact values.

Written against the surviving mutants of ``bilevel/solvers/{forward,unroll,onestep,cmaes,common,registry}.py``
(docs/mutation.md). What the other exact files already pin is not repeated here: the hypergradients against the
closed form of the K-step loop (test_solvers_exact), the counted products and evaluations (test_counts_exact),
the batch each step differentiates (test_minibatch_exact) and CMA-ES against pycma driven by hand
(test_cmaes_failures). This file pins the rest:

- the diagnostics every differentiating solver reports, against a hand-written SGD loop (plain
  ``torch.autograd.grad``, float64) on four distinct minibatches: θ_K, F(θ_K), G(θ_{K−1}) on batch K − 1 (the loss
  before the last step), ‖∇θG(θ_K)‖ and ‖∇θG(θ_K)‖ / ‖∇θG(θ_0)‖ on batch K − 1 (onestep: batch 0); relative
  error ≤ 1e-10 on both autodiff paths, and the same numbers row by row under ``vmap``;
- edge cases whose answer is known exactly: no inner step (F independent of φ: hypergradient exactly 0, warned),
  ``truncate`` beyond K (the full derivative), a non-finite inner loss (the first bad step, counted from 0 over
  the whole loop, truncated or not);
- onestep's ``first_order`` (∇φF(θ', φ)) and ``finite_difference`` modes against DARTS' formula written out
  with ε = fd_epsilon / ‖∇θF(θ')‖, on a problem whose ∇φG is quartic in θ, so that the central difference
  depends on ε;
- forced onto the tape, no loss call sees a torch.func-wrapped tensor (every derivative is a tape computation);
- every bad option of the constructors and of a stored CMA-ES state, with the boundary values accepted; CMA-ES
  prints and writes nothing and leaves the caller's strategy as its numbers replay;
- the registry: kinds, names, typed option parsing, defaults, canonical specs, overrides, entries built at run time.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import types
import warnings

import numpy as np
import pytest
import torch
from torch._C import _functorch

import bilevel
from bilevel.solvers import SOLVERS
from bilevel.solvers import registry
from bilevel.solvers.cmaes import CMAES, CMAESState
from bilevel.solvers.common import (detach_state, float_leaves, last, split_float_leaves, stationarity, inner_gradient_norm,
                                    warn_if_zero_hypergradient)
from oracles import quadratic, quadratic_unrolled_hypergrad, rel_error, ridge

torch.set_num_threads(1)

DT = torch.float64
BOUND = 1e-10
PATHS = ("autograd", "func")


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=DT), torch.as_tensor(b, dtype=DT)
    return float((a - b).norm() / b.norm())


# ---- a hand-written SGD loop on four minibatches ------------------------------------------------------------------

PROBLEM, THETA0, PHI, (X, Y), OUTER_BATCH = ridge(n=200)
BATCHES = [(X[i * 50:(i + 1) * 50], Y[i * 50:(i + 1) * 50]) for i in range(4)]
K, LR = 6, 0.3


def minibatch(k: int):
    """Inner step k runs on batch k mod 4."""
    return BATCHES[k % 4]


def inner_grad(theta: torch.Tensor, phi: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, ∇θG) at θ on ``batch``, with a plain autograd gradient."""
    w = theta.detach().requires_grad_(True)
    loss = PROBLEM.inner({"w": w}, {"log_lambda": phi}, batch)
    return loss.detach(), torch.autograd.grad(loss, w)[0]


def hand_diagnostics(steps: int, phi: torch.Tensor = PHI["log_lambda"]) -> dict:
    """θ_K, F(θ_K), G(θ_{K−1}) and the two stationarity norms on batch max(K − 1, 0), from θ_0 = THETA0."""
    theta, losses = THETA0["w"].clone(), []
    for k in range(steps):
        loss, g = inner_grad(theta, phi, minibatch(k))
        losses.append(loss)
        theta = theta - LR * g
    last_batch = minibatch(max(steps - 1, 0))
    norm_k = inner_grad(theta, phi, last_batch)[1].norm()
    norm_0 = inner_grad(THETA0["w"], phi, last_batch)[1].norm()
    return {"theta": theta, "outer_loss": PROBLEM.outer({"w": theta}, {"log_lambda": phi}, OUTER_BATCH),
            "inner_loss": losses[-1] if losses else math.nan, "inner_grad_norm": norm_k,
            "inner_grad_norm_rel": norm_k / norm_0,
            "norm_on_next_batch": inner_grad(theta, phi, minibatch(steps))[1].norm()}


DIFFERENTIATED_STEPS = {"unroll": K, "unroll:truncate=3": 3, "unroll:truncate=9": K, "unroll:checkpoint=true": K,
                        "unroll:truncate=4,checkpoint=true,segment=3": 4}  # min(truncate or K, K)
DIFFERENTIATING = [*DIFFERENTIATED_STEPS, "forward", "forward:chunk_size=1", "forward:chunk_size=2"]


@pytest.mark.filterwarnings("ignore::bilevel.ZeroHypergradientWarning")  # first_order: F does not read λ
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("spec", DIFFERENTIATING + ["onestep", "onestep:mode=first_order",
                                                    "onestep:mode=finite_difference"])
def test_diagnostics_of_the_differentiating_solvers_match_a_hand_loop(spec, path):
    steps = 1 if spec.startswith("onestep") else K
    want = hand_diagnostics(steps)
    # the stationarity norms are taken on batch K − 1, which differs from batch K by far more than the bound
    assert rel(want["norm_on_next_batch"], want["inner_grad_norm"]) > 1e-2
    with bilevel.autodiff_path(path):
        result = bilevel.hypergrad(PROBLEM, THETA0, PHI, inner_batch=minibatch, outer_batch=OUTER_BATCH, solver=spec,
                                   loop=bilevel.InnerLoop(steps=steps, lr=LR))
    d = result.diagnostics
    assert d["autodiff_path"] == path and d["inner_steps"] == steps
    assert rel(result.inner["w"], want["theta"]) <= BOUND and not result.inner["w"].requires_grad
    for key in ("outer_loss", "inner_loss", "inner_grad_norm", "inner_grad_norm_rel"):
        assert isinstance(d[key], float), key
        assert rel(d[key], want[key]) <= BOUND, key
    if spec.startswith("unroll"):
        assert d["differentiated_steps"] == DIFFERENTIATED_STEPS[spec]


@pytest.mark.parametrize("spec", ["unroll", "unroll:truncate=2,checkpoint=true", "forward:chunk_size=2",
                                  "onestep", "onestep:mode=finite_difference"])
def test_under_vmap_each_row_matches_the_unbatched_call(spec):
    """vmap over three outer points: the hypergradient and the diagnostics (batched tensors, not floats) of each
    row equal the unbatched call's at that point."""
    steps = 1 if spec.startswith("onestep") else 4
    loop = bilevel.InnerLoop(steps=steps, lr=LR)
    phis = PHI["log_lambda"] + torch.tensor([[0.0], [0.4], [-0.7]], dtype=DT)
    keys = ("outer_loss", "inner_loss", "inner_grad_norm", "inner_grad_norm_rel")

    def call(phi):
        result = bilevel.hypergrad(PROBLEM, THETA0, {"log_lambda": phi}, inner_batch=minibatch,
                                   outer_batch=OUTER_BATCH, solver=spec, loop=loop)
        return result.hypergrad["log_lambda"], tuple(torch.as_tensor(result.diagnostics[k], dtype=DT) for k in keys)

    batched_grad, batched_diag = torch.func.vmap(call)(phis)
    for i, phi in enumerate(phis):
        grad_i, diag_i = call(phi)
        assert rel(batched_grad[i], grad_i) <= 1e-12
        for key, got, want in zip(keys, batched_diag, diag_i):
            assert rel(got[i], want) <= 1e-12, key


# ---- edge cases with a known answer -------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, path", [(spec, path) for spec in ("unroll", "unroll:checkpoint=true", "forward",
                                                                   "forward:chunk_size=1") for path in PATHS])
def test_no_inner_step_gives_an_exact_zero_when_f_ignores_phi(spec, path):
    """K = 0: θ_K = θ_0 does not depend on φ and the ridge F does not read λ, so dF/dλ = 0 exactly; the solver says
    so with ZeroHypergradientWarning (from the caller's line). The stationarity ratio is 1 on batch 0 and the
    inner loss of an empty loop is NaN."""
    want = hand_diagnostics(0)
    name = "Unroll" if spec.startswith("unroll") else "Forward"
    with bilevel.autodiff_path(path), pytest.warns(bilevel.ZeroHypergradientWarning,
                                                   match=f"solver {name} returned a hypergradient that is exactly "
                                                         "zero in every entry") as caught:
        result = bilevel.hypergrad(PROBLEM, THETA0, PHI, inner_batch=minibatch, outer_batch=OUTER_BATCH, solver=spec,
                                   loop=bilevel.InnerLoop(steps=0, lr=LR))
    zero = [w for w in caught if issubclass(w.category, bilevel.ZeroHypergradientWarning)]
    if "MUTANT_UNDER_TEST" not in os.environ:  # the mutation tool's trampolines add frames between library calls
        assert zero[0].filename == __file__  # stacklevel: the warning points at the user's call
    assert torch.equal(result.hypergrad["log_lambda"], torch.zeros(5, dtype=DT))
    d = result.diagnostics
    assert math.isnan(d["inner_loss"]) and d["inner_grad_norm_rel"] == 1.0
    assert rel(d["inner_grad_norm"], want["inner_grad_norm"]) <= BOUND
    assert rel(d["outer_loss"], want["outer_loss"]) <= BOUND
    assert torch.equal(result.inner["w"], THETA0["w"])


def test_truncate_beyond_the_loop_is_the_full_derivative():
    problem, inner, outer, c = quadratic()
    loop = bilevel.InnerLoop(steps=5, lr=0.1)
    want = quadratic_unrolled_hypergrad(outer, inner, c, 5, 0.1)
    for spec in ("unroll:truncate=5", "unroll:truncate=50", "unroll:truncate=50,checkpoint=true"):
        result = bilevel.hypergrad(problem, inner, outer, inner_batch=None, outer_batch=None, solver=spec, loop=loop)
        assert rel_error(result.hypergrad, want) <= BOUND, spec
        assert result.diagnostics["differentiated_steps"] == 5.0


def first_nonfinite_step(steps: int, lr: float) -> tuple[int, float]:
    """The first step J whose inner loss is NaN/Inf and the loss of step J − 1, from the hand loop on the full
    ridge batch."""
    theta, last_finite = THETA0["w"].clone(), math.nan
    for k in range(steps):
        loss, g = inner_grad(theta, PHI["log_lambda"], (X, Y))
        if not math.isfinite(float(loss)):
            return k, last_finite
        theta, last_finite = theta - lr * g, float(loss)
    raise AssertionError("the loop stayed finite")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("spec", ["unroll", "forward:chunk_size=1", "forward:chunk_size=2",
                                  "unroll:truncate=TAIL", "unroll:truncate=TAIL,checkpoint=true",
                                  "unroll:checkpoint=true,segment=J"])
def test_a_nonfinite_inner_loss_names_its_step_counted_over_the_whole_loop(spec, path):
    """lr = 1e10 makes SGD blow up at step J (from the hand loop: 16). Truncated, the differentiated part starts 3 steps
    before J, so the step must be counted from the loop's start, not from the truncation point; with segment=J the
    blow-up opens a checkpoint segment, and the message still reports the loss of step J − 1 as the last finite one."""
    lr = 1e10
    j, last_finite = first_nonfinite_step(300, lr)
    steps = j + 6
    assert j > 5 and math.isfinite(last_finite)
    spec = spec.replace("TAIL", str(steps - j + 3)).replace("segment=J", f"segment={j}")
    with bilevel.autodiff_path(path), pytest.raises(bilevel.NonFiniteError,
                                                    match=rf"inner loss is (nan|inf) at inner step {j}; lower the "
                                                          r"learning rate") as caught:
        bilevel.hypergrad(PROBLEM, THETA0, PHI, inner_batch=(X, Y), outer_batch=OUTER_BATCH, solver=spec,
                          loop=bilevel.InnerLoop(steps=steps, lr=lr))
    reported = float(str(caught.value).rsplit("the last finite value was ", 1)[1].rstrip(")"))
    assert reported == pytest.approx(last_finite, rel=1e-10)


def test_an_outer_param_read_by_neither_loss_gets_a_zero_derivative():
    """Called directly (``hypergrad`` would refuse such a param up front): the unused leaf's derivative is exact 0,
    the other one the closed form of the K-step loop."""
    problem, inner, outer, c = quadratic()
    loop = bilevel.InnerLoop(steps=5, lr=0.1)
    want = quadratic_unrolled_hypergrad(outer, inner, c, 5, 0.1)
    extra = dict(outer, unused=torch.ones(2, dtype=DT))
    for solver in (bilevel.Unroll(), bilevel.Unroll(checkpoint=True), bilevel.OneStep(),
                   bilevel.Forward(chunk_size=1)):
        result = solver(problem, inner, extra, None, None, loop if not isinstance(solver, bilevel.OneStep)
                        else bilevel.InnerLoop(steps=1, lr=0.1), None)
        assert torch.equal(result.hypergrad["unused"], torch.zeros(2, dtype=DT)), solver
        if not isinstance(solver, bilevel.OneStep):
            assert rel_error({"phi": result.hypergrad["phi"]}, want) <= BOUND, solver


# ---- several leaves of several shapes, with an optimiser state --------------------------------------------------

def multi_leaf_problem():
    """θ = {W: 2×3, c: 3}, φ = {M: 2×2, s: scalar}, flattened in order to θ̄ (9) and φ̄ (5):

    G = ½ θ̄ᵀAθ̄ + θ̄ᵀBφ̄ + ½ e^s ‖c‖² − bᵀθ̄,   F = ½‖θ̄ − t‖² + 0.1 ‖M‖² + s³/3.

    Every leaf is read by both losses and no leaf is the only one of its kind, so an offset or a key mix-up in the
    flattening, the per-leaf split of a chunk, or the split of the adjoint's cotangents changes the answer."""
    gen = torch.Generator().manual_seed(11)
    Q = torch.randn(9, 9, generator=gen, dtype=DT)
    A = Q @ Q.T / 9 + torch.eye(9, dtype=DT)
    B = torch.randn(9, 5, generator=gen, dtype=DT)
    b, t = torch.randn(9, generator=gen, dtype=DT), torch.randn(9, generator=gen, dtype=DT)

    def flat(d, keys):
        return torch.cat([d[k].reshape(-1) for k in keys])

    def inner_loss(inner, outer, batch):
        th, ph = flat(inner, ("W", "c")), flat(outer, ("M", "s"))
        return 0.5 * th @ (A @ th) + th @ (B @ ph) + 0.5 * torch.exp(outer["s"]) * (inner["c"] ** 2).sum() - b @ th

    def outer_loss(inner, outer, batch):
        th = flat(inner, ("W", "c"))
        return 0.5 * ((th - t) ** 2).sum() + 0.1 * (outer["M"] ** 2).sum() + outer["s"] ** 3 / 3

    inner = {"W": torch.randn(2, 3, generator=gen, dtype=DT), "c": torch.randn(3, generator=gen, dtype=DT)}
    outer = {"M": torch.randn(2, 2, generator=gen, dtype=DT), "s": torch.tensor(0.3, dtype=DT)}
    return bilevel.BilevelProblem(inner_loss, outer_loss), inner, outer


def hand_momentum_hypergrad(problem, inner, outer, steps, lr, mu):
    """d/dφ F(θ_K(φ), φ) for K heavy-ball steps (trace ← μ·trace + ∇θG, θ ← θ − η·trace), by plain autograd."""
    phi = {k: v.clone().requires_grad_(True) for k, v in outer.items()}
    theta, trace = {k: v.clone().requires_grad_(True) for k, v in inner.items()}, None
    for _ in range(steps):
        grads = torch.autograd.grad(problem.inner(theta, phi, None), list(theta.values()), create_graph=True)
        grads = dict(zip(theta, grads))
        trace = grads if trace is None else {k: mu * trace[k] + grads[k] for k in theta}
        theta = {k: theta[k] - lr * trace[k] for k in theta}
    value = problem.outer(theta, phi, None)
    return dict(zip(phi, torch.autograd.grad(value, list(phi.values()))))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("spec", ["unroll", "unroll:checkpoint=true,segment=2", "forward", "forward:chunk_size=2",
                                  "forward:chunk_size=1"])
def test_several_leaves_with_momentum_match_the_hand_derivative(spec, path):
    problem, inner, outer = multi_leaf_problem()
    inner = {k: v.clone() for k, v in inner.items()}
    want = hand_momentum_hypergrad(problem, {k: v.clone() for k, v in inner.items()}, outer, 5, 0.05, 0.7)
    loop = bilevel.InnerLoop(steps=5, lr=0.05, optimizer="momentum", momentum=0.7)
    with bilevel.autodiff_path(path):
        result = bilevel.hypergrad(problem, inner, outer, inner_batch=None, outer_batch=None, solver=spec, loop=loop)
    assert result.diagnostics["autodiff_path"] == path
    for key in ("M", "s"):
        assert result.hypergrad[key].shape == outer[key].shape
        assert rel(result.hypergrad[key], want[key]) <= BOUND, key


def test_forward_runs_one_direction_per_pass_on_the_tape_only_when_passes_hold_one_anyway():
    """Unforced: forward AD (the tape) when every pass holds one direction (chunk_size = 1, or one outer scalar),
    else vmapped torch.func chunks (the module docstring)."""
    problem, inner, outer = multi_leaf_problem()
    loop = bilevel.InnerLoop(steps=3, lr=0.05)
    cases = [("forward:chunk_size=1", outer, "autograd", 5.0), ("forward:chunk_size=2", outer, "func", 3.0),
             ("forward", outer, "func", 1.0)]
    q_problem, q_inner, q_outer, _ = quadratic(q=1)
    for spec, phi, path, chunks in cases:
        d = bilevel.hypergrad(problem, inner, phi, inner_batch=None, outer_batch=None, solver=spec,
                              loop=loop).diagnostics
        assert (d["autodiff_path"], d["chunks"]) == (path, chunks), spec
    d = bilevel.hypergrad(q_problem, q_inner, q_outer, inner_batch=None, outer_batch=None, solver="forward",
                          loop=loop).diagnostics
    assert (d["autodiff_path"], d["chunks"]) == ("autograd", 1.0)  # one outer scalar, chunk_size 32


# ---- onestep ------------------------------------------------------------------------------------------------------

def quartic_problem(far: bool = True):
    """G(θ, φ) = ½‖θ − b‖² + ¼ φ₀ Σθ⁴ + φ₁ θ₀,   F(θ, φ) = ½‖θ − t‖² + ½ φ₁².

    ∇φG = (¼Σθ⁴, θ₀) is quartic in θ, so DARTS' central difference of ∇φG along v depends on ε (error ∝ ε²).
    ``far``: θ far from t (‖∇θF(θ')‖ > 1), else close to it (‖∇θF(θ')‖ < 1, where a floor of 1 on ‖v‖ would bind)."""
    b = torch.tensor([0.5, -1.0, 2.0], dtype=DT)
    t = torch.tensor([1.0, 0.3, -0.4], dtype=DT)

    def inner_loss(inner, outer, batch):
        th, ph = inner["theta"], outer["phi"]
        return 0.5 * ((th - b) ** 2).sum() + 0.25 * ph[0] * (th ** 4).sum() + ph[1] * th[0]

    def outer_loss(inner, outer, batch):
        return 0.5 * ((inner["theta"] - t) ** 2).sum() + 0.5 * outer["phi"][1] ** 2

    theta = {"theta": torch.tensor([0.8, -0.6, 1.1], dtype=DT) if far else t + torch.tensor([0.1, -0.2, 0.15],
                                                                                              dtype=DT)}
    phi = {"phi": torch.tensor([0.3, 0.2], dtype=DT)}
    return bilevel.BilevelProblem(inner_loss, outer_loss), theta, phi


def hand_onestep(problem, theta, phi, lr, fd_epsilon):
    """(first_order, finite_difference, exact) of one SGD step, written out with plain autograd."""
    th, ph = theta["theta"].clone().requires_grad_(True), phi["phi"].clone().requires_grad_(True)
    g = torch.autograd.grad(problem.inner({"theta": th}, {"phi": ph}, None), th, create_graph=True)[0]
    th1 = th - lr * g
    F = problem.outer({"theta": th1}, {"phi": ph}, None)
    exact = torch.autograd.grad(F, ph, retain_graph=True)[0]
    th1 = th1.detach().requires_grad_(True)
    F = problem.outer({"theta": th1}, {"phi": ph}, None)
    v, first_order = torch.autograd.grad(F, (th1, ph))
    eps = fd_epsilon / float(v.norm())

    def g_phi(x):
        p = ph.detach().requires_grad_(True)
        return torch.autograd.grad(problem.inner({"theta": x}, {"phi": p}, None), p)[0]

    second = (g_phi(theta["theta"] + eps * v) - g_phi(theta["theta"] - eps * v)) * lr / (2 * eps)
    return first_order, first_order - second, exact


def grad_theta_f_norm(problem, theta, phi, lr) -> float:
    """‖∇θF(θ', φ)‖ after one SGD step: the v of DARTS' difference."""
    th = theta["theta"].clone().requires_grad_(True)
    th1 = th - lr * torch.autograd.grad(problem.inner({"theta": th}, phi, None), th)[0]
    th1 = th1.detach().requires_grad_(True)
    return float(torch.autograd.grad(problem.outer({"theta": th1}, phi, None), th1)[0].norm())


@pytest.mark.parametrize("far", [True, False], ids=["norm_v_above_1", "norm_v_below_1"])
@pytest.mark.parametrize("path", PATHS)
def test_onestep_modes_match_their_formulas(path, far):
    problem, theta, phi = quartic_problem(far)
    lr, fd_epsilon = 0.2, 0.05
    assert (grad_theta_f_norm(problem, theta, phi, lr) > 1.0) == far
    first_order, finite_difference, exact = hand_onestep(problem, theta, phi, lr, fd_epsilon)
    assert rel(finite_difference, exact) > 1e-4  # ε matters here: the formula, not the limit, is under test
    assert rel(first_order, exact) > 1e-2
    loop = bilevel.InnerLoop(steps=1, lr=lr)
    for mode, want in (("first_order", first_order), ("finite_difference", finite_difference), ("exact", exact)):
        with bilevel.autodiff_path(path):
            result = bilevel.hypergrad(problem, theta, phi, inner_batch=None, outer_batch=None, loop=loop,
                                       solver=f"onestep:mode={mode},fd_epsilon={fd_epsilon}")
        assert rel(result.hypergrad["phi"], want) <= 1e-12, mode


def test_onestep_finite_difference_under_vmap_uses_the_same_epsilon_per_row():
    """Under vmap ‖∇θF‖ is a batched tensor (no host read): each row must still use ε = fd_epsilon / ‖∇θF‖ of its
    own point, i.e. equal the written-out formula at that point."""
    problem, theta, phi = quartic_problem(far=False)
    lr, fd_epsilon = 0.2, 0.05
    phis = phi["phi"] + torch.tensor([[0.0, 0.0], [0.2, -0.3], [-0.1, 0.5]], dtype=DT)
    assert all(grad_theta_f_norm(problem, theta, {"phi": p}, lr) < 1.0 for p in phis)

    def call(p):
        return bilevel.hypergrad(problem, theta, {"phi": p}, inner_batch=None, outer_batch=None,
                                 solver=f"onestep:mode=finite_difference,fd_epsilon={fd_epsilon}",
                                 loop=bilevel.InnerLoop(steps=1, lr=lr)).hypergrad["phi"]

    batched = torch.func.vmap(call)(phis)
    for i, p in enumerate(phis):
        assert rel(batched[i], hand_onestep(problem, theta, {"phi": p}, lr, fd_epsilon)[1]) <= 1e-12, i


def test_onestep_finite_difference_refuses_a_non_sgd_step_before_any_work():
    problem, theta, phi = quartic_problem()
    with pytest.raises(ValueError, match=r"^OneStep\(mode='finite_difference'\) assumes a plain SGD inner step.*the "
                                         r"loop uses 'momentum'.*Use mode='exact'"):
        bilevel.hypergrad(problem, theta, phi, inner_batch=None, outer_batch=None,
                          solver="onestep:mode=finite_difference",
                          loop=bilevel.InnerLoop(steps=1, lr=0.1, optimizer="momentum"))


@pytest.mark.parametrize("mode, reason", [
    ("exact", r"dθ'/dφ = −η ∂²G/∂φ∂θ vanishes at these inner params.*start from a warm, trained θ"),
    ("finite_difference", r"dθ'/dφ = −η ∂²G/∂φ∂θ vanishes at these inner params.*start from a warm, trained θ"),
    ("first_order", r"mode=first_order drops dθ'/dφ.*use mode=exact"),
])
def test_onestep_zero_hypergradient_names_the_mode_and_the_likely_reason(mode, reason):
    """Ridge from w = 0: dθ'/dλ = −η e^λ w = 0 and F does not read λ, so every mode returns exactly 0."""
    with pytest.warns(bilevel.ZeroHypergradientWarning, match=rf"solver OneStep\(mode='{mode}'\) returned .*{reason}"):
        result = bilevel.hypergrad(PROBLEM, {"w": torch.zeros(5, dtype=DT)}, PHI, inner_batch=(X, Y),
                                   outer_batch=OUTER_BATCH, solver=f"onestep:mode={mode}",
                                   loop=bilevel.InnerLoop(steps=1, lr=0.1))
    assert torch.equal(result.hypergrad["log_lambda"], torch.zeros(5, dtype=DT))


@pytest.mark.filterwarnings("ignore::bilevel.ZeroHypergradientWarning")  # first_order: the ridge F does not read λ
@pytest.mark.parametrize("mode", ["exact", "first_order"])
@pytest.mark.parametrize("path", PATHS)
def test_onestep_returns_the_detached_optimizer_state_of_one_step(path, mode):
    """The state after one heavy-ball step from a warm state is μ·trace + ∇G (torchopt's trace), with no graph, and
    θ' = θ − η·(μ·trace + ∇G), in every mode (first_order too takes the loop's step with its state)."""
    loop = bilevel.InnerLoop(steps=1, lr=0.1, optimizer="momentum", momentum=0.5)
    theta1, state1, _ = loop.run(PROBLEM, THETA0, PHI, (X, Y), steps=2)
    with bilevel.autodiff_path(path):
        result = bilevel.hypergrad(PROBLEM, theta1, PHI, inner_batch=(X, Y), outer_batch=OUTER_BATCH,
                                   solver=f"onestep:mode={mode}", loop=loop, state=state1)
    trace = [x for x in split_float_leaves(state1)[0]]
    new_trace = split_float_leaves(result.state)[0]
    g = inner_grad(theta1["w"], PHI["log_lambda"], (X, Y))[1]
    assert len(trace) == len(new_trace) == 1
    assert rel(new_trace[0], 0.5 * trace[0] + g) <= 1e-12
    assert not any(x.requires_grad for x in new_trace) and not result.inner["w"].requires_grad
    assert rel(result.inner["w"], theta1["w"] - 0.1 * (0.5 * trace[0] + g)) <= 1e-12


@pytest.mark.filterwarnings("ignore::bilevel.ZeroHypergradientWarning")  # first_order: the ridge F does not read λ
def test_the_tape_path_runs_without_torch_func():
    """Forced onto the tape, no loss call of these solvers sees a functorch-wrapped tensor (every gradient,
    stationarity norm and difference is a tape computation), while forced onto torch.func some do."""
    seen = []

    def inner_loss(i, o, b):
        seen.append(any(_functorch.is_functorch_wrapped_tensor(t) for t in (*i.values(), *o.values())))
        return PROBLEM.inner(i, o, b)

    def outer_loss(i, o, b):
        seen.append(any(_functorch.is_functorch_wrapped_tensor(t) for t in (*i.values(), *o.values())))
        return PROBLEM.outer(i, o, b)

    problem = bilevel.BilevelProblem(inner_loss, outer_loss)
    theta = {"w": torch.linspace(-0.5, 0.5, 5, dtype=DT)}
    for spec in ("unroll", "unroll:truncate=2", "unroll:checkpoint=true,segment=2", "forward:chunk_size=1",
                 "onestep", "onestep:mode=first_order", "onestep:mode=finite_difference"):
        loop = bilevel.InnerLoop(steps=1 if spec.startswith("onestep") else 3, lr=LR)
        for path in PATHS:
            seen.clear()
            with bilevel.autodiff_path(path):
                bilevel.hypergrad(problem, theta, PHI, inner_batch=(X, Y), outer_batch=OUTER_BATCH, solver=spec,
                                  loop=loop, validate=False)
            assert seen and any(seen) is (path == "func"), (spec, path, seen)


# ---- constructors and stored state: bad options, boundary values ---------------------------------------------------

def test_solver_constructors_refuse_bad_options_and_accept_the_boundaries():
    with pytest.raises(ValueError, match=r"Forward\.chunk_size must be >= 1, got 0"):
        bilevel.Forward(chunk_size=0)
    assert bilevel.Forward(chunk_size=1).chunk_size == 1
    with pytest.raises(ValueError, match=r"Unroll\.truncate and Unroll\.segment must be >= 0"):
        bilevel.Unroll(truncate=-1)
    with pytest.raises(ValueError, match=r"Unroll\.truncate and Unroll\.segment must be >= 0"):
        bilevel.Unroll(segment=-1)
    assert bilevel.Unroll(truncate=0, segment=0) == bilevel.Unroll()
    with pytest.raises(ValueError, match=r"CMAES\.popsize must be >= 2, got 1"):
        CMAES(popsize=1)
    with pytest.raises(ValueError, match=r"CMAES\.seed must be >= 1 \(0 would mean a clock seed.*got 0"):
        CMAES(seed=0)
    for sigma in (0.0, -0.1, math.nan):
        with pytest.raises(ValueError, match=r"CMAES\.sigma must be > 0"):
            CMAES(sigma=sigma)
    solver = CMAES(popsize=2, seed=1, sigma=1e-300)
    assert (solver.popsize, solver.seed) == (2, 1)


def valid_state(**changes):
    fields = dict(x0=torch.zeros(2, dtype=DT), sigma0=0.3, popsize=2, seed=1, fitness=torch.zeros(0, 2, dtype=DT))
    fields.update(changes)
    return CMAESState(**fields)


@pytest.mark.parametrize("field, value, message", [
    ("x0", np.zeros(3), "x0 must be a finite float64 vector with >= 2 entries"),
    ("x0", torch.zeros(3, dtype=torch.float32), "x0 must be a finite float64 vector"),
    ("x0", torch.zeros(1, 3, dtype=DT), "x0 must be a finite float64 vector"),
    ("x0", torch.zeros(1, dtype=DT), "x0 must be a finite float64 vector with >= 2 entries"),
    ("x0", torch.tensor([0.0, math.inf], dtype=DT), "x0 must be a finite"),
    ("sigma0", 1, "sigma0 must be a finite float > 0, got 1"),
    ("sigma0", 0.0, "sigma0 must be a finite float > 0, got 0.0"),
    ("sigma0", -0.5, "sigma0 must be a finite float > 0"),
    ("sigma0", math.inf, "sigma0 must be a finite float > 0, got inf"),
    ("sigma0", math.nan, "sigma0 must be a finite float > 0, got nan"),
    ("popsize", 1, "popsize must be an int >= 2, got 1"),
    ("popsize", 2.0, "popsize must be an int >= 2, got 2.0"),
    ("seed", 0, "seed must be an int >= 1, got 0"),
    ("seed", 1.0, "seed must be an int >= 1, got 1.0"),
    ("seed", True, "seed must be an int >= 1, got True"),
    ("fitness", np.zeros((0, 2)), r"fitness must be a finite float64 \(generations, popsize=2\) tensor"),
    ("fitness", torch.zeros(0, 2, dtype=torch.float32), r"fitness must be a finite float64"),
    ("fitness", torch.zeros(2, dtype=DT), r"fitness must be a finite float64"),
    ("fitness", torch.zeros(1, 3, dtype=DT), r"fitness must be a finite float64 \(generations, popsize=2\)"),
    ("fitness", torch.tensor([[0.0, math.nan]], dtype=DT), r"fitness must be a finite"),
])
def test_a_bad_cmaes_state_is_refused_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=rf"CMAESState\.{message}"):
        valid_state(**{field: value})


def test_the_smallest_valid_cmaes_state_is_accepted_and_advances_by_one_row():
    state = valid_state(fitness=torch.tensor([[1.0, 2.0]], dtype=DT))
    assert state.generation == 1
    assert CMAESState.start(np.array([1, 2]), 1, np.int64(2), np.int64(3)).x0.dtype == DT  # cast, not refused
    start = CMAESState.start(np.array([1.0, 2.0, 3.0]), 0.5, 3, 4)
    assert (start.generation, start.fitness.shape, start.fitness.dtype) == (0, (0, 3), DT)
    assert torch.equal(start.x0, torch.tensor([1.0, 2.0, 3.0], dtype=DT)) and start.sigma0 == 0.5
    strategy = start.strategy
    assert start.strategy is strategy  # cached: replayed once
    assert np.array_equal(strategy.mean, [1.0, 2.0, 3.0]) and strategy.sigma == 0.5 and strategy.popsize == 3
    nxt = start.advanced(strategy, [3.0, 1.0, 2.0])
    assert nxt.generation == 1 and nxt.strategy is strategy and start.generation == 0
    assert torch.equal(nxt.fitness, torch.tensor([[3.0, 1.0, 2.0]], dtype=DT))
    assert (nxt.x0 is start.x0, nxt.sigma0, nxt.popsize, nxt.seed) == (True, 0.5, 3, 4)


def test_cmaes_returns_the_inner_params_trained_at_the_new_mean():
    """result.inner is θ_K at the new mean m_new = φ − g (the warm start of the next generation), and
    ``inner_loss`` is G(θ_{K−1}) there; without evaluating the mean, θ_0 comes back unchanged."""
    loop = bilevel.InnerLoop(steps=3, lr=LR)
    result = bilevel.hypergrad(PROBLEM, THETA0, PHI, inner_batch=(X, Y), outer_batch=OUTER_BATCH,
                               solver="cmaes:popsize=4,sigma=0.2,seed=5", loop=loop)
    mean = PHI["log_lambda"] - result.hypergrad["log_lambda"]
    theta, _, losses = loop.run(PROBLEM, THETA0, {"log_lambda": mean}, (X, Y))
    assert rel(result.inner["w"], theta["w"]) <= 1e-12 and rel(result.diagnostics["inner_loss"], losses[-1]) <= 1e-12
    assert rel(result.diagnostics["outer_loss"], PROBLEM.outer(theta, {"log_lambda": mean}, OUTER_BATCH)) <= 1e-12
    assert result.diagnostics["inner_steps"] == 3.0
    lazy = bilevel.hypergrad(PROBLEM, THETA0, PHI, inner_batch=(X, Y), outer_batch=OUTER_BATCH, loop=loop,
                             solver="cmaes:popsize=4,sigma=0.2,seed=5,evaluate_mean=false")
    assert torch.equal(lazy.inner["w"], THETA0["w"])
    assert torch.equal(lazy.hypergrad["log_lambda"], result.hypergrad["log_lambda"])


def test_cmaes_start_pads_a_single_coordinate_and_keeps_the_outer_dtype():
    """One outer scalar: cma's mean is (φ, 0) (a dummy coordinate at 0); a float32 outer gets a float32
    pseudo-gradient; with no inner step the inner loss at the mean is NaN."""
    problem, inner, outer, ib, ob = ridge(d=1, dtype=torch.float32)
    state = CMAES(popsize=3).init(problem, inner, outer)
    assert torch.equal(state.x0, torch.tensor([float(outer["log_lambda"][0]), 0.0], dtype=DT))
    result = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver="cmaes:popsize=3",
                               loop=bilevel.InnerLoop(steps=0))
    assert result.hypergrad["log_lambda"].dtype == torch.float32 and result.hypergrad["log_lambda"].shape == (1,)
    mean = result.state.strategy.mean
    assert rel(result.hypergrad["log_lambda"].double(), torch.tensor(state.x0[:1].numpy() - mean[:1])) <= 1e-6
    assert math.isnan(result.diagnostics["inner_loss"]) and result.diagnostics["inner_steps"] == 0.0


@pytest.mark.filterwarnings("ignore:overflow encountered in nextafter:RuntimeWarning")  # the case under test
def test_cmaes_refuses_to_rank_failures_above_the_largest_float():
    largest = float(np.finfo(np.float64).max)

    def at_the_top(fn, items):
        return [largest] + [math.nan] * (len(items) - 1)

    with pytest.raises(bilevel.NonFiniteError, match=r"CMA-ES generation 0: a finite outer loss reaches the largest "
                                                     r"float.*rescale the outer loss"):
        bilevel.hypergrad(PROBLEM, THETA0, PHI, inner_batch=(X, Y), outer_batch=OUTER_BATCH,
                          solver=CMAES(popsize=3, map_fn=at_the_top), loop=bilevel.InnerLoop(steps=1))
    below = float(np.nextafter(largest, 0.0))
    result = bilevel.hypergrad(PROBLEM, THETA0, PHI, inner_batch=(X, Y), outer_batch=OUTER_BATCH,
                               solver=CMAES(popsize=3, evaluate_mean=False,
                                            map_fn=lambda fn, items: [below] + [math.nan] * (len(items) - 1)),
                               loop=bilevel.InnerLoop(steps=1))
    assert result.state.fitness[0].tolist() == [below, largest, largest]  # the next float up: +1 rounds away


def test_cmaes_is_silent_and_leaves_the_caller_s_strategy_as_replayed(tmp_path, monkeypatch, capsys):
    """A generation prints nothing and writes no cma log files (cwd: an empty folder); the state it was given still
    holds the strategy its numbers replay to (same mean, σ, covariance and next candidates, bitwise)."""
    monkeypatch.chdir(tmp_path)
    solver = CMAES(popsize=4, sigma=0.3, seed=2)
    loop = bilevel.InnerLoop(steps=2, lr=LR)
    state = bilevel.hypergrad(PROBLEM, THETA0, PHI, inner_batch=(X, Y), outer_batch=OUTER_BATCH, solver=solver,
                              loop=loop).state
    bilevel.hypergrad(PROBLEM, THETA0, PHI, inner_batch=(X, Y), outer_batch=OUTER_BATCH, solver=solver, loop=loop,
                      state=state)
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr() == ("", "")
    live, replayed = state.strategy, state.replay()
    assert state.generation == 1 and live.countiter == replayed.countiter == 1
    assert np.array_equal(live.mean, replayed.mean) and live.sigma == replayed.sigma
    assert np.array_equal(live.C, replayed.C)
    assert all(np.array_equal(a, b) for a, b in zip(copy.deepcopy(live).ask(), replayed.ask()))


# ---- shared helpers -----------------------------------------------------------------------------------------------

def test_zero_hypergradient_warning_only_when_every_entry_is_zero():
    zero, one = torch.zeros(3), torch.tensor([0.0, 1.0, 0.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_zero_hypergradient({}, "S")
        warn_if_zero_hypergradient({"a": torch.zeros(0)}, "S")           # nothing to be zero
        warn_if_zero_hypergradient({"a": zero, "b": one}, "S")           # one non-zero entry is enough
        warn_if_zero_hypergradient({"a": one}, "S")
        torch.func.vmap(lambda x: warn_if_zero_hypergradient({"a": x * 0}, "S") or x)(torch.ones(2, 3))  # no host read
    with pytest.warns(bilevel.ZeroHypergradientWarning, match=r"solver S returned a hypergradient that is exactly "
                                                              r"zero in every entry: because\."):
        warn_if_zero_hypergradient({"a": zero, "b": torch.zeros(2)}, "S", "because")
    with pytest.warns(bilevel.ZeroHypergradientWarning, match="solver T returned"):
        warn_if_zero_hypergradient({"a": torch.zeros(())}, "T")  # one scalar


def test_stationarity_ratio_and_the_already_stationary_start():
    d = stationarity(torch.tensor(1.5, dtype=DT), torch.tensor(6.0, dtype=DT))
    assert d == {"inner_grad_norm": 1.5, "inner_grad_norm_rel": 0.25}
    assert stationarity(torch.tensor(0.0), torch.tensor(0.0)) == {"inner_grad_norm": 0.0, "inner_grad_norm_rel": 0.0}
    tiny = torch.finfo(torch.float32).tiny
    assert stationarity(torch.tensor(tiny), torch.tensor(0.0))["inner_grad_norm_rel"] == 1.0
    # a zero start norm is floored at the smallest normal number of its own dtype
    rel64 = stationarity(torch.tensor(1e-300, dtype=DT), torch.tensor(0.0, dtype=DT))["inner_grad_norm_rel"]
    assert rel64 == 1e-300 / torch.finfo(DT).tiny


def test_small_helpers():
    assert last(torch.tensor([3.0, 2.0, 7.0])) == 7.0 and math.isnan(last(torch.zeros(0)))
    state = (torch.tensor(3), torch.ones(2, requires_grad=True) * 2, "label", [torch.zeros(1, dtype=DT)])
    floats, rebuild = split_float_leaves(state)
    assert all(a is b for a, b in zip(float_leaves(state), floats)) and len(float_leaves(state)) == 2
    assert len(floats) == 2 and torch.equal(floats[0], torch.full((2,), 2.0))
    rebuilt = rebuild([torch.full((2,), 5.0), torch.ones(1, dtype=DT)])
    assert torch.equal(rebuilt[0], torch.tensor(3)) and rebuilt[2] == "label"
    assert torch.equal(rebuilt[1], torch.full((2,), 5.0)) and torch.equal(rebuilt[3][0], torch.ones(1, dtype=DT))
    detached = detach_state(state)
    assert not detached[1].requires_grad and torch.equal(detached[1], state[1].detach()) and detached[2] == "label"


@pytest.mark.parametrize("path", PATHS)
def test_inner_gradient_norm_is_full_precision_under_autocast(path):
    """A float32 problem inside CPU bfloat16 autocast: the norm is the float32 one (autocast would round the
    matmul to bfloat16, ~1e-3 off)."""
    problem, inner, outer, (Xb, yb), _ = ridge(dtype=torch.float32)
    w = {"w": torch.linspace(-1.0, 1.0, 5)}
    want = inner_gradient_norm(problem, w, outer, (Xb, yb), path)
    exact = inner_grad(w["w"].double(), outer["log_lambda"].double(), (Xb.double(), yb.double()))[1].norm()
    assert rel(want, exact) <= 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = inner_gradient_norm(problem, w, outer, (Xb, yb), path)
    assert got.dtype == torch.float32 and rel(got, exact) <= 1e-5


@pytest.mark.parametrize("path", PATHS)
def test_onestep_reuses_its_step_gradient_for_the_start_norm_only_outside_autocast(path):
    """‖∇θG(θ)‖ is the step's own gradient outside autocast (one diagnostic gradient: evaluations 1 + 1); under
    bfloat16 autocast the step's gradient is rounded, so a full-precision gradient is spent (1 + 2) and the
    start norm is still the float32 one."""
    problem, inner, outer, (Xb, yb), outer_batch = ridge(dtype=torch.float32)
    w = {"w": torch.linspace(-1.0, 1.0, 5)}
    lr = 0.1
    w64, phi64, batch64 = w["w"].double(), outer["log_lambda"].double(), (Xb.double(), yb.double())
    g0 = inner_grad(w64, phi64, batch64)[1]
    g1 = inner_grad(w64 - lr * g0, phi64, batch64)[1]
    for autocast, evaluations, bound in ((False, 2.0, 1e-5), (True, 3.0, 5e-2)):
        with bilevel.autodiff_path(path), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            d = bilevel.hypergrad(problem, w, outer, inner_batch=(Xb, yb), outer_batch=outer_batch, solver="onestep",
                                  loop=bilevel.InnerLoop(steps=1, lr=lr)).diagnostics
        assert d["evaluations"] == evaluations, (autocast, d["evaluations"])
        # θ' itself comes from a bfloat16 step under autocast (bound 5e-2); the start norm is float32 (1e-5)
        assert rel(d["inner_grad_norm"] / d["inner_grad_norm_rel"], g0.norm()) <= 1e-5, autocast
        assert rel(d["inner_grad_norm"], g1.norm()) <= bound, autocast


# ---- registry -----------------------------------------------------------------------------------------------------

KIND_OF = {"cg": "implicit", "neumann": "implicit", "fixedpoint": "implicit", "exact": "implicit",
           "nystrom": "implicit",
           "forward": "unrolled", "unroll": "unrolled", "onestep": "online", "cmaes": "zeroth_order",
           "soba": "online",
           "bome": "online",
           "f2sa": "online"}  # registration order: a solver registered before f2sa goes above this line


def test_every_registered_name_has_its_kind_and_round_trips():
    assert list(SOLVERS) == list(KIND_OF)
    for name, kind in KIND_OF.items():
        assert bilevel.solver_kind(name) == kind
        assert registry.name_of(bilevel.make_solver(name)) == name
    assert registry.name_of(bilevel.Implicit(linsolve=bilevel.Neumann())) == "neumann"
    assert registry.name_of(bilevel.Implicit(linsolve=bilevel.CG())) == "cg"

    @dataclasses.dataclass(frozen=True)
    class Mine(bilevel.Unroll):
        pass

    assert registry.name_of(Mine()) is None  # a subclass is not the registered class
    with pytest.raises(bilevel.SpecError, match="unknown solver 'nope'; registered solvers: cg, neumann"):
        bilevel.solver_kind("nope")


def test_options_types_and_defaults():
    assert bilevel.solver_options("unroll") == [("truncate", int, 0), ("checkpoint", bool, False), ("segment", int, 0)]
    assert bilevel.solver_options("onestep") == [("mode", str, "exact"), ("fd_epsilon", float, 0.01)]
    assert bilevel.describe_options("forward") == "chunk_size: int = 32"
    assert "alpha: float | 'auto' = 'auto'" in bilevel.describe_options("neumann")
    exact = dict((n, d) for n, _, d in bilevel.solver_options("exact"))
    assert "warm_start" not in exact and bilevel.make_solver("exact").warm_start is False  # a direct solve
    assert dict((n, d) for n, _, d in bilevel.solver_options("neumann"))["warm_start"] is False
    assert bilevel.make_solver("neumann").warm_start is False and bilevel.make_solver("cg").warm_start is True
    assert dict((n, d) for n, _, d in bilevel.solver_options("cg"))["warm_start"] is True


def test_an_entry_without_options_says_so(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class Bare:
        map_fn: object = None

        def init(self, problem, inner, outer):
            return None

        def __call__(self, *args):
            raise NotImplementedError

    monkeypatch.setitem(SOLVERS, "bare", registry.SolverEntry(Bare, "online"))
    assert bilevel.describe_options("bare") == "(no options)"
    assert bilevel.make_solver("bare") == Bare() and registry.name_of(Bare()) == "bare"


def test_spec_values_are_typed_numbers_first():
    solver = bilevel.make_solver(" neumann : alpha = 0.5 , terms=20, ")
    assert type(solver.linsolve.alpha) is float and solver.linsolve.alpha == 0.5
    assert type(solver.linsolve.terms) is int and solver.linsolve.terms == 20
    assert bilevel.make_solver("neumann:alpha=auto").linsolve.alpha == "auto"
    assert type(bilevel.make_solver("onestep:fd_epsilon=1").fd_epsilon) is float
    assert registry.parse_spec("cg") == ("cg", {})
    assert registry.parse_spec("onestep:mode = first_order") == ("onestep", {"mode": "first_order"})
    # the name ends at the first ':' and the key at the first '=': the rest is the value, whose type is wrong
    with pytest.raises(bilevel.SpecError, match=r"option 'truncate' of solver 'unroll' must be int, got '2:3'"):
        registry.parse_spec("unroll:truncate=2:3")
    with pytest.raises(bilevel.SpecError, match=r"option 'maxiter' of solver 'cg' must be int, got '=5'"):
        registry.parse_spec("cg:maxiter==5")
    for word in ("1", "true", "TRUE", " Yes", "on"):
        assert registry.parse_spec(f"unroll:checkpoint={word}") == ("unroll", {"checkpoint": True}), word
    for word in ("0", "false", "No", "OFF"):
        assert registry.parse_spec(f"unroll:checkpoint={word}") == ("unroll", {"checkpoint": False}), word
    with pytest.raises(bilevel.SpecError, match=r"option 'truncate' is given twice in 'unroll:truncate=1,truncate=2'"):
        bilevel.make_solver("unroll:truncate=1,truncate=2")
    with pytest.raises(bilevel.SpecError, match=r"option 'popsize' of solver 'cmaes' must be int, got 'many'; valid "
                                                r"options: popsize: int = 8"):
        bilevel.make_solver("cmaes:popsize=many")


def test_normalized_spec_keeps_only_changed_options_sorted():
    assert bilevel.normalize_spec("cg:maxiter=100") == "cg"
    assert bilevel.normalize_spec(" cg: rtol=1e-8 , maxiter=7,") == "cg:maxiter=7,rtol=1e-08"
    assert bilevel.normalize_spec("unroll:segment=0,truncate=3") == "unroll:truncate=3"


def test_make_solver_objects_overrides_and_invalid_values():
    solver = bilevel.Unroll(truncate=2)
    assert bilevel.make_solver(solver) is solver
    assert bilevel.make_solver(solver, segment=3) == bilevel.Unroll(truncate=2, segment=3)
    assert bilevel.make_solver("unroll:truncate=2", checkpoint=True) == bilevel.Unroll(truncate=2, checkpoint=True)
    assert bilevel.make_solver("cg:maxiter=7,damping=0.5") == bilevel.Implicit(linsolve=bilevel.CG(maxiter=7),
                                                                               damping=0.5)
    with pytest.raises(bilevel.SpecError, match=r"invalid options for solver 'forward': Forward\.chunk_size must be "
                                                r">= 1, got 0; valid options: chunk_size: int = 32"):
        bilevel.make_solver("forward:chunk_size=0")
    with pytest.raises(bilevel.SpecError, match=r"solver Unroll has no field\(s\) bogus, zzz to override; its "
                                                r"fields: checkpoint, segment, truncate"):
        bilevel.make_solver(solver, zzz=1, bogus=2)
    @dataclasses.dataclass(frozen=True)
    class NotCallable:
        def init(self, problem, inner, outer):
            return None

    for bad, kind in ((lambda *a: None, "function"), (types.SimpleNamespace(init=None), "SimpleNamespace"),
                      (NotCallable(), "NotCallable")):
        with pytest.raises(bilevel.SpecError, match=f"solver must be a spec string or a solver object, got {kind}"):
            bilevel.make_solver(bad)


def test_registry_entries_built_at_run_time():
    """Entries built here (not the ones made at import): the implicit entry builds Implicit, a linear solver that
    takes no starting point gets warm_start=False (and no such option), per-name defaults are kept; register stores
    the entry; several options are listed comma separated."""
    exact = registry.ImplicitEntry(bilevel.linsolve.Exact)
    assert (exact.cls, exact.kind) == (bilevel.Implicit, "implicit")
    assert "warm_start" not in [n for n, _, _ in exact.options()] and exact.defaults == {"warm_start": False}
    assert exact.build() == bilevel.Implicit(linsolve=bilevel.linsolve.Exact(), warm_start=False)
    neumann = registry.ImplicitEntry(bilevel.Neumann, warm_start=False, damping=0.5)
    assert {n: d for n, _, d in neumann.options()}["damping"] == 0.5
    assert neumann.build(terms=3) == bilevel.Implicit(linsolve=bilevel.Neumann(terms=3), warm_start=False, damping=0.5)
    assert registry.ImplicitEntry(bilevel.CG).build().warm_start is True
    table = {}
    entry = registry.SolverEntry(bilevel.Unroll, "unrolled")
    registry.register(table, "u", entry)
    assert table == {"u": entry}
    assert bilevel.describe_options("unroll") == "truncate: int = 0, checkpoint: bool = False, segment: int = 0"


def test_registry_construction_errors():
    with pytest.raises(ValueError, match=r"solver kind must be one of \('implicit', 'unrolled', 'online', "
                                         r"'zeroth_order'\), got 'magic'"):
        registry.SolverEntry(bilevel.Unroll, "magic")
    table = {}
    registry.register(table, "u", registry.SolverEntry(bilevel.Unroll, "unrolled"))
    with pytest.raises(ValueError, match="solver 'u' is already registered"):
        registry.register(table, "u", registry.SolverEntry(bilevel.Forward, "unrolled"))

    @dataclasses.dataclass(frozen=True)
    class Clashing:
        damping: float = 0.0

    with pytest.raises(ValueError, match=r"Clashing options \['damping'\] clash with Implicit's"):
        registry.ImplicitEntry(Clashing).options()

    @dataclasses.dataclass(frozen=True)
    class Plain:  # a linear solver that does not say whether it takes a starting point: assumed to
        tol: float = 1e-3

        def __call__(self, matvec, b, x0=None):
            raise NotImplementedError

    entry = registry.ImplicitEntry(Plain)
    options = {n: d for n, _, d in entry.options()}
    assert options["warm_start"] is True and options["tol"] == 1e-3 and "damping" in options
    assert entry.build(tol=0.5, damping=0.1) == bilevel.Implicit(linsolve=Plain(0.5), damping=0.1, warm_start=True)


# ---- the last survivors: leaf offsets of a chunk, warning frames, CMA-ES diagnostics, cache and dtypes -------------

def three_leaf_problem():
    """θ ∈ R³, φ = {a: (2,), b: scalar, c: (2,)} flattened in order to φ̄ ∈ R⁵:

    G = ½ θᵀAθ + θᵀBφ̄,   F = ½‖θ − t‖² + ½ Σ_i w_i φ̄_i²   (w = 1, ..., 5).

    Leaf sizes 2, 1, 2: in a chunk's basis the third leaf starts at column 3 = 2 + 1, which only the running sum of
    the sizes gives (the second leaf's offset is the first leaf's size either way)."""
    gen = torch.Generator().manual_seed(7)
    Q = torch.randn(3, 3, generator=gen, dtype=DT)
    A, B = Q @ Q.T / 3 + torch.eye(3, dtype=DT), torch.randn(3, 5, generator=gen, dtype=DT)
    t, w = torch.randn(3, generator=gen, dtype=DT), torch.arange(1, 6, dtype=DT)

    def flat(outer):
        return torch.cat([outer[k].reshape(-1) for k in ("a", "b", "c")])

    problem = bilevel.BilevelProblem(
        lambda i, o, batch: 0.5 * i["t"] @ (A @ i["t"]) + i["t"] @ (B @ flat(o)),
        lambda i, o, batch: 0.5 * ((i["t"] - t) ** 2).sum() + 0.5 * (w * flat(o) ** 2).sum())
    outer = {"a": torch.randn(2, generator=gen, dtype=DT), "b": torch.tensor(0.4, dtype=DT),
             "c": torch.randn(2, generator=gen, dtype=DT)}
    return problem, {"t": torch.randn(3, generator=gen, dtype=DT)}, outer


@pytest.mark.parametrize("spec", ["forward", "forward:chunk_size=2", "forward:chunk_size=3"])
def test_forward_chunks_cut_each_basis_row_at_the_running_leaf_offsets(spec):
    """torch.func forward mode on three outer leaves (sizes 2, 1, 2) against plain autograd through 4 SGD steps
    (relative error ≤ 1e-10 per leaf): chunks of 5, 2 + 2 + 1 and 3 + 2 directions."""
    problem, inner, outer = three_leaf_problem()
    want = hand_momentum_hypergrad(problem, inner, outer, 4, 0.1, 0.0)  # μ = 0: plain SGD
    with bilevel.autodiff_path("func"):
        result = bilevel.hypergrad(problem, inner, outer, inner_batch=None, outer_batch=None, solver=spec,
                                   loop=bilevel.InnerLoop(steps=4, lr=0.1))
    for key in ("a", "b", "c"):
        assert result.hypergrad[key].shape == outer[key].shape
        assert rel(result.hypergrad[key], want[key]) <= BOUND, key


@pytest.mark.parametrize("spec", ["forward", "unroll", "onestep"])
def test_the_zero_hypergradient_warning_skips_exactly_the_three_library_frames(spec, monkeypatch):
    """stacklevel 4 (``warnings.warn`` ← ``warn_if_zero_hypergradient`` ← the solver's ``__call__`` ← ``hypergrad``
    ← the caller), read from the call: test_no_inner_step_gives_an_exact_zero_when_f_ignores_phi checks where it
    lands, but not under the mutation tool, whose wrappers add frames. Ridge from w = 0, one step: the
    hypergradient is exactly 0 (see test_onestep_zero_hypergradient_names_the_mode_and_the_likely_reason)."""
    calls = []
    monkeypatch.setattr(warnings, "warn", lambda message, category=None, stacklevel=1, **kw:
                        calls.append((category, stacklevel)))
    steps = 0 if spec != "onestep" else 1
    bilevel.hypergrad(PROBLEM, {"w": torch.zeros(5, dtype=DT)}, PHI, inner_batch=(X, Y), outer_batch=OUTER_BATCH,
                      solver=spec, loop=bilevel.InnerLoop(steps=steps, lr=0.1))
    assert calls == [(bilevel.ZeroHypergradientWarning, 4)]


def recording_map(record: list):
    """A ``map_fn`` that evaluates in order (as the default) and keeps every list of results it returned."""
    def map_fn(fn, items):
        results = [fn(x) for x in items]
        record.append(results)
        return results
    return map_fn


def test_cmaes_without_the_mean_reports_exactly_the_candidates_statistics():
    """evaluate_mean=false: the scores are F(θ_K(φ_i), φ_i) of the candidates a replay of the start asks for
    (relative error ≤ 1e-12 against loop.run by hand); the diagnostics are exactly these keys: the outer loss is the
    best score, the mean is numpy's, σ the strategy's after tell, and no inner loss."""
    record, loop = [], bilevel.InnerLoop(steps=2, lr=LR)
    solver = CMAES(popsize=4, sigma=0.2, seed=3, evaluate_mean=False, map_fn=recording_map(record))
    result = bilevel.hypergrad(PROBLEM, THETA0, PHI, inner_batch=(X, Y), outer_batch=OUTER_BATCH, solver=solver,
                               loop=loop)
    assert len(record) == 1  # the candidates only, no run at the mean
    scores = record[0]
    for candidate, score in zip(solver.init(PROBLEM, THETA0, PHI).strategy.ask(), scores):
        phi = {"log_lambda": torch.as_tensor(candidate, dtype=DT)}
        theta = loop.run(PROBLEM, THETA0, phi, (X, Y))[0]
        assert rel(score, PROBLEM.outer(theta, phi, OUTER_BATCH)) <= 1e-12
    assert result.diagnostics == {
        "outer_loss": min(scores), "best_candidate_loss": min(scores), "mean_candidate_loss": float(np.mean(scores)),
        "sigma": float(result.state.strategy.sigma), "nonfinite_candidates": 0.0,
        "best_index": float(np.argmin(scores)), "inner_steps": 2.0, "hvp_count": 0.0, "evaluations": 4.0}


def test_cmaes_replays_its_strategy_once_per_resume_not_once_per_generation(monkeypatch):
    """The live strategy travels in the returned state: three chained generations replay once (the start, generation
    0); a state rebuilt from its numbers (as a checkpoint loads it) replays once more, its 3 generations."""
    replayed, original = [], CMAESState.replay

    def counting_replay(self):
        replayed.append(self.generation)
        return original(self)

    monkeypatch.setattr(CMAESState, "replay", counting_replay)
    solver, loop, state = CMAES(popsize=3, sigma=0.2, seed=2), bilevel.InnerLoop(steps=1, lr=LR), None
    for _ in range(3):
        state = bilevel.hypergrad(PROBLEM, THETA0, PHI, inner_batch=(X, Y), outer_batch=OUTER_BATCH, solver=solver,
                                  loop=loop, state=state).state
    assert replayed == [0] and state.generation == 3
    loaded = CMAESState(state.x0, state.sigma0, state.popsize, state.seed, state.fitness)
    bilevel.hypergrad(PROBLEM, THETA0, PHI, inner_batch=(X, Y), outer_batch=OUTER_BATCH, solver=solver, loop=loop,
                      state=loaded)
    assert replayed == [0, 3]


def test_cmaes_emits_no_warning_when_it_builds_advances_or_replays_a_strategy():
    """cma's own ``seed`` option is switched off with NaN: passed None, cma's option parser evaluates its default
    ('time') and warns "name 'time' is not defined" on every new strategy."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = bilevel.hypergrad(PROBLEM, THETA0, PHI, inner_batch=(X, Y), outer_batch=OUTER_BATCH,
                                   solver="cmaes:popsize=3", loop=bilevel.InnerLoop(steps=1, lr=LR))
        replayed = result.state.replay()
    assert replayed.countiter == 1


def test_cmaes_takes_bfloat16_outer_params_which_numpy_cannot_hold():
    """bfloat16 has no numpy dtype: the start mean is the outer params read exactly in float64, and the
    pseudo-gradient is m_old − m_new rounded once to bfloat16 (bitwise)."""
    bf16 = torch.bfloat16
    problem = bilevel.BilevelProblem(lambda i, o, batch: 0.5 * ((i["t"] - o["a"].sum()) ** 2).sum(),
                                     lambda i, o, batch: (i["t"] ** 2).sum() + (o["a"] ** 2).sum())
    inner, outer = {"t": torch.zeros(1, dtype=bf16)}, {"a": torch.tensor([0.1, 0.3], dtype=bf16)}
    state = CMAES(popsize=4, sigma=0.3).init(problem, inner, outer)
    assert torch.equal(state.x0, outer["a"].to(DT))
    result = bilevel.hypergrad(problem, inner, outer, inner_batch=None, outer_batch=None,
                               solver=CMAES(popsize=4, sigma=0.3), loop=bilevel.InnerLoop(steps=2, lr=0.5))
    step = torch.from_numpy(state.x0.numpy() - result.state.strategy.mean).to(bf16)
    assert result.hypergrad["a"].dtype == bf16 and torch.equal(result.hypergrad["a"], step)
