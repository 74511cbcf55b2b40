"""Counts in the diagnostics (``hvp_count``, ``evaluations``, ``iterations``, ``inner_steps``) against counted calls.

The problem is the quadratic G(θ, φ) = ½ θᵀAθ + θᵀBφ − bᵀθ, F(θ, φ) = ½‖θ − t‖² + ½‖φ‖² (dim θ = N = 4,
dim φ = M = 3), written so that every derivative the solvers take can be counted:

- ``inner_loss`` / ``outer_loss`` count their Python calls (one call = one evaluation of the loss, and of its
  gradient when one is taken, on either autodiff path and under any transform), and number them;
- the two terms of G are ``torch.autograd.Function`` s whose backward returns the gradient through another
  counted Function: ∇θ(½θᵀAθ) = Aθ goes through ``HessianOp`` and the θ-gradient Bφ of the coupling through
  ``MixedOp``. A product with the Hessian, H v = A v, is a vjp or jvp through ``HessianOp``; a mixed product
  (∂²G/∂φ∂θ)ᵀv = Bᵀv or its forward twin B u one through ``MixedOp``. Each records its kind and the number of
  the G call whose gradient it went through. First-order gradients never reach either backward (∇φG = Bᵀθ is
  computed directly), so the records hold exactly the second-order products. The record is a custom op without
  a batching rule, which torch runs once per vector under ``vmap`` (torch.func's, or the one behind
  ``autograd.grad(is_grads_batched=True)``), so a batched product counts as many products as it carries vectors.

Every count is checked on both autodiff paths (the autograd tape and torch.func, forced with
``bilevel.autodiff_path``), against what each diagnostic counts by the library's docstrings, with the expected
value written from the algorithm:

- ``hvp_count`` of the implicit solvers = the products with H of the linear solve, including the one that
  measures the true residual and the power iterations behind ``alpha=auto`` and ``relative_damping`` (CG with
  ``maxiter=k, rtol=0``: k + 1; Neumann: ``terms`` (+ power iterations, + 1 with a warm start); fixed point:
  its iterations (+ power iterations, + 1 with a warm start); dense: N + 1). The one mixed vjp of the IFT is
  documented separately ("one mixed vjp") and is not part of it: exactly 1 mixed product is recorded.
- ``hvp_count`` of ``unroll`` / ``forward`` / ``onestep`` = the backward (or forward-mode) passes through the
  inner steps' gradient maps, T, K·M and 1: each is one vjp/jvp of ∇θG(θ_k, φ) with respect to (θ_k, φ), a
  mixed product plus a product with H, costing one HVP. The records show both parts: T, K·M, 1 mixed products;
  one step fewer with H (T − 1, (K − 1)·M, 0), since the first differentiated step starts from a θ that does
  not depend on φ, except in the checkpointed adjoint, which also takes that step's θ-vjp (T).
- ``evaluations`` = evaluations of the inner loss (its gradient) that are not there only to linearise a
  second-order product: the K inner steps, the stationarity gradients (∇G(θ_0), plus the explicit ∇G(θ_K) of
  ``hvp=fwdrev``, for the implicit solvers; ∇G(θ_0) and ∇G(θ_K) for the others) and the checkpointed adjoint's
  recomputation of each differentiated step. Counted: the G calls, minus, for the implicit solvers and the
  checkpointed adjoint, the calls a product went through (the linearisation of ∇G at θ_K, which on the tape
  also serves the mixed term and on torch.func is joined by the mixed vjp's own call; with ``fwdrev`` one call
  per product; the adjoint's vjp of each step). ``unroll``, ``forward`` and ``onestep`` differentiate through
  the loop's own step evaluations, which are evaluations: there the count is all G calls. F is not part of
  ``evaluations`` (it is evaluated once; ``forward``: once per run of the loop).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Optional

import pytest
import torch

import bilevel

torch.set_num_threads(1)
# The counting op has no batching rule on purpose (see _record_product); torch warns that this is slow.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented "
                                        "the batching rule for bilevel_count_tests")

DT = torch.float64
N, M, K = 4, 3, 6  # dim θ, dim φ, inner steps
POWER = 7          # power iterations asked of alpha=auto (not the default 20, so the count is visibly the option's)
# Every count is checked on each autodiff path the library has (the autograd tape and torch.func).
PATHS = ("autograd", "func") if hasattr(bilevel, "autodiff_path") else ("default",)


def on_path(path: str):
    """Force the library's autodiff path for a block (nothing to force on a library with one path)."""
    return bilevel.autodiff_path(path) if path != "default" else contextlib.nullcontext()


