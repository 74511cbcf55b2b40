"""Our hypergradients against the peer libraries and the hand-written limits: time, peak memory, relative error.

Set-up (once):

    pip install -c constraints-cpu.txt -e ".[dev,bench]"   # torchopt (a dependency), higher
    pip install matplotlib                                  # the plots (tables only without it)
    # betty declares python<3.11: install it beside the environment and pass its folder with --betty-path
    pip install --target /work/betty-site --no-deps --ignore-requires-python betty-ml==0.2.1
    # JAX/jaxopt in their own environment (never in the project's), driven as a subprocess:
    python3 -m venv /work/jaxenv && /work/jaxenv/bin/pip install jax jaxlib jaxopt numpy

Runs (one run gives every number and ratio; the machine should be otherwise idle for the full run):

    python benchmarks/peers.py --quick --jax-python /work/jaxenv/bin/python --betty-path /work/betty-site
    python benchmarks/peers.py --jax-python /work/jaxenv/bin/python --betty-path /work/betty-site
    python benchmarks/peers.py --tiny        # correctness only (tests/test_benchmarks_smoke.py)

Output: benchmarks/results/peers.md (``--quick``: peers_quick.md) with the command, the target lines, every table
and the plots beside it (``*_accuracy_time.png``, ``*_curves_T.png``, ``*_curves_dim.png``), and the same
numbers as JSON (``peers.json``); the side-by-side ratio tables and the target lines are also printed.

Without ``--jax-python`` (or with an interpreter that cannot import jax and jaxopt) the JAX rows are skipped and
the reason is printed; without betty its rows are skipped likewise. BOAT (``--boat-path``, part ``boat``:
benchmarks/peer_boat.py) adds a section for the first-order solvers bome and f2sa; without it the section says
why. ``--path`` picks the library's autodiff path (``bilevel.autodiff_path``: auto, autograd, func, and whatever
the library adds); a comma list runs ours on each, the first one being the path of the targets.

Parts (``--parts``, default all):
- ``sizes``: ridge d = 1000 with its closed form (K = 100), the 64-32-10 MLP on digits (K = 200 heavy-ball steps),
  a small CNN on digits (8 channels, K = 100); ``hyperclean``: data hyper-cleaning on digits (64×10 logistic
  model, 900 example weights, K = 200 GD steps, 40 CG iterations), the size of the JAX target;
- ``T``: curves over the inner steps T = 10 … 1000 (ridge d = 1000, 10 penalty groups); ``dim``: curves over
  dim(φ) = 1 … 1000 (ridge d = 1000, K = 100, tied penalties);
- ``zero``: our cmaes against torchopt's zero-order estimators (benchmarks/peer_zero_order.py).
Every part runs every solver family (benchmarks/peer_methods.py) as ours, hand-written eager autograd
(benchmarks/hw_autograd.py), hand-written torch.func (benchmarks/common.py) and the peers that have it: torchopt
(``custom_root`` CG/Neumann, MetaSGD, functional + autograd), higher (``innerloop_ctx``), betty (cg, neumann,
darts), JAX (jaxopt ``custom_root`` + ``solve_cg``, ``jax.grad`` through ``lax.scan``; benchmarks/jax_peers.py).
Problems and exact values: benchmarks/peer_problems.py.

Measurement: each method is called once (its value is checked against the float64 exact value of what it
computes, and this call warms caches), then all methods of a problem are timed in interleaved rounds (a, b, c,
…, then reversed), ≥ 5 rounds: the time is the median, and "ours / X" is the median of the per-round ratios
(paired, robust to load drifting between rounds). A method whose first call exceeds ``--call-cap`` seconds is
timed by that one call only (flagged). JAX runs in its own process right after the torch rounds of the same
problem, with the same number of timed calls after compilation; its ratio is a ratio of medians. Peak memory:
the peak RSS increase of one call after a warm-up (benchmarks/common.py), in a fresh subprocess per method in
the full run, in-process with ``--quick``; JAX's in its own process. One core: the process (and every
subprocess, JAX included) is pinned to ``--cpu`` (default: the first allowed core), torch and XLA use one thread.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import common  # noqa: E402
import jax_peers  # noqa: E402
import peer_methods  # noqa: E402
import peer_problems  # noqa: E402
import peer_report  # noqa: E402
from common import cosine, rel_error  # noqa: E402
from peer_adapters import (as_dict, autograd_inner_loop, betty_hypergrad, higher_unroll, ours,  # noqa: E402,F401
                           set_library_path, torchopt_functional, torchopt_implicit, torchopt_metasgd)

THIS = os.path.abspath(__file__)


# --------------------------------------------------------------------------------------------------
# what runs
# --------------------------------------------------------------------------------------------------
def instances(mode: str, parts: set[str]) -> list[dict]:
    """The problem instances of each part; ``mode`` is full, quick or tiny."""
    out = []

    def add(part, key, **spec):
        if part in parts:
            out.append({"part": part, "key": key, **spec})

    if mode == "tiny":
        add("sizes", "ridge-100", problem="ridge", d=100, groups=10, steps=100)
        return out
    q = mode == "quick"
    d = 200 if q else 1000
    add("sizes", f"ridge-{d}", problem="ridge", d=d, steps=50 if q else 100)
    add("sizes", "mlp", problem="mlp", steps=30 if q else 200, hidden=16 if q else 32)
    add("sizes", "cnn", problem="cnn", steps=60 if q else 100, channels=4 if q else 8, train_size=300 if q else 900)
    add("hyperclean", "hyperclean", problem="hyperclean", steps=50 if q else 200)
    for T in ((10, 30, 100) if q else (10, 30, 100, 300, 1000)):
        add("T", f"T={T}", problem="ridge", d=d, groups=10, steps=T)
    for g in ((1, 10, 50) if q else (1, 10, 100, 1000)):
        add("dim", f"dim={g}", problem="ridge", d=d, groups=g, steps=30 if q else 100)
    return out


def problem_spec(inst: dict) -> dict:
    return {k: v for k, v in inst.items() if k not in ("part", "key")}


def betty_available() -> str | None:
    """None when betty imports, else the reason."""
    try:
        import betty.hypergradient  # noqa: F401
        return None
    except Exception as err:
        return f"betty not importable ({type(err).__name__}: {err}); install line in this file's docstring"


# --------------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------------
def interleaved_rounds(fns: dict, rounds: int) -> dict[str, list[float]]:
    """``rounds`` timed calls of every callable, interleaved (one round = each once; odd rounds reversed)."""
    names = list(fns)
    times = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            gc.collect()
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def memory_child(payload: str) -> None:
    """Subprocess entry (``--_memory JSON``): peak RSS increase of one call of one method, after a warm-up."""
    job = json.loads(payload)
    common.fix_malloc()
    common.setup_process()
    set_library_path(job["path"])
    p = peer_problems.build(job["spec"])
    warm, _ = common.hw_run(p, p.inner, p.outer, p.steps)
    rows, _ = peer_methods.methods(p, job["settings"], warm, extra_paths=tuple(job["extra_paths"]),
                                   betty=job["betty"], jax=False)
    fn = next(m for m in rows if m.label == job["label"]).make()
    fn()
    print(json.dumps({"mem": common.peak_rss_increase_mib(fn)}))


def measure_instance(inst: dict, opts: argparse.Namespace) -> tuple[dict, list[dict]]:
    """Every method on one problem instance: (instance summary, records)."""
    t_start = time.perf_counter()
    p = peer_problems.build(problem_spec(inst))
    refs = peer_problems.references(p)
    s = peer_problems.solver_settings(refs)
    rows, left_out = peer_methods.methods(p, s, refs["warm"], extra_paths=opts.extra_paths,
                                          forward_max_dim=opts.forward_max_dim if inst["part"] != "dim" else 0,
                                          betty=opts.betty_reason is None, jax=opts.jax_reason is None)
    n_theta, n_phi = (sum(v.numel() for v in d.values()) for d in (p.inner, p.outer))
    summary = {"part": inst["part"], "instance": inst["key"], "name": p.name, "spec": problem_spec(inst),
               "steps": p.steps, "lr": p.lr, "momentum": p.momentum, "dim_theta": n_theta, "dim_phi": n_phi,
               "settings": s, "left_out": left_out, "lambda_min": refs["lambda_min"], "lambda_max": refs["lambda_max"]}
    base = {"part": inst["part"], "instance": inst["key"], "T": p.steps, "dim_phi": n_phi, "dim_theta": n_theta}
    records, fns, results = [], {}, {}
    for m in rows:
        rec = dict(base, family=m.family, impl=m.impl, method=m.label, target=m.target, path_asked=m.path)
        records.append(rec)
        if m.impl == "jax":
            continue
        try:
            fn = m.make()
            t0 = time.perf_counter()
            out = fn()
            first = time.perf_counter() - t0
        except Exception as err:  # recorded in the table, never raised
            rec["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
            continue
        if hasattr(out, "diagnostics"):
            rec["path"] = str(out.diagnostics.get("autodiff_path", ""))
        results[m.label] = {k: v.detach() for k, v in as_dict(out).items()}
        rec["first_call"] = first
        if first > opts.call_cap and opts.rounds > 0:
            rec["note"] = f"one call took {first:.0f} s > --call-cap {opts.call_cap:.0f} s: timed by that call only"
            rec["times"] = [first]
        else:
            fns[m.label] = fn
    times = interleaved_rounds(fns, opts.rounds) if opts.rounds > 0 else {k: [] for k in fns}
    for rec in records:
        label = rec["method"]
        if label in fns:
            rec["times"] = times[label] or [rec["first_call"]]
        if label in results:
            g = results[label]
            ref = refs.get(rec["target"])
            rec["rel_error"] = rel_error(g, ref) if ref is not None else math.nan
            rec["rel_error_ift"] = rel_error(g, refs["ift"])
            rec["cos_ift"] = cosine(g, refs["ift"])
            rec["time"] = statistics.median(rec["times"])
            rec["rounds"] = len(rec["times"])
    # peak memory
    for rec in records:
        if rec["method"] not in results or opts.memory == "none":
            continue
        if opts.memory == "inprocess":
            common.fix_malloc()
            fn = fns.get(rec["method"]) or next(m for m in rows if m.label == rec["method"]).make()
            rec["mem"] = common.peak_rss_increase_mib(fn)
        else:
            job = {"spec": problem_spec(inst), "label": rec["method"], "settings": s, "path": opts.primary_path,
                   "extra_paths": list(opts.extra_paths), "betty": opts.betty_reason is None}
            got = common.memory_in_subprocess(THIS, [json.dumps(job)], timeout=3600)
            rec["mem"] = got.get("mem", math.nan)
            if "error" in got:
                rec["mem_error"] = got["error"]
    # JAX, right after the torch rounds of the same problem
    jax_rows = [r for r in records if r["impl"] == "jax"]
    if jax_rows:
        keys = [next(m.jax_key for m in rows if m.label == r["method"]) for r in jax_rows]
        out = jax_peers.run_jax(opts.jax_python, p, s, keys, max(opts.rounds, 1), cpu=opts.cpu)
        summary["jax_versions"] = out.get("versions")
        for rec, key in zip(jax_rows, keys):
            got = out.get("methods", {}).get(key, {"error": out.get("error", "no result")})
            if "error" in got:
                rec["error"] = got["error"]
                continue
            g = {k: torch.as_tensor(v) for k, v in got["value"].items()}
            rec.update(times=got["times"], time=got["median"], rounds=len(got["times"]), mem=got["mem"],
                       compile=got["compile"], rel_error=rel_error(g, refs[rec["target"]]),
                       rel_error_ift=rel_error(g, refs["ift"]), cos_ift=cosine(g, refs["ift"]))
    summary["seconds"] = time.perf_counter() - t_start
    summary["ratios"] = ratios(records)
    for rec in records:
        print(peer_report.progress_line(rec), flush=True)
    return summary, records


def ratios(records: list[dict]) -> list[dict]:
    """Per family, ours (primary path) against every other implementation of that family: the median of the
    per-round ratios where both ran in the same rounds, else (JAX, single-call rows) the ratio of medians."""
    out = []
    by_family = {}
    for r in records:
        by_family.setdefault(r["family"], []).append(r)
    for family, rs in by_family.items():
        mine = next((r for r in rs if r["impl"] == "ours" and r["path_asked"] == "" and "time" in r), None)
        if mine is None:
            continue
        for other in rs:
            if other is mine or "time" not in other:
                continue
            a, b = mine["times"], other["times"]
            paired = other["impl"] != "jax" and len(a) == len(b) and len(a) > 1 and "note" not in mine and "note" not in other
            ratio = statistics.median(x / y for x, y in zip(a, b)) if paired else mine["time"] / other["time"]
            mem = (mine["mem"] / other["mem"] if other.get("mem", 0) and other["mem"] > 0 and "mem" in mine
                   else math.nan)
            out.append({"family": family, "ours": mine["method"], "other": other["method"], "impl": other["impl"],
                        "time_ratio": ratio, "paired": paired, "mem_ratio": mem})
    return out


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, a few minutes")
    parser.add_argument("--tiny", action="store_true", help="correctness only (the smoke test): ridge d=100 with 10 "
                        "penalty groups, one call per method, no memory, no curves")
    parser.add_argument("--out", default=None, help="Markdown report (JSON and plots beside it); default "
                        "benchmarks/results/peers.md (peers_quick.md with --quick)")
    parser.add_argument("--parts", default="sizes,hyperclean,T,dim,zero,boat", help="comma list of: sizes, hyperclean, "
                        "T, dim, zero, boat")
    parser.add_argument("--path", default="auto", help="bilevel.autodiff_path for ours; a comma list runs ours on "
                        "each (the first one for the targets)")
    parser.add_argument("--jax-python", default=os.environ.get("JAX_PYTHON"), help="interpreter of the JAX "
                        "environment (default: $JAX_PYTHON); JAX rows are skipped without it")
    parser.add_argument("--betty-path", default=None, help="folder holding the betty package (pip --target)")
    parser.add_argument("--boat-path", default=None, help="folder holding the boat_torch package (pip --target, "
                        "--no-deps); adds the BOAT section (part boat, benchmarks/peer_boat.py)")
    parser.add_argument("--cpu", type=int, default=None, help="core to pin the benchmark and its subprocesses to "
                        "(default: the first core this process may use; -1: no pinning)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per method (the median of these; the "
                        "benchmark's protocol is ≥ 5)")
    parser.add_argument("--call-cap", type=float, default=None, help="seconds: a method whose first call takes "
                        "longer is timed by that call only (default 60, 10 with --quick)")
    parser.add_argument("--memory", choices=("subprocess", "inprocess", "none"), default=None,
                        help="peak-memory measurement (default: subprocess; inprocess with --quick; none with --tiny)")
    parser.add_argument("--_memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.mode = "tiny" if args.tiny else ("quick" if args.quick else "full")
    if args.out is None:
        args.out = os.path.join(common.RESULTS, "peers_quick.md" if args.mode == "quick" else "peers.md")
    if args.mode == "tiny":
        args.rounds, args.memory = 0, "none"
        args.parts = "sizes"
    args.memory = args.memory or ("inprocess" if args.mode == "quick" else "subprocess")
    args.call_cap = args.call_cap if args.call_cap is not None else (10.0 if args.mode == "quick" else 60.0)
    args.forward_max_dim = 256 if args.mode == "full" else 32
    return args


def add_site(option: str, folder, how: str) -> None:
    """Put a peer installed in ``folder`` (betty, BOAT: packages whose dependencies clash with ours) on the import
    path of this process and of its subprocesses; nothing when the option is absent."""
    if not folder:
        return
    if not os.path.isdir(folder):
        raise SystemExit(f"{option} {folder!r} is not a folder; {how}, or leave the option out")
    sys.path.insert(0, os.path.abspath(folder))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.abspath(folder), os.environ.get("PYTHONPATH")]))

def setup_paths(args: argparse.Namespace) -> None:
    """Library path(s), betty folder, CPU pinning, JAX interpreter: validated before any work."""
    import bilevel
    valid = getattr(getattr(bilevel, "paths", None), "PATHS", ("auto",))
    paths = [x.strip() for x in args.path.split(",") if x.strip()]
    bad = [x for x in paths if x not in valid]
    if not paths or bad:
        raise SystemExit(f"--path {args.path!r}: unknown path(s) {bad}; the library offers {list(valid)}")
    args.primary_path, args.extra_paths = paths[0], tuple(paths[1:])
    set_library_path(args.primary_path)
    add_site("--betty-path", args.betty_path, "install betty there with the pip line of this file's docstring")
    add_site("--boat-path", args.boat_path, "install boat-torch there (the pip line in benchmarks/peer_boat.py)")
    allowed = sorted(os.sched_getaffinity(0))
    args.cpu_asked = args.cpu
    args.cpu = allowed[0] if args.cpu is None else args.cpu
    if args.cpu >= 0:
        if args.cpu not in allowed:
            raise SystemExit(f"--cpu {args.cpu}: not a core this process may use {allowed}; "
                             "pick one of them or -1 for no pinning")
        os.sched_setaffinity(0, {args.cpu})
    args.cpu = args.cpu if args.cpu >= 0 else None
    args.betty_reason = betty_available()
    args.jax_reason = jax_peers.jax_unavailable(args.jax_python)
    import peer_boat
    args.boat_reason = peer_boat.unavailable(args.boat_path)


def main(argv=None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args._memory:
        memory_child(args._memory)
        return
    common.setup_process()
    setup_paths(args)
    started = time.perf_counter()
    parts = set(filter(None, args.parts.split(",")))
    unknown = parts - {"sizes", "hyperclean", "T", "dim", "zero", "boat"}
    if unknown:
        raise SystemExit(f"--parts: unknown part(s) {sorted(unknown)}; choose from sizes, hyperclean, T, dim, zero, boat")
    for reason in (args.betty_reason, args.jax_reason, args.boat_reason if "boat" in parts else None):
        if reason:
            print(f"[peers] skipping rows: {reason}", flush=True)
    summaries, records = [], []
    for inst in instances(args.mode, parts):
        print(f"[peers] {inst['part']} {inst['key']} ...", flush=True)
        summary, recs = measure_instance(inst, args)
        summaries.append(summary)
        records += recs
    zero_text, zero_recs = "", []
    if "zero" in parts and args.mode != "tiny":
        import peer_zero_order
        zero_text, zero_recs = peer_zero_order.zero_order(args.mode == "quick")
    boat_text = ""
    if "boat" in parts and args.mode != "tiny":  # BOAT beside our first-order solvers (benchmarks/peer_boat.py)
        import peer_boat
        print("[peers] boat ...", flush=True)
        boat_text = (f"BOAT rows absent: {args.boat_reason}." if args.boat_reason else
                     peer_boat.run(problem_spec(instances(args.mode, {"sizes"})[0]), args.mode, max(args.rounds, 1),
                                   interleaved_rounds))
    report = peer_report.write(args, summaries, records, zero_text, zero_recs, time.perf_counter() - started)
    print(report["stdout"])
    if boat_text:
        boat_text = "\n## BOAT: first-order solvers (bome, f2sa)\n\n" + boat_text + "\n"
        with open(args.out, "a") as f:
            f.write(boat_text)
        print(boat_text)


if __name__ == "__main__":
    main()
