"""PCGrad (bilevel/combine.py) against the projection formula evaluated by hand (exact fractions or float64),
on inputs where the projections and their seeded order change the result."""
import itertools
from fractions import Fraction

import pytest
import torch

from bilevel.combine import combine_gradients, conflicts

torch.set_num_threads(1)


def _g(x, y):
    return {"w": torch.tensor([x, y], dtype=torch.float64)}


def _project(g: tuple, onto: tuple) -> tuple:
    """One PCGrad step in exact rational arithmetic: g − (g·o/‖o‖²) o when g·o < 0, else g."""
    dot = sum(a * b for a, b in zip(g, onto))
    if dot >= 0:
        return g
    sq = sum(b * b for b in onto)
    return tuple(a - dot / sq * b for a, b in zip(g, onto))


def _pcgrad_by_hand(vectors: list, orders: list) -> tuple:
    """Σ_i g_i^PC, g_i projected in turn on the *original* g_j for j in ``orders[i]`` (Algorithm 1)."""
    out = []
    for i, g in enumerate(vectors):
        for j in orders[i]:
            g = _project(g, vectors[j])
        out.append(g)
    return tuple(sum(column) for column in zip(*out))


def test_conflicting_pair_worked_example():
    # g1 = (1, 0), g2 = (−1, 1): g1·g2 = −1 < 0.
    # g1' = g1 − (−1/‖g2‖²) g2 = (1, 0) + ½(−1, 1) = (½, ½);  g2' = g2 − (−1/‖g1‖²) g1 = (0, 1)
    out = combine_gradients([_g(1, 0), _g(-1, 1)], "pcgrad", seed=0)
    torch.testing.assert_close(out["w"], torch.tensor([0.25, 0.75], dtype=torch.float64))  # mean of g1', g2'
    summed = combine_gradients([_g(1, 0), _g(-1, 1)], "pcgrad", seed=0, reduction="sum")
    torch.testing.assert_close(summed["w"], torch.tensor([0.5, 1.5], dtype=torch.float64))
    assert conflicts([_g(1, 0), _g(-1, 1)]) == 1


