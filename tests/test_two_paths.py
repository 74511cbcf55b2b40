"""Two paths, one maths: every solver gives the same numbers on the autograd tape and on torch.func.

Each registered solver (and variant) runs with ``bilevel.autodiff_path("autograd")`` and with
``autodiff_path("func")`` on the ridge and quadratic oracles in float64. Both paths compute the same maths
with the same operations, so they agree to rounding: the hypergradient, the inner params reached and every
numeric diagnostic to a relative 1e-12 (measured: bitwise equal, except forward mode at ~5e-16, whose tape
version pushes tangents with forward AD instead of ``jvp``). On the quadratic the autograd result is also
held to the closed form (IFT, or the exact derivative of the K-step SGD loop). The automatic choice is
checked where it is reported (autograd outside transforms, torch.func under vmap and grad), and a witness
loss proves that the tape path really runs without torch.func (it never sees a functorch-wrapped tensor,
except in the vmapped columns of the dense ``exact`` solve) and counts its loss calls exactly.
"""
import warnings

import pytest
import torch
from torch._C import _functorch
from torch.autograd import forward_ad
from torch.func import grad, vmap

import bilevel
from bilevel import paths
from bilevel.solvers.cmaes import new_strategy
from oracles import (quadratic, quadratic_hypergrad, quadratic_unrolled_hypergrad, rel_error, ridge,
                     ridge_solution)
from solver_configs import SOLVER_CONFIGS, VARIANTS

CONFIGS = {**SOLVER_CONFIGS, **VARIANTS}
SAME = 1e-12  # relative difference allowed between the two paths
# diagnostics that legitimately differ between paths: the path itself, and forward mode's runs of the loop
# (the tape pushes one tangent direction per run, torch.func a vmapped chunk of them)
PATH_DEPENDENT = {"autodiff_path", "chunks", "evaluations"}


def rel_diff(a: float, b: float) -> float:
    return 0.0 if a == b else abs(a - b) / max(abs(a), abs(b))


def on_path(path, problem, inner, outer, ib, ob, spec, loop):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the registered loops are what they are; only agreement matters here
        with bilevel.autodiff_path(path):
            return bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver=spec, loop=loop)


def assert_same(tape, func, spec):
    """The two results agree: hypergradient, inner params and numeric diagnostics to SAME; counts exactly."""
    assert rel_error(tape.hypergrad, func.hypergrad) <= SAME, spec
    assert rel_error(tape.inner, func.inner) <= SAME, spec
    keys = set(tape.diagnostics) | set(func.diagnostics)
    for key in keys - PATH_DEPENDENT:
        assert rel_diff(tape.diagnostics[key], func.diagnostics[key]) <= SAME, (spec, key)
    if not spec.startswith("forward"):  # forward: a different number of loop runs, asserted in its own test
        assert tape.diagnostics.get("evaluations") == func.diagnostics.get("evaluations"), spec


def ridge_inputs(config):
    problem, inner, outer, ib, ob = ridge()
    if config.start_at_solution:
        inner = ridge_solution(outer, ib)[0]
    return problem, inner, outer, ib, ob


def quadratic_inputs(config):
    problem, inner, outer, c = quadratic()
    if config.start_at_solution:
        inner = {"theta": torch.linalg.solve(c["A"], c["b"] - c["B"] @ outer["phi"])}
    return problem, inner, outer, c


def truncated_unrolled_hypergrad(outer, inner, c, steps, lr, truncate):
    """Exact derivative of the last ``truncate`` of ``steps`` SGD steps on the quadratic (the first run at fixed φ):
    θ_{k+1} = (I − ηA)θ_k − η(Bφ − b), differentiated in φ over the last T steps only."""
    A, B, b = c["A"], c["B"], c["b"]
    step = torch.eye(A.shape[0], dtype=A.dtype) - lr * A
    th = inner["theta"].clone()
    jac = torch.zeros(A.shape[0], B.shape[1], dtype=A.dtype)
    for k in range(steps):
        th = step @ th - lr * (B @ outer["phi"] - b)
        if k >= steps - truncate:
            jac = step @ jac - lr * B
    return {"phi": jac.T @ (th - c["t"]) + c["C"] @ outer["phi"]}


