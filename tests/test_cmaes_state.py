"""CMA-ES state as numbers: a save/load through bilevel.run.serialize (no pickle) resumes bitwise."""
import copy
import json
import math
import pickle

import numpy as np
import pytest
import torch

import bilevel
from bilevel.run.serialize import TreeFormatError, load_tree, save_tree
from bilevel.solvers.cmaes import CMAES, CMAESState
from oracles import ridge

torch.set_num_threads(1)

LOOP = bilevel.InnerLoop(steps=5, lr=0.3)


def every_third_nan(fn, items):
    """A map that reports NaN for candidates 0, 3, 6, ... (diverged training) and scores the others. CMA-ES also
    maps the evaluation of the new mean (a list of one item, so that every process gets the same inner warm
    start): that one is computed, not failed."""
    if len(items) == 1:
        return [fn(items[0])]
    return [math.nan if i % 3 == 0 else fn(x) for i, x in enumerate(items)]


def generations(solver, problem, inner, outer, ib, ob, state, count):
    """``count`` generations with the runner's outer update (SGD, lr 1); per generation what must match."""
    out = []
    for _ in range(count):
        result = solver(problem, inner, outer, ib, ob, LOOP, state)
        state = result.state
        outer = {k: v - result.hypergrad[k] for k, v in outer.items()}
        es = state.strategy
        out.append({"grad": result.hypergrad["log_lambda"], "mean": np.array(es.mean), "sigma": es.sigma,
                    "C": np.array(es.C), "diagnostics": result.diagnostics})
    return out, state, outer


def assert_bitwise(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x["grad"], y["grad"]), i
        assert np.array_equal(x["mean"], y["mean"]) and x["sigma"] == y["sigma"], i
        assert np.array_equal(x["C"], y["C"]), i
        assert x["diagnostics"] == y["diagnostics"], i


@pytest.mark.parametrize("map_fn", [None, every_third_nan], ids=["finite", "some_nonfinite"])
@pytest.mark.parametrize("evaluate_mean", [True, False])
def test_save_load_after_three_generations_matches_six_uninterrupted(tmp_path, map_fn, evaluate_mean):
    problem, inner, outer, ib, ob = ridge()
    solver = CMAES(popsize=5, sigma=0.3, seed=7, evaluate_mean=evaluate_mean, map_fn=map_fn)
    full, _, _ = generations(solver, problem, inner, outer, ib, ob, None, 6)

    first, state, outer3 = generations(solver, problem, inner, outer, ib, ob, None, 3)
    save_tree(tmp_path / "ckpt", {"solver_state": state, "outer": outer3})
    loaded = load_tree(tmp_path / "ckpt")
    restored = loaded["solver_state"]
    assert isinstance(restored, CMAESState) and restored._strategy is None  # the live strategy is not stored
    assert restored.generation == 3 and torch.equal(restored.fitness, state.fitness)
    assert torch.equal(loaded["outer"]["log_lambda"], outer3["log_lambda"])
    second, _, _ = generations(solver, problem, inner, loaded["outer"], ib, ob, restored, 3)
    assert_bitwise(first + second, full)
    if map_fn is every_third_nan:
        assert all(g["diagnostics"]["nonfinite_candidates"] == 2.0 for g in full)
        assert bool(torch.isfinite(state.fitness).all())  # non-finite scores are told as worst finite + 1


def test_one_coordinate_search_is_padded_and_resumes(tmp_path):
    problem, inner, outer, ib, ob = ridge(d=1)
    solver = CMAES(popsize=4, sigma=0.2, seed=3)
    full, _, _ = generations(solver, problem, inner, outer, ib, ob, None, 4)
    first, state, outer2 = generations(solver, problem, inner, outer, ib, ob, None, 2)
    assert state.x0.shape == (2,)
    save_tree(tmp_path / "s", state)
    second, _, _ = generations(solver, problem, inner, outer2, ib, ob, load_tree(tmp_path / "s"), 2)
    assert_bitwise(first + second, full)


def test_cma_never_touches_the_global_numpy_random_state(monkeypatch):
    """cma draws only from the state's own RandomState: the global stream is neither read nor reseeded."""
    problem, inner, outer, ib, ob = ridge()
    solver = CMAES(popsize=4, sigma=0.3, seed=2)
    np.random.seed(123)
    before = np.random.get_state()

    def trap(*args, **kwargs):
        raise AssertionError("global np.random used")

    for name in ("randn", "rand", "randint", "uniform", "normal", "random", "seed", "standard_normal", "choice",
                 "permutation", "shuffle", "random_sample", "set_state"):
        monkeypatch.setattr(np.random, name, trap)
    _, state, _ = generations(solver, problem, inner, outer, ib, ob, None, 3)
    state.replay()
    monkeypatch.undo()
    after = np.random.get_state()
    assert np.array_equal(before[1], after[1]) and before[2:] == after[2:]


def test_replay_is_bitwise_the_live_strategy():
    problem, inner, outer, ib, ob = ridge()
    _, state, _ = generations(CMAES(popsize=6, sigma=0.5, seed=11), problem, inner, outer, ib, ob, None, 5)
    live, replayed = state.strategy, state.replay()
    assert np.array_equal(live.mean, replayed.mean) and live.sigma == replayed.sigma
    assert np.array_equal(live.C, replayed.C)
    a, b = copy.deepcopy(live).ask(), replayed.ask()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_state_is_still_picklable_and_the_caller_state_is_untouched():
    problem, inner, outer, ib, ob = ridge()
    solver = CMAES(popsize=4, sigma=0.3, seed=2)
    _, state, _ = generations(solver, problem, inner, outer, ib, ob, None, 2)
    mean = np.array(state.strategy.mean)
    a = solver(problem, inner, outer, ib, ob, LOOP, state)
    b = solver(problem, inner, outer, ib, ob, LOOP, pickle.loads(pickle.dumps(state)))
    assert np.array_equal(state.strategy.mean, mean) and state.generation == 2
    assert torch.equal(a.hypergrad["log_lambda"], b.hypergrad["log_lambda"])


@pytest.mark.parametrize("field, value, message", [
    ("popsize", "__import__('os').system('true')", "popsize"),  # cma would eval() a string option
    ("sigma0", 0.0, "sigma0"),
    ("seed", 0, "seed"),
])
def test_a_tampered_stored_state_is_refused(tmp_path, field, value, message):
    state = CMAESState.start(np.zeros(3), 0.3, 4, 1)
    save_tree(tmp_path / "s", state)
    doc_path = tmp_path / "s" / "state.json"
    doc = json.loads(doc_path.read_text())
    doc["root"]["fields"][field] = value
    doc_path.write_text(json.dumps(doc))
    with pytest.raises(TreeFormatError, match=message):
        load_tree(tmp_path / "s")


def test_fitness_history_must_match_popsize():
    with pytest.raises(ValueError, match="fitness"):
        CMAESState(torch.zeros(3, dtype=torch.float64), 0.3, 4, 1, torch.zeros(2, 5, dtype=torch.float64))
