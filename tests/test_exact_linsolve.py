"""The linear solvers of ``bilevel.linsolve`` held to exact values: iterates, counts and diagnostics.

Every number here is computed independently of the solver: a dense ``torch.linalg.solve``, the closed-form
partial sums of the Neumann series S_m = α Σ_{j<m} (I − αH)^j b, the Rayleigh quotient of H^k v₀ for the
power method, or a counting wrapper around the matvec. These tests were written to kill the mutants that
``mutation/run.py linsolve`` found alive (docs/mutation.md).
"""
from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch
from torch.func import vmap

import bilevel
from bilevel import linsolve, tree

F64 = torch.float64


def spd(n: int, cond: float, seed: int = 0) -> torch.Tensor:
    """A symmetric positive-definite matrix with eigenvalues logspaced in [1, cond]."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    return q @ torch.diag(torch.logspace(0, math.log10(cond), n, dtype=F64)) @ q.T


def rhs(n: int, seed: int = 1, key: str = "x") -> dict:
    return {key: torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=F64)}


class Counting:
    """A matvec v ↦ A v on ``{"x": ...}`` that counts its calls (the solvers' ``matvecs`` must equal it)."""

    def __init__(self, A: torch.Tensor):
        self.A, self.calls = A, 0

    def __call__(self, v: dict) -> dict:
        self.calls += 1
        return {"x": self.A @ v["x"]}


def neumann_partial_sum(A, b, alpha, terms, x0=None):
    """x0 + α Σ_{j<terms} (I − αA)^j (b − A x0), in closed form with dense matrices."""
    n = A.shape[0]
    x0 = torch.zeros(n, dtype=F64) if x0 is None else x0
    step = torch.eye(n, dtype=F64) - alpha * A
    total = sum(torch.linalg.matrix_power(step, j) for j in range(terms))
    return x0 + alpha * total @ (b - A @ x0)


def quiet(fn, *args, **kwargs):
    """Call ``fn`` and return (its result, the ConvergenceWarnings it raised)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, [w for w in caught if issubclass(w.category, bilevel.ConvergenceWarning)]


# ---- power iteration ---------------------------------------------------------------------------------------

def test_power_iteration_is_the_rayleigh_quotient_of_the_k_minus_1th_power_iterate():
    """On diagonal H the k-step estimate is Σλ^(2k−1)v₀ᵢ² / Σλ^(2k−2)v₀ᵢ² with v₀ the seeded start."""
    lam = torch.tensor([4.0, 1.0, 0.5], dtype=F64)
    matvec = Counting(torch.diag(lam))
    v0 = torch.randn(3, generator=torch.Generator().manual_seed(0), dtype=F64)  # the documented start
    for k in (1, 2, 5):
        matvec.calls = 0
        estimate = linsolve.power_iteration(matvec, {"x": torch.zeros(3, dtype=F64)}, k)
        expected = (lam ** (2 * k - 1) * v0 ** 2).sum() / (lam ** (2 * k - 2) * v0 ** 2).sum()
        assert float(estimate) == pytest.approx(float(expected), rel=1e-13)
        assert matvec.calls == k
        assert estimate.dtype == F64


def test_power_iteration_start_depends_on_the_seed_and_spans_every_leaf():
    """Two leaves are one vector: the estimate on blockdiag(3, 1) sees both blocks' start components."""
    lam = torch.tensor([3.0, 1.0], dtype=F64)
    like = {"a": torch.zeros(1, dtype=F64), "b": torch.zeros(1, dtype=F64)}
    matvec = lambda v: {"a": 3.0 * v["a"], "b": 1.0 * v["b"]}
    for seed in (0, 1):
        gen = torch.Generator().manual_seed(seed)
        v0 = torch.cat([torch.randn(1, generator=gen, dtype=F64), torch.randn(1, generator=gen, dtype=F64)])
        expected = (lam ** 3 * v0 ** 2).sum() / (lam ** 2 * v0 ** 2).sum()  # k = 2
        assert float(linsolve.power_iteration(matvec, like, 2, seed=seed)) == pytest.approx(float(expected), 1e-13)


def test_power_iteration_refuses_zero_iterations():
    with pytest.raises(ValueError, match="iterations >= 1, got 0"):
        linsolve.power_iteration(lambda v: v, {"x": torch.ones(2)}, 0)


def test_resolve_alpha_auto_is_one_over_the_power_estimate_and_costs_its_matvecs():
    A = spd(6, cond=8.0)
    alpha, lam, matvecs = linsolve.resolve_alpha("auto", Counting(A), rhs(6), 7)
    expected = float(linsolve.power_iteration(Counting(A), rhs(6), 7))
    assert lam == expected and alpha == 1.0 / expected and matvecs == 7
    assert linsolve.resolve_alpha(0.3, Counting(A), rhs(6), 7) == (0.3, None, 0)


def test_resolve_alpha_auto_refuses_a_non_positive_estimate():
    with pytest.raises(bilevel.IndefiniteHessianError, match=r"λ_max\(H\) is -2 <= 0.*add damping"):
        linsolve.resolve_alpha("auto", lambda v: {"x": -2.0 * v["x"]}, {"x": torch.ones(3, dtype=F64)}, 3)
    with pytest.raises(bilevel.IndefiniteHessianError, match=r"is 0 <= 0"):
        linsolve.resolve_alpha("auto", lambda v: {"x": 0.0 * v["x"]}, {"x": torch.ones(3, dtype=F64)}, 3)


# ---- Neumann -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("terms", [1, 2, 7])
def test_neumann_is_the_closed_form_partial_sum_with_exact_counts(terms):
    A, b = spd(5, cond=4.0), rhs(5)
    matvec = Counting(A)
    (x, info), _ = quiet(linsolve.Neumann(alpha=0.2, terms=terms), matvec, b)
    assert torch.allclose(x["x"], neumann_partial_sum(A, b["x"], 0.2, terms), rtol=1e-13, atol=1e-15)
    assert info.iterations == terms - 1
    assert info.matvecs == matvec.calls == terms  # terms − 1 series products + the residual
    assert info.alpha == 0.2 and info.lambda_max is None
    dense = float(torch.linalg.norm(b["x"] - A @ x["x"]) / torch.linalg.norm(b["x"]))
    assert info.residual == pytest.approx(dense, rel=1e-12)


def test_neumann_warm_start_solves_for_the_correction():
    A, b = spd(5, cond=4.0), rhs(5)
    x0 = rhs(5, seed=7)
    matvec = Counting(A)
    (x, info), _ = quiet(linsolve.Neumann(alpha=0.2, terms=6), matvec, b, x0)
    expected = neumann_partial_sum(A, b["x"], 0.2, 6, x0["x"])
    assert torch.allclose(x["x"], expected, rtol=1e-13, atol=1e-15)
    assert info.matvecs == matvec.calls == 7  # + the product H x0


def test_neumann_auto_alpha_reports_alpha_and_lambda_and_counts_the_power_iteration():
    A, b = spd(5, cond=4.0), rhs(5)
    matvec = Counting(A)
    (x, info), _ = quiet(linsolve.Neumann(terms=4, power_iterations=9), matvec, b)
    lam = float(linsolve.power_iteration(Counting(A), b, 9))
    assert info.lambda_max == lam and info.alpha == 1.0 / lam
    assert torch.allclose(x["x"], neumann_partial_sum(A, b["x"], 1.0 / lam, 4), rtol=1e-13, atol=1e-15)
    assert info.matvecs == matvec.calls == 9 + 4


def test_neumann_converged_is_exactly_residual_at_most_rtol():
    """A 400-term series with α = 0.1 on λ ∈ [1, 4] has residual ≤ 0.9⁴⁰⁰ (≈ 5e-19, float64 floor ~1e-16)."""
    A, b = spd(5, cond=4.0), rhs(5)
    (x, info), caught = quiet(linsolve.Neumann(alpha=0.1, terms=400, rtol=1e-12), Counting(A), b)
    assert info.converged is True and info.residual <= 1e-12 and not caught
    # with rtol below the attained residual, the same x is reported as not converged
    (x2, info2), caught2 = quiet(linsolve.Neumann(alpha=0.1, terms=400, rtol=info.residual / 2), Counting(A), b)
    assert info2.converged is False and len(caught2) == 1
    assert "Neumann did not converge" in str(caught2[0].message)


def test_neumann_divergence_message_names_the_term_and_the_growth():
    """α = 1 on H = diag(3, 0.5), b = e₁: term j − 1 = (−2)^(j−1) e₁ is checked at step j; 16 > 10 at j = 5."""
    A = torch.diag(torch.tensor([3.0, 0.5], dtype=F64))
    b = {"x": torch.tensor([1.0, 0.0], dtype=F64)}
    with pytest.raises(bilevel.NeumannDivergenceError) as err:
        linsolve.Neumann(alpha=1.0, terms=50, growth_limit=10.0)(Counting(A), b)
    message = str(err.value)
    # its curvature tᵀHt/‖t‖² = 3 gives the suggested alpha 0.5/3
    assert "diverged at term 5" in message and "grew to 16 x" in message
    assert "estimated λ_max is about 3" in message and "try alpha=0.167" in message


def test_neumann_growth_limit_is_the_threshold():
    """The same series with growth_limit = 20 first exceeds it at step 6 (|−2|^5 = 32)."""
    A = torch.diag(torch.tensor([3.0, 0.5], dtype=F64))
    b = {"x": torch.tensor([1.0, 0.0], dtype=F64)}
    with pytest.raises(bilevel.NeumannDivergenceError, match="diverged at term 6: the term norm grew to 32 x"):
        linsolve.Neumann(alpha=1.0, terms=50, growth_limit=20.0)(Counting(A), b)


def test_neumann_non_finite_term_raises_with_infinite_curvature():
    A = torch.diag(torch.tensor([1.0, math.inf], dtype=F64))
    b = {"x": torch.tensor([1.0, 1.0], dtype=F64)}
    with pytest.raises(bilevel.NeumannDivergenceError, match="diverged at term 2"):
        linsolve.Neumann(alpha=0.5, terms=5)(Counting(A), b)


def test_neumann_on_zero_rhs_returns_zero_and_converges():
    A = spd(4, cond=3.0)
    (x, info), caught = quiet(linsolve.Neumann(alpha=0.2, terms=5), Counting(A), {"x": torch.zeros(4, dtype=F64)})
    assert torch.equal(x["x"], torch.zeros(4, dtype=F64))
    assert info.residual == 0.0 and info.converged is True and not caught


def test_neumann_shrinking_terms_get_the_raise_terms_advice_and_growing_ones_the_alpha_advice():
    A, b = spd(5, cond=4.0), rhs(5)
    _, caught = quiet(linsolve.Neumann(alpha=0.2, terms=3), Counting(A), b)
    assert "raise terms (now 3" in str(caught[0].message) and "did not shrink" not in str(caught[0].message)
    # α = 0.55 > 2/λ_max = 0.5 on H = [4]: each term is −1.2 times the last (below growth_limit for 3 terms)
    _, caught = quiet(linsolve.Neumann(alpha=0.55, terms=3), Counting(torch.diag(torch.tensor([4.0], dtype=F64))),
                      {"x": torch.ones(1, dtype=F64)})
    assert "the series terms did not shrink (last/first norm 1.44)" in str(caught[0].message)


def test_neumann_options_are_validated():
    with pytest.raises(ValueError, match="terms >= 1, got 0"):
        linsolve.Neumann(terms=0)
    with pytest.raises(ValueError, match="rtol must be >= 0, got -1"):
        linsolve.Neumann(rtol=-1.0)
    linsolve.Neumann(rtol=0.0, terms=1)  # the bounds themselves are valid
    with pytest.raises(ValueError, match="alpha must be > 0"):
        linsolve.Neumann(alpha=0.0)
    with pytest.raises(ValueError, match="positive float or 'auto', got 'Auto'"):
        linsolve.Neumann(alpha="Auto")


# ---- fixed point -------------------------------------------------------------------------------------------

def test_fixedpoint_iterates_are_the_neumann_partial_sums_with_exact_counts():
    """From x0 = 0, after m iterations x = S_m; with rtol = 0 it runs exactly maxiter iterations."""
    A, b = spd(5, cond=4.0), rhs(5)
    matvec = Counting(A)
    (x, info), caught = quiet(linsolve.FixedPoint(alpha=0.2, maxiter=6, rtol=0.0), matvec, b)
    assert torch.allclose(x["x"], neumann_partial_sum(A, b["x"], 0.2, 6), rtol=1e-13, atol=1e-15)
    assert info.iterations == 6 and info.matvecs == matvec.calls == 6
    assert info.alpha == 0.2 and info.lambda_max is None
    dense = float(torch.linalg.norm(b["x"] - A @ x["x"]) / torch.linalg.norm(b["x"]))
    assert info.residual == pytest.approx(dense, rel=1e-12) and info.converged is False and len(caught) == 1


def test_fixedpoint_warm_start_and_auto_alpha():
    A, b, x0 = spd(5, cond=4.0), rhs(5), rhs(5, seed=3)
    matvec = Counting(A)
    (x, info), _ = quiet(linsolve.FixedPoint(maxiter=5, rtol=0.0, power_iterations=8), matvec, b, x0)
    lam = float(linsolve.power_iteration(Counting(A), b, 8))
    assert info.alpha == 1.0 / lam and info.lambda_max == lam
    assert torch.allclose(x["x"], neumann_partial_sum(A, b["x"], 1.0 / lam, 5, x0["x"]), rtol=1e-12, atol=1e-14)
    assert info.matvecs == matvec.calls == 8 + 1 + 5


def test_fixedpoint_stops_at_the_first_iterate_within_rtol():
    """Stops at the smallest m with ‖b − A S_m‖ ≤ rtol‖b‖ (computed from the closed form)."""
    A, b = spd(5, cond=4.0), rhs(5)
    rtol = 1e-3
    norm_b = torch.linalg.norm(b["x"])
    m = next(m for m in range(1, 500)
             if torch.linalg.norm(b["x"] - A @ neumann_partial_sum(A, b["x"], 0.2, m)) <= rtol * norm_b)
    (x, info), caught = quiet(linsolve.FixedPoint(alpha=0.2, maxiter=500, rtol=rtol), Counting(A), b)
    assert info.iterations == m and info.converged is True and not caught
    assert info.residual <= rtol


def test_fixedpoint_divergence_names_iteration_and_growth():
    """α = 1 on diag(3, 0.5), b = e₁: r_m = (−2)^m e₁ first exceeds 10‖b‖ at m = 4 (norm 16)."""
    A = torch.diag(torch.tensor([3.0, 0.5], dtype=F64))
    b = {"x": torch.tensor([1.0, 0.0], dtype=F64)}
    with pytest.raises(bilevel.NeumannDivergenceError,
                       match=r"Fixed-point series diverged at term 4: the term norm grew to 16 x.*about 3"):
        linsolve.FixedPoint(alpha=1.0, maxiter=50)(Counting(A), b)
    with pytest.raises(bilevel.NeumannDivergenceError, match="diverged at term 5: the term norm grew to 32 x"):
        linsolve.FixedPoint(alpha=1.0, maxiter=50, growth_limit=20.0)(Counting(A), b)


def test_fixedpoint_on_indefinite_h_reports_negative_curvature():
    A = torch.diag(torch.tensor([-1.0, 0.5], dtype=F64))
    b = {"x": torch.tensor([1.0, 0.0], dtype=F64)}
    with pytest.raises(bilevel.NeumannDivergenceError, match="curvature along the growing direction is -1 <= 0"):
        linsolve.FixedPoint(alpha=1.0, maxiter=50)(Counting(A), b)


def test_fixedpoint_options_are_validated():
    with pytest.raises(ValueError, match=r"FixedPoint.alpha must be > 0 \(or 'auto'\), got -1"):
        linsolve.FixedPoint(alpha=-1.0)


# ---- CG ----------------------------------------------------------------------------------------------------

def test_cg_solves_an_n_dimensional_system_in_n_iterations_with_exact_counts():
    A, b = spd(6, cond=5.0), rhs(6)
    matvec = Counting(A)
    x, info = linsolve.CG(rtol=1e-10)(matvec, b)
    assert torch.allclose(x["x"], torch.linalg.solve(A, b["x"]), rtol=1e-10, atol=1e-12)
    assert info.iterations <= 6 and info.matvecs == matvec.calls == info.iterations + 1
    dense = float(torch.linalg.norm(b["x"] - A @ x["x"]) / torch.linalg.norm(b["x"]))
    assert info.residual == pytest.approx(dense, rel=1e-9) and info.converged is True
    assert info.alpha is None and info.lambda_max is None


def test_cg_first_iterate_is_the_steepest_descent_step():
    """One CG iteration from 0: x₁ = (bᵀb / bᵀAb) b."""
    A, b = spd(6, cond=5.0), rhs(6)
    (x, info), caught = quiet(linsolve.CG(maxiter=1, rtol=1e-10), Counting(A), b)
    expected = (b["x"] @ b["x"]) / (b["x"] @ A @ b["x"]) * b["x"]
    assert torch.allclose(x["x"], expected, rtol=1e-14, atol=0)
    assert info.iterations == 1 and info.matvecs == 2 and info.converged is False and len(caught) == 1
    assert "CG stopped at maxiter=1" in str(caught[0].message)


def test_cg_second_iterate_is_the_krylov_minimiser():
    """Two CG iterations minimise the A-norm error over span{b, Ab}: x₂ = K (KᵀAK)⁻¹ Kᵀb, K = [b, Ab]."""
    A, b = spd(6, cond=5.0), rhs(6)
    (x, _), _ = quiet(linsolve.CG(maxiter=2, rtol=1e-12), Counting(A), b)
    K = torch.stack([b["x"], A @ b["x"]], dim=1)
    expected = K @ torch.linalg.solve(K.T @ A @ K, K.T @ b["x"])
    assert torch.allclose(x["x"], expected, rtol=1e-11, atol=1e-13)


def test_cg_warm_start_counts_the_initial_product_and_continues_from_x0():
    """From x0 one CG step is x0 + (rᵀr / rᵀAr) r with r = b − A x0."""
    A, b, x0 = spd(6, cond=5.0), rhs(6), rhs(6, seed=4)
    matvec = Counting(A)
    (x, info), _ = quiet(linsolve.CG(maxiter=1, rtol=1e-12), matvec, b, x0)
    r = b["x"] - A @ x0["x"]
    assert torch.allclose(x["x"], x0["x"] + (r @ r) / (r @ A @ r) * r, rtol=1e-13, atol=1e-15)
    assert info.matvecs == matvec.calls == 3  # H x0, one iteration, the true residual


def test_cg_atol_is_an_absolute_floor_on_the_residual():
    """With atol ≥ ‖b‖ the zero start already satisfies ‖b − H·0‖ ≤ atol: no iteration, converged."""
    A, b = spd(6, cond=5.0), rhs(6)
    matvec = Counting(A)
    norm_b = float(torch.linalg.norm(b["x"]))
    x, info = linsolve.CG(atol=norm_b, rtol=1e-12)(matvec, b)
    assert torch.equal(x["x"], torch.zeros(6, dtype=F64))
    assert info.iterations == 0 and info.matvecs == matvec.calls == 0 and info.converged is True
    assert info.residual == 1.0
    # an atol just below ‖b‖ needs at least one iteration
    _, info = linsolve.CG(atol=0.99 * norm_b, rtol=1e-12)(Counting(A), b)
    assert info.iterations >= 1


def test_cg_on_zero_rhs_takes_no_iteration():
    x, info = linsolve.CG()(Counting(spd(3, 2.0)), {"x": torch.zeros(3, dtype=F64)})
    assert torch.equal(x["x"], torch.zeros(3, dtype=F64))
    assert info.iterations == 0 and info.residual == 0.0 and info.converged is True


def test_cg_indefinite_names_the_curvature_and_the_iteration():
    """On diag(1, −1) with b = (1, 2): p₀ = b, p₀ᵀHp₀/p₀ᵀp₀ = (1 − 4)/5 = −0.6 at iteration 0 (the Rayleigh
    quotient: an estimate of a negative eigenvalue, whatever the scale of b)."""
    A = torch.diag(torch.tensor([1.0, -1.0], dtype=F64))
    with pytest.raises(bilevel.IndefiniteHessianError, match=r"pᵀHp/pᵀp = -0.6 <= 0 at iteration 0"):
        linsolve.CG()(Counting(A), {"x": torch.tensor([1.0, 2.0], dtype=F64)})
    # zero curvature (H = 0) is refused too
    with pytest.raises(bilevel.IndefiniteHessianError, match=r"pᵀHp/pᵀp = 0 <= 0"):
        linsolve.CG()(Counting(torch.zeros(2, 2, dtype=F64)), {"x": torch.ones(2, dtype=F64)})


def test_cg_stall_message_counts_the_iterations_spent():
    """An rtol below the float64 floor on a cond-1e8 system: CG stops before maxiter and says it stalled."""
    A, b = spd(30, cond=1e8), rhs(30)
    (x, info), caught = quiet(linsolve.CG(maxiter=10_000, rtol=1e-30), Counting(A), b)
    assert info.converged is False and info.iterations < 10_000 and len(caught) == 1
    assert f"CG stalled after {info.iterations} of maxiter=10000" in str(caught[0].message)


def test_cg_nan_in_h_raises_non_finite():
    A = torch.tensor([[1.0, 0.0], [0.0, math.nan]], dtype=F64)
    with pytest.raises((bilevel.NonFiniteError, bilevel.IndefiniteHessianError)):
        linsolve.CG()(Counting(A), {"x": torch.ones(2, dtype=F64)})


# ---- Exact -------------------------------------------------------------------------------------------------

def test_exact_is_the_dense_solve_with_exact_counts():
    A, b = spd(5, cond=7.0), rhs(5)
    matvec = Counting(A)
    x, info = linsolve.Exact()(matvec, b)
    assert torch.allclose(x["x"], torch.linalg.solve(A, b["x"]), rtol=1e-13, atol=1e-15)
    assert info.iterations == 1 and info.matvecs == 6 and info.converged is True
    dense = float(torch.linalg.norm(b["x"] - A @ x["x"]) / torch.linalg.norm(b["x"]))
    assert info.residual == pytest.approx(dense, rel=1e-6, abs=1e-18)


def test_exact_uses_h_not_its_transpose():
    """A non-symmetric matrix tells H from Hᵀ: the solve must be with the matvec's own matrix."""
    A = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=F64)
    b = {"x": torch.tensor([1.0, 1.0], dtype=F64)}
    x, _ = linsolve.Exact()(Counting(A), b)
    assert torch.allclose(x["x"], torch.linalg.solve(A, b["x"]), rtol=1e-14)


