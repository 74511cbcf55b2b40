"""The report of benchmarks/peers.py: target lines, tables (Markdown), JSON and plots."""
from __future__ import annotations

import json
import math
import os

import torch

import common
from common import md_table

IMPLICIT_VS_TORCHOPT = 0.77
UNROLL_VS_HIGHER_TIME, UNROLL_VS_HIGHER_MEM = 0.8, 1.0
VS_HAND_WRITTEN = 1.10
VS_JAX = {"hyperclean": 4.0, "cnn": 1.5}
FLAT_IN_T = 1.2
MEM_NOISE_MIB = 0.5
"""Peak-RSS differences below this are measurement noise (benchmarks/common.py)."""


def _f(x, unit="", digits=3):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.{digits}g}{unit}"


def progress_line(r: dict) -> str:
    head = f"[{r['instance']}] {r['method']:42s}"
    if "error" in r:
        return f"{head} FAILED {r['error'][:110]}"
    if "time" not in r:
        return f"{head} (not run)"
    return (f"{head} err {r['rel_error']:.2e} vs-IFT {r['rel_error_ift']:.2e} {1e3 * r['time']:9.2f} ms "
            f"(n={r['rounds']}) {_f(r.get('mem'), ' MiB')} {r.get('path', '')}")


def _rec(records, inst, label):
    return next((r for r in records if r["instance"] == inst and r["method"] == label), None)


def _ratio(summary, family, other):
    return next((x for x in summary["ratios"] if x["family"] == family and x["other"] == other), None)


def _why(*recs) -> str:
    for r in recs:
        if r is None:
            return "row absent"
        if "error" in r:
            return f"{r['method']} failed: {r['error'][:100]}"
        if "time" not in r:
            return f"{r['method']} did not run"
    return "no paired timing"


