"""The loss families (problems/losses/) held to exact values at non-default options and at the edges of their
input checks: every robust loss with each option changed, against its formula in plain Python floats; the
Taylor family's monomial order, factorials, range grid and coefficient tables; the loss network's seeded
initialisation re-drawn by hand.

Written to kill the mutants that ``mutation/run.py losses`` found alive (docs/mutation.md).
"""
from __future__ import annotations

import math

import pytest
import torch

from bilevel.problems.losses import robust, taylor
from bilevel.problems.losses.loss_network import (init_loss_network, learned_loss, loss_network, smooth_leaky_relu,
                                                  smooth_leaky_relu_derivative)
from bilevel.problems.losses.taylor import TaylorLoss, TaylorSpec

torch.set_num_threads(1)
F64 = torch.float64
LOGITS = torch.tensor([[0.3, -1.2, 2.0], [1.5, 0.2, -0.4]], dtype=F64)
TARGETS = torch.tensor([2, 1])


def softmax_rows(logits: torch.Tensor) -> list[list[float]]:
    out = []
    for row in logits.tolist():
        e = [math.exp(v) for v in row]
        out.append([v / sum(e) for v in e])
    return out


def hand_mean(per_example) -> float:
    """The batch mean of ``per_example(p, y, onehot)`` over LOGITS / TARGETS, in plain floats."""
    values = []
    for p, y in zip(softmax_rows(LOGITS), TARGETS.tolist()):
        onehot = [1.0 if k == y else 0.0 for k in range(len(p))]
        values.append(per_example(p, y, onehot))
    return sum(values) / len(values)


def huber_scalar(x: float, delta: float) -> float:
    return 0.5 * x * x if abs(x) <= delta else delta * (abs(x) - 0.5 * delta)


# (spec, formula per example) with every option away from its default
ROBUST_CASES = [
    ("gce:q=0.3", lambda p, y, t: (1 - p[y] ** 0.3) / 0.3),
    ("sce:alpha=0.5,beta=2,log_zero=-2", lambda p, y, t: 0.5 * -math.log(p[y]) + 2 * 2 * (1 - p[y])),
    ("label_smoothing:epsilon=0.3", lambda p, y, t: -sum((0.7 * t[k] + 0.1) * math.log(p[k]) for k in range(3))),
    ("bootstrap:beta=0.6", lambda p, y, t: -sum((0.6 * t[k] + 0.4 * p[k]) * math.log(p[k]) for k in range(3))),
    ("nce_mae:alpha=2,beta=0.5", lambda p, y, t: 2 * math.log(p[y]) / sum(math.log(q) for q in p) + 0.5 * (1 - p[y])),
    ("nfl_mae:alpha=3,beta=0.25,gamma=2",
     lambda p, y, t: 3 * (1 - p[y]) ** 2 * math.log(p[y]) / sum((1 - q) ** 2 * math.log(q) for q in p)
     + 0.25 * (1 - p[y])),
    ("huber:delta=0.1", lambda p, y, t: sum(huber_scalar(p[k] - t[k], 0.1) for k in range(3))),
    ("mae", lambda p, y, t: 2 * (1 - p[y])),
    ("ce", lambda p, y, t: -math.log(p[y])),
]


@pytest.mark.parametrize("spec, formula", ROBUST_CASES, ids=[c[0] for c in ROBUST_CASES])
def test_robust_losses_at_non_default_options_match_their_formula(spec, formula):
    loss = robust.make_loss(spec)
    assert float(loss(LOGITS, TARGETS)) == pytest.approx(hand_mean(formula), rel=1e-12, abs=1e-15)
    # int32 labels are accepted and give the same value
    assert float(loss(LOGITS, TARGETS.int())) == pytest.approx(hand_mean(formula), rel=1e-12, abs=1e-15)


def test_make_loss_parsing():
    assert robust.make_loss("gce") is robust.gce  # no options: the function itself
    with_spaces = robust.make_loss("sce: alpha = 0.5 ,beta=2,")  # keys are stripped, empty items skipped
    assert with_spaces.keywords == {"alpha": 0.5, "beta": 2.0}
    with pytest.raises(KeyError) as info:
        robust.make_loss("focal:gamma=2")
    assert "unknown robust loss 'focal'; valid: ce, mae, gce, sce, label_smoothing" in str(info.value)


@pytest.mark.parametrize("q, ok", [(0.0, False), (-0.5, False), (1e-9, True), (1.0, True), (1.0 + 1e-12, False)])
def test_gce_q_range_is_half_open(q, ok):
    if ok:
        expected = hand_mean(lambda p, y, t: (1 - p[y] ** q) / q)
        assert float(robust.gce(LOGITS, TARGETS, q=q)) == pytest.approx(expected, rel=1e-6)
    else:
        with pytest.raises(ValueError, match=r"gce: q must be in \(0, 1\]"):
            robust.gce(LOGITS, TARGETS, q=q)