def test_exact_max_size_is_inclusive_and_rtol_validated():
    A, b = spd(4, cond=2.0), rhs(4)
    linsolve.Exact(max_size=4)(Counting(A), b)  # n = max_size is allowed
    with pytest.raises(ValueError, match="4 inner scalars > max_size=3; use CG"):
        linsolve.Exact(max_size=3)(Counting(A), b)
    with pytest.raises(ValueError, match="Exact.rtol must be >= 0, got -0.1"):
        linsolve.Exact(rtol=-0.1)
    linsolve.Exact(rtol=0.0)


def test_exact_on_an_ill_conditioned_h_reports_its_true_residual_as_not_converged():
    """cond(H) = 1e14: the dense solve's residual is far above rtol = 1e-15, and says so."""
    A, b = spd(8, cond=1e14), rhs(8)
    (x, info), caught = quiet(linsolve.Exact(rtol=1e-15), Counting(A), b)
    dense = float(torch.linalg.norm(b["x"] - A @ x["x"]) / torch.linalg.norm(b["x"]))
    assert dense > 1e-15 and info.residual == pytest.approx(dense, rel=1e-6)
    assert info.converged is False and len(caught) == 1 and "Exact did not converge" in str(caught[0].message)


# ---- under vmap: full budgets, batched residuals, converged None -------------------------------------------

