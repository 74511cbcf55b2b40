"""The evaluation protocols of the reproductions (issue 18 parts 3 and 5), checked against recomputation:
AdaLFL's converged baseline returns the test value of the checkpoint it names (replayed by plain SGD),
MetaMD's meta-training seeds draw different maps and pair with the baselines per test seed, and ITL's
stationary inner loop gets ‖∇θG‖ far below where the earlier minibatch loop stopped."""
import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import bilevel
from bilevel.problems import adalfl, itl

REPRO = Path(__file__).resolve().parents[1] / "reproductions"


def _script(name: str):
    sys.path.insert(0, str(REPRO))  # itl_stationary imports its sibling itl.py
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_script", REPRO / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPRO))
    return module


def test_adalfl_validation_split_metric():
    """``evaluate_base_model(split="val")`` is the error rate on the validation split, computed by hand."""
    cfg = replace(adalfl.SMOKE, dataset="digits", model="logistic")
    parts = adalfl.make_parts(cfg, bilevel.local_context())
    theta = parts.fresh_theta(0)
    x, y = parts.data["val"]
    logits = x @ theta["weight"].T + theta["bias"]
    expected = float((logits.argmax(-1) != y).float().mean())
    assert adalfl.evaluate_base_model(parts, theta, "val")["val_error"] == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="split must be 'test' or 'val'"):
        adalfl.evaluate_base_model(parts, theta, "train")


def test_adalfl_converged_baseline_is_the_best_validation_checkpoint():
    """The returned test error is that of plain SGD at the chosen lr, replayed to the chosen step, and no
    other lr of the grid reached a lower validation error at any checked step."""
    script = _script("adalfl")
    cfg = adalfl.Config(dataset="digits", model="logistic", init_steps=0, seed=3)
    result = script.run_converged_baseline(cfg, max_steps=60, every=10, patience=30, scales=(1.0, 10.0))
    assert result["lr"] in (0.01, 0.1) and 10 <= result["step"] <= 60 and result["step"] % 10 == 0
    parts = adalfl.make_parts(cfg, bilevel.local_context())
    replay = adalfl.build_baseline(replace(cfg, base_lr=result["lr"]), bilevel.local_context())
    theta, _, _ = bilevel.run_locally(replay, result["step"])
    assert adalfl.evaluate_base_model(parts, theta)["test_error"] == pytest.approx(result["test"], abs=1e-12)
    assert adalfl.evaluate_base_model(parts, theta, "val")["val_error"] == pytest.approx(result["val"], abs=1e-12)
    for lr in (0.01, 0.1):
        decl = adalfl.build_baseline(replace(cfg, base_lr=lr), bilevel.local_context())
        for step in range(10, 61, 10):
            theta, _, _ = bilevel.run_locally(decl, step)
            assert adalfl.evaluate_base_model(parts, theta, "val")["val_error"] >= result["val"] - 1e-12


def test_metamd_meta_seeds_give_different_maps_and_pair_per_test_seed():
    """Two meta-training seeds give two different maps; MetaMD's per-seed accuracies are the means over
    meta-seeds, one per test seed, as the baselines' are."""
    script = _script("metamd")
    from bilevel.problems import metamd

    cfg, holdout = metamd.SMOKE_DIGITS, "0"
    phis = [script.meta_train_digits(replace(cfg, holdout=holdout), holdout, 2, s, lambda m: None) for s in (0, 1)]
    assert any(not torch.equal(phis[0][k], phis[1][k]) for k in phis[0])
    out = script.digits_holdout(cfg, holdout, 2, (0, 1), 5, lambda m: None, wds=(1e-4,), meta_seeds=(0, 1))
    for name in ("metamd", "sgd", "sgd_m", "adam"):
        assert len(out[name]["per_seed"]) == 2
    assert len(out["metamd"]["per_meta_seed"]) == 2
    mean_of_means = sum(out["metamd"]["per_meta_seed"]) / 2
    assert sum(out["metamd"]["per_seed"]) / 2 == pytest.approx(mean_of_means, abs=1e-4)  # float32 means
    assert out["metamd"]["acc_mean"] == pytest.approx(mean_of_means, abs=1e-4)


def test_itl_stationary_inner_loop_reaches_stationarity():
    """The heavy-ball full-batch inner loop of itl_stationary's quick mode brings ‖∇θG(θ_K)‖ below 2 % of its
    start value (mean over the leave-one-domain-out splits); the earlier 32-image minibatch SGD loop with the same
    number of steps stays above 10 %. ``stationarity`` reports mean and worst case of what the loop logged."""
    script = _script("itl_stationary")
    cfg = script.settings(quick=True)["meta"]
    _, history, _ = script.meta_train(cfg, itl.DEFAULT_SOLVER, steps=1, log=False)
    summary = script.stationarity(history)
    assert summary["inner_grad_norm_max"] == pytest.approx(history[0]["inner_grad_norm"], rel=1e-12)
    assert summary["inner_grad_norm_rel_max"] < 0.02
    minibatch = replace(cfg, inner_batch=32, inner_optimizer="sgd", inner_lr=0.05)
    _, history_sgd, _ = script.meta_train(minibatch, itl.DEFAULT_SOLVER, steps=1, log=False)
    assert script.stationarity(history_sgd)["inner_grad_norm_rel_mean"] > 0.1


