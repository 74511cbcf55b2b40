"""ARL's CMA-ES search itself, at pycma's default population, with several CMA-ES seeds and long inner training
(thesis ch. 3, Algorithm 6; issue 18 part 4).

The earlier searches ran popsize 8 (below pycma's default of 4 + ⌊3 ln 12⌋ = 11 for the 12 Taylor
coefficients), one CMA-ES seed and 600 inner steps, so nothing said whether the search, rather than the
Taylor family it starts from, is what helps. Here, per meta-training run (condition:noise):

1. **Search**: ``--cma-seeds`` independent CMA-ES searches of the registered ``arl`` problem (popsize
   ``--popsize``, default pycma's, σ₀ = 0.5, ``--generations`` generations), each candidate's networks trained
   for ``--inner-steps`` SGD steps before the fitness, the mean clean accuracy on the meta-training pairs'
   held-out validation split, is read.
2. **Fitness noise**: the start loss and every search's final mean are re-scored with ``--noise-repeats``
   fresh network initialisations and batch orders (the fitness protocol through ``noisy_training.train``:
   same pairs, splits, noise, optimiser and ≈ the same number of steps). Its spread is the noise of one
   fitness evaluation; its paired difference says whether a search improved its own objective beyond it.
3. **Held-out test**: every searched loss, cross-entropy and the start loss on the Fashion-MNIST cells of
   ``arl_baselines.py`` (unseen networks and clothing images) at the ``--eval-noises``, with that script's
   seeds and steps, so its cross-entropy and start-loss numbers are the same runs as its table.

    python reproductions/arl_search.py --quick                      # minutes
    python reproductions/arl_search.py --runs dr:S80 --eval-noises S80,S40 --tag search_s80
    python reproductions/arl_search.py --runs dr:A40 --eval-noises A40 --tag search_a40
    python reproductions/arl_search.py --merge docs/results/arl/search/search_s80.json \\
        docs/results/arl/search/search_a40.json --tag search

Writes docs/results/arl/search/<tag>.{md,json} and the searched losses as <condition>_<noise>_cma<seed>.pt.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import bilevel
from bilevel.problems import arl
from bilevel.problems.losses import robust
from bilevel.problems.losses.taylor import TaylorLoss, descent_raises_true_class, initial_theta
from bilevel.problems.noisy_training import load_split, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
import arl_baselines  # noqa: E402  (the sibling script: its noises, cells, training protocol and table)

OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "arl" / "search"
SIGMA0 = 0.5
NOISE_SEED_OFFSET = 10_000  # fitness-noise network seeds, apart from the held-out test's seeds 0, 1, …


def pycma_default_popsize(dimension: int) -> int:
    """pycma's default population size, 4 + ⌊3 ln n⌋ (11 for the 12 Taylor coefficients)."""
    return 4 + int(3 * math.log(dimension))


def run_config(run: str, inner_steps: int) -> arl.Config:
    """The ``arl`` configuration of ``condition:noise`` (e.g. ``dr:S80``); the held-out test is done here."""
    condition, _, noise_key = run.partition(":")
    if condition not in ("ar", "dr") or noise_key not in ("S80", "A40"):
        raise SystemExit(f"--runs: {run!r} must be ar|dr:S80|A40 (the thesis's meta-training conditions)")
    noise, rate = arl_baselines.NOISES[noise_key]
    return replace(arl.Config(), condition=condition, noise=noise, rate=rate, inner_steps=inner_steps, test_seeds=0)


def search(cfg: arl.Config, cma_seed: int, popsize: int, generations: int) -> tuple[list[float], list[dict]]:
    """One CMA-ES search through the library's outer loop: the final mean θ and the per-generation metrics."""
    solver = f"cmaes:popsize={popsize},sigma={SIGMA0},seed={cma_seed}"
    outer, history, _ = bilevel.run_locally(arl.build(cfg, bilevel.local_context()), generations, solver)
    return [float(t) for t in outer["theta"]], history


