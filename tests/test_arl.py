"""ARL: G, F and the initialisation against hand computations, one outer loop run against the ``cmaes``
solver called by hand, resume, the evaluation against plain torch training, the noise harness."""
from dataclasses import replace

import pytest
import torch
from torch.func import functional_call

import bilevel
from bilevel.problems import arl
from bilevel.problems.losses.taylor import TaylorLoss, TaylorSpec, descent_raises_true_class, initial_theta
from bilevel.problems.noisy_training import average_ranks, load_split, make_model, train
from bilevel.run.serialize import load_tree, save_tree
from taylor_reference import hand_eq35, hand_range

torch.set_num_threads(1)

TINY = replace(arl.SMOKE, inner_steps=3)
POPSIZE = 3
SOLVER = f"cmaes:popsize={POPSIZE},sigma=0.5,seed=3"


def per_network(inner: dict, k: int) -> dict:
    return {name[len(f"{k}."):]: v for name, v in inner.items() if name.startswith(f"{k}.")}


def networks(cfg: arl.Config) -> list[torch.nn.Module]:
    return [make_model(a, load_split(d, cfg.noise, cfg.rate, cfg.data_seed).in_shape) for a, d in arl.pairs(cfg)]


def test_inner_and_outer_loss_match_definitions():
    decl = arl.build(TINY, bilevel.local_context())
    sub = decl.first_subproblem()
    theta = initial_theta(TaylorSpec("arl", 4), "brier") + 0.1 * torch.arange(12.0)
    t = theta.double().tolist()
    f_min, f_max = hand_range(t)
    batch = sub.inner_batch(0)
    expected = 0.0
    models = networks(TINY)
    for k, (model, (x, y)) in enumerate(zip(models, batch)):
        p = functional_call(model, per_network(sub.inner, k), (x,)).softmax(-1).double()
        per_sample = [sum(hand_eq35(float(p[n, c]), float(c == y[n]), t) for c in range(10)) / 10
                      for n in range(len(y))]                                      # eq. 3.4
        expected += TINY.eta * (sum(per_sample) / len(y) - f_min) / (f_max - f_min)  # eq. A.2
    assert float(decl.problem.inner(sub.inner, {"theta": theta}, batch)) == pytest.approx(expected, rel=1e-5)
    correct = [int((functional_call(m, per_network(sub.inner, k), (x,)).argmax(-1) == y).sum())
               for k, (m, (x, y)) in enumerate(zip(models, sub.outer_batch))]
    expected_f = 1 - sum(c / len(y) for c, (_, y) in zip(correct, sub.outer_batch)) / len(models)
    assert float(decl.problem.outer(sub.inner, {"theta": theta}, sub.outer_batch)) == pytest.approx(expected_f,
                                                                                                    abs=1e-6)


@pytest.mark.parametrize("architectures", [("linear", "mlp2"), ("cnn", "mlp3")])
def test_fresh_networks_equal_the_global_rng_reset_bitwise(architectures):
    """Generation g's networks are reset_parameters() after torch.manual_seed(10007·data_seed + g), drawn
    without touching the global RNG."""
    cfg = replace(TINY, architectures=architectures, data_seed=2)
    before = torch.get_rng_state()
    decl = arl.build(cfg, bilevel.local_context())
    for generation in (0, 5):
        inner = decl.subproblems(bilevel.StepInfo(generation))[0].inner
        assert torch.equal(torch.get_rng_state(), before)
        with torch.random.fork_rng():
            models = networks(cfg)  # built (drawing a first init) before seeding, as the old code did
            torch.manual_seed(10_007 * cfg.data_seed + generation)
            expected = {}
            for k, model in enumerate(models):
                for layer in model.modules():
                    if hasattr(layer, "reset_parameters"):
                        layer.reset_parameters()
                expected.update({f"{k}.{n}": p.detach() for n, p in model.named_parameters()})
        assert list(inner) == list(expected)
        assert all(torch.equal(inner[n], expected[n]) for n in expected)


@pytest.fixture(scope="module")
def two_generations():
    """Two outer steps through the library's loop, candidates recorded as they go through ctx.map."""
    calls = []

    def recording_map(fn, items):
        calls.append(len(items))
        return [fn(x) for x in items]

    decl = arl.build(TINY, bilevel.local_context())
    outer, history, loop = bilevel.run_locally(decl, 2, SOLVER, ctx=bilevel.RunContext(_map=recording_map))
    return decl, outer, history, loop, calls


def test_generations_are_the_cmaes_solver_called_by_hand(two_generations):
    """Each outer step = bilevel.hypergrad with ``cmaes`` on that step's fresh networks and the previous
    state; θ ← θ − g (SGD, lr 1) lands on the new CMA-ES mean; the metrics are 1 − its losses."""
    decl, outer, history, loop, _ = two_generations
    theta, state = decl.outer, None
    for step in range(2):
        sub = decl.subproblems(bilevel.StepInfo(step))[0]
        ref = bilevel.hypergrad(decl.problem, sub.inner, theta, inner_batch=sub.inner_batch,
                                outer_batch=sub.outer_batch, solver=SOLVER, loop=decl.loop, state=state)
        theta, state = {"theta": theta["theta"] - ref.hypergrad["theta"]}, ref.state
        for key, value in ref.diagnostics.items():
            assert history[step][key] == value, key
        assert history[step]["clean_val_acc_mean"] == 1 - ref.diagnostics["outer_loss"]
        assert history[step]["clean_val_acc_best_candidate"] == 1 - ref.diagnostics["best_candidate_loss"]
    assert torch.equal(outer["theta"], theta["theta"])
    assert torch.equal(loop.solver_state["0"].fitness, state.fitness)
    mean = torch.as_tensor(state.strategy.mean, dtype=torch.float64)
    assert torch.allclose(outer["theta"].double(), mean, rtol=0, atol=1e-6)  # float32 rounding of the mean
    assert not torch.equal(outer["theta"], decl.outer["theta"])


