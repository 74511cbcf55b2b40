"""Fashion-MNIST from its idx files, and Rotated / Colored Fashion-MNIST domains built on all 70,000 images.

Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv:1708.07747) holds 70,000 grayscale 28x28 images of
Zalando articles in 10 classes (``FASHION_MNIST_CLASSES``): 60,000 for training and 10,000 for testing,
6,000 and 1,000 per class. It is distributed as four idx files (``train-images-idx3-ubyte.gz``,
``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``).

Where the files are read from (see :func:`fashion_mnist_folder`): the ``root=`` argument, else the folder
named by the environment variable ``BILEVEL_FASHION_MNIST``, else ``/usr/share/datasets/fashion-mnist``,
where Debian's package ``dataset-fashion-mnist`` installs them (``apt-get install dataset-fashion-mnist``
on Debian/Ubuntu). Nothing is downloaded by default. With ``source="hf"`` the images come instead from
the Hugging Face Hub (``datasets.load_dataset("zalando-datasets/fashion_mnist")``), which needs network
access and pillow.

The idx reader parses bytes with numpy only (no pickle), so loading a file can never run code from it.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO, Literal

import datasets
import numpy as np
import torch

from .cache import CacheDir, cached_build
from .images import image_dataset, rotated_domains
from .mnist import DEFAULT_ANGLES, _check_colored_arguments, colored_environments

Split = Literal["train", "test", "all"]
Source = Literal["folder", "hf"]
FileStamp = tuple[str, int, int]  # resolved path, size, modification time (ns)

FASHION_MNIST_ENV = "BILEVEL_FASHION_MNIST"
DEBIAN_FOLDER = Path("/usr/share/datasets/fashion-mnist")
APT_INSTALL = "apt-get install dataset-fashion-mnist"
RELEASE_URL = "https://github.com/zalandoresearch/fashion-mnist"
HF_DATASET = "zalando-datasets/fashion_mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# (images file, labels file) of each split, without the ".gz" that the release adds.
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_SIDE = 28
# idx magic number: two zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions.
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
_GZIP_MAGIC = b"\x1f\x8b"
_IDX_TYPE_BYTES = {
    0x08: "unsigned bytes", 0x09: "signed bytes", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64",
}
_IDX_KINDS = {IDX_IMAGES_MAGIC: "an idx3 uint8 image file", IDX_LABELS_MAGIC: "an idx1 uint8 label file"}
_ROTATED_VERSION = 1
_COLORED_VERSION = 1


class IdxFormatError(ValueError):
    """An idx file whose content is not what it must be; the message names the file and the problem."""


# ---------------------------------------------------------------------------------------------------
# idx reader


def _open_idx(path: Path) -> BinaryIO:
    """Open ``path`` for reading, through gzip when its first bytes are the gzip magic (not its suffix)."""
    with open(path, "rb") as raw:
        compressed = raw.read(2) == _GZIP_MAGIC
    return gzip.open(path, "rb") if compressed else open(path, "rb")


def _read_exactly(f: BinaryIO, n: int, path: Path, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise IdxFormatError(f"{path} is truncated: expected {n} bytes of {what}, found only {len(data)}")
    return data


def _describe_magic(magic: int) -> str:
    if magic in _IDX_KINDS:
        return f"it is {_IDX_KINDS[magic]}"
    type_byte = (magic >> 8) & 0xFF
    if magic >> 16 == 0 and type_byte in _IDX_TYPE_BYTES:
        return f"an idx file of {_IDX_TYPE_BYTES[type_byte]} in {magic & 0xFF} dimensions"
    return "not an idx file"


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """Read one idx file (gzip-compressed or not) of unsigned bytes.

    The idx format (LeCun's MNIST format): a big-endian 4-byte magic number ``0x0000TTDD`` (type ``TT``,
    0x08 for unsigned bytes; ``DD`` dimensions), ``DD`` big-endian 4-byte sizes, then the values in
    row-major order. The file must hold exactly as many bytes as its sizes announce.

    Args:
        path: the file; compression is detected from its first bytes, so ``x.gz`` and ``x`` both work.
        magic: the magic number the file must have: ``IDX_IMAGES_MAGIC`` (0x00000803, images N x H x W)
            or ``IDX_LABELS_MAGIC`` (0x00000801, labels N).

    Returns:
        A read-only uint8 array with the shape from the header.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IdxFormatError: wrong magic number, truncated file, bytes after the data, or a corrupt gzip stream.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"idx file {path} does not exist")
    ndim = magic & 0xFF
    try:
        with _open_idx(path) as f:
            found = int.from_bytes(_read_exactly(f, 4, path, "magic number"), "big")
            if found != magic:
                raise IdxFormatError(
                    f"{path} has the wrong magic number 0x{found:08x} ({_describe_magic(found)}); "
                    f"expected 0x{magic:08x}, {_IDX_KINDS.get(magic, 'an idx file')}"
                )
            shape = tuple(int(s) for s in np.frombuffer(_read_exactly(f, 4 * ndim, path, "header sizes"), ">u4"))
            count = math.prod(shape)
            data = _read_exactly(f, count, path, f"values for the header's shape {shape}")
            if f.read(1):
                raise IdxFormatError(
                    f"{path} has bytes after the {count} values its header announces (shape {shape}); "
                    "the header and the file disagree"
                )
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        # a gzip stream that ends early raises EOFError while decompressing, not a short read
        raise IdxFormatError(f"{path} is truncated or corrupt: its gzip stream cannot be read ({err})") from err
    array = np.frombuffer(data, dtype=np.uint8).reshape(shape)
    array.setflags(write=False)
    return array


