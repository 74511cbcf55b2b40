"""problems/ridge.py: the inner loop runs on scaled weights u = w ⊙ √(1 + e^φ). The hypergradient is still the
closed form's, GD's step size 1.5/L stays stable however large the penalties grow, and the README's 50-step
run (which diverged near outer step 29 on the plain weights with lr 0.5) learns the sparsity."""
import dataclasses

import pytest
import torch
from torch.func import hessian

import bilevel
from bilevel.problems import ridge


def float64_instance(cfg=ridge.SMOKE):
    data = {k: tuple(t.double() for t in v) for k, v in ridge.make_data(cfg).items()}
    phi = {"log_penalty": torch.linspace(-3.0, 4.0, cfg.features, dtype=torch.float64)}
    return data["train"], data["val"], phi


def test_hypergradient_at_the_scaled_solution_is_the_closed_form():
    train, val, phi = float64_instance()
    x, y = train
    lam = phi["log_penalty"].exp()
    w_star = torch.linalg.solve(x.T @ x / len(y) + torch.diag(lam), x.T @ y / len(y))
    u_star = {"u": w_star * (1 + lam).sqrt()}
    problem = bilevel.BilevelProblem(ridge.scaled_inner_loss, ridge.scaled_outer_loss)
    result = bilevel.hypergrad(problem, u_star, phi, inner_batch=train, outer_batch=val, solver="exact",
                               loop=bilevel.InnerLoop(steps=0))
    exact = ridge.closed_form_hypergrad(phi, train, val)
    rel = (result.hypergrad["log_penalty"] - exact).norm() / exact.norm()
    assert rel < 1e-12
    assert ridge.weights(u_star, phi)["w"] == pytest.approx(w_star, rel=1e-14)


@pytest.mark.parametrize("log_penalty", [-8.0, 0.0, 12.0])
def test_step_size_bounds_the_scaled_hessian_at_any_penalty(log_penalty):
    """λ_max(∇²_u G̃) ≤ L = λ_max(XᵀX/n) + 1, so lr = 1.5/L < 2/λ_max; on w the Hessian grows with e^φ."""
    train, _, _ = float64_instance(ridge.Config())
    phi = {"log_penalty": torch.full((50,), log_penalty, dtype=torch.float64)}
    x = train[0]
    big = float(torch.linalg.eigvalsh(x.T @ x / len(x)).max()) + 1.0
    assert ridge.inner_step_size(ridge.Config(), train) == pytest.approx(1.5 / big, rel=1e-12)
    h_u = hessian(lambda u: ridge.scaled_inner_loss({"u": u}, phi, train))(torch.zeros(50, dtype=torch.float64))
    assert float(torch.linalg.eigvalsh(h_u).max()) <= big
    h_w = hessian(lambda w: ridge.inner_loss({"w": w}, phi, train))(torch.zeros(50, dtype=torch.float64))
    assert float(torch.linalg.eigvalsh(h_w).max()) == pytest.approx(big - 1 + float(torch.tensor(log_penalty).exp()),
                                                                   rel=0.5)  # unbounded in φ
    assert ridge.inner_step_size(dataclasses.replace(ridge.Config(), inner_lr=0.3), train) == 0.3
    with pytest.raises(ValueError, match="inner_lr must be > 0, or 0 for 1.5/L"):
        ridge.inner_step_size(dataclasses.replace(ridge.Config(), inner_lr=-1.0), train)


def test_the_readme_run_learns_the_sparsity_without_diverging():
    ctx = bilevel.local_context()
    outer, history, loop = bilevel.run_locally(ridge.build(ridge.Config(), ctx), 50, "cg", ctx=ctx)
    assert len(history) == 50
    assert max(h["rel_error_vs_closed_form"] for h in history) < 1e-4
    assert history[-1]["outer_loss"] < 0.3 * history[0]["outer_loss"]
    final = loop.evaluate()
    assert final["mean_log_penalty_irrelevant"] > final["mean_log_penalty_relevant"] + 3
