"""The names a problem file exports, for one algorithm of the domain-generalisation harness.

Every algorithm runs through the same harness; only the default of ``DGConfig.algorithm`` differs, so
``problems/<name>.py`` is its docstring (the maths) plus one call to :func:`algorithm_problem`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from bilevel import RunContext, SingleLevel

from .harness import DGConfig, build_task

SMOKE_SETTINGS: dict[str, Any] = dict(dataset="synthetic", hidden=16, anneal_step=2, penalty_weight=10.0, probes=8)


def algorithm_problem(name: str, module: str) -> tuple[type, Any, Any]:
    """``(Config, SMOKE, build)`` for algorithm ``name``, defined in problem module ``module``.

    No ``DEFAULT_SOLVER``: regularised risk minimisation has no hypergradient to solve for.
    """
    config = dataclasses.make_dataclass("Config", [("algorithm", str, dataclasses.field(default=name))],
                                        bases=(DGConfig,), frozen=True, namespace={"__module__": module})

    def build(cfg: DGConfig, ctx: RunContext) -> SingleLevel:
        if cfg.algorithm != name:
            raise ValueError(f"problem {name!r} builds algorithm {name!r}, got algorithm={cfg.algorithm!r}; "
                             "use the problem of that algorithm")
        return build_task(cfg, ctx)

    return config, config(**SMOKE_SETTINGS), build
