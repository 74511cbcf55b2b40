"""``bilevel.autodiff`` held to exact values: HVPs (every mode, and the forward-AD fallback), mixed vjps,
value-and-gradients, and the vmap detection the iterative solvers rely on, on both paths: torch.func and the
autograd tape (TapeHessian, TapeForwardOverReverse, tape_hvp_fwdrev and the tape helpers).

Exact values: G(θ) = Σ θᵢ³ has H = diag(6θ); G(θ, φ) = Σ φᵢ θᵢ² has ∂²G/∂φ∂θ = diag(2θ), so
(∂²G/∂φ∂θ)ᵀ v = 2 θ ⊙ v; F(θ, φ) = θᵀφ + ½‖θ‖² has ∇θF = φ + θ, ∇φF = θ. The tape is held to a quadratic
whose H and mixed block are constant matrices built by hand (float64, ≤ 1e-12), and its ``differentiable``
products to the third derivatives of G = Σ φ² θ³. Written to kill the mutants that ``mutation/run.py autodiff``
found alive (docs/mutation.md).
"""
from __future__ import annotations

import pytest
import torch
from torch.func import grad, vmap

from bilevel import autodiff

F64 = torch.float64
THETA = {"x": torch.tensor([1.0, 2.0, -0.5], dtype=F64)}
V = {"x": torch.tensor([1.0, -1.0, 3.0], dtype=F64)}
CUBE_HV = 6 * THETA["x"] * V["x"]  # H v for G = Σ θ³


class CubeNoJvp(torch.autograd.Function):
    """x ↦ x³ with a backward but no forward-mode rule: jvp through it raises NotImplementedError."""

    @staticmethod
    def forward(x):
        return x ** 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * g


def cube(p):
    return (p["x"] ** 3).sum()


def cube_no_jvp(p):
    return CubeNoJvp.apply(p["x"]).sum()


@pytest.mark.parametrize("mode", ["auto", "fwdrev", "revrev"])
def test_hvp_every_mode_is_the_closed_form(mode):
    assert torch.allclose(autodiff.hvp(cube, THETA, V, mode)["x"], CUBE_HV, rtol=1e-15, atol=0)
    assert torch.allclose(autodiff.hvp_operator(cube, THETA, mode)(V)["x"], CUBE_HV, rtol=1e-15, atol=0)


def test_hvp_operator_is_reusable_for_many_vectors():
    op = autodiff.hvp_operator(cube, THETA, "auto")
    for scale in (1.0, -2.0, 0.5):
        assert torch.allclose(op({"x": scale * V["x"]})["x"], scale * CUBE_HV, rtol=1e-15, atol=0)


def test_hvp_auto_falls_back_to_reverse_mode_when_forward_ad_is_missing():
    assert torch.allclose(autodiff.hvp(cube_no_jvp, THETA, V, "auto")["x"], CUBE_HV, rtol=1e-15, atol=0)
    assert torch.allclose(autodiff.hvp(cube_no_jvp, THETA, V, "revrev")["x"], CUBE_HV, rtol=1e-15, atol=0)
    with pytest.raises(NotImplementedError, match="jvp"):  # fwdrev is asked for explicitly: no fallback
        autodiff.hvp(cube_no_jvp, THETA, V, "fwdrev")


def test_hvp_auto_tries_forward_mode_first_on_torch_func():
    """``auto`` on torch.func is forward-over-reverse when it can be: with an op that has no forward rule, the
    loss is entered twice (the refused jvp, then the reverse-mode product), with ``revrev`` once."""
    calls = []

    def counted(p):
        calls.append(1)
        return cube_no_jvp(p)

    for mode, entries in (("auto", 2), ("revrev", 1)):
        calls.clear()
        out = autodiff.hvp(counted, THETA, V, mode, path="func")
        assert len(calls) == entries, mode
        assert torch.allclose(out["x"], CUBE_HV, rtol=1e-15, atol=0)


def test_hvp_auto_does_not_swallow_other_errors():
    def broken(p):
        raise RuntimeError("shape mismatch in the user's loss")

    with pytest.raises(RuntimeError, match="shape mismatch in the user's loss"):
        autodiff.hvp(broken, THETA, V, "auto")


@pytest.mark.parametrize("message, missing", [
    ("You must implement the jvp function for custom autograd.Function to use it with forward mode AD.", True),
    ("derivative for foo is not implemented in forward mode", True),
    ("forward-mode AD is not supported for bar", True),
    ("forward mode AD of baz: jvp missing", True),
    ("Trying to use forward AD with foo that does not support it", True),  # each phrase alone
    ("the forward derivative of foo has not been implemented yet", True),
    ("not implemented: backward of foo", False),
    ("expected a forward pass", False),
])
def test_forward_ad_missing_reads_the_error_message(message, missing):
    assert autodiff._forward_ad_missing(RuntimeError(message)) is missing
    assert autodiff._forward_ad_missing(RuntimeError(message.upper())) is missing  # case does not matter


GRID = torch.full((1, 2, 2, 2), 0.3, dtype=F64)


def grid_sampled(p):
    """A loss through grid_sample, whose forward-mode derivative torch has not implemented (torch 2.13)."""
    return (torch.nn.functional.grid_sample(p["x"].reshape(1, 1, 1, 3), GRID, align_corners=False) ** 2).sum()


