"""One plot of activation sparsity per layer: the mean and the spread over tokens."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..errors import SparseforgeError
from .measure import ActivationReport

__all__ = ["plot_activation_sparsity"]


def plot_activation_sparsity(reports: Mapping[str, ActivationReport], path: str | Path, title: str = "") -> Path:
    """Write a PNG: per layer (x), each report's mean input sparsity, with the 10-90 % token range shaded.

    ``reports`` maps a label (e.g. a method) to an :class:`ActivationReport` measured on the same
    layers; sparsity is the ``below`` fraction (entries at or below the threshold). Written
    atomically; returns the path.
    """
    if not reports:
        raise SparseforgeError("no reports to plot; allowed: a mapping of label -> ActivationReport")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..experiments.plotting import legend_outside, save_png

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    try:
        for label, report in reports.items():
            x = list(range(len(report.layers)))
            mean = [100 * layer.below for layer in report.layers]
            lo = [100 * layer.per_token[0] for layer in report.layers]
            hi = [100 * layer.per_token[2] for layer in report.layers]
            (line,) = ax.plot(x, mean, marker="o", ms=3, label=label)
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
        ax.set_xticks(range(max(len(report.layers) for report in reports.values())))
        ax.set_xlabel("layer (model order)")
        ax.set_ylabel("inactive inputs, % (10-90 % of tokens shaded)")
        ax.set_ylim(0, 100)
        if title:
            ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        legend_outside(ax)
        return Path(save_png(fig, path))
    finally:
        plt.close(fig)
