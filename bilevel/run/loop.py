"""The outer loop through HuggingFace Accelerate: the only module of the library that imports accelerate.

One process (``bilevel run ...``) or many (``accelerate launch --num_processes N -m bilevel.run.cli run
...``). Each step every process calls ``task.step``; the returned gradient is averaged across processes
with ``accelerator.reduce`` (identical copies stay identical; per-process shards become their mean), the
guards check it, and one ``torch.optim`` step updates the outer params, which therefore stay identical on
every process. Independent work inside a step (CMA-ES candidates, leave-one-domain-out inner runs, seeds)
goes through ``ctx.map``: items are dealt round-robin to the processes and gathered back in order.

Models are never ``prepare``d (DDP wrappers break torch.func transforms); params dicts live on
``accelerator.device`` and gradients from torch.func are reduced explicitly.
"""
from __future__ import annotations

import math
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

from ..errors import NonFiniteError
from ..task import RunContext, Task, outer_optimizer_for
from . import artifacts
from .checkpoint import CheckpointError, find_resume_checkpoint, latest_checkpoint, load_checkpoint, save_checkpoint

OPTIONAL_TRACKERS = ("tensorboard", "wandb", "mlflow")


@dataclass
class RunSpec:
    """Everything that defines a run besides the problem's Config."""

    problem: str
    solver: str
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


def _guard(step: int, solver: str, grads: dict[str, torch.Tensor], metrics: dict[str, float],
           run_dir: Path) -> None:
    """Stop with an error naming the step, the solver and the quantity when something is NaN/Inf."""
    bad = [f"hypergradient[{k!r}]" for k, g in grads.items() if not bool(torch.isfinite(g).all())]
    bad += [f"metric {k!r} = {v}" for k, v in metrics.items() if "loss" in k and not math.isfinite(v)]
    if bad:
        raise NonFiniteError(f"outer step {step}, solver {solver!r}: non-finite {', '.join(bad)}; the outer "
                             f"params were not updated; {_kept(run_dir)}. Lower the outer/inner learning rate "
                             "or check the solver options, then resume with --resume.")


def _kept(run_dir: Path) -> str:
    last = latest_checkpoint(run_dir)
    return f"the last good checkpoint is {last}" if last else "no checkpoint was written (use --checkpoint-every K)"


def run(spec: RunSpec, module: Any, cfg: Any, config_table: dict[str, Any]) -> Optional[dict[str, float]]:
    """Run ``spec.steps`` outer steps of the problem ``module`` with config ``cfg``.

    Returns the task's final evaluation on the main process, None on the others.
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
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    resolved = {"problem": spec.problem, "solver": spec.solver, "steps": spec.steps, "seed": spec.seed,
                "processes": accelerator.num_processes, "mixed_precision": spec.mixed_precision,
                "config": config_table}
    accelerator.init_trackers(run_dir.name or "run", config={k: str(v) for k, v in resolved.items()})
    if accelerator.is_main_process:
        artifacts.write_json(run_dir / "config.json", resolved)

    task: Task = module.build(cfg, ctx)
    outer = {k: v.detach().clone().to(accelerator.device).requires_grad_(True) for k, v in task.outer.items()}
    optimizer = outer_optimizer_for(task, ctx, list(outer.values()))
    if payload is not None:
        _restore(payload, resume_path, spec, accelerator, task, outer, optimizer)

    bar = tqdm(total=spec.steps, initial=start, disable=not (spec.progress and accelerator.is_main_process),
               desc=f"{spec.problem} [{spec.solver}]", dynamic_ncols=True)
    for step in range(start, spec.steps):
        began = time.perf_counter()
        try:
            out = task.step({k: v.detach() for k, v in outer.items()}, ctx, step)
        except NonFiniteError as err:
            raise NonFiniteError(f"outer step {step}, solver {spec.solver!r}: {err}; the outer params were not "
                                 f"updated; {_kept(run_dir)}") from err
        grads = accelerator.reduce({k: out.grads[k].detach().to(accelerator.device, v.dtype).contiguous()
                                    for k, v in outer.items()}, reduction="mean")
        metrics = dict(out.metrics)
        if accelerator.num_processes > 1:
            metrics = _mean_metrics(gather_object([metrics]))
        _guard(step, spec.solver, grads, metrics, run_dir)
        for key, param in outer.items():
            param.grad = grads[key]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        metrics["step_seconds"] = time.perf_counter() - began
        accelerator.log(metrics, step=step)
        bar.update(1)
        bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("outer_loss", "inner_loss") if k in metrics})
        if spec.checkpoint_every and (step + 1) % spec.checkpoint_every == 0:
            _checkpoint(step + 1, spec, accelerator, task, outer, optimizer, run_dir)
    bar.close()

    final = task.evaluate({k: v.detach() for k, v in outer.items()}, ctx)
    if accelerator.is_main_process:
        artifacts.save_params(outer, run_dir / "outer.safetensors")
        artifacts.write_json(run_dir / "final.json", final)
        artifacts.write_csv(run_dir)
        artifacts.plot_curves(run_dir, f"{spec.problem} — solver {spec.solver}")
    accelerator.wait_for_everyone()
    is_main = accelerator.is_main_process
    accelerator.end_training()
    return final if is_main else None


def _checkpoint(next_step: int, spec: RunSpec, accelerator: Accelerator, task: Task, outer, optimizer,
                run_dir: Path) -> None:
    """Full state: outer params and optimiser, every process's task state and RNG states, the step."""
    per_process = gather_object([{"task": _to(task.state_dict(), "cpu"), "rng": rng_state()}])
    if accelerator.is_main_process:
        payload = {"step": next_step, "problem": spec.problem, "solver": spec.solver, "seed": spec.seed,
                   "num_processes": accelerator.num_processes,
                   "outer": {k: v.detach().cpu() for k, v in outer.items()},
                   "optimizer": optimizer.state_dict(), "processes": per_process}
        save_checkpoint(run_dir, next_step, payload, keep=spec.keep_checkpoints)
    accelerator.wait_for_everyone()


def _restore(payload: dict, path: Path, spec: RunSpec, accelerator: Accelerator, task: Task, outer,
             optimizer) -> None:
    for key, now in (("problem", spec.problem), ("solver", spec.solver), ("num_processes", accelerator.num_processes)):
        if payload.get(key) != now:
            raise CheckpointError(f"--resume: checkpoint {path} was written with {key}={payload.get(key)!r} but "
                                  f"this run has {key}={now!r}; resume with the same settings")
    if set(payload["outer"]) != set(outer):
        raise CheckpointError(f"--resume: checkpoint {path} holds outer params {sorted(payload['outer'])}, the "
                              f"problem has {sorted(outer)}")
    with torch.no_grad():
        for key, param in outer.items():
            param.copy_(payload["outer"][key].to(param.device))
    optimizer.load_state_dict(payload["optimizer"])
    mine = payload["processes"][accelerator.process_index]
    task.load_state_dict(_to(mine["task"], accelerator.device))
    set_rng_state(mine["rng"])
