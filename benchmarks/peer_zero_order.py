"""Zeroth order: our ``cmaes`` against torchopt's zero-order estimators (part ``zero`` of benchmarks/peers.py).

Function evaluations (inner-loop runs) to reach a target outer loss on digits (64 L2 penalties), and the scale
of torchopt's estimators on a quadratic with a known gradient (its ``forward`` estimator is mis-scaled).
"""
from __future__ import annotations

import time

import torch

import common
from common import cosine, hw_run, md_table


def _keys(p):
    return list(p.inner), list(p.outer)


def zero_order(quick: bool) -> tuple[str, list]:
    """Function evaluations (inner-loop runs) to reach a target outer loss on digits (64 penalties).

    Target: F0 − 0.5 (F0 − F_cg), F_cg = the outer loss after 10 Adam steps (lr 0.1) on our cg
    hypergradient. Ours cmaes (popsize 8, σ 0.3, SGD lr 1 on its pseudo-gradient: popsize + 1 evaluations
    per generation) vs torchopt zero_order (naive / antithetic / forward; Normal(0, 1) perturbations,
    σ 0.1, 8 samples; Adam lr 0.1; evaluations per step = num_samples (+1 for forward/naive's base value
    (naive uses none), antithetic 2 per sample)."""
    import bilevel
    import torchopt
    p = common.digits_logreg(steps=20 if quick else 100)
    bp, loop = p.bilevel_problem(), p.loop()
    ik, ok = _keys(p)
    cap = 200 if quick else 600

    def outer_value(phi_t):
        with torch.no_grad():
            th, _ = hw_run(p, p.inner, {ok[0]: phi_t}, p.steps)
            return float(p.outer_loss(th, {ok[0]: phi_t}, p.outer_batch))

    phi0 = p.outer[ok[0]].clone()
    F0 = outer_value(phi0)
    phi = phi0.clone().requires_grad_(True)
    opt = torch.optim.Adam([phi], lr=0.1)
    for _ in range(10):
        r = bilevel.hypergrad(bp, p.inner, {ok[0]: phi.detach()}, inner_batch=p.inner_batch,
                              outer_batch=p.outer_batch, solver="cg:maxiter=200,rtol=1e-6", loop=loop)
        phi.grad = r.hypergrad[ok[0]]
        opt.step()
    F_cg = outer_value(phi.detach())
    target = F0 - 0.5 * (F0 - F_cg)
    rows = []

    # ours: cmaes
    t0 = time.perf_counter()
    state, phi_c, evals, reached = None, phi0.clone(), 0, None
    while evals < cap:
        r = bilevel.hypergrad(bp, p.inner, {ok[0]: phi_c}, inner_batch=p.inner_batch, outer_batch=p.outer_batch,
                              solver="cmaes:popsize=8,sigma=0.3,seed=1", loop=loop, state=state)
        state = r.state
        phi_c = phi_c - r.hypergrad[ok[0]]
        evals += int(r.diagnostics["evaluations"])
        if r.diagnostics["outer_loss"] <= target:
            reached = evals
            break
    rows.append(["ours cmaes (popsize 8, σ 0.3)", reached if reached else f"> {cap}", round(outer_value(phi_c), 4),
                 time.perf_counter() - t0])

    # torchopt zero-order
    for method in ("naive", "antithetic", "forward"):
        t0 = time.perf_counter()
        try:
            # a scalar distribution: torchopt draws sample(sample_shape=param.shape)
            dist = torch.distributions.Normal(torch.tensor(0.0), torch.tensor(1.0))
            per = {"naive": 8, "antithetic": 16, "forward": 9}[method]

            @torchopt.diff.zero_order(distribution=dist, method=method, argnums=0, num_samples=8, sigma=0.1)
            def objective(phi_t):
                with torch.no_grad():
                    th, _ = hw_run(p, p.inner, {ok[0]: phi_t}, p.steps)
                    return p.outer_loss(th, {ok[0]: phi_t}, p.outer_batch)

            torch.manual_seed(0)
            phi_z = phi0.clone().requires_grad_(True)
            opt = torch.optim.Adam([phi_z], lr=0.1)
            evals, reached = 0, None
            while evals < cap:
                loss = objective(phi_z)
                opt.zero_grad()
                loss.backward()
                opt.step()
                evals += per + 1  # its samples + the forward value
                if outer_value(phi_z.detach()) <= target:
                    reached = evals
                    break
            rows.append([f"torchopt zero_order '{method}' (8 samples, σ 0.1)", reached if reached else f"> {cap}",
                         round(outer_value(phi_z.detach()), 4), time.perf_counter() - t0])
        except Exception as err:
            rows.append([f"torchopt zero_order '{method}'", f"failed: {type(err).__name__}: {err}"[:120], "", ""])

    # the σ² scaling of torchopt's 'forward' estimator, measured on a quadratic with known gradient
    bias = []
    for method in ("naive", "antithetic", "forward"):
        for sigma in (0.1, 0.5):
            torch.manual_seed(0)
            a = torch.linspace(0.5, 2.0, 8, dtype=torch.float64)
            dist = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))

            @torchopt.diff.zero_order(distribution=dist, method=method, argnums=0, num_samples=4000, sigma=sigma)
            def quad(x):
                return (a * x * x).sum() * 0.5 + x.sum()

            x = torch.ones(8, dtype=torch.float64, requires_grad=True)
            quad(x).backward()
            true = a * 1.0 + 1.0
            bias.append([method, sigma, float(x.grad.norm() / true.norm()), cosine({"x": x.grad}, {"x": true})])
    text = "\n".join([
        f"Digits, 64 L2 penalties, K = {p.steps} SGD steps. F0 = {F0:.4f}; after 10 Adam steps on our cg "
        f"hypergradient F = {F_cg:.4f}; target F ≤ {target:.4f} (half of that decrease). Evaluations = "
        "inner-loop runs (each a full K-step training); capped at " + str(cap) + ".",
        "",
        md_table(["method", "evaluations to target", "final outer loss", "seconds"], rows),
        "",
        "torchopt zero-order estimators on f(x) = ½ Σ a_i x_i² + Σ x_i at x = 1 (exact gradient known), "
        "4,000 samples: ‖estimate‖/‖true‖ (1 = unbiased scale) and cosine.",
        "",
        md_table(["method", "σ", "norm ratio", "cosine"], bias),
    ])
    return text, rows + bias
