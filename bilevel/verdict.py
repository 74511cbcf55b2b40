"""A run's verdict: the method against its baseline over seeds, and whether the gap is larger than the noise.

A problem's ``evaluate`` may return, besides plain numbers, per-seed lists (one value per evaluation seed,
the same seeds for every loss or method, so the lists are *paired*). A :class:`Verdict` in the declaration
names which list is the method, which the baseline and which are controls; at the end of ``bilevel run``
the runner prints :func:`verdict_lines`, stores them in ``final.json`` and draws :func:`plot_result`
(``result.png``).

"Larger than the noise" is a two-sided paired t-test at 5 %: with dᵢ = methodᵢ − baselineᵢ over n seeds,
t = mean(d) / (std(d) / √n) with n − 1 degrees of freedom (``scipy.stats.ttest_rel``). Pairing by seed
removes the variance the two runs share (same initialisation, batches and label noise), so a gap is judged
against the spread of the *differences*, not of the raw accuracies.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

SIGNIFICANCE = 0.05  # two-sided level of "larger than the noise"


@dataclass(frozen=True)
class Verdict:
    """Which per-seed lists of a problem's final evaluation the run's verdict compares.

    Args:
        method: key of the method's per-seed values in the evaluation.
        baseline: key of the baseline's per-seed values (paired with the method's by seed).
        metric: what the values measure, e.g. ``"clean test accuracy (%)"``.
        controls: further keys compared with the method the same way (e.g. an ablation).
        labels: display names by key (default: the key).
        higher_is_better: whether a larger value is a win.
    """

    method: str
    baseline: str
    metric: str
    controls: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        keys = self.keys
        if not all(isinstance(k, str) and k for k in keys) or len(set(keys)) != len(keys):
            raise ValueError(f"Verdict: method, baseline and controls must be distinct non-empty keys of the "
                             f"evaluation, got method={self.method!r}, baseline={self.baseline!r}, "
                             f"controls={self.controls!r}")

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.method, self.baseline, *self.controls)

    def label(self, key: str) -> str:
        return self.labels.get(key, key)


@dataclass(frozen=True)
class PairedGap:
    """method − other over paired seeds: mean, sample std of the differences, n, two-sided p-value."""

    mean: float
    std: float
    n: int
    p_value: float

    @property
    def larger_than_noise(self) -> bool:
        return self.n >= 2 and self.p_value < SIGNIFICANCE


def paired_gap(method: Sequence[float], other: Sequence[float]) -> PairedGap:
    """The paired difference method − other and its two-sided paired t-test p-value.

    p is NaN with fewer than 2 seeds (no noise estimate); with identical nonzero differences (zero spread) it
    is 0, and with all differences zero it is 1.
    """
    if len(method) != len(other) or not method:
        raise ValueError(f"paired_gap: needs two non-empty lists of the same length (one value per seed), got "
                         f"{len(method)} and {len(other)}")
    n = len(method)
    mean, std = mean_std([a - b for a, b in zip(method, other)])
    if n < 2:
        return PairedGap(mean, math.nan, n, math.nan)
    if std == 0.0:  # the t statistic is ±∞ or 0/0: decide without scipy's warning
        return PairedGap(mean, 0.0, n, 1.0 if mean == 0.0 else 0.0)
    from scipy.stats import ttest_rel
    return PairedGap(mean, std, n, float(ttest_rel(method, other).pvalue))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def _seeds(final: Mapping, key: str) -> list[float]:
    values = final.get(key)
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"verdict: the evaluation has no per-seed list under {key!r} (keys: {sorted(final)}); "
                         "the problem's evaluate must return one value per seed for every key its Verdict names")
    return [float(v) for v in values]


def verdict_lines(verdict: Verdict, final: Mapping) -> list[str]:
    """One line for the method against the baseline, one per control: means ± std over seeds, the paired gap
    and whether it is larger than the noise (p < 0.05), worded by who wins."""
    method = _seeds(final, verdict.method)
    lines = []
    for other_key in (verdict.baseline, *verdict.controls):
        other = _seeds(final, other_key)
        gap = paired_gap(method, other)
        (m, ms), (o, os_) = mean_std(method), mean_std(other)
        better = gap.mean > 0 if verdict.higher_is_better else gap.mean < 0
        if gap.n < 2:
            call = "one seed: the noise is unknown, no verdict"
        elif not gap.larger_than_noise:
            call = f"not larger than the noise (paired t-test p = {gap.p_value:.2g})"
        else:
            call = (f"{verdict.label(verdict.method)} {'wins' if better else 'loses'}, larger than the noise "
                    f"(paired t-test p = {gap.p_value:.2g})")
        lines.append(f"{'verdict' if other_key == verdict.baseline else 'control'}: {verdict.label(verdict.method)} "
                     f"{m:.4g} ± {ms:.2g} vs {verdict.label(other_key)} {o:.4g} ± {os_:.2g} {verdict.metric} over "
                     f"{gap.n} seeds; difference {gap.mean:+.3g} ± {gap.std:.2g}: {call}")
    return lines


def plot_result(verdict: Verdict, final: Mapping, path: str | Path, title: str,
                lines: Optional[list[str]] = None) -> Path:
    """``result.png``: every compared key's per-seed values (dots, seeds joined by thin lines) and mean ± std
    (thick tick and whisker), with the verdict line under the title."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = verdict.keys
    values = [_seeds(final, k) for k in keys]
    fig, ax = plt.subplots(figsize=(6.4, 4.4), constrained_layout=True)
    colours = ["tab:green", "tab:grey"] + ["tab:blue"] * len(verdict.controls)
    for i, (vals, colour) in enumerate(zip(values, colours)):
        mean, std = mean_std(vals)
        ax.hlines(mean, i - 0.25, i + 0.25, color=colour, lw=3)  # not a bar: the axis does not start at 0
        if std == std:
            ax.errorbar(i, mean, yerr=std, color="black", capsize=6, lw=1.2)
        ax.scatter([i] * len(vals), vals, color=colour, edgecolor="black", zorder=3, s=28)
    for seed_values in zip(*values):  # one thin line per seed: the pairing the test uses
        ax.plot(range(len(keys)), seed_values, color="black", alpha=0.15, lw=0.8)
    ax.set_xticks(range(len(keys)), [verdict.label(k) for k in keys])
    low = min(min(v) for v in values)
    high = max(max(v) for v in values)
    pad = 0.25 * (high - low or 1.0)
    ax.set_ylim(low - pad, high + pad)
    ax.set_ylabel(verdict.metric)
    first = (lines or verdict_lines(verdict, final))[0]
    ax.set_title(f"{title}\n{_wrap(first, 80)}", fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _wrap(text: str, width: int) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(text, width))
