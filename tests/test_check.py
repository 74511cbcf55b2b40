"""bilevel.check / `bilevel check`: passes a right hypergradient, fails a wrong one on the criterion it breaks.

The verdict is ‖g − fd‖/‖fd‖ ≤ rtol AND cos ≥ min_cosine (against float64 central differences and the
reference solver), with the finite differences' own estimated error ‖D(eps) − D(2·eps)‖/‖D(eps)‖ at most
rtol/10. Exact values: the ridge oracle's closed form (tests/oracles.py); the inner loop below (40 steps
of lr 0.8, contraction max|1 − 0.8λ(H)| = 0.27 on λ(H) ∈ [1.18, 1.59]) converges to 1e-22, so the
derivative of the K-step loop equals the closed form to rounding (measured 2e-15).
"""
import dataclasses
import math
import re

import pytest
import torch

import bilevel
from bilevel.check import FD_ACCURACY_RATIO, finite_difference_with_error
from bilevel.run import cli
from oracles import rel_error, ridge, ridge_hypergrad

CONVERGED = bilevel.InnerLoop(steps=40, lr=0.8)
SHORT_NEUMANN = "neumann:alpha=0.05,terms=1"  # sum of 1 term α·I ≈ 0.05·I for H⁻¹ ≈ 0.7·I: 93 % short, cosine 0.9992


def ridge_check(solver, reference="exact", **kw):
    problem, inner, outer, ib, ob = ridge()
    return bilevel.check(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver=solver, reference=reference,
                         loop=kw.pop("loop", CONVERGED), verbose=kw.pop("verbose", False), **kw)


@dataclasses.dataclass(frozen=True)
class Rotated(bilevel.Implicit):
    """CG's hypergradient plus an orthogonal component of relative size ``tilt``: rel. error = tilt and
    cosine = 1/√(1 + tilt²) against the true value, by construction."""

    tilt: float = 0.3

    def __call__(self, *args):
        result = super().__call__(*args)
        g = result.hypergrad["log_lambda"]
        e = torch.zeros_like(g)
        e[0] = 1.0
        u = e - (e @ g) / (g @ g) * g
        result.hypergrad = {"log_lambda": g + self.tilt * g.norm() * u / u.norm()}
        return result


@pytest.mark.filterwarnings("ignore::bilevel.ConvergenceWarning")
def test_a_93_percent_short_neumann_fails_on_relative_error_though_its_cosine_passes():
    report = ridge_check(SHORT_NEUMANN)
    assert 0.92 < report.fd_rel_error < 0.94 and 0.92 < report.ref_rel_error < 0.94  # measured 0.932 both
    assert report.fd_cosine > 0.999 and report.ref_cosine > 0.999  # a cosine-only check would pass it
    assert not report.passed
    assert report.failures == (f"relative error vs finite differences {report.fd_rel_error:.3e} > rtol 0.0001",
                               f"relative error vs reference solver exact {report.ref_rel_error:.3e} > rtol 0.0001")
    assert report.verdict.startswith("check FAILED: relative error vs finite differences 9.3")


def test_a_converged_neumann_passes_and_matches_the_closed_form():
    problem, inner, outer, ib, ob = ridge()
    report = ridge_check("neumann:alpha=0.3,terms=100")  # max|1 − 0.3λ| = 0.65: 0.65^100 = 2e-19
    assert report.passed and report.failures == () and report.verdict == "check passed"
    assert report.fd_rel_error < 1e-8 and report.ref_rel_error < 1e-12  # measured 6e-10 (FD rounding), 1e-16
    assert report.fd_error_estimate < 1e-8  # measured 9e-10: far below the bound it must meet
    assert report.rtol == 1e-4 and report.min_cosine == 0.99 and report.fd_accuracy_bound == 1e-4 / FD_ACCURACY_RATIO
    exact = torch.linalg.norm(ridge_hypergrad(outer, ib, ob)["log_lambda"])
    assert abs(report.hypergrad_norm - float(exact)) < 1e-12 * float(exact)


def test_a_cosine_only_failure_fails_on_cosine():
    """With rtol loose enough to admit a 30 % error, a rotated hypergradient fails on the cosine alone."""
    report = ridge_check(Rotated(linsolve=bilevel.CG(rtol=1e-12)), reference="cg:rtol=1e-12", rtol=0.5)
    cos = 1 / math.sqrt(1 + 0.3 ** 2)  # 0.9578
    assert abs(report.fd_rel_error - 0.3) < 1e-6 and abs(report.fd_cosine - cos) < 1e-6
    assert abs(report.ref_rel_error - 0.3) < 1e-9 and abs(report.ref_cosine - cos) < 1e-9
    assert not report.passed
    assert report.failures == (f"cosine vs finite differences {report.fd_cosine:.6f} < min_cosine 0.99",
                               f"cosine vs reference solver cg:rtol=1e-12 {report.ref_cosine:.6f} < min_cosine 0.99")


