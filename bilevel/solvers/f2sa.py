"""F2SA: a fully first-order hypergradient from a penalty reformulation (no second derivatives at all).

Kwon, Kwon, Wright, Nowak, "A Fully First-Order Method for Stochastic Bilevel Optimization", ICML 2023,
arXiv:2301.10945. The bilevel problem is relaxed to the penalty (Lagrangian) problem

    min_φ L*_λ(φ),   L*_λ(φ) = min_y [ F(y, φ) + λ (G(y, φ) − min_z G(z, φ)) ],

whose gradient needs gradients only: with y*_λ(φ) = argmin_y F + λG and θ*(φ) = argmin_z G (Danskin),

    ∇L*_λ(φ) = ∇φF(y*_λ, φ) + λ (∇φG(y*_λ, φ) − ∇φG(θ*, φ)).

Bias, O(1/λ) (the paper, Section 3): y*_λ − θ* = −H⁻¹∇θF/λ + O(1/λ²) (H = ∇²θθG), so λ(∇φG(y*_λ) − ∇φG(θ*))
= −(∂²G/∂φ∂θ)ᵀH⁻¹∇θF + O(1/λ) and ∇L*_λ = dF/dφ + O(1/λ) when G is strongly convex in θ. The constant grows
with the conditioning of H and the curvature of F and G; tests/test_f2sa.py measures error × λ constant on
the ridge oracle (relative error × λ = 0.55 … 0.58 for λ = 10 … 1e4; 0.92 on the quadratic oracle). The inner
errors are multiplied by λ: ‖direction − ∇L*_λ‖ ≲ λ·‖∂²G/∂φ∂θ‖·(‖y − y*_λ‖ + ‖z − θ*‖), which is why y and z
are warm-started across calls, and why a large λ needs accurate iterates and loses about log10(λ) digits to the
cancellation in ∇φG(y) − ∇φG(z) (keep λ ≲ 1e4 in float32).

One call (outer step k, λ_k = min(lambda_max, lambda0 · (1 + k)^lambda_power), k = calls so far):
  - T = ``steps`` steps of the loop's optimiser on each inner variable, from their warm starts, on the
    same batch ``inner_batch(t)`` at step t:
        z ← step on G(z, φ)                        (the lower-level problem; step size γ = the loop's lr)
        y ← step on G(y, φ) + F(y, φ)/λ            (same minimiser as F + λG; plain SGD steps are
                                                    y ← y − (γ/λ)(∇θF + λ∇θG), the paper's α_k = γ_k/λ_k)
    The rescaled objective G + F/λ has the curvature of G, so the step size tuned for the inner loop
    suits y at every λ (for Adam/momentum loops the same optimiser runs on the rescaled gradient).
  - returns  ∇φF(y, φ) + λ (∇φG(y, φ) − ∇φG(z, φ)),  all three on the batches ``outer_batch`` and
    ``inner_batch(T)`` (one batch for both ∇φG terms, so no batch noise is multiplied by λ), computed
    outside autocast (λ amplifies rounding).

The paper's schedule (Algorithm 1: λ_{k+1} = λ_k + δ_k; its stochastic theorem: λ_k ∝ (k + k₀)^{a−c} with
step sizes α_k ∝ (k + k₀)^{−a}, γ_k ∝ (k + k₀)^{−c}, a = 5/7, c = 4/7 with noise in both levels, the exponents
benchopt's F2SA uses too) is the default ``lambda_power = 1/7`` (``steps`` = 10 is benchopt's default too);
``lambda_max`` caps λ (the bias floor is then C/lambda_max), ``lambda_power=0`` keeps λ = lambda0 fixed. The
step sizes here stay the loop's (decay them with the loop if wanted): the schedule couples them only through
α = γ/λ.

Returned ``inner``: z, the iterate of the lower-level problem min_z G (an estimate of θ*(φ): the model
trained on the inner loss, what a problem's ``evaluate`` and the outer loop's warm start expect). y, which
is pulled towards the outer loss by O(1/λ), lives in the state (``{"y", "y_opt", "z_opt", "calls"}``) and
starts at the given inner params on the first call (state None).

Cost per call: 3T + 3 loss gradients (∇θG(z), ∇θG(y), ∇θF(y) per step; the final ∇(θ,φ)F(y), ∇(θ,φ)G(y),
∇(θ,φ)G(z), whose θ parts give the diagnostics), one value F(z), and no Hessian-vector product
(``hvp_count`` = 0). With a callable ``inner_batch`` or under autocast the start-of-call gradient norms take
3 more gradients (otherwise they are read from the first step's own gradients). Memory: flat (two
copies of θ and their optimiser states).

Diagnostics (measured, on ``inner_batch(T)``): ``lambda``; ``inner_grad_norm`` = ‖∇θG(z)‖ and
``inner_grad_norm_rel`` (÷ its value at the call's start z); ``penalty_grad_norm`` = ‖∇θF(y) + λ∇θG(y)‖ and
``penalty_grad_norm_rel``; ``y_z_distance`` = ‖y − z‖ (O(1/λ) when both are converged); ``outer_loss`` =
F(z), ``outer_loss_y`` = F(y), ``inner_loss`` = G(z); ``hvp_count`` = 0; ``evaluations`` = 3T + 3 loss gradients
(+ 3 when the start norms are recomputed; the forward value F(z) is not a gradient and not counted).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .. import tree
from ..autodiff import is_batched, value_and_grads
from ..inner import batch_at, raise_if_nonfinite
from ..types import BilevelProblem, HypergradResult
from .common import detach_state, full_precision, inner_fn, outer_fn, scalar, solver_path, stationarity

STATE_KEYS = ("y", "y_opt", "z_opt", "calls")


@dataclass(frozen=True)
class F2SA:
    """``f2sa``: fully first-order penalty hypergradient ∇φF(y) + λ(∇φG(y) − ∇φG(z)) (module docstring).

    Args:
        steps: T, optimiser steps on each of y and z per call (from their warm starts).
        lambda0: the multiplier λ at the first call.
        lambda_power: λ_k = lambda0 · (1 + k)^lambda_power at call k (the paper's 1/7; 0: fixed λ).
        lambda_max: cap on λ_k.
    """

    steps: int = 10
    lambda0: float = 10.0
    lambda_power: float = 1 / 7
    lambda_max: float = 1e4

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"F2SA.steps must be an int >= 1 (inner steps on y and z per call), got {self.steps!r}")
        for name in ("lambda0", "lambda_power", "lambda_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"F2SA.{name} must be a finite number, got {value!r}")
        if not self.lambda0 > 0:
            raise ValueError(f"F2SA.lambda0 must be > 0 (the penalty multiplier), got {self.lambda0}")
        if self.lambda_power < 0:
            raise ValueError(f"F2SA.lambda_power must be >= 0 (λ may only grow: the bias is O(1/λ)), got "
                             f"{self.lambda_power}")
        if self.lambda_max < self.lambda0:
            raise ValueError(f"F2SA.lambda_max ({self.lambda_max}) must be >= lambda0 ({self.lambda0}); raise "
                             "lambda_max or lower lambda0")

    def multiplier(self, calls: int) -> float:
        """λ_k = min(lambda_max, lambda0 · (1 + k)^lambda_power) at call k = ``calls``."""
        return min(self.lambda_max, self.lambda0 * (1.0 + calls) ** self.lambda_power)

    def init(self, problem, inner, outer) -> Any:
        return None  # y starts at the first call's inner params; the optimiser states on their first step

    def __call__(self, problem, inner, outer, inner_batch, outer_batch, loop, state) -> HypergradResult:
        path = solver_path(inner, outer)
        phi, z = tree.detach(outer), tree.detach(inner)
        y, y_opt, z_opt, calls = self._unpack(state, z)
        lam = self.multiplier(calls)
        # G + F/λ: the y-problem rescaled by 1/λ (module docstring: the loop's step size then fits it)
        penalised = BilevelProblem(
            lambda th, ph, b: problem.inner(th, ph, b) + problem.outer(th, ph, outer_batch) / lam,
            problem.outer_loss)
        losses, first = [], None
        for t in range(self.steps):
            batch = batch_at(inner_batch, t)
            z_new, z_opt, z_loss, gz = loop.step_with_gradient(problem, z, z_opt, phi, batch, path=path,
                                                               create_graph=False)
            y_new, y_opt, _, gy = loop.step_with_gradient(penalised, y, y_opt, phi, batch, path=path,
                                                          create_graph=False)
            if t == 0:
                first = (tree.norm(tree.detach(gz)), lam * tree.norm(tree.detach(gy)))  # ∇(F + λG) = λ∇(G + F/λ)
            z, y = tree.detach(z_new), tree.detach(y_new)
            losses.append(z_loss.detach())
        stacked = torch.stack(losses)
        if not is_batched(stacked):  # under vmap no host-side check is possible (as in InnerLoop.run)
            raise_if_nonfinite(stacked, 0, "inner loss", "F2SA inner step")
        z_opt, y_opt = detach_state(z_opt), detach_state(y_opt)

        batch = batch_at(inner_batch, self.steps)
        device = next(iter(z.values())).device.type
        with torch.autocast(device_type=device, enabled=False):  # λ multiplies rounding: full precision
            f_y, gf_theta, gf_phi = value_and_grads(outer_fn(problem, outer_batch), y, phi, path)
            _, gg_theta_y, gg_phi_y = value_and_grads(inner_fn(problem, batch), y, phi, path)
            g_z, gg_theta_z, gg_phi_z = value_and_grads(inner_fn(problem, batch), z, phi, path)
            f_z = problem.outer(z, phi, outer_batch).detach()
            extra = 0
            if callable(inner_batch) or not full_precision(z):  # the first step's norms were on another batch
                first = self._start_norms(problem, tree.detach(inner), state, phi, batch, outer_batch, lam, path)
                extra = 3
        hypergrad = tree.detach(tree.add(gf_phi, tree.scale(tree.sub(gg_phi_y, gg_phi_z), lam)))
        penalty_grad = tree.add(gf_theta, tree.scale(gg_theta_y, lam))
        z_stat = stationarity(tree.norm(gg_theta_z), first[0])
        y_stat = stationarity(tree.norm(penalty_grad), first[1])
        diagnostics = {
            "inner_loss": scalar(g_z), "outer_loss": scalar(f_z), "outer_loss_y": scalar(f_y),
            "inner_steps": float(self.steps), "hvp_count": 0.0,
            "evaluations": float(3 * self.steps + 3 + extra), "lambda": float(lam), "calls": float(calls),
            **z_stat,
            "penalty_grad_norm": y_stat["inner_grad_norm"], "penalty_grad_norm_rel": y_stat["inner_grad_norm_rel"],
            "y_z_distance": scalar(tree.norm(tree.sub(y, z))),
            "autodiff_path": path,
        }
        new_state = {"y": y, "y_opt": y_opt, "z_opt": z_opt, "calls": calls + 1}
        return HypergradResult(hypergrad, z, diagnostics, new_state)

    def _unpack(self, state: Any, z: dict) -> tuple[dict, Any, Any, int]:
        """(y, y's optimiser state, z's optimiser state, calls so far) from ``state``, checked."""
        if state is None:
            return dict(z), None, None, 0
        if not isinstance(state, dict) or set(state) != set(STATE_KEYS):
            raise ValueError(f"F2SA state must be the dict with keys {STATE_KEYS} that the previous call returned "
                             f"(result.state), got {type(state).__name__}"
                             f"{' with keys ' + str(sorted(state)) if isinstance(state, dict) else ''}; pass "
                             "state=None to start afresh")
        y = state["y"]
        if set(y) != set(z) or any(y[k].shape != z[k].shape for k in z):
            raise ValueError("F2SA state holds y for other inner params (keys or shapes differ from the inner "
                             "params given); pass state=None to start afresh, or the state of this model's last call")
        calls = state["calls"]
        if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
            raise ValueError(f"F2SA state['calls'] must be a non-negative int, got {calls!r}")
        return {k: y[k].to(z[k].device, z[k].dtype) for k in z}, state["y_opt"], state["z_opt"], calls

    def _start_norms(self, problem, z0, state, phi, batch, outer_batch, lam, path):
        """‖∇θG(z₀)‖ and ‖∇θF(y₀) + λ∇θG(y₀)‖ at the call's start, on ``batch`` (3 gradients)."""
        y0 = self._unpack(state, z0)[0]
        _, gz, _ = value_and_grads(inner_fn(problem, batch), z0, phi, path)
        _, gf, _ = value_and_grads(outer_fn(problem, outer_batch), y0, phi, path)
        _, gg, _ = value_and_grads(inner_fn(problem, batch), y0, phi, path)
        return tree.norm(gz), tree.norm(tree.add(gf, tree.scale(gg, lam)))
