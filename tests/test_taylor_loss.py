"""The Taylor loss family (problems/losses/taylor.py) against hand-expanded polynomials, finite
differences, the published coefficients' sign check and a training sanity check."""
import math

import pytest
import torch

from bilevel.problems.losses import (PUBLISHED, PUBLISHED_SIGN, PUBLISHED_SPECS, TaylorLoss, TaylorSpec,
                             descent_raises_true_class, initial_theta, loss_range, published_theta, taylor_loss,
                             true_class_rate)
from taylor_reference import hand_eq35, hand_range

torch.set_num_threads(1)


def hand_eq10(p, y, w):
    """Eq. 10 of the ITL paper typed out term by term."""
    a, b = p - w[0], y - w[1]
    return (w[2] * a + w[3] * a**2 + w[4] * a**3 + w[5] * a**4 + w[6] * a * b + w[7] * a * b**2
            + w[8] * a**2 * b + w[9] * a**3 * b + w[10] * a * b**3 + w[11] * a**2 * b**2)


@pytest.mark.parametrize("param,hand", [("itl", hand_eq10), ("arl", hand_eq35)])
def test_values_match_hand_expanded_polynomial(param, hand):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, generator=g, dtype=torch.float64)
    logits = torch.randn(7, 5, generator=g, dtype=torch.float64)
    targets = torch.tensor([0, 4, 2, 2, 1, 3, 0])
    p = torch.softmax(logits, -1)
    expected = 0.0
    for n in range(7):
        for c in range(5):
            expected += float(hand(p[n, c], float(targets[n] == c), w)) / 5
    expected /= 7
    got = taylor_loss(logits, targets, w, TaylorSpec(param, 4))
    assert got.item() == pytest.approx(expected, rel=1e-12, abs=1e-14)


def test_other_orders_values():
    """Order 2: ω2 a + ω3 a² + ω4 ab (pure powers, then mixed); order 3 adds a³, ab², a²b."""
    p, y = torch.tensor([0.3], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    from bilevel.problems.losses import taylor_polynomial
    w2 = torch.tensor([0.1, 0.2, 1.0, 2.0, 3.0], dtype=torch.float64)
    a, b = 0.2, 0.8
    assert taylor_polynomial(p, y, w2, TaylorSpec("itl", 2)).item() == pytest.approx(a + 2 * a**2 + 3 * a * b)
    assert taylor_polynomial(p, y, w2, TaylorSpec("arl", 2)).item() == pytest.approx(a + a**2 + 3 * a * b)
    w3 = torch.tensor([0.1, 0.2, 1, 2, 3, 4, 5, 6], dtype=torch.float64)
    assert taylor_polynomial(p, y, w3, TaylorSpec("itl", 3)).item() == pytest.approx(
        a + 2 * a**2 + 3 * a**3 + 4 * a * b + 5 * a * b**2 + 6 * a**2 * b)
    assert [TaylorSpec("itl", o).num_params for o in (2, 3, 4, 5)] == [5, 8, 12, 17]
    assert TaylorSpec("arl", 4).num_params == 12


@pytest.mark.parametrize("param", ["itl", "arl"])
def test_gradients_match_finite_differences(param):
    spec = TaylorSpec(param, 4)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, generator=g, dtype=torch.float64)
    logits = torch.randn(6, 4, generator=g, dtype=torch.float64)
    targets = torch.tensor([0, 1, 2, 3, 0, 1])
    gw, gz = torch.func.grad(lambda w_, z_: taylor_loss(z_, targets, w_, spec), argnums=(0, 1))(w, logits)
    eps = 1e-6
    for x, gx, f in ((w, gw, lambda v: taylor_loss(logits, targets, v, spec)),
                     (logits, gz, lambda v: taylor_loss(v, targets, w, spec))):
        flat = x.reshape(-1)
        fd = torch.zeros_like(flat)
        for i in range(flat.numel()):
            e = torch.zeros_like(flat)
            e[i] = eps
            fd[i] = (f((flat + e).view_as(x)) - f((flat - e).view_as(x))) / (2 * eps)
        torch.testing.assert_close(gx.reshape(-1), fd, rtol=1e-6, atol=1e-8)


def test_vmap_over_theta():
    spec = TaylorSpec("itl", 4)
    ws = torch.randn(3, 12, dtype=torch.float64)
    z, t = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    batched = torch.func.vmap(lambda w: taylor_loss(z, t, w, spec))(ws)
    torch.testing.assert_close(batched, torch.stack([taylor_loss(z, t, w, spec) for w in ws]))


