"""Minibatch solvers against a hand computation: which batch each inner step, the Hessian and the mixed term use.

The problem is a quadratic whose every coefficient comes from the inner batch, batch k = (A_k, B_k, b_k):

    G(θ, φ; k) = ½ θᵀA_kθ + θᵀB_kφ − b_kᵀθ,      F(θ, φ) = ½‖θ − t‖² + ½ φᵀCφ   (one fixed outer batch),

so on batch k: ∇θG = A_kθ + B_kφ − b_k, H = ∂²G/∂θ² = A_k and (∂²G/∂φ∂θ)ᵀv = B_kᵀv. Every batch has its own
A, B and b, far apart, so a solver that reads the wrong batch anywhere is off by far more than the bound.

The batch conventions under test, as the library's docstrings state them:

- inner step k (k = 0 … K − 1) runs on ``inner_batch(k)`` (``InnerLoop.run``); ``unroll:truncate=T``
  differentiates steps K − T … K − 1, still on batches K − T … K − 1, and the checkpointed adjoint recomputes
  and differentiates each step on its own batch;
- the implicit solvers (cg, neumann, fixedpoint, exact) take the Hessian on ``inner_batch(K)``, the batch after
  the last one the loop used (``InnerLoop``: "implicit solvers then take the inner Hessian on
  inner_batch(steps)"; ``SubProblem.inner_batch``); ``Implicit.__call__`` builds the mixed term from the same
  ``inner_fn(problem, hessian_batch(inner_batch, K))``, so the mixed term is on ``inner_batch(K)`` too (the
  docstrings name only the Hessian; this file pins the mixed term as well). ``bilevel.solve`` does the same;
- ``onestep`` takes its one step on ``inner_batch(0)``.

The reference is a hand-written K-step loop (SGD, heavy ball, Adam written out in plain torch, float64) over
an explicit list of per-step batches, differentiated with ``torch.autograd.grad``; for the implicit solvers
the IFT formula Cφ − B_Kᵀ A_K⁻¹ (θ_K − t) at the hand loop's θ_K. Bound: relative error ≤ 1e-10. Each test
also computes the plausible wrong-batch variants (off by one, the last batch for all, the first, the full
data = the mean of all batches, a truncated or checkpointed segment re-indexed from 0) and asserts each is
more than 1e-3 away from the right answer, so the bound separates them by seven orders of magnitude.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import pytest
import torch

import bilevel

torch.set_num_threads(1)

DT = torch.float64
P, Q = 4, 3          # dim θ, dim φ
K = 7                # inner steps
LR = {"sgd": 0.25, "momentum": 0.12, "adam": 0.05}
BOUND = 1e-10        # relative error of a solver to the hand computation
APART = 1e-3         # minimal relative distance of every wrong-batch variant to the right answer
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# ---- the problem ----------------------------------------------------------------------------------------------

def make_batches(count: int = K + 2, seed: int = 0) -> list[Batch]:
    """``count`` batches (A_k, B_k, b_k): A_k symmetric with eigenvalues in [1, 3.5], B_k and b_k of scale 1 + k/2.

    The eigenvalues bound the SGD contraction (|1 − 0.25 λ| ≤ 0.75) and make every linear solve well conditioned.
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(count):
        q, _ = torch.linalg.qr(torch.randn(P, P, generator=gen, dtype=DT))
        eig = 1.0 + 2.5 * torch.rand(P, generator=gen, dtype=DT)
        scale = 1.0 + 0.5 * k
        out.append((q @ torch.diag(eig) @ q.T, scale * torch.randn(P, Q, generator=gen, dtype=DT),
                    scale * torch.randn(P, generator=gen, dtype=DT)))
    return out


def full_batch(batches: Sequence[Batch]) -> Batch:
    """The full data's coefficients: G on all of them is the mean of the per-batch losses."""
    return tuple(torch.stack([b[i] for b in batches]).mean(0) for i in range(3))


GEN = torch.Generator().manual_seed(1)
TARGET = torch.randn(P, generator=GEN, dtype=DT)
C = torch.diag(0.5 + torch.rand(Q, generator=GEN, dtype=DT))
PHI = torch.randn(Q, generator=GEN, dtype=DT)
THETA0 = torch.randn(P, generator=GEN, dtype=DT)  # non-zero: the first step's gradient depends on A_0 too
BATCHES = make_batches()