def cmaes_by_hand(spec, loop, inner, outer, c):
    """One CMA-ES generation by hand: the same seeded ``cma`` strategy, each candidate φ scored with the closed-form
    K-step SGD loss F(θ_K(φ), φ) (θ_{k+1} = θ_k − η(Aθ_k + Bφ − b)); the pseudo-gradient is m_old − m_new."""
    solver = bilevel.make_solver(spec)
    es = new_strategy(outer["phi"].numpy(), solver.sigma, solver.popsize, solver.seed)
    mean_old = es.mean.copy()
    candidates = es.ask()
    scores = []
    for x in candidates:
        phi = torch.as_tensor(x, dtype=torch.float64)
        th = inner["theta"].clone()
        for _ in range(loop.steps):
            th = th - loop.lr * (c["A"] @ th + c["B"] @ phi - c["b"])
        scores.append(float(0.5 * ((th - c["t"]) ** 2).sum() + 0.5 * phi @ (c["C"] @ phi)))
    es.tell(candidates, scores)
    return {"phi": torch.as_tensor(mean_old - es.mean, dtype=torch.float64)}


def quadratic_exact(name, config, loop, inner, outer, c):
    """The closed form of what solver ``name`` computes on the quadratic with ``loop``, and the bound it must meet."""
    kind, bound = config.criterion
    if kind == "cmaes":
        return cmaes_by_hand(config.spec, loop, inner, outer, c), 1e-12
    if name.startswith("unroll:truncate"):
        return truncated_unrolled_hypergrad(outer, inner, c, loop.steps, loop.lr, int(name.split("=")[1])), 1e-10
    if name == "bome":  # Algorithm 1's φ-part d_φ = ∇φF + λ∇φq̂, written out (tests/bome_runs.py)
        from bome_runs import bome_by_hand
        solver = bilevel.make_solver(config.spec)
        hand = bome_by_hand(c, inner["theta"], outer["phi"], loop.steps, loop.lr, solver.eta, solver.control,
                            solver.theta_step)
        return {"phi": hand["d_phi"]}, 1e-12
    if name == "onestep":  # one SGD step θ' = θ − η∇G: d/dφ F(θ', φ) = −ηBᵀ(θ' − t) + Cφ
        th = inner["theta"] - loop.lr * (c["A"] @ inner["theta"] + c["B"] @ outer["phi"] - c["b"])
        return {"phi": -loop.lr * c["B"].T @ (th - c["t"]) + c["C"] @ outer["phi"]}, 1e-10
    if name.startswith(("unroll", "forward")):  # the exact derivative of the K-step loop, any K
        return quadratic_unrolled_hypergrad(outer, inner, c, loop.steps, loop.lr), 1e-10
    if kind == "rel_ridged":  # nystrom at rank ≥ dim θ: the IFT with (A + (δ + ρ)I)⁻¹ in place of A⁻¹
        solver = bilevel.make_solver(config.spec)
        return quadratic_hypergrad(outer, c, ridge=solver.damping + solver.linsolve.rho), bound
    return quadratic_hypergrad(outer, c), bound  # implicit solvers at the converged loop: the IFT


def loop_for(name, config):
    """The registered loop; forward mode's converged 300 steps cut to the quick 20 (the tape runs the loop once per
    direction, and the exact K-step derivative is as good a reference after 20 steps as after 300)."""
    return config.quick_loop if name.startswith("forward") else config.loop


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_ridge_same_numbers_on_both_paths(name):
    config = CONFIGS[name]
    args = (*ridge_inputs(config), config.spec, loop_for(name, config))
    tape, func = on_path("autograd", *args), on_path("func", *args)
    assert_same(tape, func, config.spec)
    if name != "cmaes":  # CMA-ES differentiates nothing and reports no path
        assert (tape.diagnostics["autodiff_path"], func.diagnostics["autodiff_path"]) == ("autograd", "func")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_quadratic_same_numbers_on_both_paths_and_the_closed_form(name):
    config = CONFIGS[name]
    problem, inner, outer, c = quadratic_inputs(config)
    loop = loop_for(name, config)
    args = (problem, inner, outer, None, None, config.spec, loop)
    tape, func = on_path("autograd", *args), on_path("func", *args)
    assert_same(tape, func, config.spec)
    exact, bound = quadratic_exact(name, config, loop, inner, outer, c)
    assert rel_error(tape.hypergrad, exact) <= bound, rel_error(tape.hypergrad, exact)


