"""The outer loop through HuggingFace Accelerate: the only module of the library that imports accelerate.

One process (``bilevel run ...``) or many (``accelerate launch --num_processes N -m bilevel.run.cli run
...``). The steps themselves are :class:`bilevel.OuterLoop`'s (the one outer loop); this module gives it
what Accelerate provides: the device, a ``ctx.map`` that deals independent work (sub-problems, CMA-ES
candidates) round-robin to the processes and gathers it back in order, ``accelerator.reduce`` of the
gradient (identical copies stay identical; per-process shards become their mean) and of the metrics; and
it adds the run folder (one run per folder, locked for the whole run, see :mod:`bilevel.run.rundir`), the
trackers, the progress bar and checkpoints.

Models are never ``prepare``d (DDP wrappers break torch.func transforms); params dicts live on
``accelerator.device`` and gradients from torch.func are reduced explicitly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from .. import compiled, tree
from ..context import RunContext
from ..declare import Nested
from ..errors import NonFiniteError
from ..divergence import DEFAULT_FACTOR, DEFAULT_WINDOW, check_divergence_options
from ..outer import OuterLoop
from ..verdict import plot_result, verdict_lines
from . import artifacts, rundir
from .warning_digest import first_of_each_kind
from .checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint, set_aside_tripped

OPTIONAL_TRACKERS = tuple(rundir.TRACKER_PACKAGES)


@dataclass
class RunSpec:
    """Everything that defines a run besides the problem's Config.

    ``out`` holds one run: ``resume`` continues it from its newest checkpoint (same settings; a larger
    ``steps`` is allowed), ``overwrite`` deletes its files and starts over; with neither, a folder that
    holds a run is refused (:mod:`bilevel.run.rundir`).
    """

    problem: str
    solver: Optional[str]
    steps: int
    seed: int = 0
    out: str = "runs/default"
    resume: bool = False
    overwrite: bool = False
    checkpoint_every: int = 0
    cpu: bool = False
    mixed_precision: str = "no"
    log_with: Sequence[str] = ()
    progress: bool = True
    keep_checkpoints: int = 2
    divergence_factor: Optional[float] = DEFAULT_FACTOR  # OuterLoop's divergence guard (0/None: off)
    divergence_window: int = DEFAULT_WINDOW
    compile: bool = False  # the inner steps compiled (InnerLoop(compile=True), bilevel.compiled)
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


def _kept(run_dir: Path, failed_step: int) -> str:
    """The hint of a guard error at ``failed_step``: which checkpoint is the last good one.

    A checkpoint ``step-s`` holds the params that step ``s`` evaluates, so ``step-<failed_step>`` holds the
    ones that tripped: the runner sets it aside (:func:`set_aside_tripped`) and the last good one is the newest
    from before ``failed_step``.
    """
    found = list_checkpoints(run_dir)
    good = [p for p in found if _step_of(p) < failed_step]
    aside = [p.name for p in found if _step_of(p) >= failed_step]
    note = f" ({', '.join(aside)} held those params and is set aside as .tripped)" if aside else ""
    if good:
        return f"the last good checkpoint is {good[-1]}{note}"
    return f"no checkpoint from before that step was written (use --checkpoint-every K){note}"


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def run(spec: RunSpec, module: Any, cfg: Any, config_table: dict[str, Any]) -> Optional[dict[str, float]]:
    """Run ``spec.steps`` outer steps of the problem ``module`` with config ``cfg``.

    Before Accelerate starts, the arguments are checked and the main process locks the run folder and
    decides what this run may do there (:mod:`bilevel.run.rundir`); the other processes learn its decision
    once Accelerate is up, so a refusal makes every process raise the same error. Nothing is written
    until every process has built the problem and accepted the checkpoint being resumed.

    Returns the problem's final evaluation on the main process, None on the others.
    """
    rundir.check_run_arguments(steps=spec.steps, checkpoint_every=spec.checkpoint_every, seed=spec.seed,
                               out=spec.out, resume=spec.resume, overwrite=spec.overwrite, log_with=spec.log_with,
                               keep_checkpoints=spec.keep_checkpoints)
    check_divergence_options(spec.divergence_factor, spec.divergence_window)
    process_index, num_processes = rundir.launch_layout()
    solver = spec.solver if spec.solver is not None else getattr(module, "DEFAULT_SOLVER", rundir.UNKNOWN)
    settings = rundir.RunSettings(problem=spec.problem, solver=solver, seed=spec.seed, processes=num_processes,
                                  mixed_precision=spec.mixed_precision, config=config_table)
    folder = rundir.RunFolder(spec.out)
    opening: Optional[rundir.Opening] = None
    refusal: Optional[BaseException] = None
    if process_index == 0:  # only the main process locks, reads the folder's state and writes
        try:
            opening = folder.open(resume=spec.resume, overwrite=spec.overwrite, settings=settings, steps=spec.steps)
        except Exception as err:
            if num_processes == 1:
                raise
            refusal = err  # the other processes are waiting for the decision: tell them first
    try:
        return _run_in_folder(spec, module, cfg, config_table, folder, opening, refusal)
    finally:
        folder.close()


def _run_in_folder(spec: RunSpec, module: Any, cfg: Any, config_table: dict[str, Any], folder: rundir.RunFolder,
                   opening: Optional[rundir.Opening], refusal: Optional[BaseException]) -> Optional[dict[str, float]]:
    run_dir = Path(spec.out)
    tracker = artifacts.JSONLTracker(run_dir)
    accelerator = Accelerator(cpu=spec.cpu, mixed_precision=spec.mixed_precision,
                              log_with=[tracker, *spec.log_with], project_dir=str(run_dir))
    if accelerator.num_processes > 1:  # the main process's decision, for every process
        decision = [refusal, opening.resume_path if opening is not None else None]
        broadcast_object_list(decision, from_process=0)
        refusal, resume_path = decision
    else:
        resume_path = opening.resume_path if opening is not None else None
    if refusal is not None:
        # leave together: torchrun stops the remaining processes as soon as one exits, so a process that
        # lags behind would be killed instead of exiting with the refusal
        accelerator.wait_for_everyone()
        raise refusal
    if resume_path is None:
        payload = None
    elif opening is not None and opening.payload is not None:
        payload = opening.payload
    else:
        payload = load_checkpoint(resume_path)
    start = int(payload["step"]) if payload is not None else 0
    tracker.resume_step = start if payload is not None else None

    set_seed(spec.seed)
    ctx = RunContext(solver_spec=spec.solver, seed=spec.seed, device=accelerator.device,
                     num_processes=accelerator.num_processes, process_index=accelerator.process_index,
                     _map=make_split_map(accelerator), _autocast=accelerator.autocast)
    declaration = _compiled_if_asked(module.build(cfg, ctx), spec)
    compile_before = compiled.compile_stats()  # process-wide counters: this run reports its own part

    def reduce(grads):
        return accelerator.reduce({k: g.detach().to(accelerator.device).contiguous() for k, g in grads.items()},
                                  reduction="mean")

    def gather(metrics):
        return _mean_metrics(gather_object([metrics])) if accelerator.num_processes > 1 else metrics

    loop = OuterLoop(declaration, spec.solver, ctx, name=f"problem {spec.problem!r}", reduce=reduce,
                     gather_metrics=gather, divergence_factor=spec.divergence_factor,
                     divergence_window=spec.divergence_window)
    settings = rundir.RunSettings(problem=spec.problem, solver=loop.solver_spec, seed=spec.seed,
                                  processes=accelerator.num_processes, mixed_precision=spec.mixed_precision,
                                  config=config_table)
    if payload is not None:  # before anything is written: a refused resume changes nothing on disk
        _restore(payload, resume_path, spec, settings, accelerator, loop)
    accelerator.wait_for_everyone()  # every process built the problem and took the checkpoint: now write
    if accelerator.is_main_process:
        folder.commit()
        if payload is not None:  # say which checkpoint: with several kept (or some set aside) it is not obvious
            print(f"bilevel run: resumed from checkpoint {Path(resume_path).name} (outer step {start} of "
                  f"{spec.steps}) in {run_dir}", file=sys.stderr)
        if spec.overwrite and opening is not None and opening.previous:
            deleted, kept = rundir.delete_previous_run(run_dir)
            note = f"bilevel run: --overwrite: deleted the previous run's {', '.join(deleted)} in {run_dir}"
            print(note + (f"; kept files it did not write: {', '.join(kept)}" if kept else ""), file=sys.stderr)
        run_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    resolved = {"problem": spec.problem, "solver": loop.solver_spec, "steps": spec.steps, "seed": spec.seed,
                "processes": accelerator.num_processes, "mixed_precision": spec.mixed_precision,
                "divergence_factor": spec.divergence_factor, "divergence_window": spec.divergence_window,
                "compile": spec.compile, "config": config_table}
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

    with first_of_each_kind():  # the repeats' summary prints after the bar closes, before an error's message
        try:
            loop.run(spec.steps, on_step=on_step, error_hint=lambda: _kept(run_dir, loop.step))
        except NonFiniteError:  # the guards' errors (DivergenceError is one)
            if accelerator.is_main_process:  # never leave the state that tripped the guard as the newest checkpoint
                set_aside_tripped(run_dir, loop.step)
            _finish_trackers(accelerator)
            raise
        except BaseException:
            _finish_trackers(accelerator)
            raise
        finally:
            bar.close()

    if accelerator.is_main_process:  # the learned params and the curves first: a failing evaluation loses neither
        artifacts.save_params(loop.outer, run_dir / "outer.safetensors")
        artifacts.write_csv(run_dir)
        artifacts.plot_curves(run_dir, f"{spec.problem} — solver {loop.solver_spec or 'none (single level)'}")
    if accelerator.is_main_process and spec.compile:  # compile time is in the first steps' step_seconds: say how much
        stats = {k: v - compile_before[k] for k, v in compiled.compile_stats().items()}
        print(f"bilevel run: --compile: {stats['calls']:.0f} compiled inner steps, {stats['graphs']:.0f} graph(s) "
              f"compiled in {stats['compile_seconds']:.1f} s (included in the step_seconds of the steps that "
              "compiled them)", file=sys.stderr)
    final = loop.evaluate()
    if accelerator.is_main_process:  # before the verdict: a verdict that cannot be formed loses no number
        artifacts.write_json(run_dir / "final.json", final)
    verdict = loop.declaration.verdict
    if verdict is not None and final:
        final["verdict"] = verdict_lines(verdict, final)
        if accelerator.is_main_process:
            artifacts.write_json(run_dir / "final.json", final)
            plot_result(verdict, final, run_dir / "result.png", f"{spec.problem}: {spec.steps} outer steps, "
                        f"solver {loop.solver_spec}", final["verdict"])
    if accelerator.is_main_process and loop.declaration.plot is not None:
        loop.declaration.plot(tree.detach(loop.outer), final, run_dir)
    accelerator.wait_for_everyone()
    is_main = accelerator.is_main_process
    accelerator.end_training()
    return final if is_main else None


def _compiled_if_asked(declaration: Any, spec: RunSpec) -> Any:
    """The declaration with ``InnerLoop(compile=True)`` when the run asks for ``--compile``."""
    if not spec.compile:
        return declaration
    if not isinstance(declaration, Nested):
        raise ValueError(f"--compile compiles inner-loop steps, but problem {spec.problem!r} is single-level (no inner "
                         "loop); drop --compile")
    return dataclasses.replace(declaration, loop=dataclasses.replace(declaration.loop, compile=True))


def _finish_trackers(accelerator: Accelerator) -> None:
    """Flush what the extra trackers hold after a failure (metrics.jsonl is already on disk)."""
    for opened in accelerator.trackers:
        with contextlib.suppress(Exception):  # the run's own error is the one to report
            opened.finish()


def _checkpoint(spec: RunSpec, loop: OuterLoop, accelerator: Accelerator, run_dir: Path,
                config_table: dict[str, Any]) -> None:
    """Full state: the loop's state (outer params and optimiser, warm starts, solver state, step) and
    every process's RNG states (the loop's state is identical on every process)."""
    per_process = gather_object([{"rng": rng_state()}])
    if accelerator.is_main_process:
        payload = {**_to(loop.state_dict(), "cpu"), "problem": spec.problem, "solver": loop.solver_spec,
                   "seed": spec.seed, "num_processes": accelerator.num_processes,
                   "mixed_precision": spec.mixed_precision, "config": config_table, "processes": per_process}
        save_checkpoint(run_dir, loop.step, payload, keep=spec.keep_checkpoints)
    accelerator.wait_for_everyone()


def _restore(payload: dict, path: Path, spec: RunSpec, settings: rundir.RunSettings, accelerator: Accelerator,
             loop: OuterLoop) -> None:
    """Load the checkpoint into ``loop`` after checking it was written by a run with the same settings.

    The main process checked the settings before Accelerate started, with the solver as far as it was known
    then; this repeats the check on every process with the solver the loop resolved (the problem's default
    when the run names none), so that all processes refuse together.
    """
    rundir.check_resume(payload, path, settings, spec.steps)
    try:
        # the keys the loop's own state_dict has (the loop, not this module, says what its state is)
        loop.load_state_dict(_to({k: payload[k] for k in loop.state_dict() if k in payload}, accelerator.device))
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"--resume: checkpoint {path} does not fit this problem: {err}; resume it with the "
                              "problem and settings it was written with, or start over with --overwrite") from err
    set_rng_state(payload["processes"][accelerator.process_index]["rng"])
