"""Hessian alignment (Hemati et al., ICCV 2023): HGP identity, Hutchinson, Prop. 4 closed forms, Theorem 3.

All checks are against exact values: an explicitly formed head Hessian, closed forms, or a dense search.
"""
import math

import pytest
import torch

from bilevel import tree
from bilevel.problems.domain_generalization import curvature as C
from bilevel.problems.domain_generalization import theory
from bilevel.problems.domain_generalization.model import head_loss

torch.set_num_threads(1)


def _head_problem(num_outputs, n=40, h=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    head = {"weight": 0.5 * torch.randn(num_outputs, h, generator=g, dtype=torch.float64),
            "bias": 0.1 * torch.randn(num_outputs, generator=g, dtype=torch.float64)}
    z = torch.randn(n, h, generator=g, dtype=torch.float64)
    y = torch.randint(0, max(num_outputs, 2), (n,), generator=g)
    return head, z, y


@pytest.mark.parametrize("num_outputs", [1, 3])
@pytest.mark.parametrize("mode", ["identity", "hvp"])
def test_hgp_matches_explicit_head_hessian(num_outputs, mode):
    head, z, y = _head_problem(num_outputs)
    H = C.exact_head_hessian(head, z, y)
    g = tree.flatten(C.head_grad(head, z, y))
    q = tree.flatten(C.hessian_gradient_product(head, z, y, mode))
    torch.testing.assert_close(q, H @ g, rtol=1e-10, atol=1e-12)


def test_hgp_identity_and_hvp_have_the_same_derivative():
    # Eq. 21 is an identity of functions of θ (and of z), so its derivative equals that of the direct HVP.
    head, z, y = _head_problem(3)

    def f(mode):
        return lambda hd, zz: tree.dot(*(2 * [C.hessian_gradient_product(hd, zz, y, mode)]))

    ga = torch.func.grad(f("identity"), argnums=(0, 1))(head, z)
    gb = torch.func.grad(f("hvp"), argnums=(0, 1))(head, z)
    torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-12)


def test_hgp_identity_is_exact_at_zero_gradient():
    # At a stationary head g = 0 the smoothed norm keeps n ∇n = H g = 0 (no NaN from ∇‖g‖ at 0).
    head, z, y = _head_problem(1)
    head = {"weight": torch.zeros_like(head["weight"]), "bias": torch.zeros_like(head["bias"])}
    half = len(z) // 2
    y = torch.cat([torch.zeros(half, dtype=torch.long), torch.ones(half, dtype=torch.long)])
    z = torch.cat([z[:half], z[:half]])          # each z with both labels: g = 0 at θ = 0
    q = tree.flatten(C.hgp_identity(head, z, y))
    assert torch.isfinite(q).all() and q.abs().max() < 1e-12


def test_hutchinson_is_unbiased_and_error_falls_like_one_over_sqrt_s():
    head, z, y = _head_problem(3, h=6)
    exact = torch.diagonal(C.exact_head_hessian(head, z, y))
    sizes = [4, 16, 64, 256, 1024]
    errors = []
    g = torch.Generator().manual_seed(0)
    for s in sizes:
        errs = [(tree.flatten(C.hutchinson_diagonal(head, z, y, C.rademacher_probes(head, s, g))) - exact).norm()
                for _ in range(30)]
        errors.append(torch.stack(errs).pow(2).mean().sqrt())
    x = torch.log(torch.tensor(sizes, dtype=torch.float64))
    ly = torch.log(torch.stack(errors))
    slope = float(((x - x.mean()) * (ly - ly.mean())).sum() / ((x - x.mean()) ** 2).sum())
    assert -0.6 < slope < -0.4, (slope, errors)
    # Unbiased: the mean over many probes is the exact diagonal within its standard error.
    big = tree.flatten(C.hutchinson_diagonal(head, z, y, C.rademacher_probes(head, 20000, g)))
    assert (big - exact).norm() < 4 * errors[-1] * math.sqrt(1024 / 20000)


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    # r ⊙ H r = diag(H) for every Rademacher r when H is diagonal (r_i² = 1). Binary head at θ = 0 with
    # symmetric features: H = σ'(0) mean [z;1][z;1]ᵀ has zero off-diagonal blocks (mean z = 0) and, with
    # orthogonal feature columns, a diagonal feature block.
    u = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    z = torch.cat([u, -u])
    y = torch.tensor([0, 1, 1, 0])
    head = {"weight": torch.zeros(1, 2, dtype=torch.float64), "bias": torch.zeros(1, dtype=torch.float64)}
    H = C.exact_head_hessian(head, z, y)
    assert torch.count_nonzero(H - torch.diag(torch.diagonal(H))) == 0
    d = C.hutchinson_diagonal(head, z, y, C.rademacher_probes(head, 3, torch.Generator().manual_seed(1)))
    torch.testing.assert_close(tree.flatten(d), torch.diagonal(H), rtol=1e-12, atol=1e-14)


