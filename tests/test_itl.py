"""The ITL problem (problems/itl.py): its LODO hypergradient against finite differences of the
trained-then-evaluated held-out loss and against other solvers; a smoke run of the whole problem."""
import dataclasses
import pickle

import pytest
import torch

import bilevel
from problems import itl

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def _tiny_domains(dtype=torch.float64):
    """Three rotated-digit domains, 24 images each (8×8): a convex instance with softmax regression."""
    doms = itl.load_domains("rotated_digits", (0, 30, 60), 24, seed=0, cache_dir=False)
    return {k: (x.to(dtype), y) for k, (x, y) in doms.items()}


# softmax regression + L2, full-batch GD to convergence: θ*(ω) is unique and smooth, so the IFT
# hypergradient must equal the derivative of the trained-then-evaluated held-out CE.
CONVEX = dataclasses.replace(itl.SMOKE, hidden=0, l2=0.2, inner_batch=0, inner_lr=2.0, inner_steps=200,
                             damping=0.0, power_iterations=20, init="brier")


def _trained_value(task, omega, held_out, seed):
    source, target = task.split(held_out)
    theta = {k: v.to(torch.float64) for k, v in itl.fresh_params(task.model, seed).items()}
    theta, _, _ = task.loop().run(task.problem, theta, {"omega": omega}, task.minibatches(source, seed))
    return float(task.outer_loss(theta, None, target))


def test_hypergradient_matches_finite_differences_and_cg():
    ctx = bilevel.local_context("cg:maxiter=200,rtol=1e-12")
    task = itl.ITLTask(CONVEX, ctx, domains=_tiny_domains())
    omega = task.outer["omega"].to(torch.float64)
    omega = omega + 0.1 * torch.randn(12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    outer = {"omega": omega}
    run = task.held_out_run(outer, ctx, step=0, held_out=1)
    assert run["metrics"]["inner_grad_norm"] < 1e-5  # the IFT premise holds at θ*
    seed = task._seed(ctx, 0, 1)
    # central differences along 4 random unit directions (each costs two trainings)
    eps = 1e-5
    dirs = torch.randn(4, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    fd = torch.tensor([(_trained_value(task, omega + eps * d, 1, seed) - _trained_value(task, omega - eps * d, 1, seed))
                       / (2 * eps) for d in dirs], dtype=torch.float64)
    g = run["grad"].to(torch.float64)
    assert float((dirs @ g - fd).norm() / fd.norm()) < 1e-4
    # The paper's 15-term Neumann series (auto α = 1/λ_max) equals the same series built from the dense
    # Hessian and mixed-partial matrices: −Jᵀ α Σ_{j<15} (I − αH)^j ∇_θF.
    short = task.held_out_run(outer, bilevel.local_context("neumann"), step=0, held_out=1)
    alpha = short["metrics"]["neumann_alpha"]
    assert alpha == pytest.approx(1 / short["metrics"]["lambda_max"])
    source, target = task.split(1)
    theta = {k: v.to(torch.float64) for k, v in itl.fresh_params(task.model, seed).items()}
    theta, _, _ = task.loop().run(task.problem, theta, outer, task.minibatches(source, seed))
    flat0 = bilevel.tree.flatten(theta)
    unflat = lambda v: bilevel.tree.unflatten(v, theta)
    G = lambda v, w: task.problem.inner(unflat(v), {"omega": w}, source)
    H = torch.func.hessian(G)(flat0, omega)
    J = torch.func.jacfwd(torch.func.grad(G), argnums=1)(flat0, omega)
    b = torch.func.grad(lambda v: task.outer_loss(unflat(v), None, target))(flat0)
    x, term = b.clone(), b.clone()
    for _ in range(14):
        term = term - alpha * H @ term
        x = x + term
    dense = -J.T @ (alpha * x)
    torch.testing.assert_close(short["grad"].double(), dense, rtol=1e-5, atol=1e-9)
    # ... and the converged dense solve equals CG
    torch.testing.assert_close(-J.T @ torch.linalg.solve(H, b), g, rtol=1e-6, atol=1e-9)


def test_damping_keeps_stationary_point_and_shifts_hessian():
    ctx = bilevel.local_context("exact")
    task = itl.ITLTask(CONVEX, ctx, domains=_tiny_domains())
    source, _ = task.split(0)
    theta = {k: v.to(torch.float64) for k, v in itl.fresh_params(task.model, 3).items()}
    outer = {"omega": task.outer["omega"].double()}
    damped = task.damped(theta, 0.7)
    g0 = torch.func.grad(task.problem.inner)(theta, outer, source)
    g1 = torch.func.grad(damped.inner)(theta, outer, source)
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k])
    v = {k: torch.randn_like(p) for k, p in theta.items()}
    h0 = bilevel.hvp_operator(lambda t: task.problem.inner(t, outer, source), theta)(v)
    h1 = bilevel.hvp_operator(lambda t: damped.inner(t, outer, source), theta)(v)
    for k in v:
        torch.testing.assert_close(h1[k], h0[k] + 0.7 * v[k])