@pytest.mark.parametrize("solver", [linsolve.CG(maxiter=6, rtol=1e-12), linsolve.Neumann(alpha=0.2, terms=5),
                                    linsolve.FixedPoint(alpha=0.2, maxiter=5), linsolve.Exact(),
                                    linsolve.Neumann(terms=5), linsolve.FixedPoint(maxiter=5)])
def test_under_vmap_each_row_matches_the_unbatched_solve(solver):
    A = spd(6, cond=4.0)
    bs = torch.stack([rhs(6, seed=s)["x"] for s in (1, 2, 3)])

    def solve(b):
        x, info = solver(lambda v: {"x": A @ v["x"]}, {"x": b})
        assert info.converged is None  # not knowable under vmap
        return x["x"], info.residual

    # alpha=auto draws the power method's seeded start: under vmap's default randomness="error" too
    xs, residuals = vmap(solve)(bs)
    for i in range(3):
        (x, info), _ = quiet(solver, lambda v: {"x": A @ v["x"]}, {"x": bs[i]})
        if isinstance(solver, linsolve.CG) or isinstance(solver, linsolve.FixedPoint):
            # unbatched, a solver may stop early; compare with the closed form of the full budget instead
            if isinstance(solver, linsolve.FixedPoint) and solver.alpha == 0.2:
                assert torch.allclose(xs[i], neumann_partial_sum(A, bs[i], 0.2, 5), rtol=1e-12, atol=1e-14)
            elif isinstance(solver, linsolve.CG):
                assert torch.allclose(xs[i], torch.linalg.solve(A, bs[i]), rtol=1e-8, atol=1e-10)
        else:
            assert torch.allclose(xs[i], x["x"], rtol=1e-12, atol=1e-14)
        dense = float(torch.linalg.norm(bs[i] - A @ xs[i]) / torch.linalg.norm(bs[i]))
        assert float(residuals[i]) == pytest.approx(dense, rel=1e-6, abs=1e-15)