_PRODUCTS: list[tuple[str, int]] = []  # (kind, id of the G call whose gradient it went through), one per product


@torch.library.custom_op("bilevel_count_tests::record_product", mutates_args=())
def _record_product(v: torch.Tensor, kind: str, call: int) -> torch.Tensor:
    """Record one second-order product. This op has no batching rule, so under vmap (torch.func's, or the one
    behind ``autograd.grad(is_grads_batched=True)``) torch runs it once per vector of the batch: a batched
    product is recorded as as many products as it carries vectors."""
    _PRODUCTS.append((kind, call))
    return torch.zeros((), dtype=v.dtype)


def record_product(v: torch.Tensor, kind: str, call: int) -> None:
    with torch.no_grad():  # a side effect only: nothing differentiates through the record
        _record_product(v, kind, call)


@dataclass
class Counts:
    G: int = 0        # Python calls of inner_loss (each call is numbered: its call id)
    F: int = 0        # Python calls of outer_loss
    snapshot: Optional[list] = None  # None: the live record _PRODUCTS; else a copy (see :meth:`copy`)

    @property
    def _records(self) -> list[tuple[str, int]]:
        return _PRODUCTS if self.snapshot is None else self.snapshot

    @property
    def hessian(self) -> int:
        """Products with H = A."""
        return sum(kind == "hessian" for kind, _ in self._records)

    @property
    def mixed(self) -> int:
        """Mixed products Bᵀv (reverse) or Bu (forward)."""
        return sum(kind == "mixed" for kind, _ in self._records)

    @property
    def linearised(self) -> set[int]:
        """Ids of the G calls whose gradient some product went through."""
        return {call for _, call in self._records}

    def reset(self) -> None:
        self.G = self.F = 0
        self.snapshot = None
        _PRODUCTS.clear()

    def copy(self) -> "Counts":
        return Counts(self.G, self.F, list(_PRODUCTS))

    def __repr__(self) -> str:
        return (f"Counts(G={self.G}, F={self.F}, hessian={self.hessian}, mixed={self.mixed}, "
                f"linearised={sorted(self.linearised)})")


@dataclass
class CountingQuadratic:
    """The quadratic above with counters; ``A`` (symmetric positive definite N×N) may be chosen."""

    A: torch.Tensor
    counts: Counts = field(default_factory=Counts)

    def __post_init__(self) -> None:
        gen = torch.Generator().manual_seed(3)
        self.B = torch.randn(N, M, generator=gen, dtype=DT)
        self.b = torch.randn(N, generator=gen, dtype=DT)
        self.t = torch.randn(N, generator=gen, dtype=DT)
        self.phi = torch.randn(M, generator=gen, dtype=DT)
        self.theta0 = torch.randn(N, generator=gen, dtype=DT)
        self.hessian_op, self.quadratic_op = _quadratic_ops(self.A)
        self.mixed_op, self.coupling_op = _coupling_ops(self.B)
        self.problem = bilevel.BilevelProblem(self.inner_loss, self.outer_loss)

    def inner_loss(self, inner, outer, batch):
        self.counts.G += 1
        call, th = self.counts.G, inner["theta"]
        return self.quadratic_op.apply(th, call) + self.coupling_op.apply(th, outer["phi"], call) - self.b @ th

    def outer_loss(self, inner, outer, batch):
        self.counts.F += 1
        return 0.5 * ((inner["theta"] - self.t) ** 2).sum() + 0.5 * (outer["phi"] ** 2).sum()

    def hypergrad(self, spec: str, path: str, steps: int = K, state=None) -> bilevel.HypergradResult:
        """One call on autodiff ``path`` with counters reset first (``validate=False``: only the solver's own work
        is counted)."""
        self.counts.reset()
        with warnings.catch_warnings(), on_path(path):
            warnings.simplefilter("ignore")  # rtol=0 solves rightly report non-convergence; counts are the point
            result = bilevel.hypergrad(self.problem, {"theta": self.theta0.clone()}, {"phi": self.phi.clone()},
                                       inner_batch=None, outer_batch=None, solver=spec, validate=False, state=state,
                                       loop=bilevel.InnerLoop(steps=steps, lr=0.1))
        assert result.diagnostics.get("autodiff_path", path) == path  # it ran where it was asked to
        return result