def inner_loss(inner, outer, batch):
    A, B, b = batch
    th = inner["theta"]
    return 0.5 * th @ (A @ th) + th @ (B @ outer["phi"]) - b @ th


def outer_loss(inner, outer, batch):
    return 0.5 * ((inner["theta"] - TARGET) ** 2).sum() + 0.5 * outer["phi"] @ (C @ outer["phi"])


PROBLEM = bilevel.BilevelProblem(inner_loss, outer_loss)


def inner_batch(k: int) -> Batch:
    """The callable the solvers get: step k → batch k."""
    return BATCHES[k]


# Every solver is checked on each autodiff path the library has (the autograd tape and torch.func).
PATHS = ("autograd", "func") if hasattr(bilevel, "autodiff_path") else ("default",)


def on_path(path: str):
    """Force the library's autodiff path for a block (nothing to force on a library with one path)."""
    return bilevel.autodiff_path(path) if path != "default" else contextlib.nullcontext()


def library(spec: str, path: str, optimizer: str = "sgd", loop: bilevel.InnerLoop | None = None, state=None):
    """``bilevel.hypergrad`` of the problem with ``inner_batch`` (step k → batch k), K steps, on ``path``."""
    loop = loop or bilevel.InnerLoop(steps=K, lr=LR[optimizer], optimizer=optimizer)
    with on_path(path):
        result = bilevel.hypergrad(PROBLEM, {"theta": THETA0.clone()}, {"phi": PHI.clone()}, inner_batch=inner_batch,
                                   outer_batch=None, solver=spec, loop=loop, state=state)
    assert result.diagnostics.get("autodiff_path", path) == path  # it ran where it was asked to
    return result


def quiet(spec: str) -> str:
    """``spec`` with ``stationarity_rtol=0``: θ_K is not stationary on batch K by design (no warning wanted)."""
    return spec + ("," if ":" in spec else ":") + "stationarity_rtol=0"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def assert_exact_and_separated(got: torch.Tensor, want: torch.Tensor, wrong: dict[str, torch.Tensor]) -> None:
    """``got`` equals ``want`` to BOUND, and every wrong-batch variant is more than APART from ``want``."""
    assert rel(got, want) <= BOUND, rel(got, want)
    for name, value in wrong.items():
        assert rel(value, want) > APART, (name, rel(value, want))


# ---- the hand computation -------------------------------------------------------------------------------------

def hand_step(theta, state, grad, optimizer: str, k: int):
    """One optimiser step written out with torchopt's conventions (heavy ball: m ← 0.9m + g, first m = g;
    Adam: m̂/(√v̂ + ε) with bias corrections); ``k`` is the optimiser's step index, from 0."""
    lr = LR[optimizer]
    if optimizer == "sgd":
        return theta - lr * grad, state
    if optimizer == "momentum":
        m = grad if state is None else 0.9 * state + grad
        return theta - lr * m, m
    b1, b2, eps = 0.9, 0.999, 1e-8
    m, v = (torch.zeros_like(grad), torch.zeros_like(grad)) if state is None else state
    m, v = b1 * m + (1 - b1) * grad, b2 * v + (1 - b2) * grad ** 2
    # torchopt raises β to its int64 step-count tensor, which torch computes in float32 (the default dtype):
    # the bias corrections 1 − β^(k+1) carry float32 rounding (~1e-7). Reproduce it, or the reference is off by that.
    count = torch.tensor(k + 1)
    m_hat, v_hat = m / (1 - torch.pow(b1, count)), v / (1 - torch.pow(b2, count))
    return theta - lr * m_hat / (v_hat.sqrt() + eps), (m, v)


def hand_loop(phi_of_step: Callable[[int], torch.Tensor], step_batches: Sequence[Batch], optimizer: str,
              theta0: torch.Tensor = THETA0) -> torch.Tensor:
    """θ_K of the loop whose step k runs on ``step_batches[k]`` with outer params ``phi_of_step(k)``."""
    theta, state = theta0.clone(), None
    for k, (A, B, b) in enumerate(step_batches):
        theta, state = hand_step(theta, state, A @ theta + B @ phi_of_step(k) - b, optimizer, k)
    return theta


