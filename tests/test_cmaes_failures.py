"""CMA-ES generations in which some candidates fail (non-finite outer loss), against pycma driven by hand.

What the library defines (``bilevel/solvers/cmaes.py``): a candidate whose outer loss is NaN/Inf is told to cma as
the worst finite score of its generation plus one, so that it is ranked last; ``nonfinite_candidates`` counts them;
``best_candidate_loss`` / ``mean_candidate_loss`` / ``best_index`` are over the finite scores; the
pseudo-gradient is m_old − m_new; a generation in which every candidate fails raises ``NonFiniteError``.

The problem fails for real: G(θ, φ) = ¼ e^{φ₀} ‖θ − φ₁𝟙‖⁴ trained by SGD (lr 0.5, 30 steps, θ₀ = 0). A quartic's
gradient step x ← (1 − η e^{φ₀}‖x‖²) x shrinks ‖x‖ while η e^{φ₀}‖x‖² < 2 and otherwise grows it ever faster
(doubly exponentially), overflowing to NaN within a few steps: candidates with a large φ₀ or |φ₁| diverge and their
outer loss F(θ) = ‖θ − t‖² is NaN, the others converge with moderate losses. The hand computation replays the
SGD recursion in numpy (float64) for every candidate, asks and tells a ``cma.CMAEvolutionStrategy`` built with
pycma's own ``seed`` option (the library draws the same stream from a private ``RandomState``; here it is
checked against pycma's), and compares: the candidates (bitwise), the told values and every diagnostic
(relative error ≤ 1e-12, the replay's rounding against torch's), the ranking (identical), and the new mean
and σ (≤ 1e-14: the update depends on the ranking only). The test also shows that the wrong definitions —
failing candidates dropped, or told 0 (ranked first) — move the mean by far more than that.
"""
from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import pytest
import torch
import cma
from cma.recombination_weights import RecombinationWeights

import bilevel
from bilevel.context import local_context
from bilevel.errors import NonFiniteError
from bilevel.solvers.cmaes import CMAES

torch.set_num_threads(1)

DT = torch.float64
STEPS, LR = 30, 0.5
TARGET = np.array([0.5, -1.0, 2.0])
POPSIZE, SIGMA, SEED = 8, 0.8, 4
START = np.array([0.0, 1.0])          # φ = (φ₀, φ₁); generation 0 of SEED has 3 failing candidates of 8
LOOP = bilevel.InnerLoop(steps=STEPS, lr=LR)
VALUES = 1e-12                       # relative error of a score or diagnostic (numpy replay vs torch)
MEAN = 1e-14                         # absolute error of the new mean and σ (rank-based: same ranking, same update)


def inner_loss(inner, outer, batch):
    d = inner["theta"] - outer["phi"][1]
    return 0.25 * torch.exp(outer["phi"][0]) * (d @ d) ** 2


def outer_loss(inner, outer, batch):
    r = inner["theta"] - torch.as_tensor(TARGET, dtype=DT)
    return r @ r


PROBLEM = bilevel.BilevelProblem(inner_loss, outer_loss)
THETA0 = {"theta": torch.zeros(3, dtype=DT)}


# ---- the hand computation --------------------------------------------------------------------------------------

def replay(x: np.ndarray) -> tuple[float, float, int]:
    """(F(θ_K), G(θ_{K−1}), first step whose iterate is non-finite or −1), by the SGD recursion in numpy."""
    a, c = math.exp(x[0]), x[1]
    theta, g_last, blown = np.zeros(3), math.nan, -1
    with np.errstate(all="ignore"):
        for k in range(STEPS):
            d = theta - c
            n2 = d @ d
            g_last = 0.25 * a * n2 * n2
            theta = theta - LR * (a * n2 * d)
            if blown < 0 and not np.isfinite(theta).all():
                blown = k
        r = theta - TARGET
        return float(r @ r), float(g_last), blown


@contextlib.contextmanager
def global_numpy_random_restored():
    """pycma's ``seed`` option reseeds and draws from the global np.random: give it back afterwards."""
    saved = np.random.get_state()
    try:
        yield
    finally:
        np.random.set_state(saved)


def pycma(x0: np.ndarray, sigma: float, popsize: int) -> cma.CMAEvolutionStrategy:
    """pycma's strategy with its own ``seed`` option (call inside :func:`global_numpy_random_restored`)."""
    return cma.CMAEvolutionStrategy(x0, sigma, {"popsize": popsize, "seed": SEED, "verbose": -9,
                                                "CMA_diagonal": False})


