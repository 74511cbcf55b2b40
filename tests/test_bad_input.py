"""Bad input gets a clear error that names the problem and the fix."""
import dataclasses
import math

import pytest
import torch

import bilevel
from oracles import ridge


def test_non_scalar_inner_loss():
    problem, inner, outer, ib, ob = ridge()
    bad = bilevel.BilevelProblem(lambda i, o, b: (b[0] @ i["w"] - b[1]) ** 2 + o["log_lambda"].sum(),
                                 problem.outer_loss)
    with pytest.raises(ValueError, match=r"inner_loss must return a scalar.*shape \(200,\).*\.mean\(\)"):
        bilevel.hypergrad(bad, inner, outer, inner_batch=ib, outer_batch=ob)


def test_non_scalar_outer_loss_without_validation():
    problem, inner, outer, ib, ob = ridge()
    bad = bilevel.BilevelProblem(problem.inner_loss, lambda i, o, b: b[0] @ i["w"] - b[1])
    with pytest.raises(ValueError, match=r"outer_loss must return a scalar \(0-dim\) tensor, got shape \(100,\)\. "
                                         r"Reduce it, e\.g\. with \.mean\(\)"):
        bilevel.hypergrad(bad, inner, outer, inner_batch=ib, outer_batch=ob, solver="unroll", validate=False,
                          loop=bilevel.InnerLoop(steps=2))


def test_solver_returning_wrong_keys_or_shapes():
    problem, inner, outer, ib, ob = ridge()

    @dataclasses.dataclass(frozen=True)
    class Broken(bilevel.Implicit):
        def __call__(self, *args):
            result = super().__call__(*args)
            result.hypergrad = {"log_lambda": result.hypergrad["log_lambda"][:2]}
            return result

    with pytest.raises(bilevel.StructureError, match=r"\['log_lambda'\] has shape \(2,\) but the outer params"):
        bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver=Broken())

    @dataclasses.dataclass(frozen=True)
    class Renamed(bilevel.Implicit):
        def __call__(self, *args):
            result = super().__call__(*args)
            result.hypergrad = {"lam": result.hypergrad["log_lambda"]}
            return result

    with pytest.raises(bilevel.StructureError, match=r"missing \['log_lambda'\], unexpected \['lam'\]"):
        bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver=Renamed())


def test_outer_params_unused_by_inner_loss():
    problem, inner, outer, ib, ob = ridge()
    extra = dict(outer, forgotten=torch.zeros(3, dtype=torch.float64))
    with pytest.raises(bilevel.StructureError, match=r"outer params \['forgotten'\] are used by neither"):
        bilevel.hypergrad(problem, inner, extra, inner_batch=ib, outer_batch=ob)
    outer_only = bilevel.BilevelProblem(problem.inner_loss,
                                        lambda i, o, b: problem.outer_loss(i, o, b) + (o["temp"] ** 2).sum())
    with pytest.warns(UserWarning, match=r"\['temp'\] are not used by inner_loss"):
        bilevel.hypergrad(outer_only, inner, dict(outer, temp=torch.ones(1, dtype=torch.float64)), inner_batch=ib,
                          outer_batch=ob, loop=bilevel.InnerLoop(steps=5))


def test_nan_inner_loss_names_the_step():
    problem, inner, outer, ib, ob = ridge()
    loop = bilevel.InnerLoop(steps=400, lr=50.0)  # far too large: SGD blows up
    for spec in ("cg", "unroll", "forward"):
        with pytest.raises(bilevel.NonFiniteError, match=r"inner loss is (nan|inf) at inner step \d+; lower the "
                                                         r"learning rate, check the data for NaN/Inf, or clip"):
            bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver=spec, loop=loop)


def test_nan_in_data_is_caught_before_any_step():
    problem, inner, outer, (X, y), ob = ridge()
    X = X.clone()
    X[3, 1] = math.nan
    with pytest.raises(bilevel.NonFiniteError,
                       match=r"inner_loss is nan at the initial params \(before inner step 0\); check the batches and the initial "
                             r"inner/outer params for NaN/Inf"):
        bilevel.hypergrad(problem, inner, outer, inner_batch=(X, y), outer_batch=ob)


def test_neumann_divergence_in_hypergrad_hints_alpha():
    problem, inner, outer, ib, ob = ridge()
    with pytest.raises(bilevel.NeumannDivergenceError, match=r"alpha=5 is too large: the series converges only for "
                                                              r"alpha < 2/λ_max\(H\).*try alpha=0\.\d+ or smaller"):
        bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver="neumann:alpha=5,terms=30",
                          loop=bilevel.InnerLoop(steps=200, lr=0.5))


def test_cg_not_converged_is_reported_and_warned():
    problem, inner, outer, ib, ob = ridge()
    with pytest.warns(bilevel.ConvergenceWarning, match="CG stopped at maxiter=1"):
        result = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob,
                                   solver="cg:maxiter=1,rtol=1e-12", loop=bilevel.InnerLoop(steps=50, lr=0.5))
    assert result.diagnostics["converged"] == 0.0 and result.diagnostics["residual"] > 1e-12


