"""The ITL problem (problems/itl.py): its LODO sub-problems, its hypergradients against finite differences,
dense solves and other solvers, the outer loop's PCGrad and CMA-ES steps, a smoke run and the meta-test."""
import dataclasses
import math

import cma
import numpy as np
import pytest
import torch

import bilevel
from bilevel.problems import itl

torch.set_num_threads(1)

DAMPED = "damping=0.1,relative_damping=true"  # the default solver's damping, for the reference solves


@pytest.fixture(autouse=True)
def _offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def _domains(per_domain: int, dtype=torch.float64):
    """Three rotated-digit domains (8×8), ``per_domain`` images each, in ``dtype``."""
    doms = itl.load_domains("rotated_digits", (0, 30, 60), per_domain, seed=0, cache_dir=False)
    return {k: (x.to(dtype), y) for k, (x, y) in doms.items()}


# softmax regression + L2, full-batch GD to convergence: θ*(ω) is unique and smooth, so the IFT
# hypergradient must equal the derivative of the trained-then-evaluated held-out CE.
CONVEX = dataclasses.replace(itl.SMOKE, hidden=0, l2=0.2, inner_batch=0, inner_lr=2.0, inner_steps=200, init="brier")


def _model(cfg, domains):
    x, _ = next(iter(domains.values()))
    return itl.make_model("mlp", tuple(x.shape[1:]), cfg.hidden, 10)


def _dense(decl, theta, omega, source, target):
    """H = ∂²G/∂θ², J = ∂²G/∂θ∂ω (n × 12) and b = ∇_θF at θ, as dense float64 matrices."""
    flat0 = bilevel.tree.flatten(theta)
    unflat = lambda v: bilevel.tree.unflatten(v, theta)
    G = lambda v, w: decl.problem.inner(unflat(v), {"omega": w}, source)
    H = torch.func.hessian(G)(flat0, omega)
    J = torch.func.jacfwd(torch.func.grad(G), argnums=1)(flat0, omega)
    b = torch.func.grad(lambda v: decl.problem.outer(unflat(v), None, target))(flat0)
    return H, J, b


def _neumann(H, b, alpha, terms=15):
    """α Σ_{j<terms} (I − αH)^j b."""
    x, term = b.clone(), b.clone()
    for _ in range(terms - 1):
        term = term - alpha * H @ term
        x = x + term
    return alpha * x


def _power_iteration(H, like, iterations=20, seed=0):
    """λ̂_max as documented for alpha=auto: ``iterations`` power-method steps on the dense H from a start drawn
    with torch.randn leaf by leaf (in the inner params' key order) from a generator seeded ``seed``; the
    Rayleigh quotient vᵀHv of the last normalised iterate."""
    gen = torch.Generator().manual_seed(seed)
    v = torch.cat([torch.randn(t.shape, generator=gen, dtype=t.dtype).reshape(-1) for t in like.values()])
    estimate = None
    for _ in range(iterations):
        v = v / v.norm()
        hv = H @ v
        estimate, v = float(v @ hv), hv
    return estimate


def test_subproblems_are_lodo_runs_of_seeded_fresh_networks():
    cfg = dataclasses.replace(itl.SMOKE, inner_steps=5, inner_batch=4)
    doms = _domains(6)
    decl = itl.build(cfg, bilevel.local_context(), domains=doms)
    model = _model(cfg, doms)
    assert itl.network_seed(3, 2, 1) == 3 * 1_000_003 + 2 * 101 + 1  # the seed rule of the Task version
    subs = decl.subproblems(bilevel.StepInfo(step=2, seed=3))
    assert [s.key for s in subs] == ["0", "30", "60"]
    for i, sub in enumerate(subs):
        held_out = list(doms)[i]
        others = [doms[n] for n in doms if n != held_out]
        x_src, y_src = torch.cat([x for x, _ in others]), torch.cat([y for _, y in others])
        seed = itl.network_seed(3, 2, i)
        for k, v in itl.fresh_params(model, seed).items():
            assert torch.equal(sub.inner[k], v.double())
        assert torch.equal(sub.outer_batch[0], doms[held_out][0])
        idx = torch.randint(0, 12, (5, 4), generator=torch.Generator().manual_seed(seed))
        for k in range(5):  # seeded minibatches, then the full source set at k = inner_steps
            x, y = sub.inner_batch(k)
            assert torch.equal(x, x_src[idx[k]]) and torch.equal(y, y_src[idx[k]])
        assert torch.equal(sub.inner_batch(5)[0], x_src) and torch.equal(sub.inner_batch(5)[1], y_src)
    again = decl.subproblems(bilevel.StepInfo(step=2, seed=3))
    assert all(torch.equal(a.inner[k], b.inner[k]) for a, b in zip(subs, again) for k in a.inner)
    later = decl.subproblems(bilevel.StepInfo(step=3, seed=3))
    assert not torch.equal(later[0].inner["1.weight"], subs[0].inner["1.weight"])  # a fresh network per step