def check_images_and_labels(images: np.ndarray, labels: np.ndarray, images_from: str, labels_from: str) -> None:
    """Check that ``images`` (N, 28, 28) and ``labels`` (N,) in 0-9 belong together.

    Raises:
        IdxFormatError: naming ``images_from`` / ``labels_from`` and what does not match.
    """
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise IdxFormatError(
            f"{images_from} holds images of {images.shape[1]}x{images.shape[2]} pixels; "
            f"Fashion-MNIST images are {IMAGE_SIDE}x{IMAGE_SIDE}"
        )
    if len(images) != len(labels):
        raise IdxFormatError(
            f"image/label count mismatch: {images_from} holds {len(images)} images "
            f"but {labels_from} holds {len(labels)} labels"
        )
    n_classes = len(FASHION_MNIST_CLASSES)
    if len(labels) and int(labels.max()) >= n_classes:
        raise IdxFormatError(
            f"{labels_from} holds label {int(labels.max())}; Fashion-MNIST labels are 0-{n_classes - 1}"
        )


# ---------------------------------------------------------------------------------------------------
# where the files are


def _find_file(folder: Path, name: str) -> Path | None:
    """``folder/name.gz`` (the release's form) or, failing that, the uncompressed ``folder/name``."""
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _candidate_folder(root: str | os.PathLike | None) -> tuple[Path, str]:
    """The folder to read and where that choice came from (for error messages)."""
    if root is not None:
        return Path(root).expanduser(), "the root= argument"
    from_env = os.environ.get(FASHION_MNIST_ENV)
    if from_env:
        return Path(from_env).expanduser(), f"${FASHION_MNIST_ENV}"
    return DEBIAN_FOLDER, f"the default, Debian's folder (${FASHION_MNIST_ENV} is not set)"


def _missing_files_message(folder: Path, origin: str, missing: Sequence[str]) -> str:
    names = ", ".join(f"{n}.gz" for n in missing)
    return (
        f"Fashion-MNIST files not found in {folder} (from {origin}): missing {names} "
        "(or their uncompressed forms). Get them in one of two ways:\n"
        f"  - on Debian/Ubuntu: `{APT_INSTALL}` (as root; it installs them in {DEBIAN_FOLDER});\n"
        f"  - elsewhere: put the four files of the dataset's release ({RELEASE_URL}, folder data/fashion) "
        f"in a folder and set {FASHION_MNIST_ENV}=/that/folder or pass root=/that/folder."
    )


def fashion_mnist_folder(root: str | os.PathLike | None = None) -> Path:
    """The folder that holds the four Fashion-MNIST idx files.

    Resolution order: ``root`` if given, else the environment variable ``BILEVEL_FASHION_MNIST``, else
    ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``). A folder given explicitly
    is never silently replaced by a later one: if it lacks the files, that is an error.

    Raises:
        FileNotFoundError: the chosen folder lacks some of the files; the message names them and says how
            to get them.
    """
    folder, origin = _candidate_folder(root)
    missing = [name for pair in SPLIT_FILES.values() for name in pair if _find_file(folder, name) is None]
    if missing:
        raise FileNotFoundError(_missing_files_message(folder, origin, missing))
    return folder


