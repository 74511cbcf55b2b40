"""reproductions/colored_mnist.py on a small Colored Fashion-MNIST written by the test: both model selections
are the checkpoints the definitions pick (recomputed here from the recorded trace), and a table merged from
runs split across processes has the rows the runs hold."""
import importlib.util
import json
import statistics
from pathlib import Path

import pytest

from test_data_fashion_mnist import write_folder

SCRIPT = Path(__file__).resolve().parents[1] / "reproductions" / "colored_mnist.py"


def _script():
    spec = importlib.util.spec_from_file_location("colored_mnist_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_selections_and_merged_table(tmp_path, monkeypatch):
    folder = tmp_path / "fmnist"
    write_folder(folder, 1200, 300, compress=False)
    monkeypatch.setenv("BILEVEL_FASHION_MNIST", str(folder))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # the data cache goes to the test folder
    script = _script()
    common = ["--dataset", "colored_fashion_mnist", "--per-env", "400", "--seeds", "2", "--hidden", "8",
              "--steps", "25", "--out", str(tmp_path)]
    script.main(common + ["--algorithms", "erm", "--tag", "part_a"])
    script.main(common + ["--algorithms", "vrex", "--tag", "part_b"])
    runs = {}
    for part in ("part_a", "part_b"):
        data = json.loads((tmp_path / f"{part}.json").read_text())
        assert data["args"]["holdout"] == 0.2 and data["args"]["per_env"] == 400
        runs.update(data["results"])
    for rs in runs.values():
        for r in rs:
            trace = r["trace"]
            assert [t["step"] for t in trace] == [0, 10, 20, 24]
            best_val = max(t["val_acc"] for t in trace)
            first = next(t for t in trace if t["val_acc"] == best_val)  # ties: the earliest checkpoint
            assert r["training_domain"] == {"step": first["step"], "test_acc": first["test_acc"]}
            best_out = max(t["test_out_acc"] for t in trace)
            first = next(t for t in trace if t["test_out_acc"] == best_out)
            assert r["test_domain"] == {"step": first["step"], "test_acc": first["test_in_acc"]}
            assert r["test_acc"] == trace[-1]["test_acc"]

    script.main(["--merge", str(tmp_path / "part_a.json"), str(tmp_path / "part_b.json"), "--tag", "merged",
                 "--out", str(tmp_path)])
    table = (tmp_path / "merged.md").read_text()
    assert "400 Fashion-MNIST images per environment" in table and "320 to train on" in table
    for label, rs in runs.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
        last = [100 * r["test_acc"] for r in rs]
        assert f"{statistics.mean(last):.1f} ± {statistics.stdev(last):.1f}" in row
    vrex_row = next(line for line in table.splitlines() if line.startswith("| vrex |"))
    gaps = [100 * (a["test_acc"] - b["test_acc"]) for a, b in zip(runs["vrex"], runs["erm"])]
    assert f"{statistics.mean(gaps):+.1f}" in vrex_row


def test_per_env_is_refused_without_fashion_mnist(tmp_path):
    with pytest.raises(SystemExit, match="--per-env sets the size of colored_fashion_mnist"):
        _script().main(["--per-env", "400", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # refused before any work or file