def told_values(scores: list[float]) -> list[float]:
    """The library's definition: a non-finite score is told as the worst finite score plus one."""
    finite = [s for s in scores if math.isfinite(s)]
    return [s if math.isfinite(s) else max(finite) + 1.0 for s in scores]


def tell(es: cma.CMAEvolutionStrategy, candidates, values) -> cma.CMAEvolutionStrategy:
    """A copy of ``es`` after telling ``values`` (pycma's tell mutates)."""
    out = copy.deepcopy(es)
    out.tell(candidates, list(values))
    return out


def recombination(candidates, values, popsize: int) -> np.ndarray:
    """m_new = Σ_{i<μ} w_i x_{i:λ} (c_m = 1, pycma's default positive weights): the mean update written out."""
    weights = RecombinationWeights(popsize)
    order = np.argsort(values, kind="stable")
    return sum(w * np.asarray(candidates[i]) for w, i in zip(list(weights)[:weights.mu], order))


class Recorder:
    """A ``map_fn`` (the seam the runner uses to split candidates across processes) that scores sequentially
    and records what it was asked: the candidates as the library passed them and their scores."""

    def __init__(self) -> None:
        self.candidates: list[list[np.ndarray]] = []  # per generation
        self.scores: list[list[float]] = []

    def __call__(self, fn, items):
        if len(items) == 1:  # the new mean's evaluation, mapped so that every process gets the same warm start
            return [fn(items[0])]
        scores = [fn(x) for x in items]
        self.candidates.append([np.array(x, copy=True) for x in items])
        self.scores.append(scores)
        return scores


def run_library(generations: int, *, evaluate_mean: bool = True, start: np.ndarray = START, sigma: float = SIGMA):
    recorder = Recorder()
    solver = CMAES(popsize=POPSIZE, sigma=sigma, seed=SEED, evaluate_mean=evaluate_mean, map_fn=recorder)
    outer, state, results = {"phi": torch.tensor(start, dtype=DT)}, None, []
    for _ in range(generations):
        result = bilevel.hypergrad(PROBLEM, THETA0, outer, inner_batch=None, outer_batch=None, solver=solver,
                                   loop=LOOP, state=state, validate=False)
        results.append(result)
        state = result.state
        outer = {"phi": outer["phi"] - result.hypergrad["phi"]}  # the runner's update: SGD, lr 1
    return results, recorder


def hand(generations: int, *, start: np.ndarray = START, sigma: float = SIGMA) -> list[dict]:
    """Per generation: pycma's candidates, the replayed scores, the told values, the strategy after ask and after
    tell."""
    out = []
    with global_numpy_random_restored():
        es = pycma(start, sigma, POPSIZE)
        for _ in range(generations):
            mean_old = np.array(es.mean, copy=True)
            candidates = es.ask()
            asked = copy.deepcopy(es)  # the strategy between ask and tell, to tell other values to
            replays = [replay(x) for x in candidates]
            scores = [r[0] for r in replays]
            told = told_values(scores)
            es = tell(es, candidates, told)
            out.append({"mean_old": mean_old, "asked": asked, "candidates": candidates,
                        "replays": replays, "scores": scores, "told": told, "es": es})
    return out


def assert_clear_outcomes(replays) -> None:
    """Rounding cannot change the outcome: every candidate is clearly finite or clearly failed (a failure blows up
    at least 5 steps before the end, a finite run ends with a moderate loss), and no two finite scores are within
    1e-9 of each other, so the replay's rounding (VALUES) cannot swap two ranks."""
    for score, _, blown in replays:
        assert (0 <= blown <= STEPS - 5 and not math.isfinite(score)) or (blown < 0 and score < 100), (score, blown)
    finite = sorted(score for score, _, _ in replays if math.isfinite(score))
    assert all(b - a > 1e-9 * abs(b) for a, b in zip(finite, finite[1:])), finite


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ---- tests ----------------------------------------------------------------------------------------------------

def test_library_seed_draws_pycmas_seed_stream():
    """The library's private RandomState(seed) gives the candidates of pycma's own ``seed`` option, bitwise."""
    _, recorder = run_library(2)
    for g, want in enumerate(hand(2)):
        assert all(np.array_equal(x, y) for x, y in zip(recorder.candidates[g], want["candidates"]))


