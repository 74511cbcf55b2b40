"""The compiled path (``InnerLoop(compile=True)``, :mod:`bilevel.compiled`) against exact values.

On ridge (tests/oracles.py) plain gradient descent has a closed form: with H = XᵀX/n + diag(exp λ) and
w* = H⁻¹Xᵀy/n, the K-step iterate is w_K = w* + (I − ηH)^K (w_0 − w*); heavy ball is the linear recurrence
v ← μv + (Hw − b), w ← w − ηv. The compiled loop is held to those (float64, relative error ≤ 1e-12), the
implicit hypergradient through a compiled inner loop to the closed form, and the steps that are
differentiated (unroll) must not take the compiled path at all.

Inductor's code generation costs about 20 s per graph cold, so one test runs the real backend (the plain-SGD
graph); the tests of tracing and guards (which graphs exist, when dynamo recompiles) use the ``aot_eager``
backend: the same dynamo capture and AOT autograd, without generating C++.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import bilevel
from bilevel import compiled
from bilevel.run import cli
from oracles import quadratic, quadratic_unrolled_hypergrad, rel_error, ridge, ridge_hypergrad, ridge_solution

torch.set_num_threads(1)


@pytest.fixture
def aot_eager(monkeypatch):
    """Trace with dynamo + AOT autograd but no inductor code generation; a fresh dynamo cache per test."""
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def gd_closed_form(outer, inner_batch, w0: torch.Tensor, lr: float, steps: int) -> torch.Tensor:
    """w_K = w* + (I − ηH)^K (w_0 − w*) on ridge."""
    w_star, H = ridge_solution(outer, inner_batch)
    contraction = torch.linalg.matrix_power(torch.eye(len(w0), dtype=w0.dtype) - lr * H, steps)
    return w_star["w"] + contraction @ (w0 - w_star["w"])


def heavy_ball(outer, inner_batch, w0: torch.Tensor, lr: float, mu: float, steps: int) -> torch.Tensor:
    """v ← μv + ∇G(w), w ← w − ηv from v = 0, with ∇G(w) = Hw − Xᵀy/n (ridge)."""
    X, y = inner_batch
    _, H = ridge_solution(outer, inner_batch)
    b = X.T @ y / X.shape[0]
    w, v = w0.clone(), torch.zeros_like(w0)
    for _ in range(steps):
        v = mu * v + (H @ w - b)
        w = w - lr * v
    return w


def test_compiled_sgd_loop_matches_the_closed_form_with_inductor():
    """The real backend: compiled GD steps land on w_K of the closed form, and the graph is compiled once.

    Under grad mode the first step runs on the tape, which finds whether anything tracked (φ, a batch, a tensor
    the loss closes over) reaches the loss; nothing does here, so the other 39 run compiled.
    """
    problem, inner, outer, ib, _ = ridge(d=5)
    loop = bilevel.InnerLoop(steps=40, lr=0.3, compile=True)
    before = compiled.compile_stats()
    w, _, losses = loop.run(problem, inner, outer, ib)
    after = compiled.compile_stats()
    assert rel_error(w, {"w": gd_closed_form(outer, ib, inner["w"], 0.3, 40)}) <= 1e-12
    assert after["calls"] - before["calls"] == 39
    assert after["graphs"] - before["graphs"] <= 1  # 0 when an earlier test of this process compiled it
    assert after["compile_seconds"] >= before["compile_seconds"]
    assert losses.shape == (40,) and not losses.requires_grad and not w["w"].requires_grad


def test_a_loss_closing_over_a_tracked_tensor_stays_on_the_tape(aot_eager):
    """A loss that reaches a tensor requiring grad needs the graph: no compiled step, and the gradient flows."""
    problem, inner, outer, ib, _ = ridge(d=5)
    scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    scaled = bilevel.BilevelProblem(lambda i, o, b: scale * problem.inner_loss(i, o, b), problem.outer_loss)
    calls = compiled.compile_stats()["calls"]
    w, _, _ = bilevel.InnerLoop(steps=5, lr=0.3, compile=True).run(scaled, inner, outer, ib)
    assert compiled.compile_stats()["calls"] == calls
    # d w_5 / d scale by central differences in float64 against the tape's derivative
    (dw,) = torch.autograd.grad(w["w"].sum(), scale)
    with torch.no_grad():
        def w5(s):
            sp = bilevel.BilevelProblem(lambda i, o, b: s * problem.inner_loss(i, o, b), problem.outer_loss)
            return bilevel.InnerLoop(steps=5, lr=0.3).run(sp, inner, outer, ib)[0]["w"].sum()
        fd = (w5(1.0 + 1e-6) - w5(1.0 - 1e-6)) / 2e-6
    assert abs(float(dw) - float(fd)) <= 1e-6 * abs(float(fd))


def test_without_grad_mode_every_step_is_compiled(aot_eager):
    problem, inner, outer, ib, _ = ridge(d=5)
    calls = compiled.compile_stats()["calls"]
    with torch.no_grad():
        w, _, _ = bilevel.InnerLoop(steps=10, lr=0.3, compile=True).run(problem, inner, outer, ib)
    assert compiled.compile_stats()["calls"] - calls == 10
    assert rel_error(w, {"w": gd_closed_form(outer, ib, inner["w"], 0.3, 10)}) <= 1e-12


def test_compiled_momentum_loop_matches_the_heavy_ball_recurrence(aot_eager):
    """Momentum: compiled gradient, eager torchopt update; equal to the hand recurrence."""
    problem, inner, outer, ib, _ = ridge(d=5)
    loop = bilevel.InnerLoop(steps=30, optimizer="momentum", lr=0.1, momentum=0.8, compile=True)
    w, _, _ = loop.run(problem, inner, outer, ib)
    assert rel_error(w, {"w": heavy_ball(outer, ib, inner["w"], 0.1, 0.8, 30)}) <= 1e-12


@pytest.mark.parametrize("settings, whole_step", [
    ({"optimizer": "sgd"}, True),                              # θ − ηg as one graph
    ({"optimizer": "sgd", "weight_decay": 0.1}, False),        # torchopt's decayed update stays eager
    ({"optimizer": "momentum", "momentum": 0.8}, False),
])
def test_plain_sgd_compiles_the_whole_step_other_updates_only_the_gradient(aot_eager, monkeypatch, settings,
                                                                           whole_step):
    """Which compiled function runs each step: ``sgd_step`` (gradient and update in one graph) only for plain SGD
    without weight decay, ``grad_and_value_step`` (gradient compiled, update eager) otherwise."""
    seen = []
    for name in ("sgd_step", "grad_and_value_step"):
        original = getattr(compiled, name)
        monkeypatch.setattr(compiled, name, lambda *a, _f=original, _n=name: seen.append(_n) or _f(*a))
    problem, inner, outer, ib, _ = ridge(d=5)
    with torch.no_grad():
        bilevel.InnerLoop(steps=4, lr=0.1, compile=True, **settings).run(problem, inner, outer, ib)
    assert seen == 4 * ["sgd_step" if whole_step else "grad_and_value_step"]


@pytest.mark.parametrize("spec", ["cg:maxiter=50,rtol=1e-12", "neumann:alpha=0.5,terms=400"])
def test_implicit_hypergradient_through_a_compiled_loop_matches_the_closed_form(aot_eager, spec):
    """IFT at the converged compiled iterate equals the closed-form ridge hypergradient; φ gets no graph."""
    problem, inner, outer, ib, ob = ridge(d=5)
    outer = {k: v.requires_grad_(True) for k, v in outer.items()}
    loop = bilevel.InnerLoop(steps=400, lr=0.5, compile=True)
    calls = compiled.compile_stats()["calls"]
    result = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver=spec, loop=loop)
    assert compiled.compile_stats()["calls"] - calls == 400
    assert rel_error(tree_detach(result.hypergrad), ridge_hypergrad(tree_detach(outer), ib, ob)) <= 1e-8


def tree_detach(params):
    return {k: v.detach() for k, v in params.items()}


def test_differentiated_steps_never_take_the_compiled_path(aot_eager):
    """Unrolling differentiates every step: the compiled loop runs no compiled step and equals the closed form."""
    problem, inner, outer, c = quadratic()
    K, lr = 8, 0.1
    loop = bilevel.InnerLoop(steps=K, lr=lr, compile=True)
    calls = compiled.compile_stats()["calls"]
    result = bilevel.hypergrad(problem, inner, outer, inner_batch=c, outer_batch=c, solver="unroll", loop=loop)
    assert compiled.compile_stats()["calls"] == calls
    assert rel_error(result.hypergrad, quadratic_unrolled_hypergrad(outer, inner, c, K, lr)) <= 1e-12


def test_truncated_unroll_compiles_only_its_undifferentiated_prefix(aot_eager):
    """truncate=T: K − T prefix steps compiled, T recorded on the tape; the value is unchanged by compiling."""
    problem, inner, outer, c = quadratic()
    K, T = 12, 4
    eager = bilevel.hypergrad(problem, inner, outer, inner_batch=c, outer_batch=c, solver=f"unroll:truncate={T}",
                              loop=bilevel.InnerLoop(steps=K, lr=0.1))
    calls = compiled.compile_stats()["calls"]
    fast = bilevel.hypergrad(problem, inner, outer, inner_batch=c, outer_batch=c, solver=f"unroll:truncate={T}",
                             loop=bilevel.InnerLoop(steps=K, lr=0.1, compile=True))
    assert compiled.compile_stats()["calls"] - calls == K - T
    assert rel_error(fast.hypergrad, eager.hypergrad) <= 1e-13


def test_new_closures_problems_and_outer_values_reuse_one_graph(aot_eager):
    """Guards: a problem rebuilt each outer step, new φ and θ values: one graph; a smaller batch: one more."""
    graphs = compiled.compile_stats()["graphs"]
    loop = bilevel.InnerLoop(steps=3, lr=0.3, compile=True)
    for seed in range(4):  # ridge() builds new loss closures and new data of the same shapes every call
        problem, inner, outer, ib, _ = ridge(d=5, seed=seed)
        loop.run(problem, inner, outer, ib)
    assert compiled.compile_stats()["graphs"] - graphs == 1
    X, y = ib
    for n in (150, 120, 90):  # the first new shape recompiles with dynamic shapes; the others reuse that graph
        w, _, _ = loop.run(problem, inner, outer, (X[:n], y[:n]))
        assert rel_error(w, {"w": gd_closed_form(outer, (X[:n], y[:n]), inner["w"], 0.3, 3)}) <= 1e-12
    assert compiled.compile_stats()["graphs"] - graphs == 2


def test_a_non_scalar_loss_raises_the_libraries_error_under_compile(aot_eager):
    problem, inner, outer, ib, _ = ridge(d=5)
    bad = bilevel.BilevelProblem(lambda i, o, b: b[0] @ i["w"], problem.outer_loss)
    with pytest.raises(ValueError, match=r"inner_loss must return a scalar .*got shape \(200,\).*\.mean\(\)"):
        bilevel.InnerLoop(steps=2, compile=True).run(bad, inner, outer, ib)


def test_compile_must_be_a_bool():
    with pytest.raises(TypeError, match="InnerLoop.compile must be True or False, got 'yes'"):
        bilevel.InnerLoop(compile="yes")


def test_replace_keeps_the_other_settings():
    loop = dataclasses.replace(bilevel.InnerLoop(steps=7, lr=0.2, optimizer="adam"), compile=True)
    assert (loop.steps, loop.lr, loop.optimizer, loop.compile) == (7, 0.2, "adam", True)


def _rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_bilevel_run_compile_gives_the_eager_runs_metrics(aot_eager, tmp_path, monkeypatch, capsys):
    """``bilevel run ridge --compile``: same outer losses and closed-form errors as without (float32, ≤ 1e-5
    relative), recorded in config.json, and the compile summary printed."""
    monkeypatch.chdir(tmp_path)
    base = ["run", "ridge", "--smoke", "--steps", "3", "--no-progress"]
    assert cli.main([*base, "--out", "eager"]) == 0
    assert cli.main([*base, "--out", "fast", "--compile"]) == 0
    assert "bilevel run: --compile: 150 compiled inner steps" in capsys.readouterr().err
    eager, fast = _rows(tmp_path / "eager"), _rows(tmp_path / "fast")
    for key in ("outer_loss", "rel_error_vs_closed_form"):
        for a, b in zip(eager, fast):
            assert b[key] == pytest.approx(a[key], rel=1e-5)
    assert json.loads((tmp_path / "fast" / "config.json").read_text())["compile"] is True


def test_bilevel_run_compile_on_a_single_level_problem_is_refused_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "erm", "--smoke", "--steps", "2", "--no-progress", "--out", "o", "--compile"]) == 2
    assert ("--compile compiles inner-loop steps, but problem 'erm' is single-level (no inner loop); drop --compile"
            in capsys.readouterr().err)
    assert not (tmp_path / "o").exists()
