"""Conventions every accuracy plot of the project follows.

The legend sits outside the axes, to the right, so it never hides a data point; where accuracy is
plotted, a dotted line marks chance level (1 / number of classes), so a collapsed model reads as
such at a glance.
"""

from __future__ import annotations

from typing import Any


def legend_outside(ax: Any, **kwargs: Any) -> Any:
    """Place ``ax``'s legend to the right of the axes (off the data); returns the legend."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=7, **kwargs)


def chance_line(ax: Any, num_classes: int) -> Any:
    """A horizontal line at chance accuracy ``1 / num_classes``, labelled in the legend."""
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes} is not allowed; allowed: an integer >= 2")
    level = 1.0 / num_classes
    return ax.axhline(level, color="grey", lw=0.8, ls="--", label=f"chance (1/{num_classes} = {level:.2f})")


def save_png(fig: Any, path: Any) -> Any:
    """Write ``fig`` as PNG through the atomic-write helper, with the outside legend included."""
    from ..fileio import atomic_write

    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
