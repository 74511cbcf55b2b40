"""The outer loop through HuggingFace Accelerate: the only module of the library that imports accelerate.

One process (``bilevel run ...``) or many (``accelerate launch --num_processes N -m bilevel.run.cli run
...``). The steps themselves are :class:`bilevel.OuterLoop`'s (the one outer loop); this module gives it
what Accelerate provides: the device, a ``ctx.map`` that deals independent work (sub-problems, CMA-ES
candidates) round-robin to the processes and gathers it back in order, ``accelerator.reduce`` of the
gradient (identical copies stay identical; per-process shards become their mean) and of the metrics; and
it adds the run folder, the trackers, the progress bar and checkpoints.

Models are never ``prepare``d (DDP wrappers break torch.func transforms); params dicts live on
``accelerator.device`` and gradients from torch.func are reduced explicitly.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from ..context import RunContext
from ..outer import OuterLoop
from ..solvers import normalize_spec
from . import artifacts
from .checkpoint import CheckpointError, find_resume_checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint

OPTIONAL_TRACKERS = ("tensorboard", "wandb", "mlflow")
LOOP_STATE = ("step", "outer", "optimizer", "inner", "solver_state")  # OuterLoop.state_dict()


@dataclass
class RunSpec:
    """Everything that defines a run besides the problem's Config."""

    problem: str
    solver: Optional[str]
    steps: int
    seed: int = 0
    out: str = "runs/default"
    resume: bool = False
    checkpoint_every: int = 0
    cpu: bool = False
    mixed_precision: str = "no"
    log_with: Sequence[str] = ()
    progress: bool = True
    keep_checkpoints: int = 2
    extra: dict[str, Any] = field(default_factory=dict)


def _to(tree_: Any, device: torch.device | str) -> Any:
    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, tree_)


def make_split_map(accelerator: Accelerator) -> Callable[[Callable, Sequence], list]:
    """``map(fn, items)``: items dealt round-robin to processes, results gathered in order on every process."""

    def split_map(fn: Callable, items: Sequence) -> list:
        n, rank = accelerator.num_processes, accelerator.process_index
        if n == 1:
            return [fn(item) for item in items]
        mine = [(i, _to(fn(items[i]), "cpu")) for i in range(rank, len(items), n)]
        results: list = [None] * len(items)
        for index, value in gather_object(mine):
            results[index] = _to(value, accelerator.device)
        return results

    return split_map


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _mean_metrics(per_process: list[dict[str, float]]) -> dict[str, float]:
    """Metrics averaged over processes (keys every process reported)."""
    keys = set(per_process[0]).intersection(*per_process[1:]) if len(per_process) > 1 else set(per_process[0])
    return {k: float(np.mean([float(m[k]) for m in per_process])) for k in sorted(keys)}


def _kept(run_dir: Path) -> str:
    last = latest_checkpoint(run_dir)
    return f"the last good checkpoint is {last}" if last else "no checkpoint was written (use --checkpoint-every K)"


