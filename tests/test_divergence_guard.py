"""The divergence guard (bilevel/divergence.py) through OuterLoop / run_locally.

Climbing problem: gradient descent on f(x) = ½‖x‖² with lr η = 2.5, so x_{t+1} = (1 − η) x_t = −1.5 x_t:
the loss at step t is L_t = L_0 · 2.25^t and the gradient norm g_t = g_0 · 1.5^t. With the defaults
(factor f = 1e3, window 50 ≥ every step here, warm-up 5), step t is judged against the median of steps
0 … t−1, i.e. of L_0 · r^s, s < t. For r = 2.25 the median is L_0 r^((t−1)/2) (t odd) or
L_0 r^(t/2−1) (1 + r)/2 (t even), so (L_t − median)/median + 1 = L_t/median is
    t = 16:  r^9 / 1.625 = 909.6   → L_16 − m = 908.6 m ≤ 1000 m: passes
    t = 17:  r^9         = 1477.9  → L_17 − m = 1476.9 m > 1000 m: trips.
The gradient-norm ratio at t = 17 is 1.5^9 = 38.4, far from 1000. So the run stops at outer step 17,
on the outer loss, with the params x_17 = (−1.5)^17 x_0 that step 17 evaluated.
"""
import dataclasses
import json
import math
import statistics
import sys

import pytest
import torch

import bilevel
from bilevel.divergence import DEFAULT_FACTOR, DEFAULT_WINDOW, DivergenceGuard
from bilevel.errors import DivergenceError, NonFiniteError
from bilevel.run import cli
from bilevel.run.serialize import load_tree, save_tree

from processes import snapshot  # noqa: E402

X0 = torch.tensor([1.0, -2.0, 0.5])
CLIMB_LR = 2.5          # x ← −1.5 x
TRIP_STEP = 17          # derived in the module docstring


def climbing(sign: float = 1.0, lr: float = CLIMB_LR, calls: list | None = None) -> bilevel.SingleLevel:
    """SGD on sign · ½‖x‖²: sign = +1 overshoots (loss climbs), sign = −1 descends an unbounded loss."""
    def objective(params, info):
        if calls is not None:
            calls.append(info.step)
        return sign * 0.5 * (params["x"] ** 2).sum(), {}

    return bilevel.SingleLevel(params={"x": X0.clone()}, objective=objective, optimizer="sgd", lr=lr)


def first_trip(values, factor, warmup=5, signed_loss=False):
    """Independent statement of the rule for a sequence whose steps are all accepted (window ≥ len)."""
    for t in range(warmup, len(values)):
        held = values[:t]
        if signed_loss:
            if values[t] - statistics.median(held) > factor * statistics.median([abs(v) for v in held]):
                return t
        elif values[t] > factor * statistics.median(held):
            return t
    return None


def test_a_geometric_climb_stops_at_the_step_the_rule_gives_with_the_params_that_step_evaluated():
    loss = [0.5 * float((X0.double() ** 2).sum()) * 2.25 ** t for t in range(60)]
    norm = [float(X0.double().norm()) * 1.5 ** t for t in range(60)]
    assert first_trip(loss, DEFAULT_FACTOR, signed_loss=True) == TRIP_STEP       # the hand computation above
    assert first_trip(norm, DEFAULT_FACTOR) > TRIP_STEP

    seen, hints = [], []
    loop = bilevel.OuterLoop(climbing(), None, bilevel.local_context())
    with pytest.raises(DivergenceError) as err:
        loop.run(60, on_step=lambda step, metrics: seen.append(step),
                 error_hint=lambda: hints.append(loop.step) or "HINT")
    message = str(err.value)
    assert f"outer step {TRIP_STEP}, single-level objective" in message
    assert "the outer loss" in message and "outer gradient norm" not in message
    level = statistics.median(loss[:TRIP_STEP])
    assert f"{loss[TRIP_STEP]:.6g}"[:5] in message and f"{level:.6g}"[:5] in message  # value and reference
    assert "divergence_factor 1000" in message and "the outer params were not updated" in message
    assert "HINT" in message and "Lower the outer learning rate" in message
    # never applied, never handed to on_step (where the runner checkpoints); the hint sees the failing step
    assert seen == list(range(TRIP_STEP)) and loop.step == TRIP_STEP and hints == [TRIP_STEP]
    expected = X0.double() * (-1.5) ** TRIP_STEP
    assert torch.allclose(loop.outer["x"].detach().double(), expected, rtol=1e-5, atol=0)
    unguarded, _, _ = bilevel.run_locally(climbing(), TRIP_STEP, divergence_factor=0)
    assert torch.equal(loop.outer["x"].detach(), unguarded["x"])


