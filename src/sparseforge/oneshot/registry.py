"""The one-shot pruning methods by name, with what each needs from the calibration data.

The driver reads :attr:`Method.needs` to decide which statistics to gather for a layer:
``"none"`` (no calibration pass: magnitude), ``"norms"`` (input column norms, means and variances:
Wanda, RIA) or ``"hessian"`` (also ``X^T X``: SparseGPT). Every ``fn`` has the signature
``fn(weight, stats, sparsity, structure, **options) -> LayerResult``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ..errors import SparseforgeError
from .magnitude import prune_magnitude
from .result import LayerResult
from .ria import prune_ria
from .sparsegpt import prune_sparsegpt
from .wanda import prune_wanda

__all__ = ["METHODS", "Method", "Needs", "get_method"]

#: What a method needs from the calibration pass.
Needs = Literal["none", "norms", "hessian"]


@dataclass(frozen=True)
class Method:
    """A one-shot pruning method: its name, its layer function and the statistics it needs."""

    name: str
    fn: Callable[..., LayerResult]
    needs: Needs


METHODS: dict[str, Method] = {
    "magnitude": Method("magnitude", prune_magnitude, "none"),
    "wanda": Method("wanda", prune_wanda, "norms"),
    "ria": Method("ria", prune_ria, "norms"),
    "sparsegpt": Method("sparsegpt", prune_sparsegpt, "hessian"),
}


def get_method(name: str) -> Method:
    """The :class:`Method` called ``name``; an unknown name raises :class:`SparseforgeError`."""
    method = METHODS.get(name) if isinstance(name, str) else None
    if method is None:
        raise SparseforgeError(f"method={name!r} is not known; allowed: {', '.join(sorted(METHODS))}")
    return method