# ---- the damped matvec and the batched-product path of Exact ------------------------------------------------

class WithMatmat(Counting):
    """A matvec that also offers ``matmat`` (a batch of products in one call), as the autograd path's does."""

    def __init__(self, blocks: dict):
        self.blocks, self.calls, self.batched_calls = blocks, 0, 0  # one dense matrix over the flattened leaves

    def __call__(self, v):
        self.calls += 1
        flat = torch.cat([v[k].reshape(-1) for k in ("a", "b")])
        out = self.blocks["H"] @ flat
        return {"a": out[:2].reshape(2), "b": out[2:].reshape(1, 2)}

    def matmat(self, vectors):
        self.batched_calls += 1
        flat = torch.cat([vectors["a"].reshape(-1, 2), vectors["b"].reshape(-1, 2)], dim=1)  # (m, 4)
        out = flat @ self.blocks["H"].T
        return {"a": out[:, :2], "b": out[:, 2:].reshape(-1, 1, 2)}


def test_damped_adds_delta_times_v_and_keeps_matmat():
    A = spd(4, cond=3.0)
    H = WithMatmat({"H": A})
    damped = linsolve.Damped(H, 0.5)
    v = {"a": torch.tensor([1.0, -2.0], dtype=F64), "b": torch.tensor([[0.5, 3.0]], dtype=F64)}
    flat = torch.cat([v["a"], v["b"].reshape(-1)])
    out = damped(v)
    assert torch.allclose(torch.cat([out["a"], out["b"].reshape(-1)]), A @ flat + 0.5 * flat, rtol=1e-15, atol=0)
    many = {"a": torch.stack([v["a"], 2 * v["a"]]), "b": torch.stack([v["b"], 2 * v["b"]])}
    both = damped.matmat(many)
    assert torch.allclose(both["a"][1], 2 * out["a"], rtol=1e-15) and torch.allclose(both["b"][0], out["b"])
    assert not hasattr(linsolve.Damped(Counting(A), 0.5), "matmat")  # only when the matvec has one


