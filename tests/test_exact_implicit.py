"""``bilevel.Implicit`` (solvers/implicit.py) held to exact values: the hypergradient, the solver state,
every diagnostic, the damping and step-size options, the stationarity warning and the input checks.

The problem is the quadratic oracle G(θ, φ) = ½θᵀAθ + θᵀBφ − bᵀθ, F = ½‖θ − t‖² + ½φᵀCφ, so ∇θG = Aθ + Bφ − b,
H = A, ∂²G/∂φ∂θ = Bᵀ and, at any θ the inner loop reaches, the damped IFT hypergradient is

    Cφ − Bᵀ(A + δI)⁻¹(θ − t),

computed here with a dense solve. The inner loop is plain SGD, θ_{k+1} = θ_k − η(Aθ_k + Bφ − b), which the
tests replay in closed form. The hypergradient and its diagnostics are checked on both autodiff paths (the
autograd tape and torch.func, forced with ``bilevel.autodiff_path``), and the tests that count loss evaluations
also record on which machinery each evaluation ran. Written to kill the mutants ``mutation/run.py implicit``
found alive (docs/mutation.md).
"""
from __future__ import annotations

import math
import sys
import warnings

import pytest
import torch

import bilevel
from bilevel import linsolve
from bilevel.errors import StationarityWarning, ZeroHypergradientWarning
from bilevel.paths import transforms_active
from bilevel.solvers.implicit import POWER_ITERATIONS, Implicit
from oracles import quadratic

F64 = torch.float64
PATHS = ["autograd", "func"]


def sgd_path(c, outer, theta0, steps, lr):
    """θ_K and the K inner losses of plain SGD on G, in closed form."""
    A, B, b = c["A"], c["B"], c["b"]
    th, losses = theta0.clone(), []
    for _ in range(steps):
        losses.append(float(0.5 * th @ A @ th + th @ (B @ outer["phi"]) - b @ th))
        th = th - lr * (A @ th + B @ outer["phi"] - b)
    return th, losses


def ift(c, outer, theta, delta=0.0):
    p = c["A"].shape[0]
    x = torch.linalg.solve(c["A"] + delta * torch.eye(p, dtype=F64), theta - c["t"])
    return c["C"] @ outer["phi"] - c["B"].T @ x, x


def call(solver, steps=60, lr=0.3, state=None, path="autograd"):
    """The solver on the quadratic oracle on ``path``, with θ_K and the losses replayed in closed form."""
    problem, inner, outer, c = quadratic()
    loop = bilevel.InnerLoop(steps=steps, lr=lr)
    with warnings.catch_warnings(record=True) as caught, bilevel.autodiff_path(path):
        warnings.simplefilter("always")
        result = solver(problem, inner, outer, None, None, loop, state)
    assert result.diagnostics["autodiff_path"] == path
    theta, losses = sgd_path(c, outer, inner["theta"], steps, lr)
    return result, c, outer, inner, theta, losses, caught


def grad_norm(c, outer, theta):
    return float(torch.linalg.norm(c["A"] @ theta + c["B"] @ outer["phi"] - c["b"]))


@pytest.mark.parametrize("linear", [linsolve.CG(rtol=1e-13), linsolve.Exact(),
                                    linsolve.FixedPoint(alpha=0.2, rtol=1e-13, maxiter=3000)])