def _quadratic_ops(A: torch.Tensor):
    """½θᵀAθ whose gradient Aθ is the counted ``HessianOp``: its vjp and jvp are products with H = A."""

    class HessianOp(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(theta, call):
            return A @ theta

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.call = inputs[1]

        @staticmethod
        def backward(ctx, v):
            record_product(v, "hessian", ctx.call)
            return A @ v, None  # A is symmetric

        @staticmethod
        def jvp(ctx, u, _):
            record_product(u, "hessian", ctx.call)
            return A @ u

    class QuadraticOp(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(theta, call):
            return 0.5 * theta @ (A @ theta)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])
            ctx.save_for_forward(inputs[0])
            ctx.call = inputs[1]

        @staticmethod
        def backward(ctx, g):
            theta, = ctx.saved_tensors
            return g * HessianOp.apply(theta, ctx.call), None

        @staticmethod
        def jvp(ctx, u, _):
            theta, = ctx.saved_tensors
            return (A @ theta) @ u

    return HessianOp, QuadraticOp


def _coupling_ops(B: torch.Tensor):
    """θᵀBφ whose θ-gradient Bφ is the counted ``MixedOp`` (its vjp Bᵀv and jvp Bu are mixed products); its
    φ-gradient Bᵀθ is first order and computed directly, so it is never counted."""

    class MixedOp(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(phi, call):
            return B @ phi

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.call = inputs[1]

        @staticmethod
        def backward(ctx, v):
            record_product(v, "mixed", ctx.call)
            return B.T @ v, None

        @staticmethod
        def jvp(ctx, u, _):
            record_product(u, "mixed", ctx.call)
            return B @ u

    class CouplingOp(torch.autograd.Function):
        generate_vmap_rule = True

        @staticmethod
        def forward(theta, phi, call):
            return theta @ (B @ phi)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0], inputs[1])
            ctx.save_for_forward(inputs[0], inputs[1])
            ctx.call = inputs[2]

        @staticmethod
        def backward(ctx, g):
            theta, phi = ctx.saved_tensors
            return g * MixedOp.apply(phi, ctx.call), g * (B.T @ theta), None

        @staticmethod
        def jvp(ctx, u_theta, u_phi, _):
            theta, phi = ctx.saved_tensors
            return u_theta @ (B @ phi) + theta @ (B @ u_phi)

    return MixedOp, CouplingOp


def spd(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    """A symmetric matrix with the given eigenvalues in a random orthonormal basis."""
    q, _ = torch.linalg.qr(torch.randn(N, N, generator=torch.Generator().manual_seed(seed), dtype=DT))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=DT)) @ q.T


GENERAL = [1.0, 1.7, 2.6, 3.5]  # four distinct eigenvalues: CG cannot finish in fewer than 4 iterations


def assert_counts(result, counted: Counts, *, hvp_count: int, hessian: int, mixed: int, evaluations: int,
                  linearising_only: bool, F: int = 1, iterations: float | None = None) -> None:
    """Every diagnostic equals both the counted value and the value expected from the algorithm.

    ``linearising_only``: the G calls whose gradient a product went through exist only for that product (the
    implicit solvers' linearisation at θ_K and mixed vjp, the checkpointed adjoint's per-step vjp), so
    ``evaluations`` = G calls − those calls; otherwise they are the loop's own steps and ``evaluations`` = G calls.
    """
    d = result.diagnostics
    assert d["hvp_count"] == hvp_count, ("hvp_count", d["hvp_count"], hvp_count)
    assert (counted.hessian, counted.mixed) == (hessian, mixed), ("products", counted)
    counted_evaluations = counted.G - len(counted.linearised) if linearising_only else counted.G
    assert d["evaluations"] == evaluations == counted_evaluations, ("evaluations", d["evaluations"], evaluations,
                                                                     counted)
    assert counted.F == F, ("outer loss calls", counted)
    if iterations is not None:
        assert d["iterations"] == iterations, ("iterations", d["iterations"], iterations)


# ---- the counting problem computes the right derivatives -------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("spec", ["exact", "cg:maxiter=3,rtol=0,hvp=fwdrev", "cg:maxiter=3,rtol=0", "unroll",
                                  "unroll:checkpoint=true", "forward:chunk_size=2", "onestep"])