def test_an_unbounded_descent_trips_on_the_gradient_norm_not_on_the_falling_loss():
    """f = −½‖x‖², lr 0.5: x ← 1.5 x; the loss falls (−∞), which the loss rule never calls divergence.
    Gradient-norm ratio to the median of steps < t: 1.5^((t+1)/2) (t odd), 1.5^(t/2+1)/1.25 (t even):
    t = 33: 1.5^17 = 985.3 ≤ 1000; t = 34: 1.5^18/1.25 = 1182.3 > 1000 → trips at step 34."""
    norm = [float(X0.double().norm()) * 1.5 ** t for t in range(60)]
    assert first_trip(norm, DEFAULT_FACTOR) == 34
    with pytest.raises(DivergenceError, match=r"outer step 34, .*the outer gradient norm .* more than "
                                              r"divergence_factor 1000") as err:
        bilevel.run_locally(climbing(sign=-1.0, lr=0.5), 60)
    assert "the outer loss" not in str(err.value)


def ridge_minibatch(batch: int = 8, n: int = 200, d: int = 5) -> bilevel.SingleLevel:
    """Least squares with per-step random minibatches drawn from the step's seed: noisy, stable."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g)
    y = X @ torch.randn(d, generator=g) + 0.5 * torch.randn(n, generator=g)

    def objective(params, info):
        idx = torch.randint(0, n, (batch,), generator=torch.Generator().manual_seed(1000 + info.step))
        r = X[idx] @ params["w"] - y[idx]
        return 0.5 * (r * r).mean() + 0.05 * (params["w"] ** 2).sum(), {}

    return bilevel.SingleLevel(params={"w": torch.zeros(d)}, objective=objective, optimizer="sgd", lr=0.1)


def largest_ratios(history, window=DEFAULT_WINDOW, warmup=5):
    """max over steps of g_t / median(g) and (L_t − median L) / median |L| over the previous window."""
    grad, loss = [m["outer_grad_norm"] for m in history], [m["outer_loss"] for m in history]
    g_ratio = max(grad[t] / statistics.median(grad[max(0, t - window):t]) for t in range(warmup, len(grad)))
    l_ratio = max((loss[t] - statistics.median(loss[max(0, t - window):t]))
                  / statistics.median([abs(v) for v in loss[max(0, t - window):t]]) for t in range(warmup, len(loss)))
    return g_ratio, l_ratio


def test_minibatch_noise_never_trips_and_stays_far_below_the_factor():
    _, history, loop = bilevel.run_locally(ridge_minibatch(), 300)
    assert len(history) == 300
    g_ratio, l_ratio = largest_ratios(history)
    assert g_ratio < 30 and l_ratio < 30, (g_ratio, l_ratio)   # noise is orders of magnitude below 1e3
    assert len(loop.divergence.grad_norm) == DEFAULT_WINDOW


def test_cmaes_on_ridge_never_trips():
    """The CMA-ES step (its "gradient") and its candidates' mean loss are noisy; both stay far below 1e3."""
    from bilevel.problems import ridge
    ctx = bilevel.local_context(seed=1)
    declaration = ridge.build(dataclasses.replace(ridge.SMOKE, inner_steps=30), ctx)
    _, history, _ = bilevel.run_locally(declaration, 30, "cmaes:popsize=4,sigma=0.3,seed=3", ctx=ctx)
    assert len(history) == 30
    g_ratio, l_ratio = largest_ratios(history)
    assert g_ratio < 30 and l_ratio < 30, (g_ratio, l_ratio)


@pytest.mark.parametrize("off", [0, 0.0, None])
def test_factor_zero_or_none_switches_the_guard_off_but_not_the_nonfinite_guard(off):
    _, history, loop = bilevel.run_locally(climbing(), 60, divergence_factor=off)
    assert len(history) == 60 and history[-1]["outer_loss"] > 1e20
    assert len(loop.divergence.loss) == DEFAULT_WINDOW  # still held: the guard can be switched on at a resume
    with pytest.raises(NonFiniteError) as err:  # the loss overflows float32 (≈ 3.4e38) near step 109
        bilevel.run_locally(climbing(), 200, divergence_factor=off)
    assert type(err.value) is NonFiniteError and "non-finite metric 'outer_loss' = inf" in str(err.value)


