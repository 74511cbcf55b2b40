"""``bilevel.check`` held to exact values: its finite differences, their error estimate, the comparisons, the
verdict and every line of the report.

The probe problem makes L(φ) = F(θ_K(φ), φ) a known polynomial: with K = 0 inner steps θ_K = θ₀, and
F(θ, φ) = Σ φᵢ³ + Σ θ, so along eᵢ the central difference is exactly

    D(h) = [(φᵢ + h)³ − (φᵢ − h)³] / 2h = 3φᵢ² + h²,

D(eps) − D(2·eps) = −3·eps² in each coordinate, and the true hypergradient (``unroll``'s) is 3φ². A solver
that returns s·3φ² (``Scaled``) has relative error |s − 1| and cosine 1 (s > 0). Written to kill the mutants
that ``mutation/run.py check`` found alive (docs/mutation.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import bilevel
import importlib

chk = importlib.import_module("bilevel.check")  # the module; bilevel.check is the function
from bilevel.types import HypergradResult

F64 = torch.float64
PHI = torch.tensor([1.0, -2.0, 0.5], dtype=F64)


def inner_loss(inner, outer, batch):
    return ((inner["w"] - outer["phi"]) ** 2).sum()


def outer_loss(inner, outer, batch):
    return (outer["phi"] ** 3).sum() + inner["w"].sum()


PROBLEM = bilevel.BilevelProblem(inner_loss, outer_loss)
LOOP = bilevel.InnerLoop(steps=0)


@dataclass(frozen=True)
class Scaled:
    """A solver returning s · 3φ² (the exact hypergradient of the probe problem times s)."""

    s: float = 1.0

    def init(self, problem, inner, outer):
        return None

    def __call__(self, problem, inner, outer, inner_batch, outer_batch, loop, state):
        return HypergradResult({"phi": self.s * 3 * outer["phi"] ** 2}, inner, {}, None)


def run(solver=Scaled(), reference=None, phi=PHI, **kw):
    inner = {"w": torch.zeros(phi.numel(), dtype=F64)}
    return bilevel.check(PROBLEM, inner, {"phi": phi.clone()}, inner_batch=None, outer_batch=None, solver=solver,
                         reference=reference, loop=LOOP, verbose=False, **kw)


def test_finite_differences_and_their_error_estimate_are_the_closed_form():
    eps = 1e-2
    inner = {"w": torch.zeros(3, dtype=F64)}
    eye = torch.eye(3, dtype=F64)
    fd, err = chk.finite_difference_with_error(PROBLEM, inner, {"phi": PHI}, None, None, LOOP, eye, eps)
    exact = 3 * PHI ** 2 + eps ** 2
    assert torch.allclose(fd, exact, rtol=1e-12, atol=0)
    spread = 3 * eps ** 2 * math.sqrt(3)  # ‖D(eps) − D(2 eps)‖ over the three coordinates
    assert err == pytest.approx(spread / float(torch.linalg.norm(exact)), rel=1e-8)
    directional = chk.finite_difference_directional(PROBLEM, inner, {"phi": PHI}, None, None, LOOP, eye, eps)
    assert torch.allclose(directional, exact, rtol=1e-12, atol=0) and directional.dtype == F64
    # along a non-axis direction d: ⟨3φ², d⟩ + h² Σ dᵢ³ (the cubic term of each coordinate)
    d = torch.tensor([[0.6, 0.8, 0.0]], dtype=F64)
    along = chk.finite_difference_directional(PROBLEM, inner, {"phi": PHI}, None, None, LOOP, d, eps)
    assert float(along[0]) == pytest.approx(float(3 * PHI ** 2 @ d[0] + eps ** 2 * (d[0] ** 3).sum()), rel=1e-10)


def test_finite_difference_error_is_infinite_when_every_difference_is_zero():
    flat = bilevel.BilevelProblem(inner_loss, lambda inner, outer, batch: inner["w"].sum())
    inner = {"w": torch.zeros(2, dtype=F64)}
    fd, err = chk.finite_difference_with_error(flat, inner, {"phi": torch.ones(2, dtype=F64)}, None, None, LOOP,
                                               torch.eye(2, dtype=F64), 1e-3)
    assert torch.equal(fd, torch.zeros(2, dtype=F64)) and err == math.inf


def test_compare_is_the_relative_error_and_cosine():
    a, b = torch.tensor([3.0, 4.0], dtype=F64), torch.tensor([3.0, 0.0], dtype=F64)
    rel, cos = chk._compare(a, b)
    assert rel == pytest.approx(4 / 3, rel=1e-15) and cos == pytest.approx(9 / 15, rel=1e-15)
    rel, cos = chk._compare(-a, a)
    assert rel == pytest.approx(2.0, rel=1e-15) and cos == pytest.approx(-1.0, rel=1e-15)
    zero = torch.zeros(2, dtype=F64)
    assert chk._compare(a, zero)[0] == math.inf
    rel, cos = chk._compare(zero, zero)
    assert math.isnan(rel) and math.isnan(cos)
    assert math.isnan(chk._compare(zero, a)[1]) and chk._compare(zero, a)[0] == 1.0


def test_to64_casts_floating_tensors_only():
    out = chk._to64((torch.ones(2, dtype=torch.float32), torch.ones(2, dtype=torch.long), 3.0))
    assert out[0].dtype == F64 and out[1].dtype == torch.long and out[2] == 3.0


def test_an_exact_solver_passes_with_the_measured_numbers():
    report = run(eps=1e-2, rtol=1e-2)
    exact = 3 * PHI ** 2
    fd = exact + 1e-4
    assert report.passed and report.failures == () and report.verdict == "check passed"
    assert report.directions == 3 and report.reference is None and report.ref_rel_error is None
    assert report.fd_rel_error == pytest.approx(float(torch.linalg.norm(exact - fd) / torch.linalg.norm(fd)), rel=1e-6)
    assert report.hypergrad_norm == pytest.approx(float(torch.linalg.norm(exact)), rel=1e-15)
    assert report.fd_norm == pytest.approx(float(torch.linalg.norm(fd)), rel=1e-10)
    assert report.fd_error_estimate == pytest.approx(3e-4 * math.sqrt(3) / float(torch.linalg.norm(fd)), rel=1e-6)
    assert report.fd_accuracy_bound == pytest.approx(1e-3, rel=1e-15)
    assert report.eps == 1e-2 and report.rtol == 1e-2 and report.min_cosine == chk.DEFAULT_MIN_COSINE


def test_a_short_hypergradient_fails_on_relative_error_though_its_cosine_is_one():
    report = run(Scaled(0.5))
    assert not report.passed and report.fd_cosine == pytest.approx(1.0, abs=1e-12)
    assert report.fd_rel_error == pytest.approx(0.5, rel=1e-6)
    assert report.failures == (f"relative error vs finite differences {report.fd_rel_error:.3e} > rtol 0.0001",)
    assert report.verdict == "check FAILED: " + report.failures[0]


def test_rtol_and_min_cosine_are_inclusive_bounds():
    assert run(Scaled(0.5), rtol=0.5 + 1e-6).passed
    assert not run(Scaled(0.5), rtol=0.5 - 1e-6).passed
    flipped = run(Scaled(-1.0), rtol=10.0, min_cosine=-1.0)
    assert flipped.fd_cosine == pytest.approx(-1.0, abs=1e-12) and flipped.passed
    failed = run(Scaled(-1.0), rtol=10.0, min_cosine=-0.999)
    assert failed.failures == (f"cosine vs finite differences {failed.fd_cosine:.6f} < min_cosine -0.999",)


def test_against_a_reference_solver():
    report = run(Scaled(1.0), reference=Scaled(1.25), rtol=0.5)
    assert report.reference == str(Scaled(1.25))
    assert report.ref_rel_error == pytest.approx(0.2, rel=1e-12)  # ‖g − 1.25g‖/‖1.25g‖
    assert report.ref_cosine == pytest.approx(1.0, abs=1e-12)
    assert report.ref_fd_rel_error == pytest.approx(0.25, rel=1e-5)
    assert report.passed
    bad = run(Scaled(1.0), reference=Scaled(1.25), rtol=0.1)
    assert bad.failures == (f"relative error vs reference solver {bad.reference} {bad.ref_rel_error:.3e} > rtol 0.1",)
    opposite = run(Scaled(1.0), reference=Scaled(-1.0), rtol=10.0, min_cosine=0.0)
    assert opposite.failures == (f"cosine vs reference solver {opposite.reference} -1.000000 < min_cosine 0",)


def test_inaccurate_finite_differences_fail_the_check_and_say_so():
    """eps = 0.1: the estimate 3·0.01·√3/‖fd‖ exceeds rtol/10 = 1e-5 even though the solver is exact."""
    report = run(eps=0.1, rtol=1e-4)
    assert not report.passed and len(report.failures) == 2  # the estimate, and fd's own h² bias as rel. error
    assert report.failures[0].startswith(
        f"finite-difference reference not accurate enough: its estimated relative error {report.fd_error_estimate:.3e}")
    assert "exceeds rtol/10 = 1.000e-05" in report.failures[0]
    # at rtol 10x the estimate (and the h² bias within it) the same numbers pass
    assert run(eps=0.1, rtol=10 * report.fd_error_estimate).passed


def test_a_zero_finite_difference_reference_fails_with_its_reason():
    report = run(phi=torch.zeros(3, dtype=F64), eps=1e-6)  # 3φ² = 0 and D(h) = h² = 1e-12 ≈ 0
    zero_problem_report = bilevel.check(
        bilevel.BilevelProblem(inner_loss, lambda inner, outer, batch: inner["w"].sum() + 0 * outer["phi"].sum()),
        {"w": torch.zeros(3, dtype=F64)}, {"phi": PHI.clone()}, inner_batch=None, outer_batch=None,
        solver=Scaled(1.0), reference=None, loop=LOOP, verbose=False)
    assert zero_problem_report.fd_norm == 0.0 and not zero_problem_report.passed
    assert zero_problem_report.failures[0].startswith("finite-difference reference is zero in all 3 directions")
    assert not any("not accurate enough" in f for f in zero_problem_report.failures)
    assert report.fd_norm > 0


def test_random_directions_when_phi_is_larger_than_max_directions():
    report = run(max_directions=2, eps=1e-2, rtol=1e-2, seed=5)
    assert report.directions == 2 and report.passed
    gen = torch.Generator().manual_seed(5)
    d = torch.randn(2, 3, generator=gen, dtype=F64)
    d = d / d.norm(dim=1, keepdim=True)
    expected = d @ (3 * PHI ** 2) + 1e-4 * (d ** 3).sum(dim=1)
    assert report.fd_norm == pytest.approx(float(torch.linalg.norm(expected)), rel=1e-8)
    assert run(max_directions=3, eps=1e-2, rtol=1e-2).directions == 3  # dim φ = max_directions: every coordinate


def test_the_report_prints_its_numbers_and_verdict(capsys):
    report = run(Scaled(1.0), reference=Scaled(1.0), eps=1e-2, rtol=1e-2)
    text = str(report)
    assert text.splitlines()[0] == f"solver {report.solver}: |hypergrad| = {report.hypergrad_norm:.6g}"
    assert (f"vs central finite differences (3 directions, float64, eps 0.01): rel. error {report.fd_rel_error:.3e}, "
            f"cosine {report.fd_cosine:.8f}") in text
    assert f"|D(eps) - D(2 eps)|/|D(eps)|: {report.fd_error_estimate:.3e} (|fd| = {report.fd_norm:.6g})" in text
    assert f"rel. error 0.000e+00, cosine {report.ref_cosine:.8f} (reference vs finite differences: rel. error " \
           f"{report.ref_fd_rel_error:.3e})" in text
    assert "thresholds: rel. error <= rtol 0.01, cosine >= 0.99, finite-difference error estimate <= rtol/10 = 0.001" \
        in text
    assert text.splitlines()[-1] == "check passed"
    assert "vs reference solver" not in str(run(eps=1e-2, rtol=1e-2))
    bilevel.check(PROBLEM, {"w": torch.zeros(3, dtype=F64)}, {"phi": PHI.clone()}, inner_batch=None,
                  outer_batch=None, solver=Scaled(), reference=None, loop=LOOP, eps=1e-2, rtol=1e-2)
    assert capsys.readouterr().out.strip().splitlines()[-1] == "check passed"  # verbose=True is the default


def test_check_runs_in_float64_on_float32_inputs():
    inner = {"w": torch.zeros(3)}
    report = bilevel.check(PROBLEM, inner, {"phi": PHI.float()}, inner_batch=None, outer_batch=None,
                           solver=Scaled(), reference=None, loop=LOOP, eps=1e-2, rtol=1e-2, verbose=False)
    assert report.passed and report.fd_rel_error < 1e-4  # float32 differences at eps 1e-2 would be ~1e-4 off


@pytest.mark.parametrize("kwargs, message", [
    (dict(rtol=0.0), "check rtol must be a finite number > 0"),
    (dict(rtol=math.inf), "check rtol must be a finite number > 0"),
    (dict(rtol=True), "check rtol must be a finite number > 0"),
    (dict(min_cosine=1.5), r"check min_cosine must be a number in \[-1, 1\]"),
    (dict(min_cosine=-1.01), r"check min_cosine must be a number in \[-1, 1\]"),
    (dict(min_cosine=False), r"check min_cosine must be a number in \[-1, 1\]"),
    (dict(eps=0.0), "check eps .* must be a finite number > 0"),
    (dict(eps=math.inf), "check eps .* must be a finite number > 0"),
    (dict(eps=True), "check eps .* must be a finite number > 0"),
    (dict(max_directions=0), "check max_directions must be an int >= 1"),
    (dict(max_directions=2.0), "check max_directions must be an int >= 1"),
    (dict(max_directions=True), "check max_directions must be an int >= 1"),
])
def test_bad_options_are_refused_before_any_work(kwargs, message):
    calls = []

    def counting_inner(inner, outer, batch):
        calls.append(1)
        return inner_loss(inner, outer, batch)

    with pytest.raises(ValueError, match=message):
        bilevel.check(bilevel.BilevelProblem(counting_inner, outer_loss), {"w": torch.zeros(3, dtype=F64)},
                      {"phi": PHI.clone()}, inner_batch=None, outer_batch=None, solver=Scaled(), loop=LOOP,
                      verbose=False, **kwargs)
    assert calls == []


def test_the_option_bounds_themselves_are_valid():
    chk.validate_check_options(rtol=1e-300, min_cosine=-1, eps=1e-300, max_directions=1)
    chk.validate_check_options(rtol=1, min_cosine=1, eps=1, max_directions=1)


@dataclass(frozen=True)
class Fixed:
    """A solver returning a fixed hypergradient vector (to set the cosine against the reference exactly)."""

    g: tuple[float, ...]

    def init(self, problem, inner, outer):
        return None

    def __call__(self, problem, inner, outer, inner_batch, outer_batch, loop, state):
        return HypergradResult({"phi": torch.tensor(self.g, dtype=F64)}, inner, {}, None)


def test_the_reference_bounds_are_inclusive_too():
    """At rtol = the measured ‖g − g_ref‖/‖g_ref‖ and min_cosine = the measured cos(g, g_ref) the check passes;
    one ulp tighter it fails on that criterion alone."""
    reference = Fixed(tuple((3 * PHI ** 2 + torch.tensor([0.5, -0.4, 0.3], dtype=F64)).tolist()))
    probe = run(Scaled(1.0), reference=reference, eps=1e-2, rtol=10.0, min_cosine=0.0)
    rel, cos = probe.ref_rel_error, probe.ref_cosine
    assert 0.01 < rel < 1 and 0.9 < cos < 1  # neither bound is met by the fd comparison's slack alone
    assert run(Scaled(1.0), reference=reference, eps=1e-2, rtol=rel, min_cosine=cos).passed
    tight_rel = run(Scaled(1.0), reference=reference, eps=1e-2, rtol=math.nextafter(rel, 0), min_cosine=cos)
    assert [f.split(" ")[3] for f in tight_rel.failures] == ["reference"]
    tight_cos = run(Scaled(1.0), reference=reference, eps=1e-2, rtol=rel, min_cosine=math.nextafter(cos, 1))
    assert len(tight_cos.failures) == 1 and tight_cos.failures[0].startswith("cosine vs reference solver")


def test_the_default_seed_of_the_random_directions_is_zero():
    report = run(max_directions=2, eps=1e-2, rtol=1e-2)
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(2, 3, generator=gen, dtype=F64)
    d = d / d.norm(dim=1, keepdim=True)
    expected = d @ (3 * PHI ** 2) + 1e-4 * (d ** 3).sum(dim=1)
    assert report.fd_norm == pytest.approx(float(torch.linalg.norm(expected)), rel=1e-8)


def test_the_default_solver_and_reference_are_cg_and_unroll():
    """With K = 0 inner steps the K-step loop's derivative (``unroll``) is 3φ², while the implicit solution at
    θ₀ = 0 (``cg``: ∇_φF − ∇²_φθG (∇²_θθG)⁻¹ ∇_θF with ∇²_θθG = 2I, ∇²_φθG = −2I, ∇_θF = 1) is 3φ² + 1: the
    reference error is then exactly ‖1‖/‖3φ²‖ = √3/‖3φ²‖."""
    report = bilevel.check(PROBLEM, {"w": torch.zeros(3, dtype=F64)}, {"phi": PHI.clone()}, inner_batch=None,
                           outer_batch=None, loop=LOOP, eps=1e-2, rtol=1e-2, verbose=False)
    assert (report.solver, report.reference) == ("cg", "unroll")
    assert report.ref_rel_error == pytest.approx(math.sqrt(3) / float(torch.linalg.norm(3 * PHI ** 2)), rel=1e-10)
    assert report.hypergrad_norm == pytest.approx(float(torch.linalg.norm(3 * PHI ** 2 + 1)), rel=1e-10)


C = torch.tensor([0.5, 1.0, -0.25])  # float32 on purpose: check must difference in float64


def test_a_minibatch_callable_is_called_per_step_and_cast_to_float64():
    """Two SGD steps (lr 0.25) on G = ‖w − φ·b_k‖² from w = 0 with b_k = (k + 1)·c: w ← ½w + ½φ b_k, so
    w₂ = φ(¼b₀ + ½b₁) = 1.25·cφ and dL/dφ = 3φ² + 1.25c; the differences add eps² (the cubic term)."""
    seen = []

    def minibatch_inner(inner, outer, batch):
        seen.append(batch.dtype)
        return ((inner["w"] - outer["phi"] * batch) ** 2).sum()

    exact = 3 * PHI ** 2 + 1.25 * C.double()
    report = bilevel.check(bilevel.BilevelProblem(minibatch_inner, outer_loss), {"w": torch.zeros(3, dtype=F64)},
                           {"phi": PHI.clone()}, inner_batch=lambda k: (k + 1) * C, outer_batch=None,
                           solver=Fixed(tuple(exact.tolist())), reference=None,
                           loop=bilevel.InnerLoop(steps=2, lr=0.25), eps=1e-2, rtol=1e-2, verbose=False)
    fd = exact + 1e-4
    assert report.fd_rel_error == pytest.approx(float(torch.linalg.norm(exact - fd) / torch.linalg.norm(fd)),
                                                rel=1e-6)
    assert seen and set(seen) == {F64}
    assert report.passed


def test_max_directions_defaults_to_32():
    phi = torch.linspace(-1, 1, 33, dtype=F64)
    assert run(phi=phi, eps=1e-2, rtol=1e-2).directions == 32
    assert run(phi=phi[:32], eps=1e-2, rtol=1e-2).directions == 32



def test_directional_differences_use_both_batches():
    """One SGD step (lr 0.25) on ‖w − φ·b‖² from w = 0 gives w₁ = ½bφ; with F = Σ sφ³ + Σ w (s: the outer batch)
    L(φ) = Σ sφ³ + ½Σ bφ and D(h) along eᵢ = 3sᵢφᵢ² + sᵢh² + ½bᵢ exactly."""
    def batch_inner(inner, outer, batch):
        return ((inner["w"] - outer["phi"] * batch) ** 2).sum()

    def batch_outer(inner, outer, batch):
        return (batch * outer["phi"] ** 3).sum() + inner["w"].sum()

    b, s, h = torch.tensor([0.5, 1.0, -0.25], dtype=F64), torch.tensor([2.0, -1.0, 3.0], dtype=F64), 1e-2
    fd = chk.finite_difference_directional(bilevel.BilevelProblem(batch_inner, batch_outer),
                                           {"w": torch.zeros(3, dtype=F64)}, {"phi": PHI}, b, s,
                                           bilevel.InnerLoop(steps=1, lr=0.25), torch.eye(3, dtype=F64), h)
    assert torch.allclose(fd, 3 * s * PHI ** 2 + s * h ** 2 + 0.5 * b, rtol=1e-12, atol=0)


def test_the_fd_bounds_hold_at_equality_and_the_report_keeps_the_options():
    """rtol = the measured ‖Pg − fd‖/‖fd‖ passes, one ulp less fails; the report records the options given."""
    rel = run(Scaled(0.5), eps=1e-2, rtol=1.0).fd_rel_error
    assert 0.49 < rel < 0.51
    assert run(Scaled(0.5), eps=1e-2, rtol=rel).passed
    assert not run(Scaled(0.5), eps=1e-2, rtol=math.nextafter(rel, 0)).passed
    report = run(eps=1e-2, rtol=0.05, min_cosine=0.5)
    assert (report.eps, report.rtol, report.min_cosine, report.fd_accuracy_bound) == (1e-2, 0.05, 0.5, 0.05 / 10)


def test_phi_of_exactly_max_directions_is_differenced_along_every_coordinate():
    report = run(max_directions=3, eps=1e-2, rtol=1e-2)
    assert report.fd_norm == pytest.approx(float(torch.linalg.norm(3 * PHI ** 2 + 1e-4)), rel=1e-10)
