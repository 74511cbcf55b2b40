"""ARL: the problem's losses against their definitions, a smoke run, CMA-ES resume, the noise harness."""
import io
from dataclasses import replace

import pytest
import torch

import bilevel
from problems import arl
from problems.losses.taylor import TaylorSpec, initial_theta, loss_range, taylor_polynomial
from problems.noisy_training import average_ranks, load_split, train

torch.set_num_threads(1)

TINY = replace(arl.SMOKE, inner_steps=3, popsize=3)
SOLVER = "cmaes:popsize=3,sigma=0.5,seed=3"


def test_inner_and_outer_loss_match_definitions():
    task = arl.build(TINY, bilevel.local_context(SOLVER))
    inner = task.init_inner(0)
    theta = initial_theta(task.spec, "brier") + 0.1 * torch.arange(12.0)
    batch = task.inner_batch(0)
    raw = TaylorSpec("arl", 4)
    f_min, f_max = loss_range(theta, raw, 10)
    expected = 0.0
    for model, params, (x, y) in zip(task.models, task._split(inner), batch):
        p = torch.func.functional_call(model, params, (x,)).softmax(-1)
        onehot = torch.nn.functional.one_hot(y, 10).float()
        per_sample = taylor_polynomial(p, onehot, theta, raw).mean(-1)          # eq. 3.4
        expected += TINY.eta * (per_sample.mean() - f_min) / (f_max - f_min)   # eq. A.2
    assert float(task.inner_loss(inner, {"theta": theta}, batch)) == pytest.approx(float(expected), rel=1e-5)
    accs = []
    for model, params, (x, y) in zip(task.models, task._split(inner), task.outer_batch):
        accs.append(float((torch.func.functional_call(model, params, (x,)).argmax(-1) == y).float().mean()))
    assert float(task.outer_loss(inner, {"theta": theta}, task.outer_batch)) == pytest.approx(1 - sum(accs) / 2, abs=1e-6)


def test_smoke_run_moves_the_mean_by_the_pseudo_gradient():
    ctx = bilevel.local_context(SOLVER)
    task = arl.build(TINY, ctx)
    start = task.outer["theta"].clone()
    outer, history = bilevel.run_locally(task, ctx, 2)
    assert len(history) == 2 and all(0 <= h["clean_val_acc_mean"] <= 1 for h in history)
    mean = torch.as_tensor(task.solver_state.strategy.mean[:12], dtype=torch.float32)
    assert torch.allclose(outer["theta"], mean, atol=1e-5)   # SGD lr 1 on m_old − m_new lands on the mean
    assert not torch.allclose(outer["theta"], start)
    assert set(task.evaluate(outer, ctx)) == {"clean_val_acc", "descent_raises_true_class"}


def test_resume_gives_the_same_next_generation():
    ctx = bilevel.local_context(SOLVER)
    full = arl.build(TINY, ctx)
    outer, _ = bilevel.run_locally(full, ctx, 1)
    uninterrupted = full.step(outer, ctx, 1)

    first = arl.build(TINY, ctx)
    outer2, _ = bilevel.run_locally(first, ctx, 1)
    buffer = io.BytesIO()
    torch.save({"task": first.state_dict(), "outer": outer2}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed = arl.build(TINY, ctx)
    resumed.load_state_dict(saved["task"])
    again = resumed.step(saved["outer"], ctx, 1)
    assert torch.equal(again.grads["theta"], uninterrupted.grads["theta"])
    assert again.metrics["outer_loss"] == uninterrupted.metrics["outer_loss"]


def test_candidates_go_through_ctx_map():
    calls = []

    def recording_map(fn, items):
        calls.append(len(items))
        return [fn(x) for x in items]

    ctx = bilevel.RunContext(solver_spec=SOLVER, _map=recording_map)
    arl.build(TINY, ctx).step(arl.build(TINY, ctx).outer, ctx, 0)
    assert calls == [3]


def test_bad_config_and_solver():
    with pytest.raises(ValueError, match="condition"):
        arl.build(replace(TINY, condition="both"), bilevel.local_context(SOLVER))
    task = arl.build(TINY, bilevel.local_context(SOLVER))
    with pytest.raises(ValueError, match="cmaes"):
        task.step(task.outer, bilevel.local_context("cg"), 0)


def test_noise_split_and_harness():
    clean = load_split("digits", "symmetric", 0.0, seed=0)
    noisy = load_split("digits", "symmetric", 0.8, seed=0)
    flip = load_split("digits", "pairflip", 0.4, seed=0)
    assert torch.equal(clean.y_train, clean.y_train_clean)
    assert 0.74 < float((noisy.y_train != noisy.y_train_clean).float().mean()) < 0.86
    moved = flip.y_train != flip.y_train_clean
    assert 0.34 < float(moved.float().mean()) < 0.46
    assert torch.equal(flip.y_train[moved], (flip.y_train_clean[moved] + 1) % 10)   # pair-flip c → c + 1
    record = train(torch.nn.functional.cross_entropy, "linear", clean, epochs=3)
    assert len(record.test_acc) == 3 and record.final > 0.6                          # learns clean digits


def test_average_ranks():
    ranks = average_ranks({"a": [0.9, 0.5], "b": [0.8, 0.5], "c": [float("nan"), 0.1]})
    assert ranks == {"a": 1.25, "b": 1.75, "c": 3.0}


def test_initial_mean_and_published_ar_a40_train_above_chance():
    """The CMA-ES starting loss (normalised Brier) and the one sensible published loss (AR-A40, digest E.2)
    train a linear model on clean digits well above chance (10 %)."""
    from problems.losses.taylor import TaylorLoss, published_theta

    clean = load_split("digits", "symmetric", 0.0, seed=0)
    spec = TaylorSpec("arl", 4, normalise=10.0)
    for theta in (initial_theta(spec, "brier"), published_theta("arl_ar_a40")):
        record = train(TaylorLoss(theta, spec), "linear", clean, epochs=4)
        assert record.final > 0.5