def test_exact_builds_h_with_matmat_when_the_matvec_offers_it():
    """Leaves of shapes (2,) and (1, 2): the dense solve of the flattened system, H built by one matmat call."""
    A = spd(4, cond=6.0) + torch.triu(torch.ones(4, 4, dtype=F64), 1) * 0.1  # not symmetric: H, not Hᵀ
    H = WithMatmat({"H": A})
    b = {"a": torch.tensor([1.0, 2.0], dtype=F64), "b": torch.tensor([[-1.0, 0.5]], dtype=F64)}
    x, info = linsolve.Exact()(H, b)
    expected = torch.linalg.solve(A, torch.cat([b["a"], b["b"].reshape(-1)]))
    assert torch.allclose(torch.cat([x["a"], x["b"].reshape(-1)]), expected, rtol=1e-13, atol=1e-15)
    assert x["b"].shape == (1, 2)
    assert H.batched_calls == 1 and H.calls == 1  # the columns in one call, the residual by one matvec
    assert info.matvecs == 4 + 1


def test_divergence_message_reads_zero_curvature_as_not_positive_definite():
    """Curvature exactly 0 is the indefinite case (no step size helps), not a too-large alpha."""
    zero = linsolve._divergence_message("Neumann", 3, 12.0, 0.5, 0.0)
    assert "curvature along the growing direction is 0 <= 0" in zero and "too large" not in zero
    positive = linsolve._divergence_message("Neumann", 3, 12.0, 0.5, 4.0)
    assert positive.startswith("Neumann series diverged at term 3: the term norm grew to 12 x ‖b‖; alpha=0.5 is "
                               "too large") and "try alpha=0.125" in positive


def test_divergence_message_reads_small_positive_curvature_as_a_too_large_alpha():
    small = linsolve._divergence_message("Neumann", 3, 12.0, 0.5, 0.5)
    assert "alpha=0.5 is too large" in small and "try alpha=1 or smaller" in small


def test_split_columns_cuts_rows_into_leaves_in_order():
    """Three leaves of 1, 2 and 3 scalars: each takes its own slice of every row."""
    rows = torch.arange(12, dtype=F64).reshape(2, 6)
    like = {"a": torch.zeros(1), "b": torch.zeros(2), "c": torch.zeros(3, 1)}
    out = linsolve._split_columns(rows, like)
    assert torch.equal(out["a"], rows[:, :1]) and torch.equal(out["b"], rows[:, 1:3])
    assert torch.equal(out["c"], rows[:, 3:].reshape(2, 3, 1))


def test_fixedpoint_growth_exactly_at_the_limit_is_not_divergence():
    """r_m = (−2)^m e₁ with growth_limit = 16: ‖r_4‖ = 16 is not above it; ‖r_5‖ = 32 is."""
    A = torch.diag(torch.tensor([3.0, 0.5], dtype=F64))
    with pytest.raises(bilevel.NeumannDivergenceError, match="diverged at term 5: the term norm grew to 32 x"):
        linsolve.FixedPoint(alpha=1.0, maxiter=50, growth_limit=16.0)(Counting(A), {"x": torch.tensor([1.0, 0.0],
                                                                                                       dtype=F64)})


def test_fixedpoint_divergence_growth_is_relative_to_the_start_and_curvature_scale_free():
    """b = 0.01 e₁: the growth is still 16 (a ratio) and the curvature still 3, though ‖r‖² < 1 throughout."""
    A = torch.diag(torch.tensor([3.0, 0.5], dtype=F64))
    with pytest.raises(bilevel.NeumannDivergenceError,
                       match=r"diverged at term 4: the term norm grew to 16 x ‖b‖; alpha=1 is too large.*about 3;"):
        linsolve.FixedPoint(alpha=1.0, maxiter=50)(Counting(A), {"x": torch.tensor([0.01, 0.0], dtype=F64)})


def test_fixedpoint_non_finite_residual_reports_infinite_curvature():
    A = torch.diag(torch.tensor([1.0, math.inf], dtype=F64))
    with pytest.raises(bilevel.NeumannDivergenceError, match=r"estimated λ_max is about inf; try alpha=0 "):
        linsolve.FixedPoint(alpha=0.5, maxiter=5)(Counting(A), {"x": torch.tensor([1.0, 1.0], dtype=F64)})


# ---- CG residual replacement: restarts, their limit and the budget they share -------------------------------

class Drifting:
    """v ↦ c v on the true-residual products, but v ↦ c' v on the products inside the CG recursion.

    It plays the float drift of a long recursion in exact, hand-checkable numbers: with c' = 2c each CG round
    takes one step α = 1/c', its recursive residual is exactly 0, yet the true residual b − c x is only
    (1 − c/c') times the last one. The calls alternate recursion / measurement, one iteration per round.
    """

    def __init__(self, true_scale: float, recursion_scale: float):
        self.true_scale, self.recursion_scale, self.calls = true_scale, recursion_scale, 0

    def __call__(self, v: dict) -> dict:
        self.calls += 1
        return {"x": (self.recursion_scale if self.calls % 2 else self.true_scale) * v["x"]}