@pytest.mark.parametrize("path", PATHS)
def test_hypergradient_and_every_diagnostic_at_an_unconverged_inner_point(linear, path):
    """K = 60 SGD steps leave ∇θG ≠ 0: the IFT at θ_K is still the exact formula above (at θ_K)."""
    solver = Implicit(linsolve=linear, warm_start=False, stationarity_rtol=0.0)
    result, c, outer, inner, theta, losses, caught = call(solver, path=path)
    expected, x = ift(c, outer, theta)
    assert torch.allclose(result.hypergrad["phi"], expected, rtol=1e-10, atol=1e-12)
    assert torch.allclose(result.inner["theta"], theta, rtol=1e-12, atol=1e-14)
    assert result.state is None  # warm_start=False keeps nothing
    d = result.diagnostics
    assert d["inner_loss"] == pytest.approx(losses[-1], rel=1e-12)
    assert d["outer_loss"] == pytest.approx(float(0.5 * ((theta - c["t"]) ** 2).sum()
                                                  + 0.5 * outer["phi"] @ c["C"] @ outer["phi"]), rel=1e-12)
    assert d["inner_steps"] == 60.0
    assert d["evaluations"] == 60 + 1  # the K steps + the stationarity gradient at θ_0
    assert d["inner_grad_norm"] == pytest.approx(grad_norm(c, outer, theta), rel=1e-10)
    assert d["inner_grad_norm_rel"] == pytest.approx(
        grad_norm(c, outer, theta) / grad_norm(c, outer, inner["theta"]), rel=1e-10)
    assert d["converged"] == 1.0 and d["residual"] <= 1e-13
    assert "damping" not in d and not caught
    if isinstance(linear, linsolve.Exact):
        assert d["iterations"] == 1.0 and d["hvp_count"] == 6 + 1
    if isinstance(linear, linsolve.FixedPoint):
        assert d["alpha"] == 0.2 and "lambda_max" not in d
        assert d["hvp_count"] == d["iterations"]  # a cold fixed-point solve: one product per iteration
    if isinstance(linear, linsolve.CG):
        assert d["hvp_count"] == d["iterations"] + 1 and "alpha" not in d