@pytest.mark.parametrize("name", sorted(robust.LOSSES))
def test_robust_input_checks(name):
    loss = robust.LOSSES[name]
    name = loss.__name__  # "ce" is cross_entropy
    with pytest.raises(ValueError, match=rf"{name}: logits must be \(batch, classes\), got shape \(6,\)"):
        loss(LOGITS.reshape(-1), TARGETS)
    with pytest.raises(ValueError, match=rf"{name}: targets must be a 1-D tensor of 2 int labels, got shape \(3,\)"):
        loss(LOGITS, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=rf"{name}: targets must be a 1-D tensor of 2 int labels, got shape \(2, 1\)"):
        loss(LOGITS, TARGETS[:, None])
    with pytest.raises(TypeError, match=rf"{name}: targets must be int64 class indices, got torch.int16"):
        loss(LOGITS, TARGETS.to(torch.int16))


def test_huber_default_delta_is_half_the_squared_distance():
    """|p_k − onehot_k| ≤ 1, so δ = 1 gives ½‖p − onehot‖² (the documented default)."""
    expected = hand_mean(lambda p, y, t: sum(0.5 * (p[k] - t[k]) ** 2 for k in range(3)))
    assert float(robust.huber(LOGITS, TARGETS)) == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------- Taylor
def test_spec_validation_bounds():
    for order in (2, 5):
        assert TaylorSpec("itl", order).order == order
    for order in (1, 6, 4.0, "4"):
        with pytest.raises(ValueError, match=r"TaylorSpec: order must be an int in 2\.\.5"):
            TaylorSpec("itl", order)
    for eta in (0.0, -1.0):
        with pytest.raises(ValueError, match=r"TaylorSpec: normalise \(η of eq\. A\.2\) must be positive or None"):
            TaylorSpec("arl", 4, normalise=eta)
    assert TaylorSpec("arl", 4, normalise=1e-9).normalise == 1e-9
    with pytest.raises(ValueError, match="TaylorSpec: parameterisation must be 'itl' or 'arl'"):
        TaylorSpec("ITL", 4)


def test_monomial_order_and_multipliers():
    assert TaylorSpec("itl", 2).monomials == ((1, 0), (2, 0), (1, 1))
    assert TaylorSpec("itl", 5).monomials == ((1, 0), (2, 0), (3, 0), (4, 0), (5, 0), (1, 1), (1, 2), (2, 1),
                                              (1, 3), (2, 2), (3, 1), (1, 4), (2, 3), (3, 2), (4, 1))
    assert TaylorSpec("itl", 4).monomials == ((1, 0), (2, 0), (3, 0), (4, 0), (1, 1), (1, 2), (2, 1), (3, 1),
                                              (1, 3), (2, 2))
    assert TaylorSpec("itl", 5).multipliers == (1.0,) * 15
    assert TaylorSpec("arl", 4).multipliers == pytest.approx((1, 1 / 2, 1 / 6, 1 / 24, 1, 1 / 2, 1 / 2, 1 / 6, 1 / 6,
                                                              1 / 4), rel=1e-15)
    assert TaylorSpec("arl", 5).multipliers[4] == pytest.approx(1 / 120, rel=1e-15)  # a⁵ / 5!
    assert TaylorSpec("arl", 5).multipliers[-2] == pytest.approx(1 / 12, rel=1e-15)  # a³b² / (3! 2!)


def test_polynomial_at_an_off_centre_point_of_order_five():
    """ℓ = Σ m_k ω_{k+2} a^i b^j with a = p − ω0, b = y − ω1, each monomial checked alone."""
    spec = TaylorSpec("arl", 5)
    p, y = torch.tensor([0.7], dtype=F64), torch.tensor([0.0], dtype=F64)
    a, b = 0.7 - 0.2, 0.0 - (-0.5)
    for k, (i, j) in enumerate(spec.monomials):
        theta = torch.zeros(17, dtype=F64)
        theta[0], theta[1], theta[k + 2] = 0.2, -0.5, 3.0
        expected = 3.0 * a ** i * b ** j / (math.factorial(i) * math.factorial(j))
        assert taylor.taylor_polynomial(p, y, theta, spec).item() == pytest.approx(expected, rel=1e-13)


@pytest.mark.parametrize("classes", [1, 2, 3, 4])
def test_range_grid_points(classes):
    probs, onehot = taylor._range_points(classes)
    assert probs.shape == onehot.shape == (303, classes) and probs.dtype == F64
    assert torch.equal(onehot[:, 0], torch.ones(303, dtype=F64)) and not onehot[:, 1:].any()
    t = 0.25  # level 25 of 101: rows 75, 76, 77
    rest = 1 - t
    uniform = [t] + [rest / max(classes - 1, 1)] * (classes - 1)
    one = [t] + ([rest] + [0.0] * (classes - 2) if classes > 1 else [])
    two = [t] + ([rest / 2, rest / 2] + [0.0] * (classes - 3) if classes > 2 else [rest] if classes == 2 else [])
    assert probs[75].tolist() == pytest.approx(uniform[:classes], abs=1e-16)
    assert probs[76].tolist() == pytest.approx(one[:classes], abs=1e-16)
    assert probs[77].tolist() == pytest.approx(two[:classes], abs=1e-16)
    assert probs[0, 0] == 0.0 and probs[-1, 0] == 1.0


