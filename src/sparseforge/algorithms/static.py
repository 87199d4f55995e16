"""Static sparse training: a mask chosen at initialisation and fixed for the whole run.

The mask usually comes from random scores with an ERK layer budget (random pruning at init)::

    masks = init_sparse(model, 0.9)                     # random, ERK, seeded
    Sparsifier(model, optimizer, masks, StaticSparse())
"""

from __future__ import annotations

from torch import nn

from ..masks import MaskState
from ..pruning import prune
from ..structures import Structure
from .base import Algorithm

__all__ = ["StaticSparse", "init_sparse"]


class StaticSparse(Algorithm):
    """The mask never changes (the Sparsifier alone keeps pruned weights and their state at 0)."""


def init_sparse(
    model: nn.Module,
    sparsity: float,
    distribution: str = "erk",
    method: str = "random",
    seed: int = 0,
    *,
    structure: str | Structure = "unstructured",
    first_last_dense: bool = False,
) -> MaskState:
    """Prune ``model`` in place at initialisation and return its masks.

    Args:
        sparsity: fraction of zeros over the prunable weights, in [0, 1) (0 gives dense masks,
            the starting point of GMP).
        distribution: layer budget: ``erk`` (default), ``er``, ``uniform`` or ``global``.
        method: score, ``random`` (default; seeded by ``seed``) or any :func:`sparseforge.prune`
            method that needs no data (``magnitude``).
        structure: e.g. ``"fanin"`` (constant fan-in, for SRigL).
    """
    return prune(
        model,
        sparsity,
        method=method,
        distribution=distribution,
        seed=seed,
        structure=structure,
        first_last_dense=first_last_dense,
    )