def test_the_diagnostics_report_the_linear_solve_s_own_numbers():
    """A capped CG (2 iterations, rtol 0) reports exactly CG's own info on H x = ∇θF(θ_K)."""
    solver = Implicit(linsolve=linsolve.CG(maxiter=2, rtol=0.0), warm_start=False, stationarity_rtol=0.0)
    result, c, outer, inner, theta, losses, caught = call(solver)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x, info = linsolve.CG(maxiter=2, rtol=0.0)(lambda v: {"x": c["A"] @ v["x"]}, {"x": theta - c["t"]})
    d = result.diagnostics
    assert d["iterations"] == 2.0 and d["hvp_count"] == 3.0 and d["converged"] == 0.0
    assert d["residual"] == pytest.approx(info.residual, rel=1e-10)
    expected = c["C"] @ outer["phi"] - c["B"].T @ x["x"]
    assert torch.allclose(result.hypergrad["phi"], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_warm_start_keeps_the_solution_and_starts_the_next_solve_from_it(path):
    solver = Implicit(linsolve=linsolve.CG(rtol=1e-12), stationarity_rtol=0.0)
    first, c, outer, inner, theta, _, _ = call(solver, path=path)
    _, x = ift(c, outer, theta)
    assert torch.allclose(first.state["theta"], x, rtol=1e-10, atol=1e-12)
    assert not first.state["theta"].requires_grad
    again, *_ = call(solver, state=first.state, path=path)
    assert again.diagnostics["iterations"] == 0.0 and again.diagnostics["hvp_count"] == 1.0  # only H x0
    # a state is ignored without warm_start
    cold, *_ = call(Implicit(linsolve=linsolve.CG(rtol=1e-12), warm_start=False, stationarity_rtol=0.0),
                    state=first.state, path=path)
    assert cold.diagnostics["iterations"] > 0


@pytest.mark.parametrize("delta, path", [(0.5, "autograd"), (2.0, "func")])
def test_damping_solves_the_damped_system_and_is_reported(delta, path):
    solver = Implicit(linsolve=linsolve.CG(rtol=1e-13), warm_start=False, damping=delta, stationarity_rtol=0.0)
    result, c, outer, inner, theta, _, _ = call(solver, path=path)
    expected, _ = ift(c, outer, theta, delta)
    assert torch.allclose(result.hypergrad["phi"], expected, rtol=1e-10, atol=1e-12)
    assert result.diagnostics["damping"] == delta and "lambda_max" not in result.diagnostics


@pytest.mark.parametrize("path", PATHS)
def test_relative_damping_with_cg_uses_the_default_power_iterations(path):
    """CG has no power_iterations option: λ̂ comes from POWER_ITERATIONS = 20 products, δ = damping·λ̂."""
    solver = Implicit(linsolve=linsolve.CG(rtol=1e-13), warm_start=False, damping=0.1, relative_damping=True,
                      stationarity_rtol=0.0)
    result, c, outer, inner, theta, _, _ = call(solver, path=path)
    g = {"theta": theta - c["t"]}
    lam = float(linsolve.power_iteration(lambda v: {"theta": c["A"] @ v["theta"]}, g, POWER_ITERATIONS))
    d = result.diagnostics
    assert POWER_ITERATIONS == 20
    assert d["lambda_max"] == pytest.approx(lam, rel=1e-12) and d["damping"] == pytest.approx(0.1 * lam, rel=1e-12)
    expected, _ = ift(c, outer, theta, 0.1 * lam)
    assert torch.allclose(result.hypergrad["phi"], expected, rtol=1e-10, atol=1e-12)
    assert d["hvp_count"] == d["iterations"] + 1 + 20


@pytest.mark.parametrize("path", PATHS)
def test_relative_damping_with_auto_alpha_sets_alpha_to_one_over_lambda_plus_delta(path):
    solver = Implicit(linsolve=linsolve.Neumann(terms=7, power_iterations=11), warm_start=False, damping=0.3,
                      relative_damping=True, stationarity_rtol=0.0)
    result, c, outer, inner, theta, _, _ = call(solver, path=path)
    g = {"theta": theta - c["t"]}
    lam = float(linsolve.power_iteration(lambda v: {"theta": c["A"] @ v["theta"]}, g, 11))
    d = result.diagnostics
    delta = 0.3 * lam
    assert d["lambda_max"] == pytest.approx(lam, rel=1e-12) and d["damping"] == pytest.approx(delta, rel=1e-12)
    assert d["alpha"] == pytest.approx(1.0 / (lam + delta), rel=1e-12)
    assert d["hvp_count"] == 11 + 7  # the power iteration once, then terms − 1 products + the residual
    # the 7-term series on A + δI with that alpha, in closed form
    Ad = c["A"] + delta * torch.eye(6, dtype=F64)
    step = torch.eye(6, dtype=F64) - d["alpha"] * Ad
    x = d["alpha"] * sum(torch.linalg.matrix_power(step, j) for j in range(7)) @ (theta - c["t"])
    assert torch.allclose(result.hypergrad["phi"], c["C"] @ outer["phi"] - c["B"].T @ x, rtol=1e-10, atol=1e-12)


def test_relative_damping_in_float32_reports_delta_and_alpha_computed_from_the_reported_lambda():
    """float32 params: λ̂ is read once as a Python float and δ = damping·λ̂, α = 1/(λ̂ + δ) are formed from it in
    double precision, so the reported numbers satisfy those identities exactly; the hypergradient is the float64
    damped IFT with that δ at θ_K to float32 accuracy (≤ 1e-5 relative)."""
    problem, inner, outer, c = quadratic(dtype=torch.float32)
    solver = Implicit(linsolve=linsolve.Neumann(terms=60, power_iterations=11), warm_start=False, damping=0.3,
                      relative_damping=True, stationarity_rtol=0.0)
    result = solver(problem, inner, outer, None, None, bilevel.InnerLoop(steps=60, lr=0.3), None)
    d = result.diagnostics
    assert d["damping"] == 0.3 * d["lambda_max"] and d["alpha"] == 1.0 / (d["lambda_max"] + d["damping"])
    c64 = {k: v.double() for k, v in c.items()}
    expected, _ = ift(c64, {"phi": outer["phi"].double()}, result.inner["theta"].double(), d["damping"])
    assert float((result.hypergrad["phi"].double() - expected).norm() / expected.norm()) <= 1e-5


def test_relative_damping_keeps_a_fixed_alpha():
    solver = Implicit(linsolve=linsolve.Neumann(alpha=0.1, terms=7), warm_start=False, damping=0.3,
                      relative_damping=True, stationarity_rtol=0.0)
    result, *_ = call(solver)
    assert result.diagnostics["alpha"] == 0.1


def test_relative_damping_without_damping_does_nothing():
    solver = Implicit(linsolve=linsolve.CG(rtol=1e-13), warm_start=False, relative_damping=True,
                      stationarity_rtol=0.0)
    result, c, outer, inner, theta, _, _ = call(solver)
    assert "lambda_max" not in result.diagnostics and "damping" not in result.diagnostics
    assert result.diagnostics["hvp_count"] == result.diagnostics["iterations"] + 1


def test_auto_alpha_reports_the_linear_solver_s_lambda_max():
    solver = Implicit(linsolve=linsolve.Neumann(terms=5, power_iterations=9), warm_start=False, stationarity_rtol=0.0)
    result, c, outer, inner, theta, _, _ = call(solver)
    lam = float(linsolve.power_iteration(lambda v: {"theta": c["A"] @ v["theta"]}, {"theta": theta - c["t"]}, 9))
    assert result.diagnostics["lambda_max"] == pytest.approx(lam, rel=1e-12)
    assert result.diagnostics["alpha"] == pytest.approx(1 / lam, rel=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_fwdrev_spends_one_more_gradient_and_gives_the_same_numbers(path):
    auto = Implicit(linsolve=linsolve.CG(rtol=1e-13), warm_start=False, stationarity_rtol=0.0)
    fwd = Implicit(linsolve=linsolve.CG(rtol=1e-13), hvp="fwdrev", warm_start=False, stationarity_rtol=0.0)
    a, c, outer, inner, theta, _, _ = call(auto, path=path)
    f, *_ = call(fwd, path=path)
    assert f.diagnostics["evaluations"] == a.diagnostics["evaluations"] + 1 == 62
    assert f.diagnostics["inner_grad_norm"] == pytest.approx(grad_norm(c, outer, theta), rel=1e-10)
    assert torch.allclose(f.hypergrad["phi"], a.hypergrad["phi"], rtol=1e-12, atol=1e-14)


def test_stationarity_warning_names_the_numbers_and_respects_its_bound():
    """After 5 steps ‖∇θG‖ is far above 1e-3 of its start: a StationarityWarning with the measured ratio."""
    result, c, outer, inner, theta, _, caught = call(Implicit(linsolve=linsolve.Exact(), warm_start=False), steps=5)
    rel = grad_norm(c, outer, theta) / grad_norm(c, outer, inner["theta"])
    stationarity = [w for w in caught if issubclass(w.category, StationarityWarning)]
    assert len(stationarity) == 1
    message = str(stationarity[0].message)
    assert f"after 5 inner steps ‖∇θG(θ_K)‖ = {grad_norm(c, outer, theta):.3g}, {rel:.3g} of its start" in message
    assert "stationarity_rtol=0.001" in message
    # a bound just above the measured ratio is met: no warning; just below: a warning
    _, *_, caught = call(Implicit(linsolve=linsolve.Exact(), warm_start=False, stationarity_rtol=rel * 1.001),
                         steps=5)
    assert not [w for w in caught if issubclass(w.category, StationarityWarning)]
    _, *_, caught = call(Implicit(linsolve=linsolve.Exact(), warm_start=False, stationarity_rtol=rel * 0.999),
                         steps=5)
    assert len([w for w in caught if issubclass(w.category, StationarityWarning)]) == 1
    # 0 switches it off; so does K = 0 (the ratio is 1 by construction)
    _, *_, caught = call(Implicit(linsolve=linsolve.Exact(), warm_start=False, stationarity_rtol=0.0), steps=5)
    assert not [w for w in caught if issubclass(w.category, StationarityWarning)]
    zero, *_, caught = call(Implicit(linsolve=linsolve.Exact(), warm_start=False), steps=0)
    assert not [w for w in caught if issubclass(w.category, StationarityWarning)]
    assert zero.diagnostics["inner_grad_norm_rel"] == 1.0 and math.isnan(zero.diagnostics["inner_loss"])


def recording(problem):
    """``problem`` with every loss evaluation logged as whether a torch.func transform was active around it."""
    log = {"inner": [], "outer": []}

    def inner_loss(inner, outer, batch):
        log["inner"].append(transforms_active())
        return problem.inner(inner, outer, batch)

    def outer_loss(inner, outer, batch):
        log["outer"].append(transforms_active())
        return problem.outer(inner, outer, batch)

    return bilevel.BilevelProblem(inner_loss, outer_loss), log


@pytest.mark.parametrize("hvp", ["auto", "revrev", "fwdrev"])
@pytest.mark.parametrize("path", PATHS)
def test_every_loss_evaluation_runs_on_the_chosen_path_and_is_counted(path, hvp):
    """Counting wrapper on G and F (CG, K = 10). On the tape the K steps, the one ``create_graph`` gradient at θ_K
    (whose graph serves every HVP and the mixed term) and the gradient at θ_0 cost K + 2 evaluations of G;
    torch.func linearises ∇θG for the HVPs and again for the mixed vjp: K + 3. ``fwdrev`` recomputes the
    gradient per product, on both paths: K + matvecs + 3 (the products, ∇θG(θ_K), the mixed term, θ_0).
    F is evaluated once. Every evaluation runs on torch.func exactly when the path is ``func``."""
    problem, inner, outer, c = quadratic()
    counted, log = recording(problem)
    steps = 10
    solver = Implicit(linsolve=linsolve.CG(rtol=1e-13), hvp=hvp, warm_start=False, stationarity_rtol=0.0)
    with bilevel.autodiff_path(path):
        result = solver(counted, inner, outer, None, None, bilevel.InnerLoop(steps=steps, lr=0.3), None)
    d = result.diagnostics
    theta, _ = sgd_path(c, outer, inner["theta"], steps, 0.3)
    assert torch.allclose(result.hypergrad["phi"], ift(c, outer, theta)[0], rtol=1e-10, atol=1e-12)
    assert d["autodiff_path"] == path and d["iterations"] == 6.0 and d["hvp_count"] == 7.0
    expected = steps + {"auto": 2, "revrev": 2, "fwdrev": 7 + 3}[hvp] + (path == "func" and hvp != "fwdrev")
    assert len(log["inner"]) == expected
    assert log["inner"] == [path == "func"] * expected and log["outer"] == [path == "func"]
    assert d["evaluations"] == steps + 1 + (hvp == "fwdrev")


class GradModeProbe(torch.autograd.Function):
    """The identity; its backward logs whether grad mode is on, i.e. whether that backward pass records a graph
    (``create_graph=True``)."""

    log: list = []

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        GradModeProbe.log.append(torch.is_grad_enabled())
        return g


def test_the_inner_loop_records_no_graph_on_the_tape():
    """G closes over a weight w = 1 that requires grad (as a frozen network's parameters may), which would make an
    automatic ``create_graph`` choice record the loop. The K steps' backward passes must all run without a graph;
    the one ``create_graph`` gradient is the linearisation at θ_K, then the plain gradient at θ_0."""
    problem, inner, outer, c = quadratic()
    w = torch.tensor(1.0, dtype=F64, requires_grad=True)
    probed = bilevel.BilevelProblem(lambda i, o, b: GradModeProbe.apply(w * problem.inner(i, o, b)), problem.outer)
    GradModeProbe.log = []
    solver = Implicit(linsolve=linsolve.CG(rtol=1e-13), warm_start=False, stationarity_rtol=0.0)
    with bilevel.autodiff_path("autograd"):
        result = solver(probed, inner, outer, None, None, bilevel.InnerLoop(steps=10, lr=0.3), None)
    assert GradModeProbe.log == [False] * 10 + [True, False]
    theta, _ = sgd_path(c, outer, inner["theta"], 10, 0.3)
    assert torch.allclose(result.hypergrad["phi"], ift(c, outer, theta)[0], rtol=1e-10, atol=1e-12)
    assert not result.hypergrad["phi"].requires_grad and not result.inner["theta"].requires_grad


@pytest.mark.parametrize("path", PATHS)
def test_minibatches_the_hessian_is_taken_on_the_batch_after_the_last_step(path):
    """G_k(θ, φ) = ½θᵀ(A + s_k I)θ + θᵀBφ − bᵀθ on inner batch k (a callable), F = ½w‖θ − t‖² + ½φᵀCφ on a fixed
    outer batch. The K steps use batches 0..K−1; H, the mixed term and both stationarity gradients use batch K:
    the hypergradient is Cφ − Bᵀ(A + s_K I)⁻¹ w(θ_K − t)."""
    _, inner, outer, c = quadratic()
    A, B, b, t, C = c["A"], c["B"], c["b"], c["t"], c["C"]
    shifts = [0.1 * k for k in range(8)]
    eye = torch.eye(6, dtype=F64)

    def inner_loss(i, o, batch):
        th = i["theta"]
        return 0.5 * th @ ((A + batch["s"] * eye) @ th) + th @ (B @ o["phi"]) - b @ th

    def outer_loss(i, o, batch):
        return 0.5 * batch["w"] * ((i["theta"] - t) ** 2).sum() + 0.5 * o["phi"] @ (C @ o["phi"])

    problem = bilevel.BilevelProblem(inner_loss, outer_loss)
    inner_batch = lambda k: {"s": torch.tensor(shifts[k], dtype=F64)}
    outer_batch = {"w": torch.tensor(1.7, dtype=F64)}
    steps, lr = 5, 0.3
    solver = Implicit(linsolve=linsolve.CG(rtol=1e-13), warm_start=False, stationarity_rtol=0.0)
    with bilevel.autodiff_path(path):
        result = solver(problem, inner, outer, inner_batch, outer_batch, bilevel.InnerLoop(steps=steps, lr=lr), None)
    th, phi = inner["theta"].clone(), outer["phi"]
    grad_at = lambda x, k: (A + shifts[k] * eye) @ x + B @ phi - b
    for k in range(steps):
        th = th - lr * grad_at(th, k)
    expected = C @ phi - B.T @ torch.linalg.solve(A + shifts[steps] * eye, 1.7 * (th - t))
    assert torch.allclose(result.hypergrad["phi"], expected, rtol=1e-10, atol=1e-12)
    d = result.diagnostics
    norm_k, norm_0 = float(grad_at(th, steps).norm()), float(grad_at(inner["theta"], steps).norm())
    assert d["inner_grad_norm"] == pytest.approx(norm_k, rel=1e-12)
    assert d["inner_grad_norm_rel"] == pytest.approx(norm_k / norm_0, rel=1e-12)
    assert d["outer_loss"] == pytest.approx(float(0.5 * 1.7 * ((th - t) ** 2).sum() + 0.5 * phi @ C @ phi), rel=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_under_autocast_the_ift_runs_in_full_precision(path):
    """float32 params, the whole call under CPU bf16 autocast: the loop may run in bf16, but the gradients at θ_K,
    the HVPs and the solve run in float32, so the hypergradient matches the float64 IFT at the θ_K the loop reached
    to float32 accuracy (≤ 1e-5 relative; bf16 products would leave ~1e-2)."""
    problem, inner, outer, c = quadratic(dtype=torch.float32)
    solver = Implicit(linsolve=linsolve.CG(rtol=1e-6), warm_start=False, stationarity_rtol=0.0)
    with bilevel.autodiff_path(path), torch.autocast("cpu", dtype=torch.bfloat16):
        result = solver(problem, inner, outer, None, None, bilevel.InnerLoop(steps=60, lr=0.3), None)
    c64 = {k: v.double() for k, v in c.items()}
    theta, phi = result.inner["theta"].double(), {"phi": outer["phi"].double()}
    expected, _ = ift(c64, phi, theta)
    assert result.hypergrad["phi"].dtype == torch.float32
    assert float((result.hypergrad["phi"].double() - expected).norm() / expected.norm()) <= 1e-5
    assert result.diagnostics["inner_grad_norm"] == pytest.approx(grad_norm(c64, phi, theta), rel=1e-5)


@pytest.mark.filterwarnings("ignore:Neumann did not converge")  # 7 terms on purpose: compared row by row
@pytest.mark.parametrize("linear, options", [
    (linsolve.CG(rtol=1e-13), {}),
    (linsolve.Neumann(terms=7, power_iterations=11), {"damping": 0.3, "relative_damping": True}),
])
def test_under_vmap_each_row_matches_the_unbatched_call(linear, options):
    """vmap over three outer points: every row's hypergradient, damping, λ̂ and α equal the unbatched call at that
    point (which the tests above hold to closed forms), and ``converged`` is NaN: under vmap it cannot be known."""
    problem, inner, outer, c = quadratic()
    loop = bilevel.InnerLoop(steps=60, lr=0.3)
    solver = Implicit(linsolve=linear, warm_start=False, **options)
    phis = torch.stack([outer["phi"], 2 * outer["phi"], -outer["phi"]])
    host = {}

    def one(phi):
        result = solver(problem, inner, {"phi": phi}, None, None, loop, None)
        host.update({k: v for k, v in result.diagnostics.items() if not torch.is_tensor(v)})
        return result.hypergrad["phi"], {k: v for k, v in result.diagnostics.items() if torch.is_tensor(v)}

    rows, batched = torch.func.vmap(one)(phis)
    assert math.isnan(host["converged"]) and host["autodiff_path"] == "func"
    for i, phi in enumerate(phis):
        single = solver(problem, inner, {"phi": phi}, None, None, loop, None)
        theta, _ = sgd_path(c, {"phi": phi}, inner["theta"], 60, 0.3)
        assert torch.allclose(rows[i], single.hypergrad["phi"], rtol=1e-10, atol=1e-12)
        if not options:
            assert torch.allclose(rows[i], ift(c, {"phi": phi}, theta)[0], rtol=1e-10, atol=1e-12)
        for key in ("damping", "lambda_max", "alpha"):
            assert (key in batched) == (key in single.diagnostics)
            if key in batched:
                assert float(batched[key][i]) == pytest.approx(single.diagnostics[key], rel=1e-12)


def test_the_stationarity_bound_is_strict():
    """The warning fires when the ratio EXCEEDS stationarity_rtol: a bound equal to the measured ratio is met."""
    problem, inner, outer, c = quadratic()
    loop = bilevel.InnerLoop(steps=5, lr=0.3)
    first = Implicit(linsolve=linsolve.CG(rtol=1e-13), warm_start=False, stationarity_rtol=0.0)(
        problem, inner, outer, None, None, loop, None)
    rel = first.diagnostics["inner_grad_norm_rel"]
    theta, _ = sgd_path(c, outer, inner["theta"], 5, 0.3)
    assert rel == pytest.approx(grad_norm(c, outer, theta) / grad_norm(c, outer, inner["theta"]), rel=1e-10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Implicit(linsolve=linsolve.CG(rtol=1e-13), warm_start=False, stationarity_rtol=rel)(
            problem, inner, outer, None, None, loop, None)
    assert not [w for w in caught if issubclass(w.category, StationarityWarning)]


@pytest.mark.skipif(hasattr(Implicit._warn_if_not_stationary, "__wrapped__"),
                    reason="the mutation tool's trampolines add frames between the library's functions")
def test_the_stationarity_warning_points_at_the_line_that_called_hypergrad():
    """stacklevel: raised through ``bilevel.hypergrad``, the warning is attributed to the caller's line."""
    problem, inner, outer, _ = quadratic()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        bilevel.hypergrad(problem, inner, outer, inner_batch=None, outer_batch=None,
                          loop=bilevel.InnerLoop(steps=5, lr=0.3),
                          solver=Implicit(linsolve=linsolve.CG(rtol=1e-13), warm_start=False))
    stationarity = [w for w in caught if issubclass(w.category, StationarityWarning)]
    assert len(stationarity) == 1
    assert (stationarity[0].filename, stationarity[0].lineno) == (__file__, line)


def test_the_stationarity_warning_skips_exactly_the_three_library_frames(monkeypatch):
    """The stacklevel itself, 4 (``warnings.warn`` ← ``_warn_if_not_stationary`` ← ``__call__`` ← ``hypergrad`` ←
    the caller), read from the call: the test above checks where that lands, but cannot run under the mutation
    tool, whose wrappers add frames."""
    calls = []
    monkeypatch.setattr(warnings, "warn", lambda message, category=None, stacklevel=1, **kw:
                        calls.append((category, stacklevel)))
    call(Implicit(linsolve=linsolve.Exact(), warm_start=False), steps=5)
    assert calls == [(StationarityWarning, 4)]


@pytest.mark.parametrize("path", PATHS)
def test_an_exactly_zero_hypergradient_warns_naming_the_solver(path):
    """φ reaches neither loss (0·Σφ keeps it in G's graph): ∇φF = 0 and the mixed term is 0, so the hypergradient
    is exactly 0 and the warning names ``Implicit(CG)``."""
    _, inner, outer, c = quadratic()
    A, b, t = c["A"], c["b"], c["t"]
    problem = bilevel.BilevelProblem(
        lambda i, o, batch: 0.5 * i["theta"] @ (A @ i["theta"]) - b @ i["theta"] + 0.0 * o["phi"].sum(),
        lambda i, o, batch: 0.5 * ((i["theta"] - t) ** 2).sum())
    with warnings.catch_warnings(record=True) as caught, bilevel.autodiff_path(path):
        warnings.simplefilter("always")
        result = Implicit(linsolve=linsolve.CG(rtol=1e-13), warm_start=False, stationarity_rtol=0.0)(
            problem, inner, outer, None, None, bilevel.InnerLoop(steps=5, lr=0.3), None)
    assert torch.equal(result.hypergrad["phi"], torch.zeros(3, dtype=F64))
    zero = [str(w.message) for w in caught if issubclass(w.category, ZeroHypergradientWarning)]
    assert len(zero) == 1 and "solver Implicit(CG) returned a hypergradient that is exactly zero" in zero[0]


def test_weight_decay_is_refused_with_the_fix():
    problem, inner, outer, c = quadratic()
    with pytest.raises(ValueError, match=r"InnerLoop.weight_decay=0.01 moves the loop's fixed point.*put the L2 "
                                         r"term in inner_loss"):
        Implicit()(problem, inner, outer, None, None, bilevel.InnerLoop(steps=3, weight_decay=0.01), None)


def test_options_are_validated():
    with pytest.raises(ValueError, match=r"hvp must be one of \('auto', 'fwdrev', 'revrev'\), got 'rev'"):
        Implicit(hvp="rev")
    with pytest.raises(TypeError, match="Implicit.linsolve must be a linear solver from bilevel.linsolve, got 3"):
        Implicit(linsolve=3)
    with pytest.raises(ValueError, match="warm_start=True, but Exact takes no starting point; use warm_start=false"):
        Implicit(linsolve=linsolve.Exact())
    Implicit(linsolve=linsolve.Exact(), warm_start=False)
    Implicit(linsolve=lambda matvec, b, x0: (b, None))  # a plain callable may take a start
    with pytest.raises(ValueError, match="damping must be >= 0, got -0.1"):
        Implicit(damping=-0.1)
    with pytest.raises(ValueError, match=r"stationarity_rtol must be >= 0 \(0 switches the stationarity warning "
                                         r"off\), got -1"):
        Implicit(stationarity_rtol=-1.0)
    Implicit(damping=0.0, stationarity_rtol=0.0)  # the bounds are valid
    assert Implicit().init(None, None, None) is None
    assert Implicit() == Implicit(linsolve=linsolve.CG(), hvp="auto", warm_start=True, damping=0.0,
                                  relative_damping=False, stationarity_rtol=1e-3)
