"""Paper methods as problem files, installed as ``bilevel.problems`` (never as a top-level ``problems``).

Each module defines ``Config`` (frozen dataclass with the paper's defaults), ``SMOKE`` (a config that runs
in seconds), ``DEFAULT_SOLVER`` and ``build(cfg, ctx)``, which returns a :class:`bilevel.Nested` or
:class:`bilevel.SingleLevel` record. They are registered in ``pyproject.toml`` under the entry-point group
``bilevel.problems`` (one line per problem), which ``bilevel list`` and ``bilevel run`` read.
"""