def test_hvp_auto_falls_back_on_torch_s_own_missing_forward_ad_message():
    expected = autodiff.hvp(grid_sampled, THETA, V, "revrev")["x"]
    assert torch.allclose(autodiff.hvp(grid_sampled, THETA, V, "auto")["x"], expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("fn", [autodiff.hvp, autodiff.hvp_operator])
def test_unknown_hvp_mode_is_refused_naming_the_valid_ones(fn):
    args = (cube, THETA, V, "forward") if fn is autodiff.hvp else (cube, THETA, "forward")
    with pytest.raises(ValueError, match=r"unknown hvp mode 'forward'; valid: \('auto', 'fwdrev', 'revrev'\)"):
        fn(*args)


def test_mixed_vjp_is_the_closed_form_cross_derivative():
    def g(theta, phi):
        return (phi["p"] * theta["x"] ** 2).sum() + (phi["p"] ** 3).sum()  # the φ-only term has no cross part

    phi = {"p": torch.tensor([0.5, -1.0, 2.0], dtype=F64)}
    out = autodiff.mixed_vjp(g, THETA, phi, V)
    assert set(out) == {"p"}
    assert torch.allclose(out["p"], 2 * THETA["x"] * V["x"], rtol=1e-15, atol=0)


def test_value_and_grads_is_the_closed_form():
    phi = {"p": torch.tensor([0.5, -1.0, 2.0], dtype=F64)}

    def f(theta, p):
        return theta["x"] @ p["p"] + 0.5 * (theta["x"] ** 2).sum()

    value, g_theta, g_phi = autodiff.value_and_grads(f, THETA, phi)
    assert float(value) == pytest.approx(float(THETA["x"] @ phi["p"] + 0.5 * (THETA["x"] ** 2).sum()), rel=1e-15)
    assert torch.equal(g_theta["x"], phi["p"] + THETA["x"])
    assert torch.equal(g_phi["p"], THETA["x"])


def test_is_batched_sees_vmap_through_other_transforms():
    plain = torch.ones(3)
    assert autodiff.is_batched(plain) is False and autodiff.any_batched([plain, plain]) is False
    seen = {}

    def inside_vmap(x):
        seen["vmap"] = autodiff.is_batched(x)
        seen["any"] = autodiff.any_batched([torch.ones(2), x])
        seen["none"] = autodiff.any_batched([torch.ones(2)])
        return x

    vmap(inside_vmap)(torch.ones(2, 3))
    assert seen == {"vmap": True, "any": True, "none": False}

    def grad_inside_vmap(x):
        def loss(y):
            seen["grad_of_vmapped"] = autodiff.is_batched(y)  # a grad wrapper around a batched tensor
            return (y ** 2).sum()
        return grad(loss)(x)

    vmap(grad_inside_vmap)(torch.ones(2, 3))
    assert seen["grad_of_vmapped"] is True

    def only_grad(y):
        seen["grad_only"] = autodiff.is_batched(y)  # wrapped by grad, not batched
        return (y ** 2).sum()

    grad(only_grad)(torch.ones(3))
    assert seen["grad_only"] is False
    assert autodiff.any_batched([]) is False


# ---- the autograd tape: TapeHessian, TapeForwardOverReverse, tape_hvp_fwdrev and the tape helpers ---------------
#
# A quadratic with every kind of leaf, whose second derivatives are constant matrices built by hand:
#   G(θ, φ) = ½ xᵀAx + xᵀCy + ½ yᵀDy + xᵀBp + yᵀEq + wᵀlin + Σ p³ + Σ q²,
#   θ = {x ∈ R³, lin ∈ R² (G is linear in it), y ∈ R², unused ∈ R² (G ignores it)},
#   φ = {p ∈ R³, r ∈ R¹ (G ignores it), q ∈ R²}.
# Then ∇θG = (Ax + Cy + Bp, w, Cᵀx + Dy + Eq, 0), H v = (A vx + C vy, 0, Cᵀ vx + D vy, 0) and
# (∂²G/∂φ∂θ)ᵀ v = (Bᵀ vx, 0, Eᵀ vy): the φ-only terms Σ p³ + Σ q² have no cross part.
# The leaves "lin" and "unused" sit between the others so that a key/vector mismatch changes the numbers.

TOL = 1e-12  # float64, every product below is a handful of flops away from the hand-built matrices


def _m(rows):
    return torch.tensor(rows, dtype=F64)


A = _m([[4.0, 1.0, -0.5], [1.0, 3.0, 0.25], [-0.5, 0.25, 2.0]])
C = _m([[0.5, -1.0], [2.0, 0.0], [1.5, 0.75]])
D = _m([[5.0, -2.0], [-2.0, 3.0]])
B = _m([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0], [2.5, 1.0, 0.0]])
E = _m([[-1.5, 2.0], [0.5, 4.0]])
W = _m([3.0, -7.0])


def quad_theta():
    return {"x": _m([0.3, -1.2, 2.0]), "lin": _m([1.5, -0.5]), "y": _m([-0.7, 0.9]), "unused": _m([4.0, 5.0])}