def test_ift_hypergradient_matches_finite_differences_and_dense_solves():
    decl = itl.build(CONVEX, bilevel.local_context(), domains=_domains(24))
    sub = decl.subproblems(bilevel.StepInfo(0))[1]
    omega = decl.outer["omega"].double() + 0.1 * torch.randn(12, generator=torch.Generator().manual_seed(0),
                                                             dtype=torch.float64)
    outer = {"omega": omega}
    cg = "cg:maxiter=200,rtol=1e-12"
    result = bilevel.hypergrad(decl.problem, sub.inner, outer, inner_batch=sub.inner_batch,
                               outer_batch=sub.outer_batch, solver=cg, loop=decl.loop)
    assert decl.metrics(sub, result, outer)["inner_grad_norm"] < 1e-5  # the IFT premise holds at θ_K
    # central differences of the trained-then-evaluated held-out CE along 4 random unit directions
    report = bilevel.check(decl.problem, sub.inner, outer, inner_batch=sub.inner_batch, outer_batch=sub.outer_batch,
                           loop=decl.loop, solver=cg, reference="exact", eps=1e-5, max_directions=4, verbose=False)
    assert report.fd_rel_error < 1e-4 and report.ref_rel_error < 1e-8
    # The paper's 15-term series with auto α = 1/λ̂_max equals the same series built from the dense
    # Hessian and mixed-partial matrices: −Jᵀ α Σ_{j<15} (I − αH)^j ∇_θF; the converged solve equals CG.
    short = bilevel.hypergrad(decl.problem, sub.inner, outer, inner_batch=sub.inner_batch,
                              outer_batch=sub.outer_batch, solver="neumann", loop=decl.loop)
    # α comes from the dense Hessian, not from the diagnostics under test: λ̂ by the documented 20-step power
    # iteration on H itself, bounded by the exact λ_max (eigvalsh, float64).
    H, J, b = _dense(decl, short.inner, omega, sub.inner_batch(decl.loop.steps), sub.outer_batch)
    lam_hat, true_max = _power_iteration(H, short.inner), float(torch.linalg.eigvalsh(H)[-1])
    assert 0.95 * true_max < lam_hat <= true_max * (1 + 1e-12)
    assert short.diagnostics["lambda_max"] == pytest.approx(lam_hat, rel=1e-9)  # HVPs vs the dense H: rounding
    assert short.diagnostics["alpha"] == pytest.approx(1 / lam_hat, rel=1e-9)
    torch.testing.assert_close(short.hypergrad["omega"], -J.T @ _neumann(H, b, 1 / lam_hat), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(-J.T @ torch.linalg.solve(H, b), result.hypergrad["omega"], rtol=1e-6, atol=1e-9)


def test_default_solver_is_the_damped_series_with_auto_alpha():
    """The default spec is the old Config default: δ = 0.1·λ̂_max, α = 1/(λ̂_max + δ), 15 terms on H + δI."""
    decl = itl.build(itl.SMOKE, bilevel.local_context(), domains=_domains(40))
    sub = decl.first_subproblem(0)
    outer = {"omega": decl.outer["omega"].double()}
    out = bilevel.hypergrad(decl.problem, sub.inner, outer, inner_batch=sub.inner_batch,
                            outer_batch=sub.outer_batch, solver=itl.DEFAULT_SOLVER, loop=decl.loop)
    H, J, b = _dense(decl, out.inner, outer["omega"], sub.inner_batch(decl.loop.steps), sub.outer_batch)
    # the reference's λ̂, δ and α are computed from the dense float64 Hessian, never read from the diagnostics
    lam, true_max = _power_iteration(H, out.inner), float(torch.linalg.eigvalsh(H)[-1])
    assert 0.95 * true_max < lam <= true_max * (1 + 1e-12)  # 20 power iterations: a lower bound (measured 1.2 % low)
    delta, alpha = 0.1 * lam, 1 / (1.1 * lam)
    for key, value in (("lambda_max", lam), ("damping", delta), ("alpha", alpha)):
        assert out.diagnostics[key] == pytest.approx(value, rel=1e-9), key  # HVPs vs the dense H: rounding
    damped = H + delta * torch.eye(len(b), dtype=H.dtype)
    torch.testing.assert_close(out.hypergrad["omega"], -J.T @ _neumann(damped, b, alpha), rtol=1e-6, atol=1e-12)
    assert out.diagnostics["hvp_count"] == 20 + 15  # power iterations + the series (14 terms + residual)


SMOKE_CHECKS = [  # (solver, reference, {error: bound}); SMOKE instance, its 20-step minibatch loop, float64
    (f"cg:rtol=1e-12,maxiter=2000,{DAMPED}", f"exact:{DAMPED}", {"ref_rel_error": 1e-9}),  # measured 2e-13
    (f"neumann:terms=400,{DAMPED}", f"exact:{DAMPED}", {"ref_rel_error": 1e-9}),  # contraction ≤ 1 − 1/11
    (f"fixedpoint:rtol=1e-12,maxiter=3000,{DAMPED}", f"exact:{DAMPED}", {"ref_rel_error": 1e-9}),
    (itl.DEFAULT_SOLVER, f"exact:{DAMPED}", {"ref_rel_error": 0.05}),  # 15 terms: measured 0.0195
    ("unroll", "forward", {"fd_rel_error": 1e-5, "ref_rel_error": 1e-10}),  # measured 2.5e-7, 2.6e-15
]


@pytest.mark.parametrize("solver,reference,bounds", SMOKE_CHECKS)
def test_solvers_on_the_smoke_instance(solver, reference, bounds):
    """Implicit solvers solve (H + δI)x = ∇θF at θ_K like the dense solve; unroll/forward are the exact
    derivative of the 20-step minibatch loop (finite differences)."""
    decl = itl.build(itl.SMOKE, bilevel.local_context(), domains=_domains(40))
    sub = decl.first_subproblem(0)
    report = bilevel.check(decl.problem, sub.inner, decl.outer, inner_batch=sub.inner_batch,
                           outer_batch=sub.outer_batch, loop=decl.loop, solver=solver, reference=reference,
                           max_directions=4, verbose=False)
    for error, bound in bounds.items():
        assert getattr(report, error) < bound, (error, report)


def test_truncated_unroll_is_the_exact_derivative_of_the_last_steps():
    """``unroll:truncate=T`` on the K-step loop = the full unroll of the T-step loop that starts at θ_{K−T}
    (held constant) on batches K−T … K−1. θ_{K−T} comes from SGD written out here in float64; the T-step
    derivative is checked against float64 central differences, and the truncated one must equal it."""
    decl = itl.build(itl.SMOKE, bilevel.local_context(), domains=_domains(40))
    sub = decl.first_subproblem(0)
    K, T, lr = decl.loop.steps, 5, decl.loop.lr
    assert decl.loop.optimizer == "sgd"  # no optimiser state to carry across the cut
    outer = {"omega": decl.outer["omega"].double()}
    theta = dict(sub.inner)
    for k in range(K - T):
        g = torch.func.grad(decl.problem.inner)(theta, outer, sub.inner_batch(k))
        theta = {name: theta[name] - lr * g[name] for name in theta}
    tail = bilevel.InnerLoop(steps=T, lr=lr, optimizer="sgd")
    shifted = lambda k: sub.inner_batch(k + K - T)  # noqa: E731
    report = bilevel.check(decl.problem, theta, outer, inner_batch=shifted, outer_batch=sub.outer_batch, loop=tail,
                           solver="unroll", reference=None, max_directions=4, verbose=False)
    assert report.passed and report.fd_rel_error < 1e-5, report  # the T-step derivative (measured 2.0e-6)
    reference = bilevel.hypergrad(decl.problem, theta, outer, inner_batch=shifted, outer_batch=sub.outer_batch,
                                  solver="unroll", loop=tail).hypergrad["omega"]
    truncated = bilevel.hypergrad(decl.problem, sub.inner, outer, inner_batch=sub.inner_batch,
                                  outer_batch=sub.outer_batch, solver=f"unroll:truncate={T}",
                                  loop=decl.loop).hypergrad["omega"]
    assert float((truncated - reference).norm() / reference.norm()) < 1e-10  # float64 rounding of 15 steps (measured 0)
    full = bilevel.hypergrad(decl.problem, sub.inner, outer, inner_batch=sub.inner_batch, outer_batch=sub.outer_batch,
                             solver="unroll", loop=decl.loop).hypergrad["omega"]
    assert float((truncated - full).norm() / full.norm()) > 0.05  # truncation really drops steps (measured 0.73)


def test_outer_loop_combines_lodo_hypergradients_with_pcgrad():
    decl = itl.build(itl.SMOKE, bilevel.local_context(), domains=_domains(40, torch.float32))
    seed = 2  # a seed whose first step has conflicting pairs, so PCGrad differs from the mean
    loop = bilevel.OuterLoop(decl, None, bilevel.local_context(seed=seed))
    grads_loop, metrics = loop.gradient(0)
    subs = decl.subproblems(bilevel.StepInfo(0, seed))
    runs = [bilevel.hypergrad(decl.problem, s.inner, decl.outer, inner_batch=s.inner_batch, outer_batch=s.outer_batch,
                              solver=itl.DEFAULT_SOLVER, loop=decl.loop) for s in subs]
    grads = [r.hypergrad for r in runs]
    expected = bilevel.combine_gradients(grads, "pcgrad", seed=(seed * 1_000_003 + 0) % 2**31)
    assert torch.equal(grads_loop["omega"], expected["omega"])
    assert metrics["conflicting_pairs"] == bilevel.conflicts(grads) == 2
    mean = bilevel.combine_gradients(grads, "mean")["omega"]
    assert float((mean - expected["omega"]).norm()) > 1e-3 * float(mean.norm())
    for sub, run in zip(subs, runs):  # the problem's metrics, per held-out domain and as the mean
        assert metrics[f"held_out_accuracy/{sub.key}"] == decl.metrics(sub, run, decl.outer)["held_out_accuracy"]
    assert metrics["inner_grad_norm"] == pytest.approx(
        sum(metrics[f"inner_grad_norm/{s.key}"] for s in subs) / 3, rel=1e-12)
    mean_decl = itl.build(dataclasses.replace(itl.SMOKE, combine="mean"), bilevel.local_context(),
                          domains=_domains(40, torch.float32))
    grads_mean, _ = bilevel.OuterLoop(mean_decl, None, bilevel.local_context(seed=seed)).gradient(0)
    torch.testing.assert_close(grads_mean["omega"], mean, rtol=1e-6, atol=0)


def _joint_by_hand(decl, subs):
    """All held-out networks as one problem: θ = {"i/name"}, G = Σ_i G_i, F = mean_i F_i (the Task version)."""
    n = len(subs)
    block = lambda theta, i: {k.split("/", 1)[1]: v for k, v in theta.items() if k.startswith(f"{i}/")}
    inner = lambda th, om, b: sum(decl.problem.inner(block(th, i), om, b[i]) for i in range(n))
    outer = lambda th, om, b: sum(decl.problem.outer(block(th, i), om, b[i]) for i in range(n)) / n
    theta0 = {f"{i}/{k}": v for i, s in enumerate(subs) for k, v in s.inner.items()}
    return (bilevel.BilevelProblem(inner, outer), theta0, lambda k: [s.inner_batch(k) for s in subs],
            [s.outer_batch for s in subs])


def _joint_loss_by_hand(decl, subs, omega) -> float:
    """mean_i CE(held-out i) after ``decl.loop.steps`` plain SGD steps θ ← θ − η∇G(θ, ω) per network, float64."""
    omega = {"omega": torch.as_tensor(np.asarray(omega), dtype=torch.float64)}
    grad_g = torch.func.grad(decl.problem.inner)
    losses = []
    for sub in subs:
        theta = {k: v.double() for k, v in sub.inner.items()}
        for k in range(decl.loop.steps):
            x, y = sub.inner_batch(k)
            g = grad_g(theta, omega, (x.double(), y))
            theta = {name: theta[name] - decl.loop.lr * g[name] for name in theta}
        x, y = sub.outer_batch
        losses.append(float(decl.problem.outer(theta, omega, (x.double(), y))))
    return sum(losses) / len(losses)


def test_cmaes_run_is_the_joint_lodo_problems_generations():
    doms = _domains(40, torch.float32)
    decl = itl.build(itl.SMOKE, bilevel.local_context(), domains=doms)
    model = _model(itl.SMOKE, doms)
    spec = "cmaes:popsize=4,sigma=0.5,seed=1"
    outer_run, history, loop = bilevel.run_locally(decl, 2, solver=spec)
    solver, state, outer = bilevel.make_solver(spec), None, dict(decl.outer)
    for step in range(2):
        subs = decl.subproblems(bilevel.StepInfo(step))
        problem, theta0, batches, targets = _joint_by_hand(decl, subs)
        out = bilevel.hypergrad(problem, theta0, outer, inner_batch=batches, outer_batch=targets, solver=solver,
                                loop=decl.loop, state=state)
        # the metrics hook reads each held-out network's block of the joint solution: accuracy by hand
        accuracies = []
        for i, sub in enumerate(subs):
            block = {k.split("/", 1)[1]: v for k, v in out.inner.items() if k.startswith(f"{i}/")}
            x, y = sub.outer_batch
            with torch.no_grad():
                accuracies.append(float((torch.func.functional_call(model, block, (x,)).argmax(-1) == y)
                                        .double().mean()))
            # the library averages in float32 (rounding ≤ 6e-8); one sample more or less moves it by 1/40
            assert history[step][f"held_out_accuracy/{sub.key}"] == pytest.approx(accuracies[-1], abs=1e-7)
        assert history[step]["held_out_accuracy"] == pytest.approx(sum(accuracies) / 3, abs=1e-7)
        outer, state = {"omega": outer["omega"] - out.hypergrad["omega"]}, out.state  # SGD, lr 1
        assert history[step]["outer_loss"] == out.diagnostics["outer_loss"]
    assert torch.equal(outer_run["omega"], outer["omega"])
    mean = torch.as_tensor(state.strategy.mean, dtype=torch.float32)
    torch.testing.assert_close(outer_run["omega"], mean, rtol=0, atol=1e-6)  # φ sits on the CMA-ES mean
    # Reference: pycma driven directly (ask/tell, seed 1 as a private RandomState) on the joint LODO loss
    # computed by hand: 20 SGD steps per held-out network in float64, mean held-out cross-entropy.
    es = cma.CMAEvolutionStrategy(decl.outer["omega"].double().numpy(), 0.5, {
        "popsize": 4, "seed": math.nan, "randn": lambda *shape, rs=np.random.RandomState(1): rs.standard_normal(shape),
        "verbose": -9, "verb_disp": 0, "verb_log": 0, "CMA_diagonal": False})
    for step in range(2):
        subs = decl.subproblems(bilevel.StepInfo(step))
        candidates = es.ask()
        es.tell(candidates, [_joint_loss_by_hand(decl, subs, c) for c in candidates])
        assert history[step]["outer_loss"] == pytest.approx(_joint_loss_by_hand(decl, subs, es.mean), rel=1e-5)
    # CMA-ES's update depends on the candidates' ranks only, so float32 vs float64 scores give the same mean
    torch.testing.assert_close(outer_run["omega"], torch.as_tensor(es.mean, dtype=torch.float32), rtol=0, atol=1e-6)
    assert float((outer_run["omega"] - decl.outer["omega"]).abs().max()) > 0.1  # two generations moved φ


def test_smoke_run_resumes_bitwise_and_logs_the_solver(tmp_path):
    """Two outer steps == one step, a checkpoint, one more step; diagnostics and the meta-test."""
    cfg = dataclasses.replace(itl.SMOKE, cache_dir=str(tmp_path / "cache"))
    decl = itl.build(cfg, bilevel.local_context())
    outer, history, loop = bilevel.run_locally(decl, 2)
    assert not torch.equal(outer["omega"], decl.outer["omega"])
    assert history[0]["damping"] == pytest.approx(0.1 * history[0]["lambda_max"], rel=1e-9)
    first = bilevel.OuterLoop(decl, None, bilevel.local_context())
    first.run(1)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = bilevel.OuterLoop(decl, None, bilevel.local_context())
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    resumed.run(2)
    assert torch.equal(resumed.outer["omega"], loop.outer["omega"])
    fixed = bilevel.OuterLoop(decl, "neumann:alpha=0.05", bilevel.local_context())
    assert fixed.run(1)[0]["alpha"] == pytest.approx(0.05, rel=1e-12)
    metrics = loop.evaluate()
    assert 0.0 <= metrics["learned/target_accuracy"] <= 1.0 and "ce/in_domain_accuracy" in metrics


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
    ctx = bilevel.local_context()
    with pytest.raises(ValueError, match="combine must be"):
        itl.build(dataclasses.replace(itl.SMOKE, combine="sum"), ctx, domains=_domains(6))
    with pytest.raises(ValueError, match="at least 2"):
        itl.build(itl.SMOKE, ctx, domains=dict(list(_domains(6).items())[:1]))
    with pytest.raises(ValueError, match="unknown dataset"):
        itl.load_domains("pacs", (0,), None, 0)


def test_deployment_optimisers_are_torch_optimisers_and_the_grid_picks_by_validation(monkeypatch):
    """``erm(optimizer="adam")`` is torch.optim.Adam on the same seeded init and batches (bitwise); the meta-test
    grid trains every (optimizer, lr) pair and keeps, per loss and seed, the one with the best in-domain
    validation accuracy; an unknown optimizer is refused by name."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 6, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    model = itl.erm(torch.nn.functional.cross_entropy, (x, y), "mlp", 5, 0.01, seed=3, hidden=8, batch=8,
                    num_classes=3, optimizer="adam")
    torch.manual_seed(3)
    ref = itl.make_model("mlp", (1, 6, 6), 8, 3)
    opt, gen = torch.optim.Adam(ref.parameters(), lr=0.01), torch.Generator().manual_seed(3)
    for _ in range(5):
        idx = torch.randint(0, 40, (8,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x[idx]), y[idx]).backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    with pytest.raises(ValueError, match="unknown deployment optimizer 'rmsprop'"):
        itl.erm(torch.nn.functional.cross_entropy, (x, y), "mlp", 1, 0.01, seed=0, optimizer="rmsprop")

    # The pick: a validation score that depends only on the pair, so the best pair is known in advance.
    trained = []
    def fake_erm(loss_fn, train, arch, steps, lr, seed, hidden=256, batch=64, num_classes=None, optimizer="sgdm"):
        trained.append((optimizer, lr))
        model = itl.make_model(arch, tuple(train[0].shape[1:]), hidden, num_classes)
        model.score = {("sgdm", 0.1): 0.2, ("adam", 0.001): 0.9, ("adam", 0.01): 0.5}[(optimizer, lr)]
        return model
    monkeypatch.setattr(itl, "erm", fake_erm)
    monkeypatch.setattr(itl, "_scores", lambda model, data, loss_fn: (getattr(model, "score", 0.0), 1.0, 1.0))
    spec = itl.TaylorSpec("itl", 4)
    cfg = dataclasses.replace(itl.SMOKE, test_arch="mlp", test_steps=1)
    grid = [("sgdm", 0.1), ("adam", 0.001), ("adam", 0.01)]
    m = itl.meta_test(itl.initial_theta(spec, "brier"), spec, cfg, dataset="rotated_digits", seeds=2,
                      targets=["0"], grid=grid)
    assert trained == grid * 4  # 2 losses x 1 target x 2 seeds, each the whole grid
    assert m["ce/choices"] == m["learned/choices"] == ["adam:0.001", "adam:0.001"]
    assert m["ce/in_domain_accuracy"] == pytest.approx(0.9)
