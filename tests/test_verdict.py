"""The run's verdict: the paired gap against a hand-computed t statistic, the wording by who wins, the plot,
what `bilevel run` prints, and ARL's held-out test against plain training."""
import json
import math
from dataclasses import replace

import pytest
import torch
from scipy import stats

import bilevel
from bilevel.problems import arl
from bilevel.problems.losses.taylor import TaylorLoss, initial_theta
from bilevel.problems.noisy_training import load_split, make_model, minibatch_indices
from bilevel.run.cli import final_summary, main

VERDICT = bilevel.Verdict(method="m", baseline="b", controls=("c",), metric="accuracy (%)",
                          labels={"m": "method", "b": "baseline"})


def test_paired_gap_is_the_paired_t_test_by_hand():
    method, other = [70.0, 72.5, 69.0, 75.0, 71.0], [60.0, 64.0, 61.5, 66.0, 58.0]
    d = [a - b for a, b in zip(method, other)]
    n, mean = len(d), sum(d) / len(d)
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    t = mean / (std / math.sqrt(n))
    p = 2 * stats.t.sf(abs(t), n - 1)
    gap = bilevel.paired_gap(method, other)
    assert (gap.mean, gap.n) == (pytest.approx(mean, rel=1e-14), 5)
    assert gap.std == pytest.approx(std, rel=1e-14)
    assert gap.p_value == pytest.approx(p, rel=1e-10)
    assert gap.larger_than_noise


def test_paired_gap_edge_cases():
    one = bilevel.paired_gap([1.0], [0.0])
    assert one.n == 1 and math.isnan(one.p_value) and not one.larger_than_noise
    constant = bilevel.paired_gap([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])  # every difference exactly 1: no spread
    assert (constant.std, constant.p_value, constant.larger_than_noise) == (0.0, 0.0, True)
    tie = bilevel.paired_gap([1.0, 2.0], [1.0, 2.0])
    assert (tie.p_value, tie.larger_than_noise) == (1.0, False)
    # a gap the size of its spread is not larger than the noise
    assert not bilevel.paired_gap([1.0, 0.0, 2.0], [0.0, 0.0, 0.0]).larger_than_noise
    with pytest.raises(ValueError, match="same length"):
        bilevel.paired_gap([1.0, 2.0], [1.0])


def test_verdict_lines_say_who_wins_and_whether_it_is_noise():
    final = {"m": [70.0, 72.5, 69.0, 75.0, 71.0], "b": [60.0, 64.0, 61.5, 66.0, 58.0],
             "c": [71.0, 70.5, 70.0, 74.0, 72.0]}
    win, control = bilevel.verdict_lines(VERDICT, final)
    assert win.startswith("verdict: method 71.5 ± 2.3 vs baseline 61.9 ± 3.2 accuracy (%) over 5 seeds; difference +9.6")
    assert "method wins, larger than the noise (paired t-test p = " in win
    assert control.startswith("control: method 71.5 ± 2.3 vs c 71.5 ± 1.6") and "not larger than the noise" in control
    lower = replace(VERDICT, higher_is_better=False)  # a loss: the method's larger values lose
    assert "method loses, larger than the noise" in bilevel.verdict_lines(lower, final)[0]
    assert "one seed: the noise is unknown" in bilevel.verdict_lines(VERDICT, {"m": [1.0], "b": [0.0], "c": [0.0]})[0]
    with pytest.raises(ValueError, match="no per-seed list under 'b'"):
        bilevel.verdict_lines(VERDICT, {"m": [1.0, 2.0], "b": 3.0})


def test_a_verdict_with_missing_or_repeated_keys_is_refused():
    with pytest.raises(ValueError, match="distinct non-empty keys"):
        bilevel.Verdict(method="a", baseline="a", metric="m")
    with pytest.raises(ValueError, match="distinct non-empty keys"):
        bilevel.Verdict(method="a", baseline="", metric="m")


def test_a_verdict_that_cannot_be_formed_loses_no_number(tmp_path):
    """An evaluation without the verdict's keys stops the run after outer.safetensors and final.json are
    written."""
    from bilevel.run.loop import RunSpec, run
    import bilevel.problems.ridge as ridge
    import types
    module = types.SimpleNamespace(**{k: getattr(ridge, k) for k in ("Config", "SMOKE", "DEFAULT_SOLVER")})
    module.build = lambda cfg, ctx: replace(ridge.build(cfg, ctx), verdict=VERDICT)
    out = tmp_path / "run"
    spec = RunSpec(problem="ridge", solver=None, steps=1, seed=0, out=str(out), progress=False)
    with pytest.raises(ValueError, match="no per-seed list under 'm'"):
        run(spec, module, ridge.SMOKE, {})
    assert json.loads((out / "final.json").read_text())["val_loss"] > 0
    assert (out / "outer.safetensors").is_file() and (out / "curves.png").is_file()