def test_fashion8_is_the_resized_test_images(tmp_path, monkeypatch):
    """``fashion8`` is the first Fashion-MNIST test images resized to 8×8 (read from idx files the test
    writes), ``fashion8_inverted`` is 1 − x, and the labels are the files' labels."""
    from bilevel.problems import noisy_training
    from bilevel.problems.data.images import resize
    from test_data_fashion_mnist import write_folder

    arrays = write_folder(tmp_path / "fmnist", 20, 50, compress=False)
    monkeypatch.setenv("BILEVEL_FASHION_MNIST", str(tmp_path / "fmnist"))
    noisy_training._images.cache_clear()
    try:
        x, y = noisy_training._images("fashion8")
        xi, _ = noisy_training._images("fashion8_inverted")
    finally:
        noisy_training._images.cache_clear()  # other tests must read the real files again
    images, labels = arrays["test"]
    expected = resize(torch.from_numpy(images).float()[:, None] / 255.0, 8).clamp(0, 1)
    assert x.shape == (50, 1, 8, 8) and torch.equal(y, torch.from_numpy(labels).long())
    assert torch.allclose(x, expected, atol=0) and torch.allclose(xi, 1.0 - x, atol=0)


def test_arl_baselines_table_ranks_and_gaps(tmp_path, monkeypatch):
    """The Fashion-MNIST baseline script on written idx files: every loss has a row, the average ranks are
    the cells' ranks recomputed here, and the gap is best-noisy-validation minus final accuracy."""
    import json

    from bilevel.problems import noisy_training
    from bilevel.problems.noisy_training import average_ranks
    from test_data_fashion_mnist import write_folder

    write_folder(tmp_path / "fmnist", 20, 400, compress=False)
    monkeypatch.setenv("BILEVEL_FASHION_MNIST", str(tmp_path / "fmnist"))
    noisy_training._images.cache_clear()
    script = _script("arl_baselines")
    monkeypatch.setattr(script, "CELLS", [("mlp_wide", "fashion8")])
    try:
        script.main(["--noises", "A40", "--seeds", "2", "--steps", "8", "--out", str(tmp_path)])
    finally:
        noisy_training._images.cache_clear()
    data = json.loads((tmp_path / "fashion_baselines.json").read_text())["results"]["A40"]
    names = set(data["final"])
    assert {"ce", "gce", "sce", "mae", "nce_mae", "nfl_mae", "taylor_start", "arl_published_ar_a40"} <= names
    ranks = average_ranks({n: [sum(v[0]) / 2] for n, v in data["final"].items()})
    text = (tmp_path / "fashion_baselines.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|") for line in text.splitlines() if line.startswith("| ")}
    for name, rank in ranks.items():
        assert rows[name][-3].strip() == f"{rank:.2f}"  # columns: ... | avg. rank | gap |
    assert all(len(v[0]) == 2 for v in data["gap"].values())


def test_arl_baselines_merge_keeps_every_noise(tmp_path, monkeypatch):
    """Runs split by --noises merge into one report holding each run's table unchanged."""
    from bilevel.problems import noisy_training
    from test_data_fashion_mnist import write_folder

    write_folder(tmp_path / "fmnist", 20, 300, compress=False)
    monkeypatch.setenv("BILEVEL_FASHION_MNIST", str(tmp_path / "fmnist"))
    noisy_training._images.cache_clear()
    script = _script("arl_baselines")
    monkeypatch.setattr(script, "CELLS", [("mlp_wide", "fashion8")])
    monkeypatch.setattr(script.robust, "LOSSES", {"ce": script.robust.cross_entropy})  # keep the test short
    try:
        for noise in ("S20", "A40"):
            script.main(["--noises", noise, "--seeds", "1", "--steps", "6", "--out", str(tmp_path), "--tag", noise])
    finally:
        noisy_training._images.cache_clear()
    script.main(["--merge", str(tmp_path / "S20.json"), str(tmp_path / "A40.json"), "--out", str(tmp_path),
                 "--tag", "merged"])
    merged = (tmp_path / "merged.md").read_text()
    for noise in ("S20", "A40"):
        part = (tmp_path / f"{noise}.md").read_text()
        table = part[part.index("### "):]
        assert table.strip() in merged


def test_arl_search_popsize_is_pycmas_default():
    """The search's default population is pycma's own default for the 12 Taylor coefficients."""
    import cma

    script = _script("arl_search")
    es = cma.CMAEvolutionStrategy(12 * [0.0], 0.5, {"verbose": -9})
    assert script.pycma_default_popsize(12) == es.popsize == 11