def fitness_samples(cfg: arl.Config, theta: list[float], repeats: int) -> list[float]:
    """The fitness of θ (mean clean validation accuracy over the meta-training pairs, %) with ``repeats``
    fresh initialisations and batch orders: network seed ``NOISE_SEED_OFFSET + r`` for repeat r."""
    loss = TaylorLoss(torch.tensor(theta), arl.taylor_spec(cfg))
    pairs = [(arch, load_split(dataset, cfg.noise, cfg.rate, seed=cfg.data_seed))
             for arch, dataset in arl.pairs(cfg)]
    samples = []
    for r in range(repeats):
        accs = []
        for arch, data in pairs:
            epochs = max(1, round(cfg.inner_steps / max(len(data.y_train) // cfg.batch, 1)))
            record = train(loss, arch, data, epochs=epochs, batch=cfg.batch, lr=cfg.inner_lr,
                           momentum=cfg.momentum, seed=NOISE_SEED_OFFSET + r, eval_every=epochs)
            accs.append(record.clean_val_acc[-1])
        samples.append(100 * sum(accs) / len(accs))
    return samples


def run(run_name: str, args, eval_noises: list[str], log) -> dict:
    """Search, fitness noise and held-out test (at ``eval_noises``) of one meta-training run (JSON-ready)."""
    cfg = run_config(run_name, args.inner_steps)
    spec = arl.taylor_spec(cfg)
    start = [float(t) for t in initial_theta(spec, cfg.init)]
    out: dict = {"searches": {}, "fitness": {}, "eval": {}}
    stem = run_name.replace(":", "_").lower()
    for seed in args.cma_seeds:
        t0 = time.process_time()
        theta, history = search(cfg, seed, args.popsize, args.generations)
        TaylorLoss(torch.tensor(theta), spec).save(Path(args.out) / f"{stem}_cma{seed}.pt")
        out["searches"][str(seed)] = {
            "theta": theta, "cpu_seconds": time.process_time() - t0,
            "descent_raises_true_class": bool(descent_raises_true_class(torch.tensor(theta), spec)),
            "mean_fitness": [100 * h["clean_val_acc_mean"] for h in history],
            "best_candidate": [100 * h["clean_val_acc_best_candidate"] for h in history],
            "mean_candidate": [100 * (1 - h["mean_candidate_loss"]) for h in history],
            "sigma": [h["sigma"] for h in history]}
        log(f"  {run_name} CMA-ES seed {seed}: fitness {out['searches'][str(seed)]['mean_fitness'][-1]:.1f} "
            f"(cpu {time.process_time() - t0:.0f} s)")
    if args.noise_repeats:
        out["fitness"]["start"] = fitness_samples(cfg, start, args.noise_repeats)
        for seed, s in out["searches"].items():
            out["fitness"][f"cma{seed}"] = fitness_samples(cfg, s["theta"], args.noise_repeats)
        log(f"  {run_name} fitness noise done")
    losses = {f"cma{seed}": TaylorLoss(torch.tensor(s["theta"]), spec) for seed, s in out["searches"].items()}
    losses["taylor_start"] = TaylorLoss(torch.tensor(start), spec)
    losses["ce"] = robust.LOSSES["ce"]
    for noise_key in eval_noises:
        out["eval"][noise_key] = arl_baselines.run_noise(noise_key, arl_baselines.CELLS, args.eval_seeds,
                                                          args.eval_steps, log, losses)
    return out


def mean_std(values: list[float]) -> str:
    """Signed mean ± sample std (0 for a single value)."""
    return f"{statistics.mean(values):+.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


def paired(a: list[float], b: list[float]) -> str:
    """mean ± std of the paired differences a − b."""
    return mean_std([x - y for x, y in zip(a, b)])


def per_seed_means(result: dict, name: str) -> list[float]:
    """A loss's clean test accuracy averaged over cells, one value per evaluation seed."""
    return list(np.nanmean(np.array(result["final"][name], dtype=float), axis=0))


def report(results: dict, settings: dict, header: list[str]) -> list[str]:
    """The Markdown report of every run in ``results`` (built from the JSON alone, so merging re-renders)."""
    lines = [*header, "", f"Search: popsize {settings['popsize']} (pycma's default for 12 coefficients: "
             f"{pycma_default_popsize(12)}), σ₀ = {SIGMA0}, {settings['generations']} generations, "
             f"{settings['inner_steps']} inner SGD steps per candidate (batch 64, lr 0.01, momentum 0.9), fitness = "
             "mean clean accuracy on the meta-training pairs' validation split (held out from their training). "
             f"Held-out test: the cells of `arl_baselines.py`, {settings['eval_seeds']} seeds, "
             f"{settings['eval_steps']} steps, final epoch, no early stopping.", ""]
    for run_name, res in results.items():
        searches, fitness = res["searches"], res["fitness"]
        lines += [f"## {run_name}", "", "### The searches (meta-training pairs)", "",
                  "| CMA-ES seed | fitness gen 1 → last (mean) | best − mean candidate, avg over gens | final σ | "
                  "descent raises true class | re-scored fitness (mean ± std) | − start (paired) | CPU s |",
                  "|---|---|---|---|---|---|---|---|"]
        for seed, s in searches.items():
            spread = statistics.mean(b - m for b, m in zip(s["best_candidate"], s["mean_candidate"]))
            rescored = fitness.get(f"cma{seed}")
            lines.append(
                f"| {seed} | {s['mean_fitness'][0]:.1f} → {s['mean_fitness'][-1]:.1f} | {spread:.2f} | "
                f"{s['sigma'][-1]:.3f} | {s['descent_raises_true_class']} | "
                + (f"{statistics.mean(rescored):.2f} ± {statistics.stdev(rescored):.2f} | "
                   f"{paired(rescored, fitness['start'])} | " if rescored else "– | – | ")
                + f"{s['cpu_seconds']:.0f} |")
        if "start" in fitness:
            noise = statistics.stdev(fitness["start"])
            lines += ["", f"Start loss re-scored: {statistics.mean(fitness['start']):.2f} ± {noise:.2f} over "
                      f"{len(fitness['start'])} network seeds: one fitness evaluation is this noisy. The paired "
                      "column uses the same network seeds for both losses."]
        for noise_key, result in res["eval"].items():
            lines += ["", f"### Held-out Fashion-MNIST cells, {noise_key}", "",
                      *arl_baselines.table(noise_key, result, arl_baselines.CELLS)[2:]]
            start, ce = per_seed_means(result, "taylor_start"), per_seed_means(result, "ce")
            rows = ["| CMA-ES seed | − start loss (mean ± std over eval seeds) | − cross-entropy |", "|---|---|---|"]
            vs_start, vs_ce = [], []
            for seed in searches:
                mine = per_seed_means(result, f"cma{seed}")
                rows.append(f"| {seed} | {paired(mine, start)} | {paired(mine, ce)} |")
                vs_start.append(statistics.mean(mine) - statistics.mean(start))
                vs_ce.append(statistics.mean(mine) - statistics.mean(ce))
            lines += ["Searched loss minus the controls, test accuracy averaged over cells (points):", "", *rows,
                      f"| **over the {len(vs_start)} searches** | **{mean_std(vs_start)}** | **{mean_std(vs_ce)}** |"]
        lines.append("")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny search and test (minutes)")
    parser.add_argument("--runs", nargs="+", default=None, help="meta-training runs condition:noise (ar|dr:S80|A40)")
    parser.add_argument("--cma-seeds", default=None, help="comma-separated CMA-ES seeds (default 1,2,3)")
    parser.add_argument("--popsize", type=int, default=None)
    parser.add_argument("--generations", type=int, default=None)
    parser.add_argument("--inner-steps", type=int, default=None, help="SGD steps before a candidate's fitness")
    parser.add_argument("--noise-repeats", type=int, default=None, help="network seeds per fitness re-score")
    parser.add_argument("--eval-noises", default=None, help="held-out noises (default: each run's own)")
    parser.add_argument("--eval-seeds", type=int, default=None)
    parser.add_argument("--eval-steps", type=int, default=None)
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--tag", default=None, help="output stem (default search[_quick])")
    parser.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                        help="only rebuild one report from the JSON files of runs split across processes")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.merge:
        return merge([Path(p) for p in args.merge], out, args.tag or "search")
    quick = args.quick
    args.runs = args.runs or (["dr:S80"] if quick else ["dr:S80", "dr:A40"])
    try:
        args.cma_seeds = [int(s) for s in (args.cma_seeds or ("1,2" if quick else "1,2,3")).split(",")]
    except ValueError:
        raise SystemExit(f"--cma-seeds: {args.cma_seeds!r} must be comma-separated integers, e.g. 1,2,3") from None
    args.popsize = args.popsize or (4 if quick else pycma_default_popsize(12))
    args.generations = args.generations or (2 if quick else 8)
    args.inner_steps = args.inner_steps or (60 if quick else 1500)
    args.noise_repeats = args.noise_repeats if args.noise_repeats is not None else (2 if quick else 5)
    args.eval_seeds = args.eval_seeds or (1 if quick else 2)
    args.eval_steps = args.eval_steps or (100 if quick else 2000)
    for run_name in args.runs:
        run_config(run_name, args.inner_steps)  # refuse a bad run before any work
    eval_noises = args.eval_noises.split(",") if args.eval_noises else None
    if eval_noises and any(n not in arl_baselines.NOISES for n in eval_noises):
        raise SystemExit(f"--eval-noises: choose from {', '.join(arl_baselines.NOISES)}")
    if args.noise_repeats == 1:
        raise SystemExit("--noise-repeats: a spread needs at least 2 (or 0 to skip)")
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.process_time()
    log = lambda msg: print(msg, flush=True)
    results = {}
    for run_name in args.runs:
        own_noise = [run_name.partition(":")[2]]
        results[run_name] = run(run_name, args, eval_noises or own_noise, log)
    command = " ".join(["python reproductions/arl_search.py", *(argv if argv is not None else sys.argv[1:])])
    settings = {k: getattr(args, k) for k in ("popsize", "generations", "inner_steps", "eval_seeds", "eval_steps")}
    cpu = time.process_time() - t0
    stem = args.tag or ("search_quick" if quick else "search")
    payload = {"commands": [command], "cpu_seconds": cpu, "settings": settings, "results": results}
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    write_report(payload, out, stem)


def write_report(payload: dict, out: Path, stem: str) -> None:
    header = [f"# ARL: the CMA-ES search at pycma's default population, several seeds", "",
              "Commands: " + "; ".join(f"`{c}`" for c in payload["commands"]) +
              f"; total CPU time {payload['cpu_seconds']:.0f} s (one thread per process)."]
    text = report(payload["results"], payload["settings"], header)
    (out / f"{stem}.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


def merge(paths: list[Path], out: Path, stem: str) -> None:
    """One report from runs split across processes by ``--runs`` (same settings required)."""
    runs = arl_baselines.read_runs(paths)
    if any(r.get("settings") is None for r in runs):
        raise SystemExit("--merge: every report must come from this script (it has 'settings')")
    if any(r["settings"] != runs[0]["settings"] for r in runs):
        raise SystemExit("--merge: the runs used different settings; merge only runs of one protocol")
    payload = {"commands": [c for r in runs for c in r["commands"]], "cpu_seconds": sum(r["cpu_seconds"] for r in runs),
               "settings": runs[0]["settings"], "results": {k: v for r in runs for k, v in r["results"].items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    write_report(payload, out, stem)


if __name__ == "__main__":
    main()