def test_generation_with_failing_candidates_ranks_them_last_and_matches_pycma():
    (result,), recorder = run_library(1)
    (want,) = hand(1)
    assert_clear_outcomes(want["replays"])
    failed = [i for i, s in enumerate(want["scores"]) if not math.isfinite(s)]
    finite = [s for s in want["scores"] if math.isfinite(s)]
    assert len(failed) == 3 and 0 in failed  # a failure before finite candidates in ask order: ranking matters

    # scores: the library's are non-finite exactly where the replay's are, else equal to VALUES
    got_scores = recorder.scores[0]
    assert [math.isfinite(s) for s in got_scores] == [math.isfinite(s) for s in want["scores"]]
    assert all(rel(g, w) <= VALUES for g, w in zip(got_scores, want["scores"]) if math.isfinite(w))

    # told values (the stored fitness row) and the ranking: failures last
    told = result.state.fitness[0].tolist()
    assert all(rel(g, w) <= VALUES for g, w in zip(told, want["told"]))
    assert [told[i] for i in failed] == [max(got_scores[i] for i in range(POPSIZE) if i not in failed) + 1.0] * 3
    ranking = list(np.argsort(told, kind="stable"))
    assert ranking == list(np.argsort(want["told"], kind="stable"))
    assert sorted(ranking[-len(failed):]) == failed

    # the mean update: pycma's tell, and the weighted recombination of the μ best written out
    mean_new = want["mean_old"] - result.hypergrad["phi"].numpy()
    assert np.abs(mean_new - want["es"].mean).max() <= MEAN
    assert np.abs(mean_new - recombination(want["candidates"], want["told"], POPSIZE)).max() <= MEAN
    assert np.abs(result.state.strategy.mean - want["es"].mean).max() <= MEAN

    # diagnostics
    d = result.diagnostics
    assert d["nonfinite_candidates"] == len(failed)
    assert rel(d["best_candidate_loss"], min(finite)) <= VALUES
    assert d["best_index"] == int(np.argmin([s if math.isfinite(s) else math.inf for s in want["scores"]]))
    assert rel(d["mean_candidate_loss"], float(np.mean(finite))) <= VALUES
    assert rel(d["sigma"], want["es"].sigma) <= MEAN
    outer_at_mean, inner_at_mean, blown = replay(want["es"].mean)
    assert blown < 0 and rel(d["outer_loss"], outer_at_mean) <= VALUES and rel(d["inner_loss"], inner_at_mean) <= 1e-10
    assert d["evaluations"] == POPSIZE + 1 and d["hvp_count"] == 0

    # the wrong definitions move the mean far more than MEAN
    wrong = {
        "failures dropped (told nothing)": recombination(
            [want["candidates"][i] for i in range(POPSIZE) if i not in failed], finite, POPSIZE - len(failed)),
        "failures told 0 (ranked first)": tell(want["asked"], want["candidates"],
                                               [s if math.isfinite(s) else 0.0 for s in want["scores"]]).mean,
    }
    for name, value in wrong.items():
        assert np.abs(np.asarray(value) - want["es"].mean).max() > 1e-3, name


def test_two_generations_with_failures_match_pycma():
    """The state carries the distribution: generation 1 (from generation 0's state and mean) matches pycma told
    twice, candidates bitwise, mean and σ to MEAN."""
    results, recorder = run_library(2)
    want = hand(2)
    for g in range(2):
        assert_clear_outcomes(want[g]["replays"])
        assert all(np.array_equal(x, y) for x, y in zip(recorder.candidates[g], want[g]["candidates"]))
        assert all(rel(a, b) <= VALUES for a, b in zip(results[g].state.fitness[g].tolist(), want[g]["told"]))
        d = results[g].diagnostics
        assert d["nonfinite_candidates"] == sum(not math.isfinite(s) for s in want[g]["scores"])
        assert rel(d["sigma"], want[g]["es"].sigma) <= MEAN
        mean_new = want[g]["mean_old"] - results[g].hypergrad["phi"].numpy()
        assert np.abs(mean_new - want[g]["es"].mean).max() <= MEAN
    assert results[1].diagnostics["nonfinite_candidates"] >= 1  # the second generation has failures too