def test_arl_search_controls_are_the_baseline_scripts_runs(tmp_path, monkeypatch):
    """The search script's cross-entropy and start-loss test numbers are the baseline script's runs (same
    seeds, same protocol); each saved loss is its search's final CMA-ES mean; different CMA-ES seeds search
    differently; the paired column of the report is recomputed from the JSON."""
    import json
    import statistics

    from bilevel.problems import noisy_training
    from bilevel.problems.losses.taylor import TaylorLoss
    from test_data_fashion_mnist import write_folder

    write_folder(tmp_path / "fmnist", 20, 300, compress=False)
    monkeypatch.setenv("BILEVEL_FASHION_MNIST", str(tmp_path / "fmnist"))
    noisy_training._images.cache_clear()
    script = _script("arl_search")
    baselines = script.arl_baselines
    monkeypatch.setattr(baselines, "CELLS", [("mlp_wide", "fashion8")])
    monkeypatch.setattr(baselines.robust, "LOSSES", {"ce": baselines.robust.cross_entropy})  # keep it short
    try:
        script.main(["--runs", "dr:A40", "--cma-seeds", "1,2", "--popsize", "3", "--generations", "1",
                     "--inner-steps", "8", "--noise-repeats", "2", "--eval-seeds", "2", "--eval-steps", "6",
                     "--out", str(tmp_path / "search")])
        baselines.main(["--noises", "A40", "--seeds", "2", "--steps", "6", "--out", str(tmp_path / "base")])
    finally:
        noisy_training._images.cache_clear()
    run = json.loads((tmp_path / "search" / "search.json").read_text())["results"]["dr:A40"]
    base = json.loads((tmp_path / "base" / "fashion_baselines.json").read_text())["results"]["A40"]
    for name in ("ce", "taylor_start"):
        assert run["eval"]["A40"]["final"][name] == base["final"][name]
    thetas = {seed: s["theta"] for seed, s in run["searches"].items()}
    assert thetas["1"] != thetas["2"]
    for seed, theta in thetas.items():
        saved = TaylorLoss.load(tmp_path / "search" / f"dr_a40_cma{seed}.pt").theta
        assert saved.tolist() == torch.tensor(theta).tolist()
    text = (tmp_path / "search" / "search.md").read_text()
    diffs = [a - b for a, b in zip(run["fitness"]["cma1"], run["fitness"]["start"])]
    assert f"| {statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs):.2f} |" in text


def test_arl_search_refuses_a_bad_run_before_any_work(tmp_path):
    script = _script("arl_search")
    with pytest.raises(SystemExit, match="ar\\|dr:S80\\|A40"):
        script.main(["--runs", "dr:S50", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_arl_baselines_add_and_only(tmp_path, monkeypatch):
    """``--add`` trains a saved loss file like the loss it holds (the start loss saved and re-added scores as
    ``taylor_start``, run for run); ``--only`` keeps just the named losses; a bad file or name is refused
    before anything is written."""
    import json

    from bilevel.problems import noisy_training
    from bilevel.problems.losses.taylor import TaylorLoss
    from test_data_fashion_mnist import write_folder

    write_folder(tmp_path / "fmnist", 20, 300, compress=False)
    monkeypatch.setenv("BILEVEL_FASHION_MNIST", str(tmp_path / "fmnist"))
    noisy_training._images.cache_clear()
    script = _script("arl_baselines")
    monkeypatch.setattr(script, "CELLS", [("mlp_wide", "fashion8")])
    start = script.losses_for("S80")["taylor_start"]
    TaylorLoss(start.theta, start.spec).save(tmp_path / "start.pt")
    out = tmp_path / "out"
    (tmp_path / "not_a_loss.pt").write_text("plain text")
    for bad, message in ((["--add", f"copy={tmp_path / 'missing.pt'}"], "NAME=PATH"),
                         (["--add", f"ce={tmp_path / 'start.pt'}"], "name 'ce' is taken"),
                         (["--add", f"copy={tmp_path / 'not_a_loss.pt'}"], "not a saved TaylorLoss"),
                         (["--only", "ce,nonsense"], "unknown nonsense"),
                         (["--merge", str(tmp_path / "missing.json")], "cannot read")):
        with pytest.raises(SystemExit, match=message):
            script.main(["--noises", "S80", "--out", str(out), *bad])
    assert not out.exists()
    try:
        script.main(["--noises", "S80", "--seeds", "2", "--steps", "6", "--out", str(out),
                     "--add", f"copy={tmp_path / 'start.pt'}", "--only", "taylor_start,copy"])
    finally:
        noisy_training._images.cache_clear()
    final = json.loads((out / "fashion_baselines.json").read_text())["results"]["S80"]["final"]
    assert set(final) == {"taylor_start", "copy"}
    assert final["copy"] == final["taylor_start"]
