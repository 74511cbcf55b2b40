"""The compiled path (``InnerLoop(compile=True)``) against the eager paths, the hand-written limit and jitted JAX.

    python benchmarks/compiled.py                                   # hyperclean and cnn, 15 rounds
    python benchmarks/compiled.py --jax-python /work/jaxenv/bin/python   # + jaxopt custom_root (its own env)
    python benchmarks/compiled.py --problems hyperclean --rounds 5 --quick

One implicit hypergradient (K inner steps, then CG with the fixed iteration count of benchmarks/peers.py) per
call, on the peer benchmark's problems (benchmarks/peer_problems.py): ``hyperclean`` (64×10 logistic model,
900 example weights, 200 GD steps, 40 CG iterations) and ``cnn`` (small CNN on digits, 100 steps). Rows:

- ``ours eager``: ``bilevel.hypergrad(..., solver=cg)`` on the autograd path (the default outside transforms);
- ``ours compiled``: the same with ``InnerLoop(compile=True)``: the inner steps compiled, the IFT part eager;
- ``hand-written autograd``: benchmarks/hw_autograd.py's implicit CG, the eager limit of the same maths;
- ``jaxopt custom_root + solve_cg``: the jitted JAX twin (benchmarks/jax_peers.py), when ``--jax-python`` is given.

Time is the median of ``--rounds`` interleaved calls after a warm-up call (the compile happens in the warm-up).
Compile time is reported apart, twice, each in a fresh process: cold (an empty inductor cache folder) and
cached (the folder the cold run filled). Every row's hypergradient is compared with the float64 exact value
(relative error), so a fast wrong answer shows. One thread, float32.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hw_autograd as hwa  # noqa: E402
import jax_peers  # noqa: E402
import peer_problems  # noqa: E402
from peer_methods import ours_spec  # noqa: E402
from peers import interleaved_rounds  # noqa: E402

PROBLEMS = {"hyperclean": {"problem": "hyperclean", "steps": 200}, "cnn": {"problem": "cnn", "steps": 100}}
QUICK_STEPS = {"hyperclean": 50, "cnn": 30}


def rel_error(value: dict, exact: dict) -> float:
    a = torch.cat([value[k].detach().double().reshape(-1) for k in exact])
    b = torch.cat([exact[k].double().reshape(-1) for k in exact])
    return float((a - b).norm() / b.norm())


def calls(p, spec: str, settings: dict) -> dict:
    """The timed callables, each returning the hypergradient."""
    import dataclasses

    import bilevel
    bp = p.bilevel_problem()
    eager_loop = p.loop()
    compiled_loop = dataclasses.replace(eager_loop, compile=True)

    def ours(loop):
        return lambda: bilevel.hypergrad(bp, p.inner, p.outer, inner_batch=p.inner_batch, outer_batch=p.outer_batch,
                                         solver=spec, loop=loop).hypergrad
    return {"ours eager": ours(eager_loop), "ours compiled": ours(compiled_loop),
            "hand-written autograd": lambda: hwa.implicit(p, "cg", maxiter=settings["cg_iters"], rtol=0.0,
                                                          damping=settings["damping"])}


def compile_child(name: str, quick: bool) -> None:
    """Subprocess entry: one compiled hypergradient, printing the compile time as JSON (cache set by the parent)."""
    import bilevel
    from bilevel import compiled
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", (bilevel.ConvergenceWarning, bilevel.StationarityWarning))
    p, spec, settings, _ = setup(name, quick)
    calls(p, spec, settings)["ours compiled"]()
    print(json.dumps({"compile_seconds": compiled.compile_stats()["compile_seconds"],
                      "graphs": compiled.compile_stats()["graphs"], "torch": torch.__version__,
                      "bilevel": bilevel.__version__}))


def compile_times(name: str, quick: bool) -> dict:
    """Cold (empty inductor cache) and cached compile seconds, each measured in a fresh process."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="inductor_cache_") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, OMP_NUM_THREADS="1")
        for kind in ("cold", "cached"):
            cmd = [sys.executable, os.path.abspath(__file__), "--_compile-child", name] + (["--quick"] if quick else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            out[kind] = json.loads(lines[-1])["compile_seconds"] if lines else f"failed: {proc.stderr[-300:]}"
    return out


def setup(name: str, quick: bool):
    spec = dict(PROBLEMS[name])
    if quick:
        spec["steps"] = QUICK_STEPS[name]
    p = peer_problems.build(spec)
    refs = peer_problems.references(p, with_loop=False)
    settings = peer_problems.solver_settings(refs)
    return p, ours_spec("cg", settings), settings, refs


def measure(name: str, args: argparse.Namespace) -> dict:
    p, spec, settings, refs = setup(name, args.quick)
    fns = calls(p, spec, settings)
    errors = {label: rel_error(fn(), refs["ift"]) for label, fn in fns.items()}  # also the warm-up (compiles)
    times = interleaved_rounds(fns, args.rounds)
    rows = {label: {"median_ms": 1e3 * statistics.median(t), "spread_ms": 1e3 * (max(t) - min(t)),
                    "rel_error": errors[label]} for label, t in times.items()}
    if args.jax_python:
        reason = jax_peers.jax_unavailable(args.jax_python)
        if reason is None:
            out = jax_peers.run_jax(args.jax_python, p, settings, ["custom_root"], args.rounds)
            rec = out.get("methods", {}).get("custom_root", out)
            if "median" in rec:
                rows["jaxopt custom_root + solve_cg"] = {"median_ms": 1e3 * rec["median"],
                                                         "spread_ms": 1e3 * (max(rec["times"]) - min(rec["times"])),
                                                         "rel_error": rel_error({k: torch.as_tensor(v) for k, v in
                                                                                 rec["value"].items()}, refs["ift"]),
                                                         "jit_compile_seconds": rec.get("compile")}
            else:
                rows["jaxopt custom_root + solve_cg"] = {"error": rec.get("error", "no result")}
        else:
            rows["jaxopt custom_root + solve_cg"] = {"error": reason}
    return {"problem": p.name, "spec": spec, "steps": p.steps, "rows": rows, "compile": compile_times(name, args.quick)}


def print_table(result: dict) -> None:
    rows = result["rows"]
    base = rows["ours eager"]["median_ms"]
    jax = rows.get("jaxopt custom_root + solve_cg", {}).get("median_ms")
    print(f"\n{result['problem']}: K = {result['steps']}, {result['spec']}")
    print(f"{'method':34s} {'median ms':>10s} {'spread':>8s} {'× eager':>8s} {'× JAX':>7s} {'rel. error':>11s}")
    for label, r in rows.items():
        if "error" in r:
            print(f"{label:34s} {r['error']}")
            continue
        vs_jax = f"{r['median_ms'] / jax:7.2f}" if jax else "      –"
        print(f"{label:34s} {r['median_ms']:10.2f} {r['spread_ms']:8.2f} {r['median_ms'] / base:8.2f} {vs_jax} "
              f"{r['rel_error']:11.2e}")
    c = result["compile"]
    fmt = lambda v: f"{v:.1f} s" if isinstance(v, float) else str(v)
    print(f"compile (ours compiled, fresh process): cold {fmt(c['cold'])}, from inductor's cache {fmt(c['cached'])}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", default="hyperclean,cnn")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="fewer inner steps (a smoke run of the script)")
    parser.add_argument("--jax-python", default=os.environ.get("JAX_PYTHON"))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--_compile-child", dest="compile_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compile_child:
        compile_child(args.compile_child, args.quick)
        return
    torch.set_num_threads(1)
    import bilevel
    # fixed CG iterations with rtol=0 (every implementation gets the same count) and the peers' K: the
    # non-convergence and stationarity warnings are expected here; the rel. error column shows the accuracy
    warnings.simplefilter("ignore", (bilevel.ConvergenceWarning, bilevel.StationarityWarning))
    names = args.problems.split(",")
    unknown = set(names) - set(PROBLEMS)
    if unknown:
        raise SystemExit(f"--problems: unknown {sorted(unknown)}; choose from {', '.join(PROBLEMS)}")
    results = []
    for name in names:
        result = measure(name, args)
        print_table(result)
        results.append(result)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "compiled" + ("_quick" if args.quick else "") + ".json")
    with open(path, "w") as fh:
        json.dump({"command": "python benchmarks/compiled.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                   "torch": torch.__version__, "results": results}, fh, indent=1)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
