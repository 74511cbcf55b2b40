"""The run folder: resolved config, metrics (JSONL + CSV), final params (safetensors), a plot.

    <run>/config.json       problem, solver, seed, steps, processes and the resolved problem Config
    <run>/metrics.jsonl     one JSON object per outer step (written through an accelerate tracker)
    <run>/metrics.csv       the same table as CSV, written at the end
    <run>/outer.safetensors the final outer params
    <run>/final.json        the task's evaluation at the end
    <run>/curves.png        outer loss and the solver's diagnostics against the step
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate.tracking import GeneralTracker
from safetensors.torch import save_file


class JSONLTracker(GeneralTracker):
    """An accelerate tracker that appends each ``log`` call as a JSON line to ``<run>/metrics.jsonl``.

    On resume, rows at or beyond the resumed step are dropped first, so a run killed after its last
    checkpoint does not leave duplicate steps.
    """

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, run_dir: str | Path, resume_step: Optional[int] = None):
        super().__init__()
        self.path = Path(run_dir) / "metrics.jsonl"
        self.resume_step = resume_step

    def start(self):
        """Runs on the main process only (accelerate calls it from ``init_trackers``)."""
        resume_step = self.resume_step
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            rows = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", -1) < resume_step]
            self.path.write_text("".join(r + "\n" for r in rows))

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict):
        pass  # the config is written to config.json by the runner

    def log(self, values: dict, step: Optional[int] = None, **kwargs):
        row = {"step": step, **{k: (v if isinstance(v, (int, str)) else float(v)) for k, v in values.items()}}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row, allow_nan=True) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_csv(run_dir: str | Path) -> Path:
    rows = read_metrics(run_dir)
    path = Path(run_dir) / "metrics.csv"
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "step", k))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    return path


def save_params(params: dict[str, torch.Tensor], path: str | Path) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, str(path))


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2, default=str) + "\n")


def plot_curves(run_dir: str | Path, title: str) -> Optional[Path]:
    """Outer loss and every other logged quantity against the step, one small panel each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    if not rows:
        return None
    keys = [k for k in rows[0] if k != "step" and isinstance(rows[0][k], (int, float))]
    keys.sort(key=lambda k: (k != "outer_loss", k))
    cols = 3
    nrows = max(1, math.ceil(len(keys) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.6 * nrows), squeeze=False)
    steps = [r["step"] for r in rows]
    for ax, key in zip(axes.flat, keys):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows])
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("outer step", fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # leave room for the title above the first row of panels
    path = Path(run_dir) / "curves.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