def test_a_resumed_run_trips_at_the_same_step_with_the_same_params(tmp_path):
    uninterrupted = bilevel.OuterLoop(climbing(), None, bilevel.local_context())
    with pytest.raises(DivergenceError) as first:
        uninterrupted.run(60)

    saved = {}
    loop = bilevel.OuterLoop(climbing(), None, bilevel.local_context())
    loop.run(9, on_step=lambda step, metrics: saved.update(state=loop.state_dict()))
    save_tree(tmp_path / "state", saved["state"], fsync=False)  # the checkpoint serializer: JSON + safetensors
    resumed = bilevel.OuterLoop(climbing(), None, bilevel.local_context())
    resumed.load_state_dict(load_tree(tmp_path / "state"))
    assert list(resumed.divergence.loss) == list(loop.divergence.loss) and len(resumed.divergence.loss) == 9
    with pytest.raises(DivergenceError) as second:
        resumed.run(60)
    assert str(second.value) == str(first.value)
    assert resumed.step == uninterrupted.step == TRIP_STEP
    assert torch.equal(resumed.outer["x"].detach(), uninterrupted.outer["x"].detach())


def test_a_saved_state_without_the_guard_reference_is_refused_unless_the_guard_is_off():
    loop = bilevel.OuterLoop(climbing(), None, bilevel.local_context())
    loop.run(3)
    state = {k: v for k, v in loop.state_dict().items() if k != "divergence_guard"}
    with pytest.raises(ValueError, match="holds no divergence-guard reference .* resume with the divergence guard "
                                         "off .* or start a fresh run"):
        bilevel.OuterLoop(climbing(), None, bilevel.local_context()).load_state_dict(state)
    off = bilevel.OuterLoop(climbing(), None, bilevel.local_context(), divergence_factor=0)
    off.load_state_dict(state)
    assert off.step == 3


def test_skipped_steps_are_not_held():
    def gradient(params, info):
        if info.step % 3 == 1:
            return {"x": torch.full((3,), float("nan"))}, {"outer_loss": float("nan")}
        return {"x": params["x"].clone()}, {"outer_loss": float(0.5 * (params["x"] ** 2).sum())}

    declaration = bilevel.SingleLevel(params={"x": X0.clone()}, gradient=gradient, optimizer="sgd", lr=0.1,
                                      skip_nonfinite=True)
    _, history, loop = bilevel.run_locally(declaration, 9)
    assert [m["skipped"] for m in history] == [0.0, 1.0, 0.0] * 3
    assert len(loop.divergence.loss) == len(loop.divergence.grad_norm) == 6
    assert all(math.isfinite(v) for v in loop.divergence.grad_norm)


def test_a_smaller_window_keeps_the_newest_values_at_load():
    guard = DivergenceGuard(window=3)
    guard.load_state_dict({"loss": [1.0, 2.0, 3.0, 4.0], "grad_norm": [5.0, 6.0, 7.0, 8.0]})
    assert list(guard.loss) == [2.0, 3.0, 4.0] and list(guard.grad_norm) == [6.0, 7.0, 8.0]


@pytest.mark.parametrize("state, message", [
    ({"loss": [1.0]}, r"must hold exactly \['loss', 'grad_norm'\]"),
    ({"loss": [1.0, float("nan")], "grad_norm": []}, "'loss' holds a non-finite value"),
])
def test_a_bad_guard_state_is_refused(state, message):
    with pytest.raises(ValueError, match=message):
        DivergenceGuard().load_state_dict(state)


@pytest.mark.parametrize("options, message", [
    ({"divergence_factor": -1.0}, "divergence_factor must be a finite number > 1 .* or 0/None to switch"),
    ({"divergence_factor": 1.0}, "divergence_factor must be a finite number > 1"),
    ({"divergence_factor": 0.5}, "divergence_factor must be a finite number > 1"),
    ({"divergence_factor": float("nan")}, "divergence_factor must be a finite number > 1"),
    ({"divergence_factor": float("inf")}, "divergence_factor must be a finite number > 1"),
    ({"divergence_factor": "1e3"}, "divergence_factor must be a finite number > 1"),
    ({"divergence_factor": True}, "divergence_factor must be a finite number > 1"),
    ({"divergence_window": 0}, "divergence_window must be an int >= 1 .* the default is 50"),
    ({"divergence_window": 2.5}, "divergence_window must be an int >= 1"),
    ({"divergence_window": True}, "divergence_window must be an int >= 1"),
])
def test_bad_guard_options_are_refused_before_any_step(options, message):
    calls = []
    with pytest.raises(ValueError, match=message):
        bilevel.OuterLoop(climbing(calls=calls), None, bilevel.local_context(), **options)
    with pytest.raises(ValueError, match=message):
        bilevel.run_locally(climbing(calls=calls), 5, **options)
    assert calls == []


