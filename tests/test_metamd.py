"""The metamd problem (problems/metamd.py): its declaration, meta-gradients against exact values, the counter."""
import dataclasses

import pytest
import torch

import bilevel
from bilevel.problems import metamd
from bilevel.problems import mirror_descent as md

torch.set_num_threads(1)


def flat(g: dict) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in g.values()]).double()


def check_first_subproblem(decl: bilevel.Nested, solver: str, reference: str, **kw) -> bilevel.CheckReport:
    sub = decl.first_subproblem(0)
    return bilevel.check(decl.problem, sub.inner, decl.outer, inner_batch=sub.inner_batch,
                         outer_batch=sub.outer_batch, loop=decl.loop, solver=solver, reference=reference,
                         verbose=False, **kw)


@pytest.mark.parametrize("solver", ["unroll", "forward"])
def test_quadratic_smoke_metagradient_check(solver):
    decl = metamd.build(metamd.SMOKE, bilevel.local_context())
    assert isinstance(decl, bilevel.Nested) and decl.default_solver == "unroll"
    assert [s.key for s in decl.subproblems(bilevel.StepInfo(0))] == ["0"]
    report = check_first_subproblem(decl, solver, "unroll")
    assert report.fd_rel_error < 1e-6 and report.ref_rel_error < 1e-10


def test_forward_run_equals_the_unroll_run():
    """``forward`` and ``unroll`` are both the exact derivative of the same 20-step loop, so three outer (Adam)
    steps with either land on the same φ up to float64 rounding (measured 3e-17, while φ moves 0.13)."""
    decl = metamd.build(metamd.SMOKE, bilevel.local_context())
    runs = {solver: bilevel.run_locally(decl, 3, solver) for solver in ("unroll", "forward")}
    (phi_u, hist_u, loop_u), (phi_f, hist_f, _) = runs["unroll"], runs["forward"]
    moved = float((phi_u["x:s"] - decl.outer["x:s"]).abs().max())
    assert moved > 0.05
    assert float((phi_f["x:s"] - phi_u["x:s"]).abs().max()) < 1e-12 * max(1.0, moved)
    for h_u, h_f in zip(hist_u, hist_f):
        for key in ("outer_loss", "inner_loss", "outer_grad_norm"):
            assert h_f[key] == pytest.approx(h_u[key], rel=1e-12, abs=1e-15), key
    assert len(hist_u) == len(hist_f) == 3
    # the logged map metrics are those of φ at each step: step 0 is φ₀ = 0, i.e. M = I
    assert hist_u[0]["min_eigenvalue"] == 1.0 and hist_u[0]["distance_to_identity_sq"] == 0.0
    assert set(loop_u.evaluate()) == {"metamd_median_iterations", "gd_same_lr_median_iterations"}


def test_quadratic_metagrad_modes_relate_as_derived():
    """envelope = the T→∞ meta-gradient; eq528 as printed = 3 × its Bregman part (k = reg = 0)."""
    cfg = dataclasses.replace(metamd.SMOKE, k=0.0, inner_steps=3000, inner_lr=0.05)
    ctx = bilevel.local_context()
    phi = {"x:s": torch.tensor([0.1, -0.2], dtype=torch.float64)}
    info = bilevel.StepInfo(0, 0)
    g_env, _ = metamd.build(dataclasses.replace(cfg, metagrad="envelope"), ctx).gradient(phi, info)
    g_528, _ = metamd.build(dataclasses.replace(cfg, metagrad="eq528"), ctx).gradient(phi, info)
    assert torch.allclose(g_528["x:s"], 3 * g_env["x:s"], rtol=1e-10)
    # after 3000 steps these tasks have converged: the exact T-step meta-gradient equals the envelope one
    g_unroll, _ = metamd.build(dataclasses.replace(cfg, metagrad="fmd"), ctx).gradient(phi, info)
    assert torch.allclose(g_unroll["x:s"], g_env["x:s"], rtol=1e-3)  # up to the unconverged remainder