def hand_unrolled(step_batches: Sequence[Batch], optimizer: str = "sgd", truncate: int = 0,
                  theta0: torch.Tensor = THETA0) -> torch.Tensor:
    """d/dφ F(θ_K(φ), φ) of the hand loop, by torch.autograd; with ``truncate=T`` the first K − T steps see φ
    as a constant (detached)."""
    phi = PHI.clone().requires_grad_(True)
    start = len(step_batches) - truncate if truncate else 0
    theta = hand_loop(lambda k: phi if k >= start else phi.detach(), step_batches, optimizer, theta0)
    value = 0.5 * ((theta - TARGET) ** 2).sum() + 0.5 * phi @ (C @ phi)
    return torch.autograd.grad(value, phi)[0]


def hand_implicit(theta_k: torch.Tensor, hessian_batch: Batch, mixed_batch: Batch) -> torch.Tensor:
    """The IFT hypergradient at θ_K: ∇φF − (∂²G/∂φ∂θ)ᵀ H⁻¹ ∇θF = Cφ − B_mᵀ A_h⁻¹ (θ_K − t)."""
    A, _, _ = hessian_batch
    _, B, _ = mixed_batch
    return C @ PHI - B.T @ torch.linalg.solve(A, theta_k - TARGET)


def per_step(indices: Sequence[int]) -> list[Batch]:
    return [BATCHES[i] for i in indices]


RIGHT = per_step(range(K))
WRONG_LOOPS = {  # the K steps' batches as a solver with a batch bug would use them
    "off by one (step k on batch k + 1)": per_step(range(1, K + 1)),
    "the last batch for every step": per_step([K - 1] * K),
    "the first batch for every step": per_step([0] * K),
    "the full data for every step": [full_batch(BATCHES[:K])] * K,
}


# ---- the hand computation itself ---------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_hand_optimiser_step_is_torchopts_on_one_fixed_batch(optimizer):
    """The hand-written optimisers are torchopt's: 7 steps on one fixed batch agree to 1e-14 with the
    library's loop (a fixed batch, so this says nothing about batches; it validates the reference)."""
    loop = bilevel.InnerLoop(steps=K, lr=LR[optimizer], optimizer=optimizer)
    theta, _, _ = loop.run(PROBLEM, {"theta": THETA0.clone()}, {"phi": PHI}, BATCHES[2])
    assert rel(theta["theta"], hand_loop(lambda k: PHI, [BATCHES[2]] * K, optimizer)) <= 1e-14


def test_hand_unrolled_sgd_equals_the_closed_form():
    """For SGD, θ_{k+1} = (I − ηA_k)θ_k − η(B_kφ − b_k) and J_{k+1} = (I − ηA_k)J_k − ηB_k (J_0 = 0), so
    dF/dφ = J_Kᵀ(θ_K − t) + Cφ: the autograd reference against this closed form (bound 1e-13)."""
    eta, eye = LR["sgd"], torch.eye(P, dtype=DT)
    theta, jac = THETA0.clone(), torch.zeros(P, Q, dtype=DT)
    for A, B, b in RIGHT:
        theta, jac = (eye - eta * A) @ theta - eta * (B @ PHI - b), (eye - eta * A) @ jac - eta * B
    assert rel(hand_unrolled(RIGHT), jac.T @ (theta - TARGET) + C @ PHI) <= 1e-13


# ---- unroll and forward: step k on batch k -----------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("spec", ["unroll", "unroll:checkpoint=true", "unroll:checkpoint=true,segment=3",
                                  "forward", "forward:chunk_size=2"])
def test_unrolled_solvers_differentiate_step_k_on_batch_k(spec, optimizer, path):
    result = library(spec, path, optimizer)
    want = hand_unrolled(RIGHT, optimizer)
    wrong = {name: hand_unrolled(batches, optimizer) for name, batches in WRONG_LOOPS.items()}
    assert_exact_and_separated(result.hypergrad["phi"], want, wrong)
    assert rel(result.inner["theta"], hand_loop(lambda k: PHI, RIGHT, optimizer)) <= BOUND  # θ_K itself


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("spec", ["unroll:truncate=4", "unroll:truncate=4,checkpoint=true",
                                  "unroll:truncate=4,checkpoint=true,segment=3"])