def quad_phi():
    return {"p": _m([1.1, -0.4, 0.6]), "r": _m([9.0]), "q": _m([-2.0, 0.35])}


def quad_v():
    return {"x": _m([1.0, -2.0, 0.5]), "lin": _m([3.0, 1.0]), "y": _m([0.25, -1.5]), "unused": _m([-6.0, 2.0])}


def quad_g(theta, phi):
    x, y, p, q = theta["x"], theta["y"], phi["p"], phi["q"]
    return (0.5 * x @ A @ x + x @ C @ y + 0.5 * y @ D @ y + x @ B @ p + y @ E @ q + W @ theta["lin"]
            + (p ** 3).sum() + (q ** 2).sum())


def quad_hv(v):
    return {"x": A @ v["x"] + C @ v["y"], "lin": torch.zeros(2, dtype=F64),
            "y": C.T @ v["x"] + D @ v["y"], "unused": torch.zeros(2, dtype=F64)}


def quad_mixed(v):
    return {"p": B.T @ v["x"], "r": torch.zeros(1, dtype=F64), "q": E.T @ v["y"]}


def quad_grad(theta, phi):
    x, y = theta["x"], theta["y"]
    return {"x": A @ x + C @ y + B @ phi["p"], "lin": W.clone(), "y": C.T @ x + D @ y + E @ phi["q"],
            "unused": torch.zeros(2, dtype=F64)}


def maxdiff(a, b):
    """max |a − b| over the entries (read without the graph a product may carry)."""
    return float((a - b).detach().abs().max())


def assert_tree_close(actual, expected, tol=TOL):
    """Same keys in the same order, same shapes and dtype, every entry within ``tol`` (absolute, float64)."""
    assert list(actual) == list(expected)
    for k in expected:
        assert actual[k].shape == expected[k].shape and actual[k].dtype == expected[k].dtype, k
        assert maxdiff(actual[k], expected[k]) <= tol, (k, actual[k], expected[k])


def stacked_quad_hv(batch):
    """H v for every row of a batch of vectors (each leaf of shape (m, *leaf.shape))."""
    rows = [quad_hv({k: x[i] for k, x in batch.items()}) for i in range(len(batch["x"]))]
    return {k: torch.stack([r[k] for r in rows]) for k in batch}


def tracked(params):
    return {k: x.clone().requires_grad_(True) for k, x in params.items()}


def none_requires_grad(params):
    return not any(x.requires_grad for x in params.values())


def test_tape_hessian_products_and_gradient_are_the_hand_built_matrices():
    theta, phi, v = quad_theta(), quad_phi(), quad_v()
    tape = autodiff.TapeHessian(quad_g, theta, phi)
    assert_tree_close(tape.gradient, quad_grad(theta, phi))
    assert_tree_close(tape.hvp(v), quad_hv(v))
    assert_tree_close(tape(v), quad_hv(v))  # __call__ is hvp: the matvec a linear solver calls
    assert_tree_close(tape.mixed_vjp(v), quad_mixed(v))
    for scale in (-2.0, 0.5):  # the recorded graph is reused (retain_graph) for every product
        scaled = {k: scale * x for k, x in v.items()}
        assert_tree_close(tape.hvp(scaled), {k: scale * x for k, x in quad_hv(v).items()})
        assert_tree_close(tape.mixed_vjp(scaled), {k: scale * x for k, x in quad_mixed(v).items()})
    assert tape.differentiable is False
    for out in (tape.gradient, tape.hvp(v), tape.mixed_vjp(v)):
        assert none_requires_grad(out)
    assert tape.theta is theta  # the point itself, not a copy


def test_tape_hessian_matmat_is_one_hessian_product_per_row():
    theta, phi = quad_theta(), quad_phi()
    rows = [quad_v(), {k: torch.arange(1.0, x.numel() + 1, dtype=F64) - 2 for k, x in theta.items()},
            {k: torch.ones_like(x) for k, x in theta.items()}]
    batch = {k: torch.stack([r[k] for r in rows]) for k in theta}
    out = autodiff.TapeHessian(quad_g, theta, phi).matmat(batch)
    expected = [quad_hv(r) for r in rows]
    assert_tree_close(out, {k: torch.stack([e[k] for e in expected]) for k in theta})
    # against the dense Hessian too: H = [[A, 0, C, 0], [0, 0, 0, 0], [Cᵀ, 0, D, 0], [0, 0, 0, 0]]
    full = torch.zeros(9, 9, dtype=F64)
    full[0:3, 0:3], full[0:3, 5:7], full[5:7, 0:3], full[5:7, 5:7] = A, C, C.T, D
    eye = torch.eye(9, dtype=F64)
    columns = autodiff.TapeHessian(quad_g, theta, phi).matmat(
        {"x": eye[:, 0:3], "lin": eye[:, 3:5], "y": eye[:, 5:7], "unused": eye[:, 7:9]})
    assert maxdiff(torch.cat([columns[k] for k in theta], dim=1), full) <= TOL


