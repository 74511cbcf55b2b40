"""``bilevel.InnerLoop`` held to hand-unrolled float64 values on both autodiff paths.

The probe problem has a hand-computable gradient. With θ = (a ∈ R², c ∈ R), φ ∈ R², batch y ∈ R²:

    G(θ, φ; y) = ½ aᵀAa + aᵀBφ − yᵀa + ½ κ c² + c φ₁,
    ∇_a G = A a + B φ − y,     ∇_c G = κ c + φ₁.

So K SGD steps of size η give a_{k+1} = (I − ηA) a_k − η(Bφ − y_k), and the exact derivatives

    ∂a_K/∂a_0 = (I − ηA)^K,   ∂a_K/∂φ = −η Σ_{j<K} (I − ηA)^j B,   ∂a_K/∂y_j = η (I − ηA)^{K−1−j},
    ∂c_K/∂c_0 = (1 − ηκ)^K,   ∂c_K/∂φ₁ = −η Σ_{j<K} (1 − ηκ)^j.

Momentum (torchopt's heavy ball) is T ← μT + g, θ ← θ − ηT; weight decay is coupled (g ← g + λθ); Adam is the
textbook bias-corrected update, with 1 − βᵗ rounded to float32 as torchopt computes it. Everything below is
compared with these formulas written out by hand (bound: 1e-13 relative, float64 round-off over a few steps).
Written to kill the mutants that ``mutation/run.py inner`` found alive (docs/mutation.md).
"""
from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
import torchopt
from torch.autograd import forward_ad

import bilevel
from bilevel.errors import NonFiniteError

F64 = torch.float64
A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=F64)
B = torch.tensor([[1.0, -1.0], [0.5, 2.0]], dtype=F64)
KAPPA = 3.0
LR = 0.1
Y = torch.tensor([1.0, -2.0], dtype=F64)
PHI = torch.tensor([0.2, -0.5], dtype=F64)
TOL = 1e-13
PATHS = [None, "autograd", "func"]


def inner_loss(inner, outer, y):
    a, c, phi = inner["a"], inner["c"], outer["phi"]
    return 0.5 * a @ (A @ a) + a @ (B @ phi) - y @ a + 0.5 * KAPPA * c * c + c * phi[1]


PROBLEM = bilevel.BilevelProblem(inner_loss, lambda inner, outer, y: inner["a"].sum())


def theta0(requires_grad: bool = False) -> dict:
    return {"a": torch.tensor([0.3, -0.7], dtype=F64, requires_grad=requires_grad),
            "c": torch.tensor(0.4, dtype=F64, requires_grad=requires_grad)}


def phi(requires_grad: bool = False) -> dict:
    return {"phi": PHI.clone().requires_grad_(requires_grad)}


def hand_loss(a, c, ph, y):
    return float(0.5 * a @ (A @ a) + a @ (B @ ph) - y @ a + 0.5 * KAPPA * c * c + c * ph[1])


def adam_bias_correction(beta: float, t: int) -> float:
    """1 − βᵗ as torchopt computes it: ``1 - pow(beta, count)`` with an int64 count tensor, hence in float32.

    So float64 Adam differs from the float64 textbook formula by ~1e-7 relative (measured:
    test_adam_bias_correction_is_float32_in_torchopt); the hand reference below reproduces it.
    """
    return float(1 - pow(beta, torch.tensor(t)))


