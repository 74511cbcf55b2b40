"""The Nyström linear solver (``bilevel.Nystrom``, registered as ``nystrom``) against dense float64 solves.

What it computes (Hataya & Yamada, arXiv:2302.09726): x = (H_k + ρI)⁻¹ b with the rank-k Nyström approximation
H_k = H[:, K] H[K, K]⁺ H[K, :] at a seeded index set K of k coordinates, by the Woodbury identity; a damped matvec
H + δI joins δ to the ridge: x = (H_k + (δ + ρ)I)⁻¹ b. So:
- k = dim θ gives H_k = H: x is the dense solve of (H + ρI) to rounding (bound 1e-10 relative; the Woodbury form's
  rounding error is about eps·λ_max/ρ ≈ 1e-13 here);
- k < dim θ: the same as a dense solve with the H_k built from the same K (bound 1e-10);
- the error against (H + ρI)⁻¹ b falls as k grows, on a spectrum that decays (measured numbers in the test);
- the reported residual is the true ‖b − Hx‖/‖b‖ of the returned x, and ``converged`` is exactly residual ≤ rtol.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import bilevel
from bilevel.linsolve import Damped, Nystrom
from oracles import rel_error, ridge, ridge_hypergrad, ridge_solution
from test_counts_exact import GENERAL, K, N, PATHS, CountingQuadratic, assert_counts, spd

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented "
                                        "the batching rule for bilevel_count_tests")

DT = torch.float64
CONVERGED = bilevel.InnerLoop(steps=300, lr=0.5)  # contraction ≤ 0.8 per step on the ridge oracle


def spectrum_matrix(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Q diag(eigenvalues) Qᵀ in a random orthonormal basis (so no coordinate is special)."""
    n = eigenvalues.numel()
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=DT))
    return q @ torch.diag(eigenvalues.to(DT)) @ q.T


def split(H: torch.Tensor, seed: int = 1):
    """A matvec of H on a two-leaf params dict ({"a": (3,), "b": (n − 3,)}) and a random right-hand side b."""
    n = H.shape[0]
    shapes = {"a": (3,), "b": (n - 3,)}
    like = {k: torch.zeros(s, dtype=DT) for k, s in shapes.items()}

    def matvec(v):
        return bilevel.tree.unflatten(H @ bilevel.tree.flatten(v), like)

    gen = torch.Generator().manual_seed(seed)
    b = {k: torch.randn(s, generator=gen, dtype=DT) for k, s in shapes.items()}
    return matvec, b