def test_candidates_go_through_ctx_map(two_generations):
    """Per generation: the candidates, then the new mean's evaluation (one item, so that every process keeps the
    same inner warm start)."""
    assert two_generations[4] == [POPSIZE, 1, POPSIZE, 1]


def test_resume_from_a_stored_checkpoint_repeats_the_run(two_generations, tmp_path):
    """Stop after one generation, store the loop's state pickle-free, rebuild, continue: bitwise the same."""
    _, outer, history, _, _ = two_generations
    ctx = bilevel.local_context()
    first = bilevel.OuterLoop(arl.build(TINY, ctx), SOLVER, ctx)
    first.run(1)
    save_tree(tmp_path / "state", first.state_dict(), fsync=False)
    resumed = bilevel.OuterLoop(arl.build(TINY, ctx), SOLVER, ctx)
    resumed.load_state_dict(load_tree(tmp_path / "state"))
    again = resumed.run(2)
    assert torch.equal(resumed.outer["theta"].detach(), outer["theta"])
    assert again == history[1:]


def test_evaluate_equals_plain_torch_training(two_generations):
    """The final evaluation: each pair trained alone with torch.optim.SGD (momentum) on the learned loss
    from the evaluation generation's networks, then its clean validation accuracy; plus the sign check."""
    decl, outer, _, loop, _ = two_generations
    metrics = loop.evaluate()
    sub = decl.subproblems(bilevel.StepInfo(arl.EVALUATION_GENERATION))[0]
    loss = TaylorLoss(outer["theta"], TaylorSpec("arl", 4, normalise=TINY.eta))
    accs = []
    for k, model in enumerate(networks(TINY)):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(per_network(sub.inner, k)[name])
        opt = torch.optim.SGD(model.parameters(), lr=TINY.inner_lr, momentum=TINY.momentum)
        for step in range(TINY.inner_steps):
            x, y = sub.inner_batch(step)[k]
            opt.zero_grad()
            loss(model(x), y).backward()
            opt.step()
        x_val, y_val = sub.outer_batch[k]
        with torch.no_grad():
            accs.append(float((model(x_val).argmax(-1) == y_val).double().mean()))
    assert metrics["clean_val_acc"] == pytest.approx(sum(accs) / len(accs), abs=1e-6)
    assert metrics["descent_raises_true_class"] == float(descent_raises_true_class(outer["theta"], loss.spec))


def test_only_zeroth_order_solvers_apply():
    ctx = bilevel.local_context()
    decl = arl.build(arl.SMOKE, ctx)
    assert bilevel.OuterLoop(decl, None, ctx).solver_spec == arl.DEFAULT_SOLVER == "cmaes:popsize=8,sigma=0.5,seed=1"
    for spec in ("cg", "unroll"):
        with pytest.raises(bilevel.SpecError, match="solvers that apply: cmaes$"):
            bilevel.OuterLoop(decl, spec, ctx)


def test_bad_config():
    with pytest.raises(ValueError, match="condition"):
        arl.build(replace(TINY, condition="both"), bilevel.local_context())
    with pytest.raises(ValueError, match="pairflip"):
        arl.build(replace(TINY, noise="uniform"), bilevel.local_context())


def test_noise_split_and_harness():
    clean = load_split("digits", "symmetric", 0.0, seed=0)
    noisy = load_split("digits", "symmetric", 0.8, seed=0)
    flip = load_split("digits", "pairflip", 0.4, seed=0)
    assert torch.equal(clean.y_train, clean.y_train_clean)
    assert 0.74 < float((noisy.y_train != noisy.y_train_clean).float().mean()) < 0.86
    moved = flip.y_train != flip.y_train_clean
    assert 0.34 < float(moved.float().mean()) < 0.46
    assert torch.equal(flip.y_train[moved], (flip.y_train_clean[moved] + 1) % 10)   # pair-flip c → c + 1
    record = train(torch.nn.functional.cross_entropy, "linear", clean, epochs=3)
    assert len(record.test_acc) == 3 and record.final > 0.6                          # learns clean digits


def test_average_ranks():
    ranks = average_ranks({"a": [0.9, 0.5], "b": [0.8, 0.5], "c": [float("nan"), 0.1]})
    assert ranks == {"a": 1.25, "b": 1.75, "c": 3.0}


def test_initial_mean_and_published_ar_a40_train_above_chance():
    """The CMA-ES starting loss (normalised Brier) and the one sensible published loss (AR-A40, digest E.2)
    train a linear model on clean digits well above chance (10 %)."""
    from bilevel.problems.losses.taylor import published_theta

    clean = load_split("digits", "symmetric", 0.0, seed=0)
    spec = TaylorSpec("arl", 4, normalise=10.0)
    for theta in (initial_theta(spec, "brier"), published_theta("arl_ar_a40")):
        record = train(TaylorLoss(theta, spec), "linear", clean, epochs=4)
        assert record.final > 0.5
