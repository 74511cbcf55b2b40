"""ARL's baseline tables on Fashion-MNIST (thesis ch. 3, Tables 3.1/3.2 average rank, Table 3.6 early-stopping
gap; issue 18 part 4): every robust baseline loss of the thesis, the searched ARL losses and the un-searched
start loss, trained on noisy labels of an unseen domain for a long budget, several seeds.

Noise: symmetric 20 / 40 / 80 % and pair-flip 40 %. Symmetric noise uses the losses searched at symmetric
80 %, pair-flip those searched at pair-flip 40 % (docs/results/arl/arl_{ar,dr}_{s80,a40}.pt, meta-trained on
8×8 digits), plus the thesis's published ARL-AR-A40 loss under pair-flip. Cells: the two held-out networks
(mlp_wide, cnn_b) × Fashion-MNIST at 8×8 and its inverse (``fashion8``, ``fashion8_inverted``: clothing, never
seen in meta-training). A seed sets the split, the label noise, the initialisation and the batches, the same
for every loss. Training runs SGD (lr 0.01, momentum 0.9) for the whole budget and is evaluated every epoch.

Reported per noise:
- the clean test accuracy at the end (mean over cells, mean ± std over seeds);
- the average rank over cells, as the thesis does (Demšar 2006; each cell ranked on its seed mean);
- the early-stopping gap of Table 3.6: test accuracy at the best noisy-validation epoch minus the final one,
  mean ± std over cells × seeds.

    python reproductions/arl_baselines.py --quick    # 1 seed, 1 noise, short budget: minutes
    python reproductions/arl_baselines.py            # 3 seeds, 4 noises, 4,000 steps

Writes docs/results/arl/fashion_baselines[_quick].{md,json}.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bilevel.problems import arl
from bilevel.problems.losses import robust
from bilevel.problems.losses.taylor import TaylorLoss, initial_theta, published_theta
from bilevel.problems.noisy_training import average_ranks, load_split, train

OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "arl"
NOISES = {"S20": ("symmetric", 0.2), "S40": ("symmetric", 0.4), "S80": ("symmetric", 0.8), "A40": ("pairflip", 0.4)}
CELLS = [(a, d) for a in ("mlp_wide", "cnn_b") for d in ("fashion8", "fashion8_inverted")]


def losses_for(noise_key: str) -> dict:
    """The baselines, the searched losses for this noise type and the start loss (the search's control)."""
    searched = "a40" if NOISES[noise_key][0] == "pairflip" else "s80"
    losses = dict(robust.LOSSES)
    for condition in ("ar", "dr"):
        path = OUT / f"arl_{condition}_{searched}.pt"
        if path.exists():
            losses[f"arl_{condition}"] = TaylorLoss.load(path)
    cfg = arl.Config()
    spec = arl.taylor_spec(cfg)  # the searched family: order 4, eq. 3.5, rescaled to [0, η]
    losses["taylor_start"] = TaylorLoss(initial_theta(spec, cfg.init), spec)
    if searched == "a40":
        losses["arl_published_ar_a40"] = TaylorLoss(published_theta("arl_ar_a40"), spec)
    return losses


def run_noise(noise_key: str, cells, seeds: int, steps: int, log, losses: dict | None = None) -> dict:
    """final[loss][cell][seed], gap[loss][cell][seed] (test accuracy, %); ``losses`` defaults to
    :func:`losses_for` the noise."""
    noise, rate = NOISES[noise_key]
    losses = losses_for(noise_key) if losses is None else losses
    final = {n: [[] for _ in cells] for n in losses}
    gap = {n: [[] for _ in cells] for n in losses}
    for seed in range(seeds):
        for c, (arch, dataset) in enumerate(cells):
            data = load_split(dataset, noise, rate, seed=seed)
            epochs = max(2, steps // max(len(data.y_train) // 64, 1))
            for name, fn in losses.items():
                rec = train(fn, arch, data, epochs=epochs, seed=seed)
                final[name][c].append(100 * rec.final)
                gap[name][c].append(100 * (rec.early_stopped - rec.final))
        log(f"  {noise_key} seed {seed} done")
    return {"final": final, "gap": gap}


def select(losses: dict, extra: dict, only: list[str] | None) -> dict:
    """``losses`` plus ``extra``, restricted to ``only`` (in that order) when given."""
    losses = {**losses, **extra}
    return {name: losses[name] for name in only} if only else losses


def table(noise_key: str, result: dict, cells) -> list[str]:
    final, gap = result["final"], result["gap"]
    ranks = average_ranks({n: [float(np.nanmean(per_cell)) for per_cell in v] for n, v in final.items()})
    noise, rate = NOISES[noise_key]
    lines = [f"### {noise_key}: {noise} {rate:.0%}", "",
             "| loss | " + " | ".join(f"{a}/{d}" for a, d in cells) + " | mean (± std over seeds) | avg. rank | "
             "early-stopping gap |", "|---|" + "---|" * (len(cells) + 3)]
    for name in sorted(final, key=lambda n: ranks[n]):
        per_cell = [float(np.nanmean(v)) for v in final[name]]
        per_seed = np.nanmean(np.array(final[name], dtype=float), axis=0)  # mean over cells, one per seed
        gaps = np.array(gap[name], dtype=float).ravel()
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in per_cell) +
                     f" | {per_seed.mean():.2f} ± {per_seed.std(ddof=1) if len(per_seed) > 1 else 0:.2f} | "
                     f"{ranks[name]:.2f} | {np.nanmean(gaps):.2f} ± {np.nanstd(gaps):.2f} |")
    return lines + [""]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--noises", default=None, help=f"comma-separated subset of {','.join(NOISES)}")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="SGD steps per training run")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--tag", default=None, help="output stem (default fashion_baselines[_quick])")
    parser.add_argument("--add", nargs="+", metavar="NAME=PATH", default=(),
                        help="more saved Taylor losses to train (e.g. cma1=docs/results/arl/search/dr_s80_cma1.pt)")
    parser.add_argument("--only", default=None, help="comma-separated losses to keep (after --add), e.g. ce,cma1")
    parser.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                        help="only rebuild one report from the JSON files of runs split by --noises")
    args = parser.parse_args(argv)
    if args.merge:
        return merge([Path(p) for p in args.merge], Path(args.out), args.tag or "fashion_baselines")
    noises = (args.noises or ("S80" if args.quick else ",".join(NOISES))).split(",")
    unknown = [n for n in noises if n not in NOISES]
    if unknown:
        raise SystemExit(f"--noises: unknown {', '.join(unknown)}; choose from {', '.join(NOISES)}")
    extra = {}
    for item in args.add:
        name, _, path = item.partition("=")
        if not name or not Path(path).is_file():
            raise SystemExit(f"--add: {item!r} must be NAME=PATH of a saved TaylorLoss file")
        if name in losses_for(noises[0]) or name in extra:
            raise SystemExit(f"--add: the name {name!r} is taken; give the added loss another name")
        try:
            extra[name] = TaylorLoss.load(path)
        except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as error:
            raise SystemExit(f"--add: {path} is not a saved TaylorLoss ({error})") from None
    only = args.only.split(",") if args.only else None
    known = set.intersection(*(set(losses_for(n)) for n in noises)) | set(extra)  # in every noise's set
    if only and set(only) - known:
        raise SystemExit(f"--only: unknown {', '.join(sorted(set(only) - known))}; choose from {', '.join(sorted(known))}")
    seeds = args.seeds or (1 if args.quick else 3)
    steps = args.steps or (300 if args.quick else 4000)
    torch.set_num_threads(1)
    t0 = time.process_time()
    log = lambda msg: print(msg, flush=True)
    results, lines = {}, []
    for key in noises:
        results[key] = run_noise(key, CELLS, seeds, steps, log, select(losses_for(key), extra, only))
        lines += table(key, results[key], CELLS)
    mode = "quick" if args.quick else "full"
    command = " ".join(["python reproductions/arl_baselines.py", *(argv if argv is not None else sys.argv[1:])])
    text = [f"# ARL baselines on Fashion-MNIST 8×8 ({mode} mode)", "",
            f"Command: `{command}`; CPU time {time.process_time() - t0:.0f} s (one thread). {seeds} seed(s), "
            f"{steps} SGD steps per run (lr 0.01, momentum 0.9, batch 64), evaluated every epoch; cells "
            f"{', '.join(f'{a}/{d}' for a, d in CELLS)}. Rows sorted by average rank (1 = best). The gap is the "
            "test accuracy at the best noisy-validation epoch minus the final one (Table 3.6).", "", *lines]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.tag or ("fashion_baselines" + ("_quick" if args.quick else ""))
    (out / f"{stem}.md").write_text("\n".join(text) + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"command": command, "cpu_seconds": time.process_time() - t0,
                                                  "results": results}, indent=1))
    print("\n".join(text))