def test_auto_choice_is_autograd_outside_transforms_and_func_under_vmap():
    problem, inner, outer, ib, ob = ridge()
    loop = bilevel.InnerLoop(steps=30, lr=0.5)
    # budgets that no solve stops short of (under vmap an iterative solve runs its whole budget)
    for spec in ("cg:maxiter=30,rtol=1e-13", "neumann:terms=20", "fixedpoint:maxiter=20,rtol=0",
                 "cg:damping=0.1,relative_damping=true,rtol=1e-13",
                 "neumann:terms=20,damping=0.1,relative_damping=true",
                 "exact", "unroll", "unroll:checkpoint=true", "forward:chunk_size=1", "onestep",
                 "onestep:mode=finite_difference"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plain = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver=spec, loop=loop)
            batched = {"log_lambda": outer["log_lambda"] + torch.tensor([[0.0], [0.1]], dtype=torch.float64)}
            seen = []
            vmap(lambda p: seen.append(bilevel.hypergrad(problem, inner, p, inner_batch=ib, outer_batch=ob,
                                                         solver=spec, loop=loop).diagnostics) or p)(batched)
        assert plain.diagnostics["autodiff_path"] == "autograd", spec
        assert seen[0]["autodiff_path"] == "func", spec
        # the vmapped row 0 (torch.func) is the plain call (the tape); alpha=auto and relative damping included
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rows = vmap(lambda p: bilevel.hypergrad(problem, inner, p, inner_batch=ib, outer_batch=ob, solver=spec,
                                                    loop=loop).hypergrad["log_lambda"])(batched)
        assert rel_error({"log_lambda": rows[0]}, plain.hypergrad) <= 1e-12, spec


def test_auto_choice_is_func_under_grad_and_forward_mode_prefers_vmapped_chunks():
    problem, inner, outer, ib, ob = ridge()
    loop = bilevel.InnerLoop(steps=10, lr=0.5)
    seen = []

    def s(p):
        result = bilevel.hypergrad(problem, inner, {"log_lambda": p}, inner_batch=ib, outer_batch=ob, solver="unroll",
                                   loop=loop)
        seen.append(result.diagnostics["autodiff_path"])
        return result.hypergrad["log_lambda"].sum()

    grad(s)(outer["log_lambda"])
    assert seen == ["func"]
    # forward mode over more than one direction per chunk: a vmapped jvp beats one tape run per direction
    wide = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver="forward:chunk_size=2",
                             loop=loop)
    single = bilevel.hypergrad(problem, inner, outer, inner_batch=ib, outer_batch=ob, solver="forward:chunk_size=1",
                               loop=loop)
    assert wide.diagnostics["autodiff_path"] == "func" and wide.diagnostics["chunks"] == 3.0  # ⌈5/2⌉ runs
    assert single.diagnostics["autodiff_path"] == "autograd" and single.diagnostics["chunks"] == 5.0
    assert single.diagnostics["evaluations"] == 10 * 5 + 2 and wide.diagnostics["evaluations"] == 10 * 3 + 2
    assert rel_error(single.hypergrad, wide.hypergrad) <= SAME


def test_choose_path_reads_transforms_dual_levels_and_the_forced_setting():
    x = torch.ones(2)
    assert paths.choose_path([x]) == "autograd"
    assert vmap(lambda t: torch.tensor(paths.choose_path([t]) == "func"))(torch.ones(3, 2)).all()
    assert grad(lambda t: t.sum() * float(paths.choose_path([t]) == "func"))(x).sum() == 2.0
    with forward_ad.dual_level():
        assert paths.choose_path([x]) == "func"
    with bilevel.autodiff_path("func"):
        assert paths.choose_path([x]) == "func"
        with bilevel.autodiff_path("auto"):  # blocks nest and restore
            assert paths.choose_path([x]) == "autograd"
        assert paths.choose_path([x]) == "func"
    assert paths.choose_path([x]) == "autograd"