def test_brier_initialisation_is_exact_brier():
    z, t = torch.randn(8, 10, dtype=torch.float64), torch.randint(0, 10, (8,))
    brier = ((torch.softmax(z, -1) - torch.nn.functional.one_hot(t, 10)) ** 2).mean(-1).mean()
    for param in ("itl", "arl"):
        spec = TaylorSpec(param, 4)
        theta = initial_theta(spec, "brier", torch.float64)
        # (p − y)² = a² − 2ab + b²: the dropped b² term is the constant mean(y²) = 1/C
        assert taylor_loss(z, t, theta, spec).item() == pytest.approx(brier.item() - 1 / 10, abs=1e-12)


@pytest.mark.parametrize("order", [2, 3, 4, 5])
@pytest.mark.parametrize("param", ["itl", "arl"])
def test_cross_entropy_initialisation_is_the_least_squares_fit(order, param):
    """The CE fit equals an independent least-squares fit on the same grid, written in another basis.

    With centre (0, 0) the family is exactly the pairs ℓ(p,0) = Σ_{i=1..β} c_i pⁱ and
    ℓ(p,1) = ℓ(p,0) + Σ_{i=1..β−1} d_i pⁱ (no a^β b term, note E3); fit ℓ(p,0) + k0 ≈ 0 and
    ℓ(p,1) + k1 ≈ −log p jointly with numpy and compare both branches.
    """
    import numpy as np
    from bilevel.problems.losses import taylor_polynomial
    spec = TaylorSpec(param, order)
    theta = initial_theta(spec, "cross_entropy", torch.float64)
    grid = np.linspace(0.02, 1.0, 200)
    zeros, ones = np.zeros_like(grid), np.ones_like(grid)
    c_cols = [np.concatenate([grid**i, grid**i]) for i in range(1, order + 1)]
    d_cols = [np.concatenate([zeros, grid**i]) for i in range(1, order)]
    k_cols = [np.concatenate([ones, zeros]), np.concatenate([zeros, ones])]
    design = np.stack(c_cols + d_cols + k_cols, axis=1)
    sol = np.linalg.lstsq(design, np.concatenate([zeros, -np.log(grid)]), rcond=None)[0]
    c, d = sol[:order], sol[order:2 * order - 1]
    p = torch.linspace(0.05, 1.0, 40, dtype=torch.float64)
    pn = p.numpy()
    branch0 = sum(c[i - 1] * pn**i for i in range(1, order + 1))
    branch1 = branch0 + sum(d[i - 1] * pn**i for i in range(1, order))
    torch.testing.assert_close(taylor_polynomial(p, torch.zeros_like(p), theta, spec), torch.tensor(branch0),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(taylor_polynomial(p, torch.ones_like(p), theta, spec), torch.tensor(branch1),
                               rtol=1e-6, atol=1e-6)
    assert descent_raises_true_class(theta, spec)


def test_scale_option_scales_loss():
    spec = TaylorSpec("itl", 4)
    z, t = torch.randn(4, 10, dtype=torch.float64), torch.randint(0, 10, (4,))
    base = taylor_loss(z, t, initial_theta(spec, dtype=torch.float64), spec)
    scaled = taylor_loss(z, t, initial_theta(spec, dtype=torch.float64, scale=10.0), spec)
    assert scaled.item() == pytest.approx(10 * base.item())


def test_sign_check_on_cross_entropy_like_and_negated():
    spec = TaylorSpec("itl", 4)
    theta = initial_theta(spec, "brier")
    assert true_class_rate(theta, spec) == 1.0
    flipped = theta.clone()
    flipped[2:] *= -1
    assert true_class_rate(flipped, spec) == 0.0
    assert not descent_raises_true_class(flipped, spec)


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_losses_pass_sign_check_under_adopted_convention(name):
    spec = PUBLISHED_SPECS[name]
    raw = published_theta(name, as_printed=True, dtype=torch.float64)
    assert raw[0].item() == {"itl": -2.0193, "arl_ar_a40": 0.4397, "arl_dr_a40": 1.3754, "arl_ar_s80": 0.7043,
                             "arl_dr_s80": 2.7187}[name]
    assert descent_raises_true_class(published_theta(name), spec)
    # ... and the other orientation fails it: the convention is not arbitrary
    other = raw.clone()
    other[2:] *= -PUBLISHED_SIGN[name]
    assert not descent_raises_true_class(other, spec)


def _train_softmax_regression(loss_fn, lr, steps=200):
    g = torch.Generator().manual_seed(0)
    C, D, N = 5, 10, 500
    means = 2 * torch.randn(C, D, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    x = means[y] + torch.randn(N, D, generator=g)
    w = torch.zeros(D, C, requires_grad=True)
    opt = torch.optim.SGD([w], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(x @ w, y).backward()
        opt.step()
    return ((x @ w).argmax(1) == y).float().mean().item()


def test_published_itl_trains_and_printed_itl_does_not():
    spec = TaylorSpec("itl", 4)
    assert _train_softmax_regression(TaylorLoss(published_theta("itl"), spec), lr=0.5) > 0.9
    assert _train_softmax_regression(TaylorLoss(published_theta("itl", as_printed=True), spec), lr=0.5) < 0.2


def test_arl_normalisation_maps_range_to_eta():
    """f̂ = η (f − f_min)/(f_max − f_min) (eq. A.2) with f_min, f_max and f computed by hand in plain floats."""
    eta = 2.0
    spec = TaylorSpec("arl", 4, normalise=eta)
    theta = published_theta("arl_dr_s80", dtype=torch.float64)
    w = theta.tolist()
    f_min, f_max = hand_range(w)
    assert f_max - f_min > 1e-3 * max(abs(f_min), abs(f_max))  # a non-degenerate range to divide by
    lib_min, lib_max = loss_range(theta, TaylorSpec("arl", 4), 10)
    assert float(lib_min) == pytest.approx(f_min, rel=1e-12, abs=1e-15)
    assert float(lib_max) == pytest.approx(f_max, rel=1e-12, abs=1e-15)
    # a confident correct, a confident wrong and an uncertain prediction on label 0
    z = torch.tensor([[30.0] + [0.0] * 9, [0.0, 30.0] + [0.0] * 8,
                      [0.5, -0.3, 0.2, 0.0, 1.0, -1.0, 0.3, 0.1, -0.2, 0.4]], dtype=torch.float64)
    for row in z:
        p = torch.softmax(row, -1).tolist()
        raw = (hand_eq35(p[0], 1.0, w) + sum(hand_eq35(q, 0.0, w) for q in p[1:])) / 10
        got = taylor_loss(row[None], torch.tensor([0]), theta, spec).item()
        assert got == pytest.approx(eta * (raw - f_min) / (f_max - f_min), rel=1e-10, abs=1e-12)
    # one-hot predictions lie on the grid (t = 1 and t = 0 with the rest on one class): their values are in [0, η]
    for row in z[:2]:
        assert -1e-9 <= taylor_loss(row[None], torch.tensor([0]), theta, spec).item() <= eta + 1e-9


def test_save_load_roundtrip(tmp_path):
    spec = TaylorSpec("arl", 3, normalise=1.5)
    loss = TaylorLoss(torch.randn(spec.num_params), spec)
    loss.save(tmp_path / "loss.pt")
    again = TaylorLoss.load(tmp_path / "loss.pt")
    assert again.spec == spec
    torch.testing.assert_close(again.theta, loss.theta)
    z, t = torch.randn(3, 4), torch.tensor([0, 1, 3])
    assert again(z, t).item() == pytest.approx(loss(z, t).item())


def test_bad_input_raises_clear_errors(tmp_path):
    spec = TaylorSpec("itl", 4)
    with pytest.raises(ValueError, match="12 coefficients"):
        taylor_loss(torch.randn(2, 3), torch.tensor([0, 1]), torch.zeros(11), spec)
    with pytest.raises(ValueError, match="integer class indices"):
        taylor_loss(torch.randn(2, 3), torch.tensor([0.0, 1.0]), torch.zeros(12), spec)
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        taylor_loss(torch.randn(3), torch.tensor([0, 1, 2]), torch.zeros(12), spec)
    with pytest.raises(ValueError, match="order must be"):
        TaylorSpec("itl", 6)
    with pytest.raises(ValueError, match="parameterisation"):
        TaylorSpec("taylorglo", 4)
    with pytest.raises(KeyError, match="valid"):
        published_theta("focal")
    with pytest.raises(ValueError, match="fit must be"):
        initial_theta(spec, "mse")
    torch.save({"x": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a saved TaylorLoss"):
        TaylorLoss.load(tmp_path / "bad.pt")
    assert math.isfinite(taylor_loss(torch.randn(2, 3), torch.tensor([0, 2]), torch.zeros(12), spec).item())