def test_without_evaluating_the_mean_the_best_finite_candidate_is_reported():
    (result,), _ = run_library(1, evaluate_mean=False)
    (want,) = hand(1)
    finite = [s for s in want["scores"] if math.isfinite(s)]
    d = result.diagnostics
    assert "inner_loss" not in d and rel(d["outer_loss"], min(finite)) <= VALUES
    assert d["evaluations"] == POPSIZE and d["nonfinite_candidates"] == POPSIZE - len(finite)
    assert np.abs(want["mean_old"] - result.hypergrad["phi"].numpy() - want["es"].mean).max() <= MEAN


FAILING_START = np.array([3.0, 3.0])  # e^3·0.5·27 ≫ 2: every candidate overflows in its first steps


def test_all_failing_generation_raises_and_leaves_the_state_untouched():
    with global_numpy_random_restored():
        candidates = pycma(FAILING_START, 0.1, POPSIZE).ask()
    assert all(replay(x)[2] >= 0 for x in candidates)  # the hand replay fails for every candidate too
    solver = CMAES(popsize=POPSIZE, sigma=0.1, seed=SEED)
    outer = {"phi": torch.tensor(FAILING_START, dtype=DT)}
    state = solver.init(PROBLEM, THETA0, outer)
    mean_before = np.array(state.strategy.mean, copy=True)
    with pytest.raises(NonFiniteError, match=r"CMA-ES generation 0: every candidate's outer loss is NaN/Inf; "
                                             r"lower sigma or the inner learning rate"):
        bilevel.hypergrad(PROBLEM, THETA0, outer, inner_batch=None, outer_batch=None, solver=solver, loop=LOOP,
                          state=state, validate=False)
    assert state.generation == 0 and np.array_equal(state.strategy.mean, mean_before)


def test_all_failing_generation_stops_the_outer_loop_before_the_update():
    """Through the one outer loop: the error names the outer step and the solver, says the outer params were
    not updated, and they were not (nor the step counter, nor the search state)."""
    decl = bilevel.Nested(PROBLEM, {"phi": torch.tensor(FAILING_START, dtype=DT)}, LOOP,
                          lambda info: [bilevel.SubProblem(THETA0, None, None)], default_solver="cmaes",
                          solvers=("zeroth_order",), validate=False)
    spec = f"cmaes:popsize={POPSIZE},sigma=0.1,seed={SEED}"
    loop = bilevel.OuterLoop(decl, spec, local_context())
    with pytest.raises(NonFiniteError) as caught:
        loop.run(1)
    message = str(caught.value)
    for part in ("outer step 0", f"solver {spec!r}", "every candidate's outer loss is NaN/Inf",
                 "lower sigma or the inner learning rate", "the outer params were not updated"):
        assert part in message, part
    assert torch.equal(loop.outer["phi"].detach(), torch.tensor(FAILING_START, dtype=DT))
    assert loop.step == 0 and loop.solver_state == {}


def test_failures_rank_below_a_huge_but_finite_score():
    """A generation whose worst finite score is huge (1e17: training that blew up without overflowing). The
    failures must still rank strictly last: told values strictly above every finite score, and the mean equal
    to pycma told with the failures strictly after the finite candidates."""
    popsize = 6  # μ = 3: the three finite candidates are exactly the recombined ones

    def partly_diverged(fn, items):  # candidates 0, 1, 5 fail; 4 diverged to a finite 1e17; 2, 3 are real scores
        if len(items) == 1:  # the new mean's evaluation
            return [fn(items[0])]
        return [math.nan, math.nan, fn(items[2]), fn(items[3]), 1e17, math.nan]

    solver = CMAES(popsize=popsize, sigma=SIGMA, seed=SEED, map_fn=partly_diverged)
    result = bilevel.hypergrad(PROBLEM, THETA0, {"phi": torch.tensor(START, dtype=DT)}, inner_batch=None,
                               outer_batch=None, solver=solver, loop=LOOP, validate=False)
    told = result.state.fitness[0].tolist()
    with global_numpy_random_restored():
        es = pycma(START, SIGMA, popsize)
        candidates = es.ask()
        above = np.nextafter(1e17, math.inf)  # any value above every finite score ranks the failures last
        scores = [above, above, replay(candidates[2])[0], replay(candidates[3])[0], 1e17, above]
        want = tell(es, candidates, scores).mean
    assert all(told[i] > 1e17 for i in (0, 1, 5))
    assert np.abs(np.array(START) - result.hypergrad["phi"].numpy() - want).max() <= MEAN
