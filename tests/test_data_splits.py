"""Per-domain splits, leave-one-domain-out, to_tensors, and DomainBed's three model-selection protocols."""
import pytest
import torch

from bilevel.problems.data import (
    leave_one_domain_out,
    select_leave_one_domain_out,
    select_oracle,
    select_training_domain_validation,
    split_domains,
    to_tensors,
)
from bilevel.problems.data.images import image_dataset


@pytest.fixture(scope="module")
def toy():
    # 3 domains of 50, 40, 31 rows; the label is the row id, so rows can be traced through a split
    sizes = {"a": 50, "b": 40, "c": 31}
    n = sum(sizes.values())
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2) / n
    doms = [d for d, k in sizes.items() for _ in range(k)]
    return image_dataset(images, torch.arange(n), doms).with_format("torch"), sizes


def test_split_domains_is_a_seeded_partition(toy):
    ds, sizes = toy
    train, val = split_domains(ds, holdout=0.2, seed=0)
    for d, n in sizes.items():
        _, ytr = to_tensors(train, d)
        _, yva = to_tensors(val, d)
        assert len(yva) == int(0.2 * n) and len(ytr) == n - int(0.2 * n)
        assert sorted(ytr.tolist() + yva.tolist()) == to_tensors(ds, d)[1].tolist()
    assert train.format["type"] == "torch" and train.column_names == ds.column_names
    again = split_domains(ds, holdout=0.2, seed=0)[1]
    other = split_domains(ds, holdout=0.2, seed=1)[1]
    assert torch.equal(to_tensors(again)[1], to_tensors(val)[1])
    assert not torch.equal(to_tensors(other)[1], to_tensors(val)[1])
    with pytest.raises(ValueError, match="holdout fraction 1.0"):
        split_domains(ds, holdout=1.0)


def test_to_tensors_matches_row_by_row(toy):
    ds, _ = toy
    X, y = to_tensors(ds, ["c", "a"])  # stored order, whatever the order asked
    rows = [r for r in ds if r["domain"] in ("a", "c")]
    assert torch.equal(X, torch.stack([r["image"] for r in rows]))
    assert torch.equal(y, torch.stack([r["label"] for r in rows]))
    shuffled = ds.shuffle(seed=0)  # scattered rows: the gather path
    Xs, ys = to_tensors(shuffled, "b")
    assert sorted(ys.tolist()) == list(range(50, 90))
    assert torch.equal(Xs[:, 0, 0, 0], ys.float() / len(ds))
    with pytest.raises(ValueError, match=r"unknown domain\(s\) \['z'\]"):
        to_tensors(ds, "z")
    with pytest.raises(ValueError, match="selects no rows"):
        to_tensors(ds, [])


def test_leave_one_domain_out(toy):
    ds, _ = toy
    assert list(leave_one_domain_out(ds)) == [("a", ("b", "c")), ("b", ("a", "c")), ("c", ("a", "b"))]
    assert len(list(leave_one_domain_out(["0", "15", "30", "45", "60", "75"]))) == 6
    with pytest.raises(ValueError, match="at least 2"):
        list(leave_one_domain_out(["a"]))


def test_training_domain_validation_picks_the_best_checkpoint_of_any_run():
    table = [
        {"hparams": "lr=0.1", "step": 100, "val_acc": 0.70, "test_acc": 0.50},
        {"hparams": "lr=0.1", "step": 200, "val_acc": 0.85, "test_acc": 0.55},  # best val: chosen
        {"hparams": "lr=0.1", "step": 300, "val_acc": 0.80, "test_acc": 0.65},
        {"hparams": "lr=0.01", "step": 100, "val_acc": 0.60, "test_acc": 0.70},
        {"hparams": "lr=0.01", "step": 300, "val_acc": 0.84, "test_acc": 0.75},
    ]
    assert select_training_domain_validation(table) == {"hparams": "lr=0.1", "step": 200, "val_acc": 0.85, "test_acc": 0.55}
    with pytest.raises(KeyError, match="row 0 .* lacks \\['val_acc'\\]"):
        select_training_domain_validation([{"hparams": 1, "step": 0, "test_acc": 0.5}])
    with pytest.raises(ValueError, match="empty"):
        select_training_domain_validation([])


def test_oracle_judges_each_run_at_its_last_step():
    table = [
        {"hparams": "A", "step": 100, "oracle_acc": 0.95, "test_acc": 0.90},  # early peak: not allowed
        {"hparams": "A", "step": 300, "oracle_acc": 0.60, "test_acc": 0.58},
        {"hparams": "B", "step": 300, "oracle_acc": 0.80, "test_acc": 0.78},  # best last step: chosen
        {"hparams": "B", "step": 200, "oracle_acc": 0.85, "test_acc": 0.83},
    ]
    assert select_oracle(table) == {"hparams": "B", "step": 300, "val_acc": 0.80, "test_acc": 0.78}


def test_leave_one_domain_out_averages_over_held_out_sources():
    def rows(hp, step, accs, test):
        out = [{"hparams": hp, "step": step, "held_out": d, "val_acc": a} for d, a in accs.items()]
        return out + [{"hparams": hp, "step": step, "held_out": None, "test_acc": test}]

    table = (
        rows("A", 1, {"x": 0.9, "y": 0.5}, 0.61)  # mean 0.70
        + rows("A", 2, {"x": 0.8, "y": 0.8}, 0.62)  # mean 0.80: chosen
        + rows("B", 1, {"x": 1.0, "y": 0.5}, 0.63)  # mean 0.75
        + [{"hparams": "B", "step": 2, "held_out": "x", "val_acc": 1.0}]  # incomplete: skipped
    )
    assert select_leave_one_domain_out(table) == {"hparams": "A", "step": 2, "val_acc": 0.8, "test_acc": 0.62}
    with pytest.raises(ValueError, match="every held-out domain"):
        select_leave_one_domain_out(table[-1:] + [{"hparams": "C", "step": 1, "held_out": None, "test_acc": 0.5}])
    with pytest.raises(KeyError, match="lacks 'test_acc'"):
        select_leave_one_domain_out([{"hparams": "C", "step": 1, "held_out": None, "val_acc": 0.5}])
