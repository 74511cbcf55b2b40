"""Differentiating through bilevel.hypergrad: exact for unroll / forward / onestep, a clear error otherwise.

Target: h(φ) = the solver's hypergradient (a plain, detached call), a float64 function of φ. Every derivative
of h taken through ``hypergrad`` (torch.func.grad / jacrev / jacfwd / jvp / hessian, autograd with
create_graph, .backward(), forward AD) is compared with central finite differences of h, step 1e-5: the
truncation error is O(ε²·h''') ≈ 1e-10 and the rounding error O(1e-16/ε) ≈ 1e-11 against derivatives of
size ~1e-2 to 1, so a relative error below 1e-6 leaves a wide margin, while a missing term is far above it
(dropping the path through the truncated prefix of ``unroll:truncate=3`` gives 5e-3). Third-order checks
difference the second-order route, itself checked against finite differences of h.
"""
import dataclasses
import functools

import pytest
import torch
from torch.autograd import forward_ad
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vmap

import bilevel
from oracles import ridge

EPS = 1e-5
BOUND = 1e-6
SGD = bilevel.InnerLoop(steps=8, lr=0.5)
ADAM = bilevel.InnerLoop(steps=8, lr=0.05, optimizer="adam")
# (spec, loop): every supported route; adam carries optimiser state through the truncated prefix
SUPPORTED = [("unroll", SGD), ("unroll:truncate=3", ADAM), ("unroll:checkpoint=true", SGD),
             ("forward:chunk_size=2", SGD), ("forward", ADAM), ("onestep", ADAM), ("onestep:mode=first_order", SGD)]
UNSUPPORTED = ["cg:maxiter=20", "neumann:terms=5", "fixedpoint:maxiter=20", "exact", "nystrom:rank=2",
               "cmaes:popsize=4", "onestep:mode=finite_difference"]


def coupled_ridge():
    """The ridge oracle with an outer loss that also depends on φ directly, through θ:
    F(w, λ) = ‖X_v w − y_v‖²/(2m) + 0.1 Σ exp(λ_i) w_i² (so ∂₂F ≠ 0 and depends on θ'(φ))."""
    problem, inner, outer, ib, ob = ridge(d=3, n=60, m=30)

    def outer_loss(i, o, b):
        return problem.outer_loss(i, o, b) + 0.1 * (torch.exp(o["log_lambda"]) * i["w"] ** 2).sum()

    return bilevel.BilevelProblem(problem.inner_loss, outer_loss), inner, outer, ib, ob


PROBLEM, INNER, OUTER, IB, OB = coupled_ridge()
W = torch.tensor([0.3, -1.0, 0.7], dtype=torch.float64)
T = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)  # a tangent  # a fixed contraction s_w(φ) = <w, h(φ)>


def h(phi, spec, loop, inner=INNER, batch=IB, validate=False):
    return bilevel.hypergrad(PROBLEM, inner, {"log_lambda": phi}, inner_batch=batch, outer_batch=OB, solver=spec,
                             loop=loop, validate=validate).hypergrad["log_lambda"]


def fd_jacobian(fn, x):
    """Central differences: column j is [fn(x + εe_j) − fn(x − εe_j)] / 2ε."""
    cols = []
    for j in range(x.numel()):
        e = torch.zeros_like(x)
        e.view(-1)[j] = EPS
        cols.append(((fn(x + e) - fn(x - e)) / (2 * EPS)).reshape(-1))
    return torch.stack(cols, dim=-1)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@functools.lru_cache(maxsize=None)
def plain_jacobian(spec, loop):
    return fd_jacobian(lambda p: h(p, spec, loop), OUTER["log_lambda"])


@pytest.mark.parametrize("spec,loop", SUPPORTED)
def test_torch_func_grad_jacrev_jacfwd_match_finite_differences(spec, loop):
    phi = OUTER["log_lambda"]
    J = plain_jacobian(spec, loop)
    assert J.norm() > 1e-3  # a real derivative, not a zero that a silent detach would also give
    assert rel(grad(lambda p: W @ h(p, spec, loop))(phi), W @ J) < BOUND
    assert rel(jacrev(lambda p: h(p, spec, loop))(phi), J) < BOUND
    assert rel(jacfwd(lambda p: h(p, spec, loop))(phi), J) < BOUND