def run(spec: RunSpec, module: Any, cfg: Any, config_table: dict[str, Any]) -> Optional[dict[str, float]]:
    """Run ``spec.steps`` outer steps of the problem ``module`` with config ``cfg``.

    Returns the problem's final evaluation on the main process, None on the others.
    """
    run_dir = Path(spec.out)
    for name in spec.log_with:
        if name not in OPTIONAL_TRACKERS:
            raise ValueError(f"--log-with {name!r}: valid trackers are {', '.join(OPTIONAL_TRACKERS)}")
    resume_path = find_resume_checkpoint(run_dir) if spec.resume else None
    payload = load_checkpoint(resume_path) if resume_path is not None else None
    start = int(payload["step"]) if payload is not None else 0

    tracker = artifacts.JSONLTracker(run_dir, resume_step=start if payload is not None else None)
    accelerator = Accelerator(cpu=spec.cpu, mixed_precision=spec.mixed_precision,
                              log_with=[tracker, *spec.log_with], project_dir=str(run_dir))
    set_seed(spec.seed)
    ctx = RunContext(solver_spec=spec.solver, seed=spec.seed, device=accelerator.device,
                     num_processes=accelerator.num_processes, process_index=accelerator.process_index,
                     _map=make_split_map(accelerator), _autocast=accelerator.autocast)
    declaration = module.build(cfg, ctx)

    def reduce(grads):
        return accelerator.reduce({k: g.detach().to(accelerator.device).contiguous() for k, g in grads.items()},
                                  reduction="mean")

    def gather(metrics):
        return _mean_metrics(gather_object([metrics])) if accelerator.num_processes > 1 else metrics

    loop = OuterLoop(declaration, spec.solver, ctx, name=f"problem {spec.problem!r}", reduce=reduce,
                     gather_metrics=gather)
    if payload is not None:  # before anything is written: a refused resume changes nothing on disk
        _restore(payload, resume_path, spec, loop.solver_spec, config_table, accelerator, loop)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    resolved = {"problem": spec.problem, "solver": loop.solver_spec, "steps": spec.steps, "seed": spec.seed,
                "processes": accelerator.num_processes, "mixed_precision": spec.mixed_precision,
                "config": config_table}
    accelerator.init_trackers(run_dir.name or "run", config={k: str(v) for k, v in resolved.items()})
    if accelerator.is_main_process:
        artifacts.write_json(run_dir / "config.json", resolved)

    bar = tqdm(total=spec.steps, initial=start, disable=not (spec.progress and accelerator.is_main_process),
               desc=f"{spec.problem} [{loop.solver_spec or 'single level'}]", dynamic_ncols=True)
    clock = [time.perf_counter()]

    def on_step(step: int, metrics: dict[str, float]) -> None:
        metrics["step_seconds"] = time.perf_counter() - clock[0]
        accelerator.log(metrics, step=step)
        bar.update(1)
        bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("outer_loss", "inner_loss") if k in metrics})
        if spec.checkpoint_every and (step + 1) % spec.checkpoint_every == 0:
            _checkpoint(spec, loop, accelerator, run_dir, config_table)
        clock[0] = time.perf_counter()

    loop.run(spec.steps, on_step=on_step, error_hint=lambda: _kept(run_dir))
    bar.close()

    final = loop.evaluate()
    if accelerator.is_main_process:
        artifacts.save_params(loop.outer, run_dir / "outer.safetensors")
        artifacts.write_json(run_dir / "final.json", final)
        artifacts.write_csv(run_dir)
        artifacts.plot_curves(run_dir, f"{spec.problem} — solver {loop.solver_spec or 'none (single level)'}")
    accelerator.wait_for_everyone()
    is_main = accelerator.is_main_process
    accelerator.end_training()
    return final if is_main else None


def _checkpoint(spec: RunSpec, loop: OuterLoop, accelerator: Accelerator, run_dir: Path,
                config_table: dict[str, Any]) -> None:
    """Full state: the loop's state (outer params and optimiser, warm starts, solver state, step) and
    every process's RNG states (the loop's state is identical on every process)."""
    per_process = gather_object([{"rng": rng_state()}])
    if accelerator.is_main_process:
        payload = {**_to(loop.state_dict(), "cpu"), "problem": spec.problem, "solver": loop.solver_spec,
                   "seed": spec.seed, "num_processes": accelerator.num_processes, "config": config_table,
                   "processes": per_process}
        save_checkpoint(run_dir, loop.step, payload, keep=spec.keep_checkpoints)
    accelerator.wait_for_everyone()


def _restore(payload: dict, path: Path, spec: RunSpec, solver: Optional[str], config_table: dict[str, Any],
             accelerator: Accelerator, loop: OuterLoop) -> None:
    """Load the checkpoint into ``loop`` after checking it was written by a run with the same settings."""
    saved_solver = payload.get("solver")
    same_solver = saved_solver == solver or (saved_solver is not None and solver is not None
                                             and normalize_spec(saved_solver) == normalize_spec(solver))
    differ = [f"solver: {saved_solver!r} → {solver!r}"] if not same_solver else []
    for key, now in (("problem", spec.problem), ("seed", spec.seed), ("num_processes", accelerator.num_processes)):
        if payload.get(key) != now:
            differ.append(f"{key}: {payload.get(key)!r} → {now!r}")
    saved_config = payload.get("config", {})
    differ += [f"{k}: {saved_config.get(k)!r} → {v!r}" for k, v in config_table.items() if saved_config.get(k) != v]
    if differ:
        raise CheckpointError(f"--resume: checkpoint {path} was written with other settings ({'; '.join(differ)}); "
                              "resume with the settings the run was started with, or start a fresh run in a new "
                              "folder")
    try:
        loop.load_state_dict(_to({k: payload[k] for k in LOOP_STATE}, accelerator.device))
    except ValueError as err:
        raise CheckpointError(f"--resume: checkpoint {path} does not fit this problem: {err}") from err
    set_rng_state(payload["processes"][accelerator.process_index]["rng"])
