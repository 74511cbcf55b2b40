"""Arithmetic on flat parameter dicts (`dict[str, Tensor]`).

All functions are pure: they return new dicts and never modify their inputs, so they are safe inside
`torch.func` transforms.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
from torch import Tensor
from torch._C import _functorch

from .errors import StructureError

Params = dict[str, Tensor]


def tree_map(fn: Callable[..., Tensor], tree: Mapping[str, Tensor], *rest: Mapping[str, Tensor]) -> Params:
    """Apply ``fn`` leaf by leaf over dicts with the same keys."""
    return {k: fn(v, *(r[k] for r in rest)) for k, v in tree.items()}


def add(a: Params, b: Params) -> Params:
    """a + b."""
    return {k: a[k] + b[k] for k in a}


def sub(a: Params, b: Params) -> Params:
    """a - b."""
    return {k: a[k] - b[k] for k in a}


def scale(a: Params, s: float | Tensor) -> Params:
    """s * a."""
    return {k: v * s for k, v in a.items()}


def axpy(alpha: float | Tensor, x: Params, y: Params) -> Params:
    """alpha * x + y."""
    return {k: y[k] + alpha * x[k] for k in x}


def dot(a: Params, b: Params) -> Tensor:
    """Sum over leaves of the elementwise product: <a, b>."""
    terms = [torch.sum(a[k] * b[k]) for k in a]
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def norm(a: Params) -> Tensor:
    """Euclidean norm over all leaves, without under- or overflow.

    sqrt(<a, a>) underflows to 0 in float32 for ‖a‖ below ~1e-19 and overflows above ~1e19 (float64: 1e-154,
    1e154), which would make a linear solve's relative residual 0/0 or read a tiny right-hand side as zero.
    So the plain value is returned only where its sum of squares is safe: finite and at least
    sqrt(tiny)/eps (dropped subnormal squares then cost less than eps relative); otherwise, and under torch.func
    transforms (where the value cannot be read on the host), ‖a‖ = m · sqrt(Σ (a/m)²) with m = max |a|
    (:func:`_scaled_norm`, about 5× the cost). NaN stays NaN.
    """
    plain = torch.sqrt(dot(a, a))
    if not _functorch.is_functorch_wrapped_tensor(plain):
        value = float(plain)
        info = torch.finfo(plain.dtype)
        if math.isnan(value) or (math.isfinite(value) and value >= math.sqrt(info.tiny) / info.eps):
            return plain
    return _scaled_norm(a)


def _scaled_norm(a: Params) -> Tensor:
    """m · sqrt(Σ (a/m)²), m = max |a| (detached: the norm is the same function of a either way); m = 0 (a zero
    vector) and a non-finite m are not scaled. No host read: works under vmap."""
    leaves = [v for v in a.values() if v.numel()]
    if not leaves:
        return dot(a, a).sqrt()
    peak = torch.stack([v.detach().abs().amax() for v in leaves]).amax()
    scale_ = torch.where((peak > 0) & torch.isfinite(peak), peak, torch.ones_like(peak))
    scaled = {k: v / scale_ for k, v in a.items()}
    return scale_ * torch.sqrt(dot(scaled, scaled))


def zeros_like(a: Params) -> Params:
    """A dict of zeros shaped like ``a``."""
    return {k: torch.zeros_like(v) for k, v in a.items()}


def detach(a: Params) -> Params:
    """Detached copies (no graph, no shared autograd history)."""
    return {k: v.detach() for k, v in a.items()}


def clone(a: Params) -> Params:
    """Detached, independent copies."""
    return {k: v.detach().clone() for k, v in a.items()}


def numel(a: Params) -> int:
    """Total number of scalars."""
    return sum(v.numel() for v in a.values())


def flatten(a: Params) -> Tensor:
    """Concatenate all leaves into one vector (key order of ``a``)."""
    return torch.cat([v.reshape(-1) for v in a.values()])


def unflatten(vector: Tensor, like: Params) -> Params:
    """Inverse of :func:`flatten`: cut ``vector`` into leaves shaped like ``like``."""
    out, start = {}, 0
    for k, v in like.items():
        out[k] = vector[start:start + v.numel()].reshape(v.shape).to(v.dtype)
        start += v.numel()
    if start != vector.numel():
        raise StructureError(f"vector has {vector.numel()} entries but the params hold {start}")
    return out


def cast(a: Params, dtype: torch.dtype) -> Params:
    """Floating leaves cast to ``dtype``."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in a.items()}


def assert_same_structure(value: Mapping[str, Tensor], reference: Mapping[str, Tensor], what: str,
                          reference_name: str = "the outer params") -> None:
    """Raise :class:`StructureError` unless ``value`` has the keys, shapes and dtypes of ``reference``."""
    if not isinstance(value, Mapping):
        raise StructureError(f"{what} must be a dict[str, Tensor] like {reference_name}, got {type(value).__name__}")
    missing = sorted(set(reference) - set(value))
    extra = sorted(set(value) - set(reference))
    if missing or extra:
        raise StructureError(
            f"{what} keys do not match {reference_name}: missing {missing}, unexpected {extra}. "
            f"Return one tensor per key of {reference_name}."
        )
    for k, ref in reference.items():
        v = value[k]
        if not isinstance(v, Tensor):
            raise StructureError(f"{what}[{k!r}] must be a Tensor, got {type(v).__name__}")
        if v.shape != ref.shape:
            raise StructureError(
                f"{what}[{k!r}] has shape {tuple(v.shape)} but {reference_name}[{k!r}] has shape {tuple(ref.shape)}"
            )
        if v.dtype != ref.dtype:
            raise StructureError(f"{what}[{k!r}] has dtype {v.dtype} but {reference_name}[{k!r}] has {ref.dtype}")