def dense_nystrom(H: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """H[:, K] H[K, K]⁺ H[K, :] built densely."""
    C = H[:, index]
    return C @ torch.linalg.pinv(H[index][:, index], hermitian=True) @ C.T


def solve(solver, matvec, b):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x, info = solver(matvec, b)
    return bilevel.tree.flatten(x), info, [w for w in caught if issubclass(w.category, bilevel.ConvergenceWarning)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---- exactness ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rho", [1e-3, 0.1, 1.0])
def test_rank_equal_to_dim_theta_is_the_dense_ridged_solve(rho):
    """k = n: H_k = H, so x = (H + ρI)⁻¹ b; rank above n is capped at n (same K, same x, n + 1 products)."""
    H = spectrum_matrix(torch.linspace(0.05, 3.0, 12))
    matvec, b = split(H)
    want = torch.linalg.solve(H + rho * torch.eye(12, dtype=DT), bilevel.tree.flatten(b))
    x, info, _ = solve(Nystrom(rank=12, rho=rho), matvec, b)
    assert rel(x, want) <= 1e-10
    assert (info.matvecs, info.iterations) == (12 + 1, 1)
    capped, capped_info, _ = solve(Nystrom(rank=500, rho=rho), matvec, b)
    assert torch.equal(capped, x) and capped_info.matvecs == 12 + 1


@pytest.mark.parametrize("delta, rho", [(0.3, 0.0), (0.3, 0.05)])
def test_a_damped_matvec_joins_the_ridge(delta, rho):
    """With Damped(H, δ) the columns are those of H and the solve is (H_k + (δ + ρ)I) x = b: at k = n the dense
    (H + (δ + ρ)I)⁻¹ b; at k < n the dense solve with H's own Nyström approximation (not that of H + δI). The
    residual is measured with the damped matvec."""
    H = spectrum_matrix(torch.linspace(0.05, 3.0, 12))
    matvec, b = split(H)
    flat_b, eye = bilevel.tree.flatten(b), torch.eye(12, dtype=DT)
    x, info, _ = solve(Nystrom(rank=12, rho=rho), Damped(matvec, delta), b)
    assert rel(x, torch.linalg.solve(H + (delta + rho) * eye, flat_b)) <= 1e-10
    solver = Nystrom(rank=5, rho=rho, seed=3)
    x, info, _ = solve(solver, Damped(matvec, delta), b)
    H_k = dense_nystrom(H, solver.indices(12))
    assert rel(x, torch.linalg.solve(H_k + (delta + rho) * eye, flat_b)) <= 1e-10
    assert rel(x, torch.linalg.solve(dense_nystrom(H + delta * eye, solver.indices(12)) + rho * eye, flat_b)) > 1e-2
    true = float((flat_b - (H + delta * eye) @ x).norm() / flat_b.norm())
    assert info.residual == pytest.approx(true, rel=1e-9)


@pytest.mark.parametrize("rank, seed", [(1, 0), (3, 0), (5, 7), (9, 2)])
def test_low_rank_solve_is_the_dense_solve_with_the_same_nystrom_approximation(rank, seed):
    """k < n: x = (H_k + ρI)⁻¹ b with H_k built densely from the solver's own index set K (k distinct
    coordinates, the first k of one seeded permutation, so nested in k)."""
    H = spectrum_matrix(torch.linspace(0.05, 3.0, 12))
    matvec, b = split(H)
    solver = Nystrom(rank=rank, rho=0.1, seed=seed)
    index = solver.indices(12)
    assert index.numel() == rank and len(set(index.tolist())) == rank
    assert torch.equal(index, Nystrom(rank=12, seed=seed).indices(12)[:rank])
    x, info, _ = solve(solver, matvec, b)
    want = torch.linalg.solve(dense_nystrom(H, index) + 0.1 * torch.eye(12, dtype=DT), bilevel.tree.flatten(b))
    assert rel(x, want) <= 1e-10
    assert info.matvecs == rank + 1


def test_singular_sampled_block_uses_the_pseudo_inverse():
    """H with a zero row and column (a coordinate with no curvature, e.g. a dead unit): H[K, K] is singular when
    K holds it; the pseudo-inverse drops that direction and the solve stays finite and exact at k = n."""
    H = spectrum_matrix(torch.linspace(0.2, 2.0, 8))
    H[2, :] = 0.0
    H[:, 2] = 0.0
    matvec, b = split(H)
    x, _, _ = solve(Nystrom(rank=8, rho=0.1), matvec, b)
    assert rel(x, torch.linalg.solve(H + 0.1 * torch.eye(8, dtype=DT), bilevel.tree.flatten(b))) <= 1e-10


# ---- the error falls as the rank grows ------------------------------------------------------------------------------

def test_error_against_the_dense_solve_falls_as_the_rank_grows():
    """H of size 40 with eigenvalues 0.6^i (1 down to 2e-9) in a random basis, ρ = 1e-3. Measured relative errors
    of x_k against (H + ρI)⁻¹ b (seed 0): 0.78, 0.71, 0.68, 0.62, 0.21, 0.063, 0.046, 4.3e-3, 4.3e-4, 4.5e-14 at
    k = 1, 2, 4, 8, 12, 16, 20, 24, 32, 40. Asserted: strictly falling, and the bounds below (each about 3x off the
    measured value). Exactly, for nested K and H ⪰ 0, H_k grows in the Loewner order towards H, so
    bᵀ(x_k − x) ≥ 0 falls monotonically: asserted to rounding."""
    n, rho = 40, 1e-3
    H = spectrum_matrix(0.6 ** torch.arange(n, dtype=DT))
    matvec, b = split(H)
    flat_b = bilevel.tree.flatten(b)
    want = torch.linalg.solve(H + rho * torch.eye(n, dtype=DT), flat_b)
    ranks = [1, 2, 4, 8, 12, 16, 20, 24, 32, 40]
    errors, quadratic = [], []
    for k in ranks:
        x, _, _ = solve(Nystrom(rank=k, rho=rho, seed=0), matvec, b)
        errors.append(rel(x, want))
        quadratic.append(float(flat_b @ (x - want)))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    bounds = {1: (0.3, None), 8: (0.2, None), 16: (None, 0.2), 24: (None, 1.5e-2), 32: (None, 1.5e-3),
              40: (None, 1e-10)}
    for k, (low, high) in bounds.items():
        e = errors[ranks.index(k)]
        assert (low is None or e >= low) and (high is None or e <= high), (k, e)
    tol = 1e-9 * quadratic[0]
    assert all(q >= -tol for q in quadratic) and all(a >= b - tol for a, b in zip(quadratic, quadratic[1:])), quadratic


# ---- honest residual and converged ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [3, 12])
def test_residual_is_the_true_one_and_converged_means_residual_within_rtol(rank):
    """residual = ‖b − Hx‖/‖b‖ of the returned x (dense, float64); converged ⇔ residual ≤ rtol, with a warning
    naming the residual, rtol and the larger of its two parts first: the low-rank error (raise rank) at k = 3,
    the ridge alone (lower rho) at k = n, where ‖b − Hx‖ = ρ‖x‖ exactly."""
    H = spectrum_matrix(torch.linspace(0.05, 3.0, 12))
    matvec, b = split(H)
    flat_b = bilevel.tree.flatten(b)
    x, info, caught = solve(Nystrom(rank=rank, rho=0.1), matvec, b)
    true = float((flat_b - H @ x).norm() / flat_b.norm())
    assert info.residual == pytest.approx(true, rel=1e-9) and info.residual > 1e-3
    assert info.converged is False and len(caught) == 1
    message = str(caught[0].message)
    assert f"{info.residual:.3g}" in message and "rtol=1e-06" in message
    if rank == 12:
        assert info.residual == pytest.approx(0.1 * float(x.norm() / flat_b.norm()), rel=1e-9)
        assert "lower rho (now 0.1)" in message and "rank already samples all 12 coordinates" in message
    else:
        assert message.index("raise rank (now 3 of dim θ = 12") < message.index("lower rho")
    loose, loose_info, loose_caught = solve(Nystrom(rank=rank, rho=0.1, rtol=true * 1.001), matvec, b)
    assert loose_info.converged is True and not loose_caught and torch.equal(loose, x)
    tight_info = solve(Nystrom(rank=rank, rho=0.1, rtol=true * 0.999), matvec, b)[1]
    assert tight_info.converged is False


def test_hypergrad_reports_the_solve_honestly():
    """Through hypergrad: residual, converged and the warning are the linear solve's."""
    problem, inner, outer, ib, ob = ridge()
    args = dict(inner_batch=ib, outer_batch=ob, loop=CONVERGED)
    with pytest.warns(bilevel.ConvergenceWarning, match=r"Nystrom did not converge.*rtol=1e-06.*lower rho"):
        d = bilevel.hypergrad(problem, inner, outer, solver="nystrom:rank=5,rho=0.1", **args).diagnostics
    assert d["converged"] == 0.0 and 1e-2 < d["residual"] < 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", bilevel.ConvergenceWarning)
        d = bilevel.hypergrad(problem, inner, outer, solver="nystrom:rank=5,rho=1e-4,rtol=1e-3", **args).diagnostics
    assert d["converged"] == 1.0 and d["residual"] <= 1e-3 and d["iterations"] == 1.0


# ---- the hypergradient --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["autograd", "func"])
@pytest.mark.parametrize("spec, ridge_", [("nystrom:rank=5,rho=0.1", 0.1), ("nystrom:rank=5,rho=1e-4", 1e-4),
                                          ("nystrom:rank=5,rho=0,damping=0.3", 0.3),
                                          ("nystrom:rank=5,rho=0.05,damping=0.25", 0.3)])
def test_hypergradient_at_full_rank_is_the_ridged_closed_form(spec, ridge_, path):
    """rank = dim θ = 5 on the ridge oracle: the IFT hypergradient with (H + (δ + ρ)I)⁻¹ in place of H⁻¹
    (bound 1e-10), on both autodiff paths; and close to the exact IFT one as ρ → 0 (bias O(ρ/λ_min))."""
    problem, inner, outer, ib, ob = ridge()
    with warnings.catch_warnings(), bilevel.autodiff_path(path):
        warnings.simplefilter("ignore", bilevel.ConvergenceWarning)
        result = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver=spec, loop=CONVERGED)
    assert rel_error(result.hypergrad, ridge_hypergrad(outer, ib, ob, ridge=ridge_)) <= 1e-10
    if ridge_ == 1e-4:
        assert rel_error(result.hypergrad, ridge_hypergrad(outer, ib, ob)) <= 1e-3


def test_hypergradient_at_low_rank_uses_the_nystrom_approximation_of_the_same_index_set():
    """rank = 2 < 5: the closed form with (H_k + ρI)⁻¹, H_k from the solver's own K (bound 1e-10); far from the IFT
    value, as a rank-2 sketch of a 5 × 5 Hessian with a flat spectrum must be."""
    problem, inner, outer, ib, ob = ridge()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bilevel.ConvergenceWarning)
        got = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver="nystrom:rank=2,rho=0.1",
                                loop=CONVERGED).hypergrad
    w, H = ridge_solution(outer, ib)
    Xv, yv = ob
    g_w = Xv.T @ (Xv @ w["w"] - yv) / Xv.shape[0]
    H_k = dense_nystrom(H, Nystrom(rank=2).indices(5))
    x = torch.linalg.solve(H_k + 0.1 * torch.eye(5, dtype=DT), g_w)
    assert rel_error(got, {"log_lambda": -torch.exp(outer["log_lambda"]) * w["w"] * x}) <= 1e-10
    assert rel_error(got, ridge_hypergrad(outer, ib, ob)) > 0.1


