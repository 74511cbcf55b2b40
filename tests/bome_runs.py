"""Algorithm 1 by hand on the quadratic oracle, and outer runs, shared by the BOME tests (tests/test_bome.py), its
conformance criterion (tests/test_conformance.py) and its closed form in tests/test_two_paths.py.

BOME's per-call direction is not a hypergradient estimate (module docstring of bilevel/solvers/bome.py), so it is
judged by where its outer run ends: the outer loss at the exact inner solution, F(θ*(φ_N), φ_N), after N steps of
plain SGD on φ (Algorithm 1's outer update) with θ warm-started by the solver, against the same run with ``cg``.
"""
from __future__ import annotations

import warnings
from typing import Callable

import bilevel


def sgd_outer_run(problem, inner, outer, inner_batch, outer_batch, spec: str, loop: bilevel.InnerLoop, steps: int,
                  lr: float) -> tuple[dict, dict, list[dict]]:
    """``steps`` outer steps φ ← φ − lr·g with g = ``spec``'s hypergradient, the inner params warm-started from each
    call's ``result.inner`` and the solver state carried over (what ``bilevel.OuterLoop`` does with
    ``warm_start=True`` and an SGD outer optimiser). Returns the final φ and θ and every call's diagnostics."""
    theta, phi, state, history = dict(inner), {k: v.clone() for k, v in outer.items()}, None, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a warm-started cg's stationarity warning: its values are checked here
        for _ in range(steps):
            result = bilevel.hypergrad(problem, theta, phi, inner_batch=inner_batch, outer_batch=outer_batch,
                                       solver=spec, loop=loop, state=state, validate=False)
            theta, state = result.inner, result.state
            phi = {k: v - lr * result.hypergrad[k] for k, v in phi.items()}
            history.append(result.diagnostics)
    return phi, theta, history


def gap_closed(f_start: float, f_run: float, f_reference: float) -> float:
    """(F_start − F_run) / (F_start − F_reference): the fraction of the reference run's decrease of the outer loss
    that a run achieves (1: as far as the reference)."""
    return (f_start - f_run) / (f_start - f_reference)


def outer_loss_at_solution(solution: Callable[[dict], dict], problem, outer: dict, outer_batch) -> float:
    """F(θ*(φ), φ) with θ*(φ) = ``solution(φ)`` (a closed form or a converged solve)."""
    return float(problem.outer(solution(outer), outer, outer_batch))


def bome_by_hand(c, theta, phi, T, alpha, eta, control, xi):
    """Algorithm 1 on the quadratic oracle G = ½θᵀAθ + θᵀBφ − bᵀθ, F = ½‖θ − t‖² + ½φᵀCφ, written out."""
    A, B, b, t, C = c["A"], c["B"], c["b"], c["t"], c["C"]
    G = lambda th: 0.5 * th @ (A @ th) + th @ (B @ phi) - b @ th  # noqa: E731
    theta_t = theta.clone()
    for _ in range(T):
        theta_t = theta_t - alpha * (A @ theta_t + B @ phi - b)
    q = G(theta) - G(theta_t)
    dq_phi, dq_theta = B.T @ (theta - theta_t), A @ theta + B @ phi - b  # ∇φG(θ) − ∇φG(θ_T), ∇θG(θ)
    df_phi, df_theta = C @ phi, theta - t
    dq_sq = dq_phi @ dq_phi + dq_theta @ dq_theta
    c_k = eta * (dq_sq if control == "gradient" else q)
    lam = max(float((c_k - df_phi @ dq_phi - df_theta @ dq_theta) / dq_sq), 0.0)
    d_phi, d_theta = df_phi + lam * dq_phi, df_theta + lam * dq_theta
    return {"d_phi": d_phi, "theta": theta - xi * d_theta, "q": float(q), "lambda": lam,
            "grad_q_norm": float(dq_sq.sqrt()), "control": float(c_k), "inner_grad_norm": float(dq_theta.norm()),
            "inner_loss": float(G(theta)), "outer_loss": float(0.5 * ((theta - t) ** 2).sum() + 0.5 * phi @ (C @ phi))}
