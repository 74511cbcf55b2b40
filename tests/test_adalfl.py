"""AdaLFL: the one-step online meta-gradient against float64 finite differences and the closed form
g_φ = −α (∂²M_φ/∂φ∂θ) ∇_θ L_T(θ'), the online phase of ``run_locally`` against a hand computation
(θ never reset, Adam on the hand-made meta-gradient), the offline ML³ init, the comparators, the solvers
that apply, and resume."""
import io
from dataclasses import replace

import pytest
import torch
from torch.func import grad

import bilevel
from bilevel import tree
from bilevel.problems import adalfl

torch.set_num_threads(1)

CTX = bilevel.local_context()


@pytest.mark.parametrize("dataset,model", [("diabetes", "mlp"), ("digits", "logistic")])
def test_meta_gradient_matches_finite_differences(dataset, model):
    decl = adalfl.build(replace(adalfl.SMOKE, dataset=dataset, model=model), CTX)
    outer, _, loop = bilevel.run_locally(decl, 2)   # a few online steps, so θ is not at its init
    sub = decl.first_subproblem()
    report = bilevel.check(decl.problem, loop.inner["0"], outer, inner_batch=sub.inner_batch,
                           outer_batch=sub.outer_batch, loop=decl.loop, solver="onestep", reference="unroll",
                           eps=1e-3, max_directions=16, verbose=False)
    assert report.fd_rel_error < 1e-5   # measured 2e-7, 3e-7: |dF/dφ| is 4e-4, 7e-6, so rounding of F limits FD
    assert report.ref_rel_error < 1e-10


def test_meta_gradient_matches_mixed_second_derivative():
    """E1 of the digest: dF/dφ = −α ∂/∂φ ⟨∇_θ M_φ(θ), v⟩ with v = ∇_θ L_T(θ'(φ)) held fixed."""
    decl = adalfl.build(replace(adalfl.SMOKE, dataset="digits", model="logistic"), CTX)
    sub = decl.first_subproblem()
    theta, phi = tree.cast(sub.inner, torch.float64), tree.cast(decl.outer, torch.float64)
    xb, yb = sub.inner_batch[0].double(), sub.inner_batch[1]
    xv, yv = sub.outer_batch[0].double(), sub.outer_batch[1]
    inner_loss, outer_loss, alpha = decl.problem.inner, decl.problem.outer, decl.loop.lr
    g_theta = grad(lambda th, p: inner_loss(th, p, (xb, yb)))(theta, phi)
    theta_new = tree.axpy(-alpha, g_theta, theta)
    v = grad(lambda th: outer_loss(th, phi, (xv, yv)))(theta_new)
    expected = grad(lambda p: -alpha * tree.dot(grad(lambda th: inner_loss(th, p, (xb, yb)))(theta), v))(phi)
    result = bilevel.hypergrad(decl.problem, theta, phi, inner_batch=(xb, yb), outer_batch=(xv, yv),
                               solver="onestep", loop=decl.loop)
    for k in phi:
        assert torch.allclose(result.hypergrad[k], expected[k], rtol=1e-10, atol=1e-14)


def test_online_phase_equals_a_hand_computation():
    """Two outer steps of ``run_locally``: θ_{t+1} = θ_t − α∇_θM_φt on train batch t (θ continues, never
    reset) and φ_{t+1} = Adam(φ_t, dF/dφ_t), the lookahead meta-gradient written out with torch.func."""
    cfg = replace(adalfl.SMOKE, init_steps=0, meta_lr=1e-3)   # a larger η, so φ's move is far above rounding
    decl = adalfl.build(cfg, CTX)
    parts = adalfl.make_parts(cfg, CTX)
    alpha, (beta1, beta2), eps, eta = parts.base_lr, (0.9, 0.999), 1e-8, cfg.meta_lr
    theta, phi = parts.fresh_theta(-1), tree.clone(decl.outer)
    m, v = tree.zeros_like(phi), tree.zeros_like(phi)
    for t in range(2):
        train, meta = parts.batches(t, 0), parts.batches(t, 1)

        def step(th, p):
            return tree.axpy(-alpha, grad(parts.inner_loss)(th, p, train), th)

        g = grad(lambda p: parts.outer_loss(step(theta, p), p, meta))(phi)
        theta = step(theta, phi)
        m = {k: beta1 * m[k] + (1 - beta1) * g[k] for k in g}
        v = {k: beta2 * v[k] + (1 - beta2) * g[k] ** 2 for k in g}
        phi = {k: phi[k] - eta * (m[k] / (1 - beta1 ** (t + 1))) / ((v[k] / (1 - beta2 ** (t + 1))).sqrt() + eps)
               for k in phi}
    outer, history, loop = bilevel.run_locally(decl, 2)
    moved = max(float((phi[k] - decl.outer[k]).abs().max()) for k in phi)
    assert moved > 1e-3                                          # φ really moved (≈ η per step)
    for k in phi:                                                # φ to a few float32 ulps of |φ| ≤ 1
        assert torch.allclose(outer[k], phi[k], rtol=0, atol=5e-7), k
    for k in theta:
        assert torch.allclose(loop.inner["0"][k], theta[k], rtol=1e-6, atol=1e-7), k
    assert len(history) == 2