def test_loss_range_of_a_pure_square_is_closed_form():
    """ITL ω3 a² with centre 0: per-sample (1/C) Σ p_i²; with C = 2 the grid spans Σp² ∈ [½, 1]."""
    theta = torch.zeros(12, dtype=F64)
    theta[3] = 1.0
    f_min, f_max = taylor.loss_range(theta, TaylorSpec("itl", 4), 2)
    assert float(f_min) == pytest.approx(0.25, abs=1e-15) and float(f_max) == pytest.approx(0.5, abs=1e-15)


def test_normalised_loss_is_the_affine_rescaling_of_the_raw_loss():
    theta = torch.zeros(12, dtype=F64)
    theta[3] = 1.0
    z = torch.tensor([[0.4, -0.1], [2.0, 0.0]], dtype=F64)
    t = torch.tensor([0, 1])
    raw = float(taylor.taylor_loss(z, t, theta, TaylorSpec("itl", 4)))
    scaled = float(taylor.taylor_loss(z, t, theta, TaylorSpec("itl", 4, normalise=3.0)))
    assert scaled == pytest.approx(3.0 * (raw - 0.25) / 0.25, rel=1e-13)


def test_taylor_loss_input_checks():
    spec, theta = TaylorSpec("itl", 4), torch.zeros(12)
    with pytest.raises(ValueError, match=r"taylor_loss: targets must be \(N,\) matching logits' N=2, got shape \(3,\)"):
        taylor.taylor_loss(torch.zeros(2, 3), torch.tensor([0, 1, 2]), theta, spec)
    with pytest.raises(ValueError, match=r"targets must be \(N,\) matching logits' N=2, got shape \(2, 1\)"):
        taylor.taylor_loss(torch.zeros(2, 3), torch.tensor([[0], [1]]), theta, spec)
    with pytest.raises(TypeError, match="taylor loss: spec must be a TaylorSpec, got str"):
        taylor.taylor_polynomial(torch.zeros(2), torch.zeros(2), theta, "itl")
    with pytest.raises(ValueError, match=r"theta must be a 1-D tensor of 12 coefficients .* got shape \(1, 12\)"):
        taylor.taylor_polynomial(torch.zeros(2), torch.zeros(2), theta[None], spec)


@pytest.mark.parametrize("param, a2, ab", [("itl", 1.0, -2.0), ("arl", 2.0, -2.0)])
def test_brier_coefficients_and_scale(param, a2, ab):
    spec = TaylorSpec(param, 4)
    expected = torch.zeros(12, dtype=F64)
    expected[3], expected[6] = a2, ab  # ω3 (a²) and ω6 (ab)
    assert torch.equal(taylor.initial_theta(spec, "brier", F64), expected)
    assert torch.equal(taylor.initial_theta(spec, "brier", F64, scale=3.0), 3 * expected)
    assert taylor.initial_theta(spec, "brier").dtype == torch.float32


def test_cross_entropy_fit_scale_and_centre():
    spec = TaylorSpec("itl", 3)
    base = taylor.initial_theta(spec, dtype=F64)
    assert base[:2].tolist() == [0.0, 0.0] and base.dtype == F64
    assert torch.allclose(taylor.initial_theta(spec, dtype=F64, scale=2.5), 2.5 * base, rtol=1e-15, atol=0)


@pytest.mark.parametrize("name", taylor.PUBLISHED)
def test_published_tables(name):
    printed = torch.tensor(taylor._PRINTED[name], dtype=F64)
    assert torch.equal(taylor.published_theta(name, as_printed=True, dtype=F64), printed)
    oriented = taylor.published_theta(name, dtype=F64)
    assert torch.equal(oriented[:2], printed[:2])
    assert torch.equal(oriented[2:], taylor.PUBLISHED_SIGN[name] * printed[2:])
    assert taylor.published_theta(name).dtype == torch.float32


def test_the_sign_check_threshold_is_inclusive():
    """An ARL loss with a soft minimum inside (0, 1): its rate r is below 1, and min_fraction = r still passes."""
    spec, theta = taylor.PUBLISHED_SPECS["arl_ar_a40"], taylor.published_theta("arl_ar_a40")
    rate = taylor.true_class_rate(theta, spec, num_points=500)
    assert 0.5 < rate < 1.0
    assert taylor.descent_raises_true_class(theta, spec, num_points=500, min_fraction=rate)
    assert not taylor.descent_raises_true_class(theta, spec, num_points=500, min_fraction=rate + 1e-9)
    # only the uniform prediction: CE-like (Brier) 1, negated 0
    brier = taylor.initial_theta(TaylorSpec("itl", 4), "brier")
    assert taylor.true_class_rate(brier, TaylorSpec("itl", 4), num_points=0) == 1.0
    assert taylor.true_class_rate(-brier, TaylorSpec("itl", 4), num_points=0) == 0.0