def test_unknown_solver_and_options():
    with pytest.raises(bilevel.SpecError, match=r"unknown solver 'cgg'; registered solvers: cg, neumann"):
        bilevel.make_solver("cgg")
    with pytest.raises(bilevel.SpecError, match=r"unknown option 'tol' for solver 'cg'; valid options: .*rtol: float = 1e-06"):
        bilevel.make_solver("cg:tol=1e-8")
    with pytest.raises(bilevel.SpecError, match=r"option 'maxiter' of solver 'cg' must be int, got '1.5'"):
        bilevel.make_solver("cg:maxiter=1.5")
    with pytest.raises(bilevel.SpecError, match="option 'checkpoint' of solver 'unroll' must be bool, got 'maybe'"):
        bilevel.make_solver("unroll:checkpoint=maybe")
    with pytest.raises(bilevel.SpecError, match=r"OneStep\.mode must be one of \('exact', 'finite_difference', "
                                                r"'first_order'\), got 'second'"):
        bilevel.make_solver("onestep:mode=second")
    with pytest.raises(bilevel.SpecError, match=r"solver option 'alpha' in 'neumann:alpha' is not key=value; options "
                                                r"of 'neumann': .*terms: int = 15"):
        bilevel.make_solver("neumann:alpha")
    with pytest.raises(bilevel.SpecError, match="solver must be a spec string or a solver object, got int; "
                                                "registered solvers: cg, neumann"):
        bilevel.make_solver(42)


def test_spec_parsing_types_and_values():
    solver = bilevel.make_solver("neumann:alpha=0.05, terms=20")
    assert isinstance(solver, bilevel.Implicit) and solver.linsolve == bilevel.Neumann(alpha=0.05, terms=20)
    assert bilevel.make_solver("neumann:alpha=auto").linsolve.alpha == "auto"
    with pytest.raises(bilevel.SpecError, match="Neumann.alpha must be a positive float or 'auto', got 'big'"):
        bilevel.make_solver("neumann:alpha=big")
    assert bilevel.make_solver("unroll:checkpoint=true,truncate=3") == bilevel.Unroll(truncate=3, checkpoint=True)
    names = [name for name, _, _ in bilevel.solver_options("cmaes")]
    assert names == ["popsize", "sigma", "seed", "evaluate_mean"]  # map_fn is not a spec option


def test_inner_loop_options():
    with pytest.raises(ValueError, match=r"unknown inner optimizer 'rmsprop'; valid: \('sgd', 'momentum', 'adam'\)"):
        bilevel.InnerLoop(optimizer="rmsprop")
    with pytest.raises(ValueError, match=r"InnerLoop\.lr must be > 0, got 0\.0"):
        bilevel.InnerLoop(lr=0.0)


def test_params_must_be_a_dict_of_float_tensors():
    problem, inner, outer, ib, ob = ridge()
    with pytest.raises(bilevel.StructureError, match=r"outer must be a non-empty dict\[str, Tensor\] \(e\.g\. "
                                                     r"dict\(model\.named_parameters\(\)\)\), got list"):
        bilevel.hypergrad(problem, inner, [outer["log_lambda"]], inner_batch=ib, outer_batch=ob)
    with pytest.raises(bilevel.StructureError, match=r"inner\['w'\] must be floating point, got torch\.int64; cast it with \.float\(\)"):
        bilevel.hypergrad(problem, {"w": torch.zeros(5, dtype=torch.long)}, outer, inner_batch=ib, outer_batch=ob)


def test_cmaes_all_candidates_nonfinite_raises():
    problem, inner, outer, ib, ob = ridge()
    nan_outer = bilevel.BilevelProblem(problem.inner_loss, lambda i, o, b: o["log_lambda"].sum() * math.nan)
    with pytest.raises(bilevel.NonFiniteError, match="CMA-ES generation 0: every candidate's outer loss is NaN/Inf; "
                                                     "lower sigma or the inner learning rate"):
        bilevel.hypergrad(nan_outer, inner, outer, inner_batch=ib, outer_batch=ob, solver="cmaes:popsize=4",
                          loop=bilevel.InnerLoop(steps=2), validate=False)


def test_cg_on_an_indefinite_hessian_names_the_problem():
    """A saddle (eigenvalues 2 and −1): CG's curvature pᵀHp turns non-positive and it says so."""
    matrix = torch.tensor([[2.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    b = {"x": torch.tensor([1.0, 1.0], dtype=torch.float64)}
    with pytest.raises(bilevel.IndefiniteHessianError, match=r"pᵀHp/pᵀp = -?\d.* <= 0 at iteration \d+: the inner "
                                                             r"Hessian is not positive definite.*Add an L2 term"):
        bilevel.CG(maxiter=10)(lambda v: {"x": matrix @ v["x"]}, b)


def test_override_of_a_field_the_solver_lacks_is_a_spec_error():
    """``map_fn`` exists on cmaes only: overriding it on cg names the solver and lists its fields."""
    assert bilevel.make_solver("cmaes", map_fn=list).map_fn is list
    with pytest.raises(bilevel.SpecError, match="Implicit has no field.*map_fn"):
        bilevel.make_solver("cg", map_fn=list)
