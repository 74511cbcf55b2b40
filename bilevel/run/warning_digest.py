"""A run's warnings: the first of each kind in full, the repeats counted and summarised at the end.

A diagnostic that fires at every outer step (a Neumann series short of its tolerance, an inner loop stopped
short of stationarity) would otherwise print hundreds of near-identical paragraphs, each with its own
numbers, so Python's once-per-message filter lets every one through and buries the rest of the output.
Nothing is hidden: the repeats are counted, the last one is quoted, and the per-step numbers behind them are
in ``metrics.jsonl`` (``converged``, ``residual``, ``inner_grad_norm_rel``).
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Iterator, TextIO


@contextlib.contextmanager
def first_of_each_kind(stream: TextIO | None = None) -> Iterator[dict[str, int]]:
    """Show the first warning of each category as usual; count later ones of the same category and, on
    exit, print one line per category that repeated: how many more, and the last message. Yields the
    ``{category name: total count}`` tally."""
    totals: dict[str, int] = {}
    last: dict[str, str] = {}
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        name = category.__name__
        totals[name] = totals.get(name, 0) + 1
        if totals[name] == 1:
            original(message, category, filename, lineno, file, line)
        else:
            last[name] = " ".join(str(message).split())

    warnings.showwarning = show
    try:
        yield totals
    finally:
        warnings.showwarning = original
        out = stream or sys.stderr
        for name, total in totals.items():
            if total > 1:
                print(f"bilevel run: {name} repeated {total - 1} more time(s) after the first one shown; the last: "
                      f"{last[name]}", file=out)