def test_lodo_step_combines_per_domain_hypergradients_with_pcgrad():
    from problems.gradient_surgery import combine_gradients
    ctx = bilevel.local_context("cg:maxiter=100")
    task = itl.ITLTask(dataclasses.replace(CONVEX, inner_steps=50), ctx, domains=_tiny_domains())
    outer = {"omega": task.outer["omega"].double()}
    out = task.step(outer, ctx, step=2)
    runs = [task.held_out_run(outer, ctx, 2, i) for i in range(3)]
    expected = combine_gradients([{"omega": r["grad"]} for r in runs], "pcgrad", seed=task._seed(ctx, 2, 0))
    torch.testing.assert_close(out.grads["omega"], expected["omega"])
    assert set(out.metrics) >= {"outer_loss", "held_out_accuracy", "conflicting_pairs", "held_out_accuracy/30"}
    mean_task = itl.ITLTask(dataclasses.replace(CONVEX, inner_steps=50, combine="mean"), ctx, domains=_tiny_domains())
    mean = mean_task.step(outer, ctx, step=2).grads["omega"]
    torch.testing.assert_close(mean, torch.stack([r["grad"] for r in runs]).mean(0).to(mean.dtype))


def test_smoke_run_of_the_whole_problem(tmp_path):
    """Build from data, two outer steps through run_locally, the meta-test, a picklable state."""
    cfg = dataclasses.replace(itl.SMOKE, cache_dir=str(tmp_path / "cache"))
    ctx = bilevel.local_context(itl.DEFAULT_SOLVER)
    task = itl.build(cfg, ctx)
    outer, history = bilevel.run_locally(task, ctx, steps=2)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["outer_loss"])) for h in history)
    assert not torch.equal(outer["omega"], task.outer["omega"])
    metrics = task.evaluate(outer, ctx)
    assert 0.0 <= metrics["learned/target_accuracy"] <= 1.0 and "ce/in_domain_accuracy" in metrics
    torch.save(task.state_dict(), tmp_path / "state.pt")
    task.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    assert task.check_instance()["outer"]["omega"].shape == (12,)


@pytest.mark.parametrize("spec", ["unroll:truncate=5", "forward", "cmaes:popsize=4,sigma=0.5,seed=1"])
def test_other_solvers_run(spec):
    ctx = bilevel.local_context(spec)
    task = itl.ITLTask(dataclasses.replace(itl.SMOKE, inner_steps=8), ctx, domains=_tiny_domains(torch.float32))
    out = task.step({"omega": task.outer["omega"]}, ctx, step=0)
    assert out.grads["omega"].shape == (12,) and bool(torch.isfinite(out.grads["omega"]).all())
    pickle.dumps(task.state_dict())


def test_meta_test_runs_on_a_domainbed_folder(tmp_path):
    """The meta-test reads a user's real PACS/VLCS-style folder through the folder loader (generated tree)."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for domain in ("art", "photo", "sketch"):
        for cls in ("dog", "horse"):
            folder = tmp_path / "pacs" / domain / cls
            folder.mkdir(parents=True)
            for i in range(4):
                pixels = (torch.rand(20, 24, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    cfg = dataclasses.replace(itl.SMOKE, test_arch="cnn", test_steps=3, cache_dir=str(tmp_path / "cache"))
    spec = itl.TaylorSpec("itl", 4)
    m = itl.meta_test(itl.initial_theta(spec, "brier"), spec, cfg, dataset=f"folder:{tmp_path / 'pacs'}", seeds=1)
    assert 0.0 <= m["learned/target_accuracy"] <= 1.0 and 0.0 <= m["ce/target_accuracy"] <= 1.0


def test_bad_config_raises():
    ctx = bilevel.local_context("cg")
    with pytest.raises(ValueError, match="combine must be"):
        itl.ITLTask(dataclasses.replace(itl.SMOKE, combine="sum"), ctx, domains=_tiny_domains())
    with pytest.raises(ValueError, match="at least 2"):
        itl.ITLTask(itl.SMOKE, ctx, domains=dict(list(_tiny_domains().items())[:1]))
    with pytest.raises(ValueError, match="unknown dataset"):
        itl.load_domains("pacs", (0,), None, 0)