def test_vmap_over_outer_params_matches_the_loop_and_reports_a_batched_residual():
    """Under vmap the same K serves every row, the residual is a batched tensor and converged is NaN."""
    problem, inner, outer, ib, ob = ridge()

    def one(log_lambda):
        return bilevel.hypergrad(problem, inner, {"log_lambda": log_lambda}, inner_batch=ib, outer_batch=ob,
                                 solver="nystrom:rank=3,rho=0.1,damping=0.1,relative_damping=true",
                                 loop=bilevel.InnerLoop(steps=60, lr=0.5))

    stacked = torch.stack([outer["log_lambda"], outer["log_lambda"] + 0.2])
    seen = []

    def batched_row(log_lambda):
        result = one(log_lambda)
        seen.append(result.diagnostics["converged"])
        return result.hypergrad["log_lambda"], result.diagnostics["residual"]

    grads, residuals = torch.func.vmap(batched_row)(stacked)
    assert len(seen) == 1 and math.isnan(seen[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bilevel.ConvergenceWarning)
        rows = [one(ll) for ll in stacked]
    for i, row in enumerate(rows):
        assert torch.allclose(grads[i], row.hypergrad["log_lambda"], rtol=1e-12, atol=1e-15)
        assert float(residuals[i]) == pytest.approx(row.diagnostics["residual"], rel=1e-9)


def test_solve_differentiates_through_the_nystrom_solve():
    """bilevel.solve with nystrom: the gradient of F(θ*(φ)) is the ridged closed form (rank = dim θ)."""
    problem, inner, outer, ib, ob = ridge()
    log_lambda = outer["log_lambda"].clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", bilevel.ConvergenceWarning)
        theta = bilevel.solve(problem, inner, {"log_lambda": log_lambda}, inner_batch=ib,
                              solver="nystrom:rank=5,rho=0.1", loop=CONVERGED)
        problem.outer_loss(theta, {"log_lambda": log_lambda}, ob).backward()
    assert rel_error({"log_lambda": log_lambda.grad}, ridge_hypergrad(outer, ib, ob, ridge=0.1)) <= 1e-10


# ---- counts ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("spec, hessian", [
    ("nystrom:rank=2", 2 + 1),                                   # k columns (one batched call) + the residual's
    ("nystrom:rank=2,hvp=fwdrev", 2 + 1),
    ("nystrom:rank=9", N + 1),                                   # rank capped at dim θ = N
    ("nystrom:rank=3,rho=0,damping=0.1,relative_damping=true", 20 + 3 + 1),  # + the power iterations behind δ
])
def test_hvp_count_is_what_was_spent(spec, hessian, path):
    """hvp_count = the counted products with H (each vector of a batched product counted), one mixed product, and
    evaluations = K steps + ∇G(θ_0) (+ the explicit ∇G(θ_K) of fwdrev)."""
    q = CountingQuadratic(spd(GENERAL))
    result = q.hypergrad(spec, path)
    assert_counts(result, q.counts, hvp_count=hessian, hessian=hessian, mixed=1,
                  evaluations=K + 1 + ("fwdrev" in spec), linearising_only=True, iterations=1)


