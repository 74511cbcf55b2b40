"""The metamd problem (problems/metamd.py): smoke runs, meta-gradients against FD, the convergence counter."""
import dataclasses
import io

import pytest
import torch

import bilevel
from problems import metamd
from problems import mirror_descent as md

torch.set_num_threads(1)


@pytest.mark.parametrize("solver", ["unroll", "forward"])
def test_quadratic_smoke_and_metagradient_check(solver):
    ctx = bilevel.local_context(solver)
    task = metamd.build(metamd.SMOKE, ctx)
    report = bilevel.check(**task.check_instance(), solver=solver, reference="unroll", verbose=False)
    assert report.fd_rel_error < 1e-6 and report.ref_rel_error < 1e-10
    outer, history = bilevel.run_locally(task, ctx, 3)
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(h["outer_loss"])) for h in history)
    assert not torch.equal(outer["x:s"], task.outer["x:s"])  # φ moved
    ev = task.evaluate(outer, ctx)
    assert set(ev) == {"metamd_median_iterations", "gd_same_lr_median_iterations"}


def test_quadratic_metagrad_modes_relate_as_derived():
    """envelope = the T→∞ meta-gradient; eq528 as printed = 3 × its Bregman part (k = reg = 0)."""
    cfg = dataclasses.replace(metamd.SMOKE, k=0.0, inner_steps=3000, inner_lr=0.05)
    ctx = bilevel.local_context("unroll")
    env = metamd.build(dataclasses.replace(cfg, metagrad="envelope"), ctx)
    printed = metamd.build(dataclasses.replace(cfg, metagrad="eq528"), ctx)
    phi = {"x:s": torch.tensor([0.1, -0.2], dtype=torch.float64)}
    theta1, data = env._instance(0, None, 0)
    g_env, _ = env.metagrad(phi, theta1, data, "unroll")
    g_528, _ = printed.metagrad(phi, theta1, data, "unroll")
    assert torch.allclose(g_528["x:s"], 3 * g_env["x:s"], rtol=1e-10)
    # after 3000 steps these tasks have converged: the exact T-step meta-gradient equals the envelope one
    g_unroll, _ = metamd.build(dataclasses.replace(cfg, metagrad="fmd"), ctx).metagrad(phi, theta1, data, "")
    assert torch.allclose(g_unroll["x:s"], g_env["x:s"], rtol=1e-3)  # up to the unconverged remainder


def test_closed_form_fmd_equals_library_solvers():
    cfg = dataclasses.replace(metamd.SMOKE, inner_steps=60, reg=0.3, k=0.02)
    task = metamd.build(cfg, bilevel.local_context("forward"))
    phi = {"x:s": torch.tensor([0.3, -0.4], dtype=torch.float64)}
    theta1, data = task._instance(5, None, 1)
    lib, _ = task.metagrad(phi, theta1, data, "forward")
    fmd, metrics = metamd.build(dataclasses.replace(cfg, metagrad="fmd"), bilevel.local_context("forward")
                                ).metagrad(phi, theta1, data, "forward")
    assert torch.allclose(fmd["x:s"], lib["x:s"], rtol=1e-10)
    theta_t, _ = md.md_run(metamd.quadratic_loss, task.mmap, phi, theta1, data, 60, cfg.inner_lr)
    expected = md.meta_objective(task.mmap, phi, theta_t, theta1, k=0.02, reg=0.3) \
        - (1 - 1 / cfg.tasks_per_step) * md.bregman(task.mmap, phi, theta_t, theta1)
    assert abs(metrics["outer_loss"] - float(expected)) < 1e-10


def test_iterations_to_threshold_matches_closed_form():
    """Gradient descent on diagonal Q from 0: ∇_t = −b(1 − 2ηq)^t, so the count is exact per coordinate."""
    q = torch.diag_embed(torch.tensor([[2.0, 0.5], [1.0, 0.25]], dtype=torch.float64))
    b = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    lr, thr = 0.1, 1e-3
    iters = metamd.iterations_to_threshold(q, b, lambda th, g, s, t: (th - lr * g, s), thr, 10_000)
    rate = (1 - 2 * lr * torch.tensor([2.0, 0.25], dtype=torch.float64)).abs()
    norms = torch.tensor([1.0, 2.0], dtype=torch.float64)
    expected = torch.ceil(torch.log(thr / norms) / torch.log(rate)).long()
    assert torch.equal(iters, expected)
    # a diverging step size counts max_iters
    div = metamd.iterations_to_threshold(q, b, lambda th, g, s, t: (th - 5.0 * g, s), thr, 500)
    assert torch.equal(div, torch.tensor([500, 500]))


@pytest.fixture
def digits_cfg(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return dataclasses.replace(metamd.SMOKE_DIGITS, cache_dir=str(tmp_path))


def test_digits_smoke_metagradient_and_state(digits_cfg):
    ctx = bilevel.local_context("unroll")
    task = metamd.build(digits_cfg, ctx)
    assert task.train_domains == ["45", "90"]
    report = bilevel.check(**task.check_instance(), solver="unroll", reference="forward", verbose=False,
                           max_directions=8)
    assert report.fd_rel_error < 1e-5 and report.ref_rel_error < 1e-8
    outer, history = bilevel.run_locally(task, ctx, 2)
    assert all(set(h) >= {"outer_loss", "inner_loss", "min_eigenvalue"} for h in history)
    ev = task.evaluate(outer, ctx)
    assert 0.0 <= ev["metamd_test_accuracy"] <= 1.0 and ev["gd_same_lr_final_train_loss"] > 0
    buffer = io.BytesIO()
    torch.save(task.state_dict(), buffer)
    buffer.seek(0)
    task.load_state_dict(torch.load(buffer))
    # the learned map plugs into the drop-in optimiser
    opt = md.MirrorDescent(task.model.named_parameters(), task.mmap, outer, lr=0.1)
    assert opt.phi.keys() == outer.keys()


def test_bad_config_raises(digits_cfg):
    ctx = bilevel.local_context("unroll")
    with pytest.raises(ValueError, match="unknown family"):
        metamd.build(dataclasses.replace(metamd.SMOKE, family="cifar"), ctx)
    with pytest.raises(ValueError, match="unknown metagrad"):
        metamd.build(dataclasses.replace(metamd.SMOKE, metagrad="magic"), ctx)
    with pytest.raises(ValueError, match="not a domain"):
        metamd.build(dataclasses.replace(digits_cfg, holdout="33"), ctx)


def test_divergent_inner_loop_gives_zero_step_and_large_gradients_are_clipped():
    ctx = bilevel.local_context("unroll")
    bad = metamd.build(dataclasses.replace(metamd.SMOKE, metagrad="fmd", inner_lr=50.0, inner_steps=400), ctx)
    out = bad.step(bad.outer, ctx, 0)
    assert out.metrics["diverged"] == 1.0 and all(torch.equal(g, torch.zeros_like(g)) for g in out.grads.values())
    task = metamd.build(dataclasses.replace(metamd.SMOKE, metagrad="fmd", clip=1e-3), ctx)
    out = task.step(task.outer, ctx, 0)
    norm = float(torch.sqrt(sum((g ** 2).sum() for g in out.grads.values())))
    assert out.metrics["metagrad_norm"] > 1e-3 and abs(norm - 1e-3) < 1e-12