def test_closed_form_fmd_equals_the_outer_loops_solver_gradient():
    """OuterLoop.gradient(step) of the nested declaration (``forward``) = quadratic_fmd on the step's tasks,
    drawn by hand from (seed, step); the SingleLevel fmd declaration gives the same and E's value."""
    cfg = dataclasses.replace(metamd.SMOKE, inner_steps=60, reg=0.3, k=0.02)
    phi = {"x:s": torch.tensor([0.3, -0.4], dtype=torch.float64)}
    seed, step = 1, 5
    ctx = bilevel.local_context(seed=seed)
    q, b = metamd.sample_quadratics(cfg, cfg.tasks_per_step, seed * 100_003 + step)
    exact, _ = metamd.quadratic_fmd(cfg, phi["x:s"], q, b)
    decl = dataclasses.replace(metamd.build(cfg, ctx), outer=phi)
    lib, metrics = bilevel.OuterLoop(decl, "forward", ctx).gradient(step)
    assert metrics["outer_grad_norm"] < cfg.clip  # not clipped
    assert torch.allclose(lib["x:s"], exact, rtol=1e-10)
    fmd, fmd_metrics = metamd.build(dataclasses.replace(cfg, metagrad="fmd"), ctx).gradient(
        phi, bilevel.StepInfo(step, seed))
    assert torch.allclose(fmd["x:s"], exact, rtol=1e-12)
    mmap = md.DiagonalMap({"x": torch.Size([2])})
    theta1 = {"x": torch.zeros_like(b)}
    theta_t, _ = md.md_run(metamd.quadratic_loss, mmap, phi, theta1, (q, b), 60, cfg.inner_lr)
    expected = md.meta_objective(mmap, phi, theta_t, theta1, k=0.02, reg=0.3) \
        - (1 - 1 / cfg.tasks_per_step) * md.bregman(mmap, phi, theta_t, theta1)
    assert abs(fmd_metrics["outer_loss"] - float(expected)) < 1e-10
    assert abs(metrics["outer_loss"] - float(expected)) < 1e-10


def test_closed_form_modes_refuse_a_solver_and_quadratics_refuse_online():
    ctx = bilevel.local_context()
    for metagrad in ("fmd", "envelope", "eq528"):
        decl = metamd.build(dataclasses.replace(metamd.SMOKE, metagrad=metagrad), ctx)
        assert isinstance(decl, bilevel.SingleLevel) and metagrad in decl.kind
        with pytest.raises(bilevel.SpecError, match="single-level"):
            bilevel.OuterLoop(decl, "unroll", ctx)
    with pytest.raises(bilevel.SpecError, match="onestep"):
        bilevel.OuterLoop(metamd.build(metamd.SMOKE, ctx), "onestep", ctx)


def test_resumed_run_equals_uninterrupted_run():
    """Everything random is drawn from (seed, step): 1 + 2 steps through a checkpoint = 3 steps, bitwise."""
    ctx = bilevel.local_context(seed=4)
    decl = metamd.build(metamd.SMOKE, ctx)
    straight, history, _ = bilevel.run_locally(decl, 3, ctx=ctx)
    first = bilevel.OuterLoop(decl, None, ctx)
    first.run(1)
    resumed = bilevel.OuterLoop(metamd.build(metamd.SMOKE, ctx), None, ctx)
    resumed.load_state_dict(first.state_dict())
    tail = resumed.run(3)
    assert torch.equal(resumed.outer["x:s"].detach(), straight["x:s"]) and tail == history[1:]


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


def test_digits_smoke_metagradient_and_solvers(digits_cfg):
    ctx = bilevel.local_context()
    decl = metamd.build(digits_cfg, ctx)
    assert [s.key for s in decl.subproblems(bilevel.StepInfo(0))] == ["45", "90"]
    report = check_first_subproblem(decl, "unroll", "forward", max_directions=8)
    assert report.fd_rel_error < 1e-5 and report.ref_rel_error < 1e-8
    with pytest.raises(bilevel.SpecError, match="quadratic"):  # implicit solvers: quadratic family only
        bilevel.OuterLoop(decl, "cg", ctx)
    outer, history, loop = bilevel.run_locally(decl, 2)
    assert all(set(h) >= {"outer_loss", "inner_loss", "min_eigenvalue", "min_eigenvalue/45"} for h in history)
    ev = loop.evaluate()
    assert 0.0 <= ev["metamd_test_accuracy"] <= 1.0 and ev["gd_same_lr_final_train_loss"] > 0
    # the learned map plugs into the drop-in optimiser
    fam = metamd.family_of(digits_cfg)
    opt = md.MirrorDescent(fam.model.named_parameters(), fam.mmap, outer, lr=0.1)
    assert opt.phi.keys() == outer.keys()


