"""Plots: the legend is off the data, N:M points carry their pattern, chance level is marked."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from sparseforge.experiments.essential import figure  # noqa: E402
from sparseforge.experiments.plotting import chance_line, legend_outside  # noqa: E402


def _result() -> dict:
    rows = [
        {"structure": "unstructured", "method": m, "sparsity": s, "accuracy": a}
        for m in ("magnitude", "random")
        for s, a in ((0.0, 0.9), (0.5, 0.85), (0.9, 0.3))
    ]
    rows += [
        {"structure": p, "method": "magnitude", "sparsity": s, "accuracy": 0.8}
        for p, s in (("2:4", 0.5), ("1:8", 0.875))
    ]
    return {"results": rows, "dense_accuracy": 0.9, "num_classes": 10, "model": "mlp", "dataset": "mnist1d"}


def test_legend_lies_outside_the_axes():
    fig = figure(_result())
    fig.canvas.draw()
    ax = fig.axes[0]
    legend_box = ax.get_legend().get_window_extent()
    axes_box = ax.get_window_extent()
    assert legend_box.x0 >= axes_box.x1  # entirely to the right of the data area
    plt.close(fig)


def test_nm_points_are_labelled_with_their_pattern_and_chance_is_marked():
    fig = figure(_result())
    ax = fig.axes[0]
    labels = {t.get_text(): t.xy for t in ax.texts}
    assert labels == {"2:4": (0.5, 0.8), "1:8": (0.875, 0.8)}
    chance = [ln for ln in ax.get_lines() if ln.get_label().startswith("chance")]
    assert len(chance) == 1 and list(chance[0].get_ydata()) == [0.1, 0.1]
    plt.close(fig)


def test_chance_line_level_and_refusal():
    fig, ax = plt.subplots()
    line = chance_line(ax, 4)
    assert list(line.get_ydata()) == [0.25, 0.25] and "1/4" in line.get_label()
    with pytest.raises(ValueError, match="num_classes=1"):
        chance_line(ax, 1)
    ax.plot([0, 1], [0, 1], label="x")
    assert legend_outside(ax).get_bbox_to_anchor() is not None
    plt.close(fig)
