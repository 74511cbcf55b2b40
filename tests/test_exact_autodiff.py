"""``bilevel.autodiff`` held to exact values: HVPs (every mode, and the forward-AD fallback), mixed vjps,
value-and-gradients, and the vmap detection the iterative solvers rely on.

Exact values: G(θ) = Σ θᵢ³ has H = diag(6θ); G(θ, φ) = Σ φᵢ θᵢ² has ∂²G/∂φ∂θ = diag(2θ), so
(∂²G/∂φ∂θ)ᵀ v = 2 θ ⊙ v; F(θ, φ) = θᵀφ + ½‖θ‖² has ∇θF = φ + θ, ∇φF = θ. Written to kill the mutants
that ``mutation/run.py autodiff`` found alive (docs/mutation.md).
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
