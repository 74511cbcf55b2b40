"""The benchmark scripts' smallest modes run and give correct hypergradients (never asserts timings)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")


def _run(script, out, timeout=600, drop_env=()):
    env = {k: v for k, v in os.environ.items() if k not in drop_env}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, script), "--tiny", "--out", str(out)],
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


TRUNCATED_SERIES = ("neumann", "fixedpoint")
"""Families whose value is a truncated series (50 terms), far from the exact IFT value by design: every
implementation must give the same truncated value instead."""


def test_peers_benchmark_tiny(tmp_path):
    """ridge d = 100 (10 penalty groups), float32, every family as ours / hand-written autograd / torch.func and the
    installed peers (about 20 s); JAX rows are skipped with their reason (no interpreter given)."""
    pytest.importorskip("higher")
    pytest.importorskip("torchopt")
    data = _run("peers.py", tmp_path / "peers.md", timeout=1200, drop_env=("JAX_PYTHON",))
    rows = data["problems"]
    by = {r["method"]: r for r in rows}
    for name in ("ours cg", "torchopt custom_root CG", "ours unroll", "higher innerloop_ctx", "torchopt MetaSGD",
                 "torchopt functional (autograd)"):
        assert "error" not in by[name], by[name]
        assert by[name]["rel_error"] < 1e-3, (name, by[name]["rel_error"])
    import bilevel
    families = {r["family"] for r in rows if r["impl"] == "ours"}
    assert {name.split(" ")[0] for name in families} == set(bilevel.SOLVERS)  # every registered solver is benchmarked
    for r in rows:
        if r["impl"] not in ("ours", "autograd", "func"):
            continue
        assert "error" not in r, r
        if r["family"] in TRUNCATED_SERIES or r["family"] == "cmaes":
            continue
        # float32 against the float64 exact value of what the row computes: measured 1.4e-7 … 7.8e-7
        assert r["rel_error"] < 1e-5, (r["method"], r["rel_error"])
    for family in (*TRUNCATED_SERIES, "cmaes"):  # the same truncated series / the same CMA-ES generation
        errors = [r["rel_error_ift"] for r in rows if r["family"] == family and r["impl"] != "betty" and "error" not in r]
        assert len(errors) >= 3 and max(errors) - min(errors) < 1e-4 * max(errors), (family, errors)
    assert data["targets"] and all(re.fullmatch(r"target: .+; measured .+: (met|missed)", t) for t in data["targets"])
    assert "no JAX interpreter given" in (tmp_path / "peers.md").read_text()
    assert not [r for r in rows if r["impl"] == "jax"]


def _jax_python() -> str:
    python = os.environ.get("JAX_PYTHON")
    if not python:
        pytest.skip("set JAX_PYTHON to an interpreter with jax and jaxopt (see benchmarks/jax_peers.py) to check the "
                    "JAX twins of the benchmark problems")
    sys.path.insert(0, BENCHMARKS)
    import jax_peers
    reason = jax_peers.jax_unavailable(python)
    if reason:
        pytest.skip(reason)
    return python


@pytest.mark.parametrize("spec", [
    {"problem": "ridge", "d": 30, "groups": 5, "steps": 50},
    {"problem": "mlp", "steps": 10, "hidden": 8},
    {"problem": "cnn", "steps": 20, "channels": 2, "train_size": 100},
    {"problem": "hyperclean", "steps": 20},
], ids=lambda s: s["problem"])
def test_jax_twins_compute_the_same_hypergradients(spec):
    """The JAX twins of the benchmark problems, run in float64: ``jax.grad`` through ``lax.scan`` equals the float64
    derivative of the K-step loop (measured ≤ 7e-16), and jaxopt's ``custom_root`` + ``solve_cg`` run to convergence
    (600 iterations, with the problem's damping) the exact implicit hypergradient at the K-step iterate (dense
    solve; measured ≤ 7e-12, ridge's closed form assuming the inner problem solved). So the losses, the loop and the
    damping are the same maths as the torch side's."""
    python = _jax_python()
    import common
    import jax_peers
    import peer_problems
    problem = peer_problems.build(dict(spec, dtype=torch.float64))
    refs = peer_problems.references(problem)
    settings = dict(peer_problems.solver_settings(refs), cg_iters=600)
    out = jax_peers.run_jax(python, problem, settings, ["custom_root", "scan"], repeats=1, x64=True)
    assert "error" not in out, out
    got = {k: {name: torch.as_tensor(v) for name, v in m["value"].items()} for k, m in out["methods"].items()}
    assert common.rel_error(got["scan"], refs["loop"]) < 1e-12
    assert common.rel_error(got["custom_root"], refs["ift"]) < 1e-9


def test_jax_custom_root_runs_exactly_the_given_cg_iterations():
    """With the benchmark's settings (tol 0, ``cg_iters`` iterations) jaxopt's CG equals the hand-written float64 CG of
    the same iteration count (measured 1.5e-16) and not the one of one iteration fewer (1.5e-6 away), on a
    well-conditioned ridge problem (on ill-conditioned ones finite-precision CG amplifies rounding: 1e-15 changes of
    the data move 40 iterations of hyper-cleaning CG by 3e-5, so two implementations cannot agree to this bound)."""
    python = _jax_python()
    import common
    import jax_peers
    import peer_problems
    problem = peer_problems.ridge(d=30, groups=5, steps=50, dtype=torch.float64)
    settings = peer_problems.solver_settings(peer_problems.references(problem))
    out = jax_peers.run_jax(python, problem, settings, ["custom_root"], repeats=1, x64=True)
    got = {name: torch.as_tensor(v) for name, v in out["methods"]["custom_root"]["value"].items()}
    cg = common.hw_implicit(problem, "cg", maxiter=settings["cg_iters"], rtol=0.0)
    fewer = common.hw_implicit(problem, "cg", maxiter=settings["cg_iters"] - 1, rtol=0.0)
    assert common.rel_error(got, cg) < 1e-12
    assert common.rel_error(got, fewer) > 1e-8


def test_boat_section_without_boat_and_its_float64_twin(tmp_path):
    """Without ``--boat-path`` the peer benchmark's BOAT part runs and says why its rows are absent; the float64 twin
    of BOAT's VFO formula (benchmarks/peer_boat.py) is ours ``bome`` with ``control=value`` and a momentum-0.5 loop."""
    import dataclasses
    sys.path.insert(0, BENCHMARKS)
    import peer_adapters
    import peer_boat
    import peer_problems
    out = tmp_path / "peers.md"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "peers.py"), "--quick", "--parts", "boat",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BOAT rows absent: no --boat-path given" in out.read_text()
    p = dataclasses.replace(peer_problems.ridge(d=30, groups=5, steps=50, dtype=torch.float64), momentum=0.5)
    got = peer_adapters.as_dict(peer_adapters.ours(p, f"bome:eta={peer_boat.BOAT_ETA},control=value")())
    want = peer_boat.hw_bome(p, p.inner, peer_boat.BOAT_ETA)
    assert float(_tree_norm(want)) > 0  # the barrier is active at the cold start (else both are ∇φF = 0)
    assert float(_tree_norm({k: got[k] - want[k] for k in want})) <= 1e-10 * float(_tree_norm(want))


def _tree_norm(d):
    return torch.sqrt(sum((v.double() ** 2).sum() for v in d.values()))


def test_boat_rows_agree_with_their_float64_twins():
    """With BOAT importable (``BOAT_PATH``: the folder holding boat_torch): VFO's d_φ equals ours bome's and the float64
    twin's, PGDO's direction its float64 twin's, from the same (φ, θ) in float32."""
    path = os.environ.get("BOAT_PATH")
    if not path:
        pytest.skip("set BOAT_PATH to a folder holding boat_torch (pip install --target DIR --no-deps boat-torch==1.1.1) "
                    "to check the BOAT rows of the peer benchmark")
    sys.path.insert(0, BENCHMARKS)
    sys.path.insert(0, path)
    import peer_boat
    import peer_problems
    reason = peer_boat.unavailable(path)
    if reason:
        pytest.skip(reason)
    rows = peer_boat.per_call(peer_problems.ridge(d=30, groups=5, steps=50), 0, None)
    for label, *_, error, diff in rows:
        assert float(error) < 1e-5, (label, error)
        if diff != "—":
            assert float(diff) < 1e-5, (label, diff)
