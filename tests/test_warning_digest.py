"""A run's repeated warnings: the first of each category shown in full, the repeats counted and the last quoted."""
import io
import subprocess
import sys
import warnings

import bilevel
from bilevel.run.warning_digest import first_of_each_kind


def test_first_of_each_category_is_shown_and_repeats_are_counted():
    shown, stream = [], io.StringIO()
    original = warnings.showwarning
    warnings.showwarning = lambda message, *rest, **kw: shown.append(str(message))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            with first_of_each_kind(stream) as totals:
                for k in range(5):
                    warnings.warn(f"residual {k}", bilevel.ConvergenceWarning)
                warnings.warn("not stationary", bilevel.StationarityWarning)
    finally:
        warnings.showwarning = original
    assert shown == ["residual 0", "not stationary"]
    assert totals == {"ConvergenceWarning": 5, "StationarityWarning": 1}
    assert stream.getvalue() == ("bilevel run: ConvergenceWarning repeated 4 more time(s) after the first one shown; "
                                 "the last: residual 4\n")
    assert warnings.showwarning is original


def test_a_run_prints_one_warning_per_category(tmp_path):
    """A Neumann series too short for its tolerance warns at every step: shown once, then counted (in a
    subprocess: pytest records warnings itself instead of showing them)."""
    proc = subprocess.run([sys.executable, "-m", "bilevel.run.cli", "run", "ridge", "--smoke", "--steps", "4",
                           "--solver", "neumann:alpha=auto,terms=2", "--out", str(tmp_path / "r"), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("ConvergenceWarning: Neumann did not converge") == 1
    assert ("bilevel run: ConvergenceWarning repeated 3 more time(s) after the first one shown; the last: Neumann"
            in proc.stderr)