def test_tape_hessian_matmat_and_transform_products_reuse_or_rebuild_the_linearisation():
    """matmat outside a transform builds the torch.func linearisation once (one more call of G) and reuses it;
    a linearisation built inside vmap is tied to that vmap and is rebuilt at every call."""
    calls = []

    def counted(theta, phi):
        calls.append(1)
        return quad_g(theta, phi)

    theta, phi, v = quad_theta(), quad_phi(), quad_v()
    tape = autodiff.TapeHessian(counted, theta, phi)
    assert len(calls) == 1  # the recorded gradient
    batch = {k: torch.stack([x, 2 * x]) for k, x in v.items()}
    first = tape.matmat(batch)
    assert len(calls) == 2
    second = tape.matmat(batch)
    assert len(calls) == 2  # kept
    assert_tree_close(first, second, tol=0.0)
    assert_tree_close({k: x[1] for k, x in first.items()}, {k: 2 * x for k, x in quad_hv(v).items()})
    vmap(tape.hvp)(batch)  # inside vmap, the linearisation built outside is reused
    assert len(calls) == 2
    fresh = autodiff.TapeHessian(counted, theta, phi)
    assert len(calls) == 3
    vmap(fresh.hvp)(batch)
    vmap(fresh.hvp)(batch)
    assert len(calls) == 5  # built inside each vmap, not kept
    vmap(fresh.mixed_vjp)(batch)
    vmap(fresh.mixed_vjp)(batch)
    assert len(calls) == 7
    fresh.matmat(batch)
    assert len(calls) == 8  # built outside a transform now: kept
    vmap(fresh.hvp)(batch)
    assert len(calls) == 8


def test_tape_hessian_products_inside_vmap_run_on_torch_func():
    theta, phi, v = quad_theta(), quad_phi(), quad_v()
    tape = autodiff.TapeHessian(quad_g, theta, phi)
    batch = {k: torch.stack([x, -3 * x, torch.zeros_like(x)]) for k, x in v.items()}
    hv, mixed = vmap(tape.hvp)(batch), vmap(tape.mixed_vjp)(batch)
    for i, s in enumerate((1.0, -3.0, 0.0)):
        assert_tree_close({k: x[i] for k, x in hv.items()}, {k: s * x for k, x in quad_hv(v).items()})
        assert_tree_close({k: x[i] for k, x in mixed.items()}, {k: s * x for k, x in quad_mixed(v).items()})
    # the mixed product inside vmap before any H v (the φ linearisation is the first one built)
    fresh = autodiff.TapeHessian(quad_g, theta, phi)
    mixed_first = vmap(fresh.mixed_vjp)(batch)
    assert_tree_close({k: x[1] for k, x in mixed_first.items()}, {k: -3 * x for k, x in quad_mixed(v).items()})


def test_tape_hessian_unused_and_linear_leaves_give_exact_zeros():
    theta, v = quad_theta(), quad_v()
    # G linear in every θ leaf: ∇θG carries no graph, every product is zero (and needs no backward pass)
    linear = autodiff.TapeHessian(lambda t, p: W @ t["lin"] + (p["p"] * 2).sum(), theta, quad_phi())
    assert_tree_close(linear.gradient, {"x": torch.zeros(3, dtype=F64), "lin": W, "y": torch.zeros(2, dtype=F64),
                                        "unused": torch.zeros(2, dtype=F64)})
    zeros_theta = {k: torch.zeros_like(x) for k, x in theta.items()}
    assert_tree_close(linear.hvp(v), zeros_theta, tol=0.0)
    assert_tree_close(linear.mixed_vjp(v), {k: torch.zeros_like(x) for k, x in quad_phi().items()}, tol=0.0)
    # only H wanted: φ empty, the mixed product is an empty dict
    only_h = autodiff.TapeHessian(lambda t, _: quad_g(t, quad_phi()), theta)
    assert_tree_close(only_h.hvp(v), quad_hv(v))
    assert only_h.mixed_vjp(v) == {}
    # G independent of φ: the mixed product is zero
    no_phi = autodiff.TapeHessian(lambda t, p: quad_g(t, quad_phi()), theta, quad_phi())
    assert_tree_close(no_phi.mixed_vjp(v), {k: torch.zeros_like(x) for k, x in quad_phi().items()}, tol=0.0)
    assert_tree_close(no_phi.hvp(v), quad_hv(v))


# G(θ, φ) = Σ φ² θ³ on one leaf each: ∇θG = 3φ²θ², H v = 6φ²θ v, (∂²G/∂φ∂θ)ᵀ v = 6φθ² v, so with u fixed
# ∇θ⟨Hv, u⟩ = 6φ² v u, ∇φ⟨Hv, u⟩ = 12φθ v u, ∇v⟨Hv, u⟩ = H u = 6φ²θ u, ∇θ⟨mixed, u⟩ = 12φθ v u,
# ∇φ⟨mixed, u⟩ = 6θ² v u, and ∇θ⟨∇θG, u⟩ = 6φ²θ u.
T0, P0, V0, U0 = _m([1.0, -2.0, 0.5]), _m([0.5, 1.5, -1.0]), _m([2.0, 1.0, -3.0]), _m([1.0, -1.0, 4.0])


def cubic_g(theta, phi):
    return (phi["p"] ** 2 * theta["t"] ** 3).sum()


def _inner_grad(out, wrt):
    """∇ of a scalar built from products, keeping their graph (several derivatives are taken of one product)."""
    return torch.autograd.grad(out, wrt, retain_graph=True, allow_unused=True)