def test_taylor_loss_module_save_load_and_dtype(tmp_path):
    spec = TaylorSpec("arl", 2, normalise=None)
    theta = torch.tensor([0.1, 0.2, 1.0, 2.0, 3.0])
    module = TaylorLoss(theta, spec)
    theta[2] = 100.0  # the module keeps its own copy
    assert module.theta[2].item() == 1.0
    module.save(tmp_path / "l.pt")
    saved = torch.load(tmp_path / "l.pt", weights_only=True)
    assert set(saved) == {"theta", "parameterisation", "order", "normalise"}
    assert (saved["parameterisation"], saved["order"], saved["normalise"]) == ("arl", 2, None)
    again = TaylorLoss.load(tmp_path / "l.pt")
    assert again.spec == spec and torch.equal(again.theta, module.theta)
    z = torch.tensor([[0.3, -0.2]], dtype=F64)
    out = again(z, torch.tensor([1]))
    expected = taylor.taylor_loss(z, torch.tensor([1]), module.theta.to(F64), spec)
    assert out.dtype == F64 and out.item() == pytest.approx(expected.item(), rel=1e-15)
    assert again.extra_repr() == f"spec={spec}"
    torch.save({"theta": theta, "parameterisation": "itl"}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match=r"not a saved TaylorLoss \(missing \['order'\]\)"):
        TaylorLoss.load(tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="theta must be a 1-D tensor of 5 coefficients"):
        TaylorLoss(torch.zeros(4), spec)


# ---------------------------------------------------------------------------------------------- loss network
def test_default_activation_constants():
    x = torch.tensor([-0.3, 0.0, 0.8], dtype=F64)
    expected = [(1 / 10) * math.log(math.exp(10 * v) + 1) * 0.99 + 0.01 * v for v in x.tolist()]
    d_expected = [(math.exp(10 * v) + 0.01) / (math.exp(10 * v) + 1) for v in x.tolist()]
    assert smooth_leaky_relu(x).tolist() == pytest.approx(expected, abs=1e-15)
    assert smooth_leaky_relu_derivative(x).tolist() == pytest.approx(d_expected, abs=1e-15)


@pytest.mark.parametrize("bias", [False, True])
def test_initialisation_is_the_seeded_uniform_draw(bias):
    """Redrawn here: per layer w (then b) ~ U(−1/√fan_in, 1/√fan_in) from one generator, in float64."""
    params = init_loss_network(hidden=3, layers=2, bias=bias, seed=4, dtype=F64)
    g = torch.Generator().manual_seed(4)
    expected = {}
    for i, (fan_in, fan_out) in enumerate([(2, 3), (3, 3), (3, 1)]):
        expected[f"w{i}"] = (torch.rand(fan_out, fan_in, generator=g, dtype=F64) * 2 - 1) / math.sqrt(fan_in)
        if bias:
            expected[f"b{i}"] = (torch.rand(fan_out, generator=g, dtype=F64) * 2 - 1) / math.sqrt(fan_in)
    assert list(params) == list(expected)
    for k in expected:
        assert torch.allclose(params[k], expected[k], rtol=1e-15, atol=0)
    assert init_loss_network(hidden=3, seed=4)["w0"].dtype == torch.float32
    assert [tuple(v.shape) for v in init_loss_network().values()] == [(40, 2), (40, 40), (1, 40)]


@pytest.mark.parametrize("hidden, layers", [(0, 2), (3, 0)])
def test_initialisation_refuses_empty_layers(hidden, layers):
    with pytest.raises(ValueError, match=f"hidden >= 1 and layers >= 1, got hidden={hidden}, layers={layers}"):
        init_loss_network(hidden=hidden, layers=layers)
    assert len(init_loss_network(hidden=1, layers=1)) == 2


def test_network_layers_must_be_complete():
    w = torch.ones(1, 2, dtype=F64)
    two = {"w0": torch.ones(2, 2, dtype=F64), "w1": torch.ones(1, 2, dtype=F64)}
    x = torch.tensor([0.5], dtype=F64)
    # 2 → 2 → 1 with unit weights: h = slrelu(y + p) twice, summed
    s = 0.1 * math.log(math.exp(10 * 1.5) + 1) * 0.99 + 0.01 * 1.5
    assert loss_network(two, torch.ones(1, dtype=F64), x).item() == pytest.approx(2 * s, rel=1e-14)
    for phi in ({"w0": w}, {"w0": w, "w2": w}, {"w1": w, "w2": w}):
        with pytest.raises(KeyError, match="loss network params must hold w0..w{L}"):
            loss_network(phi, x, x)