def read_runs(paths: list[Path]) -> list[dict]:
    """The JSON reports to merge; a missing or unreadable one is refused by name before anything is written."""
    runs = []
    for path in paths:
        try:
            runs.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as error:
            raise SystemExit(f"--merge: cannot read {path} as a report of this script ({error})") from None
        if "results" not in runs[-1]:
            raise SystemExit(f"--merge: {path} has no 'results': not a report of this script")
    return runs


def merge(paths: list[Path], out: Path, stem: str) -> None:
    """One report from runs split across processes by ``--noises`` (their commands and CPU times summed)."""
    runs = read_runs(paths)
    results = {k: v for run in runs for k, v in run["results"].items()}
    cpu = sum(run.get("cpu_seconds", 0.0) for run in runs)
    lines = [line for key in NOISES if key in results for line in table(key, results[key], CELLS)]
    text = [f"# ARL baselines on Fashion-MNIST 8×8 (merged from {len(runs)} runs)", "",
            "Commands: " + "; ".join(f"`{run['command']}`" for run in runs) + f"; total CPU time {cpu:.0f} s. "
            "SGD lr 0.01, momentum 0.9, batch 64, evaluated every epoch; cells "
            f"{', '.join(f'{a}/{d}' for a, d in CELLS)}. Rows sorted by average rank (1 = best). The gap is the "
            "test accuracy at the best noisy-validation epoch minus the final one (Table 3.6).", "", *lines]
    (out / f"{stem}.md").write_text("\n".join(text) + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"commands": [r["command"] for r in runs], "cpu_seconds": cpu,
                                                  "results": results}, indent=1))
    print("\n".join(text))


if __name__ == "__main__":
    main()