def test_tape_hessian_differentiable_keeps_graphs_through_theta_phi_and_v():
    theta, phi = {"t": T0.clone().requires_grad_(True)}, {"p": P0.clone().requires_grad_(True)}
    v = {"t": V0.clone().requires_grad_(True)}
    tape = autodiff.TapeHessian(cubic_g, theta, phi, differentiable=True)
    assert tape.differentiable is True
    assert tape.theta_leaves["t"] is theta["t"] and tape.phi_leaves["p"] is phi["p"]  # used themselves
    hv, mixed = tape.hvp(v), tape.mixed_vjp(v)
    assert maxdiff(hv["t"], 6 * P0 ** 2 * T0 * V0) <= TOL
    assert maxdiff(mixed["p"], 6 * P0 * T0 ** 2 * V0) <= TOL
    d_theta, d_phi, d_v = _inner_grad((hv["t"] * U0).sum(), [theta["t"], phi["p"], v["t"]])
    assert maxdiff(d_theta, 6 * P0 ** 2 * V0 * U0) <= TOL
    assert maxdiff(d_phi, 12 * P0 * T0 * V0 * U0) <= TOL
    assert maxdiff(d_v, 6 * P0 ** 2 * T0 * U0) <= TOL
    d_theta, d_phi = _inner_grad((mixed["p"] * U0).sum(), [theta["t"], phi["p"]])
    assert maxdiff(d_theta, 12 * P0 * T0 * V0 * U0) <= TOL
    assert maxdiff(d_phi, 6 * T0 ** 2 * V0 * U0) <= TOL
    (d_theta,) = _inner_grad((tape.gradient["t"] * U0).sum(), [theta["t"]])
    assert maxdiff(d_theta, 6 * P0 ** 2 * T0 * U0) <= TOL


def test_tape_hessian_differentiable_follows_theta_s_own_history():
    """θ = 2α with α a leaf: θ is used itself (keep_tracked), so ∂/∂α⟨Hv, u⟩ = 2 · 6φ² v u."""
    alpha = (T0 / 2).requires_grad_(True)
    theta = {"t": 2 * alpha}
    tape = autodiff.TapeHessian(cubic_g, theta, {"p": P0}, differentiable=True)
    assert tape.differentiable is True
    (d_alpha,) = _inner_grad((tape.hvp({"t": V0})["t"] * U0).sum(), [alpha])
    assert maxdiff(d_alpha, 12 * P0 ** 2 * V0 * U0) <= TOL


def test_tape_hessian_differentiable_only_phi_or_only_a_closed_over_tensor_requires_grad():
    phi = {"p": P0.clone().requires_grad_(True)}
    tape = autodiff.TapeHessian(cubic_g, {"t": T0}, phi, differentiable=True)
    assert tape.differentiable is True
    (d_phi,) = _inner_grad((tape.hvp({"t": V0})["t"] * U0).sum(), [phi["p"]])
    assert maxdiff(d_phi, 12 * P0 * T0 * V0 * U0) <= TOL
    # nothing passed requires grad, but G closes over s that does: G = s Σ θ³, H v = 6 s θ v, ∂/∂s⟨Hv, u⟩ = Σ 6θvu
    s = torch.tensor(1.5, dtype=F64, requires_grad=True)
    closed = autodiff.TapeHessian(lambda t, p: s * (t["t"] ** 3).sum(), {"t": T0}, {"p": P0}, differentiable=True)
    assert closed.differentiable is True
    hv = closed.hvp({"t": V0})["t"]
    assert maxdiff(hv, 6 * 1.5 * T0 * V0) <= TOL
    (d_s,) = _inner_grad((hv * U0).sum(), [s])
    assert abs(float(d_s) - float((6 * T0 * V0 * U0).sum())) <= TOL
    # the same without differentiable: detached
    plain = autodiff.TapeHessian(lambda t, p: s * (t["t"] ** 3).sum(), {"t": T0}, {"p": P0})
    assert plain.differentiable is False and not plain.hvp({"t": V0})["t"].requires_grad


def test_tape_hessian_differentiable_with_nothing_tracked_returns_detached_products():
    tape = autodiff.TapeHessian(cubic_g, {"t": T0}, {"p": P0}, differentiable=True)
    assert tape.differentiable is False
    v = {"t": V0}
    for out in (tape.gradient, tape.hvp(v), tape.mixed_vjp(v)):
        assert none_requires_grad(out)
    assert maxdiff(tape.hvp(v)["t"], 6 * P0 ** 2 * T0 * V0) <= TOL
    # a vector that requires grad makes the product differentiable in v (it is linear in v): ∇v⟨Hv, u⟩ = H u
    tracked_v = {"t": V0.clone().requires_grad_(True)}
    hv = tape.hvp(tracked_v)["t"]
    (d_v,) = _inner_grad((hv * U0).sum(), [tracked_v["t"]])
    assert maxdiff(d_v, 6 * P0 ** 2 * T0 * U0) <= TOL
    mixed = tape.mixed_vjp(tracked_v)["p"]
    (d_v,) = _inner_grad((mixed * U0).sum(), [tracked_v["t"]])
    assert maxdiff(d_v, 6 * P0 * T0 ** 2 * U0) <= TOL