@pytest.mark.parametrize("spec,loop", SUPPORTED)
def test_jvp_matches_finite_differences_and_the_primal_is_the_solver_value(spec, loop):
    phi, t = OUTER["log_lambda"], T
    primal, tangent = jvp(lambda p: h(p, spec, loop, validate=True), (phi,), (t,))  # validation on primal values
    assert rel(tangent, plain_jacobian(spec, loop) @ t) < BOUND
    # the differentiable route computes the same hypergradient as the solver (to rounding)
    assert rel(primal, h(phi, spec, loop)) < 1e-12


@pytest.mark.parametrize("spec,loop", SUPPORTED)
def test_autograd_create_graph_and_backward_match_finite_differences(spec, loop):
    phi = OUTER["log_lambda"].clone().requires_grad_(True)
    J = plain_jacobian(spec, loop)
    hg = h(phi, spec, loop)
    assert rel(hg.detach(), h(OUTER["log_lambda"], spec, loop)) < 1e-12
    (g,) = torch.autograd.grad(W @ hg, phi, create_graph=True)
    assert g.requires_grad and rel(g.detach(), W @ J) < BOUND
    (W @ h(phi, spec, loop)).backward()
    assert rel(phi.grad, W @ J) < BOUND


@pytest.mark.parametrize("spec,loop", [("unroll:truncate=3", ADAM), ("forward:chunk_size=2", SGD),
                                       ("onestep", ADAM)])
def test_third_order_hessian_and_create_graph(spec, loop):
    """torch.func.hessian (jacfwd over jacrev) of s_w(φ) = <w, h(φ)>, and autograd's derivative of the
    create_graph gradient: third derivatives of the unrolled objective, against finite differences of the
    second-order route ∇s_w (itself checked against finite differences of h above)."""
    phi = OUTER["log_lambda"]
    second = lambda p: grad(lambda q: W @ h(q, spec, loop))(p)
    fd = fd_jacobian(second, phi)
    H = hessian(lambda p: W @ h(p, spec, loop))(phi)
    assert rel(H, fd) < BOUND and rel(H, H.T) < 1e-10
    leaf = phi.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(W @ h(leaf, spec, loop), leaf, create_graph=True)
    (third,) = torch.autograd.grad(T @ g, leaf)
    assert rel(third, T @ fd) < BOUND


def test_derivatives_with_respect_to_initial_params_data_and_captured_tensors():
    """Not only φ: θ₀, the training data and a tensor the inner loss closes over are differentiated too."""
    phi, w0 = OUTER["log_lambda"], INNER["w"]
    X, y = IB
    by_w0 = jacrev(lambda w: h(phi, "unroll", SGD, inner={"w": w}))(w0)
    assert rel(by_w0, fd_jacobian(lambda w: h(phi, "unroll", SGD, inner={"w": w}), w0)) < BOUND
    by_y = grad(lambda t: W @ h(phi, "unroll", SGD, batch=(X, t)))(y)
    assert rel(by_y, W @ fd_jacobian(lambda t: h(phi, "unroll", SGD, batch=(X, t)), y)) < BOUND

    def with_scale(s):  # s is captured by the inner loss, not passed to hypergrad
        def inner_loss(i, o, b):  # G = ‖Xw − y‖²/(2n) + s · ½ Σ exp(λ_i) w_i²
            r = b[0] @ i["w"] - b[1]
            return 0.5 * (r * r).mean() + s * 0.5 * (torch.exp(o["log_lambda"]) * i["w"] ** 2).sum()

        scaled = bilevel.BilevelProblem(inner_loss, PROBLEM.outer_loss)
        return W @ bilevel.hypergrad(scaled, INNER, OUTER, inner_batch=IB, outer_batch=OB, solver="unroll",
                                     loop=SGD).hypergrad["log_lambda"]

    s0 = torch.tensor(1.0, dtype=torch.float64)
    by_s = grad(with_scale)(s0)
    fd = (with_scale(s0 + EPS) - with_scale(s0 - EPS)) / (2 * EPS)
    assert abs(float(by_s - fd)) < BOUND * abs(float(fd)) and abs(float(fd)) > 1e-3