def fashion_mnist_files(split: Literal["train", "test"], root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Paths of the (images, labels) idx files of ``split`` (see :func:`fashion_mnist_folder`)."""
    folder = fashion_mnist_folder(root)
    images, labels = (_find_file(folder, name) for name in SPLIT_FILES[split])
    assert images is not None and labels is not None  # fashion_mnist_folder checked all four
    return images, labels


# ---------------------------------------------------------------------------------------------------
# loading


def _file_stamp(path: Path) -> FileStamp:
    """Path, size and modification time: a cache key that changes when the file is replaced."""
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=4)
def _read_split_files(images_stamp: FileStamp, labels_stamp: FileStamp) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = images_stamp[0], labels_stamp[0]
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    check_images_and_labels(images, labels, images_path, labels_path)
    return images, labels


@functools.lru_cache(maxsize=2)
def _read_hf_split(split: Literal["train", "test"]) -> tuple[np.ndarray, np.ndarray]:
    # Network access (or a warm HF cache) and pillow, which decodes the PNG-encoded images.
    ds = datasets.load_dataset(HF_DATASET, split=split).with_format("numpy")
    images = np.asarray(ds["image"][:], dtype=np.uint8)
    labels = np.asarray(ds["label"][:], dtype=np.int64)
    check_images_and_labels(images, labels, f"{HF_DATASET} [{split}] images", f"{HF_DATASET} [{split}] labels")
    images.setflags(write=False)
    return images, labels


def _split_arrays(
    split: Literal["train", "test"], root: str | os.PathLike | None, source: Source
) -> tuple[np.ndarray, np.ndarray]:
    if source == "hf":
        return _read_hf_split(split)
    images_path, labels_path = fashion_mnist_files(split, root)
    return _read_split_files(_file_stamp(images_path), _file_stamp(labels_path))


def _check_source(root: str | os.PathLike | None, source: str) -> None:
    if source not in ("folder", "hf"):
        raise ValueError(f"source must be 'folder' or 'hf', got {source!r}")
    if source == "hf" and root is not None:
        raise ValueError("root= names a folder of idx files; it cannot be combined with source='hf'")


def fashion_mnist(
    split: Split = "train", root: str | os.PathLike | None = None, source: Source = "folder"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Fashion-MNIST images and labels of ``split``.

    Args:
        split: ``"train"`` (60,000 images), ``"test"`` (10,000) or ``"all"`` (train then test, 70,000).
        root: folder of the idx files; ``None`` resolves it as :func:`fashion_mnist_folder` does.
        source: ``"folder"`` (the idx files, the default) or ``"hf"`` (the Hugging Face Hub; online only).

    Returns:
        ``(images, labels)``: uint8 ``(N, 28, 28)`` (0 = background) and int64 ``(N,)`` class indices 0-9
        (names in ``FASHION_MNIST_CLASSES``), in the files' order.

    Raises:
        FileNotFoundError: the files are missing (the message says how to get them).
        IdxFormatError: a file is malformed (the message names it and the problem).
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    _check_source(root, source)
    parts = [_split_arrays(s, root, source) for s in (("train", "test") if split == "all" else (split,))]
    # concatenate copies, so the caller owns writable tensors and the cached arrays stay untouched
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts]).astype(np.int64)
    return torch.from_numpy(images), torch.from_numpy(labels)


@functools.lru_cache(maxsize=8)
def _files_digest(stamps: tuple[FileStamp, ...]) -> str:
    digest = hashlib.sha256()
    for path, _, _ in stamps:
        digest.update(Path(path).name.encode())
        digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return digest.hexdigest()[:16]


def data_fingerprint(root: str | os.PathLike | None = None, source: Source = "folder") -> str:
    """A short name of the data's content, for cache keys.

    For a folder it hashes the four files' bytes (about 30 ms, once per process), so two folders with the
    same files share cache entries and a folder whose files differ never reads another's.
    """
    _check_source(root, source)
    if source == "hf":
        return f"hf:{HF_DATASET}"
    paths = [*fashion_mnist_files("train", root), *fashion_mnist_files("test", root)]
    return f"idx:{_files_digest(tuple(_file_stamp(p) for p in paths))}"


# ---------------------------------------------------------------------------------------------------
# domain datasets


def rotated_fashion_mnist(
    angles: Sequence[float] = DEFAULT_ANGLES,
    per_domain: int | None = None,
    seed: int = 0,
    cache_dir: CacheDir = None,
    root: str | os.PathLike | None = None,
    source: Source = "folder",
) -> datasets.Dataset:
    """Rotated Fashion-MNIST: the Rotated MNIST protocol of DomainBed (Gulrajani & Lopez-Paz 2021,
    arXiv:2007.01434) on all 70,000 Fashion-MNIST images (train and test together, as DomainBed pools
    MNIST's). Shuffled with ``seed``, the images are dealt into one disjoint chunk per angle (11,667 or
    11,666 for the six default domains), and each chunk is rotated counter-clockwise by its angle
    (bilinear, zero fill).

    Args:
        angles: rotation of each domain in degrees; the domain names are ``"0"``, ``"15"``, ...
        per_domain: keep at most this many images per domain (for quick runs); ``None`` keeps all.
        seed: shuffles the images into domains.
        cache_dir: cache folder (see :func:`problems.data.cache.cache_root`); ``False`` for no cache.
        root: folder of the idx files (see :func:`fashion_mnist_folder`).
        source: ``"folder"`` or ``"hf"`` (see :func:`fashion_mnist`).

    Returns:
        Dataset in torch format: ``image`` float32 1x28x28 in [0, 1], ``label`` int64 0-9 (names in
        ``FASHION_MNIST_CLASSES``), ``domain`` str (the angle).
    """
    args = {
        "angles": [float(a) for a in angles],
        "per_domain": per_domain,
        "seed": seed,
        "data": data_fingerprint(root, source),
        "v": _ROTATED_VERSION,
    }

    def build() -> datasets.Dataset:
        images, labels = fashion_mnist("all", root, source)
        return rotated_domains(images[:, None].float() / 255.0, labels, angles, per_domain, seed)

    return cached_build("rotated_fashion_mnist", args, build, cache_dir)


def colored_fashion_mnist(
    seed: int = 0,
    cache_dir: CacheDir = None,
    environments: Sequence[float] = (0.1, 0.2, 0.9),
    label_noise: float = 0.25,
    downsample: int = 14,
    per_env: int | None = 6000,
    root: str | os.PathLike | None = None,
    source: Source = "folder",
) -> datasets.Dataset:
    """Colored Fashion-MNIST: the IRM Colored MNIST protocol (Arjovsky et al. 2019, arXiv:1907.02893,
    Sec. 5.2) exactly as :func:`problems.data.colored_mnist` builds it, on all 70,000 Fashion-MNIST images.

    1. the images (train and test pooled), shuffled with ``seed``, are dealt into one disjoint chunk per
       environment (``i::n``), and each chunk keeps its first ``per_env`` images;
    2. images are subsampled 2x to 14x14 (every other row and column);
    3. binary label ``clean_label = 1 if class < 5 else 0``: classes 0-4 (T-shirt/top, Trouser, Pullover,
       Dress, Coat) against 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot), the same "< 5" rule that
       Colored MNIST applies to digits, so both halves hold 35,000 images;
    4. ``label = clean_label XOR Bernoulli(label_noise)`` (25% label noise caps the shape at 75%);
    5. ``color = label XOR Bernoulli(e)``: the colour disagrees with the noisy label at rate ``e``;
    6. two channels, with the channel ``1 - color`` zeroed (red = channel 0, green = 1).

    With the default ``environments`` the domains are ``"+90%"``, ``"+80%"`` (training) and ``"-90%"``
    (test); the colour predicts the label with accuracy 0.9, 0.8 and 0.1, the garment's shape with 0.75.
    The default 6,000 images per environment (18,000 in all) is what the 5,000 MNIST digits could not give.

    Args:
        seed: drives the shuffle, the label noise and the colour flips.
        cache_dir: cache folder; ``False`` for no cache.
        environments: colour-flip rate ``e`` of each environment, in [0, 1].
        label_noise: probability of flipping the binary label, in [0, 1).
        downsample: output side, a divisor of 28 (14 as in IRM; 28 keeps full resolution).
        per_env: images per environment; ``None`` deals all 70,000 (23,334 or 23,333 each).
        root: folder of the idx files (see :func:`fashion_mnist_folder`).
        source: ``"folder"`` or ``"hf"`` (see :func:`fashion_mnist`).

    Returns:
        Dataset in torch format with ``image`` float32 2 x s x s in [0, 1], ``label`` int64 (noisy binary
        label), ``domain`` (``"+90%"``, ``"+80%"``, ``"-90%"``), ``clean_label`` (binary label before the
        noise), ``color`` (0 or 1) and ``digit`` (the Fashion-MNIST class 0-9; named as in ``colored_mnist``
        so code written for Colored MNIST reads it unchanged).

    Raises:
        ValueError: bad arguments, or ``per_env`` larger than the data can give every environment.
    """
    envs = [float(e) for e in environments]
    _check_colored_arguments(envs, label_noise, downsample)
    if per_env is not None and (not isinstance(per_env, int) or per_env < 1):
        raise ValueError(f"per_env must be a positive int or None, got {per_env!r}")
    args = {
        "envs": envs,
        "label_noise": label_noise,
        "downsample": downsample,
        "per_env": per_env,
        "seed": seed,
        "data": data_fingerprint(root, source),
        "v": _COLORED_VERSION,
    }

    def build() -> datasets.Dataset:
        images, classes = fashion_mnist("all", root, source)
        # the smallest dealt chunk has len // n images; asking more would make environments unequal
        if per_env is not None and per_env > len(images) // len(envs):
            raise ValueError(
                f"per_env={per_env} x {len(envs)} environments needs {per_env * len(envs)} images, but the data "
                f"holds {len(images)} (at most {len(images) // len(envs)} per environment)"
            )
        return colored_environments(images, classes, envs, label_noise, downsample, seed, per_env)

    return cached_build("colored_fashion_mnist", args, build, cache_dir)