def test_network_input_dtype_and_shape():
    phi = init_loss_network(hidden=4, seed=2, dtype=F64)
    p = torch.tensor([0.2, 0.9], dtype=F64)
    ints = loss_network(phi, torch.tensor([0, 1]), p)
    floats = loss_network(phi, torch.tensor([0.0, 1.0], dtype=F64), p)
    assert ints.dtype == F64 and torch.equal(ints, floats)
    with pytest.raises(ValueError, match=r"loss_network: target shape \(3,\) != prediction shape \(2,\)"):
        loss_network(phi, torch.zeros(3, dtype=F64), p)


def test_learned_loss_accepts_int32_labels_and_reshapes_regression_targets():
    phi = init_loss_network(hidden=4, seed=2, dtype=F64)
    z = torch.tensor([[0.1, 0.5, -0.3], [1.0, 0.0, 0.2]], dtype=F64)
    labels = torch.tensor([2, 0])
    assert learned_loss(phi, z, labels.int()).item() == learned_loss(phi, z, labels).item()
    pred = torch.tensor([0.4, -0.2], dtype=F64)
    column = torch.tensor([[1.0], [0.5]], dtype=F64)
    expected = loss_network(phi, column.reshape(2), pred).mean()
    assert learned_loss(phi, pred, column, task="regression").item() == pytest.approx(expected.item(), rel=1e-15)
    with pytest.raises(ValueError, match="task='classification'.* int class labels of shape \\(N,\\); got torch.int64"):
        learned_loss(phi, z, labels[:, None])


# ---------------------------------------------------------------------------------------------- second round
# Written against the survivors of ``mutation/run.py losses --rerun-survivors`` with the tests above.
ABSENT_LAST_CLASS = torch.tensor([0, 1])  # no sample of class 2: the one-hot width must come from the logits


@pytest.mark.parametrize("spec, formula", ROBUST_CASES + [
    ("bootstrap", lambda p, y, t: -sum((0.95 * t[k] + 0.05 * p[k]) * math.log(p[k]) for k in range(3))),
    ("label_smoothing", lambda p, y, t: -sum((0.9 * t[k] + 0.1 / 3) * math.log(p[k]) for k in range(3))),
    ("huber", lambda p, y, t: sum(0.5 * (p[k] - t[k]) ** 2 for k in range(3))),
], ids=[c[0] for c in ROBUST_CASES] + ["bootstrap", "label_smoothing", "huber"])
def test_robust_losses_when_the_last_class_has_no_sample(spec, formula):
    """The one-hot targets have C = logits.shape[1] columns even when no label in the batch equals C − 1."""
    values = []
    for p, y in zip(softmax_rows(LOGITS), ABSENT_LAST_CLASS.tolist()):
        values.append(formula(p, y, [1.0 if k == y else 0.0 for k in range(3)]))
    expected = sum(values) / len(values)
    assert float(robust.make_loss(spec)(LOGITS, ABSENT_LAST_CLASS)) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_make_loss_refuses_a_value_with_a_second_equals_sign_at_once():
    """``"gce:q=0.5=1"``: the key is what precedes the FIRST "=", so the value "0.5=1" is refused when the loss is
    made, not later inside a training step (a key "q=0.5" would only fail when the loss is called)."""
    with pytest.raises(ValueError, match=r"robust loss 'gce': option q='0.5=1' is not a number; give a float"):
        robust.make_loss("gce:q=0.5=1")


@pytest.mark.parametrize("spec, message", [
    ("gce:q=abc", r"robust loss 'gce': option q='abc' is not a number; give a float, e.g. gce:q=0.5"),
    ("gce:qq=0.5", r"robust loss 'gce' has no option 'qq'; valid: q \(e.g. gce:q=...\)"),
    ("sce:gamma=1", r"robust loss 'sce' has no option 'gamma'; valid: alpha, beta, log_zero"),
    ("mae:q=1", r"robust loss 'mae' has no option 'q'; it takes none: use 'mae'"),
])
def test_make_loss_names_a_bad_option_and_the_valid_ones_before_any_call(spec, message):
    with pytest.raises(ValueError, match=message):
        robust.make_loss(spec)


def test_make_loss_options_reach_the_loss():
    """``gce:q=0.5`` is (1 − p_y^0.5)/0.5 averaged, by hand from the softmax rows."""
    expected = sum((1 - p[y] ** 0.5) / 0.5 for p, y in zip(softmax_rows(LOGITS), ABSENT_LAST_CLASS.tolist()))
    value = float(robust.make_loss("gce:q=0.5")(LOGITS, ABSENT_LAST_CLASS))
    assert value == pytest.approx(expected / len(ABSENT_LAST_CLASS), rel=1e-12)


def test_published_theta_lists_every_valid_name():
    with pytest.raises(KeyError) as info:
        taylor.published_theta("focal")
    assert "published_theta: unknown name 'focal'; valid: itl, arl_ar_a40, arl_dr_a40, arl_ar_s80, arl_dr_s80" in str(
        info.value)