def test_forcing_autograd_inside_a_transform_is_a_clear_error():
    problem, inner, outer, ib, ob = ridge()
    batched = {"log_lambda": outer["log_lambda"] + torch.tensor([[0.0], [0.1]], dtype=torch.float64)}
    with bilevel.autodiff_path("autograd"), pytest.raises(
            bilevel.AutodiffPathError, match=r"autodiff_path\('autograd'\) is forced, but a torch.func transform is "
                                             r"active around the call.*use autodiff_path\('auto'\)"):
        vmap(lambda p: bilevel.hypergrad(problem, inner, p, inner_batch=ib, outer_batch=ob, solver="cg",
                                         loop=bilevel.InnerLoop(steps=5)).hypergrad)(batched)
    with pytest.raises(ValueError, match=r"autodiff_path must be one of \('auto', 'autograd', 'func'\), got 'tape'"):
        with bilevel.autodiff_path("tape"):
            pass


class Witness:
    """The ridge oracle's losses, recording for each call whether torch.func had wrapped its inputs."""

    def __init__(self):
        problem, self.inner, self.outer, self.ib, self.ob = ridge()
        self.inner_calls, self.outer_calls, self.wrapped = 0, 0, False

        def inner_loss(i, o, b):
            self.inner_calls += 1
            self.wrapped |= any(_functorch.is_functorch_wrapped_tensor(t) for t in (*i.values(), *o.values()))
            return problem.inner_loss(i, o, b)

        def outer_loss(i, o, b):
            self.outer_calls += 1
            self.wrapped |= any(_functorch.is_functorch_wrapped_tensor(t) for t in (*i.values(), *o.values()))
            return problem.outer_loss(i, o, b)

        self.problem = bilevel.BilevelProblem(inner_loss, outer_loss)

    def run(self, path, spec, loop):
        """(inner-loss calls, outer-loss calls, whether any call saw a wrapped tensor, the result)."""
        self.inner_calls, self.outer_calls, self.wrapped = 0, 0, False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with bilevel.autodiff_path(path):
                result = bilevel.hypergrad(self.problem, self.inner, self.outer, inner_batch=self.ib,
                                           outer_batch=self.ob, solver=spec, loop=loop, validate=False)
        return self.inner_calls, self.outer_calls, self.wrapped, result


K, D = 6, 5  # inner steps, outer scalars of the ridge oracle
# (inner-loss calls on the tape, on torch.func, outer-loss calls on both); m = the solve's HVP count
CALLS = {
    # the loop, ∇θG(θ_K) linearised once, ∇θG(θ_0) for the stationarity; torch.func linearises ∇θG again for the
    # mixed vjp, the tape takes the mixed term from the same graph as the HVPs
    "cg:maxiter=10": lambda m: (K + 2, K + 3, 1),
    "neumann:terms=5": lambda m: (K + 2, K + 3, 1),
    # the dense solve's columns come from a vmapped torch.func linearisation on both paths (see TapeHessian.matmat)
    "exact": lambda m: (K + 3, K + 3, 1),
    "nystrom:rank=3": lambda m: (K + 3, K + 3, 1),  # its sampled columns: the same batched linearisation as exact's
    # forward-over-reverse keeps no linearisation: one G per product, ∇θG(θ_K), ∇θG(θ_0), the mixed term
    "cg:maxiter=10,hvp=fwdrev": lambda m: (K + m + 3, K + m + 3, 1),
    "unroll": lambda m: (K + 2, K + 2, 1),  # the loop, stationarity at θ_K and θ_0
    "unroll:truncate=2": lambda m: (K + 2, K + 2, 1),
    "unroll:checkpoint=true": lambda m: (3 * K + 2, 3 * K + 2, 1),  # forward, recompute, one vjp per step
    "forward:chunk_size=1": lambda m: (D * K + 2, D * K + 2, D),  # one run per direction on both paths
    "onestep": lambda m: (2, 2, 1),  # the step, stationarity at θ' (at θ: the step's own gradient)
    "onestep:mode=finite_difference": lambda m: (4, 4, 1),  # + ∇φG at θ ± εv
    "cmaes:popsize=4": lambda m: (5 * K, 5 * K, 5),  # 4 candidates and the new mean; nothing differentiated
    # θ_T by the loop, ∇G at θ and at θ_T, ∇F at θ (evaluations = K + 3); η = 2: λ > 0 here (at η = 0.5 λ = 0 and
    # d_φ = ∇φF = 0 on the ridge oracle, whose F does not read φ)
    "bome:eta=2": lambda m: (K + 2, K + 2, 1),
}