def test_online_rule_keeps_theta_and_baseline_is_sgd():
    cfg = replace(adalfl.SMOKE, representation="meta_lr", online=False, init_steps=0)
    decl = adalfl.build(cfg, CTX)
    parts = adalfl.make_parts(cfg, CTX)
    outer, history, loop = bilevel.run_locally(decl, 3)
    assert float(outer["lr_scale"]) == 1.0                      # frozen: SGD with lr 0
    assert [h["effective_lr"] for h in history] == [parts.base_lr] * 3
    theta = parts.fresh_theta(-1)
    for step in range(3):                                       # plain SGD on MSE, same batches
        theta = tree.axpy(-parts.base_lr, grad(parts.task_loss)(theta, parts.batches(step, 0)), theta)
    for k in theta:
        assert torch.allclose(loop.inner["0"][k], theta[k], atol=1e-6)
    sgd, _, sgd_loop = bilevel.run_locally(adalfl.build_baseline(cfg, CTX), 3)   # the single-level baseline
    for k in theta:
        assert torch.allclose(sgd[k], theta[k], atol=1e-6)
    assert sgd_loop.evaluate()["test_mse"] == pytest.approx(loop.evaluate()["test_mse"], rel=1e-5)


def test_offline_init_lowers_the_meta_objective_and_online_moves_phi():
    cfg = replace(adalfl.SMOKE, dataset="digits", model="logistic", init_steps=60, init_lr=1e-2)
    phi, history = adalfl.offline_init(cfg, CTX)
    decl = adalfl.build(cfg, CTX)
    parts = adalfl.make_parts(cfg, CTX)
    phi0 = adalfl.initial_phi(cfg, CTX)

    def lookahead(p):  # Algorithm 1's meta-objective averaged over 20 fixed (fresh θ, batch) draws
        values = []
        for t in range(1000, 1020):
            res = bilevel.hypergrad(decl.problem, parts.fresh_theta(t), p, inner_batch=parts.batches(t, 0),
                                    outer_batch=parts.batches(t, 1), solver="onestep", loop=decl.loop)
            values.append(res.diagnostics["outer_loss"])
        return sum(values) / len(values)

    assert len(history) == 60
    assert all(torch.equal(phi[k], decl.outer[k]) for k in phi)   # build starts the online phase there
    assert lookahead(decl.outer) < lookahead(phi0)
    outer, _, _ = bilevel.run_locally(decl, 2)
    assert not all(torch.equal(decl.outer[k], outer[k]) for k in outer)
    frozen = adalfl.build(replace(adalfl.SMOKE, online=False), CTX)
    outer2, _, _ = bilevel.run_locally(frozen, 2)
    assert all(torch.equal(frozen.outer[k], outer2[k]) for k in outer2)