def test_tape_hessian_not_differentiable_detaches_even_tracked_inputs():
    theta, phi = {"t": T0.clone().requires_grad_(True)}, {"p": P0.clone().requires_grad_(True)}
    tape = autodiff.TapeHessian(cubic_g, theta, phi)
    assert tape.differentiable is False
    assert tape.theta_leaves["t"] is not theta["t"] and tape.theta_leaves["t"].is_leaf  # a fresh leaf
    v = {"t": V0.clone().requires_grad_(True)}
    for out in (tape.gradient, tape.hvp(v), tape.mixed_vjp(v), tape.matmat({"t": V0[None]})):
        assert none_requires_grad(out)
    assert maxdiff(tape.hvp(v)["t"], 6 * P0 ** 2 * T0 * V0) <= TOL
    assert maxdiff(tape.matmat({"t": V0[None]})["t"][0], 6 * P0 ** 2 * T0 * V0) <= TOL
    assert theta["t"].grad is None and phi["p"].grad is None  # nothing was accumulated into the caller's tensors


def test_tape_forward_over_reverse_matches_the_hand_built_hessian():
    theta, phi, v = quad_theta(), quad_phi(), quad_v()
    f = lambda t: quad_g(t, phi)
    op = autodiff.TapeForwardOverReverse(f, theta)
    assert op.f is f and op.theta is theta
    assert_tree_close(op(v), quad_hv(v))  # "lin" (gradient W has no tangent) and "unused" (no gradient): zeros
    assert_tree_close(autodiff.tape_hvp_fwdrev(f, theta, v), quad_hv(v))
    batch = {k: torch.stack([x, -x, 0.5 * x]) for k, x in v.items()}
    for out in (op.matmat(batch), vmap(op)(batch)):  # matmat, and a call inside a transform: torch.func
        for i, s in enumerate((1.0, -1.0, 0.5)):
            assert_tree_close({k: x[i] for k, x in out.items()}, {k: s * x for k, x in quad_hv(v).items()})
    # the products are detached, even from a θ that requires grad
    tracked_theta = tracked(theta)
    op = autodiff.TapeForwardOverReverse(f, tracked_theta)
    assert none_requires_grad(op(v)) and none_requires_grad(op.matmat(batch))
    assert_tree_close(op.matmat(batch), stacked_quad_hv(batch))


def test_tape_hvp_fwdrev_on_the_cube_and_a_leaf_nothing_depends_on():
    theta = {"x": THETA["x"], "free": _m([1.0, 2.0])}
    v = {"x": V["x"], "free": _m([5.0, -5.0])}
    out = autodiff.tape_hvp_fwdrev(lambda p: cube(p), theta, v)
    assert_tree_close(out, {"x": CUBE_HV, "free": torch.zeros(2, dtype=F64)})
    # the forward-mode level is closed again afterwards
    assert torch.autograd.forward_ad._current_level == -1


def test_tape_value_and_grad_is_the_closed_form_and_detached():
    theta, phi = tracked(quad_theta()), quad_phi()
    value, gradient = autodiff.tape_value_and_grad(lambda t: quad_g(t, phi), theta)
    plain = quad_theta()
    assert abs(float(value) - float(quad_g(plain, phi))) <= TOL
    assert not value.requires_grad and none_requires_grad(gradient)
    assert_tree_close(gradient, quad_grad(plain, phi))
    with torch.no_grad():  # the tape records even under no_grad
        value2, gradient2 = autodiff.tape_value_and_grad(lambda t: quad_g(t, phi), plain)
    assert float(value2) == float(value)
    assert_tree_close(gradient2, gradient, tol=0.0)
    assert theta["x"].grad is None


def test_tape_leaves_fresh_or_kept():
    plain, own = _m([1.0, 2.0]), _m([3.0]).requires_grad_(True)
    history = 2 * own
    for keep in (False, True):
        leaves = autodiff.tape_leaves({"a": plain, "b": own, "c": history}, keep_tracked=keep)
        assert list(leaves) == ["a", "b", "c"]
        assert leaves["a"] is not plain and leaves["a"].is_leaf and leaves["a"].requires_grad
        assert torch.equal(leaves["a"], plain) and not plain.requires_grad  # the caller's tensor is untouched
        for k, x in (("b", own), ("c", history)):
            assert torch.equal(leaves[k], x)
            assert (leaves[k] is x) is keep
            assert leaves[k].requires_grad and (keep or leaves[k].is_leaf)
    default = autodiff.tape_leaves({"a": plain, "b": own, "c": history})  # default: fresh leaves everywhere
    assert all(x.is_leaf and x.requires_grad for x in default.values())
    assert default["b"] is not own and default["c"] is not history


def test_fill_none_puts_zeros_of_the_right_shape_where_a_leaf_was_unused():
    like = {"a": _m([1.0, 2.0]), "b": torch.ones(2, 3, dtype=torch.float32), "c": _m([5.0])}
    found = [_m([7.0, 8.0]), None, _m([9.0])]
    out = autodiff.fill_none(found, like)
    assert list(out) == ["a", "b", "c"]
    assert out["a"] is found[0] and out["c"] is found[2]
    assert torch.equal(out["b"], torch.zeros(2, 3)) and out["b"].dtype == torch.float32