def test_counting_ops_give_the_closed_form_hypergradients(spec, path):
    """The counted Functions must not change the maths: with θ_K = (I − ηA)^K θ₀ + Σ_j (I − ηA)^j η(b − Bφ) and
    J_K = −η Σ_j (I − ηA)^j B, the unrolled hypergradient is J_Kᵀ(θ_K − t) + φ, the IFT one at θ_K is
    φ − Bᵀx with x = A⁻¹(θ_K − t) (dense solve) or, for CG stopped after 3 of 4 iterations, its 3rd iterate: the
    Galerkin solution in the Krylov space K₃ = span{g, Ag, A²g}, x = V(VᵀAV)⁻¹Vᵀg (g = θ_K − t). onestep is the
    K = 1 unrolled one. Bound: relative error ≤ 1e-12."""
    q = CountingQuadratic(spd(GENERAL))
    steps = 1 if spec == "onestep" else K
    result = q.hypergrad(spec, path, steps=steps)
    eta, step = 0.1, torch.eye(N, dtype=DT) - 0.1 * q.A
    theta, jac = q.theta0.clone(), torch.zeros(N, M, dtype=DT)
    for _ in range(steps):
        theta, jac = step @ theta - eta * (q.B @ q.phi - q.b), step @ jac - eta * q.B
    got, g = result.hypergrad["phi"], theta - q.t
    if spec == "exact":
        want = q.phi - q.B.T @ torch.linalg.solve(q.A, g)
    elif spec.startswith("cg"):
        V, _ = torch.linalg.qr(torch.stack([g, q.A @ g, q.A @ q.A @ g], dim=1))
        want = q.phi - q.B.T @ (V @ torch.linalg.solve(V.T @ q.A @ V, V.T @ g))
        assert float((want - (q.phi - q.B.T @ torch.linalg.solve(q.A, g))).norm() / want.norm()) > 1e-4  # not A⁻¹
    else:
        want = jac.T @ g + q.phi
    assert float((got - want).norm() / want.norm()) <= 1e-12
    assert float((result.inner["theta"] - theta).norm() / theta.norm()) <= 1e-12


# ---- the inner loop ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
def test_inner_loop_takes_one_gradient_per_step_and_no_second_order_product(path):
    """K optimiser steps: K calls of G (one gradient each), no product with H or B, and ``inner_steps`` = K."""
    q = CountingQuadratic(spd(GENERAL))
    loop = bilevel.InnerLoop(steps=K, lr=0.1)
    q.counts.reset()
    with on_path(path):
        _, _, losses = loop.run(q.problem, {"theta": q.theta0}, {"phi": q.phi}, None)
    assert (q.counts.G, q.counts.F, q.counts.hessian, q.counts.mixed) == (K, 0, 0, 0) and losses.numel() == K
    assert q.hypergrad("unroll", path).diagnostics["inner_steps"] == K


# ---- implicit solvers ------------------------------------------------------------------------------------------

IMPLICIT_CASES = {  # spec: (products with H from the algorithm, iterations)
    "cg:maxiter=3,rtol=0": (3 + 1, 3),                              # 3 CG products + the true residual's
    "cg:maxiter=3,rtol=0,hvp=fwdrev": (3 + 1, 3),
    "cg:maxiter=3,rtol=0,damping=0.1,relative_damping=true": (20 + 3 + 1, 3),  # + 20 power iterations
    "neumann:terms=5,alpha=0.1": (4 + 1, 4),                        # terms − 1 series products + the residual's
    f"neumann:terms=5,power_iterations={POWER}": (POWER + 4 + 1, 4),  # + the power iterations of alpha=auto
    f"neumann:terms=5,power_iterations={POWER},damping=0.1,relative_damping=true": (POWER + 4 + 1, 4),  # reused
    "fixedpoint:alpha=0.1,maxiter=6,rtol=0": (6, 6),               # one product per iteration, residual included
    f"fixedpoint:maxiter=6,rtol=0,power_iterations={POWER}": (POWER + 6, 6),
    "exact": (N + 1, 1),                                            # N columns (one batched call) + the residual's
    "exact:hvp=fwdrev": (N + 1, 1),
}


def implicit_params():
    for spec in IMPLICIT_CASES:
        for path in PATHS:
            yield pytest.param(spec, path, id=f"{spec}-{path}")


