"""What ``bilevel compare`` shows and writes: an aligned table, ``compare.json``, ``compare.csv``, ``compare.png``.

    <out>/compare.json   the whole report: instance, reference, methods, every row at every point
    <out>/compare.csv    one line per (outer step, solver), the reference first at each step
    <out>/compare.png    relative error (log) and time per solver; with a trajectory, error against the step

The output folder is checked before any work (:func:`check_out_dir`): an earlier comparison's files are
never overwritten unless asked, and each file is written atomically (a temporary file, then a rename).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any, Optional

from ..compare import FAILED, NOT_APPLICABLE, CompareReport, SolverRow
from ..errors import BilevelError

FILES = ("compare.json", "compare.csv", "compare.png")
TRAJECTORY_COLUMNS = 8  # up to this many outer steps get a column each; more are summarised
CSV_FIELDS = ("step", "solver", "reference", "kind", "status", "rel_error", "cosine", "hypergrad_norm", "time_s",
              "hvp_count", "evaluations", "inner_steps", "converged", "residual", "iterations",
              "inner_grad_norm_rel", "peak_memory_bytes", "error", "warnings", "note")


class CompareOutputError(BilevelError, ValueError):
    """The output folder cannot take the comparison's files (a file in its place, or earlier results)."""


# ---- the text table ------------------------------------------------------------------------------------
def _num(value: Optional[float], fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return "0" if value == 0 and fmt.endswith("e") else format(value, fmt)


def _count(value: Optional[float]) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.0f}"


def _bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _short(text: str, limit: int = 70) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "… (below)"


def _cells(row: SolverRow, reference: bool) -> list[str]:
    """One table line; a failure's full message and every warning are spelled out below the table."""
    name = row.spec + (" (reference)" if reference else "")
    if row.status != "ok":
        status = "FAILED" if row.status == FAILED else "n/a"
        return [name, row.kind, status] + ["-"] * (len(HEADER) - 4) + [_short(row.error) if row.error else row.note]
    conv = "-" if row.converged is None else ("yes" if row.converged else "NO")
    warned = sorted({w.split(":")[0] for w in row.warnings})
    note = "; ".join(filter(None, [row.note, "warned: " + ", ".join(warned) if warned else ""]))
    return [name, row.kind, "ok", _num(row.rel_error, ".2e"), _num(row.cosine, ".6f"), _num(row.time_s, ".3g"),
            _count(row.evaluations), _count(row.hvp_count), _count(row.inner_steps), conv,
            _num(row.residual, ".1e"), _count(row.iterations), _num(row.inner_grad_norm_rel, ".1e"),
            _bytes(row.peak_memory_bytes), note]


HEADER = ["solver", "kind", "status", "rel.error", "cosine", "time[s]", "evals", "HVPs", "inner", "conv.",
          "residual", "iters", "stationarity", "peak mem", "note"]