def test_float_targets_message_is_exactly_the_problem_and_the_fix():
    with pytest.raises(ValueError) as info:
        taylor.taylor_loss(torch.zeros(2, 3), torch.tensor([0.0, 1.0]), torch.zeros(12), TaylorSpec("itl", 4))
    assert str(info.value) == "taylor_loss: targets must be integer class indices (use .long()), got floats"


# ------------------------------------------------------------------------- Taylor: dtypes of mixed-precision inputs
Z3 = torch.tensor([[0.3, -1.2, 2.0], [1.5, 0.2, -0.4], [0.0, 0.7, -0.1]], dtype=F64)
Y3 = torch.tensor([2, 0, 1])


def test_float32_coefficients_are_used_exactly_by_float64_logits():
    """ITL multipliers are 1, so float32 ω (each exactly a float64 number) give the float64-ω loss to the last bit:
    the one-hot labels and b = y − ω1 are formed in the logits' float64, not in ω's float32."""
    spec, theta = TaylorSpec("itl", 4), taylor.published_theta("itl")  # float32
    got = taylor.taylor_loss(Z3, Y3, theta, spec)
    expected = taylor.taylor_loss(Z3, Y3, theta.to(F64), spec)
    assert got.dtype == F64 and got.item() == pytest.approx(expected.item(), rel=1e-15, abs=0)


def test_float64_coefficients_keep_float32_logits_in_float32():
    spec, theta = TaylorSpec("itl", 4), taylor.published_theta("itl", dtype=F64)
    got = taylor.taylor_loss(Z3.float(), Y3, theta, spec)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(taylor.taylor_loss(Z3, Y3, theta, spec).item(), rel=1e-5)


def test_loss_range_and_the_normalised_loss_follow_the_coefficients_dtype():
    """f_min / f_max are computed on the grid cast to θ's dtype; the η-rescaled float32 loss stays float32 and
    agrees with the float64 computation to float32 precision."""
    spec = TaylorSpec("arl", 4, normalise=2.0)
    theta = taylor.published_theta("arl_dr_s80")  # float32
    f_min, f_max = taylor.loss_range(theta, spec, 3)
    f_min64, f_max64 = taylor.loss_range(theta.to(F64), spec, 3)
    assert f_min.dtype == f_max.dtype == torch.float32
    assert float(f_min) == pytest.approx(float(f_min64), rel=1e-5) and float(f_max) == pytest.approx(float(f_max64), rel=1e-5)
    loss = taylor.taylor_loss(Z3.float(), Y3, theta, spec)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(taylor.taylor_loss(Z3, Y3, theta.to(F64), spec).item(), rel=1e-4)


def test_taylor_loss_module_casts_its_coefficients_to_the_logits_dtype():
    """A float32 buffer evaluated on float64 logits gives exactly the float64-ω loss (ARL's factorial multipliers
    1/6, 1/24 ... are applied in float64, not rounded to float32)."""
    spec = TaylorSpec("arl", 4)
    module = TaylorLoss(taylor.published_theta("arl_ar_a40"), spec)
    assert module.theta.dtype == torch.float32
    expected = taylor.taylor_loss(Z3, Y3, module.theta.to(F64), spec)
    assert module(Z3, Y3).item() == pytest.approx(expected.item(), rel=1e-15, abs=0)


class _NotATensor:
    """An arbitrary picklable object: a file holding one is not a saved TaylorLoss and must not be unpickled."""