@pytest.mark.parametrize("spec, path", list(implicit_params()))
def test_implicit_solver_counts(spec, path):
    """hvp_count = the products with H; one mixed product; evaluations = K steps + ∇G(θ_0) (+ the explicit
    ∇G(θ_K) of fwdrev)."""
    q = CountingQuadratic(spd(GENERAL))
    result = q.hypergrad(spec, path)
    hessian, iterations = IMPLICIT_CASES[spec]
    assert_counts(result, q.counts, hvp_count=hessian, hessian=hessian, mixed=1, evaluations=K + 1 + ("fwdrev" in spec),
                  linearising_only=True, iterations=iterations)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("spec, first, second", [
    ("cg:maxiter=3,rtol=0", 3 + 1, 1 + 3 + 1),                      # + the warm start's residual b − Hx₀
    ("neumann:terms=5,alpha=0.1,warm_start=true", 5, 1 + 5),
    ("fixedpoint:alpha=0.1,maxiter=6,rtol=0", 6, 1 + 6),
])
def test_warm_started_linear_solve_spends_one_more_product(spec, first, second, path):
    q = CountingQuadratic(spd(GENERAL))
    cold = q.hypergrad(spec, path)
    assert cold.diagnostics["hvp_count"] == q.counts.hessian == first
    warm = q.hypergrad(spec, path, state=cold.state)
    assert warm.diagnostics["hvp_count"] == q.counts.hessian == second
    assert warm.diagnostics["iterations"] == cold.diagnostics["iterations"]


@pytest.mark.parametrize("path", PATHS)
def test_cg_stops_after_as_many_iterations_as_h_has_distinct_eigenvalues(path):
    """In exact arithmetic CG ends after as many iterations as H has distinct eigenvalues: H with eigenvalues
    {1, 3} gives 2 iterations (residual ~1e-16 ≤ rtol = 1e-10), 2 products + the true residual's = 3, and no
    restart (the true residual meets the tolerance)."""
    q = CountingQuadratic(spd([1.0, 3.0, 3.0, 1.0]))
    result = q.hypergrad("cg:maxiter=50,rtol=1e-10", path)
    assert result.diagnostics["converged"] == 1.0 and result.diagnostics["residual"] <= 1e-10
    assert_counts(result, q.counts, hvp_count=3, hessian=3, mixed=1, evaluations=K + 1, linearising_only=True,
                  iterations=2)


@pytest.mark.parametrize("path", PATHS)
def test_fixed_point_stops_after_one_iteration_when_h_is_a_multiple_of_the_identity(path):
    """H = 2.5 I: the power iteration finds λ = 2.5 exactly, α = 1/λ, and one Richardson step x = αb solves the
    system to rounding: iterations = 1, products = the power iterations + 1."""
    q = CountingQuadratic(2.5 * torch.eye(N, dtype=DT))
    result = q.hypergrad(f"fixedpoint:rtol=1e-10,power_iterations={POWER}", path)
    assert result.diagnostics["converged"] == 1.0 and result.diagnostics["alpha"] == pytest.approx(0.4, rel=1e-14)
    assert_counts(result, q.counts, hvp_count=POWER + 1, hessian=POWER + 1, mixed=1, evaluations=K + 1,
                  linearising_only=True, iterations=1)


# ---- unrolled and online solvers -----------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("spec, T", [("unroll", K), ("unroll:truncate=4", 4)])
def test_unroll_counts(spec, T, path):
    """T backward passes through the steps (T mixed products, T − 1 with H); K + 2 gradient evaluations, the
    last T of the K steps being the ones the backward pass goes through."""
    q = CountingQuadratic(spd(GENERAL))
    result = q.hypergrad(spec, path)
    assert result.diagnostics["differentiated_steps"] == T
    assert_counts(result, q.counts, hvp_count=T, hessian=T - 1, mixed=T, evaluations=K + 2, linearising_only=False)
    assert q.counts.linearised == set(range(K - T + 1, K + 1))  # calls K − T + 1 … K: the differentiated steps


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("spec, T", [("unroll:checkpoint=true", K), ("unroll:checkpoint=true,segment=4", K),
                                     ("unroll:truncate=4,checkpoint=true,segment=3", 4)])