def test_matvecs_counts_every_product_of_a_direct_call():
    """info.matvecs = the products the solver asked for: k columns through ``matmat`` (or k vmapped calls) and one
    plain call for the residual."""
    H = spectrum_matrix(torch.linspace(0.05, 3.0, 12))
    matvec, b = split(H)

    class Counted:
        def __init__(self, with_matmat):
            self.calls = 0
            if with_matmat:
                self.matmat = self._matmat

        def __call__(self, v):
            self.calls += 1
            return matvec(v)

        def _matmat(self, vectors):
            rows = next(iter(vectors.values())).shape[0]
            self.calls += rows
            return torch.func.vmap(matvec)(vectors)

    for with_matmat in (True, False):
        counted = Counted(with_matmat)
        _, info, _ = solve(Nystrom(rank=4, rho=0.1), counted, b)
        # without matmat the k columns are one vmapped call: the Python function runs once for k products
        assert info.matvecs == 4 + 1 and counted.calls == (4 + 1 if with_matmat else 1 + 1)


# ---- bad options ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, match", [
    (dict(rank=0), r"Nystrom\.rank must be an integer >= 1.*got 0"),
    (dict(rank=-3), r"Nystrom\.rank must be an integer >= 1.*got -3"),
    (dict(rank=2.5), r"Nystrom\.rank must be an integer >= 1.*got 2\.5"),
    (dict(rank=True), r"Nystrom\.rank must be an integer"),
    (dict(rho=-0.1), r"Nystrom\.rho must be a finite float >= 0.*got -0\.1"),
    (dict(rho=float("nan")), r"Nystrom\.rho must be a finite float >= 0.*got nan"),
    (dict(rho=float("inf")), r"Nystrom\.rho must be a finite float >= 0.*got inf"),
    (dict(rtol=-1e-3), r"Nystrom\.rtol must be >= 0"),
    (dict(seed=1.5), r"Nystrom\.seed must be an integer"),
])
def test_bad_options_raise_clear_errors(options, match):
    with pytest.raises(ValueError, match=match):
        Nystrom(**options)