def test_taylor_loss_load_never_unpickles_arbitrary_objects(tmp_path, monkeypatch):
    """``weights_only=True`` is passed explicitly: it holds even where torch's default is not weights-only (torch
    < 2.6, or TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, which overrides only a call that leaves the argument unset)."""
    import pickle
    path = tmp_path / "evil.pt"
    torch.save({"theta": torch.zeros(5), "parameterisation": "itl", "order": 2, "normalise": None,
                "payload": _NotATensor()}, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        TaylorLoss.load(path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        TaylorLoss.load(path)


# ------------------------------------------------------------------------- Taylor: the initialisations
def test_cross_entropy_fit_is_the_minimum_norm_least_squares_solution():
    """ARL order 4: the design matrix written out here with exact factorials, solved by SVD-based minimum-norm
    least squares (gelsd), independently of the library's pinv. The fit is ill-conditioned (ab, ab², ab³ coincide
    on the data), so multipliers rounded to float32 move it by ~6e-6; the bound 1e-8 is 100× the float64 noise."""
    spec = TaylorSpec("arl", 4)
    got = taylor.initial_theta(spec, dtype=F64)
    rows, target = [], []
    for y in (0.0, 1.0):
        for p in torch.linspace(0.02, 1.0, 200, dtype=F64).tolist():
            rows.append([p ** i * y ** j / (math.factorial(i) * math.factorial(j)) for i, j in spec.monomials]
                        + [float(y == 0.0), float(y == 1.0)])
            target.append(-math.log(p) if y == 1.0 else 0.0)
    A, t = torch.tensor(rows, dtype=F64), torch.tensor(target, dtype=F64)[:, None]
    expected = torch.linalg.lstsq(A, t, driver="gelsd").solution[:-2, 0]
    assert got[:2].tolist() == [0.0, 0.0]
    assert torch.allclose(got[2:], expected, rtol=0, atol=1e-8)
    assert taylor.initial_theta(spec).dtype == torch.float32  # the default dtype of the cross-entropy fit
    assert torch.equal(taylor.initial_theta(spec), got.float())


# ------------------------------------------------------------------------- Taylor: the sign check
# ℓ = −ab + 2a²b (ITL, centre 0): at the uniform prediction descent raises p_t iff ∂ℓ/∂a(1/C, 1) < ∂ℓ/∂a(1/C, 0),
# i.e. −1 + 4/C < 0: yes for C = 10, no for C = 3; at random predictions it holds at some points only.
A2B = torch.zeros(12, dtype=F64)
A2B[6], A2B[8] = -1.0, 2.0
ITL4 = TaylorSpec("itl", 4)


def hand_rate(theta: torch.Tensor, spec: TaylorSpec, num_classes: int, num_points: int, seed: int) -> float:
    """The documented rate, by hand: the uniform prediction plus ``num_points`` Dirichlet(1) draws (normalised
    −log U, U ~ U(0, 1) in float64 from ``manual_seed(seed)``); at each, with ∂L/∂p_i = ℓ_a(p_i, y_i)/C,
    ∇_z L = (diag p − p pᵀ) ∂L/∂p and ∇_z p_t = p_t (e_t − p); counted where −∇_z p_t · ∇_z L > 0 (t = 0)."""
    gen = torch.Generator().manual_seed(seed)
    expo = -torch.rand(num_points, num_classes, generator=gen, dtype=F64).log()
    points = [[1.0 / num_classes] * num_classes] + (expo / expo.sum(-1, keepdim=True)).tolist()
    w = theta.to(F64).tolist()
    terms = list(zip(spec.monomials, spec.multipliers, w[2:]))
    rises = 0
    for p in points:
        dl = [sum(m * c * i * (pk - w[0]) ** (i - 1) * ((k == 0) - w[1]) ** j for (i, j), m, c in terms) / num_classes
              for k, pk in enumerate(p)]
        mean = sum(pk * g for pk, g in zip(p, dl))
        grad_loss = [pk * (g - mean) for pk, g in zip(p, dl)]
        grad_pt = [p[0] * ((k == 0) - pk) for k, pk in enumerate(p)]
        rises += -sum(a * b for a, b in zip(grad_pt, grad_loss)) > 0
    return rises / len(points)


@pytest.mark.parametrize("classes, points, seed", [(5, 400, 0), (3, 300, 2)])
def test_true_class_rate_counts_the_documented_points(classes, points, seed):
    rate = taylor.true_class_rate(A2B, ITL4, classes, num_points=points, seed=seed)
    assert 0.3 < rate < 0.9  # strictly between: a different point set would change the count
    assert rate == pytest.approx(hand_rate(A2B, ITL4, classes, points, seed), abs=1e-15)


def test_true_class_rate_defaults_are_4000_points_of_10_classes_seed_0():
    rate = taylor.true_class_rate(A2B, ITL4)
    assert rate == pytest.approx(hand_rate(A2B, ITL4, 10, 4000, 0), abs=1e-15)
    assert rate * 4001 == pytest.approx(round(rate * 4001), abs=1e-9) and 0.5 < rate < 1.0


def test_true_class_rate_counts_only_strict_rises_and_works_in_float64():
    # a constant loss (all coefficients 0) has zero gradient: descent never raises p_t, the rate is 0
    assert taylor.true_class_rate(torch.zeros(12), ITL4, num_points=50) == 0.0
    # bfloat16 coefficients give the rate of the same numbers in float64: the ARL factorial 1/6 is applied in
    # float64 (m·ω rounded to bfloat16 moves ℓ = −ab + (5/6) a³b by ~0.2 %, enough to flip 1 of these 2001 points)
    spec, theta = TaylorSpec("arl", 4), torch.zeros(12, dtype=torch.bfloat16)
    theta[6], theta[9] = -1.0, 5.0
    rate = taylor.true_class_rate(theta, spec, 3, num_points=2000)
    assert 0.5 < rate < 1.0
    assert rate == taylor.true_class_rate(theta.to(F64), spec, 3, num_points=2000)
    assert rate == pytest.approx(hand_rate(theta, spec, 3, 2000, 0), abs=1e-15)


def test_descent_check_passes_its_arguments_through():
    # defaults: the same 4000 points as true_class_rate's defaults (threshold inclusive, so r passes, r + ε fails)
    r = taylor.true_class_rate(A2B, ITL4)
    assert taylor.descent_raises_true_class(A2B, ITL4, min_fraction=r)
    assert not taylor.descent_raises_true_class(A2B, ITL4, min_fraction=r + 1e-9)
    # the seed reaches the random points
    r1 = taylor.true_class_rate(A2B, ITL4, num_points=300, seed=1)
    assert r1 != taylor.true_class_rate(A2B, ITL4, num_points=300, seed=0)
    assert taylor.descent_raises_true_class(A2B, ITL4, num_points=300, min_fraction=r1, seed=1)
    assert not taylor.descent_raises_true_class(A2B, ITL4, num_points=300, min_fraction=r1 + 1e-9, seed=1)
    # the uniform check uses num_classes: −1 + 4/C < 0 holds for C = 10, not for C = 3 (see A2B)
    assert taylor.true_class_rate(A2B, ITL4, 3, num_points=0) == 0.0
    assert not taylor.descent_raises_true_class(A2B, ITL4, 3, num_points=100, min_fraction=0.0)
    # ... and only the uniform prediction: seed 3's first random point fails, which must not fail the uniform check
    assert hand_rate(A2B, ITL4, 10, 1, 3) == 0.5
    assert taylor.descent_raises_true_class(A2B, ITL4, 10, num_points=50, min_fraction=0.5, seed=3)


# ---------------------------------------------------------------------------------------------- loss network, round 2
def hand_network(phi: dict, target: float, prediction: float, gamma: float, beta: float) -> float:
    h = [target, prediction]
    n = len([k for k in phi if k.startswith("w")])
    for i in range(n):
        w = phi[f"w{i}"].tolist()
        h = [sum(w[r][c] * h[c] for c in range(len(h))) for r in range(len(w))]
        if i < n - 1:
            h = [(1 - gamma) * math.log(math.exp(beta * v) + 1) / beta + gamma * v for v in h]
    return h[0]


def test_loss_network_on_a_matrix_with_non_default_activation():
    """(N, C) inputs give an (N, C) output, each entry the hand forward pass with γ = 0.25, β = 2."""
    phi = init_loss_network(hidden=3, seed=5, dtype=F64)
    target = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
    prediction = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]], dtype=F64)
    got = loss_network(phi, target, prediction, gamma=0.25, beta=2.0)
    assert got.shape == (2, 3)
    for n in range(2):
        for c in range(3):
            expected = hand_network(phi, float(target[n, c]), float(prediction[n, c]), 0.25, 2.0)
            assert got[n, c].item() == pytest.approx(expected, rel=1e-13)