def test_proposition_4_closed_forms():
    # Eqs. 13-17 for one sample, softmax CE with a linear head a = W z + b.
    head, z, y = _head_problem(3, n=1)
    yhat = torch.softmax(z @ head["weight"].T + head["bias"], -1)[0]
    onehot = torch.nn.functional.one_hot(y, 3)[0].double()
    zz = z[0]
    g = C.head_grad(head, z, y)
    torch.testing.assert_close(g["bias"], yhat - onehot)                                  # (13)
    torch.testing.assert_close(g["weight"], torch.outer(yhat - onehot, zz))               # (14)
    H = C.exact_head_hessian(head, z, y)        # flatten order: weight (3×5 row-major), then bias (3)
    logit = torch.diag(yhat) - torch.outer(yhat, yhat)                                   # ŷ_u(δ_uv − ŷ_v)
    torch.testing.assert_close(H[15:, 15:], logit)                                        # (15)
    torch.testing.assert_close(H[:15, 15:], torch.kron(logit, zz[:, None]))               # (16)
    torch.testing.assert_close(H[:15, :15], torch.kron(logit, torch.outer(zz, zz)))       # (17)


def _pair():
    a_s = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    a_t = torch.tensor([[3.0, 0.5], [0.5, 1.5]], dtype=torch.float64)
    theta = torch.tensor([0.3, -0.2], dtype=torch.float64)

    def make(a, c):
        return lambda th: 0.5 * (th - theta) @ a @ (th - theta) + c * ((th - theta) ** 2).sum() ** 2

    # Strongly convex (μ = λ_min(A_S) = 1; the quartic is convex), shared minimiser θ*, Hessians A at θ*.
    return make(a_s, 0.3), make(a_t, 1.0), theta, a_s, a_t, 1.0


def _sublevel_sup(loss_s, loss_t, theta, delta_s, r):
    """T_Γ by a dense polar grid over Γ = {L_S − L_S* ≤ δ_S} (inside the ball of radius r)."""
    ang = torch.linspace(0, 2 * math.pi, 721, dtype=torch.float64)[:-1]
    rad = torch.linspace(0, r, 401, dtype=torch.float64)[1:]
    pts = theta + rad[:, None, None] * torch.stack([ang.cos(), ang.sin()], -1)[None]
    pts = pts.reshape(-1, 2)
    ls = torch.vmap(loss_s)(pts)
    gap = torch.vmap(loss_t)(pts) - ls
    return float(gap[ls <= delta_s].max())


def test_theorem_3_bound_with_the_proofs_radius():
    loss_s, loss_t, theta, a_s, a_t, mu = _pair()
    ratios = []
    for delta_s in (1e-1, 1e-2, 1e-3, 1e-4):
        r = theory.radius(delta_s, mu)
        bound = theory.hessian_bound(a_s, a_t, r)
        t_gamma = _sublevel_sup(loss_s, loss_t, theta, delta_s, r)
        ball = theory.transfer_measure_ball(loss_s, loss_t, theta, r, steps=100, restarts=3)
        assert t_gamma <= ball + 1e-12                          # Γ ⊂ ball
        assert t_gamma <= bound * (1 + 1e-6) + (1.0 - 0.3) * r ** 4   # ½r²‖ΔH‖ + the quartic's o(r²) term
        ratios.append(ball / bound)
    # The ball supremum is ½r²‖ΔH‖₂ + O(r⁴): the ratio tends to 1 as δ_S → 0 (tightness of the leading term).
    assert abs(ratios[-1] - 1) < 1e-3 and abs(ratios[-1] - 1) < abs(ratios[0] - 1)


def test_theorem_3_with_the_printed_delta_fails_for_small_delta_s():
    # The paper prints δ = 2δ_S/μ: ½δ²‖ΔH‖ is O(δ_S²) while T_Γ is Θ(δ_S), so the printed bound breaks.
    loss_s, loss_t, theta, a_s, a_t, mu = _pair()
    delta_s = 1e-3
    printed = theory.hessian_bound(a_s, a_t, 2 * delta_s / mu)
    t_gamma = _sublevel_sup(loss_s, loss_t, theta, delta_s, theory.radius(delta_s, mu))
    assert t_gamma > 100 * printed


def test_theory_bad_input():
    with pytest.raises(ValueError, match="delta_s > 0"):
        theory.radius(0.0, 1.0)
    with pytest.raises(ValueError, match="at least 1 probe"):
        C.rademacher_probes({"w": torch.zeros(2)}, 0, torch.Generator())
    with pytest.raises(ValueError, match="unknown HGP mode"):
        C.hessian_gradient_product(*_head_problem(1), mode="fd")