def _verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def targets(summaries: list[dict], records: list[dict], args) -> list[str]:
    """The issue's targets as explicit "target: … measured … met/missed" lines."""
    lines = []
    sizes = [s for s in summaries if s["part"] == "sizes"]
    for s in sizes:
        a, b = _rec(records, s["instance"], "ours cg"), _rec(records, s["instance"], "torchopt custom_root CG")
        x = _ratio(s, "cg", "torchopt custom_root CG")
        what = (f"target: {s['name']}: implicit hypergradient (cg, {s['settings']['cg_iters']} iterations each) "
                f"≤ {IMPLICIT_VS_TORCHOPT}× torchopt custom_root CG at equal accuracy")
        if x is None:
            lines.append(f"{what}; measured: nothing ({_why(a, b)}): missed")
            continue
        equal = a["rel_error_ift"] <= 2 * b["rel_error_ift"] + 1e-6
        lines.append(f"{what}; measured {x['time_ratio']:.2f}× ({1e3 * a['time']:.1f} vs {1e3 * b['time']:.1f} ms; "
                     f"rel. error vs exact {a['rel_error_ift']:.1e} vs {b['rel_error_ift']:.1e}"
                     f"{'' if equal else ', ours LESS accurate'}): "
                     f"{_verdict(x['time_ratio'] <= IMPLICIT_VS_TORCHOPT and equal)}")
    for s in sizes:
        a, b = _rec(records, s["instance"], "ours unroll"), _rec(records, s["instance"], "higher innerloop_ctx")
        x = _ratio(s, "unroll", "higher innerloop_ctx")
        what = (f"target: {s['name']}: unrolled ≤ {UNROLL_VS_HIGHER_TIME}× higher's time and ≤ "
                f"{UNROLL_VS_HIGHER_MEM}× its peak memory")
        if x is None:
            lines.append(f"{what}; measured: nothing ({_why(a, b)}): missed")
            continue
        if "mem" in a and "mem" in b:
            mem_ok = a["mem"] <= UNROLL_VS_HIGHER_MEM * b["mem"] or a["mem"] - b["mem"] < MEM_NOISE_MIB
            mem = (f"memory {a['mem']:.2f} vs {b['mem']:.2f} MiB ({_f(x['mem_ratio'], '×')}"
                   f"{', difference within noise' if mem_ok and a['mem'] > b['mem'] else ''})")
        else:
            mem_ok, mem = False, "memory not measured"
        lines.append(f"{what}; measured time {x['time_ratio']:.2f}× ({1e3 * a['time']:.1f} vs {1e3 * b['time']:.1f} ms), "
                     f"{mem}: {_verdict(x['time_ratio'] <= UNROLL_VS_HIGHER_TIME and mem_ok)}")
    for s in [s for s in summaries if s["part"] in ("sizes", "hyperclean")]:
        for family in dict.fromkeys(r["family"] for r in records if r["instance"] == s["instance"]):
            other = f"hand-written autograd {family}"
            a, b = _rec(records, s["instance"], f"ours {family}"), _rec(records, s["instance"], other)
            x = _ratio(s, family, other)
            what = f"target: {s['name']}: {family} ≤ {VS_HAND_WRITTEN}× hand-written eager autograd"
            if x is None:
                lines.append(f"{what}; measured: nothing ({_why(a, b)}): missed")
                continue
            lines.append(f"{what}; measured {x['time_ratio']:.2f}× ({1e3 * a['time']:.1f} vs {1e3 * b['time']:.1f} ms, "
                         f"ours on path {a.get('path') or '—'}): {_verdict(x['time_ratio'] <= VS_HAND_WRITTEN)}")
    for s in summaries:
        kind = s["spec"]["problem"]
        if kind not in VS_JAX or s["part"] not in ("sizes", "hyperclean"):
            continue
        bound = VS_JAX[kind]
        a, b = _rec(records, s["instance"], "ours cg"), _rec(records, s["instance"], "jaxopt custom_root + solve_cg")
        what = f"target: {s['name']}: implicit (cg, compiled path) ≤ {bound}× jitted JAX/jaxopt custom_root + solve_cg"
        if b is None:
            lines.append(f"{what}; measured: nothing (JAX rows skipped: {args.jax_reason}): missed")
            continue
        if "time" not in b or a is None or "time" not in a:
            lines.append(f"{what}; measured: nothing ({_why(a, b)}): missed")
            continue
        path = a.get("path") or "?"
        compiled = "compile" in path
        r = a["time"] / b["time"]
        lines.append(f"{what}; measured {r:.2f}× ({1e3 * a['time']:.1f} vs {1e3 * b['time']:.1f} ms, ours on path "
                     f"'{path}'{'' if compiled else ' — not a compiled path: the library has none selected'}; rel. "
                     f"error vs exact {a['rel_error_ift']:.1e} vs {b['rel_error_ift']:.1e}): {_verdict(r <= bound)}")
    t_runs = sorted((s for s in summaries if s["part"] == "T"), key=lambda s: s["steps"])
    if len(t_runs) >= 2:
        lo, hi = t_runs[0], t_runs[-1]
        for family in ("cg", "neumann", "fixedpoint", "exact", "forward"):
            a, b = _rec(records, lo["instance"], f"ours {family}"), _rec(records, hi["instance"], f"ours {family}")
            what = (f"target: {family} peak memory flat in T (≤ {FLAT_IN_T}× from T = {lo['steps']} to "
                    f"T = {hi['steps']}, {lo['name']})")
            if a is None or b is None or "mem" not in a or "mem" not in b:
                lines.append(f"{what}; measured: nothing ({_why(a, b) if a is None or b is None or 'error' in a or 'error' in b else 'memory not measured'}): missed")
                continue
            ratio = b["mem"] / a["mem"] if a["mem"] > 0 else math.nan
            ok = ratio <= FLAT_IN_T or b["mem"] - a["mem"] < MEM_NOISE_MIB
            note = "" if ratio <= FLAT_IN_T or not ok else f"; the difference is below the {MEM_NOISE_MIB} MiB noise"
            lines.append(f"{what}; measured {a['mem']:.2f} → {b['mem']:.2f} MiB (ratio {_f(ratio, '×')}{note}): "
                         f"{_verdict(ok)}")
    return lines