def _align(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def format_point(report: CompareReport, index: int) -> str:
    """The table of every solver at point ``index``, with its warnings and errors spelled out below."""
    point = report.points[index]
    lines = [f"{report.problem}, outer step {point.step}: every solver against reference {report.reference!r} "
             "(rel.error = ‖g − g_ref‖/‖g_ref‖, cosine, in float64)"]
    lines += _align([HEADER, _cells(point.reference, True)] + [_cells(r, False) for r in point.rows])
    details = [f"  {r.spec}: {w}" for r in [point.reference, *point.rows] for w in r.warnings]
    details += [f"  {r.spec}: {r.error}" for r in point.rows if r.status == FAILED]
    if details:
        lines += ["warnings and errors:"] + details
    return "\n".join(lines)


def _trajectory_cell(row: SolverRow) -> str:
    return _num(row.rel_error, ".2e") if row.status == "ok" else ("FAILED" if row.status == FAILED else "n/a")


def _trajectory_table(report: CompareReport) -> str:
    """Each solver's relative error at every point (a column per step, or a summary when there are many)."""
    steps = [p.step for p in report.points]
    many = len(steps) > TRAJECTORY_COLUMNS
    header = ["solver"] + ([f"step {steps[0]}", "median", "max", f"step {steps[-1]}", "not ok"] if many
                           else [f"step {s}" for s in steps])
    table = [header]
    for i, spec in enumerate(r.spec for r in report.points[0].rows):
        rows = [p.rows[i] for p in report.points]
        if not many:
            table.append([spec] + [_trajectory_cell(r) for r in rows])
            continue
        ok = [r.rel_error for r in rows if r.status == "ok"]
        summary = [_num(statistics.median(ok), ".2e"), _num(max(ok), ".2e")] if ok else ["-", "-"]
        table.append([spec, _trajectory_cell(rows[0])] + summary +
                     [_trajectory_cell(rows[-1]), f"{len(rows) - len(ok)} of {len(rows)}"])
    lines = [f"relative error along the reference's outer trajectory ({len(steps)} points):"] + _align(table)
    if any(r.status == FAILED or r.warnings for p in report.points[1:] for r in [p.reference, *p.rows]):
        lines.append("(failures and warnings at later steps: compare.json / compare.csv)")
    return "\n".join(lines)


def format_report(report: CompareReport) -> str:
    """The table at the first point; with a trajectory, the relative errors at every point too."""
    inst = report.instance
    parts = [format_point(report, 0)]
    if len(report.points) > 1:
        parts.append(_trajectory_table(report))
    where = (f"; sub-problem {inst['subproblem_key']!r} (1 of {inst['subproblems_at_step_0']} at step 0)"
             if "subproblem_key" in inst else "")
    footer = [f"instance: {inst.get('inner_scalars')} inner / {inst.get('outer_scalars')} outer scalars, "
              f"{inst.get('inner_steps')} inner steps ({inst.get('inner_optimizer')}, lr {inst.get('inner_lr')}) "
              f"on {inst.get('device')}, {inst.get('dtype')}{where}" + (
                  "; in float32 a relative error of ~1e-6 is round-off, the reference's included"
                  if inst.get("dtype") == "float32" else ""),
              f"time: median of {report.repeats} call(s) after one untimed warm-up call; evals: gradient (cmaes: "
              "function) evaluations; stationarity: ‖∇θG(θ_K)‖/‖∇θG(θ_0)‖; every call starts afresh (no solver "
              "state)",
              f"peak mem: {report.memory_method}"]
    return "\n\n".join(parts) + "\n" + "\n".join(footer)


# ---- files ---------------------------------------------------------------------------------------------
def check_out_dir(out: str | Path, overwrite: bool = False) -> Path:
    """The output folder, checked before any work: not a file, and holding no earlier comparison unless
    ``overwrite``. Nothing is created here."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CompareOutputError(f"--out {path} is a file, not a folder; give a folder for {', '.join(FILES)}")
    existing = [name for name in FILES if (path / name).exists()]
    if existing and not overwrite:
        raise CompareOutputError(f"{path} already holds an earlier comparison ({', '.join(existing)}); give another "
                                 "--out folder, or --overwrite to replace those files")
    return path


def _row_dict(row: SolverRow, step: int, reference: bool) -> dict[str, Any]:
    data = dataclasses.asdict(dataclasses.replace(row, hypergrad=None))
    del data["hypergrad"]
    return {"step": step, "reference": reference, **data}


def report_dict(report: CompareReport) -> dict[str, Any]:
    """The report as plain JSON values (hypergradients left out; their norms kept)."""
    return {"problem": report.problem, "reference": report.reference, "repeats": report.repeats,
            "timing": "median wall time of `repeats` calls after one untimed warm-up call",
            "memory_method": report.memory_method, "instance": report.instance,
            "points": [{"step": p.step,
                        "outer_norm": math.sqrt(sum(float((v.double() ** 2).sum()) for v in p.outer.values())),
                        "reference": _row_dict(p.reference, p.step, True),
                        "rows": [_row_dict(r, p.step, False) for r in p.rows]} for p in report.points]}


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_csv(report: CompareReport, path: Path) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for p in report.points:
            for row, is_ref in [(p.reference, True)] + [(r, False) for r in p.rows]:
                data = _row_dict(row, p.step, is_ref)
                data["solver"], data["warnings"] = row.spec, " | ".join(row.warnings)
                writer.writerow(data)


def plot_report(report: CompareReport, path: Path) -> None:
    """Relative error (log) and time per solver at the first point; with a trajectory, error against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = report.points[0].rows
    trajectory = len(report.points) > 1
    fig, axes = plt.subplots(1, 3 if trajectory else 2, figsize=(16 if trajectory else 11, 4.2), squeeze=False)
    labels = [r.spec for r in rows]
    for ax, what in zip(axes[0], ("rel_error", "time_s")):
        log = what == "rel_error"
        values = [getattr(r, what) for r in rows]
        for i, (r, v) in enumerate(zip(rows, values)):
            drawable = v is not None and not math.isnan(v) and not (log and v <= 0)
            if drawable:
                ax.bar(i, v, color="C0")
                continue
            # no bar on a log axis for 0, and none for a row without a value: say why at the axis' foot
            tag = "0" if v == 0 else {FAILED: "failed", NOT_APPLICABLE: "n/a"}.get(r.status, "nan")
            ax.annotate(tag, (i, 0.02), xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=8)
        if log:
            ax.set_yscale("log")
            ax.set_title(f"relative error vs {report.reference} (log)", fontsize=10)
        else:
            ax.set_title(f"wall time [s], median of {report.repeats}", fontsize=10)
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_xticks(range(len(rows)), labels, rotation=35, ha="right", fontsize=8)
    if trajectory:
        ax = axes[0][2]
        steps = [p.step for p in report.points]
        for i, label in enumerate(labels):
            errors = [p.rows[i].rel_error for p in report.points]
            if all(e is not None for e in errors):  # an exact 0 is a gap on the log axis
                ax.semilogy(steps, [e if e > 0 else math.nan for e in errors], marker="o", label=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("outer step (reference trajectory)", fontsize=9)
        ax.set_title("relative error along the trajectory", fontsize=10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"{report.problem}: solvers against {report.reference}")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=80, format="png")  # the path is a temporary name without .png
    plt.close(fig)


def write_report(report: CompareReport, out: str | Path, overwrite: bool = False) -> list[Path]:
    """Write compare.json, compare.csv and compare.png into ``out`` (created); returns their paths."""
    folder = check_out_dir(out, overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in FILES]
    _atomic_write(paths[0], lambda p: p.write_text(json.dumps(report_dict(report), indent=2, default=str) + "\n"))
    _atomic_write(paths[1], lambda p: _write_csv(report, p))
    _atomic_write(paths[2], lambda p: plot_report(report, p))
    return paths
