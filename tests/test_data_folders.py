"""DomainBed-layout folder loader on generated image trees, and its errors on bad trees."""
import os

import pytest
import torch

pytest.importorskip("PIL", reason="image folders need pillow: pip install pillow")
from PIL import Image  # noqa: E402

from bilevel.problems.data import domains_of, image_folder_domains, to_tensors  # noqa: E402

DOMAINS = {"photo": 3, "sketch": 2, "art": 4}  # images per class
CLASSES = ["cat", "dog", "horse"]


def colour(d: int, c: int) -> tuple[int, int, int]:
    """A flat colour that encodes (domain, class), so the loader's labels can be checked from pixels."""
    return (40 * d + 20, 80 * c + 10, 200)


def make_tree(root, domains=DOMAINS, classes=CLASSES, size=(40, 32)):
    for d, (name, n) in enumerate(sorted(domains.items())):
        for c, cls in enumerate(classes):
            folder = root / name / cls
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                ext = "png" if k % 2 == 0 else "jpg"
                Image.new("RGB", size, colour(d, c)).save(folder / f"{k}.{ext}")
    return root


@pytest.fixture()
def tree(tmp_path):
    return make_tree(tmp_path / "data")


def test_reads_domains_classes_and_pixels(tree, tmp_path):
    ds = image_folder_domains(tree, size=16, cache_dir=tmp_path / "cache")
    assert domains_of(ds) == ["art", "photo", "sketch"]  # sorted folder names
    assert ds.features["label"].names == CLASSES
    assert len(ds) == sum(DOMAINS.values()) * len(CLASSES)
    X, y = to_tensors(ds)
    assert X.shape == (27, 3, 16, 16) and X.dtype == torch.float32 and y.dtype == torch.int64
    doms = ds.with_format(None)["domain"][:]
    for img, label, dom in zip(X, y, doms):
        d = sorted(DOMAINS).index(dom)
        want = torch.tensor(colour(d, int(label)), dtype=torch.float32) / 255
        # jpeg is lossy: a few levels of 255
        torch.testing.assert_close(img.mean((1, 2)), want, atol=4 / 255, rtol=0)
    assert all(p.split(os.sep)[0] == d for p, d in zip(ds.with_format(None)["path"][:], doms))


def test_normalisation_grayscale_and_cache(tree, tmp_path):
    cache = tmp_path / "cache"
    plain = image_folder_domains(tree, size=(8, 12), cache_dir=cache)
    assert plain[0]["image"].shape == (3, 8, 12)
    normed = image_folder_domains(tree, size=(8, 12), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), cache_dir=cache)
    torch.testing.assert_close(to_tensors(normed)[0], (to_tensors(plain)[0] - 0.5) / 0.25)
    gray = image_folder_domains(tree, size=8, mode="L", cache_dir=False)
    assert gray[0]["image"].shape == (1, 8, 8)
    entries = {p.name for p in cache.iterdir() if p.name.startswith("image_folder-")}
    assert len(entries) == 2
    again = image_folder_domains(tree, size=(8, 12), cache_dir=cache)  # read from the cache
    assert torch.equal(to_tensors(again)[0], to_tensors(plain)[0])
    assert {p.name for p in cache.iterdir() if p.name.startswith("image_folder-")} == entries
    # a changed tree is a new cache entry, not a stale read
    Image.new("RGB", (40, 32), (1, 2, 3)).save(tree / "art" / "cat" / "new.png")
    assert len(image_folder_domains(tree, size=(8, 12), cache_dir=cache)) == 28


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere does not exist; expected the DomainBed layout root/<domain>"):
        image_folder_domains(tmp_path / "nowhere", cache_dir=False)


def test_root_without_domains(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty holds no domain folders"):
        image_folder_domains(tmp_path / "empty", cache_dir=False)


def test_domain_without_images(tree):
    for cls in CLASSES:
        (tree / "clipart" / cls).mkdir(parents=True)
    (tree / "clipart" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="clipart holds no images"):
        image_folder_domains(tree, cache_dir=False)


def test_class_folders_differ(tree):
    (tree / "sketch" / "zebra").mkdir()
    Image.new("RGB", (8, 8)).save(tree / "sketch" / "zebra" / "0.png")
    with pytest.raises(ValueError, match=r"class folders differ.*sketch lacks \[\] and has extra \['zebra'\]"):
        image_folder_domains(tree, cache_dir=False)


def test_unreadable_image(tree):
    bad = tree / "photo" / "dog" / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png: .*; remove or replace the file"):
        image_folder_domains(tree, cache_dir=False)


def test_bad_size_and_stats(tree):
    with pytest.raises(ValueError, match=r"size must be a positive int or \(height, width\), got \(0, 4\)"):
        image_folder_domains(tree, size=(0, 4), cache_dir=False)
    with pytest.raises(ValueError, match=r"give both mean and std \(per-channel normalisation\) or neither"):
        image_folder_domains(tree, mean=(0.5, 0.5, 0.5), cache_dir=False)
    with pytest.raises(ValueError, match=r"mean \(0\.5,\) and std \(0\.2,\) need 3 values each, std > 0, "
                                         r"for mode 'RGB'"):
        image_folder_domains(tree, mean=(0.5,), std=(0.2,), cache_dir=False)


def test_explicit_classes_allow_a_domain_to_lack_one(tmp_path):
    # PACS-mini style: each domain lacks a class; with classes=[...] the labels follow that list
    root = make_tree(tmp_path / "mini", domains={"a": 1, "b": 1}, classes=["dog", "horse"])
    Image.new("RGB", (8, 8), (9, 9, 9)).save(root / "b" / "dog" / "extra.png")
    (root / "a" / "cat").mkdir()
    Image.new("RGB", (8, 8)).save(root / "a" / "cat" / "0.png")
    with pytest.raises(ValueError, match="class folders differ"):
        image_folder_domains(root, cache_dir=False)
    ds = image_folder_domains(root, size=4, classes=["cat", "dog", "horse"], cache_dir=False)
    assert ds.features["label"].names == ["cat", "dog", "horse"]
    labels = {p: int(y) for p, y in zip(ds.with_format(None)["path"][:], ds["label"][:])}
    assert labels[os.path.join("a", "cat", "0.png")] == 0 and labels[os.path.join("b", "horse", "0.png")] == 2
    with pytest.raises(ValueError, match="not in classes"):
        image_folder_domains(root, classes=["dog", "horse"], cache_dir=False)
