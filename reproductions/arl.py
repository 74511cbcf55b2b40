"""Reproduce ARL's Tables 3.1 / 3.2 / 3.6 and Fig. 3.5 / 3.6 at CPU scale (8×8 images).

1. Meta-train four losses with the registered ``arl`` problem (CMA-ES, ``cmaes`` solver): architecture
   randomisation (AR: several networks on digits) and dataset randomisation (DR: one MLP on digits,
   rotated digits, inverted digits), each at 80 % symmetric and 40 % pair-flip noise.
2. Train every baseline loss and the learned losses on held-out cells — unseen architectures (a wide tanh
   MLP, a different CNN) × unseen datasets (real MNIST at 8×8, inverted MNIST, transposed digits) — to the
   end of a fixed budget without early stopping; report clean test accuracy and the average rank
   (Tables 3.1/3.2), the gap between the best-noisy-validation checkpoint and the final one (Table 3.6),
   and ARL vs CE at 0 % noise (Fig. 3.6). Plot the meta-training curves (Fig. 3.5).

    python reproductions/arl.py --quick      # about 10–15 minutes on one (shared) core
    python reproductions/arl.py              # larger search and longer training (≈ 45 min+)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import bilevel
from bilevel.problems import arl
from bilevel.problems.losses import robust
from bilevel.problems.losses.taylor import (TaylorLoss, descent_raises_true_class, initial_theta,
                                            published_theta)
from bilevel.problems.noisy_training import average_ranks, load_split, train

OUT = Path(__file__).resolve().parents[1] / "docs" / "results" / "arl"
CONDITIONS = {"S80": ("symmetric", 0.8), "A40": ("pairflip", 0.4)}
PAPER_RANK = {  # Table 3.1 (sym-80) / Table 3.2 (asym-40) average ranks
    "S80": {"ce": 7.75, "gce": 6.25, "sce": 5.25, "bootstrap": 7.25, "mae": 9.00, "label_smoothing": 7.75,
            "huber": 12.00, "nce_mae": 5.00, "nfl_mae": 4.00, "arl_ar": 1.63, "arl_dr": 1.88},
    "A40": {"ce": 7.00, "gce": 7.13, "sce": 4.25, "bootstrap": 6.50, "mae": 11.50, "label_smoothing": 7.75,
            "huber": 8.25, "nce_mae": 4.75, "nfl_mae": 4.88, "arl_ar": 1.50, "arl_dr": 3.00},
}
PAPER_GAP = {  # Table 3.6: best-checkpoint minus final accuracy (%)
    "A40": {"ce": "18.01±10.95", "gce": "15.82±10.55", "sce": "10.85±8.76", "nce_mae": "10.83±6.29",
            "nfl_mae": "11.87±8.26", "arl_ar": "1.84±1.25", "arl_dr": "6.15±4.76"},
    "S80": {"ce": "26.30±16.38", "gce": "17.67±15.60", "sce": "14.12±10.33", "nce_mae": "10.87±9.90",
            "nfl_mae": "7.85±8.85", "arl_ar": "4.97±3.45", "arl_dr": "3.90±4.31"},
}


def meta_train(condition: str, noise_key: str, cfg: arl.Config, generations: int, solver: str):
    """``generations`` CMA-ES generations of the ``arl`` problem through the library's outer loop."""
    noise, rate = CONDITIONS[noise_key]
    cfg = arl.with_condition(cfg, condition, noise, rate)
    outer, history, _ = bilevel.run_locally(arl.build(cfg, bilevel.local_context()), generations, solver)
    return outer["theta"], history