@pytest.mark.parametrize("seed", [0, 1])
def test_fd_error_estimate_tracks_the_true_fd_error_on_the_ridge_oracle(seed):
    """‖D(eps) − D(2eps)‖/‖D(eps)‖ against the true error ‖D(eps) − g*‖/‖g*‖ (g*: closed form).

    Truncation regime (eps = 1e-3): D(h) = g* + c h² + O(h⁴), so the estimate is 3× the true error.
    Rounding regime (eps = 1e-6): both are noise of size u|L|/eps; measured ratios 0.65 … 4.7 over eps
    1e-8 … 1e-5 and two seeds, so within 5× either way, and both far below the default rtol/10 = 1e-5.
    """
    problem, inner, outer, ib, ob = ridge(seed=seed)
    exact = ridge_hypergrad(outer, ib, ob)["log_lambda"]
    eye = torch.eye(exact.numel(), dtype=torch.float64)
    fd, estimate = finite_difference_with_error(problem, inner, outer, ib, ob, CONVERGED, eye, 1e-3)
    assert 2.9 < estimate / rel_error({"g": fd}, {"g": exact}) < 3.1  # measured 3.000
    fd, estimate = finite_difference_with_error(problem, inner, outer, ib, ob, CONVERGED, eye, 1e-6)
    true = rel_error({"g": fd}, {"g": exact})
    assert true < 1e-8 and estimate < 1e-8 and 0.2 < estimate / true < 5  # measured 6e-10/9e-10, 1.4e-9/1.7e-9


def test_an_inaccurate_fd_reference_fails_instead_of_passing_silently():
    """eps = 0.1: the FD's true error is 2.3e-3 (so an exact solver is within rtol 5e-3 of it), but its
    estimated error 6.9e-3 exceeds rtol itself, so the FD cannot certify rtol: the check fails, saying why."""
    report = ridge_check("unroll", reference=None, eps=0.1, rtol=5e-3)
    assert report.fd_rel_error < 5e-3 and report.fd_cosine > 0.99  # the other criteria alone would pass
    assert report.fd_error_estimate > 5e-3 and not report.passed
    (failure,) = report.failures
    assert failure.startswith(f"finite-difference reference not accurate enough: its estimated relative error "
                              f"{report.fd_error_estimate:.3e}")
    assert "cannot certify rtol 0.005" in failure and "choose another eps" in failure and "loosen rtol" in failure


def test_fd_accuracy_must_be_ten_times_rtol():
    """eps = 3e-2: estimate 6.2e-4 (true FD error 2.1e-4) — below rtol 1e-3 but above rtol/10: still fails."""
    report = ridge_check("unroll", reference=None, eps=3e-2, rtol=1e-3)
    assert report.fd_rel_error < 1e-3 and 1e-4 < report.fd_error_estimate < 1e-3
    assert not report.passed and report.failures[0].startswith("finite-difference reference not accurate enough")


@pytest.mark.filterwarnings("ignore:solver .* returned a hypergradient that is exactly zero")
def test_a_zero_hypergradient_cannot_be_checked_relatively():
    """An outer loss that is identically 0: the hypergradient and every difference quotient are exactly 0,
    so no relative error exists and the check must say so rather than pass."""
    problem, inner, outer, ib, ob = ridge()
    flat = bilevel.BilevelProblem(problem.inner, lambda theta, phi, batch: 0.0 * theta["w"].sum())
    report = bilevel.check(flat, inner, outer, inner_batch=ib, outer_batch=ob, solver="unroll", reference=None,
                           loop=CONVERGED, verbose=False)
    assert report.fd_norm == 0 and not report.passed
    assert report.failures[0].startswith("finite-difference reference is zero in all 5 directions, so no relative "
                                         "error can be measured: check at outer params where the hypergradient is")


def test_check_prints_numbers_thresholds_and_verdict(capsys):
    problem, inner, outer, ib, ob = ridge()
    loop = bilevel.InnerLoop(steps=30, lr=0.3, optimizer="momentum")
    report = bilevel.check(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver="forward",
                           reference="unroll", loop=loop)
    assert report.fd_rel_error < 1e-6 and report.fd_cosine > 0.999999  # forward = d/dφ of the 30-step loop
    assert report.ref_rel_error < 1e-10 and report.passed
    out = capsys.readouterr().out
    assert f"vs central finite differences (5 directions, float64, eps 1e-06): rel. error {report.fd_rel_error:.3e}" in out
    assert f"finite-difference error estimate |D(eps) - D(2 eps)|/|D(eps)|: {report.fd_error_estimate:.3e}" in out
    assert f"vs reference solver unroll: rel. error {report.ref_rel_error:.3e}" in out
    assert "thresholds: rel. error <= rtol 0.0001, cosine >= 0.99, finite-difference error estimate <= rtol/10" in out
    assert out.rstrip().endswith("check passed")