def test_cg_restarts_from_the_true_residual_at_most_restarts_times():
    """c = 1, c' = 2: the true residual halves each round (exactly 1/2, 1/4, 1/8, 1/16 of ‖b‖), so every round
    passes the halving test and CG stops after RESTARTS = 3 restarts: 4 iterations, 8 matvecs, x = (15/16) b."""
    b = {"x": torch.tensor([1.0, -2.0], dtype=F64)}
    matvec = Drifting(1.0, 2.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x, info = linsolve.CG(maxiter=100, rtol=1e-6)(matvec, b)
    # CG solves for b/‖b‖ and scales back (tree.norm's scaling), which costs a rounding: equal to 1e-15
    torch.testing.assert_close(x["x"], 15 / 16 * b["x"], rtol=1e-15, atol=0)
    assert info.iterations == 4 and info.matvecs == matvec.calls == 8
    assert info.residual == pytest.approx(1 / 16, rel=1e-15) and info.converged is False
    message = str(caught[0].message)
    assert message.startswith("CG did not converge: true relative residual ‖b − Hx‖/‖b‖ = 0.0625 > rtol=1e-06")
    assert "CG stalled after 4 of maxiter=100" in message


def test_cg_stops_restarting_when_a_restart_does_not_halve_the_true_residual():
    """c = 1, c' = 4: the true residual is 3/4 of the last one each round; after the first restart
    9/16 > 0.5 · 3/4, so CG stops: 2 iterations, x = (1 − 9/16) b."""
    b = {"x": torch.tensor([1.0, 0.0], dtype=F64)}  # ‖b‖ = 1: 0.5·previous and 0.5/previous differ (3/8, 2/3)
    matvec = Drifting(1.0, 4.0)
    (x, info), caught = quiet(linsolve.CG(maxiter=100, rtol=1e-6), matvec, b)
    assert torch.equal(x["x"], 7 / 16 * b["x"])
    assert info.iterations == 2 and info.matvecs == 4 and info.residual == 9 / 16 and info.converged is False


def test_cg_stops_restarting_exactly_at_the_tolerance_and_halving_exactly_is_progress():
    """c = 1, c' = 2 with rtol = 1/8: residuals 1/2, 1/4 (exactly half the last: restart), 1/8 = rtol: converged."""
    b = {"x": torch.tensor([1.0, 0.0], dtype=F64)}
    (x, info), caught = quiet(linsolve.CG(maxiter=100, rtol=1 / 8), Drifting(1.0, 2.0), b)
    assert info.iterations == 3 and info.residual == 1 / 8 and info.converged is True and not caught


def test_cg_restart_gets_only_the_remaining_iteration_budget():
    """H = diag(1, 2), b = (1, 1); the first product lies (returns 4b), so round 1 ends at x = b/4 with a
    recursive residual of 0 but a true one r = (3/4, 1/2). With maxiter = 2 the restart has one iteration
    left: the steepest-descent step x = b/4 + (rᵀr / rᵀHr) r = b/4 + (13/17) r, and CG stops at maxiter."""
    H = torch.diag(torch.tensor([1.0, 2.0], dtype=F64))
    calls = []

    def matvec(v):
        calls.append(1)
        return {"x": 4.0 * v["x"]} if len(calls) == 1 else {"x": H @ v["x"]}

    b = {"x": torch.tensor([1.0, 1.0], dtype=F64)}
    (x, info), caught = quiet(linsolve.CG(maxiter=2, rtol=1e-10), matvec, b)
    r = torch.tensor([0.75, 0.5], dtype=F64)
    assert torch.allclose(x["x"], b["x"] / 4 + 13 / 17 * r, rtol=1e-15, atol=0)
    assert info.iterations == 2 and info.matvecs == len(calls) == 4 and info.converged is False
    assert "CG stopped at maxiter=2" in str(caught[0].message)


def test_cg_step_is_unbiased_at_the_smallest_normal_scale():
    """H = 1, b = 2⁻⁵¹¹ (so bᵀb = pᵀHp = 2⁻¹⁰²² is the smallest normal float): one exact step x = b."""
    b = {"x": torch.tensor([2.0 ** -511], dtype=F64)}
    x, info = linsolve.CG()(Counting(torch.ones(1, 1, dtype=F64)), b)
    assert torch.equal(x["x"], b["x"]) and info.iterations == 1 and info.converged is True


def test_cg_under_vmap_keeps_iterating_finitely_after_convergence_and_at_tiny_curvature():
    """Under vmap CG spends its whole budget: on H = 2I it converges in one step (x = b/2), after which
    p = 0 and pᵀHp = 0, which the guard must turn into a zero step, not 0/0. At b = 2⁻⁵¹¹ the curvature is
    the smallest normal float; the guard must not divide by zero there either."""
    bs = torch.tensor([[1.0, -3.0], [0.5, 4.0]], dtype=F64)
    xs = vmap(lambda b: linsolve.CG(maxiter=3)(lambda v: {"x": 2.0 * v["x"]}, {"x": b})[0]["x"])(bs)
    assert torch.equal(xs, bs / 2)
    tiny = torch.tensor([[2.0 ** -511], [1.0]], dtype=F64)
    xs = vmap(lambda b: linsolve.CG(maxiter=2)(lambda v: {"x": v["x"]}, {"x": b})[0]["x"])(tiny)
    assert torch.isfinite(xs).all() and xs[1, 0] == 1.0


# ---- alpha=auto and the power method under vmap and at extreme scales ---------------------------------------

def test_resolve_alpha_under_vmap_gives_each_row_its_own_alpha():
    """Row i solves with s_i·A: the power estimate scales with s_i, so α_i = 1/(s_i λ̂) and λ_max,i = s_i λ̂."""
    A, like = spd(4, cond=5.0), rhs(4)
    lam = float(linsolve.power_iteration(Counting(A), like, 6))
    scales = torch.tensor([0.5, 1.0, 3.0], dtype=F64)

    def per_row(s):
        alpha, lam_row, matvecs = linsolve.resolve_alpha("auto", lambda v: {"x": s * (A @ v["x"])}, like, 6)
        assert matvecs == 6
        return alpha, lam_row

    alphas, lams = vmap(per_row)(scales)
    assert torch.allclose(lams, scales * lam, rtol=1e-13, atol=0)
    assert torch.allclose(alphas, 1.0 / (scales * lam), rtol=1e-13, atol=0)
    alpha, lam_plain, _ = linsolve.resolve_alpha("auto", Counting(A), like, 6)
    assert type(alpha) is float and type(lam_plain) is float  # host floats outside vmap


def test_resolve_alpha_accepts_any_positive_estimate_below_one():
    """H = 0.5 I: λ̂ = 0.5 exactly, so α = 2 (a positive estimate below 1 is still positive definite)."""
    alpha, lam, _ = linsolve.resolve_alpha("auto", lambda v: {"x": 0.5 * v["x"]}, {"x": torch.ones(3, dtype=F64)}, 2)
    assert lam == pytest.approx(0.5, rel=1e-15) and alpha == pytest.approx(2.0, rel=1e-15)


def test_power_iteration_normalises_at_float64_scales_below_float32_range():
    """H = 1e-200·diag(4, 1, 0.5): the estimate is 1e-200 times the Rayleigh quotient of the unscaled one."""
    lam = torch.tensor([4.0, 1.0, 0.5], dtype=F64)
    v0 = torch.randn(3, generator=torch.Generator().manual_seed(0), dtype=F64)
    estimate = linsolve.power_iteration(lambda v: {"x": 1e-200 * lam * v["x"]}, {"x": torch.zeros(3, dtype=F64)}, 3)
    expected = 1e-200 * (lam ** 5 * v0 ** 2).sum() / (lam ** 4 * v0 ** 2).sum()
    assert float(estimate) == pytest.approx(float(expected), rel=1e-12)


def test_neumann_and_fixedpoint_take_a_batched_tensor_alpha_under_vmap():
    """Row i uses its own α_i (as Implicit's relative damping passes 1/(λ̂ + δ)): row i is the partial sum
    S_m(α_i); the not-converged advice is built without reading the batched α on the host."""
    A = spd(3, cond=3.0)
    bs = torch.stack([rhs(3, seed=s)["x"] for s in (1, 2)])
    alphas = torch.tensor([0.1, 0.3], dtype=F64)
    # Neumann with 4 terms returns S_4; FixedPoint with 3 iterations from 0 returns S_3
    for make, m in ((lambda a: linsolve.Neumann(alpha=a, terms=4), 4),
                    (lambda a: linsolve.FixedPoint(alpha=a, maxiter=3), 3)):
        xs = vmap(lambda b, a: make(a)(lambda v: {"x": A @ v["x"]}, {"x": b})[0]["x"])(bs, alphas)
        for i in range(2):
            expected = neumann_partial_sum(A, bs[i], float(alphas[i]), m)
            assert torch.allclose(xs[i], expected, rtol=1e-12, atol=1e-14)
    # an unbatched tensor alpha is read as its value
    (x, info), caught = quiet(linsolve.Neumann(alpha=torch.tensor(0.2, dtype=F64), terms=3), Counting(A), rhs(3))
    assert torch.allclose(x["x"], neumann_partial_sum(A, rhs(3)["x"], 0.2, 3), rtol=1e-13, atol=1e-15)
    assert "now alpha=0.2)" in str(caught[0].message)


# ---- messages: the solver named, the numbers they report ----------------------------------------------------

def test_auto_alpha_advice_leaves_the_step_size_alone():
    """α = 1/λ̂ is already the fastest safe step: the not-converged advice goes straight to damping."""
    A, b = spd(5, cond=4.0), rhs(5)
    _, caught = quiet(linsolve.Neumann(terms=3), Counting(A), b)
    assert "slowest along λ_min(H)), add or raise damping" in str(caught[0].message)
    _, caught = quiet(linsolve.FixedPoint(maxiter=3), Counting(A), b)
    message = str(caught[0].message)
    assert message.startswith("FixedPoint did not converge") and "raise maxiter (now 3), add or raise damping" in message


def test_fixedpoint_warning_names_the_solver():
    A, b = spd(5, cond=4.0), rhs(5)
    _, caught = quiet(linsolve.FixedPoint(alpha=0.2, maxiter=2), Counting(A), b)
    assert str(caught[0].message).startswith("FixedPoint did not converge: true relative residual")


@pytest.mark.skipif(hasattr(linsolve, "x__verdict__mutmut_orig"),
                    reason="mutmut's trampolines add stack frames, so stacklevel cannot be checked in a mutation run")
def test_not_converged_warning_points_at_the_solvers_caller():
    """stacklevel 3: the warning's file and line are the line that called the solver, not linsolve.py."""
    A, b = spd(5, cond=4.0), rhs(5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        linsolve.FixedPoint(alpha=0.2, maxiter=2)(Counting(A), b)
    assert (caught[0].filename, caught[0].lineno) == (__file__, line)


def test_neumann_alpha_error_names_neumann():
    with pytest.raises(ValueError, match=r"^Neumann\.alpha must be > 0 \(or 'auto'\), got 0\.0$"):
        linsolve.Neumann(alpha=0.0)


def test_neumann_divergence_growth_is_relative_to_the_start_and_curvature_scale_free():
    """b = 0.01 e₁ on diag(3, 0.5), α = 1: growth 16 (a ratio) at term 5 and curvature 3, though ‖t‖² < 1."""
    A = torch.diag(torch.tensor([3.0, 0.5], dtype=F64))
    with pytest.raises(bilevel.NeumannDivergenceError,
                       match=r"^Neumann series diverged at term 5: the term norm grew to 16 x ‖b‖; alpha=1 is too "
                             r"large.*about 3; try alpha=0\.167"):
        linsolve.Neumann(alpha=1.0, terms=50)(Counting(A), {"x": torch.tensor([0.01, 0.0], dtype=F64)})


def test_neumann_growth_exactly_at_the_limit_is_not_divergence():
    """Term j − 1 = (−2)^(j−1) e₁ with growth_limit = 16: 16 at term 5 is not above it; 32 at term 6 is."""
    A = torch.diag(torch.tensor([3.0, 0.5], dtype=F64))
    with pytest.raises(bilevel.NeumannDivergenceError, match="diverged at term 6: the term norm grew to 32 x"):
        linsolve.Neumann(alpha=1.0, terms=50, growth_limit=16.0)(Counting(A), {"x": torch.tensor([1.0, 0.0],
                                                                                                   dtype=F64)})


def test_neumann_non_finite_term_reports_infinite_curvature():
    A = torch.diag(torch.tensor([1.0, math.inf], dtype=F64))
    with pytest.raises(bilevel.NeumannDivergenceError, match=r"estimated λ_max is about inf; try alpha=0 "):
        linsolve.Neumann(alpha=0.5, terms=5)(Counting(A), {"x": torch.tensor([1.0, 1.0], dtype=F64)})


def test_neumann_shrink_advice_threshold_and_ratio():
    """H = [1], α = 2: every term is −1 times the last, so last = first (not growing): 'raise terms'.
    H = [4], α = 0.55, b = 2: the term ratio is 1.2², reported as last/first = 1.44 whatever ‖b‖."""
    _, caught = quiet(linsolve.Neumann(alpha=2.0, terms=2), Counting(torch.ones(1, 1, dtype=F64)),
                      {"x": torch.tensor([2.0], dtype=F64)})
    assert "raise terms (now 2" in str(caught[0].message) and "did not shrink" not in str(caught[0].message)
    _, caught = quiet(linsolve.Neumann(alpha=0.55, terms=3), Counting(torch.diag(torch.tensor([4.0], dtype=F64))),
                      {"x": torch.tensor([2.0], dtype=F64)})
    assert "the series terms did not shrink (last/first norm 1.44)" in str(caught[0].message)


def test_neumann_terms_within_one_part_per_million_of_the_first_count_as_not_growing():
    """b = 3, H = [1], α = 2.000001⁻ (the float below 2.000001): the second term is −(1 + 1e-6)·b to the last
    bit (checked below), exactly at the documented 1e-6 slack, so the advice is still 'raise terms'."""
    alpha = math.nextafter(2.000001, 0.0)
    b = {"x": torch.tensor([3.0], dtype=F64)}
    assert abs(3.0 - alpha * 3.0) == 3.0 * (1 + 1e-6)  # the boundary itself, in float64
    _, caught = quiet(linsolve.Neumann(alpha=alpha, terms=2), Counting(torch.ones(1, 1, dtype=F64)), b)
    assert "raise terms (now 2" in str(caught[0].message) and "did not shrink" not in str(caught[0].message)


# ---- tolerances are relative to ‖b‖ ------------------------------------------------------------------------

def test_exact_converged_compares_the_residual_with_rtol_times_norm_b():
    """‖b‖ ≈ 2e3: converged flips exactly where rtol crosses the measured relative residual."""
    A = spd(8, cond=1e14)
    b = {"x": 1000.0 * rhs(8)["x"]}
    (_, info), _ = quiet(linsolve.Exact(rtol=1e-15), Counting(A), b)
    res = info.residual
    (_, above), caught_above = quiet(linsolve.Exact(rtol=1.5 * res), Counting(A), b)
    (_, below), caught_below = quiet(linsolve.Exact(rtol=res / 1.5), Counting(A), b)
    assert above.converged is True and not caught_above
    assert below.converged is False and len(caught_below) == 1


def test_fixedpoint_stops_at_zero_residual_with_rtol_zero():
    """H = 2I, α = 1/2: one iteration gives x = b/2 and r = 0 exactly, which meets rtol = 0."""
    b = {"x": torch.tensor([1.0, -3.0], dtype=F64)}
    matvec = Counting(2.0 * torch.eye(2, dtype=F64))
    (x, info), caught = quiet(linsolve.FixedPoint(alpha=0.5, maxiter=50, rtol=0.0), matvec, b)
    assert torch.equal(x["x"], b["x"] / 2) and info.iterations == info.matvecs == matvec.calls == 1
    assert info.residual == 0.0 and info.converged is True and not caught


def test_fixedpoint_stopping_rule_scales_with_norm_b():
    """b scaled by 100: stops at the smallest m with ‖b − A S_m‖ ≤ rtol‖b‖ (the same m as unscaled)."""
    A, b = spd(5, cond=4.0), {"x": 100.0 * rhs(5)["x"]}
    norm_b = torch.linalg.norm(b["x"])
    m = next(m for m in range(1, 500)
             if torch.linalg.norm(b["x"] - A @ neumann_partial_sum(A, b["x"], 0.2, m)) <= 1e-3 * norm_b)
    (x, info), caught = quiet(linsolve.FixedPoint(alpha=0.2, maxiter=500, rtol=1e-3), Counting(A), b)
    assert info.iterations == m and info.converged is True and not caught


# ---- right-hand sides far from 1 (scaled norms) -------------------------------------------------------------

@pytest.mark.parametrize("magnitude", [1e-30, 1e-21, 1e21, 1e30])
def test_tree_norm_is_exact_where_the_plain_sum_of_squares_under_or_overflows(magnitude):
    # float32 squares underflow below ~1e-19 and overflow above ~1e19: sqrt(<a, a>) would give 0 or inf.
    a = {"w": torch.tensor([3.0, 0.0]) * magnitude, "b": torch.tensor([[4.0]]) * magnitude}
    got = float(tree.norm(a))
    assert got == pytest.approx(5.0 * magnitude, rel=1e-6)
    assert float(vmap(lambda v: tree.norm({"v": v}))(torch.tensor([[3.0, 4.0]]) * magnitude)[0]) == pytest.approx(
        5.0 * magnitude, rel=1e-6)


def test_tree_norm_of_zero_inf_and_nan_and_its_derivative():
    assert float(tree.norm({"a": torch.zeros(3)})) == 0.0
    assert float(tree.norm({"a": torch.tensor([1.0, math.inf])})) == math.inf
    assert math.isnan(float(tree.norm({"a": torch.tensor([1.0, math.nan])})))
    x = torch.tensor([0.3, -1.2, 2.0], dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(tree.norm({"x": x}), x)
    torch.testing.assert_close(g, x.detach() / x.detach().norm(), rtol=1e-15, atol=0)


@pytest.mark.parametrize("magnitude", [1e-30, 1e-21, 1e21, 1e30])
@pytest.mark.parametrize("solver", [linsolve.CG(maxiter=50, rtol=1e-5), linsolve.Neumann(alpha=0.1, terms=400, rtol=1e-4),
                                    linsolve.FixedPoint(alpha=0.1, maxiter=400, rtol=1e-4),
                                    linsolve.Exact(rtol=1e-5)], ids=["cg", "neumann", "fixedpoint", "exact"])
def test_float32_solves_of_tiny_and_huge_rhs_are_scaled_copies_of_the_unit_solve(solver, magnitude):
    # H⁻¹(c b) = c H⁻¹ b: a tiny b must not read as solved at x = 0 (converged, residual 0), a huge one must
    # not overflow into a blamed Hessian.
    A = spd(6, 5.0).float()
    b = {"x": rhs(6)["x"].float()}
    exact = torch.linalg.solve(A.double(), b["x"].double())
    x, info = solver(lambda v: {"x": A @ v["x"]}, {"x": b["x"] * magnitude})
    assert info.converged is True
    assert 0 < info.residual <= solver.rtol
    err = float(torch.linalg.norm(x["x"].double() / magnitude - exact) / torch.linalg.norm(exact))
    assert err <= 10 * solver.rtol, err


def test_cg_outside_vmap_divides_by_the_curvature_itself_even_near_the_smallest_float32():
    """H = 1e-35·I in float32 (a normal number, 1000× the smallest one): outside vmap α = rᵀr/pᵀHp exactly, so
    one step gives x = b/1e-35 and CG stops after 1 iteration. The vmap guard pᵀHp + tiny (tiny = 1.18e-38)
    would move α by 0.12 % here and need a restart."""
    scale = 1e-35
    b = {"x": torch.tensor([0.6, 0.8])}
    x, info = linsolve.CG(maxiter=10, rtol=1e-6)(lambda v: {"x": scale * v["x"]}, b)
    assert info.iterations == 1 and info.converged is True
    torch.testing.assert_close(x["x"].double(), b["x"].double() / scale, rtol=1e-6, atol=0)


def test_cg_under_vmap_adds_tiny_to_the_curvature():
    """Under vmap (no host check of pᵀHp > 0) the step is α = rᵀr/(pᵀHp + tiny). On H = 1e-35·I in float32 with
    one iteration that is x = b/(1e-35 + 1.18e-38), 0.12 % short of b/1e-35: the guard's sign and size show."""
    scale, tiny = 1e-35, torch.finfo(torch.float32).tiny
    bs = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    xs = vmap(lambda b: linsolve.CG(maxiter=1)(lambda v: {"x": scale * v["x"]}, {"x": b})[0]["x"])(bs)
    # CG runs on b/‖b‖ (here ‖b‖ = 1, so rᵀr = 1 and pᵀHp = 1e-35 in float32)
    want = bs.double() / (float(torch.tensor(scale)) + tiny)
    torch.testing.assert_close(xs.double(), want, rtol=1e-6, atol=0)
    assert float((xs.double() / (bs.double() / scale))[0, 0]) < 1 - 1e-3