def test_non_conflicting_pair_is_the_mean():
    out = combine_gradients([_g(1, 0), _g(1, 1)], "pcgrad", seed=3)
    torch.testing.assert_close(out["w"], torch.tensor([1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(out["w"], combine_gradients([_g(1, 0), _g(1, 1)], "mean")["w"])
    assert conflicts([_g(1, 0), _g(1, 1)]) == 0


def test_opposite_gradients_cancel_to_zero():
    out = combine_gradients([_g(2, 1), _g(-2, -1)], "pcgrad")
    torch.testing.assert_close(out["w"], torch.zeros(2, dtype=torch.float64))


def test_pcgrad_equals_the_projection_formula_on_conflicting_gradients():
    """Two conflicting gradients in R⁵ (g1·g2 < 0): PCGrad = ½[(g1 − (g1·g2/‖g2‖²) g2) + (g2 − (g2·g1/‖g1‖²) g1)],
    the formula evaluated here in float64 on the raw numbers; it is far from the plain mean, so the test
    would fail if the projection were skipped, used the wrong sign or normalised by the wrong norm."""
    gen = torch.Generator().manual_seed(7)
    g1 = torch.randn(5, generator=gen, dtype=torch.float64)
    g2 = -0.8 * g1 + 0.6 * torch.randn(5, generator=gen, dtype=torch.float64)
    dot = float(g1 @ g2)
    assert dot < 0  # the input conflicts, so the projection applies
    expected = 0.5 * ((g1 - dot / float(g2 @ g2) * g2) + (g2 - dot / float(g1 @ g1) * g1))
    grads = [{"a": g1[:2], "b": g1[2:].reshape(3, 1)}, {"a": g2[:2], "b": g2[2:].reshape(3, 1)}]
    out = combine_gradients(grads, "pcgrad", seed=0)
    got = torch.cat([out["a"], out["b"].reshape(-1)])
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-15)
    mean = 0.5 * (g1 + g2)
    assert float((got - mean).norm()) > 0.5 * float(mean.norm())  # the projection matters here


# Three gradients whose PCGrad sum depends on the projection order: g1 conflicts with g2 and g3; g2·g3 = 3 > 0,
# but g2's projection on g1 can make it conflict with g3. Worked by hand:
# g1 = (2, 0) on g2 = (−2, −1) then g3 = (−2, 1): (2,0)·(−2,−1) = −4 → (2,0) + (4/5)(−2,−1) = (2/5, −4/5);
# (2/5, −4/5)·(−2, 1) = −8/5 → (2/5, −4/5) + (8/25)(−2, 1) = (−6/25, −12/25). The other order gives
# (−6/25, 12/25) (mirror image in y), so g1's order alone moves the sum by 24/25 in y.
SEED_ORDER = [(Fraction(2), Fraction(0)), (Fraction(-2), Fraction(-1)), (Fraction(-2), Fraction(1))]


def _orders_from_seed(seed: int, n: int) -> list:
    """The documented order: for each i in turn, torch.randperm(n) from one generator seeded ``seed``, minus i."""
    gen = torch.Generator().manual_seed(seed)
    return [[j for j in torch.randperm(n, generator=gen).tolist() if j != i] for i in range(n)]


def test_pcgrad_order_comes_from_the_seed_and_changes_the_result():
    assert _project(SEED_ORDER[0], SEED_ORDER[1]) == (Fraction(2, 5), Fraction(-4, 5))  # the worked step above
    assert _project(_project(SEED_ORDER[0], SEED_ORDER[1]), SEED_ORDER[2]) == (Fraction(-6, 25), Fraction(-12, 25))
    grads = [_g(*map(float, v)) for v in SEED_ORDER]
    every_order = {}
    for orders in itertools.product(*[list(itertools.permutations([j for j in range(3) if j != i]))
                                      for i in range(3)]):
        every_order[orders] = _pcgrad_by_hand(SEED_ORDER, [list(o) for o in orders])
    assert len(set(every_order.values())) == 8  # each of the 2³ order choices gives its own sum
    results = {}
    for seed in range(6):
        got = combine_gradients(grads, "pcgrad", seed=seed, reduction="sum")["w"]
        again = combine_gradients(grads, "pcgrad", seed=seed, reduction="sum")["w"]
        assert torch.equal(got, again)  # same seed, same result, bitwise
        hand = _pcgrad_by_hand(SEED_ORDER, _orders_from_seed(seed, 3))
        torch.testing.assert_close(got, torch.tensor([float(x) for x in hand], dtype=torch.float64),
                                   rtol=1e-15, atol=1e-15)
        results[seed] = hand
    assert len(set(results.values())) >= 3, results  # the seed changes the result on this input
    # Seeds 0 and 3 differ only in g1's order (g3 then g2, vs g2 then g3; g2 and g3 alike in both), so their sums
    # differ by g1's two projections worked out above: (−6/25, 12/25) vs (−6/25, −12/25), 24/25 apart in y.
    assert _orders_from_seed(0, 3)[0] == [2, 1] and _orders_from_seed(3, 3)[0] == [1, 2]
    assert _orders_from_seed(0, 3)[1:] == _orders_from_seed(3, 3)[1:]
    seed0 = combine_gradients(grads, "pcgrad", seed=0, reduction="sum")["w"]
    seed3 = combine_gradients(grads, "pcgrad", seed=3, reduction="sum")["w"]
    torch.testing.assert_close(seed0 - seed3, torch.tensor([0.0, 24 / 25], dtype=torch.float64), rtol=0, atol=1e-15)


def test_multi_key_dicts_are_treated_as_one_vector():
    g1 = {"a": torch.tensor([1.0]), "b": torch.tensor([0.0])}
    g2 = {"a": torch.tensor([-1.0]), "b": torch.tensor([1.0])}
    out = combine_gradients([g1, g2], "pcgrad")
    torch.testing.assert_close(torch.cat([out["a"], out["b"]]), torch.tensor([0.25, 0.75]))


def test_bad_input():
    with pytest.raises(ValueError, match="method must be"):
        combine_gradients([_g(1, 0)], "median")
    with pytest.raises(ValueError, match="at least one"):
        combine_gradients([], "pcgrad")
    with pytest.raises(Exception, match="gradient 1"):
        combine_gradients([_g(1, 0), {"v": torch.zeros(2)}], "pcgrad")
