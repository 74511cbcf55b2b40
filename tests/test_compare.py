"""``bilevel.compare`` / ``compare_problem``: solvers against a reference on one instance.

Every number a row reports is held against an independent computation: the reference against the ridge
closed form, each solver's error and cosine against direct ``bilevel.hypergrad`` calls, the trajectory's
points against ``run_locally`` of the reference, the memory measurement against known allocations.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import textwrap

import pytest
import torch

import bilevel
from bilevel import tree
from bilevel.compare import (FAILED, NOT_APPLICABLE, CompareError, check_specs, compare, compare_problem,
                             split_solver_list)
from bilevel.context import local_context
from bilevel.measure import CPU_METHOD, peak_memory
from bilevel.run.compare_report import CompareOutputError, check_out_dir, format_report, write_report
from bilevel.run.problems import load_problem
from oracles import rel_error, ridge, ridge_hypergrad

CONVERGED = bilevel.InnerLoop(steps=120, lr=0.5)  # contraction ≤ 0.8 per step on the ridge oracle: 0.8^120 ≈ 2e-12

EXACT_SOLVERS = ["cg:rtol=1e-12,maxiter=50", "exact", "unroll", "forward:chunk_size=5",
                 "fixedpoint:rtol=1e-12,maxiter=500"]


def _flat(params):
    return tree.flatten(params).double()


def _direct(problem, inner, outer, ib, ob, loop, spec):
    return bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver=spec, loop=loop)


def _direct_errors(g, g_ref):
    a, b = _flat(g), _flat(g_ref)
    return float((a - b).norm() / b.norm()), float(a @ b / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def ridge_smoke():
    module = load_problem("ridge")
    # 120 full-batch steps contract the SMOKE ridge's inner error by ~0.81^120 ≈ 1e-11 (converged)
    return module, module.build(dataclasses.replace(module.SMOKE, inner_steps=120), local_context())


# ---- the solver list -----------------------------------------------------------------------------------
def test_split_solver_list_reattaches_options_to_their_spec():
    text = "cg,neumann:alpha=auto,terms=20,fixedpoint, unroll:truncate=20 ,onestep,cg:maxiter=5,rtol=1e-9"
    assert split_solver_list(text) == ["cg", "neumann:alpha=auto,terms=20", "fixedpoint", "unroll:truncate=20",
                                       "onestep", "cg:maxiter=5,rtol=1e-9"]
    assert split_solver_list("exact") == ["exact"]


@pytest.mark.parametrize("text, message", [
    ("terms=20,cg", r"option 'terms=20' comes before any solver name.*write name:terms=20"),
    ("cg,,unroll", r"empty item .*remove the doubled or trailing comma"),
    ("cg,unroll,", r"empty item"),
    ("cg,rtol=1e-8", r"option 'rtol=1e-8' follows 'cg', which has no ':'; write cg:rtol=1e-8"),
])
def test_split_solver_list_refuses_ambiguous_lists(text, message):
    with pytest.raises(bilevel.SpecError, match=message):
        split_solver_list(text)


@pytest.mark.parametrize("solvers, reference, message", [
    ("cg,unroll,cg", "exact", r"solver\(s\) cg listed twice; list each spec once"),
    ("cg,neumann:alpha=auto,terms", "exact", r"'terms' in the solver list .* is not a registered solver \(cg, "
                                            r".*if it is an option of 'neumann:alpha=auto', write it as key=value"),
    ("cgg,unroll", "exact", r"'cgg' in the solver list 'cgg,unroll' is not a registered solver \(cg, neumann"),
    ("cg:maxiterr=5", "exact", r"unknown option 'maxiterr' for solver 'cg'; valid options: .*maxiter: int = 100"),
    ("neumann:alpha=-1", "exact", r"invalid options for solver 'neumann'.*alpha"),
    ("cg", "cgg", r"unknown solver 'cgg'; registered solvers: cg"),
    ("cg", None, r"needs a reference solver, e.g. reference='exact'"),
    ("cg", "cmaes", r"reference 'cmaes' is zeroth-order.*use reference='exact'"),
    ([], "exact", r"no solver to compare: give at least one spec"),
])
def test_check_specs_refuses_bad_lists_before_any_work(solvers, reference, message):
    with pytest.raises(bilevel.SpecError, match=message):
        check_specs(solvers, reference)


# ---- numbers against direct computations ---------------------------------------------------------------
def test_every_exact_solver_matches_the_exact_reference_and_a_direct_hypergrad():
    problem, inner, outer, ib, ob = ridge()
    report = compare(problem, inner, outer, inner_batch=ib, outer_batch=ob, loop=CONVERGED, solvers=EXACT_SOLVERS,
                     reference="exact", memory=False)
    g_ref = _direct(problem, inner, outer, ib, ob, CONVERGED, "exact").hypergrad
    assert rel_error(g_ref, ridge_hypergrad(outer, ib, ob)) <= 1e-8  # the reference itself is the closed form
    table = str(report)
    for spec in EXACT_SOLVERS:
        row = report.row(spec)
        direct = _direct(problem, inner, outer, ib, ob, CONVERGED, spec)
        rel, cos = _direct_errors(direct.hypergrad, g_ref)
        assert row.status == "ok" and row.rel_error <= 1e-6, (spec, row.rel_error)
        assert row.rel_error == pytest.approx(rel, rel=1e-9, abs=1e-15) and row.cosine == pytest.approx(cos, abs=1e-14)
        assert torch.equal(_flat(row.hypergrad), _flat(direct.hypergrad))
        for key in ("hvp_count", "evaluations", "inner_steps"):
            assert getattr(row, key) == direct.diagnostics[key], (spec, key)
        assert f"{row.rel_error:.2e}" in table or row.rel_error == 0
    assert report.row("cg:rtol=1e-12,maxiter=50").converged is True
    assert report.row("unroll").converged is None  # unroll has no convergence test: shown as "-", not "yes"


def test_truncated_unroll_error_is_positive_and_equals_a_direct_computation():
    problem, inner, outer, ib, ob = ridge()
    loop = bilevel.InnerLoop(steps=60, lr=0.5)
    report = compare(problem, inner, outer, inner_batch=ib, outer_batch=ob, loop=loop,
                     solvers="unroll:truncate=5,unroll", reference="exact", memory=False)
    g_ref = _direct(problem, inner, outer, ib, ob, loop, "exact").hypergrad
    rel, cos = _direct_errors(_direct(problem, inner, outer, ib, ob, loop, "unroll:truncate=5").hypergrad, g_ref)
    row = report.row("unroll:truncate=5")
    assert rel > 1e-4  # truncation bias, far above the converged loop's error
    assert row.rel_error == pytest.approx(rel, rel=1e-9) and row.cosine == pytest.approx(cos, abs=1e-14)
    assert row.rel_error > 100 * report.row("unroll").rel_error


def test_repeats_report_the_median_time():
    problem, inner, outer, ib, ob = ridge()
    report = compare(problem, inner, outer, inner_batch=ib, outer_batch=ob, loop=bilevel.InnerLoop(steps=20, lr=0.5),
                     solvers=["cg"], reference="exact", repeats=3, memory=False)
    row = report.row("cg")
    assert len(row.times_s) == 3 and row.time_s == sorted(row.times_s)[1] and row.time_s > 0


# ---- failures, kinds, references -----------------------------------------------------------------------
def _saddle():
    """G = ½θᵀAθ − φᵀθ with A = diag(2, −1) (a saddle), F = ½‖θ − 1‖², one small inner step from 0."""
    a = torch.tensor([2.0, -1.0], dtype=torch.float64)
    problem = bilevel.BilevelProblem(lambda th, ph, b: 0.5 * (a * th["x"] ** 2).sum() - (ph["p"] * th["x"]).sum(),
                                     lambda th, ph, b: 0.5 * ((th["x"] - 1.0) ** 2).sum())
    zeros = {"x": torch.zeros(2, dtype=torch.float64)}
    return problem, zeros, {"p": torch.ones(2, dtype=torch.float64)}, bilevel.InnerLoop(steps=1, lr=0.1)


def test_a_failing_solver_is_reported_not_raised():
    problem, inner, outer, loop = _saddle()
    report = compare(problem, inner, outer, inner_batch=None, outer_batch=None, loop=loop,
                     solvers="cg,unroll", reference="exact", memory=False)
    row = report.row("cg")
    assert row.status == FAILED and row.rel_error is None and row.time_s is None
    assert row.error.startswith("IndefiniteHessianError: CG: pᵀHp/pᵀp =") and "not positive definite" in row.error
    assert report.row("unroll").status == "ok"
    # the reference ran at a non-stationary point (one inner step): its warning is reported, not lost
    assert any(w.startswith("StationarityWarning: implicit differentiation at a non-stationary inner point")
               for w in report.points[0].reference.warnings)
    table = str(report)
    assert "FAILED" in table and "cg: IndefiniteHessianError: CG: pᵀHp" in table


def test_a_failing_reference_stops_with_what_to_do():
    problem, inner, outer, loop = _saddle()
    with pytest.raises(CompareError, match=r"reference solver 'cg' failed: IndefiniteHessianError: CG: pᵀHp.*"
                                           r"choose another reference"):
        compare(problem, inner, outer, inner_batch=None, outer_batch=None, loop=loop, solvers=["unroll"],
                reference="cg", memory=False)


def test_a_bad_problem_gets_its_own_error_not_a_reference_failure():
    problem, inner, outer, ib, ob = ridge()
    vector_outer = bilevel.BilevelProblem(problem.inner_loss, lambda th, ph, b: (b[0] @ th["w"] - b[1]) ** 2)
    with pytest.raises(ValueError, match=r"outer_loss must return a scalar \(0-dim\) tensor.*\.mean\(\)") as info:
        compare(vector_outer, inner, outer, inner_batch=ib, outer_batch=ob, loop=CONVERGED, solvers="cg",
                memory=False)
    assert not isinstance(info.value, CompareError)
    with pytest.raises(bilevel.StructureError, match=r"outer must be a non-empty dict\[str, Tensor\]"):
        compare(problem, inner, {}, inner_batch=ib, outer_batch=ob, loop=CONVERGED, solvers="cg")


def test_a_solver_whose_kind_does_not_apply_is_reported_not_run(ridge_smoke):
    _, decl = ridge_smoke
    implicit_only = dataclasses.replace(decl, solvers=("implicit",), solver_note="the test allows implicit only")
    report = compare_problem(implicit_only, "cg,unroll,onestep", reference="exact", memory=False)
    for spec, kind in (("unroll", "unrolled"), ("onestep", "online")):
        row = report.row(spec)
        assert row.status == NOT_APPLICABLE and row.time_s is None and row.hypergrad is None
        assert row.note == f"{kind} solvers do not apply to this problem (the test allows implicit only)"
    assert report.row("cg").status == "ok"
    with pytest.raises(bilevel.SpecError, match=r"solver 'unroll' \(unrolled\) does not apply.*solvers that apply: cg"):
        compare_problem(implicit_only, "cg", reference="unroll", memory=False)


def test_an_exact_reference_on_too_many_inner_scalars_suggests_another(ridge_smoke):
    _, decl = ridge_smoke  # 10 inner scalars
    with pytest.raises(bilevel.SpecError, match=r"reference 'exact:max_size=5' refused: 10 inner scalars > "
                                                r"max_size=5.*use reference='cg:rtol=1e-10,maxiter=1000'"):
        compare_problem(decl, "cg", reference="exact:max_size=5", memory=False)
    report = compare_problem(decl, "exact:max_size=5,cg", reference="cg:rtol=1e-10", memory=False)
    row = report.row("exact:max_size=5")
    assert row.status == FAILED and row.error.startswith("not run: 10 inner scalars > max_size=5")


def test_zeroth_order_and_online_rows_say_what_they_are(ridge_smoke):
    _, decl = ridge_smoke
    report = compare_problem(decl, "cmaes:popsize=4,onestep", reference="exact", memory=False)
    cma, one = report.row("cmaes:popsize=4"), report.row("onestep")
    assert cma.status == "ok" and "search direction" in cma.note and math.isfinite(cma.rel_error)
    assert one.status == "ok" and "warm start" in one.note
    # onestep differentiates one lookahead step from the all-zero start: another quantity than the IFT value
    assert 0.1 < one.rel_error < 1 and 0 < one.cosine < 1 and not one.warnings
    # on ridge in its plain weights w, onestep from w = 0 is exactly zero (dθ'/dφ ∝ w = 0): error 1, an
    # undefined cosine, and the warning in the row
    from bilevel.problems import ridge
    sub = decl.first_subproblem()
    plain = dataclasses.replace(decl, problem=bilevel.BilevelProblem(ridge.inner_loss, ridge.outer_loss),
                                subproblems=lambda info: [dataclasses.replace(sub, inner={"w": torch.zeros(10)})])
    zero = compare_problem(plain, "onestep", reference="exact", memory=False).row("onestep")
    assert zero.status == "ok" and zero.rel_error == 1.0 and math.isnan(zero.cosine)
    assert any(w.startswith("ZeroHypergradientWarning") for w in zero.warnings)


def test_single_level_search_only_problems_and_bad_counts_are_refused(ridge_smoke):
    single = load_problem("problems_for_tests.failing")
    with pytest.raises(bilevel.SpecError, match=r"single-level objective .*no hypergradient, so there are no solvers"):
        compare_problem(single.build(single.SMOKE, local_context()), "cg")
    _, decl = ridge_smoke
    search_only = dataclasses.replace(decl, solvers=("zeroth_order",), solver_note="a piecewise-constant fitness")
    with pytest.raises(bilevel.SpecError, match=r"admits only zeroth-order solvers \(a piecewise-constant fitness\): "
                                                r"there is no hypergradient"):
        compare_problem(search_only, "cmaes")
    with pytest.raises(bilevel.SpecError, match=r"repeats must be an int >= 1"):
        compare_problem(decl, "cg", repeats=0)
    with pytest.raises(bilevel.SpecError, match=r"steps must be an int >= 0"):
        compare_problem(decl, "cg", steps=-1)


# ---- trajectory ----------------------------------------------------------------------------------------
def test_the_trajectory_visits_steps_points_along_the_reference_run(ridge_smoke):
    _, decl = ridge_smoke
    single = compare_problem(decl, "cg,unroll", reference="exact", memory=False)
    report = compare_problem(decl, "cg,unroll", reference="exact", steps=3, memory=False)
    assert [p.step for p in report.points] == [0, 1, 2]
    first = report.points[0]
    for a, b in zip(first.rows, single.rows):
        assert a.rel_error == b.rel_error and torch.equal(_flat(a.hypergrad), _flat(b.hypergrad))
    for point in report.points:  # each φ is where the reference's own outer loop stands after `step` steps
        expected, _, _ = bilevel.run_locally(decl, point.step, "exact")
        assert torch.equal(_flat(point.outer), _flat(expected)), point.step
    assert not torch.equal(_flat(report.points[2].outer), _flat(report.points[0].outer))
    assert "relative error along the reference's outer trajectory (3 points)" in format_report(report)


# ---- memory --------------------------------------------------------------------------------------------
def test_peak_memory_counts_live_cpu_tensor_bytes():
    before = torch.ones(1000, 1000)

    def two_live_then_freed():
        a = torch.ones(1000, 1000)      # 4,000,000 bytes
        b = a * 2                        # 4,000,000 more, both live
        del a, b
        return torch.zeros(10)

    out, peak, method = peak_memory(two_live_then_freed, torch.device("cpu"))
    assert method == CPU_METHOD and out.shape == (10,)
    assert 8_000_000 <= peak <= 8_000_000 + 4096
    del before


def test_rows_report_memory_that_grows_with_the_differentiated_steps(ridge_smoke):
    _, decl = ridge_smoke
    report = compare_problem(decl, "unroll:truncate=20,unroll", reference="exact")
    short, full = report.row("unroll:truncate=20").peak_memory_bytes, report.row("unroll").peak_memory_bytes
    assert 0 < short < full  # unroll stores the differentiated steps' iterates: 20 of 120 vs all 120
    assert report.memory_method == CPU_METHOD and "peak live CPU tensor bytes" in str(report)


# ---- files and user problems ---------------------------------------------------------------------------
def test_json_csv_and_png_are_written_and_never_overwritten_silently(ridge_smoke, tmp_path):
    _, decl = ridge_smoke
    report = compare_problem(decl, "cg,unroll:truncate=20", reference="exact", steps=2, memory=False)
    out = tmp_path / "cmp"
    paths = write_report(report, out)
    assert [p.name for p in paths] == ["compare.json", "compare.csv", "compare.png"]
    data = json.loads((out / "compare.json").read_text())
    assert data["reference"] == "exact" and len(data["points"]) == 2
    assert data["points"][1]["rows"][1]["rel_error"] == report.points[1].rows[1].rel_error
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert [(r["step"], r["solver"], r["reference"]) for r in rows] == [
        ("0", "exact", "True"), ("0", "cg", "False"), ("0", "unroll:truncate=20", "False"),
        ("1", "exact", "True"), ("1", "cg", "False"), ("1", "unroll:truncate=20", "False")]
    assert float(rows[2]["rel_error"]) == report.row("unroll:truncate=20").rel_error
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["compare.csv", "compare.json", "compare.png"]  # no temp files
    before = (out / "compare.json").read_text()
    with pytest.raises(CompareOutputError, match=r"already holds an earlier comparison .*--overwrite"):
        write_report(report, out)
    assert (out / "compare.json").read_text() == before
    write_report(report, out, overwrite=True)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(CompareOutputError, match=r"is a file, not a folder"):
        check_out_dir(tmp_path / "afile")


def test_a_users_problem_module_is_compared(tmp_path, monkeypatch):
    package = tmp_path / "user_cmp_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "quad.py").write_text(textwrap.dedent('''
        """A user's problem: the quadratic oracle as a problem file."""
        from dataclasses import dataclass
        import bilevel
        from oracles import quadratic

        @dataclass(frozen=True)
        class Config:
            steps: int = 300

        SMOKE = Config()

        def build(cfg, ctx):
            problem, inner, outer, _ = quadratic()
            sub = lambda info: [bilevel.SubProblem(inner=inner, inner_batch=None, outer_batch=None)]
            return bilevel.Nested(problem=problem, outer=outer, loop=bilevel.InnerLoop(steps=cfg.steps, lr=0.3),
                                  subproblems=sub, default_solver="cg")
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = load_problem("user_cmp_pkg.quad")
    report = compare_problem(module.build(module.SMOKE, local_context()), "cg:rtol=1e-12,unroll", memory=False)
    from oracles import quadratic, quadratic_hypergrad
    _, _, outer, consts = quadratic()
    assert rel_error(report.points[0].reference.hypergrad, quadratic_hypergrad(outer, consts)) <= 1e-8
    assert report.row("cg:rtol=1e-12").rel_error <= 1e-8 and report.row("unroll").rel_error <= 1e-6