def test_reaches_other_leaves_walks_the_whole_graph():
    a, b = _m([1.0, 2.0]).requires_grad_(True), _m([3.0, 4.0]).requires_grad_(True)
    other = torch.tensor(0.5, dtype=F64, requires_grad=True)
    constant = _m([1.0, 1.0])
    own_only = ((a * b).exp() * constant).sum() + (a ** 2).sum()  # shared nodes, a constant input
    assert autodiff.reaches_other_leaves(own_only, [a, b]) is False
    assert autodiff.reaches_other_leaves(own_only, [a]) is True  # b is another leaf
    deep = a
    for _ in range(5):
        deep = torch.sin(deep) + constant
    deep = (deep * (b + 1) * other).sum()  # the other leaf sits beside the own ones, several nodes down
    assert autodiff.reaches_other_leaves(deep, [a, b]) is True
    assert autodiff.reaches_other_leaves(deep, [a, b, other]) is False
    deeper = a
    for _ in range(5):
        deeper = torch.cos(deeper)
    deeper = (deeper * other).sum() + (a * b).sum()  # found only by following the other branch to its end
    assert autodiff.reaches_other_leaves((deeper * b).sum(), [b, a]) is True
    # shared nodes are walked once: 60 squarings have 2⁶⁰ paths back to a, but only 61 nodes
    squared = a
    for _ in range(60):
        squared = squared * squared
    assert autodiff.reaches_other_leaves(squared.sum(), [a]) is False
    # a loss with no graph at all
    assert autodiff.reaches_other_leaves(_m([1.0]).sum(), []) is False
    assert autodiff.reaches_other_leaves((a * 2).sum(), []) is True


# ---- the public building blocks on the tape, and the path they choose ---------------------------------------


def path_spy(f, seen):
    """Wraps a loss to record, per call, whether it ran on torch.func (functorch-wrapped params) and whether a
    forward-mode tangent was attached (forward-over-reverse on the tape)."""
    def spied(*args):
        x = args[0]["x"]
        seen.append(("func" if torch._C._functorch.is_functorch_wrapped_tensor(x) else "autograd",
                     torch.autograd.forward_ad.unpack_dual(x).tangent is not None))
        return f(*args)
    return spied


@pytest.mark.parametrize("mode, kind", [("auto", "autograd"), ("revrev", "autograd"), ("fwdrev", "dual")])
def test_public_hvp_on_the_tape_is_the_closed_form(mode, kind):
    theta, phi, v = quad_theta(), quad_phi(), quad_v()
    seen = []
    f = path_spy(lambda t: quad_g(t, phi), seen)
    assert_tree_close(autodiff.hvp(f, theta, v, mode, path="autograd"), quad_hv(v))
    assert seen == [("autograd", kind == "dual")]
    seen.clear()
    op = autodiff.hvp_operator(f, theta, mode, path="autograd")
    assert isinstance(op, autodiff.TapeForwardOverReverse if kind == "dual" else autodiff.TapeHessian)
    assert_tree_close(op(v), quad_hv(v))
    assert all(s == ("autograd", kind == "dual") for s in seen) and seen
    with torch.no_grad():  # automatic choice without grad mode: the tape
        seen.clear()
        assert_tree_close(autodiff.hvp(f, theta, v, mode), quad_hv(v))
        assert seen[0][0] == "autograd"
        seen.clear()
        assert_tree_close(autodiff.hvp_operator(f, theta, mode)(v), quad_hv(v))
        assert seen[0][0] == "autograd"


@pytest.mark.parametrize("mode", ["auto", "fwdrev", "revrev"])
def test_public_hvp_path_choice(mode):
    from bilevel.paths import autodiff_path

    seen = []
    f = path_spy(cube, seen)
    autodiff.hvp(f, THETA, V, mode)  # grad mode on, automatic: torch.func (products may be differentiated further)
    assert seen[0][0] == "func"
    seen.clear()
    autodiff.hvp(f, THETA, V, mode, path="func")
    assert seen[0][0] == "func"
    with torch.no_grad():
        seen.clear()
        out = autodiff.hvp(f, THETA, V, mode, path="func")  # explicit beats the automatic choice
        assert seen[0][0] == "func" and torch.allclose(out["x"], CUBE_HV, rtol=1e-15, atol=0)
    with autodiff_path("autograd"):  # forced: the tape even with grad mode on
        seen.clear()
        out = autodiff.hvp(f, THETA, V, mode)
        assert seen[0][0] == "autograd" and torch.allclose(out["x"], CUBE_HV, rtol=1e-15, atol=0)
        seen.clear()
        autodiff.hvp_operator(f, THETA, mode)(V)
        assert seen[0][0] == "autograd"
    with torch.no_grad(), autodiff_path("func"):
        seen.clear()
        autodiff.hvp(f, THETA, V, mode)
        assert seen[0][0] == "func"
    seen.clear()
    vmap(lambda v: autodiff.hvp(f, THETA, {"x": v}, mode))(torch.stack([V["x"], 2 * V["x"]]))
    assert seen[0][0] == "func"  # inside a transform