def test_forward_ad_dual_inputs():
    phi, t = OUTER["log_lambda"], T
    with forward_ad.dual_level():
        out = h(forward_ad.make_dual(phi, t), "unroll", SGD)
        tangent = forward_ad.unpack_dual(out).tangent
    assert rel(tangent, plain_jacobian("unroll", SGD) @ t) < BOUND
    with forward_ad.dual_level(), pytest.raises(bilevel.NotDifferentiableError,
                                                match="does not nest forward-mode AD.*torch.func.jvp"):
        h(forward_ad.make_dual(phi, t), "forward", SGD)
    with forward_ad.dual_level(), pytest.raises(
            bilevel.NotDifferentiableError, match=r"not supported for solver 'cg' \(outer\['log_lambda'\] is a "
                                                  r"torch.autograd.forward_ad dual tensor\).*silently be zero"):
        h(forward_ad.make_dual(phi, t), "cg:maxiter=20", SGD)


def test_inputs_are_validated_under_torch_func_grad():
    """Validation runs on the primal values outside the transform (it needs autograd's allow_unused), so bad
    input under grad gets the same clear errors as without it, not a raw functorch error."""
    phi = OUTER["log_lambda"]
    X, y = IB
    X = X.clone()
    X[0, 0] = float("nan")
    with pytest.raises(bilevel.NonFiniteError, match=r"inner_loss is nan at the initial params \(before inner step 0\)"):
        grad(lambda p: W @ h(p, "unroll", SGD, batch=(X, y), validate=True))(phi)

    def with_unused(p):
        return bilevel.hypergrad(PROBLEM, INNER, {"log_lambda": p, "forgotten": p * 0 + 1}, inner_batch=IB,
                                 outer_batch=OB, solver="unroll", loop=SGD).hypergrad["log_lambda"].sum()

    with pytest.raises(bilevel.StructureError, match=r"outer params \['forgotten'\] are used by neither"):
        grad(with_unused)(phi)


def test_vmap_of_grad_matches_a_python_loop():
    phis = OUTER["log_lambda"] + torch.linspace(-0.5, 0.5, 3, dtype=torch.float64)[:, None]
    batched = vmap(grad(lambda p: W @ h(p, "unroll", SGD)))(phis)
    for i in range(3):
        assert rel(batched[i], W @ fd_jacobian(lambda p: h(p, "unroll", SGD), phis[i])) < BOUND
    phis = phis.clone().requires_grad_(True)  # autograd through vmap
    vmap(lambda p: W @ h(p, "unroll", SGD))(phis).sum().backward()
    for i in range(3):
        assert rel(phis.grad[i], W @ fd_jacobian(lambda p: h(p, "unroll", SGD), phis[i].detach())) < BOUND


class CountingProblem:
    """Wraps the losses and counts their calls: a refused call must do no work."""

    def __init__(self):
        self.calls = 0

        def inner_loss(i, o, b):
            self.calls += 1
            return PROBLEM.inner_loss(i, o, b)

        self.problem = bilevel.BilevelProblem(inner_loss, PROBLEM.outer_loss)


REFUSED = (r"differentiating through bilevel.hypergrad is not supported for solver '{name}' \(a differentiating "
           r"transform is active around the call: torch.func.{level}/.*\): it returns the hypergradient "
           r"detached, so this derivative would silently be zero; .*Differentiable solvers: unroll \(every option\), "
           r"forward, onestep:mode=exact and onestep:mode=first_order.*torch.func.vmap .* is supported by every "
           r"solver. If the hypergradient is meant as a constant, call bilevel.hypergrad outside the transform")