def test_checkpointed_unroll_counts(spec, T, path):
    """The adjoint recomputes the T differentiated steps (T more evaluations) and takes one vjp per step, whose
    forward pass (one G call each, not an evaluation) linearises that step's product: K + T + 2 evaluations."""
    q = CountingQuadratic(spd(GENERAL))
    result = q.hypergrad(spec, path)
    assert_counts(result, q.counts, hvp_count=T, hessian=T, mixed=T, evaluations=K + T + 2, linearising_only=True)
    assert len(q.counts.linearised) == T


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 32])
def test_forward_counts(chunk_size, path):
    """R runs of the K-step loop, R = ⌈M/c⌉ vmapped chunks on torch.func, R = M single directions on the tape
    (forward AD carries one tangent; the module docstring): K·M jvps through the steps (mixed: K·M, H: (K − 1)·M),
    K·R + 2 evaluations, and F once per run."""
    q = CountingQuadratic(spd(GENERAL))
    result = q.hypergrad(f"forward:chunk_size={chunk_size}", path)
    runs = M if result.diagnostics.get("autodiff_path") == "autograd" else math.ceil(M / chunk_size)
    assert result.diagnostics["chunks"] == runs
    assert_counts(result, q.counts, hvp_count=K * M, hessian=(K - 1) * M, mixed=K * M,
                  evaluations=K * runs + 2, linearising_only=False, F=runs)
    assert len(q.counts.linearised) == K * runs


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode, hvp, mixed, evaluations", [
    ("exact", 1, 1, 1 + 1),               # the step, its backward, and the stationarity gradient at θ' (the one
    ("first_order", 0, 0, 1 + 1),         # at θ is the step's own)
    ("finite_difference", 0, 0, 3 + 1),   # + ∇φG at θ ± ε∇θF (first-order gradients, no product)
])
def test_onestep_counts(mode, hvp, mixed, evaluations, path):
    q = CountingQuadratic(spd(GENERAL))
    result = q.hypergrad(f"onestep:mode={mode}", path, steps=1)
    assert result.diagnostics["inner_steps"] == 1
    assert_counts(result, q.counts, hvp_count=hvp, hessian=0, mixed=mixed, evaluations=evaluations,
                  linearising_only=False)


@pytest.mark.parametrize("spec, hvp, mixed, hessian, evaluations, F", [
    ("unroll", K, K, K - 1, K, 1),
    ("unroll:truncate=4", 4, 4, 3, K, 1),
    ("forward:chunk_size=2", K * M, K * M, (K - 1) * M, K * 2, 2),
    ("onestep", 1, 1, 0, 1, 1),
])
def test_differentiable_routes_count_the_same_work_without_stationarity(spec, hvp, mixed, hessian, evaluations, F):
    """Under torch.func.grad through hypergrad the unrolled/online solvers take their differentiable route, which
    skips the two stationarity gradients: ``evaluations`` = the steps' gradients only. Counted inside the
    differentiated function, before the outer backward adds its own (third-order) passes."""
    q = CountingQuadratic(spd(GENERAL))
    seen = {}

    def through(phi):
        q.counts.reset()
        loop = bilevel.InnerLoop(steps=1 if spec == "onestep" else K, lr=0.1)
        result = bilevel.hypergrad(q.problem, {"theta": q.theta0.clone()}, phi, inner_batch=None, outer_batch=None,
                                   solver=spec, loop=loop, validate=False)
        seen.update(result.diagnostics, counts=q.counts.copy())
        return result.hypergrad["phi"].sum()

    torch.func.grad(through)({"phi": q.phi.clone()})
    counted = seen["counts"]
    assert seen["differentiable"] == 1.0
    assert seen["hvp_count"] == hvp and (counted.mixed, counted.hessian) == (mixed, hessian)
    assert seen["evaluations"] == evaluations == counted.G and counted.F == F


# ---- zeroth order --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("evaluate_mean", [True, False])
def test_cmaes_counts_inner_runs_and_no_derivative(evaluate_mean, path):
    """One generation: ``popsize`` inner runs (+ one at the new mean), each K gradients of G and one F; nothing
    second order."""
    q = CountingQuadratic(spd(GENERAL))
    result = q.hypergrad(f"cmaes:popsize=5,evaluate_mean={str(evaluate_mean).lower()}", path)
    runs = 5 + evaluate_mean
    assert result.diagnostics["evaluations"] == runs and result.diagnostics["hvp_count"] == 0
    assert (q.counts.G, q.counts.F, q.counts.hessian, q.counts.mixed) == (runs * K, runs, 0, 0)