def hand_run(theta, ph, ys, kind="sgd", lr=LR, mu=0.9, wd=0.0, betas=(0.9, 0.999), eps=1e-8, state=None):
    """The optimiser written out: returns (a, c), the losses before each step, and the optimiser state."""
    a, c = theta["a"].detach().clone(), theta["c"].detach().clone()
    losses = []
    for y in ys:
        losses.append(hand_loss(a, c, ph, y))
        ga, gc = A @ a + B @ ph - y + wd * a, KAPPA * c + ph[1] + wd * c
        if kind == "sgd":
            a, c = a - lr * ga, c - lr * gc
        elif kind == "momentum":
            ta, tc = state if state is not None else (torch.zeros(2, dtype=F64), torch.zeros((), dtype=F64))
            ta, tc = mu * ta + ga, mu * tc + gc
            state = (ta, tc)
            a, c = a - lr * ta, c - lr * tc
        else:
            (ma, mc), (va, vc), t = state if state is not None else ((0.0, 0.0), (0.0, 0.0), 0)
            b1, b2 = betas
            t += 1
            ma, mc = b1 * ma + (1 - b1) * ga, b1 * mc + (1 - b1) * gc
            va, vc = b2 * va + (1 - b2) * ga * ga, b2 * vc + (1 - b2) * gc * gc
            state = ((ma, mc), (va, vc), t)
            # torchopt forms 1 − βᵗ from an int64 step count, i.e. in float32 (see adam_bias_correction)
            c1, c2 = adam_bias_correction(b1, t), adam_bias_correction(b2, t)
            a = a - lr * (ma / c1) / (torch.sqrt(va / c2) + eps)
            c = c - lr * (mc / c1) / (torch.sqrt(vc / c2) + eps)
    return (a, c), losses, state


def assert_close(got: torch.Tensor, want, tol: float = TOL) -> None:
    want = torch.as_tensor(want, dtype=F64)
    got = got.detach()
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = 1.0 + float(want.abs().max()) if want.numel() else 1.0
    err = float((got - want).abs().max()) if want.numel() else 0.0
    assert err <= tol * scale, f"|got − want| = {err:.3e} > {tol:g}·{scale:.3g}: got {got}, want {want}"


def assert_theta(theta: dict, want: tuple, tol: float = TOL) -> None:
    assert set(theta) == {"a", "c"}
    assert_close(theta["a"], want[0], tol)
    assert_close(theta["c"], want[1], tol)


def jacobian(out: torch.Tensor, wrt: torch.Tensor) -> torch.Tensor:
    """d out / d wrt by one backward pass per output entry (out 1-D or scalar)."""
    flat = out.reshape(-1)
    rows = [torch.autograd.grad(flat[i], wrt, retain_graph=True, allow_unused=True)[0] for i in range(flat.numel())]
    rows = [torch.zeros_like(wrt) if r is None else r for r in rows]
    return torch.stack(rows).reshape(tuple(out.shape) + tuple(wrt.shape))


def power(M: torch.Tensor, k: int) -> torch.Tensor:
    return torch.linalg.matrix_power(M, k)


IMA = torch.eye(2, dtype=F64) - LR * A  # I − ηA


