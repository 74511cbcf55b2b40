"""Single-loop warm-started implicit differentiation: SOBA (K = N = 1) and AmIGO (several steps of each).

The IFT hypergradient is dF/dφ = ∇φF − (∂²G/∂φ∂θ)ᵀ v* with v* = H⁻¹∇θF, H = ∂²G/∂θ². Instead of solving
for θ* and v* afresh at every outer step, both are *amortised*: θ and v are kept across outer steps (warm
starts) and each call moves them a few steps towards θ*(φ) and v*(φ) for the current φ. One call, at φ:

    θ ← θ − η ∇θG(θ, φ; batch k)                       K = inner_steps times (the loop's optimiser, batch k)
    v ← v − ρ (H v − ∇θF(θ, φ))                         N = v_steps times, H and ∇θF at the new θ
    return  ∇φF(θ, φ) − (∂²G/∂φ∂θ)ᵀ v                    at the new θ and v

The v update is gradient descent on the quadratic ½ vᵀHv − vᵀ∇θF (Richardson iteration for H v = ∇θF):
at fixed (θ, φ) the residual r = H v − ∇θF obeys r ← (I − ρH) r, so it falls at least by the factor
max(|1 − ρλ_min|, |1 − ρλ_max|) per step (1 − ρλ_min for ρ ≤ 1/λ_max) and diverges for ρ > 2/λ_max(H).
From v = 0, N steps give exactly the truncated Neumann series ρ Σ_{j<N} (I − ρH)^j ∇θF (``neumann``).

Sign convention. SOBA (Dagréou et al., eq. (5)–(6)) writes v* = −H⁻¹∇θF and the directions
D_θ = ∇θG, D_v = H v + ∇θF, D_φ = ∇φF + (∂²G/∂φ∂θ)ᵀ v. Here v = H⁻¹∇θF is the opposite vector (the one the
implicit solvers solve for), so D_v = H v − ∇θF and D_φ = ∇φF − (∂²G/∂φ∂θ)ᵀ v: the same iterates up to the
sign of v, and the same hypergradient (benchopt's SOBA uses this convention too).

Order of the updates. SOBA evaluates D_θ, D_v and D_φ all at the incoming (θ_t, v_t) and moves the three
variables at once; AmIGO (Arbel & Mairal, Alg. 1) moves θ first, then v at the new θ, then takes the
hypergradient at the new (θ, v). This solver uses AmIGO's order for every K, N (with K = N = 1 it is SOBA
with θ and v updated before, rather than alongside, the φ direction: same cost, same fixed point), so that the
returned hypergradient, θ and v are consistent and the diagnostics describe exactly the point it was taken at.

Batches: inner step k uses ``inner_batch(k)`` as the inner loop does; every second-order product of the call
(the N + 1 products with H and the mixed product) is taken on the Hessian batch ``inner_batch(K)``, as the
implicit solvers do (:func:`~bilevel.solvers.common.hessian_batch`); with minibatches the outer loop passes
new batches every outer step, so each call's v steps see a fresh sample (SOBA's stochastic directions).

Cost per call (``diagnostics``): ``evaluations`` = K inner gradients; one outer gradient (∇θF and ∇φF, one
reverse pass); ``hvp_count`` = N + 1 products with H: the N steps' products H v_0 … H v_{N−1} and H v_N,
which measures the true residual of the returned v (on the first call v_0 = 0 and H v_0 is skipped: N);
one mixed product (∂²G/∂φ∂θ)ᵀ v, not in ``hvp_count`` (as for the implicit solvers). All products come from one
linearisation of ∇θG at the new θ, whose value is ∇θG(θ) itself. Memory: θ, v and a few vectors like them.

Diagnostics never lie: ``residual`` is the measured ‖H v − ∇θF‖ / ‖∇θF‖ of the returned v (H and ∇θF at the
returned θ), ``residual_start`` that of the incoming v at the same θ, ``converged`` is ``residual ≤ rtol``,
and ``inner_grad_norm`` is the measured ‖∇θG(θ)‖ at the returned θ on the Hessian batch. Within one call H is
fixed, so for ρ ≤ 2/λ_max and H ⪰ 0 the residual cannot grow; when it does, a
:class:`~bilevel.errors.ConvergenceWarning` says that ρ is too large or H is indefinite. A single-loop method
is not converged early in a run by design, so a residual above ``rtol`` alone is reported, not warned about.

References: Dagréou, Ablin, Vaiter, Moreau, "A framework for bilevel optimization that enables stochastic and
global variance reduction algorithms", NeurIPS 2022, arXiv:2201.13409 (SOBA); Arbel & Mairal, "Amortized
implicit differentiation for stochastic bilevel optimization", ICLR 2022, arXiv:2111.14580 (AmIGO).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .. import tree
from ..autodiff import is_batched, value_and_grads
from ..errors import ConvergenceWarning, NonFiniteError
from ..types import HypergradResult
from .common import (detach_state, hessian_batch, inner_fn, last, outer_fn, scalar, solver_path,
                     warn_if_zero_hypergradient)
from .implicit import Implicit

AUTO = "auto"
# the implicit solvers' ``hvp=auto`` linearisation of ∇θG (tape graph or torch.func vjp): one place for it
_LINEARISE = Implicit(hvp="auto")._linearise


@dataclass(frozen=True)
class SOBA:
    """``soba``: warm-started single-loop implicit hypergradient (SOBA; AmIGO with several steps).

    Args:
        inner_steps: K ≥ 0 optimiser steps on θ per call, with the inner loop's optimiser and step size
            (warm-started: the loop's ``steps`` is not used). 1 is SOBA.
        v_steps: N ≥ 1 steps v ← v − ρ (H v − ∇θF) per call (warm-started from the previous call's v).
        v_lr: ρ > 0, or ``auto``: the inner loop's ``lr`` (SOBA uses one step size for θ and v; a step that
            keeps plain gradient descent on G stable, η < 2/λ_max(H), keeps the v iteration stable too).
            ``auto`` needs the ``sgd`` inner optimiser, whose ``lr`` is a gradient-descent step.
        rtol: ``converged`` = the measured relative residual of the returned v ≤ rtol.
    """

    inner_steps: int = 1
    v_steps: int = 1
    v_lr: float | str = AUTO
    rtol: float = 1e-3

    def __post_init__(self) -> None:
        if isinstance(self.inner_steps, bool) or not isinstance(self.inner_steps, int) or self.inner_steps < 0:
            raise ValueError(f"SOBA.inner_steps must be an int >= 0 (steps on θ per call), got {self.inner_steps!r}")
        if isinstance(self.v_steps, bool) or not isinstance(self.v_steps, int) or self.v_steps < 1:
            raise ValueError(f"SOBA.v_steps must be an int >= 1 (steps on v per call; with 0 v would never move "
                             f"from 0), got {self.v_steps!r}")
        if isinstance(self.v_lr, str):
            if self.v_lr != AUTO:
                raise ValueError(f"SOBA.v_lr must be a positive float or 'auto', got {self.v_lr!r}")
        elif not (self.v_lr > 0 and math.isfinite(self.v_lr)):
            raise ValueError(f"SOBA.v_lr must be a finite float > 0 (or 'auto'), got {self.v_lr}")
        if not self.rtol >= 0:
            raise ValueError(f"SOBA.rtol must be >= 0, got {self.rtol}")

    def init(self, problem, inner, outer) -> Any:
        return None  # {"v": v, "inner_state": the inner optimiser state}, made by the first call

    def step_size(self, loop) -> float:
        """ρ for ``loop``: ``v_lr``, or the loop's ``lr`` for ``auto`` (plain SGD only)."""
        if self.v_lr != AUTO:
            return float(self.v_lr)
        if loop.optimizer != "sgd":
            raise ValueError(f"SOBA(v_lr='auto') takes ρ = the inner loop's lr, a gradient-descent step, but the loop "
                             f"uses optimizer {loop.optimizer!r}, whose lr is not one; set v_lr explicitly "
                             "(below 2/λ_max(H), e.g. soba:v_lr=0.1)")
        return float(loop.lr)

    def __call__(self, problem, inner, outer, inner_batch, outer_batch, loop, state) -> HypergradResult:
        if loop.weight_decay:
            raise ValueError(f"soba differentiates the stationarity of inner_loss, but InnerLoop.weight_decay="
                             f"{loop.weight_decay} moves the loop's fixed point away from it; put the L2 term in "
                             "inner_loss.")
        rho = self.step_size(loop)
        path = solver_path(inner, outer)
        phi, theta = tree.detach(outer), tree.detach(inner)
        v, opt_state = self._unpack(state, theta)
        theta, opt_state, losses = loop.run(problem, theta, phi, inner_batch, steps=self.inner_steps,
                                            opt_state=opt_state, path=path, create_graph=False)
        theta = tree.detach(theta)
        # as in the implicit solvers: the products and the v iteration in full precision even under autocast
        device_type = next(iter(theta.values())).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            f_value, g_theta, g_phi = value_and_grads(outer_fn(problem, outer_batch), theta, phi, path)
            g_fn = inner_fn(problem, hessian_batch(inner_batch, self.inner_steps))
            hessian, grad_k, _, mixed = _LINEARISE(g_fn, theta, phi, path)
            b_norm = torch.clamp(tree.norm(g_theta), min=torch.finfo(next(iter(g_theta.values())).dtype).tiny)
            # r_k = H v_k − ∇θF is both the step direction and the measured residual of v_k
            products = 0
            if v is None:  # v_0 = 0: r_0 = −∇θF without a product
                v, r = tree.zeros_like(theta), tree.scale(g_theta, -1.0)
            else:
                r, products = tree.sub(hessian(v), g_theta), 1
            residual_start = tree.norm(r) / b_norm
            for _ in range(self.v_steps):
                v = tree.axpy(-rho, r, v)
                r = tree.sub(hessian(v), g_theta)
                products += 1
            residual = (tree.norm(r) / b_norm).detach()
            hypergrad = tree.detach(tree.sub(g_phi, mixed(v)))
        batched = is_batched(residual)
        diagnostics = {
            "inner_loss": last(losses), "outer_loss": scalar(f_value), "inner_steps": float(self.inner_steps),
            "hvp_count": float(products), "evaluations": float(self.inner_steps),
            "iterations": float(self.v_steps), "v_lr": rho,
            "residual": scalar(residual), "residual_start": scalar(residual_start.detach()),
            "converged": float("nan") if batched else float(float(residual) <= self.rtol),
            "inner_grad_norm": scalar(tree.norm(grad_k).detach()), "autodiff_path": path,
        }
        if not batched:
            self._check(diagnostics, rho)
        warn_if_zero_hypergradient(hypergrad, "SOBA")
        new_state = {"v": tree.detach(v), "inner_state": detach_state(opt_state)}
        return HypergradResult(hypergrad, theta, diagnostics, new_state)

    @staticmethod
    def _unpack(state: Any, theta) -> tuple[Any, Any]:
        """(v or None, inner optimiser state) from the previous call's state, checked against θ."""
        if state is None:
            return None, None
        if not isinstance(state, dict) or set(state) != {"v", "inner_state"}:
            keys = sorted(state) if isinstance(state, dict) else ""
            raise TypeError("soba: state must be the previous soba call's result.state, a dict with keys 'v' and "
                            f"'inner_state'; got {type(state).__name__} {keys}; pass state=None to start afresh")
        v = state["v"]
        if set(v) != set(theta) or any(v[k].shape != theta[k].shape for k in theta):
            raise ValueError("soba: the state's v does not match the inner params (keys/shapes "
                             f"{ {k: tuple(t.shape) for k, t in v.items()} } vs "
                             f"{ {k: tuple(t.shape) for k, t in theta.items()} }); it comes from another problem: "
                             "pass state=None to start afresh")
        return {k: v[k].to(theta[k]) for k in theta}, state["inner_state"]

    def _check(self, diagnostics: dict, rho: float) -> None:
        """NaN/Inf in the v iteration is an error; a residual that grew within the call (fixed H) a warning."""
        start, end = diagnostics["residual_start"], diagnostics["residual"]
        if not math.isfinite(end):
            raise NonFiniteError(f"soba: the v iteration's residual ‖Hv − ∇θF‖/‖∇θF‖ is {end} (from {start:.3g}): "
                                 f"v_lr={rho:g} is above 2/λ_max(H) or H is not positive definite; lower v_lr")
        # (I − ρH) is a contraction in norm for 0 ≤ ρH ≤ 2: any growth beyond rounding proves ρ or H wrong
        if end > 1.001 * start and end > self.rtol:
            warnings.warn(f"soba: the v iteration's residual grew within one call at fixed θ, from {start:.3g} to "
                          f"{end:.3g} in {self.v_steps} step(s): v_lr={rho:g} is above 2/λ_max(H) or the inner Hessian "
                          "is not positive definite here; lower v_lr (or train θ closer to a minimum)",
                          ConvergenceWarning, stacklevel=4)
