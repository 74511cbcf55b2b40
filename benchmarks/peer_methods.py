"""The method table of the peer benchmark: every solver family, each implemented by ours, hand-written eager
autograd (benchmarks/hw_autograd.py), hand-written torch.func (``common.hw_*``) and the peers that have it.

Every implementation of a family gets the same settings (``peer_problems.solver_settings``): CG runs exactly
``cg_iters`` iterations (rtol 0 for everyone, so equal work and, up to rounding, equal accuracy; betty's CG
only has an iteration count), Neumann the same α = 1/(λ_max + δ) and number of terms, fixed point the same α and
iterations, damping δ on the nonconvex problems (betty: none), forward mode ``chunk`` directions per vmapped
pass (torch.func twin) or one per pass (autograd twin, ``torch.autograd.forward_ad``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import common
import hw_autograd as hwa
import peer_adapters as pa
from common import Problem
from common import F2SA_LAMBDA, F2SA_STEPS

FAMILIES = ("cg", "neumann", "fixedpoint", "exact", "nystrom", "forward", "unroll", "unroll truncate",
            "unroll checkpoint", "onestep", "cmaes")
"""Solver families in table order; the first word is the registered solver name."""
FAMILIES += ("f2sa",)  # fixed λ from the warm start (common.F2SA_LAMBDA, F2SA_STEPS); target: the same in float64
FAMILIES += ("soba",)  # from the warm start, v = 0 (common.SOBA_INNER, SOBA_V, ρ = alpha); target: float64 twin
FAMILIES += ("bome",)  # from p.inner (η = common.BOME_ETA, K inner steps); target: the same step in float64

IMPLS = ("ours", "autograd", "func", "torchopt", "higher", "betty", "jax")
IMPL_NAMES = {"ours": "ours", "autograd": "hand-written autograd", "func": "hand-written torch.func",
              "torchopt": "torchopt", "higher": "higher", "betty": "betty", "jax": "JAX/jaxopt"}

EXACT_MAX_THETA = 1100
"""``exact`` (dense Hessian) only where dim θ ≤ this and the problem does not rule it out (``extra["dense"]``): its
batched backward holds dim θ copies of the activations."""


@dataclass
class Method:
    """One row: ``make()`` returns the zero-argument callable to time (None for JAX rows: they run in
    benchmarks/jax_peers.py, ``jax_key`` names the method there)."""

    label: str
    family: str
    impl: str
    target: str  # the exact value it computes: ift / loop / trunc / onestep / none
    make: Optional[Callable[[], Callable[[], Any]]] = None
    jax_key: str = ""
    path: str = ""  # ours: the autodiff path it was asked to run on ("" = the primary path)


def _ours_label(family: str, path: str) -> str:
    return f"ours {family}" if not path else f"ours[{path}] {family}"


def ours_spec(family: str, s: dict) -> str:
    """Our solver spec string for a family, with the shared settings ``s``."""
    damp = f",damping={s['damping']}" if s.get("damping") else ""
    return {
        "cg": f"cg:maxiter={s['cg_iters']},rtol=0{damp}",
        "neumann": f"neumann:alpha={s['alpha']},terms={s['terms']}{damp}",
        "fixedpoint": f"fixedpoint:alpha={s['alpha']},maxiter={s['fp_iters']},rtol=0{damp}",
        "exact": f"exact{':' + damp[1:] if damp else ''}",
        "nystrom": f"nystrom:rank={s['rank']},rho={s['rho']}{damp}",
        "forward": f"forward:chunk_size={s['chunk']}",
        "unroll": "unroll",
        "unroll truncate": f"unroll:truncate={s['truncate']}",
        "unroll checkpoint": "unroll:checkpoint=true",
        "onestep": "onestep",
        "f2sa": f"f2sa:steps={F2SA_STEPS},lambda0={F2SA_LAMBDA},lambda_power=0,lambda_max={F2SA_LAMBDA}",
        "soba": f"soba:inner_steps={common.SOBA_INNER},v_steps={common.SOBA_V},v_lr={s['alpha']}",
        "bome": f"bome:eta={common.BOME_ETA}",
        "cmaes": f"cmaes:popsize={s['popsize']},sigma={s['sigma']},seed=1",
    }[family]


def methods(p: Problem, s: dict, warm: dict, *, extra_paths: tuple[str, ...] = (), forward_max_dim: int = 0,
            betty: bool = True, jax: bool = True) -> tuple[list[Method], dict[str, str]]:
    """All rows for problem ``p`` and the families left out with the reason.

    Args:
        s: the shared solver settings; warm: the float32 K-step iterate (onestep's start).
        extra_paths: more autodiff paths to run ours on (rows ``ours[path] family``).
        forward_max_dim: leave forward mode out when dim φ exceeds this (0: no limit).
    """
    n_theta = sum(v.numel() for v in p.inner.values())
    n_phi = sum(v.numel() for v in p.outer.values())
    d, it, a = s.get("damping", 0.0), s["cg_iters"], s["alpha"]
    left_out = {}
    hw = {
        "cg": (lambda: lambda: hwa.implicit(p, "cg", maxiter=it, rtol=0.0, damping=d),
               lambda: lambda: common.hw_implicit(p, "cg", maxiter=it, rtol=0.0, damping=d)),
        "neumann": (lambda: lambda: hwa.implicit(p, "neumann", alpha=a, terms=s["terms"], damping=d),
                    lambda: lambda: common.hw_implicit(p, "neumann", alpha=a, terms=s["terms"], damping=d)),
        "fixedpoint": (lambda: lambda: hwa.implicit(p, "fixedpoint", alpha=a, maxiter=s["fp_iters"], rtol=0.0, damping=d),
                       lambda: lambda: common.hw_implicit(p, "fixedpoint", alpha=a, maxiter=s["fp_iters"], rtol=0.0,
                                                          damping=d)),
        "exact": (lambda: lambda: hwa.implicit(p, "exact", damping=d),
                  lambda: lambda: common.hw_implicit(p, "exact", damping=d)),
        "nystrom": (lambda: lambda: hwa.implicit(p, "nystrom", rank=s["rank"], rho=s["rho"], damping=d),
                    lambda: lambda: common.hw_implicit(p, "nystrom", rank=s["rank"], rho=s["rho"], damping=d)),
        "forward": (lambda: lambda: hwa.forward(p), lambda: lambda: common.hw_forward(p, s["chunk"])),
        "unroll": (lambda: lambda: hwa.unroll(p), lambda: lambda: common.hw_unroll(p)),
        "unroll truncate": (lambda: lambda: hwa.unroll(p, s["truncate"]),
                            lambda: lambda: common.hw_unroll(p, s["truncate"])),
        "unroll checkpoint": (lambda: lambda: hwa.checkpoint(p), lambda: lambda: common.hw_checkpoint(p)),
        "onestep": (lambda: lambda: hwa.onestep(p, warm), lambda: lambda: common.hw_onestep(p, warm)),
        "f2sa": (lambda: lambda: hwa.f2sa(p, warm, F2SA_LAMBDA, F2SA_STEPS),
                 lambda: lambda: common.hw_f2sa(p, warm, F2SA_LAMBDA, F2SA_STEPS)),
        "soba": (lambda: lambda: hwa.soba(p, warm, common.SOBA_INNER, common.SOBA_V, s["alpha"]),
                 lambda: lambda: common.hw_soba(p, warm, v_lr=s["alpha"])),
        "bome": (lambda: lambda: hwa.bome(p, p.inner, common.BOME_ETA), lambda: lambda: common.hw_bome(p, p.inner)),
        "cmaes": (lambda: lambda: hwa.cmaes(p, s["popsize"], s["sigma"], 1),
                  lambda: lambda: common.hw_cmaes(p, s["popsize"], s["sigma"], 1)),
    }
    target = {"cg": "ift", "neumann": "ift", "fixedpoint": "ift", "exact": "ift", "forward": "loop", "unroll": "loop",
              "unroll truncate": "trunc", "unroll checkpoint": "loop", "onestep": "onestep", "cmaes": "none"}
    target["nystrom"] = "nystrom"  # the same Nyström solve (same K, ρ, δ) at the float64 K-step iterate
    target["f2sa"] = "f2sa"
    target["soba"] = "soba"  # the same SOBA computation (warm start, v = 0, ρ = alpha) in float64
    target["bome"] = "bome"  # the same BOME step from p.inner in float64
    peers = {
        "cg": [Method("torchopt custom_root CG", "cg", "torchopt", "ift",
                      lambda: pa.torchopt_implicit(p, "cg", maxiter=it, rtol=0.0, ridge=d))]
        + ([Method("betty cg", "cg", "betty", "ift",
                   lambda: pa.betty_hypergrad(p, "cg", iterations=it))] if betty else [])
        + ([Method("jaxopt custom_root + solve_cg", "cg", "jax", "ift", jax_key="custom_root")] if jax else []),
        "neumann": [Method("torchopt custom_root Neumann", "neumann", "torchopt", "ift",
                           lambda: pa.torchopt_implicit(p, "ns", maxiter=s["terms"] - 1, alpha=a, ridge=d))]
        + ([Method("betty neumann", "neumann", "betty", "ift",
                   lambda: pa.betty_hypergrad(p, "neumann", iterations=s["terms"] - 1, alpha=a))] if betty else []),
        "unroll": [Method("higher innerloop_ctx", "unroll", "higher", "loop", lambda: pa.higher_unroll(p)),
                   Method("torchopt MetaSGD", "unroll", "torchopt", "loop", lambda: pa.torchopt_metasgd(p)),
                   Method("torchopt functional (autograd)", "unroll", "torchopt", "loop",
                          lambda: pa.torchopt_functional(p))]
        + ([Method("jax.grad through lax.scan", "unroll", "jax", "loop", jax_key="scan")] if jax else []),
        "onestep": [Method("betty darts", "onestep", "betty", "onestep",
                           lambda: pa.betty_hypergrad(p, "darts", warm=warm))] if betty else [],
    }
    rows = []
    for family in FAMILIES:
        if family == "exact" and (n_theta > EXACT_MAX_THETA or isinstance(p.extra.get("dense"), str)):
            left_out[family] = (p.extra["dense"] if isinstance(p.extra.get("dense"), str) else
                                f"dim θ = {n_theta} > {EXACT_MAX_THETA} (a dense Hessian for tiny problems only)")
            continue
        if family == "forward" and forward_max_dim and n_phi > forward_max_dim:
            left_out[family] = f"dim φ = {n_phi} > {forward_max_dim} (forward mode costs one loop per direction)"
            continue
        spec = ours_spec(family, s)
        w = warm if family == "onestep" else None
        w = warm if family == "f2sa" else w
        w = warm if family == "soba" else w
        for path in ("", *extra_paths):
            rows.append(Method(_ours_label(family, path), family, "ours", target[family],
                               (lambda spec=spec, w=w, path=path: pa.ours(p, spec, warm=w, path=path or None)),
                               path=path))
        rows.append(Method(f"hand-written autograd {family}", family, "autograd", target[family], hw[family][0]))
        rows.append(Method(f"hand-written torch.func {family}", family, "func", target[family], hw[family][1]))
        rows += peers.get(family, [])
    return rows, left_out