def test_check_random_directions_for_large_outer():
    problem, inner, outer, ib, ob = ridge(d=40)
    report = bilevel.check(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver="unroll", reference=None,
                           loop=bilevel.InnerLoop(steps=20, lr=0.3), max_directions=8, verbose=False)
    assert report.directions == 8 and report.fd_rel_error < 1e-6 and report.passed


def test_check_flags_a_neumann_series_without_its_alpha():
    """A Neumann series without its leading alpha (the ITL pseudocode bug) is caught; with it, it passes."""
    @dataclasses.dataclass(frozen=True)
    class NoAlpha(bilevel.Implicit):
        def __call__(self, *args):
            result = super().__call__(*args)
            result.hypergrad = {k: v / self.linsolve.alpha for k, v in result.hypergrad.items()}
            return result

    bad = ridge_check(NoAlpha(linsolve=bilevel.Neumann(alpha=0.3, terms=100), warm_start=False), reference="cg")
    assert bad.fd_rel_error > 1.0 and bad.ref_rel_error > 1.0 and not bad.passed  # 1/0.3 − 1 = 2.33
    good = ridge_check("neumann:alpha=0.3,terms=100", reference="cg")
    assert good.fd_rel_error < 1e-5 and good.ref_rel_error < 1e-5 and good.passed


@pytest.mark.parametrize("option, value, message", [
    ("rtol", 0.0, "check rtol must be a finite number > 0"),
    ("rtol", math.nan, "check rtol must be a finite number > 0"),
    ("min_cosine", 1.5, "check min_cosine must be a number in [-1, 1]"),
    ("eps", -1e-6, "check eps (the finite-difference step) must be a finite number > 0"),
    ("max_directions", 0, "check max_directions must be an int >= 1"),
])
def test_bad_check_options_are_refused_before_any_work(option, value, message):
    def never_called(*args):
        raise AssertionError("the problem was evaluated before the options were checked")

    problem, inner, outer, ib, ob = ridge()
    with pytest.raises(ValueError, match=re.escape(message)):
        bilevel.check(bilevel.BilevelProblem(never_called, never_called), inner, outer, inner_batch=ib,
                      outer_batch=ob, verbose=False, **{option: value})


# --- the command line -------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::bilevel.ConvergenceWarning")
def test_cli_fails_a_short_neumann_with_exit_1_naming_the_relative_error(capsys):
    """problems/ridge.py SMOKE: the short Neumann is 71 % off with cosine 0.9965 (the old cosine-only check
    passed it with exit 0)."""
    assert cli.main(["check", "ridge", "--smoke", "--solver", SHORT_NEUMANN, "--reference", "exact"]) == 1
    out = capsys.readouterr().out
    verdict = out.rstrip().splitlines()[-1]
    fd_rel, ref_rel = (float(x) for x in re.fullmatch(
        r"check FAILED: relative error vs finite differences (\S+) > rtol 0\.0001; "
        r"relative error vs reference solver exact (\S+) > rtol 0\.0001", verdict).groups())
    assert 0.6 < fd_rel < 0.8 and 0.6 < ref_rel < 0.8  # measured 0.706 both
    cosines = [float(c) for c in re.findall(r"cosine (\d\.\d+)", out)]
    assert len(cosines) == 2 and min(cosines) > 0.99  # the old cosine-only check passed it (measured 0.9965)


def test_cli_passes_a_converged_neumann_and_honours_rtol(capsys):
    """The SMOKE inner loop (50 steps) leaves the implicit hypergradient 1.2e-6 from the loop's FD derivative."""
    args = ["check", "ridge", "--smoke", "--solver", "neumann:alpha=auto,terms=200,rtol=1e-10", "--reference", "exact"]
    assert cli.main(args) == 0
    assert capsys.readouterr().out.rstrip().endswith("check passed")
    assert cli.main(args + ["--rtol", "1e-7"]) == 1  # tighter than the inner loop's convergence: must fail
    verdict = capsys.readouterr().out.rstrip().splitlines()[-1]
    fd_rel = float(re.fullmatch(r"check FAILED: relative error vs finite differences (\S+) > rtol 1e-07", verdict)[1])
    assert 1e-7 < fd_rel < 1e-5  # measured 1.2e-6; the reference (exact) agrees with the solver to 6e-16


def test_cli_says_when_the_fd_reference_is_not_accurate_enough(capsys):
    args = ["check", "ridge", "--smoke", "--solver", "unroll", "--reference", "none", "--eps", "0.1", "--rtol", "1e-2"]
    assert cli.main(args) == 1
    out = capsys.readouterr().out
    assert "check FAILED: finite-difference reference not accurate enough" in out and "choose another eps" in out


def test_cli_refuses_bad_thresholds_before_loading_the_problem(capsys):
    assert cli.main(["check", "no_such_problem", "--rtol", "0"]) == 2
    assert "check rtol must be a finite number > 0" in capsys.readouterr().err
    assert cli.main(["check", "no_such_problem", "--min-cosine", "2"]) == 2
    assert "check min_cosine must be a number in [-1, 1]" in capsys.readouterr().err
