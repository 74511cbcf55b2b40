"""BOME (Bilevel Optimization Made Easy): a first-order step on the joint variable (φ, θ) under a value-function
constraint, with a dynamic barrier.

BOME solves the value-function reformulation ``min_{φ,θ} F(θ, φ)  s.t.  q(φ, θ) = G(θ, φ) − min_θ' G(θ', φ) ≤ 0``
with q approximated from T inner steps started at the current θ:

    θ_T = the loop's T steps from θ at fixed φ,           q̂(φ, θ) = G(θ, φ) − G(θ_T, φ),

θ_T held constant (no derivative through the loop; by Danskin, ∇φ min_θ' G = ∇φG(θ*, φ)), so

    ∇q̂ = (∇φq̂, ∇θq̂) = (∇φG(θ, φ) − ∇φG(θ_T, φ),  ∇θG(θ, φ)),

and the direction of Algorithm 1, for the joint variable, is

    d = ∇F + λ ∇q̂,     λ = max((c − ⟨∇F, ∇q̂⟩) / ‖∇q̂‖², 0),     c = η ‖∇q̂‖²  (``control=gradient``)
                                                                      c = η q̂      (``control=value``)

with ∇F = (∇φF(θ, φ), ∇θF(θ, φ)) at the *current* θ (not θ_T). λ is the smallest multiplier with
⟨d, ∇q̂⟩ ≥ c: d is ∇F projected onto the half-space where a small step along −d decreases q̂ at rate c. When
∇q̂ = 0 exactly (θ already a stationary point the loop does not leave) the constraint gives no direction and
λ = 0, d = ∇F. The reference code divides by ‖∇q̂‖² + 1e-4 (toy) or + 1e-8 (hyper-cleaning); here the
division is exact, so the reported λ is the formula's λ.

The control (the paper's φ_k): c = η‖∇q̂‖², i.e. λ = max(η − ⟨∇F, ∇q̂⟩/‖∇q̂‖², 0), is what the authors' released
toy experiment runs (η = 0.5) and benchopt's BOME solver's default (``phi_choice="grad"``, η = 0.5), and the default
here; the authors' hyper-cleaning script uses c = η q̂ instead (``control=value``; benchopt's ``phi_choice="value"``).
With c = η‖∇q̂‖² and λ > 0, ⟨d, ∇q̂⟩ = η‖∇q̂‖² exactly: λ is invariant to the scale of q̂.

In the library (an ``online`` solver): the φ-part d_φ is returned as the "hypergradient", which the outer
optimiser applies; the θ-part is applied here, θ ← θ − ξ_θ d_θ, and the new θ is returned as ``inner`` (the warm
start of the next call; run with ``Nested.warm_start=True``, or θ restarts from the sub-problem's init every
step). Algorithm 1 moves both blocks by the same step ξ: the outer loop therefore runs BOME with SGD at
``lr`` = ξ (``outer_update``, as CMA-ES pairs with SGD at lr 1), and ξ_θ = ``theta_lr``, equal to ``lr``
unless set. Called directly (``bilevel.hypergrad``) with another outer optimiser, the coupling is the caller's:
ξ_θ is then only the θ step. Nothing else persists between calls (θ_T restarts from θ each time, the paper's
θ^(0) = θ_k), so the state is None.

Cost per call: T inner gradients (the loop) + 3 gradients (∇G at θ, ∇φG and G at θ_T, ∇F at θ), no
Hessian-vector product; memory independent of T. Diagnostics: ``q`` = q̂, ``lambda`` = λ, ``grad_q_norm`` =
‖∇q̂‖, ``control`` = c, ``inner_grad_norm`` = ‖∇θG(θ, φ)‖ (= ‖∇θq̂‖), ``theta_step_norm`` = ξ_θ‖d_θ‖;
``inner_loss`` and ``outer_loss`` are G and F at the current θ (the model BOME trains). G and its gradients
are taken on the batch after the loop's, ``inner_batch(T)`` (the only batch in full-batch training), so that
q̂ compares G at θ and θ_T on one batch.

Reference: Liu, Ye, Wright, Stone, Liu, "BOME! Bilevel Optimization Made Easy: A Simple First-Order Approach",
NeurIPS 2022, arXiv:2209.08709 (Algorithm 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .. import tree
from ..autodiff import value_and_grads
from ..types import HypergradResult
from .common import hessian_batch, inner_fn, outer_fn, scalar, solver_path

CONTROLS = ("gradient", "value")


def _positive(name: str, value: Any, zero_ok: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not zero_ok):
        bound = ">= 0" if zero_ok else "> 0"
        raise ValueError(f"BOME.{name} must be a finite number {bound}, got {value!r}")


def _joint_norm(a: dict, b: dict) -> torch.Tensor:
    """‖(a, b)‖ of two param dicts (keys may repeat between them), without under- or overflow (:func:`tree.norm`)."""
    return tree.norm({**{f"outer/{k}": v for k, v in a.items()}, **{f"inner/{k}": v for k, v in b.items()}})


@dataclass(frozen=True)
class BOME:
    """``bome``: one BOME step on (φ, θ) (module docstring); returns d_φ and θ − ξ_θ d_θ.

    Args:
        eta: barrier coefficient η > 0 of the control c (the paper's default 0.5).
        control: ``gradient`` (c = η‖∇q̂‖², Algorithm 1) or ``value`` (c = η q̂).
        lr: the step ξ of Algorithm 1; the outer loop steps φ by SGD at this rate (``outer_update``).
        theta_lr: the step ξ_θ on θ; 0 (default): equal to ``lr``.
    """

    eta: float = 0.5
    control: str = "gradient"
    lr: float = 0.01
    theta_lr: float = 0.0

    def __post_init__(self) -> None:
        _positive("eta", self.eta)
        _positive("lr", self.lr)
        _positive("theta_lr", self.theta_lr, zero_ok=True)
        if self.control not in CONTROLS:
            raise ValueError(f"BOME.control must be one of {CONTROLS}, got {self.control!r}")

    @property
    def outer_update(self) -> tuple[str, float]:
        """The outer optimiser of Algorithm 1: SGD with the same step ξ as θ's (read by the outer loop)."""
        return ("sgd", self.lr)

    @property
    def theta_step(self) -> float:
        """ξ_θ: ``theta_lr``, or ``lr`` when it is 0."""
        return self.theta_lr or self.lr

    def init(self, problem, inner, outer) -> Any:
        return None  # nothing persists but θ itself, which is returned as the warm start

    def __call__(self, problem, inner, outer, inner_batch, outer_batch, loop, state) -> HypergradResult:
        if loop.steps < 1:
            raise ValueError("BOME needs InnerLoop.steps >= 1: θ_T, the T-step approximation of the inner minimiser "
                             "that defines the value gap q = G(θ) − G(θ_T), is the loop run from θ; got steps=0")
        if loop.weight_decay:
            raise ValueError(f"BOME's value gap q = G(θ) − G(θ_T) compares inner_loss values, but "
                             f"InnerLoop.weight_decay={loop.weight_decay} makes the loop minimise another function; "
                             "put the L2 term in inner_loss.")
        path = solver_path(inner, outer)
        theta, phi = tree.detach(inner), tree.detach(outer)
        theta_t, _, _ = loop.run(problem, theta, phi, inner_batch, path=path, create_graph=False)
        theta_t = tree.detach(theta_t)
        g_fn = inner_fn(problem, hessian_batch(inner_batch, loop.steps))
        g_value, g_theta, g_phi = value_and_grads(g_fn, theta, phi, path)
        g_value_t, _, g_phi_t = value_and_grads(g_fn, theta_t, phi, path)  # θ_T constant: only its φ-gradient
        f_value, f_theta, f_phi = value_and_grads(outer_fn(problem, outer_batch), theta, phi, path)
        q = g_value - g_value_t
        dq_phi, dq_theta = tree.sub(g_phi, g_phi_t), g_theta
        dq_sq = tree.dot(dq_phi, dq_phi) + tree.dot(dq_theta, dq_theta)
        inner_product = tree.dot(f_phi, dq_phi) + tree.dot(f_theta, dq_theta)
        control = self.eta * (dq_sq if self.control == "gradient" else q)
        # λ = 0 where ∇q̂ = 0 (no constraint direction); torch.where keeps it free of host reads (vmap)
        safe = torch.where(dq_sq > 0, dq_sq, torch.ones_like(dq_sq))
        lam = torch.where(dq_sq > 0, torch.clamp((control - inner_product) / safe, min=0.0), torch.zeros_like(dq_sq))
        d_phi = tree.axpy(lam, dq_phi, f_phi)
        d_theta = tree.axpy(lam, dq_theta, f_theta)
        theta_new = tree.axpy(-self.theta_step, d_theta, theta)
        diagnostics = {"inner_loss": scalar(g_value), "outer_loss": scalar(f_value), "inner_steps": float(loop.steps),
                       "hvp_count": 0.0, "evaluations": float(loop.steps + 3), "q": scalar(q), "lambda": scalar(lam),
                       "grad_q_norm": scalar(_joint_norm(dq_phi, dq_theta)), "control": scalar(control),
                       "inner_grad_norm": scalar(tree.norm(g_theta)),
                       "theta_step_norm": scalar(self.theta_step * tree.norm(d_theta)), "autodiff_path": path}
        return HypergradResult(tree.detach(d_phi), tree.detach(theta_new), diagnostics, None)