@pytest.mark.parametrize("spec", sorted(CALLS))
def test_the_tape_path_never_enters_torch_func_and_counts_its_loss_calls(spec):
    """Exact loss-call counts per path with K = 6 inner steps, and a witness that the tape path runs without
    torch.func: none of its loss calls sees a functorch-wrapped tensor, while torch.func's gradient calls do
    (CMA-ES included: it differentiates nothing, but its inner loops follow the path like everyone's). The one
    exception is the dense solve of ``exact``, whose n columns are a vmap on both paths."""
    witness = Witness()
    loop = bilevel.InnerLoop(steps=K, lr=0.5)
    tape, func = witness.run("autograd", spec, loop), witness.run("func", spec, loop)
    assert tape[2] is (spec in ("exact", "nystrom:rank=3")) and func[2] is True  # exact/nystrom: columns by vmap
    m = int(tape[3].diagnostics["hvp_count"])
    inner_tape, inner_func, outer_calls = CALLS[spec](m)
    assert (tape[0], tape[1]) == (inner_tape, outer_calls), tape[:2]
    assert (func[0], func[1]) == (inner_func, outer_calls), func[:2]
    assert rel_error(tape[3].hypergrad, func[3].hypergrad) <= SAME


def minibatches(ib, size=40):
    """Minibatch k of the ridge training set: rows 40k .. 40k + 39 (cycling), a callable ``inner_batch``."""
    X, y = ib
    return lambda k: (X[(40 * k) % 200:(40 * k) % 200 + size], y[(40 * k) % 200:(40 * k) % 200 + size])


OPTIMIZER_LOOPS = {
    "sgd-minibatch": bilevel.InnerLoop(steps=12, lr=0.3),
    "momentum": bilevel.InnerLoop(steps=12, lr=0.2, optimizer="momentum", momentum=0.8),
    "adam": bilevel.InnerLoop(steps=12, lr=0.05, optimizer="adam"),
}
UNROLLED = ["unroll", "unroll:checkpoint=true,segment=5", "unroll:truncate=4", "forward:chunk_size=1",
            "forward:chunk_size=2", "onestep"]


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZER_LOOPS))
def test_minibatches_and_stateful_optimizers_same_numbers_and_exact_loop_derivative(optimizer):
    """A callable inner_batch (a new minibatch every step) with plain SGD, and heavy-ball momentum and Adam (whose
    state the unrolled solvers differentiate through): both paths agree for every unrolled solver and cg, and
    the solvers that compute the exact derivative of the same K-step loop (unroll, its checkpointed adjoint,
    forward mode on either path) agree with each other to 1e-10."""
    problem, inner, outer, ib, ob = ridge()
    loop = OPTIMIZER_LOOPS[optimizer]
    batches = minibatches(ib)
    results = {}
    for spec in [*UNROLLED, "cg:maxiter=20"]:
        tape = on_path("autograd", problem, inner, outer, batches, ob, spec, loop)
        func = on_path("func", problem, inner, outer, batches, ob, spec, loop)
        assert_same(tape, func, spec)
        results[spec] = tape
    reference = results["unroll"].hypergrad
    assert float(reference["log_lambda"].norm()) > 1e-3  # a real derivative
    for spec in ("unroll:checkpoint=true,segment=5", "forward:chunk_size=1", "forward:chunk_size=2"):
        assert rel_error(results[spec].hypergrad, reference) <= 1e-10, spec