@pytest.mark.parametrize("spec, match", [
    ("nystrom:rank=0", r"invalid options for solver 'nystrom': Nystrom\.rank must be an integer >= 1"),
    ("nystrom:rho=-1", r"invalid options for solver 'nystrom': Nystrom\.rho must be a finite float >= 0"),
    ("nystrom:rank=two", r"option 'rank' of solver 'nystrom' must be int, got 'two'"),
    ("nystrom:rho=0", r"Nystrom with rho=0 needs damping > 0"),
    ("nystrom:warm_start=true", r"unknown option 'warm_start' for solver 'nystrom'"),
    ("nystrom:ranks=3", r"unknown option 'ranks' for solver 'nystrom'; valid options: .*rank: int = 10"),
])
def test_bad_specs_raise_spec_errors_before_any_work(spec, match):
    with pytest.raises(bilevel.SpecError, match=match):
        bilevel.make_solver(spec)


def test_rho_zero_without_damping_is_refused_by_a_direct_call():
    H = spectrum_matrix(torch.linspace(0.05, 3.0, 12))
    matvec, b = split(H)
    with pytest.raises(ValueError, match=r"Nystrom needs rho \+ damping > 0.*set rho > 0"):
        Nystrom(rho=0.0)(matvec, b)
    x, _, _ = solve(Nystrom(rank=12, rho=0.0), Damped(matvec, 0.2), b)  # the damping is the ridge
    assert rel(x, torch.linalg.solve(H + 0.2 * torch.eye(12, dtype=DT), bilevel.tree.flatten(b))) <= 1e-10


def test_non_finite_hessian_is_named():
    H = spectrum_matrix(torch.linspace(0.05, 3.0, 12))
    H[0, 0] = float("nan")
    matvec, b = split(H)
    with pytest.raises(bilevel.NonFiniteError, match=r"Nystrom: the sampled Hessian columns H\[:, K\] hold NaN/Inf"):
        Nystrom(rank=12)(matvec, b)


def test_seed_and_resample():
    """The same seed gives the same K at every call; another seed another K; resample draws from torch's default
    generator (reproducible with torch.manual_seed)."""
    assert torch.equal(Nystrom(rank=4, seed=5).indices(30), Nystrom(rank=4, seed=5).indices(30))
    assert not torch.equal(Nystrom(rank=4, seed=5).indices(30), Nystrom(rank=4, seed=6).indices(30))
    torch.manual_seed(11)
    first = Nystrom(rank=4, resample=True).indices(30)
    second = Nystrom(rank=4, resample=True).indices(30)
    torch.manual_seed(11)
    assert torch.equal(Nystrom(rank=4, resample=True).indices(30), first) and not torch.equal(first, second)