def test_truncated_unroll_differentiates_the_last_steps_on_their_own_batches(spec, optimizer, path):
    """truncate=4 of K=7: steps 0–2 run on batches 0–2 with φ held constant, steps 3–6 are differentiated on
    batches 3–6. Wrong variants: the differentiated segment re-indexed from 0 (batches 0–3, the bug of a
    forgotten ``start``), and the full, untruncated derivative."""
    result = library(spec, path, optimizer)
    want = hand_unrolled(RIGHT, optimizer, truncate=4)
    wrong = {name: hand_unrolled(batches, optimizer, truncate=4) for name, batches in WRONG_LOOPS.items()}
    wrong["differentiated steps re-indexed from 0"] = hand_unrolled(per_step([0, 1, 2, 0, 1, 2, 3]), optimizer,
                                                                    truncate=4)
    wrong["not truncated"] = hand_unrolled(RIGHT, optimizer)
    assert_exact_and_separated(result.hypergrad["phi"], want, wrong)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_checkpoint_segments_use_their_global_step_index(optimizer, path):
    """segment=3 over 7 steps: segments start at steps 0, 3, 6. A segment-local index (batches 0,1,2,0,1,2,0)
    or a segment-start index for every step in it (0,0,0,3,3,3,6) would be a plausible adjoint bug."""
    result = library("unroll:checkpoint=true,segment=3", path, optimizer)
    want = hand_unrolled(RIGHT, optimizer)
    wrong = {"segment-local index": hand_unrolled(per_step([0, 1, 2, 0, 1, 2, 0]), optimizer),
             "segment start for every step": hand_unrolled(per_step([0, 0, 0, 3, 3, 3, 6]), optimizer)}
    assert_exact_and_separated(result.hypergrad["phi"], want, wrong)


# ---- implicit solvers: H and the mixed term on inner_batch(K) -----------------------------------------------------