def test_public_hvp_on_the_tape_is_differentiable_with_grad_mode_on():
    """∂/∂θ⟨Hv, u⟩ for G = Σ θ³ is 6 v ⊙ u: the tape keeps the product's graph when grad mode is on."""
    theta = {"x": THETA["x"].clone().requires_grad_(True)}
    u = _m([0.5, 2.0, -1.0])
    for out in (autodiff.hvp(cube, theta, V, "revrev", path="autograd"),
                autodiff.hvp_operator(cube, theta, "revrev", path="autograd")(V)):
        (d,) = _inner_grad((out["x"] * u).sum(), [theta["x"]])
        assert maxdiff(d, 6 * V["x"] * u) <= TOL
    with torch.no_grad():
        assert not autodiff.hvp(cube, theta, V, "revrev", path="autograd")["x"].requires_grad
        assert not autodiff.hvp_operator(cube, theta, "revrev", path="autograd")(V)["x"].requires_grad
    phi = {"p": P0.clone().requires_grad_(True)}
    mixed = autodiff.mixed_vjp(cubic_g, {"t": T0}, phi, {"t": V0}, path="autograd")["p"]
    (d,) = _inner_grad((mixed * U0).sum(), [phi["p"]])
    assert maxdiff(d, 6 * T0 ** 2 * V0 * U0) <= TOL
    with torch.no_grad():
        assert not autodiff.mixed_vjp(cubic_g, {"t": T0}, phi, {"t": V0}, path="autograd")["p"].requires_grad


def test_public_hvp_operator_fwdrev_on_torch_func_has_no_fallback():
    """On torch.func, ``fwdrev`` is forward-over-reverse (jvp, refused by an op with no forward rule) and
    ``auto``/``revrev`` operators are reverse-over-reverse (no jvp at all)."""
    for mode in ("auto", "revrev"):
        op = autodiff.hvp_operator(cube_no_jvp, THETA, mode, path="func")
        assert torch.allclose(op(V)["x"], CUBE_HV, rtol=1e-15, atol=0)
    with pytest.raises(NotImplementedError, match="jvp"):
        autodiff.hvp_operator(cube_no_jvp, THETA, "fwdrev", path="func")(V)


def test_public_mixed_vjp_on_both_paths_is_the_hand_built_matrix():
    theta, phi, v = quad_theta(), quad_phi(), quad_v()
    seen = []
    g = path_spy(quad_g, seen)
    for path, ran in (("autograd", "autograd"), ("func", "func"), (None, "func")):
        seen.clear()
        assert_tree_close(autodiff.mixed_vjp(g, theta, phi, v, path=path), quad_mixed(v))
        assert seen[0][0] == ran
    with torch.no_grad():
        seen.clear()
        assert_tree_close(autodiff.mixed_vjp(g, theta, phi, v), quad_mixed(v))
        assert seen[0][0] == "autograd"


def test_value_and_grads_on_the_tape_is_the_closed_form_and_detached():
    theta, phi = tracked(quad_theta()), quad_phi()
    seen = []
    value, g_theta, g_phi = autodiff.value_and_grads(path_spy(quad_g, seen), theta, phi, path="autograd")
    assert seen == [("autograd", False)]
    plain = quad_theta()
    assert abs(float(value) - float(quad_g(plain, phi))) <= TOL
    assert_tree_close(g_theta, quad_grad(plain, phi))
    # ∇φG = (Bᵀx + 3p², 0, Eᵀy + 2q)
    expected_phi = {"p": B.T @ plain["x"] + 3 * phi["p"] ** 2, "r": torch.zeros(1, dtype=F64),
                    "q": E.T @ plain["y"] + 2 * phi["q"]}
    assert_tree_close(g_phi, expected_phi)
    assert not value.requires_grad and none_requires_grad(g_theta) and none_requires_grad(g_phi)
    value_f, g_theta_f, g_phi_f = autodiff.value_and_grads(quad_g, plain, phi, path="func")
    assert abs(float(value_f) - float(value)) <= TOL
    assert_tree_close(g_theta_f, g_theta)
    assert_tree_close(g_phi_f, expected_phi)


def test_unknown_path_is_refused_naming_the_valid_ones():
    for call in (lambda: autodiff.hvp(cube, THETA, V, path="tape"),
                 lambda: autodiff.hvp_operator(cube, THETA, path="tape"),
                 lambda: autodiff.mixed_vjp(quad_g, quad_theta(), quad_phi(), quad_v(), path="tape"),
                 lambda: autodiff.value_and_grads(quad_g, quad_theta(), quad_phi(), path="tape")):
        with pytest.raises(ValueError, match=r"path must be 'autograd' or 'func' \(or None for the automatic "
                                             r"choice\), got 'tape'"):
            call()


def test_forced_tape_inside_a_transform_is_refused_with_the_way_out():
    from bilevel.paths import AutodiffPathError, autodiff_path

    with autodiff_path("autograd"), pytest.raises(AutodiffPathError, match=r"autodiff_path\('autograd'\) is "
                                                                           r"forced.*transform.*autodiff_path\('func'\)"):
        vmap(lambda v: autodiff.hvp(cube, THETA, {"x": v}))(torch.stack([V["x"], V["x"]]))