def test_plot_result_writes_the_figure(tmp_path):
    final = {"m": [3.0, 4.0], "b": [1.0, 2.5], "c": [2.0, 2.0]}
    path = bilevel.plot_result(VERDICT, final, tmp_path / "result.png", "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_final_summary_prints_numbers_seeds_and_verdict():
    final = {"clean_val_acc": 0.5, "m": [1.0, 3.0], "verdict": ["verdict: x", "control: y"]}
    assert final_summary(final).splitlines() == [
        "clean_val_acc = 0.5", "m: 2 ± 1.4 over 2 seeds (1, 3)", "verdict: x", "control: y"]


def test_final_summary_tables_grouped_numbers_with_their_spread():
    final = {"algorithm": "irm: x", "ce/acc": 0.5, "ce/acc_std": 0.01, "ce/loss": 2.0, "learned/acc": 0.75,
             "learned/acc_std": 0.02}
    assert final_summary(final).splitlines() == [
        "algorithm = irm: x",
        "         acc          loss",
        "ce       0.5 ± 0.01   2",
        "learned  0.75 ± 0.02  -"]


def test_arl_held_out_test_equals_plain_sgd_training():
    """One seed of the held-out test: the network trained by hand with torch.optim.SGD (momentum) from the
    seeded init on the seeded noisy labels, whole epochs of the seeded batch order, scored on clean test."""
    cfg = replace(arl.SMOKE, test_cells=("linear:digits", "mlp2:digits_transposed"), test_steps=60)
    losses = {"ce": torch.nn.functional.cross_entropy,
              "start": TaylorLoss(initial_theta(arl.taylor_spec(cfg), "brier"), arl.taylor_spec(cfg))}
    got = arl.held_out_test(losses, cfg, seed=3)
    for name, loss_fn in losses.items():
        accs = []
        for arch, dataset in (("linear", "digits"), ("mlp2", "digits_transposed")):
            data = load_split(dataset, cfg.noise, cfg.rate, seed=3)
            per_epoch = len(data.y_train) // cfg.batch
            torch.manual_seed(3)
            model = make_model(arch, data.in_shape, 10)
            opt = torch.optim.SGD(model.parameters(), lr=cfg.inner_lr, momentum=cfg.momentum)
            for step in range(max(2, cfg.test_steps // per_epoch) * per_epoch):
                idx = minibatch_indices(len(data.y_train), cfg.batch, step, 3)
                opt.zero_grad()
                loss_fn(model(data.x_train[idx]), data.y_train[idx]).backward()
                opt.step()
            with torch.no_grad():
                accs.append(100 * float((model(data.x_test).argmax(-1) == data.y_test).double().mean()))
        assert got[name] == pytest.approx(sum(accs) / 2, abs=1e-6)


def test_arl_bad_test_cell_is_refused_before_work():
    with pytest.raises(ValueError, match="test cell 'mlp9:digits' must be 'architecture:dataset'"):
        arl.build(replace(arl.SMOKE, test_cells=("mlp9:digits",)), bilevel.local_context())
    with pytest.raises(ValueError, match="test_seeds must be ≥ 0"):
        arl.build(replace(arl.SMOKE, test_seeds=-1), bilevel.local_context())


def test_bilevel_run_ends_with_the_verdict_and_result_png(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "arl", "--smoke", "--steps", "1", "--out", str(out), "--no-progress",
                 "--solver", "cmaes:popsize=4,sigma=0.5,seed=1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    final = json.loads((out / "final.json").read_text())
    assert len(final["test_acc_learned"]) == len(final["test_acc_cross_entropy"]) == arl.SMOKE.test_seeds
    assert final["verdict"] == bilevel.verdict_lines(arl.VERDICT, final)
    assert printed[-2:] == final["verdict"]
    assert printed[-2].startswith("verdict: learned loss ") and printed[-1].startswith("control: learned loss ")
    assert (out / "result.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "loss_shape.png").read_bytes()[:4] == b"\x89PNG"  # the declaration's own picture


def test_loss_curve_is_the_loss_at_the_stated_probabilities():
    """True class 0 with probability p, the other C − 1 sharing 1 − p: cross-entropy is −log p and the Brier
    score (1 − p)² + (C − 1)((1 − p)/(C − 1))², in float32 round-off."""
    from bilevel.problems.losses.shapes import loss_curve
    p = torch.tensor([0.01, 0.3, 0.9, 1.0], dtype=torch.float64)
    ce = loss_curve(torch.nn.functional.cross_entropy, 10, p)
    assert torch.allclose(ce, -p.log(), atol=2e-6)

    def brier(logits, y):
        q = logits.softmax(-1)
        return ((q - torch.nn.functional.one_hot(y, 10)) ** 2).sum(-1).mean()
    assert torch.allclose(loss_curve(brier, 10, p), (1 - p) ** 2 + 9 * ((1 - p) / 9) ** 2, atol=2e-6)