def test_public_building_blocks_same_numbers_on_both_paths_and_the_dense_hessian():
    """hvp / hvp_operator / mixed_vjp on the tape equal torch.func and the dense second derivatives; under
    no_grad ``auto`` takes the tape, with grad mode on torch.func, and a forced tape stays differentiable."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    G = lambda th, ph: torch.sum(torch.tanh(W @ th["a"]) ** 2 * ph["p"]) + (th["b"] ** 3).sum() * th["a"].sum()
    theta = {"a": torch.randn(3, generator=gen, dtype=torch.float64), "b": torch.randn(2, generator=gen,
                                                                                      dtype=torch.float64)}
    phi = {"p": torch.randn(4, generator=gen, dtype=torch.float64)}
    v = {"a": torch.randn(3, generator=gen, dtype=torch.float64), "b": torch.randn(2, generator=gen,
                                                                                  dtype=torch.float64)}
    flat = lambda x: bilevel.tree.unflatten(x, theta)
    f = lambda th: G(th, phi)
    H = torch.autograd.functional.hessian(lambda x: f(flat(x)), bilevel.tree.flatten(theta))
    J = torch.autograd.functional.jacobian(lambda p: bilevel.tree.flatten(torch.func.grad(G)(theta, {"p": p})),
                                           phi["p"])  # J[i, j] = ∂²G/∂φ_j∂θ_i
    for mode in ("auto", "fwdrev", "revrev"):
        expected = H @ bilevel.tree.flatten(v)
        for path in ("autograd", "func"):
            product = bilevel.hvp(f, theta, v, mode, path=path)
            assert rel_error({"x": bilevel.tree.flatten(product)}, {"x": expected}) <= 1e-13
            product = bilevel.hvp_operator(f, theta, mode, path=path)(v)
            assert rel_error({"x": bilevel.tree.flatten(product)}, {"x": expected}) <= 1e-13
    for path in ("autograd", "func"):
        assert rel_error(bilevel.mixed_vjp(G, theta, phi, v, path=path), {"p": J.T @ bilevel.tree.flatten(v)}) <= 1e-13
    # auto: the tape under no_grad (a witness sees no functorch wrapper), torch.func with grad mode on
    wrapped = []
    witness = lambda th: wrapped.append(_functorch.is_functorch_wrapped_tensor(th["a"])) or f(th)
    with torch.no_grad():
        bilevel.hvp(witness, theta, v)
    bilevel.hvp(witness, theta, v)
    assert wrapped[0] is False and wrapped[-1] is True
    # forced tape with grad mode on: H(θ)v stays differentiable in θ, as torch.func's is (third derivatives)
    u = {"a": torch.ones(3, dtype=torch.float64), "b": torch.ones(2, dtype=torch.float64)}
    third = {}
    for path in ("autograd", "func"):
        leaf = {k: x.clone().requires_grad_(True) for k, x in theta.items()}
        with bilevel.autodiff_path(path):
            hv = bilevel.hvp(f, leaf, v, "revrev")
        third[path] = dict(zip(leaf, torch.autograd.grad(bilevel.tree.dot(u, hv), list(leaf.values()))))
    assert rel_error(third["autograd"], third["func"]) <= 1e-13
    with bilevel.autodiff_path("autograd"):  # nothing requires grad: the product is a plain tensor, as on torch.func
        assert not any(x.requires_grad for x in bilevel.hvp(f, theta, v).values())


def test_the_tape_loop_records_a_graph_exactly_when_something_requires_grad():
    """InnerLoop.run on the tape: with nothing tracked it returns plain tensors (no trajectory kept: memory flat
    in K); with φ, θ₀ or only a tensor the loss closes over requiring grad, θ_K is differentiable and its
    derivative equals torch.func's derivative of the same loop (checked against it to 1e-12)."""
    problem, inner, outer, ib, _ = ridge()
    loop = bilevel.InnerLoop(steps=8, lr=0.5, optimizer="momentum", momentum=0.5)
    w = torch.linspace(-1, 1, 5, dtype=torch.float64)
    plain, _, _ = loop.run(problem, inner, outer, ib, path="autograd")
    assert all(t.grad_fn is None and not t.requires_grad for t in plain.values())

    def derivative(path, wrt):  # d/d(wrt) ⟨w, θ_K⟩
        phi = {"log_lambda": outer["log_lambda"].clone().requires_grad_(wrt == "phi")}
        theta0 = {"w": inner["w"].clone().requires_grad_(wrt == "theta0")}
        scale = torch.tensor(1.3, dtype=torch.float64, requires_grad=wrt == "captured")
        captured = bilevel.BilevelProblem(lambda i, o, b: scale * problem.inner_loss(i, o, b), problem.outer_loss)
        theta, _, _ = loop.run(captured, theta0, phi, ib, path=path)
        leaf = {"phi": phi["log_lambda"], "theta0": theta0["w"], "captured": scale}[wrt]
        return torch.autograd.grad(w @ theta["w"], leaf)[0]

    for wrt in ("phi", "theta0", "captured"):
        tape, func = derivative("autograd", wrt), derivative("func", wrt)
        assert float(tape.norm()) > 1e-3, wrt  # a real derivative, not the zero of a silently detached loop
        assert rel_error({"d": tape}, {"d": func}) <= 1e-12, wrt