def test_digits_outer_gradient_is_the_clipped_mean_of_the_rotations(digits_cfg):
    """OuterLoop.gradient(0) = clip(mean over training rotations of dE/dφ), the clip acting on the mean.

    Reference: float64 reverse mode through the plain MD loop (md.metagrad_reverse), with θ_1 drawn by
    hand from seed·100003 + i. γ = 0 so the rotations' meta-gradients differ (cosine ≈ 0.46): clipping
    each before averaging would then give a vector 20% away."""
    cfg = dataclasses.replace(digits_cfg, reg=0.0)
    fam, seed = metamd.family_of(cfg), 3
    to64 = lambda t: {k: v.double() for k, v in t.items()}  # noqa: E731
    per_item = []
    for i, item in enumerate(fam.items):
        theta1 = metamd.init_params(fam.model, seed * 100_003 + i)
        x, y = fam.domains[item][:2]
        g, *_ = md.metagrad_reverse(fam.loss, fam.mmap, to64(fam.outer), to64(theta1), (x.double(), y),
                                    cfg.inner_steps, cfg.inner_lr, cfg.k, cfg.reg)
        per_item.append(flat(g))
    mean = torch.stack(per_item).mean(0)
    clip = 0.5 * float(mean.norm())
    ctx = bilevel.local_context(seed=seed)
    got, metrics = bilevel.OuterLoop(metamd.build(dataclasses.replace(cfg, clip=clip), ctx), None, ctx).gradient(0)
    expected = mean * (clip / mean.norm())
    assert float((flat(got) - expected).norm() / expected.norm()) < 1e-5
    assert abs(metrics["outer_grad_norm"] / float(mean.norm()) - 1) < 1e-5 and metrics["clipped"] == 1.0
    per_item_clipped = torch.stack([g * min(1.0, clip / float(g.norm())) for g in per_item]).mean(0)
    assert float((per_item_clipped - expected).norm() / expected.norm()) > 0.1


def test_bad_config_raises(digits_cfg):
    ctx = bilevel.local_context()
    with pytest.raises(ValueError, match="unknown family"):
        metamd.build(dataclasses.replace(metamd.SMOKE, family="cifar"), ctx)
    with pytest.raises(ValueError, match="unknown metagrad"):
        metamd.build(dataclasses.replace(metamd.SMOKE, metagrad="magic"), ctx)
    with pytest.raises(ValueError, match="quadratic family"):
        metamd.build(dataclasses.replace(digits_cfg, metagrad="fmd"), ctx)
    with pytest.raises(ValueError, match="not a domain"):
        metamd.build(dataclasses.replace(digits_cfg, holdout="33"), ctx)


def test_divergent_inner_loop_gives_zero_step_and_large_gradients_are_clipped():
    ctx = bilevel.local_context()
    bad = metamd.build(dataclasses.replace(metamd.SMOKE, metagrad="fmd", inner_lr=50.0, inner_steps=400), ctx)
    grads, metrics = bilevel.OuterLoop(bad, None, ctx).gradient(0)
    assert metrics["skipped"] == 1.0 and all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())
    decl = metamd.build(dataclasses.replace(metamd.SMOKE, metagrad="fmd", clip=1e-3), ctx)
    raw, _ = decl.gradient(decl.params, bilevel.StepInfo(0))
    grads, metrics = bilevel.OuterLoop(decl, None, ctx).gradient(0)
    norm = float(raw["x:s"].norm())
    assert metrics["outer_grad_norm"] == pytest.approx(norm, rel=1e-14) and norm > 1e-3
    assert torch.allclose(grads["x:s"], raw["x:s"] * (1e-3 / norm), rtol=1e-14, atol=0)
