"""AdaLFL: the one-step online meta-gradient against float64 finite differences and the closed form
g_φ = −α (∂²M_φ/∂φ∂θ) ∇_θ L_T(θ'), the online rule never resetting θ, the comparators, and resume."""
import io
from dataclasses import replace

import pytest
import torch
from torch.func import grad

import bilevel
from bilevel import tree
from problems import adalfl

torch.set_num_threads(1)

CTX = bilevel.local_context(adalfl.DEFAULT_SOLVER)


@pytest.mark.parametrize("dataset,model", [("diabetes", "mlp"), ("digits", "logistic")])
def test_meta_gradient_matches_finite_differences(dataset, model):
    task = adalfl.build(replace(adalfl.SMOKE, dataset=dataset, model=model), CTX)
    bilevel.run_locally(task, CTX, 2)   # a few online steps, so θ is not at its init
    report = bilevel.check(**task.check_instance(), solver="onestep", reference="unroll", eps=1e-3,
                           max_directions=16, verbose=False)
    assert report.fd_rel_error < 1e-5   # |dF/dφ| is ~1e-6: float64 rounding of F limits FD to ~1e-7
    assert report.ref_rel_error < 1e-10


def test_meta_gradient_matches_mixed_second_derivative():
    """E1 of the digest: dF/dφ = −α ∂/∂φ ⟨∇_θ M_φ(θ), v⟩ with v = ∇_θ L_T(θ'(φ)) held fixed."""
    task = adalfl.build(replace(adalfl.SMOKE, dataset="digits", model="logistic"), CTX)
    inst = task.check_instance()
    theta = tree.cast(inst["inner"], torch.float64)
    phi = tree.cast(inst["outer"], torch.float64)
    xb, yb = inst["inner_batch"][0].double(), inst["inner_batch"][1]
    xv, yv = inst["outer_batch"][0].double(), inst["outer_batch"][1]
    alpha = task.base_lr
    g_theta = grad(lambda th, p: task.inner_loss(th, p, (xb, yb)))(theta, phi)
    theta_new = tree.axpy(-alpha, g_theta, theta)
    v = grad(lambda th: task.outer_loss(th, phi, (xv, yv)))(theta_new)
    expected = grad(lambda p: -alpha * tree.dot(grad(lambda th: task.inner_loss(th, p, (xb, yb)))(theta), v))(phi)
    result = bilevel.hypergrad(task.problem, theta, phi, inner_batch=(xb, yb), outer_batch=(xv, yv),
                               solver="onestep", loop=task.loop)
    for k in phi:
        assert torch.allclose(result.hypergrad[k], expected[k], rtol=1e-10, atol=1e-14)


def test_online_rule_keeps_theta_and_baseline_is_sgd():
    cfg = replace(adalfl.SMOKE, representation="meta_lr", online=False, init_steps=0)
    task = adalfl.build(cfg, CTX)
    theta = dict(task.theta)
    outer, history = bilevel.run_locally(task, CTX, 3)
    assert float(outer["lr_scale"]) == 1.0                      # frozen: zero grads under Adam
    for step in range(3):                                       # plain SGD on MSE, same batches
        g = grad(task.task_loss)(theta, task.batches(step, 0))
        theta = tree.axpy(-task.base_lr, g, theta)
    for k in theta:
        assert torch.allclose(task.theta[k], theta[k], atol=1e-6)
    assert len(history) == 3


def test_offline_init_lowers_the_meta_objective_and_online_moves_phi():
    cfg = replace(adalfl.SMOKE, dataset="digits", model="logistic", init_steps=60, init_lr=1e-2)
    task = adalfl.build(cfg, CTX)
    phi0 = adalfl.build(replace(cfg, init_steps=0), CTX).outer

    def lookahead(phi):  # Algorithm 1's meta-objective averaged over 20 fixed (fresh θ, batch) draws
        values = []
        for t in range(1000, 1020):
            res = bilevel.hypergrad(task.problem, task.fresh_theta(t), phi, inner_batch=task.batches(t, 0),
                                    outer_batch=task.batches(t, 1), solver="onestep", loop=task.loop)
            values.append(res.diagnostics["outer_loss"])
        return sum(values) / len(values)

    assert len(task.init_curve) == 60
    assert lookahead(task.outer) < lookahead(phi0)
    before = tree.clone(task.outer)
    outer, _ = bilevel.run_locally(task, CTX, 2)
    assert not all(torch.equal(before[k], outer[k]) for k in before)
    frozen = adalfl.build(replace(adalfl.SMOKE, online=False), CTX)
    outer2, _ = bilevel.run_locally(frozen, CTX, 2)
    assert all(torch.equal(frozen.outer[k], outer2[k]) for k in outer2)


def test_meta_lr_learns_a_learning_rate():
    task = adalfl.build(replace(adalfl.SMOKE, representation="meta_lr", init_steps=30, init_lr=0.05), CTX)
    assert float(task.outer["lr_scale"]) > 1.0   # α = 0.001 on diabetes is too small: the lookahead raises it


def test_resume_and_evaluate():
    cfg = replace(adalfl.SMOKE, dataset="digits")
    full = adalfl.build(cfg, CTX)
    outer, _ = bilevel.run_locally(full, CTX, 2)
    first = adalfl.build(cfg, CTX)
    outer1, _ = bilevel.run_locally(first, CTX, 1)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = adalfl.build(cfg, CTX)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    out = resumed.step(outer1, CTX, 1)
    ref = adalfl.build(cfg, CTX)
    bilevel.run_locally(ref, CTX, 1)
    ref_out = ref.step(outer1, CTX, 1)
    for k in out.grads:
        assert torch.equal(out.grads[k], ref_out.grads[k])
    metrics = full.evaluate(outer, CTX)
    assert 0.0 <= metrics["test_error"] <= 1.0


def test_bad_config():
    with pytest.raises(ValueError, match="dataset"):
        adalfl.build(replace(adalfl.SMOKE, dataset="mnist"), CTX)
    with pytest.raises(ValueError, match="representation"):
        adalfl.build(replace(adalfl.SMOKE, representation="taylor"), CTX)
