"""The benchmark scripts' smallest modes run and give correct hypergradients (never asserts timings)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, out, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.splitext(str(out))[0] + ".json") as fh:
        return json.load(fh)


def test_solvers_benchmark_tiny(tmp_path):
    records = _run("solvers.py", tmp_path / "solvers.md")
    assert (tmp_path / "solvers.md").read_text().startswith("# Solver benchmark")
    by = {r["method"]: r for r in records}
    assert not [r for r in records if "error" in r], [r["error"] for r in records if "error" in r]
    import bilevel
    assert {r["spec"].split(":")[0] for r in records} == set(bilevel.SOLVERS)
    for name, r in by.items():
        assert r["ours_vs_hw"] < 1e-4, (name, r["ours_vs_hw"])  # the same maths as the hand-written computation
        if name != "cmaes":
            assert r["rel_error"] < 1e-3 and r["cosine"] > 0.999, (name, r)
    assert by["cmaes"]["cos_ift"] == by["cmaes"]["cos_ift"]  # finite


@pytest.mark.slow
def test_peers_benchmark_tiny(tmp_path):
    pytest.importorskip("higher")
    pytest.importorskip("betty")
    pytest.importorskip("torchopt")
    data = _run("peers.py", tmp_path / "peers.md", timeout=1200)
    by = {r["method"]: r for r in data["problems"]}
    for name in ("ours cg", "torchopt custom_root CG", "ours unroll", "higher innerloop_ctx", "torchopt MetaSGD",
                 "torchopt functional (autograd)"):
        assert "error" not in by[name], by[name]
        assert by[name]["rel_error"] < 1e-3, (name, by[name]["rel_error"])
    neumann = [r for n, r in by.items() if "neumann" in n.lower()]
    assert len({round(r["rel_error"], 4) for r in neumann if "error" not in r}) == 1  # same alpha/terms, same answer