def evaluate_cells(losses: dict, cells: list, noise_key: str, steps: int, seed: int = 0, rate=None):
    noise, default_rate = CONDITIONS[noise_key]
    rate = default_rate if rate is None else rate
    final, gap = {n: [] for n in losses}, {n: [] for n in losses}
    for arch, dataset in cells:
        data = load_split(dataset, noise, rate, seed=seed)
        epochs = max(2, steps // max(len(data.y_train) // 64, 1))
        for name, fn in losses.items():
            rec = train(fn, arch, data, epochs=epochs, seed=seed)
            final[name].append(100 * rec.final)
            gap[name].append(100 * (rec.early_stopped - rec.final))
    return final, gap


def fmt(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{np.nanmean(v):.2f}±{np.nanstd(v):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--generations", type=int, help="override the number of CMA-ES generations")
    parser.add_argument("--runs", nargs="*", default=["ar:S80", "dr:S80", "ar:A40", "dr:A40"],
                        help="meta-training runs condition:noise, e.g. ar:S80")
    parser.add_argument("--tag", default="results", help="name of the Markdown file written")
    args = parser.parse_args()
    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.quick:
        base = replace(arl.Config(), architectures=("linear", "mlp2", "mlp3"), inner_steps=150)
        generations, eval_steps, popsize = 4, 400, 6
        cells = [(a, d) for a in ("mlp_wide", "cnn_b") for d in ("mnist8", "mnist8_inverted", "digits_transposed")]
    else:
        base = replace(arl.Config(), inner_steps=600)
        generations, eval_steps, popsize = 12, 1500, 8
        cells = [(a, d) for a in ("mlp_wide", "cnn_b") for d in ("mnist8", "mnist8_inverted", "digits_transposed")]
    generations = args.generations or generations
    solver = f"cmaes:popsize={popsize},sigma=0.5,seed=1"  # the search's σ₀ and popsize are solver options
    runs = [tuple(r.split(":")) for r in args.runs]
    noise_keys = [k for k in CONDITIONS if any(n == k for _, n in runs)]
    learned, curves, lines = {}, {}, []
    for condition, noise_key in runs:
        theta, history = meta_train(condition, noise_key, base, generations, solver)
        key = f"arl_{condition}_{noise_key.lower()}"
        learned[key] = arl.learned_loss(base, {"theta": theta})
        learned[key].save(OUT / (f"{key}.pt" if args.tag == "results" else f"{args.tag}_{key}.pt"))
        curves[key] = [(h["clean_val_acc_mean"], h["clean_val_acc_best_candidate"]) for h in history]
        sane = descent_raises_true_class(theta, arl.taylor_spec(base))
        lines.append(f"- `{key}`: θ = {[round(float(t), 3) for t in theta]}; final mean clean meta-val acc "
                     f"{100 * curves[key][-1][0]:.1f} % (generation 1: {100 * curves[key][0][0]:.1f} %); "
                     f"descent raises the true class: {sane}")
        print(lines[-1], f"[{time.perf_counter() - start:.0f}s]", flush=True)
    plot_curves(curves, "meta_training.png" if args.tag == "results" else f"{args.tag}_meta_training.png")
    tables, gaps, json_out = [], [], {}
    spec = arl.taylor_spec(base)
    a40 = TaylorLoss(published_theta("arl_ar_a40"), spec)
    start_loss = TaylorLoss(initial_theta(spec, base.init), spec)
    for noise_key in noise_keys:
        losses = {name: robust.LOSSES[name] for name in robust.LOSSES}
        for condition in ("ar", "dr"):
            if f"arl_{condition}_{noise_key.lower()}" in learned:
                losses[f"arl_{condition}"] = learned[f"arl_{condition}_{noise_key.lower()}"]
        losses["taylor_start"] = start_loss  # control: the CMA-ES starting mean, not meta-learned
        if noise_key == "A40":
            losses["arl_published_ar_a40"] = a40
        final, gap = evaluate_cells(losses, cells, noise_key, eval_steps)
        ranks = average_ranks(final)
        json_out[noise_key] = {"final": final, "gap": gap, "ranks": ranks}
        header = " | ".join(f"{a}/{d}" for a, d in cells)
        tables += [f"### {noise_key} ({CONDITIONS[noise_key][0]} {CONDITIONS[noise_key][1]:.0%}): clean test "
                   "accuracy (%) at the end of training, no early stopping", "",
                   f"| loss | {header} | avg. rank (ours) | avg. rank (paper) |",
                   "|---|" + "---|" * (len(cells) + 2)]
        for name in losses:
            cols = " | ".join(f"{v:.1f}" for v in final[name])
            tables.append(f"| {name} | {cols} | {ranks[name]:.2f} | {PAPER_RANK[noise_key].get(name, '–')} |")
        tables.append("")
        gaps += [f"| {noise_key} | {name} | {fmt(gap[name])} | {PAPER_GAP[noise_key].get(name, '–')} |"
                 for name in losses]
        print(f"{noise_key} done [{time.perf_counter() - start:.0f}s]", flush=True)
    clean_losses = {"ce": robust.cross_entropy, **{k: v for k, v in learned.items() if k.startswith("arl_ar")}}
    clean_final, _ = evaluate_cells(clean_losses, cells, "S80", eval_steps, rate=0.0)
    json_out["clean"] = clean_final
    clean = [f"| {name} | " + " | ".join(f"{v:.1f}" for v in clean_final[name]) + f" | {np.mean(clean_final[name]):.2f} |"
             for name in clean_losses]
    mode = "quick" if args.quick else "full"
    text = [f"# ARL at CPU scale ({mode} mode)", "",
            f"Command: `{' '.join(['python reproductions/arl.py', *sys.argv[1:]])}`; total "
            f"{time.perf_counter() - start:.0f} s on one shared core. Meta-training: {generations} CMA-ES generations, "
            f"popsize {popsize}, σ₀ = 0.5, {base.inner_steps} inner steps (batch {base.batch}, SGD 0.01 "
            f"momentum 0.9), AR pool {base.architectures} on digits, DR pool {base.dr_architecture} on "
            f"{base.dr_datasets}, η = {base.eta}. Held-out cells: {eval_steps} SGD steps each, one seed.", "",
            "## Learned losses", "", *lines, "",
            f"![meta-training curves]({'' if args.tag == 'results' else args.tag + '_'}meta_training.png)", "",
            "## Average rank across held-out cells (Tables 3.1 / 3.2)", "", *tables,
            "## Best-checkpoint minus final accuracy, mean±std over cells (Table 3.6)", "",
            "| noise | loss | ours | paper |", "|---|---|---|---|", *gaps, "",
            "## 0 % noise (Fig. 3.6: ARL should be comparable to CE)", "",
            "| loss | " + " | ".join(f"{a}/{d}" for a, d in cells) + " | mean |", "|---|" + "---|" * (len(cells) + 1),
            *clean, ""]
    (OUT / f"{args.tag}.md").write_text("\n".join(text) + "\n")
    (OUT / f"{args.tag}_{mode}.json").write_text(json.dumps(json_out, indent=1))
    print("\n".join(text))


def plot_curves(curves, filename: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, values in curves.items():
        gens = np.arange(1, len(values) + 1)
        line, = ax.plot(gens, [100 * m for m, _ in values], marker="o", label=f"{key} (mean)")
        ax.plot(gens, [100 * b for _, b in values], ls="--", color=line.get_color(), alpha=0.6)
    ax.set_xlabel("CMA-ES generation")
    ax.set_ylabel("clean meta-validation accuracy (%)")
    ax.set_title("ARL meta-training (solid: CMA-ES mean, dashed: best candidate)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / filename, dpi=110)


if __name__ == "__main__":
    main()