# ---- through `bilevel run` (needs the runner's wiring: RunSpec/--divergence-factor and the checkpoint hint) ----
DIVERGING_PROBLEM = '''"""½‖x‖², gradient descent at lr 2.5: the loss climbs 2.25× per step."""
from dataclasses import dataclass

import torch

import bilevel


@dataclass(frozen=True)
class Config:
    lr: float = 2.5


SMOKE = Config()


def build(cfg, ctx):
    return bilevel.SingleLevel(params={"x": torch.tensor([1.0, -2.0, 0.5])}, optimizer="sgd", lr=cfg.lr,
                               objective=lambda params, info: (0.5 * (params["x"] ** 2).sum(), {}))
'''


@pytest.fixture
def diverging_problem(tmp_path, monkeypatch):
    """A problem module importable as ``guard_problems.diverging`` (a module path ``bilevel run`` accepts)."""
    package = tmp_path / "guard_problems"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "diverging.py").write_text(DIVERGING_PROBLEM)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "guard_problems.diverging"
    for name in ("guard_problems.diverging", "guard_problems"):
        sys.modules.pop(name, None)


def test_bilevel_run_stops_sets_the_tripped_checkpoint_aside_and_resumes_from_the_last_good_one(
        diverging_problem, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", diverging_problem, "--steps", "60", "--checkpoint-every", "1", "--no-progress", "--out", str(out)]
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"outer step {TRIP_STEP}, single-level objective: diverging: the outer loss" in err
    # step-17 was written after step 16 (before step 17 evaluated x_17 and tripped): it holds the params that
    # tripped, so it is renamed step-17.tripped (kept, never resumed) and the last good checkpoint is step-16
    good, tripped = (out / "checkpoints" / f"step-{s:08d}" for s in (TRIP_STEP - 1, TRIP_STEP))
    set_aside = tripped.with_name(tripped.name + ".tripped")
    assert f"the last good checkpoint is {good} ({tripped.name} held those params and is set aside as .tripped)" in err
    assert good.is_dir() and not tripped.exists() and set_aside.is_dir()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(TRIP_STEP))
    assert not (out / "outer.safetensors").exists()
    # --resume continues from the last good checkpoint (step-16), not from the params that tripped, and the
    # same settings trip at the same step with the same message
    assert cli.main(args + ["--resume"]) == 2
    again = capsys.readouterr().err
    assert f"outer step {TRIP_STEP}, single-level objective: diverging: the outer loss" in again
    assert f"the last good checkpoint is {good}" in again and set_aside.is_dir() and not tripped.exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(TRIP_STEP))


def test_resume_with_only_tripped_checkpoints_names_them(diverging_problem, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", diverging_problem, "--steps", "60", "--checkpoint-every", str(TRIP_STEP), "--no-progress",
            "--out", str(out)]
    assert cli.main(args) == 2
    capsys.readouterr()
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{TRIP_STEP:08d}.tripped"]
    before = snapshot(out)
    assert cli.main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert (f"--resume: no checkpoint in {out / 'checkpoints'} (only step-{TRIP_STEP:08d}.tripped, which held params "
            "that tripped the divergence/non-finite guard and are never resumed)") in err
    assert "start fresh (drop --resume; --overwrite to reuse this folder)" in err
    assert snapshot(out) == before


def test_bilevel_run_divergence_factor_zero_switches_the_guard_off(diverging_problem, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["run", diverging_problem, "--steps", "40", "--divergence-factor", "0", "--no-progress",
                     "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["divergence_factor"] == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and rows[-1]["outer_loss"] > 1e12


@pytest.mark.parametrize("option, value, message", [
    ("--divergence-factor", "-1", "divergence_factor must be a finite number > 1"),
    ("--divergence-factor", "nan", "divergence_factor must be a finite number > 1"),
    ("--divergence-window", "0", "divergence_window must be an int >= 1"),
])
def test_bilevel_run_refuses_bad_guard_options_before_touching_the_disk(diverging_problem, tmp_path, capsys,
                                                                        option, value, message):
    out = tmp_path / "run"
    assert cli.main(["run", diverging_problem, "--steps", "5", option, value, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