@pytest.mark.parametrize("spec", UNSUPPORTED)
def test_unsupported_solvers_refuse_torch_func_before_any_work(spec):
    counting = CountingProblem()
    name = spec.split(":")[0]

    def s(p):
        return W @ bilevel.hypergrad(counting.problem, INNER, {"log_lambda": p}, inner_batch=IB, outer_batch=OB,
                                     solver=spec, loop=SGD).hypergrad["log_lambda"]

    phi = OUTER["log_lambda"]
    for transform, level in ((lambda: grad(s)(phi), "grad"), (lambda: jacrev(s)(phi), "grad"),
                             (lambda: jvp(s, (phi,), (phi,)), "jvp"), (lambda: jacfwd(s)(phi), "jvp")):
        with pytest.raises(bilevel.NotDifferentiableError, match=REFUSED.format(name=name, level=level)):
            transform()
    assert counting.calls == 0


def test_unsupported_reasons_are_specific():
    phi = OUTER["log_lambda"]
    reasons = {"cg": "implicit \\(IFT\\) hypergradient is taken at the inner solution.*not implemented",
               "cmaes:popsize=4": "zeroth-order CMA-ES pseudo-gradient .* has no derivative",
               "onestep:mode=finite_difference": "finite_difference mode is an approximation"}
    for spec, why in reasons.items():
        with pytest.raises(bilevel.NotDifferentiableError, match=why):
            grad(lambda p: W @ h(p, spec, SGD))(phi)

    @dataclasses.dataclass(frozen=True)
    class MyUnroll(bilevel.Unroll):  # a subclass may compute something else: no route is assumed
        pass

    with pytest.raises(bilevel.NotDifferentiableError, match="MyUnroll is not one of the library's unrolled"):
        grad(lambda p: W @ h(p, MyUnroll(), SGD))(phi)


@pytest.mark.parametrize("spec", ["cg:maxiter=20", "exact", "cmaes:popsize=4"])
def test_unsupported_solvers_under_autograd_compute_then_refuse_backward(spec):
    """Params that require grad are common (named_parameters): the call works and gives the plain value,
    but a backward pass through the result raises instead of treating it as a constant."""
    phi = OUTER["log_lambda"].clone().requires_grad_(True)
    hg = h(phi, spec, SGD)
    assert torch.equal(hg.detach(), h(OUTER["log_lambda"], spec, SGD))
    message = (rf"backward through a bilevel.hypergrad result of solver '{spec.split(':')[0]}' is not supported "
               r"\(grad mode is on and outer\['log_lambda'\] requires grad at the call\): the hypergradient is a "
               r"constant for autograd, so this derivative would silently be zero.*Differentiable solvers: unroll"
               r".*use result.hypergrad\[k\].detach\(\)")
    with pytest.raises(bilevel.NotDifferentiableError, match=message):
        torch.autograd.grad(W @ hg, phi, create_graph=True)
    with pytest.raises(bilevel.NotDifferentiableError, match=message):
        (W @ hg + phi.sum()).backward()  # mixed with another term: would silently drop the hypergradient's part
    constant = torch.nn.Parameter(OUTER["log_lambda"].clone())
    constant.grad = hg.detach()  # the usual outer step still works
    torch.optim.SGD([constant], lr=1.0).step()
    assert torch.equal(constant.detach(), OUTER["log_lambda"] - hg.detach())


def test_unsupported_solver_under_vmap_with_autograd_refuses_backward():
    phis = (OUTER["log_lambda"] + torch.linspace(-0.5, 0.5, 3, dtype=torch.float64)[:, None]).requires_grad_(True)
    out = vmap(lambda p: h(p, "cg:maxiter=20", SGD))(phis)
    for i in range(3):
        assert rel(out[i].detach(), h(phis[i].detach(), "cg:maxiter=20", SGD)) < 1e-12
    with pytest.raises(bilevel.NotDifferentiableError, match="backward through a bilevel.hypergrad result of solver 'cg'"):
        out.sum().backward()


def test_no_grad_and_detached_inputs_give_detached_results():
    phi = OUTER["log_lambda"].clone().requires_grad_(True)
    with torch.no_grad():
        assert not h(phi, "unroll", SGD).requires_grad
    assert not h(OUTER["log_lambda"], "unroll", SGD).requires_grad
    assert not h(OUTER["log_lambda"], "cg:maxiter=20", SGD).requires_grad
