"""Image transforms in plain torch, and the shared "rotated domains" recipe.

torchvision cannot be used beside torch 2.13 on this machine (its C++ operators fail to register), so
rotation and resizing are written with ``affine_grid``/``grid_sample``/``interpolate``. They follow
torchvision's conventions: a positive angle rotates counter-clockwise as the image is displayed (row 0 at
the top), about the image centre, bilinear, with zeros outside the source.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import datasets
import numpy as np
import torch
import torch.nn.functional as F

IMAGE_COLUMNS = ("image", "label", "domain")


def rotate(images: torch.Tensor, degrees: float) -> torch.Tensor:
    """Rotate a batch ``(N, C, H, W)`` (or one ``(C, H, W)`` image) counter-clockwise by ``degrees``.

    Bilinear, about the centre of the pixel grid, zero fill: torchvision's
    ``rotate(img, degrees, interpolation=BILINEAR, fill=0)``, which DomainBed's RotatedMNIST uses.
    Multiples of 90 degrees map pixel centres onto pixel centres, so they equal ``torch.rot90`` up to
    float rounding.
    """
    single = images.dim() == 3
    x = images.unsqueeze(0) if single else images
    if x.dim() != 4:
        raise ValueError(f"rotate expects (N, C, H, W) or (C, H, W), got shape {tuple(images.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"rotate expects a float tensor, got {x.dtype}; divide uint8 images by 255 first")
    n, _, h, w = x.shape
    a = math.radians(degrees)
    cos, sin = math.cos(a), math.sin(a)
    # affine_grid maps each output location to the input location it samples, in normalised
    # coordinates (x right, y down, both in [-1, 1]). Sampling the input at R(a) p_out, with
    # R = [[cos, -sin], [sin, cos]] in pixel units, turns the content by +a counter-clockwise on screen
    # (y points down). Normalised = pixel offset / (size/2), hence the aspect factors for H != W.
    theta = torch.tensor(
        [[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]], dtype=x.dtype, device=x.device
    )
    grid = F.affine_grid(theta.expand(n, 2, 3), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0] if single else out


def resize(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize ``(N, C, H, W)`` to ``size`` (an int gives a square) with antialiased bilinear filtering."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"size must be a positive int or (height, width), got {size!r}")
    if tuple(images.shape[-2:]) == hw:
        return images
    return F.interpolate(images, size=hw, mode="bilinear", antialias=True, align_corners=False)


def image_features(shape: Sequence[int], **extra: datasets.features.FeatureType) -> datasets.Features:
    """Features of an image dataset: ``image`` (float32 C x H x W), ``label`` (int64), ``domain`` (str)."""
    return datasets.Features(
        {
            "image": datasets.Array3D(tuple(int(s) for s in shape), "float32"),
            "label": datasets.Value("int64"),
            "domain": datasets.Value("string"),
            **extra,
        }
    )


def image_dataset(
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    domains: Sequence[str],
    **extra: torch.Tensor | np.ndarray,
) -> datasets.Dataset:
    """An Arrow dataset from stacked float images in [0, 1], int labels, domain names, extra int columns."""
    images = np.ascontiguousarray(torch.as_tensor(images, dtype=torch.float32).numpy())
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {images.shape}")
    cols = {"image": images, "label": torch.as_tensor(labels).long().numpy(), "domain": list(domains)}
    feats = {}
    for key, value in extra.items():
        cols[key] = torch.as_tensor(value).long().numpy()
        feats[key] = datasets.Value("int64")
    return datasets.Dataset.from_dict(cols, features=image_features(images.shape[1:], **feats))


def angle_name(degrees: float) -> str:
    """Domain name of a rotation: ``15 -> "15"``, ``7.5 -> "7.5"`` (DomainBed's names are the degrees)."""
    return f"{degrees:g}"


def rotated_domains(
    images: torch.Tensor,
    labels: torch.Tensor,
    angles: Sequence[float],
    per_domain: int | None,
    seed: int,
) -> datasets.Dataset:
    """DomainBed's rotated-domains recipe on any image set (Gulrajani & Lopez-Paz 2021, arXiv:2007.01434).

    The images are shuffled with ``seed`` and dealt into ``len(angles)`` disjoint chunks (``perm[i::n]``,
    as DomainBed's ``MultipleEnvironmentMNIST`` does), chunk ``i`` is rotated by ``angles[i]`` degrees and
    named ``angle_name(angles[i])``. ``per_domain`` keeps the first ``per_domain`` images of each chunk.
    Rows are stored domain by domain, so one domain is a contiguous block.
    """
    angles = [float(a) for a in angles]
    if not angles:
        raise ValueError("angles is empty: give at least one rotation angle in degrees")
    names = [angle_name(a) for a in angles]
    if len(set(names)) != len(names):
        raise ValueError(f"angles {angles} repeat a domain; each angle must be distinct")
    if per_domain is not None and per_domain < 1:
        raise ValueError(f"per_domain must be a positive int or None, got {per_domain!r}")
    n_dom = len(angles)
    if len(images) < n_dom:
        raise ValueError(f"{len(images)} images cannot fill {n_dom} disjoint domains")
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    xs, ys, doms = [], [], []
    for i, (angle, name) in enumerate(zip(angles, names)):
        idx = perm[i::n_dom][:per_domain]
        xs.append(rotate(images[idx], angle).clamp_(0.0, 1.0))
        ys.append(labels[idx])
        doms += [name] * len(idx)
    return image_dataset(torch.cat(xs), torch.cat(ys), doms)
