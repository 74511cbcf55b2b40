"""Every registered solver on two problems: time, peak memory and error per hypergradient, and the ratio of
our time to a minimal hand-written torch.func computation of the same maths (the "plain-PyTorch limit").

    python benchmarks/solvers.py            # ridge d = 1000 and a digits MLP, a few minutes
    python benchmarks/solvers.py --quick    # smaller sizes, under a minute (the smoke test uses it)

Problems (benchmarks/common.py):
- ridge: d = 1000 per-feature log-penalties, n = 500, float32, K = 100 SGD steps at lr = 2/(λ_min+λ_max);
  closed-form hypergradient (float64).
- MLP: 64-32-10 tanh network on scikit-learn digits, 64 per-pixel L2 penalties on layer 1, float32,
  K = 200 heavy-ball steps (lr 0.3, momentum 0.9); no closed form.

Each solver is compared with the exact value of what it computes (its "target"), in float64:
- implicit solvers (cg, neumann, fixedpoint, exact): the IFT hypergradient at the inner solution (ridge:
  closed form; MLP: dense Hessian solve at the float64 K-step iterate);
- nystrom: the same rank-k Nyström solve (same index set and ridge ρ) at the float64 K-step iterate: a
  sketch of H by design, so its cosine with the IFT hypergradient says how good a descent direction it is;
- unroll / checkpointed unroll / forward: the exact derivative of the K-step loop (float64 reverse mode);
  truncated unroll: the exact derivative of its truncated computation;
- onestep: the exact one-step lookahead derivative from the same warm start;
- f2sa: the same F2SA computation (fixed λ, steps on y and z from the same warm start) in float64;
- soba: the same SOBA / AmIGO computation (steps on θ and on v from the same warm start, v = 0) in float64;
- bome: the φ-part of the same BOME step (K inner steps from p.inner, η = common.BOME_ETA) in float64;
- cmaes: none (a pseudo-gradient of one generation): only its cosine with the IFT hypergradient.
``cos vs IFT`` gives every method's cosine with the IFT hypergradient (how good a descent direction it is).

The hand-written baselines (benchmarks/common.py, ``hw_*``) use the same losses, data, iteration counts
and stopping rules, with plain dict arithmetic instead of torchopt and the library's machinery. Times
are medians over interleaved repeats (ours, hand-written, ours, ...); "ratio" is the median of the
per-round ratios. Peak memory: see benchmarks/common.py (peak RSS increase in a fresh subprocess).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import common  # noqa: E402
from common import (cosine, digits_mlp, hw_checkpoint, hw_cmaes, hw_forward, hw_implicit, hw_onestep,  # noqa: E402
                    hw_run, hw_unroll, md_table, rel_error, ridge, ridge_exact)

TRUNCATE = 20
NYSTROM_RANK = 20


def nystrom_rho(lam_max: float) -> float:
    """The Nyström ridge ρ = 0.01 λ_max(H) at θ_K, rounded (the spec and the float64 target use the same)."""
    return float(f"{0.01 * lam_max:.3g}")
F2SA_LAMBDA, F2SA_STEPS = common.F2SA_LAMBDA, common.F2SA_STEPS  # f2sa at a fixed λ from the warm start


def build_problem(key: str, quick):
    if quick == "tiny":
        return ridge(d=50, steps=30) if key == "ridge" else digits_mlp(steps=10, hidden=8)
    if key == "ridge":
        return ridge(d=100, steps=50) if quick else ridge(d=1000, steps=100)
    if key == "mlp":
        return digits_mlp(steps=30, hidden=16) if quick else digits_mlp(steps=200)
    raise KeyError(key)


def dense_hessian(p, theta):
    """Dense inner Hessian at ``theta`` (float64, chunked vmap of HVPs): for references and λ_max."""
    phi = p.outer
    keys, shapes, sizes = list(theta), [v.shape for v in theta.values()], [v.numel() for v in theta.values()]
    gfn = torch.func.grad(p.inner_loss)
    _, vjp_fn = torch.func.vjp(lambda th: gfn(th, phi, p.inner_batch), theta)

    def col(e):
        v = {k: t.reshape(s) for k, t, s in zip(keys, e.split(sizes), shapes)}
        return torch.cat([x.reshape(-1) for x in vjp_fn(v)[0].values()])

    n = sum(sizes)
    return torch.func.vmap(col, chunk_size=128)(torch.eye(n, dtype=torch.float64))


def references(p, key: str, full: bool = True) -> dict:
    """float64 targets (see the module docstring) and the spectrum of H at the K-step iterate."""
    warm32, _ = hw_run(p, p.inner, p.outer, p.steps)  # the warm start given to onestep (float32 iterate)
    if not full:
        return {"warm": warm32, "lambda_min": 0.0, "lambda_max": 1.0}
    p64 = p.to(torch.float64)
    theta_k, vel = hw_run(p64, p64.inner, p64.outer, p64.steps)
    H = dense_hessian(p64, theta_k)
    ev = torch.linalg.eigvalsh(0.5 * (H + H.T))
    if key == "ridge":
        ift = ridge_exact(p64)
    else:  # IFT with a dense solve at the float64 K-step iterate
        gfn = torch.func.grad(p64.inner_loss)
        gt, gp = torch.func.grad(lambda th, ph: p64.outer_loss(th, ph, p64.outer_batch), argnums=(0, 1))(
            theta_k, p64.outer)
        keys, shapes, sizes = list(gt), [v.shape for v in gt.values()], [v.numel() for v in gt.values()]
        x = torch.linalg.solve(H, torch.cat([v.reshape(-1) for v in gt.values()]))
        x = {k: t.reshape(s) for k, t, s in zip(keys, x.split(sizes), shapes)}
        _, mixed = torch.func.vjp(lambda ph: gfn(theta_k, ph, p64.inner_batch), p64.outer)
        m = mixed(x)[0]
        ift = {k: gp[k] - m[k] for k in gp}
    warm64 = {k: v.double() for k, v in warm32.items()}
    nystrom = hw_implicit(p64, "nystrom", rank=NYSTROM_RANK, rho=nystrom_rho(float(ev[-1])))
    return {"ift": ift, "nystrom": nystrom, "loop": hw_unroll(p64), "trunc": hw_unroll(p64, TRUNCATE),
            "bome": common.hw_bome(p64, p64.inner),  # the same BOME step from p.inner in float64
            "onestep": hw_onestep(p64, warm64), "warm": warm32,
            "lambda_min": float(ev[0]), "lambda_max": float(ev[-1])}


def methods(p, lam_max: float, lam_min: float, key: str, quick: bool):
    """(name, spec, hand-written fn, target) for every registered solver (checked against SOLVERS)."""
    alpha = 2.0 / (lam_max + max(lam_min, 0.0))
    alpha = float(f"{alpha:.4g}")
    terms = 100
    chunk = 250 if key == "ridge" else 32
    rtol = 1e-6
    cg_max = 200 if key == "ridge" else 100
    rho = nystrom_rho(lam_max)
    return [
        ("cg", f"cg:maxiter={cg_max},rtol={rtol}", lambda: hw_implicit(p, "cg", maxiter=cg_max, rtol=rtol), "ift"),
        ("neumann", f"neumann:alpha={alpha},terms={terms}", lambda: hw_implicit(p, "neumann", alpha=alpha, terms=terms),
         "ift"),
        ("fixedpoint", f"fixedpoint:alpha={alpha},maxiter=300,rtol={rtol}",
         lambda: hw_implicit(p, "fixedpoint", alpha=alpha, maxiter=300, rtol=rtol), "ift"),
        ("exact", "exact", lambda: hw_implicit(p, "exact"), "ift"),
        ("nystrom", f"nystrom:rank={NYSTROM_RANK},rho={rho}",
         lambda: hw_implicit(p, "nystrom", rank=NYSTROM_RANK, rho=rho), "nystrom"),
        ("forward", f"forward:chunk_size={chunk}", lambda: hw_forward(p, chunk), "loop"),
        ("unroll", "unroll", lambda: hw_unroll(p), "loop"),
        ("unroll (truncated)", f"unroll:truncate={TRUNCATE}", lambda: hw_unroll(p, TRUNCATE), "trunc"),
        ("unroll (checkpointed)", "unroll:checkpoint=true", lambda: hw_checkpoint(p), "loop"),
        ("onestep", "onestep", None, "onestep"),  # hand-written fn needs the warm start: set in run_method
        ("f2sa", f"f2sa:steps={F2SA_STEPS},lambda0={F2SA_LAMBDA},lambda_power=0,lambda_max={F2SA_LAMBDA}", None,
         "f2sa"),
        ("soba", f"soba:inner_steps={common.SOBA_INNER},v_steps={common.SOBA_V},v_lr={p.lr}", None, "soba"),
        ("bome", f"bome:eta={common.BOME_ETA}", lambda: common.hw_bome(p, p.inner), "bome"),  # from p.inner
        ("cmaes", "cmaes:popsize=8,sigma=0.1,seed=1", lambda: hw_cmaes(p, 8, 0.1, 1), "none"),
    ]


def ours_fn(p, spec: str, warm=None):
    import bilevel
    problem = p.bilevel_problem()
    loop = p.loop()
    start = warm if warm is not None else p.inner

    def call():
        return bilevel.hypergrad(problem, start, p.outer, inner_batch=p.inner_batch, outer_batch=p.outer_batch,
                                 solver=spec, loop=loop).hypergrad
    return call


def method_fns(p, refs, key, quick, name):
    for m in methods(p, refs["lambda_max"], refs["lambda_min"], key, quick):
        if m[0] == name:
            label, spec, hw, target = m
            if name == "onestep":
                hw = lambda: hw_onestep(p, refs["warm"])
                return spec, ours_fn(p, spec, refs["warm"]), hw, target
            if name == "f2sa":  # from the warm start too; its target is the same computation in float64
                warm64 = {k: v.double() for k, v in refs["warm"].items()}
                refs.setdefault("f2sa", common.hw_f2sa(p.to(torch.float64), warm64, F2SA_LAMBDA, F2SA_STEPS))
                hw = lambda: common.hw_f2sa(p, refs["warm"], F2SA_LAMBDA, F2SA_STEPS)  # noqa: E731
                return spec, ours_fn(p, spec, refs["warm"]), hw, target
            if name == "soba":  # from the warm start too; its target is the same computation in float64
                warm64 = {k: v.double() for k, v in refs["warm"].items()}
                refs.setdefault("soba", common.hw_soba(p.to(torch.float64), warm64))
                return spec, ours_fn(p, spec, refs["warm"]), lambda: common.hw_soba(p, refs["warm"]), target
            return spec, ours_fn(p, spec), hw, target
    raise KeyError(name)


def memory_child(key: str, name: str, quick: bool) -> None:
    """Subprocess entry: peak RSS increase of one call of ours and of the hand-written computation."""
    common.fix_malloc()
    common.setup_process()
    p = build_problem(key, quick)
    refs = references(p, key, full=False)
    refs.update(json.loads(os.environ["BENCH_SPECTRUM"]))  # the parent's λ_min/λ_max: the same specs
    spec, ours, hw, _ = method_fns(p, refs, key, quick, name)
    out = {}
    for label, fn in (("ours", ours), ("hw", hw)):
        fn()  # warm-up: lazy initialisation, dispatcher caches
        out[label] = common.peak_rss_increase_mib(fn)
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (ridge d = 200, MLP K = 50)")
    parser.add_argument("--tiny", action="store_true", help="correctness smoke run: ridge d = 50, one call each, "
                        "no memory measurement")
    parser.add_argument("--repeats", type=int, default=15, help="max interleaved rounds per method")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing per method")
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess memory measurement")
    parser.add_argument("--out", default=os.path.join(common.RESULTS, "solvers.md"))
    parser.add_argument("--problems", default="ridge,mlp")
    parser.add_argument("--_memory", nargs=3, metavar=("PROBLEM", "METHOD", "QUICK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args._memory:
        memory_child(args._memory[0], args._memory[1], args._memory[2] == "1")
        return
    common.setup_process()
    import bilevel
    if args.tiny:
        args.quick, args.problems, args.repeats, args.no_memory = "tiny", "ridge", 0, True
        if args.out == parser.get_default("out"):
            args.out = os.path.join(common.RESULTS, "solvers_tiny.md")
    budget = args.budget if args.budget is not None else (0.5 if args.quick else 6.0)
    started = time.perf_counter()
    sections, summary, records = [], [], []
    for key in args.problems.split(","):
        p = build_problem(key, args.quick)
        refs = references(p, key)
        ms = methods(p, refs["lambda_max"], refs["lambda_min"], key, args.quick)
        missing = set(bilevel.SOLVERS) - {spec.split(":")[0] for _, spec, _, _ in ms}
        assert not missing, f"solvers without a benchmark entry: {missing}"
        rows = []
        for name, spec, _, target in ms:
            spec, ours, hw, target = method_fns(p, refs, key, args.quick, name)
            t0 = time.perf_counter()
            try:
                g_ours, g_hw = ours(), hw()
                timing = common.time_interleaved({"hw": hw, "ours": ours}, args.repeats, budget=budget,
                                                 min_repeats=1 if args.tiny else (2 if name == "forward" or args.quick else 3))
            except Exception as err:  # record, never crash the table
                msg = f"error: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
                print(f"[{key}] {name:22s} {msg}", flush=True)
                records.append({"problem": key, "method": name, "spec": spec, "error": msg})
                rows.append([name, f"`{spec}`", target, msg] + [""] * 9)
                continue
            ref = refs[target] if target != "none" else None
            err = rel_error(g_ours, ref) if ref is not None else math.nan
            cos = cosine(g_ours, ref) if ref is not None else math.nan
            cos_ift = cosine(g_ours, refs["ift"])
            same = rel_error(g_ours, g_hw)
            if args.no_memory:
                mem = {}
            elif args.quick:  # in-process (smoke runs): cheaper, less isolated
                common.fix_malloc()
                mem = {"ours": common.peak_rss_increase_mib(ours), "hw": common.peak_rss_increase_mib(hw)}
            else:
                os.environ["BENCH_SPECTRUM"] = json.dumps({k: refs[k] for k in ("lambda_min", "lambda_max")})
                mem = common.memory_in_subprocess(os.path.abspath(__file__), [key, name, "0"])
            rec = {"problem": key, "method": name, "spec": spec, "target": target, "rel_error": err, "cosine": cos,
                   "cos_ift": cos_ift, "ours_vs_hw": same, "time_ours": timing["ours"]["median"],
                   "time_hw": timing["hw"]["median"], "ratio": timing["ours"]["ratio_to_first"], "rounds": timing["ours"]["rounds"],
                   "mem_ours": mem.get("ours", math.nan), "mem_hw": mem.get("hw", math.nan),
                   "mem_error": mem.get("error", "")}
            records.append(rec)
            rows.append([name, f"`{spec}`", target, err, cos, cos_ift, same, 1e3 * rec["time_ours"],
                         1e3 * rec["time_hw"], rec["ratio"], rec["rounds"], rec["mem_ours"], rec["mem_hw"]])
            print(f"[{key}] {name:22s} err {err:.2e} cos_ift {cos_ift:+.4f} ours {1e3 * rec['time_ours']:9.1f} ms "
                  f"hw {1e3 * rec['time_hw']:9.1f} ms ratio {rec['ratio']:.3f}  mem {rec['mem_ours']:.1f}/"
                  f"{rec['mem_hw']:.1f} MiB {rec['mem_error']}  ({time.perf_counter() - t0:.0f} s)", flush=True)
        header = ["solver", "spec", "target", "rel. error vs target", "cosine vs target", "cosine vs IFT",
                  "rel. diff ours vs hand-written", "ours (ms)", "hand-written (ms)", "ratio ours/hand-written",
                  "rounds", "peak RSS ours (MiB)", "peak RSS hand-written (MiB)"]
        desc = (f"**{p.name}**: {sum(v.numel() for v in p.inner.values())} inner / "
                f"{sum(v.numel() for v in p.outer.values())} outer params, {p.inner_batch[0].dtype}, "
                f"K = {p.steps} {'heavy-ball SGD (momentum ' + str(p.momentum) + ')' if p.momentum else 'SGD'} "
                f"steps, lr = {p.lr:.4g}; inner Hessian at θ_K: λ_min = {refs['lambda_min']:.3g}, "
                f"λ_max = {refs['lambda_max']:.3g}.")
        sections.append(desc + "\n\n" + md_table(header, rows))
        ratios = [r["ratio"] for r in records if r["problem"] == key and "ratio" in r]
        summary.append(f"- {p.name}: ratio ours/hand-written median {sorted(ratios)[len(ratios) // 2]:.2f}, "
                       f"range {min(ratios):.2f}–{max(ratios):.2f}; "
                       f"{sum(r <= 1.10 for r in ratios)}/{len(ratios)} methods within 1.10x.")
    elapsed = time.perf_counter() - started
    text = "\n".join([
        "# Solver benchmark: time, peak memory and error per hypergradient",
        "",
        f"Command: `python benchmarks/solvers.py{''.join(' ' + a for a in sys.argv[1:] if not a.startswith('/'))}` "
        f"({elapsed:.0f} s). Machine: {common.machine_line()}.",
        "",
        "Targets (float64): `ift` = the implicit-function-theorem hypergradient at the inner solution "
        "(ridge: closed form; MLP: dense Hessian solve at the K-step iterate); `nystrom` = the same rank-"
        f"{NYSTROM_RANK} Nyström solve (same index set, ρ = 0.01 λ_max) at the float64 K-step iterate; "
        "`loop` = the exact derivative "
        "of the K-step inner loop; `trunc` = the exact derivative of the truncated computation (last "
        f"{TRUNCATE} steps); `onestep` = the exact one-step lookahead derivative from the same warm start "
        "(the K-step iterate); `none` = CMA-ES's pseudo-gradient (m_old − m_new of one generation) has no "
        "exact value, only its cosine with the IFT hypergradient is meaningful.",
        "",
        "Time: median seconds per `bilevel.hypergrad(...)` call (default `validate=True`) over interleaved "
        "rounds after one warm-up; \"ratio\" is the median of per-round ratios of our time to the "
        "hand-written torch.func computation of the same maths (same losses, data, iteration counts and "
        "stopping rule; `benchmarks/common.py`, `hw_*`). Issue 2 target: ratio ≤ 1.10.",
        "",
        "Peak memory: peak RSS increase of one call (VmHWM reset through /proc/self/clear_refs, minus VmRSS "
        "before the call), " + ("in the benchmark process itself (--quick)" if args.quick else
                                "each (problem, method) in a fresh subprocess") + " after one warm-up call, "
        "glibc mmap threshold fixed at 4 KiB so freed tensors return to the OS. tracemalloc is not used (it "
        "does not see torch's CPU allocations). Values below ~0.5 MiB are at the resolution of the measure.",
        "",
        *[s + "\n" for s in sections],
        "Summary:",
        *summary,
        "",
    ])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(text)
    with open(os.path.splitext(args.out)[0] + ".json", "w") as fh:
        json.dump(records, fh, indent=1)
    print(text)


if __name__ == "__main__":
    main()