def side_by_side(s: dict, records: list[dict]) -> str:
    """Per family: ours, the hand-written twins and every peer, times and ratios in one row."""
    rs = [r for r in records if r["instance"] == s["instance"]]
    side = []
    for family in dict.fromkeys(r["family"] for r in rs):
        mine = next((r for r in rs if r["family"] == family and r["impl"] == "ours" and not r["path_asked"]), None)
        if mine is None or "time" not in mine:
            continue
        cells = [family, 1e3 * mine["time"]]
        for impl in ("autograd", "func"):
            other = next((r for r in rs if r["family"] == family and r["impl"] == impl and "time" in r), None)
            x = _ratio(s, family, other["method"]) if other else None
            cells += [1e3 * other["time"] if other else math.nan, x["time_ratio"] if x else math.nan]
        peers = []
        for other in rs:
            if other["family"] != family or other["impl"] in ("ours", "autograd", "func"):
                continue
            x = _ratio(s, family, other["method"])
            peers.append(f"{other['method']}: " + (f"{1e3 * other['time']:.3g} ms, ours/it {x['time_ratio']:.2f}×"
                                                   + ("" if x["paired"] else " (unpaired)") if x else "failed"))
        cells.append("; ".join(peers) or "—")
        side.append(cells)
    return md_table(["family", "ours ms", "autograd ms", "ours/autograd", "torch.func ms", "ours/torch.func",
                     "peers (ms, ours/peer)"], side)


def instance_tables(s: dict, records: list[dict]) -> str:
    rs = [r for r in records if r["instance"] == s["instance"]]
    rows = []
    for r in rs:
        if "error" in r:
            rows.append([r["family"], r["method"], "", r["target"], f"**failed**: {r['error'][:110]}", "", "", "", "",
                         "", ""])
            continue
        if "time" not in r:
            continue
        rows.append([r["family"], r["method"], r.get("path", ""), r["target"], r["rel_error"], r["rel_error_ift"],
                     r["cos_ift"], 1e3 * r["time"], r["rounds"], r.get("mem", math.nan),
                     r.get("note", "") + (f" compile {r['compile']:.1f} s" if "compile" in r else "")])
    full = md_table(["family", "method", "path", "target", "rel. error", "rel. error vs IFT", "cos vs IFT", "time (ms)",
                     "n", "peak MiB", "note"], rows)
    ratio_table = side_by_side(s, records)
    left = "".join(f"\n- {k} left out: {v}." for k, v in s["left_out"].items())
    st = s["settings"]
    head = (f"K = {s['steps']} {'heavy-ball (momentum ' + str(s['momentum']) + ')' if s['momentum'] else 'GD'} steps, "
            f"lr {s['lr']:.4g}; dim θ = {s['dim_theta']}, dim φ = {s['dim_phi']}; H at θ_K: λ ∈ [{s['lambda_min']:.3g}, "
            f"{s['lambda_max']:.3g}]; CG {st['cg_iters']} iterations, Neumann α = {st['alpha']} × {st['terms']} terms, "
            f"fixed point {st['fp_iters']} iterations, damping δ = {st['damping']}; {s['seconds']:.0f} s.{left}")
    return f"### {s['name']}\n\n{head}\n\n{full}\n\nSide by side (times in ms; ratios = median of per-round ratios):\n\n{ratio_table}\n"


def curve_tables(part_summaries: list[dict], records: list[dict], axis: str) -> str:
    """Time, peak memory and error vs IFT of every method over the instances of a curve part."""
    keys = [s["instance"] for s in part_summaries]
    xs = [s["steps"] if axis == "T" else s["dim_phi"] for s in part_summaries]
    labels = list(dict.fromkeys(r["method"] for r in records if r["instance"] in keys))
    out = []
    for title, field, scale in (("time (ms)", "time", 1e3), ("peak RSS increase (MiB)", "mem", 1.0),
                                ("relative error vs the exact (IFT) hypergradient", "rel_error_ift", 1.0)):
        rows = []
        for label in labels:
            row = [label]
            for k in keys:
                r = _rec(records, k, label)
                row.append(scale * r[field] if r is not None and field in r else math.nan)
            rows.append(row)
        out.append(f"{title}:\n\n" + md_table(["method"] + [f"{axis}={x}" for x in xs], rows))
    return f"{part_summaries[0]['name'].split(',')[0]}, {axis} varied.\n\n" + "\n\n".join(out) + "\n"


MARKERS = {"ours": "o", "autograd": "v", "func": "^", "torchopt": "s", "higher": "D", "betty": "P", "jax": "*"}
LINES = {"ours": "-", "autograd": ":", "func": ":"}


def _family_colours(plt) -> dict:
    import peer_methods
    cmap = plt.get_cmap("tab10")
    return {f: cmap(i % 10) for i, f in enumerate(peer_methods.FAMILIES)}


