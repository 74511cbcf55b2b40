"""What a learned loss looks like: per-sample loss against the true-class probability, beside cross-entropy.

The curve is the one of the ITL paper's Fig. 5: the true class gets probability p and the other C − 1 classes
share 1 − p equally; logits = log probabilities, so softmax gives back exactly those probabilities. Each
loss is scaled to [0, 1] over p ∈ [0.01, 1] so that shapes, not scales, are compared (a Taylor loss's offset
and scale do not change the gradient direction, only its size).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import torch


def loss_curve(loss_fn: Callable, num_classes: int, p: torch.Tensor) -> torch.Tensor:
    """``loss_fn`` on one sample per p (true class 0 with probability p, the rest equal), unscaled."""
    probs = torch.cat([p[:, None], ((1 - p) / (num_classes - 1))[:, None].expand(-1, num_classes - 1)], 1)
    logits = probs.clamp_min(1e-12).log()
    with torch.no_grad():
        return torch.stack([loss_fn(logits[i:i + 1].float(), torch.tensor([0])).double() for i in range(len(p))])


def plot_loss_shapes(losses: Mapping[str, Callable], path: str | Path, title: str, num_classes: int = 10) -> Path:
    """``path``: every loss's scaled curve (module docstring) against the true-class probability."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = torch.linspace(0.01, 1.0, 200, dtype=torch.float64)
    fig, ax = plt.subplots(figsize=(5.6, 3.8), constrained_layout=True)
    for i, (name, fn) in enumerate(losses.items()):
        values = loss_curve(fn, num_classes, p)
        span = float(values.max() - values.min())
        # dashed from the third loss on (references such as a start loss), so an unmoved loss stays visible
        ax.plot(p, (values - values.min()) / (span if span > 0 else 1.0), label=name, linestyle="-" if i < 2 else "--")
    ax.set(xlabel="probability of the true class", ylabel="loss (scaled to [0, 1])", title=title)
    ax.title.set_fontsize(9)
    ax.legend()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