def test_loss_network_casts_the_target_to_the_prediction_dtype():
    """A float64 target with float32 predictions and weights: computed in float32 like a float32 target."""
    phi = init_loss_network(hidden=3, seed=5)
    p = torch.tensor([0.2, 0.9])
    got = loss_network(phi, torch.tensor([0.0, 1.0], dtype=F64), p)
    assert got.dtype == torch.float32 and torch.equal(got, loss_network(phi, torch.tensor([0.0, 1.0]), p))


def test_default_seed_and_bias_dtype():
    params = init_loss_network(hidden=3)
    g = torch.Generator().manual_seed(0)  # the documented default seed
    for i, fan_in, fan_out in ((0, 2, 3), (1, 3, 3), (2, 3, 1)):
        expected = (torch.rand(fan_out, fan_in, generator=g, dtype=F64) * 2 - 1) / math.sqrt(fan_in)
        assert torch.allclose(params[f"w{i}"].double(), expected, rtol=1e-7, atol=0)
    with_bias = init_loss_network(hidden=3, bias=True)
    assert {v.dtype for v in with_bias.values()} == {torch.float32}


def test_learned_loss_when_the_last_class_has_no_sample():
    """The one-hot width is the logits' C even when no label equals C − 1: the mean of ℓ_φ(onehot_k, p_k) over the
    N·C entries, each by the hand forward pass."""
    phi = init_loss_network(hidden=3, seed=6, dtype=F64)
    got = learned_loss(phi, LOGITS, ABSENT_LAST_CLASS)
    entries = [hand_network(phi, float(k == y), p[k], 0.01, 10.0)
               for p, y in zip(softmax_rows(LOGITS), ABSENT_LAST_CLASS.tolist()) for k in range(3)]
    assert got.item() == pytest.approx(sum(entries) / len(entries), rel=1e-13)


def test_learned_loss_refuses_unbatched_logits():
    """(C,) logits with (1,) labels: refused before any work, naming the shape and the fix (a batch of one)."""
    phi = init_loss_network(hidden=3, dtype=F64)
    with pytest.raises(ValueError, match=r"logits of shape \(N, C\); got shape \(3,\): pass a batch.*unsqueeze\(0\)"):
        learned_loss(phi, torch.tensor([0.1, 0.5, -0.3], dtype=F64), torch.tensor([2]))