# ---------------------------------------------------------------------------------------------------------------
# Construction: bad settings fail at once with what is wrong and the fix; the edge values are accepted.


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(steps=-1), ValueError, r"InnerLoop\.steps must be a non-negative int, got -1"),
    (dict(steps=2.5), ValueError, r"InnerLoop\.steps must be a non-negative int, got 2\.5"),
    (dict(optimizer="rmsprop"), ValueError,
     r"unknown inner optimizer 'rmsprop'; valid: \('sgd', 'momentum', 'adam'\) or a torchopt GradientTransformation"),
    (dict(optimizer=42), TypeError,
     r"InnerLoop\.optimizer must be one of \('sgd', 'momentum', 'adam'\) or a torchopt GradientTransformation, got 42"),
    (dict(lr=0.0), ValueError, r"InnerLoop\.lr must be > 0, got 0\.0"),
    (dict(lr=-0.5), ValueError, r"InnerLoop\.lr must be > 0, got -0\.5"),
])
def test_bad_settings_are_refused_naming_the_setting_and_what_it_must_be(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        bilevel.InnerLoop(**kwargs)


@pytest.mark.parametrize("path", PATHS)
def test_zero_steps_return_the_start_point_and_no_losses(path):
    loop = bilevel.InnerLoop(steps=0)
    calls = []
    start = theta0()
    theta, state, losses = loop.run(PROBLEM, start, phi(), lambda k: calls.append(k) or Y, path=path)
    assert theta["a"] is start["a"] and theta["c"] is start["c"]
    assert state is None and calls == []
    assert losses.shape == (0,)


# ---------------------------------------------------------------------------------------------------------------
# Values: every optimiser, on both paths, equals the hand-unrolled steps.


@pytest.mark.parametrize("path", PATHS)
def test_sgd_run_and_single_steps_equal_the_hand_unrolled_steps(path):
    loop = bilevel.InnerLoop(steps=4, lr=LR)
    start = theta0()
    saved = {k: v.clone() for k, v in start.items()}
    want, want_losses, _ = hand_run(start, PHI, [Y] * 4)
    theta, state, losses = loop.run(PROBLEM, start, phi(), Y, path=path)
    assert_theta(theta, want)
    assert_close(losses, want_losses)
    assert all(torch.equal(start[k], saved[k]) for k in start)  # the caller's θ₀ is not touched
    # the same four steps taken one at a time with step()
    th, st = theta0(), None
    for k in range(4):
        th, st, loss = loop.step(PROBLEM, th, st, phi(), Y, path=path)
        assert_close(loss, want_losses[k])
    assert_theta(th, want)


CASES = {  # name: (InnerLoop kwargs, hand_run kwargs)
    "sgd+weight_decay": (dict(optimizer="sgd", weight_decay=0.3), dict(kind="sgd", wd=0.3)),
    "momentum": (dict(optimizer="momentum", momentum=0.5), dict(kind="momentum", mu=0.5)),
    "momentum+weight_decay": (dict(optimizer="momentum", momentum=0.5, weight_decay=0.3),
                              dict(kind="momentum", mu=0.5, wd=0.3)),
    "adam": (dict(optimizer="adam", betas=(0.8, 0.9), eps=1e-3), dict(kind="adam", betas=(0.8, 0.9), eps=1e-3)),
    "adam+weight_decay": (dict(optimizer="adam", betas=(0.8, 0.9), eps=1e-3, weight_decay=0.3),
                          dict(kind="adam", betas=(0.8, 0.9), eps=1e-3, wd=0.3)),
}


@pytest.mark.parametrize("path", ["autograd", "func"])
@pytest.mark.parametrize("case", list(CASES))
def test_optimizers_equal_the_hand_unrolled_steps(case, path):
    kwargs, hand = CASES[case]
    loop = bilevel.InnerLoop(steps=4, lr=LR, **kwargs)
    start = theta0()
    saved = {k: v.clone() for k, v in start.items()}
    want, want_losses, want_state = hand_run(start, PHI, [Y] * 4, **hand)
    theta, state, losses = loop.run(PROBLEM, start, phi(), Y, path=path)
    assert_theta(theta, want)
    assert_close(losses, want_losses)
    assert all(torch.equal(start[k], saved[k]) for k in start)  # never updated in place
    if hand["kind"] == "momentum":  # the trace T₄ itself
        trace = next(part.trace for part in state if hasattr(part, "trace"))
        assert_close(trace[0], want_state[0])
        assert_close(trace[1], want_state[1])


def test_adam_bias_correction_is_float32_in_torchopt():
    """Documents a torchopt precision limit the inner loop inherits: 1 − βᵗ is rounded to float32, so float64
    Adam is exact to ~1e-7 relative only. Measured: 4 steps, β = (0.8, 0.9): 1e-8 < error < 1e-6."""
    x = adam_bias_correction(0.9, 1)
    assert x == float(torch.tensor(x, dtype=torch.float32)) and 1e-9 < abs(x - (1 - 0.9)) < 1e-7  # a float32 value
    loop = bilevel.InnerLoop(steps=4, lr=LR, optimizer="adam", betas=(0.8, 0.9), eps=1e-3)
    theta, _, _ = loop.run(PROBLEM, theta0(), phi(), Y)
    a, c = theta0()["a"], theta0()["c"]  # the float64 textbook Adam
    ma = va = torch.zeros(2, dtype=F64)
    for t in range(1, 5):
        g = A @ a + B @ PHI - Y
        ma, va = 0.8 * ma + 0.2 * g, 0.9 * va + 0.1 * g * g
        a = a - LR * (ma / (1 - 0.8 ** t)) / (torch.sqrt(va / (1 - 0.9 ** t)) + 1e-3)
    err = float((theta["a"] - a).abs().max())
    assert 1e-8 < err < 1e-6


def test_custom_torchopt_transform_is_used_and_the_lr_knob_ignored():
    """A GradientTransformation given as optimizer runs as is (its own lr 0.2, not InnerLoop.lr)."""
    for path in ("autograd", "func"):
        loop = bilevel.InnerLoop(steps=3, lr=LR, optimizer=torchopt.sgd(0.2, momentum=0.5))
        theta, _, _ = loop.run(PROBLEM, theta0(), phi(), Y, path=path)
        assert_theta(theta, hand_run(theta0(), PHI, [Y] * 3, kind="momentum", lr=0.2, mu=0.5)[0])


class CountingTransform:
    """Wraps a torchopt transformation and counts its init/update calls."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.inits, self.updates = inner, 0, 0

    def init(self, params):
        self.inits += 1
        return self.inner.init(params)

    def update(self, *args, **kwargs):
        self.updates += 1
        return self.inner.update(*args, **kwargs)


@pytest.mark.parametrize("kwargs, updates", [(dict(optimizer="sgd"), 0), (dict(optimizer="sgd", weight_decay=0.3), 3),
                                             (dict(optimizer="momentum"), 3), (dict(optimizer="adam"), 3)])
def test_plain_sgd_takes_the_fast_path_with_torchopt_sgd_s_numbers_bitwise(kwargs, updates):
    """θ − η·g without torchopt's per-step update only for plain SGD (no weight decay); bitwise torchopt.sgd."""
    for path in ("autograd", "func"):
        loop = bilevel.InnerLoop(steps=3, lr=LR, **kwargs)
        counter = CountingTransform(loop.transform)
        loop.__dict__["transform"] = counter  # the cached_property's slot
        theta, _, _ = loop.run(PROBLEM, theta0(), phi(), Y, path=path)
        assert (counter.inits, counter.updates) == (1, updates)
    reference = bilevel.InnerLoop(steps=3, optimizer=torchopt.sgd(LR))
    for path in ("autograd", "func"):
        fast, _, _ = bilevel.InnerLoop(steps=3, lr=LR).run(PROBLEM, theta0(), phi(), Y, path=path)
        slow, _, _ = reference.run(PROBLEM, theta0(), phi(), Y, path=path)
        assert all(torch.equal(fast[k], slow[k]) for k in fast)


# ---------------------------------------------------------------------------------------------------------------
# Steps, start and minibatches.


@pytest.mark.parametrize("path", PATHS)
def test_steps_start_and_callable_minibatches_are_indexed_per_step(path):
    loop = bilevel.InnerLoop(steps=5, lr=LR)
    calls = []

    def batches(k):
        calls.append(k)
        return Y * (k + 1)

    theta, _, losses = loop.run(PROBLEM, theta0(), phi(), batches, path=path)
    assert calls == [0, 1, 2, 3, 4]
    want, want_losses, _ = hand_run(theta0(), PHI, [Y * (k + 1) for k in range(5)])
    assert_theta(theta, want)
    assert_close(losses, want_losses)
    calls.clear()  # steps= overrides InnerLoop.steps; start= offsets the batch index only
    theta, _, losses = loop.run(PROBLEM, theta0(), phi(), batches, steps=3, start=2, path=path)
    assert calls == [2, 3, 4]
    want, want_losses, _ = hand_run(theta0(), PHI, [Y * (k + 1) for k in (2, 3, 4)])
    assert_theta(theta, want)
    assert_close(losses, want_losses)


@pytest.mark.parametrize("path", ["autograd", "func"])
@pytest.mark.parametrize("case", ["momentum", "adam+weight_decay"])
def test_warm_optimizer_state_resumes_exactly_in_a_new_loop(case, path):
    """2 steps, then 2 more from the returned state in a NEW InnerLoop (fresh torchopt transform), by run() and by
    step(), equal 4 uninterrupted steps; in particular the first resumed momentum step is T ← μT + g (torchopt's
    hidden first-call flag is spent at construction). The state handed in is not modified."""
    kwargs, hand = CASES[case]
    first = bilevel.InnerLoop(steps=2, lr=LR, **kwargs)
    mid, state, _ = first.run(PROBLEM, theta0(), phi(), Y, path=path)
    saved_state = [t.clone() for t in torch.utils._pytree.tree_leaves(state) if isinstance(t, torch.Tensor)]
    saved_mid = {k: v.clone() for k, v in mid.items()}
    want, want_losses, _ = hand_run(theta0(), PHI, [Y] * 4, **hand)
    theta, _, losses = bilevel.InnerLoop(steps=2, lr=LR, **kwargs).run(PROBLEM, mid, phi(), Y, opt_state=state,
                                                                       start=2, path=path)
    assert_theta(theta, want)
    assert_close(losses, want_losses[2:])
    th, st = mid, state
    loop = bilevel.InnerLoop(steps=2, lr=LR, **kwargs)
    for _ in range(2):
        th, st, _ = loop.step(PROBLEM, th, st, phi(), Y, path=path)
    assert_theta(th, want)
    after = [t for t in torch.utils._pytree.tree_leaves(state) if isinstance(t, torch.Tensor)]
    assert all(torch.equal(x, y) for x, y in zip(after, saved_state))
    assert all(torch.equal(mid[k], saved_mid[k]) for k in mid)


def test_a_param_the_loss_does_not_use_keeps_its_value():
    """An unused inner tensor gets a zero gradient (not an error) and is carried through unchanged."""
    for path in ("autograd", "func"):  # inner_loss reads only θ["a"] and θ["c"]
        start = {**theta0(), "unused": torch.tensor([5.0, -6.0], dtype=F64)}
        theta, _, _ = bilevel.InnerLoop(steps=3, lr=LR).run(PROBLEM, start, phi(), Y, path=path)
        assert torch.equal(theta["unused"], start["unused"])
        want, _, _ = hand_run(start, PHI, [Y] * 3)
        assert_close(theta["a"], want[0])
        assert_close(theta["c"], want[1])


# ---------------------------------------------------------------------------------------------------------------
# Which machinery runs and what it records: path= and create_graph=.


def test_func_path_is_differentiable_whatever_create_graph_says():
    """path="func" differentiates through torch.func even with create_graph=False: ∂a₁/∂φ = −ηB, ∂c₁/∂φ = (0, −η)."""
    ph = phi(requires_grad=True)
    new, _, loss = bilevel.InnerLoop(steps=1, lr=LR).step(PROBLEM, theta0(), None, ph, Y, path="func",
                                                          create_graph=False)
    assert_close(jacobian(new["a"], ph["phi"]), -LR * B)
    assert_close(jacobian(new["c"], ph["phi"]), [0.0, -LR])
    theta, _, _ = bilevel.InnerLoop(steps=3, lr=LR).run(PROBLEM, theta0(), ph, Y, path="func", create_graph=False)
    assert_close(jacobian(theta["a"], ph["phi"]), -LR * (torch.eye(2, dtype=F64) + IMA + IMA @ IMA) @ B)


@pytest.mark.parametrize("how", ["step", "run"])
def test_tape_create_graph_false_records_nothing_even_when_inputs_require_grad(how):
    loop = bilevel.InnerLoop(steps=2, lr=LR, optimizer="momentum", momentum=0.5)
    th, ph = theta0(requires_grad=True), phi(requires_grad=True)
    ys = [Y.clone().requires_grad_(True), Y.clone().requires_grad_(True)]
    if how == "step":
        new, _, loss = loop.step(PROBLEM, th, None, ph, ys[0], path="autograd", create_graph=False)
        want, want_losses, _ = hand_run(th, PHI, [Y], kind="momentum", mu=0.5)
    else:
        new, _, loss = loop.run(PROBLEM, th, ph, lambda k: ys[k], path="autograd", create_graph=False)
        want, want_losses, _ = hand_run(th, PHI, [Y, Y], kind="momentum", mu=0.5)
    assert_theta(new, want)
    assert_close(loss, want_losses[0] if how == "step" else want_losses)
    assert not new["a"].requires_grad and not new["c"].requires_grad and not loss.requires_grad


def test_tape_with_plain_inputs_returns_plain_tensors():
    """Nothing requires grad: the automatic choice records no graph (θ₁ and the loss are plain tensors)."""
    loop = bilevel.InnerLoop(steps=2, lr=LR, optimizer="momentum", momentum=0.5)
    new, state, loss = loop.step(PROBLEM, theta0(), None, phi(), Y, path="autograd")
    theta, state2, losses = loop.run(PROBLEM, theta0(), phi(), lambda k: Y, path="autograd")
    for t in (new["a"], new["c"], loss, theta["a"], theta["c"], *state[0].trace, *state2[0].trace):
        assert not t.requires_grad
    assert_theta(new, hand_run(theta0(), PHI, [Y], kind="momentum", mu=0.5)[0])


@pytest.mark.parametrize("path", [None, "autograd"])
def test_tape_differentiates_through_steps_when_phi_requires_grad(path):
    """Plain θ, φ requiring grad (auto): ∂a_K/∂φ = −η Σ_{j<K}(I−ηA)^j B, and the loss G(θ₀, φ) keeps its graph:
    ∂G/∂φ = Bᵀa₀ + (0, c₀)."""
    loop = bilevel.InnerLoop(steps=3, lr=LR)
    ph = phi(requires_grad=True)
    new, _, loss = loop.step(PROBLEM, theta0(), None, ph, Y, path=path)
    assert_close(jacobian(new["a"], ph["phi"]), -LR * B)
    assert_close(jacobian(loss, ph["phi"]), B.T @ theta0()["a"] + torch.tensor([0.0, 0.4], dtype=F64))
    theta, _, _ = loop.run(PROBLEM, theta0(), ph, Y, path=path)
    assert_close(jacobian(theta["a"], ph["phi"]), -LR * (torch.eye(2, dtype=F64) + IMA + IMA @ IMA) @ B)
    assert_close(jacobian(theta["c"], ph["phi"]), [0.0, -LR * sum((1 - LR * KAPPA) ** j for j in range(3))])
    with torch.no_grad():  # grad mode off: nothing recorded although φ requires grad
        new, _, loss = loop.step(PROBLEM, theta0(), None, ph, Y, path=path)
        theta, _, _ = loop.run(PROBLEM, theta0(), ph, Y, path=path)
    assert not (new["a"].requires_grad or loss.requires_grad or theta["a"].requires_grad)
    assert_theta(theta, hand_run(theta0(), PHI, [Y] * 3)[0])


@pytest.mark.parametrize("path", [None, "autograd"])
def test_tape_differentiates_through_steps_when_theta_requires_grad(path):
    """θ₀ requiring grad, φ plain (auto): ∂a_K/∂a₀ = (I − ηA)^K, ∂c_K/∂c₀ = (1 − ηκ)^K, no cross terms."""
    loop = bilevel.InnerLoop(steps=2, lr=LR)
    th = theta0(requires_grad=True)
    theta, _, _ = loop.run(PROBLEM, th, phi(), Y, path=path)
    assert_close(jacobian(theta["a"], th["a"]), power(IMA, 2))
    assert_close(jacobian(theta["a"], th["c"]), torch.zeros(2, dtype=F64))
    assert_close(jacobian(theta["c"], th["c"]), (1 - LR * KAPPA) ** 2)
    new, _, _ = loop.step(PROBLEM, th, None, phi(), Y, path=path)
    assert_close(jacobian(new["a"], th["a"]), IMA)
    assert_theta(theta, hand_run(th, PHI, [Y] * 2)[0])
    with torch.no_grad():  # grad mode off: plain results
        theta, _, _ = loop.run(PROBLEM, th, phi(), Y, path=path)
    assert not theta["a"].requires_grad


def test_explicit_create_graph_true_is_honoured_with_grad_mode_off():
    """create_graph=True (what unrolled solvers ask for) keeps the step differentiable even under no_grad."""
    loop = bilevel.InnerLoop(steps=2, lr=LR)
    th = theta0(requires_grad=True)
    with torch.no_grad():
        new, _, _ = loop.step(PROBLEM, th, None, phi(), Y, path="autograd", create_graph=True)
        theta, _, _ = loop.run(PROBLEM, th, phi(), Y, path="autograd", create_graph=True)
    assert_close(jacobian(new["a"], th["a"]), IMA)
    assert_close(jacobian(theta["a"], th["a"]), power(IMA, 2))
    assert_close(jacobian(theta["c"], th["c"]), (1 - LR * KAPPA) ** 2)


def test_tape_differentiates_through_an_optimizer_state_that_requires_grad():
    """θ plain, the momentum trace T₀ requiring grad: θ₁ = θ₀ − η(μT₀ + g), so ∂θ₁/∂T₀ = −ημ I."""
    mu = 0.5
    loop = bilevel.InnerLoop(steps=1, lr=LR, optimizer="momentum", momentum=mu)
    trace = [torch.tensor([0.1, 0.2], dtype=F64, requires_grad=True), torch.tensor(-0.3, dtype=F64, requires_grad=True)]
    empty = loop.transform.init(theta0())
    state = (empty[0]._replace(trace=trace), *empty[1:])
    new, _, _ = loop.step(PROBLEM, theta0(), state, phi(), Y, path="autograd")
    assert_close(jacobian(new["a"], trace[0]), -LR * mu * torch.eye(2, dtype=F64))
    assert_close(jacobian(new["c"], trace[1]), -LR * mu)
    want, _, _ = hand_run(theta0(), PHI, [Y], kind="momentum", mu=mu, state=(trace[0].detach(), trace[1].detach()))
    assert_theta(new, want)


def test_minibatches_that_start_requiring_grad_later_are_differentiated_from_then_on():
    """y₀ plain, y₁ and y₂ requiring grad: the loop starts without a graph and records one from step 1 on, so
    ∂a₃/∂y₁ = η(I − ηA) and ∂a₃/∂y₂ = ηI exactly. With create_graph=False or grad mode off: nothing recorded."""
    loop = bilevel.InnerLoop(steps=3, lr=LR)
    ys = [Y.clone(), (2 * Y).requires_grad_(True), (3 * Y).requires_grad_(True)]
    theta, _, _ = loop.run(PROBLEM, theta0(), phi(), lambda k: ys[k], path="autograd")
    assert_close(jacobian(theta["a"], ys[1]), LR * IMA)
    assert_close(jacobian(theta["a"], ys[2]), LR * torch.eye(2, dtype=F64))
    assert_theta(theta, hand_run(theta0(), PHI, [y.detach() for y in ys])[0])
    theta, _, _ = loop.run(PROBLEM, theta0(), phi(), lambda k: ys[k], path="autograd", create_graph=False)
    assert not theta["a"].requires_grad
    with torch.no_grad():
        theta, _, _ = loop.run(PROBLEM, theta0(), phi(), lambda k: ys[k], path="autograd")
    assert not theta["a"].requires_grad


def test_path_argument_is_checked():
    loop = bilevel.InnerLoop(steps=1)
    for call in (lambda: loop.step(PROBLEM, theta0(), None, phi(), Y, path="tape"),
                 lambda: loop.run(PROBLEM, theta0(), phi(), Y, path="tape")):
        with pytest.raises(ValueError, match=r"path must be 'autograd' or 'func' \(or None for the automatic choice\)"
                                             r", got 'tape'"):
            call()


# ---------------------------------------------------------------------------------------------------------------
# Transforms: vmap over φ (torch.func path, no host-side finiteness check) and forward-mode tangents on the tape.


def test_vmap_over_outer_params_equals_each_row_run_alone():
    phis = torch.tensor([[0.2, -0.5], [1.0, 0.0], [-0.3, 0.7]], dtype=F64)
    loop = bilevel.InnerLoop(steps=3, lr=LR, optimizer="momentum", momentum=0.5)

    def final(p):
        theta, _, losses = loop.run(PROBLEM, theta0(), {"phi": p}, Y)
        return theta["a"], theta["c"], losses

    a, c, losses = torch.func.vmap(final)(phis)
    for i in range(3):
        (wa, wc), wl, _ = hand_run(theta0(), phis[i], [Y] * 3, kind="momentum", mu=0.5)
        assert_close(a[i], wa)
        assert_close(c[i], wc)
        assert_close(losses[i], wl)


def test_forward_mode_tangents_flow_through_tape_steps():
    """Under a forward-AD dual level the tape steps carry tangents: θ₀ with tangent v gives tangent (I−ηA)²v after
    2 steps; φ with tangent u gives −η(I + (I−ηA))Bu (forward-over-reverse)."""
    loop = bilevel.InnerLoop(steps=2, lr=LR)
    v = torch.tensor([1.0, -2.0], dtype=F64)
    u = torch.tensor([0.5, 1.5], dtype=F64)
    with forward_ad.dual_level():
        start = {"a": forward_ad.make_dual(theta0()["a"], v), "c": theta0()["c"]}
        theta, _, _ = loop.run(PROBLEM, start, phi(), Y, path="autograd")
        ta = forward_ad.unpack_dual(theta["a"]).tangent
        tc = forward_ad.unpack_dual(theta["c"]).tangent
        dual_phi = {"phi": forward_ad.make_dual(PHI.clone(), u)}
        theta2, _, _ = loop.run(PROBLEM, theta0(), dual_phi, Y, path="autograd", create_graph=False)
        ta2 = forward_ad.unpack_dual(theta2["a"]).tangent
        tc2 = forward_ad.unpack_dual(theta2["c"]).tangent
        values = (forward_ad.unpack_dual(theta["a"]).primal, forward_ad.unpack_dual(theta2["c"]).primal)
    assert_close(ta, power(IMA, 2) @ v)
    assert tc is None or float(tc.abs().max()) == 0.0
    assert_close(ta2, -LR * (torch.eye(2, dtype=F64) + IMA) @ B @ u)
    assert_close(tc2, -LR * (1 + (1 - LR * KAPPA)) * u[1])
    assert_close(values[0], hand_run(theta0(), PHI, [Y] * 2)[0][0])
    assert_close(values[1], hand_run(theta0(), PHI, [Y] * 2)[0][1])


# ---------------------------------------------------------------------------------------------------------------
# Non-finite losses: the first bad step, its value and the last finite value, offset by start.


def scaled_norm(inner, outer, s):
    return 0.5 * s * (inner["w"] ** 2).sum()


SCALED = bilevel.BilevelProblem(scaled_norm, lambda inner, outer, s: inner["w"].sum())


@pytest.mark.parametrize("path", ["autograd", "func"])
def test_nonfinite_inner_loss_names_the_first_bad_step_its_value_and_the_last_finite_one(path):
    """G = s/2·‖w‖², w₀ = (1, 2), η = 0.1, s_k = ∞ at k = 4: from start = 3 the losses are 2.5, ∞ (k = 4),
    ∞ (w = −∞), NaN (w = −∞ + ∞)."""
    loop = bilevel.InnerLoop(steps=4, lr=LR)
    w0 = {"w": torch.tensor([1.0, 2.0], dtype=F64)}
    batches = lambda k: torch.tensor(math.inf if k == 4 else 1.0, dtype=F64)
    expected = ("inner loss is inf at inner step 4; lower the learning rate, check the data for NaN/Inf, or clip "
                "the loss (the last finite value was 2.5)")
    with pytest.raises(NonFiniteError, match=re.escape(expected)):
        loop.run(SCALED, w0, {}, batches, start=3, path=path)
    _, _, losses = loop.run(SCALED, w0, {}, batches, start=3, path=path, check_finite=False)
    assert losses[0].item() == 2.5 and losses[1].item() == math.inf and losses[2].item() == math.inf
    assert math.isnan(losses[3].item())
    nan = torch.tensor(math.nan, dtype=F64)
    with pytest.raises(NonFiniteError, match=re.escape("inner loss is nan at inner step 0;") + r".*"
                       + re.escape("(the last finite value was nan)")):
        bilevel.InnerLoop(steps=2).run(SCALED, w0, {}, nan, path=path)