def test_offline_init_is_one_fresh_step_per_meta_step():
    """Algorithm 1 through the one loop: step t differentiates one SGD step from fresh θ number t."""
    cfg = replace(adalfl.SMOKE, dataset="digits", model="logistic", init_steps=2, init_lr=1e-2)
    parts = adalfl.make_parts(cfg, CTX)
    phi = adalfl.initial_phi(cfg, CTX)
    opt_phi = {k: v.clone().requires_grad_(True) for k, v in phi.items()}
    adam = torch.optim.Adam(list(opt_phi.values()), lr=cfg.init_lr)
    for t in range(2):
        train, meta = parts.batches(t, 0), parts.batches(t, 1)
        theta = parts.fresh_theta(t)
        g = grad(lambda p: parts.outer_loss(
            tree.axpy(-parts.base_lr, grad(parts.inner_loss)(theta, p, train), theta), p, meta))(tree.detach(opt_phi))
        for k, p in opt_phi.items():
            p.grad = g[k]
        adam.step()
    ours, _ = adalfl.offline_init(cfg, CTX)
    for k in ours:
        assert torch.allclose(ours[k], opt_phi[k].detach(), rtol=0, atol=1e-7), k
    assert not torch.equal(parts.fresh_theta(0)["weight"], parts.fresh_theta(1)["weight"])
    assert torch.equal(parts.fresh_theta(1)["weight"], parts.fresh_theta(1)["weight"])


def test_meta_lr_learns_a_learning_rate():
    decl = adalfl.build(replace(adalfl.SMOKE, representation="meta_lr", init_steps=30, init_lr=0.05), CTX)
    assert float(decl.outer["lr_scale"]) > 1.0   # α = 0.001 on diabetes is too small: the lookahead raises it


@pytest.mark.parametrize("solver", ["cg", "neumann", "exact", "cmaes"])
def test_solvers_that_do_not_apply_are_refused(solver):
    online = adalfl.build(replace(adalfl.SMOKE, init_steps=0), CTX)
    with pytest.raises(bilevel.SpecError, match="stationary point"):
        bilevel.run_locally(online, 1, solver=solver)
    with pytest.raises(bilevel.SpecError, match="does not apply"):   # the offline init runs the same spec
        adalfl.build(adalfl.SMOKE, bilevel.local_context(solver))


@pytest.mark.parametrize("solver", ["unroll", "forward"])
def test_unrolled_solvers_give_the_onestep_run(solver):
    """With one inner step, reverse (``unroll``) and forward mode (``forward``) through the unrolled loop are the
    exact derivative of the same lookahead as ``onestep``. Adam's step hardly depends on the gradient's scale,
    so the meta-gradient itself is compared through each step's logged norm (float32: rel. 1e-5, measured
    1e-9), and φ, θ after three online steps up to float32 rounding (1e-7 on entries ≤ 1; measured 0)."""
    decl = adalfl.build(replace(adalfl.SMOKE, init_steps=0), CTX)
    a, hist_a, loop_a = bilevel.run_locally(decl, 3)
    b, hist_b, loop_b = bilevel.run_locally(decl, 3, solver=solver)
    for h_a, h_b in zip(hist_a, hist_b):
        assert h_a["outer_grad_norm"] > 1e-5
        assert h_b["outer_grad_norm"] == pytest.approx(h_a["outer_grad_norm"], rel=1e-5)
        assert h_b["outer_loss"] == pytest.approx(h_a["outer_loss"], rel=1e-6)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-7)
    for k in loop_a.inner["0"]:
        assert torch.allclose(loop_a.inner["0"][k], loop_b.inner["0"][k], rtol=0, atol=1e-7)


def test_resume_and_evaluate():
    cfg = replace(adalfl.SMOKE, dataset="digits")
    decl = adalfl.build(cfg, CTX)
    outer, _, full = bilevel.run_locally(decl, 3)
    first = bilevel.OuterLoop(decl, None, CTX)
    first.run(1)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = bilevel.OuterLoop(adalfl.build(cfg, CTX), None, CTX)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    resumed.run(3)
    for k in outer:
        assert torch.equal(resumed.outer[k], outer[k])
    for k in full.inner["0"]:
        assert torch.equal(resumed.inner["0"][k], full.inner["0"][k])
    metrics = full.evaluate()
    assert metrics == resumed.evaluate()
    parts = adalfl.make_parts(cfg, CTX)
    x, y = parts.data["test"]
    errors = int((parts.predict(full.inner["0"], x).argmax(-1) != y).sum())
    assert metrics["test_error"] == pytest.approx(errors / len(y), abs=1e-7)


def test_bad_config():
    with pytest.raises(ValueError, match="dataset"):
        adalfl.build(replace(adalfl.SMOKE, dataset="mnist"), CTX)
    with pytest.raises(ValueError, match="representation"):
        adalfl.build(replace(adalfl.SMOKE, representation="taylor"), CTX)