IMPLICIT = ["cg:rtol=1e-14,maxiter=100", "cg:rtol=1e-14,maxiter=100,hvp=fwdrev", "neumann:terms=300",
            "fixedpoint:rtol=1e-14,maxiter=2000", "exact"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("spec", IMPLICIT)
def test_implicit_solvers_take_hessian_and_mixed_term_on_batch_k(spec, path):
    """θ_K is the loop's (steps on batches 0 … K−1); H = A_K and the mixed term B_K, both of batch K.
    Wrong variants: either or both on batch K − 1 (the last step's), on batch 0, or on the full data."""
    result = library(quiet(spec), path)
    theta_k = hand_loop(lambda k: PHI, RIGHT, "sgd")
    assert rel(result.inner["theta"], theta_k) <= BOUND
    last, first, full = BATCHES[K - 1], BATCHES[0], full_batch(BATCHES[:K + 1])
    want = hand_implicit(theta_k, BATCHES[K], BATCHES[K])
    wrong = {"H and mixed on batch K − 1": hand_implicit(theta_k, last, last),
             "H on batch K − 1": hand_implicit(theta_k, last, BATCHES[K]),
             "mixed term on batch K − 1": hand_implicit(theta_k, BATCHES[K], last),
             "H and mixed on batch 0": hand_implicit(theta_k, first, first),
             "H and mixed on the full data": hand_implicit(theta_k, full, full),
             "θ_K from steps on batches 1 … K": hand_implicit(hand_loop(lambda k: PHI, WRONG_LOOPS[
                 "off by one (step k on batch k + 1)"], "sgd"), BATCHES[K], BATCHES[K])}
    assert_exact_and_separated(result.hypergrad["phi"], want, wrong)


@pytest.mark.parametrize("how", [*(f"backward on {path}" for path in PATHS), "torch.func.grad"])
@pytest.mark.parametrize("spec", ["cg:rtol=1e-14,maxiter=100", "exact"])
def test_solve_differentiates_the_implicit_solution_on_batch_k(spec, how):
    """bilevel.solve: the derivative of φ ↦ F(θ*(φ), φ), by ``.backward()`` (on each autodiff path) or by
    ``torch.func.grad``, uses dθ*/dφ = −A_K⁻¹B_K: the same batch as hypergrad."""
    loop = bilevel.InnerLoop(steps=K, lr=LR["sgd"])

    def objective(phi):
        theta = bilevel.solve(PROBLEM, {"theta": THETA0.clone()}, phi, inner_batch=inner_batch,
                              solver=quiet(spec), loop=loop)
        return outer_loss(theta, phi, None)

    if how == "torch.func.grad":
        got = torch.func.grad(objective)({"phi": PHI.clone()})["phi"]
    else:
        phi = PHI.clone().requires_grad_(True)
        with on_path(how.removeprefix("backward on ")):
            objective({"phi": phi}).backward()
        got = phi.grad
    theta_k = hand_loop(lambda k: PHI, RIGHT, "sgd")
    last = BATCHES[K - 1]
    assert_exact_and_separated(got, hand_implicit(theta_k, BATCHES[K], BATCHES[K]),
                               {"H and mixed on batch K − 1": hand_implicit(theta_k, last, last),
                                "mixed term on batch K − 1": hand_implicit(theta_k, BATCHES[K], last)})


# ---- onestep: its one step on inner_batch(0) ----------------------------------------------------------------------

def hand_onestep(batch: Batch, optimizer: str, warm: Sequence[int] = (5, 6, 7)) -> torch.Tensor:
    """d/dφ F(θ'(φ), φ) for the one step θ' from θ₀ on ``batch``, with the optimiser state that steps on the
    batches ``warm`` from θ₀ left (replayed by hand)."""
    theta, state = THETA0.clone(), None
    for k, (A, B, b) in enumerate(per_step(warm)):
        theta, state = hand_step(theta, state, A @ theta + B @ PHI - b, optimizer, k)
    phi = PHI.clone().requires_grad_(True)
    A, B, b = batch
    theta_new, _ = hand_step(THETA0.clone(), state, A @ THETA0 + B @ phi - b, optimizer, len(warm))
    value = 0.5 * ((theta_new - TARGET) ** 2).sum() + 0.5 * phi @ (C @ phi)
    return torch.autograd.grad(value, phi)[0]


def warm_state(loop: bilevel.InnerLoop):
    """The optimiser state after 3 steps from θ₀ on batches 5, 6, 7 (non-zero moments; Adam's count is 3)."""
    _, state, _ = loop.run(PROBLEM, {"theta": THETA0.clone()}, {"phi": PHI}, lambda k: BATCHES[5 + k], steps=3)
    return state


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_onestep_differentiates_one_step_on_batch_0(optimizer, path):
    """From θ₀ and a warm optimiser state, one step on batch 0. Wrong variants: the step on batch 1, on the
    last batch, on the full data. The warm state comes from the same InnerLoop object (see the next test)."""
    loop = bilevel.InnerLoop(steps=1, lr=LR[optimizer], optimizer=optimizer)
    result = library("onestep", path, loop=loop, state=warm_state(loop))
    want = hand_onestep(BATCHES[0], optimizer)
    wrong = {"batch 1": hand_onestep(BATCHES[1], optimizer), "last batch": hand_onestep(BATCHES[-1], optimizer),
             "full data": hand_onestep(full_batch(BATCHES), optimizer)}
    assert_exact_and_separated(result.hypergrad["phi"], want, wrong)


@pytest.mark.parametrize("path", PATHS)
def test_onestep_with_a_warm_momentum_state_on_a_new_inner_loop_object(path):
    """The same computation as above with an equal but new InnerLoop object: the answer must not depend on
    which object of equal settings runs the step (InnerLoop is a frozen dataclass of settings)."""
    state = warm_state(bilevel.InnerLoop(steps=1, lr=LR["momentum"], optimizer="momentum"))
    fresh = bilevel.InnerLoop(steps=1, lr=LR["momentum"], optimizer="momentum")
    result = library("onestep", path, loop=fresh, state=state)
    assert rel(result.hypergrad["phi"], hand_onestep(BATCHES[0], "momentum")) <= BOUND
