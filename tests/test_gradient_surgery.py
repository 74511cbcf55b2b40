"""PCGrad (bilevel/combine.py) on worked 2-vector examples, worked by hand."""
import pytest
import torch

from bilevel.combine import combine_gradients, conflicts, pcgrad_vectors

torch.set_num_threads(1)


def _g(x, y):
    return {"w": torch.tensor([x, y], dtype=torch.float64)}


def test_conflicting_pair_worked_example():
    # g1 = (1, 0), g2 = (−1, 1): g1·g2 = −1 < 0.
    # g1' = g1 − (−1/‖g2‖²) g2 = (1, 0) + ½(−1, 1) = (½, ½);  g2' = g2 − (−1/‖g1‖²) g1 = (0, 1)
    out = combine_gradients([_g(1, 0), _g(-1, 1)], "pcgrad", seed=0)
    torch.testing.assert_close(out["w"], torch.tensor([0.25, 0.75], dtype=torch.float64))  # mean of g1', g2'
    summed = combine_gradients([_g(1, 0), _g(-1, 1)], "pcgrad", seed=0, reduction="sum")
    torch.testing.assert_close(summed["w"], torch.tensor([0.5, 1.5], dtype=torch.float64))
    # each projected gradient no longer conflicts with the other original gradient
    assert float(torch.tensor([0.5, 0.5]) @ torch.tensor([-1.0, 1.0])) >= 0
    assert conflicts([_g(1, 0), _g(-1, 1)]) == 1


def test_non_conflicting_pair_is_the_mean():
    out = combine_gradients([_g(1, 0), _g(1, 1)], "pcgrad", seed=3)
    torch.testing.assert_close(out["w"], torch.tensor([1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(out["w"], combine_gradients([_g(1, 0), _g(1, 1)], "mean")["w"])
    assert conflicts([_g(1, 0), _g(1, 1)]) == 0


def test_opposite_gradients_cancel_to_zero():
    out = combine_gradients([_g(2, 1), _g(-2, -1)], "pcgrad")
    torch.testing.assert_close(out["w"], torch.zeros(2, dtype=torch.float64))


def test_three_gradients_projection_uses_original_vectors_and_seeded_order():
    # g1 = (1, 0), g2 = (−1, 1), g3 = (−1, −1): g1 conflicts with both, g2·g3 = 0.
    # g1 minus its projections on g2 then g3 (originals): (1,0) → (½,½) → (½,½)·(−1,−1) = −1 < 0 → (0, 0);
    # in the other order: (1,0) → (½,−½) → (½,−½)·(−1,1) = −1 < 0 → (0, 0). Order matters in general,
    # so the result must be a deterministic function of the seed.
    v = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    a = pcgrad_vectors(v, torch.Generator().manual_seed(5), "sum")
    b = pcgrad_vectors(v, torch.Generator().manual_seed(5), "sum")
    torch.testing.assert_close(a, b)
    # g2' = g2 − (−1)(1,0) = (0, 1) [g2·g3 = 0: no projection]; g3' = (0, −1) likewise → sum = (0, 0)
    torch.testing.assert_close(a, torch.zeros(2, dtype=torch.float64))


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