def _legends(ax, plt, colours: dict, impls: list[str]) -> None:
    """Colour = solver family, marker (and line style) = implementation."""
    from matplotlib.lines import Line2D
    import peer_methods
    fam = [Line2D([], [], color=c, lw=2, label=f) for f, c in colours.items()]
    imp = [Line2D([], [], color="k", marker=MARKERS[i], ls=LINES.get(i, "--"), label=peer_methods.IMPL_NAMES[i])
           for i in impls]
    first = ax.legend(handles=fam, fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="family",
                      title_fontsize=7)
    ax.add_artist(first)
    ax.legend(handles=imp, fontsize=6, loc="lower left", bbox_to_anchor=(1.01, 0.0), title="implementation",
              title_fontsize=7)


def plot(stem: str, summaries: list[dict], records: list[dict]) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as err:  # matplotlib missing: tables only
        print("no plots:", err)
        return []
    colours = _family_colours(plt)
    made = []
    tables = [s for s in summaries if s["part"] in ("sizes", "hyperclean")]
    if tables:
        cols = min(2, len(tables))
        rows = math.ceil(len(tables) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols + 2, 4.8 * rows), squeeze=False)
        impls = set()
        for ax, s in zip(axes.flat, tables):
            for r in records:
                if r["instance"] != s["instance"] or "time" not in r or not math.isfinite(r.get("rel_error", math.nan)):
                    continue
                impls.add(r["impl"])
                ax.scatter(r["time"], max(r["rel_error"], 1e-9), marker=MARKERS.get(r["impl"], "o"), s=28,
                           color=colours.get(r["family"], "k"), alpha=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("seconds per hypergradient")
            ax.set_ylabel("relative error vs its exact value")
            ax.set_title(s["name"], fontsize=8)
        for ax in list(axes.flat)[len(tables):]:
            ax.axis("off")
        _legends(axes[0][cols - 1], plt, colours, [i for i in MARKERS if i in impls])
        fig.tight_layout()
        path = f"{stem}_accuracy_time.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        made.append(path)
    for part, axis, xlabel in (("T", "steps", "inner steps T"), ("dim", "dim_phi", "dim(φ)")):
        ss = sorted((s for s in summaries if s["part"] == part), key=lambda s: s[axis])
        if len(ss) < 2:
            continue
        keys = {s["instance"]: s[axis] for s in ss}
        labels = [lab for lab in dict.fromkeys(r["method"] for r in records if r["instance"] in keys)
                  if not lab.startswith("hand-written torch.func")]
        fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
        impls = set()
        for label in labels:
            rs = [r for r in records if r["instance"] in keys and r["method"] == label and "time" in r]
            if not rs:
                continue
            impl = rs[0]["impl"]
            impls.add(impl)
            xs = [keys[r["instance"]] for r in rs]
            for ax, field in zip(axes, ("time", "mem", "rel_error_ift")):
                floor = 1e-3 if field == "mem" else 1e-9
                ys = [max(r.get(field, math.nan), floor) for r in rs]
                ax.plot(xs, ys, LINES.get(impl, "--"), marker=MARKERS.get(impl, "o"), ms=4,
                        color=colours.get(rs[0]["family"], "k"), alpha=0.85)
        for ax, lab in zip(axes, ("seconds per hypergradient", "peak RSS increase (MiB)", "relative error vs exact (IFT)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(lab)
        _legends(axes[2], plt, colours, [i for i in MARKERS if i in impls])
        fig.suptitle(f"{ss[0]['name'].split(',')[0]}: time, memory and error vs {xlabel}")
        fig.tight_layout()
        path = f"{stem}_curves_{part}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        made.append(path)
    return made


def versions(summaries: list[dict]) -> str:
    import importlib.metadata as md
    out = [f"torch {torch.__version__}"]
    for mod, dist in (("torchopt", "torchopt"), ("higher", "higher"), ("betty", "betty-ml")):
        try:
            __import__(mod)
            out.append(f"{mod} {md.version(dist)}")
        except Exception as err:
            out.append(f"{mod} not importable ({type(err).__name__})")
    jv = next((s["jax_versions"] for s in summaries if s.get("jax_versions")), None)
    out.append(", ".join(f"{k} {v}" for k, v in jv.items()) if jv else "JAX not run")
    return ", ".join(out)


def command_line(args) -> str:
    parts = ["python benchmarks/peers.py"]
    if args.mode != "full":
        parts.append(f"--{args.mode}")
    if args.parts != "sizes,hyperclean,T,dim,zero,boat" and args.mode != "tiny":
        parts.append(f"--parts {args.parts}")
    if args.path != "auto":
        parts.append(f"--path {args.path}")
    if args.jax_python:
        parts.append(f"--jax-python {args.jax_python}")
    if args.betty_path:
        parts.append(f"--betty-path {args.betty_path}")
    if getattr(args, "boat_path", None):
        parts.append(f"--boat-path {args.boat_path}")
    if args.rounds != 5 and args.mode != "tiny":
        parts.append(f"--rounds {args.rounds}")
    if args.cpu_asked is not None:
        parts.append(f"--cpu {args.cpu_asked}")
    return " ".join(parts)


def write(args, summaries, records, zero_text, zero_recs, elapsed) -> dict:
    """Markdown + JSON at ``args.out`` (plots beside it); returns the text to print."""
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    stem = os.path.splitext(args.out)[0]
    target_lines = targets(summaries, records, args)
    plots = plot(stem, summaries, records) if args.mode != "tiny" else []
    skipped = [f"- {r}" for r in (args.betty_reason, args.jax_reason) if r]
    sections = []
    for part, title in (("sizes", "Sizes"), ("hyperclean", "Data hyper-cleaning (the JAX target's size)")):
        ss = [s for s in summaries if s["part"] == part]
        if ss:
            sections.append(f"## {title}\n\n" + "\n".join(instance_tables(s, records) for s in ss))
    for part, axis, title in (("T", "T", "Curves over the inner steps T"), ("dim", "dim φ", "Curves over dim(φ)")):
        ss = sorted((s for s in summaries if s["part"] == part), key=lambda s: s["steps"] if part == "T" else s["dim_phi"])
        if ss:
            sections.append(f"## {title}\n\n" + curve_tables(ss, records, axis))
    if zero_text:
        sections.append("## Zeroth order: evaluations to a target outer loss\n\n" + zero_text)
    images = "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots)
    text = "\n".join([
        "# Peer benchmark: ours vs torchopt, higher, betty, JAX/jaxopt and the hand-written limits",
        "",
        f"Command: `{command_line(args)}` ({elapsed:.0f} s). Machine: {common.machine_line()}"
        f"{f', pinned to core {args.cpu}' if args.cpu is not None else ''}. Versions: {versions(summaries)}. "
        f"Library autodiff path: `{args.path}` (the path each of our rows ran is in its `path` column).",
        "",
        "Method (benchmarks/peers.py docstring): every implementation of a solver family gets the same data, inner "
        f"loop and iteration counts; errors are relative to the float64 exact value of what each computes (`ift`: "
        "implicit hypergradient at the K-step iterate, the closed form for ridge; `loop`: derivative of the K-step "
        "loop; `trunc`, `onestep` likewise) and to the IFT value (`rel. error vs IFT`). Times: median of `n` "
        "interleaved calls after one warm-up call; ratios: median of per-round ratios (JAX: ratio of medians). "
        f"Peak memory: peak RSS increase of one call ({args.memory}).",
        *(["", "Skipped:", *skipped] if skipped else []),
        "",
        "## Targets",
        "",
        *[f"- {line}" for line in target_lines],
        "",
        *sections,
        images,
        "",
    ])
    with open(args.out, "w") as fh:
        fh.write(text)
    data = {"command": command_line(args), "instances": summaries,
            "problems": [r for r in records if r["part"] in ("sizes", "hyperclean")],
            "curves": [r for r in records if r["part"] in ("T", "dim")], "zero_order": zero_recs,
            "targets": target_lines}
    with open(stem + ".json", "w") as fh:
        json.dump(data, fh, indent=1, default=str)
    stdout = ["", f"=== {command_line(args)} ({elapsed:.0f} s) -> {args.out}"]
    for s in summaries:
        if s["part"] in ("sizes", "hyperclean"):
            stdout += ["", f"{s['name']} (ms; ours/X = median of per-round ratios):", side_by_side(s, records)]
    stdout += ["", *target_lines]
    return {"stdout": "\n".join(stdout)}