@pytest.mark.parametrize("spec", ["exact:hvp=fwdrev", "exact:damping=0.1,relative_damping=true",
                                  "exact:hvp=fwdrev,damping=0.3", "cg:hvp=revrev,damping=0.2,rtol=1e-13",
                                  "neumann:terms=200,damping=0.1,relative_damping=true",
                                  "fixedpoint:hvp=fwdrev,maxiter=300,rtol=1e-13,damping=0.2"])
def test_implicit_options_same_numbers_on_both_paths_and_the_damped_closed_form(spec):
    """HVP modes and (relative) damping, including the dense solve, whose columns come from one batched backward
    pass on the tape (a loop of forward-AD products for fwdrev) and from vmap on torch.func:
    dF/dφ = −Bᵀ(A + δI)⁻¹(θ* − t) + Cφ with δ the damping the call reports."""
    problem, inner, outer, c = quadratic()
    loop = bilevel.InnerLoop(steps=300, lr=0.5)
    tape, func = (on_path(path, problem, inner, outer, None, None, spec, loop) for path in ("autograd", "func"))
    assert_same(tape, func, spec)
    delta = tape.diagnostics.get("damping", 0.0)  # reported when damping is on
    assert ("damping" in tape.diagnostics) == ("damping" in spec)
    th = torch.linalg.solve(c["A"], c["b"] - c["B"] @ outer["phi"])
    eye = torch.eye(6, dtype=torch.float64)
    exact = {"phi": -c["B"].T @ torch.linalg.solve(c["A"] + delta * eye, th - c["t"]) + c["C"] @ outer["phi"]}
    assert rel_error(tape.hypergrad, exact) <= 1e-10


def test_a_tape_operator_called_inside_vmap_computes_with_torch_func():
    """The tape cannot run inside a transform; a tape Hessian operator called there (a user's vmap over vectors)
    switches to torch.func for that call: the same H v as its batched tape product and the dense Hessian."""
    problem, inner, outer, ib, _ = ridge()
    X, _ = ib
    f = lambda t: problem.inner(t, outer, ib)
    with torch.no_grad():  # auto under no_grad: the tape
        op = bilevel.hvp_operator(f, inner)
        mixed_op = bilevel.autodiff.TapeHessian(lambda t, p: problem.inner(t, p, ib), inner, outer)
    assert isinstance(op, bilevel.autodiff.TapeHessian)
    V = {"w": torch.eye(5, dtype=torch.float64)}
    dense = X.T @ X / X.shape[0] + torch.diag(torch.exp(outer["log_lambda"]))  # H of the ridge inner loss
    assert torch.allclose(vmap(op)(V)["w"], dense, rtol=0, atol=1e-14)
    assert torch.allclose(op.matmat(V)["w"], dense, rtol=0, atol=1e-14)
    # (∂²G/∂λ∂w)ᵀ v = exp(λ) ⊙ w ⊙ v, column by column
    expected = torch.diag(torch.exp(outer["log_lambda"]) * inner["w"])
    assert torch.allclose(vmap(mixed_op.mixed_vjp)(V)["log_lambda"], expected, rtol=0, atol=1e-15)
    assert torch.allclose(mixed_op.mixed_vjp({"w": torch.ones(5, dtype=torch.float64)})["log_lambda"],
                          expected.sum(1), rtol=0, atol=1e-15)


def test_the_plain_sgd_update_is_torchopts_bitwise():
    """Plain SGD (no weight decay) updates θ − η·g directly instead of through torchopt's transformation chain;
    that is torchopt.sgd's update bit for bit (float32 and float64 leaves, 50 random draws), state included."""
    import torchopt

    loop, reference = bilevel.InnerLoop(lr=0.37), torchopt.sgd(0.37)
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        theta = {"w": torch.randn(300, generator=gen), "b": torch.randn(4, generator=gen, dtype=torch.float64)}
        g = {"w": torch.randn(300, generator=gen) * 10, "b": torch.randn(4, generator=gen, dtype=torch.float64)}
        ours, state = loop._update(g, None, theta)
        updates, expected_state = reference.update(g, reference.init(g), params=theta, inplace=False)
        expected = torchopt.apply_updates(theta, updates, inplace=False)
        assert all(torch.equal(ours[k], expected[k]) for k in theta) and state == expected_state
